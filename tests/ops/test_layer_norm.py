"""layer_norm's reference tests (the contract: glm52_backends/ops/layer_norm.py): its formula."""

from __future__ import annotations

import torch

from glm52_backends import ops as R

from norm_inputs import D64, norm_inputs


def test_layer_norm_equals_its_formula():
    _, x, wt, b = norm_inputs()
    mu = x.sum(-1, keepdim=True) / 12
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / 12
    torch.testing.assert_close(R.layer_norm(x, wt, b, 1e-6, cdt=D64), (x - mu) / torch.sqrt(var + 1e-6) * wt + b)
