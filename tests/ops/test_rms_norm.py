"""rms_norm's reference tests (the contract: glm52_backends/ops/rms_norm.py): its formula."""

from __future__ import annotations

import torch

from glm52_backends import ops as R

from norm_inputs import D64, norm_inputs


def test_rms_norm_equals_its_formula():
    _, x, wt, _ = norm_inputs()
    rms = wt * x / torch.sqrt((x * x).sum(-1, keepdim=True) / 12 + 1e-5)
    torch.testing.assert_close(R.rms_norm(x, wt, 1e-5, cdt=D64), rms)
