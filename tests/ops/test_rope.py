"""rope's reference tests (the contract: glm52_backends/ops/rope.py): the reference checked against an
independent naive formulation (not against itself)."""

from __future__ import annotations

import torch

from glm52_backends import ops as R
from glm52_backends.conformance.inputs import generator

D64 = torch.float64


def test_rope_equals_complex_rotation():
    g = generator("naive", "rope")
    T, H, Dr, theta = 5, 3, 8, 1e4
    x = torch.randn(T, H, Dr, generator=g, dtype=D64)
    pos = torch.tensor([0, 1, 7, 100, 31])
    y = R.rope(x, pos, theta, cdt=D64)
    freqs = theta ** (-torch.arange(0, Dr, 2, dtype=D64) / Dr)
    rot = torch.polar(torch.ones(T, Dr // 2, dtype=D64), pos[:, None].double() * freqs)   # e^{i pos w}
    want = torch.view_as_real(torch.view_as_complex(x.view(T, H, Dr // 2, 2)) * rot[:, None]).view(T, H, Dr)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)   # angles in float32, as HF computes them
