"""The float64 inputs of the rms_norm, layer_norm and mlp formula tests (tests/ops)."""

from __future__ import annotations

import torch

from glm52_backends.conformance.inputs import generator

D64 = torch.float64


def norm_inputs():
    """x [4, 12], weight, bias in float64, the draws the three formula tests share."""
    g = generator("naive", "norms")
    x = torch.randn(4, 12, generator=g, dtype=D64) * 3
    wt, b = torch.rand(12, generator=g, dtype=D64), torch.randn(12, generator=g, dtype=D64)
    return g, x, wt, b
