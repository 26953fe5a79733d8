"""mlp's reference tests (the contract: glm52_backends/ops/mlp.py): its formula (SiLU-gated)."""

from __future__ import annotations

import torch

from glm52_backends import ops as R

from norm_inputs import D64, norm_inputs


def test_mlp_equals_its_formula():
    g, x, _, _ = norm_inputs()
    w13, w2 = torch.randn(10, 12, generator=g, dtype=D64), torch.randn(12, 5, generator=g, dtype=D64)
    h = x @ w13.T
    torch.testing.assert_close(R.mlp(x, w13, w2, cdt=D64), (h[:, :5] * torch.sigmoid(h[:, :5]) * h[:, 5:]) @ w2.T)
