"""moe_experts' reference tests (the contract: glm52_backends/ops/moe_experts.py): the reference checked against
an independent naive formulation (not against itself)."""

from __future__ import annotations

import torch

from glm52_backends import ops as R
from glm52_backends.conformance.inputs import generator

D64 = torch.float64


def test_moe_experts_equals_per_token_loop():
    g = generator("naive", "moe")
    T, Hd, I, E, K = 6, 8, 5, 5, 2
    x = torch.randn(T, Hd, generator=g, dtype=D64)
    w13 = torch.randn(E, 2 * I, Hd, generator=g, dtype=D64)
    w2 = torch.randn(E, Hd, I, generator=g, dtype=D64)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[2, 1] = -1
    wts = torch.rand(T, K, generator=g, dtype=torch.float32)
    y = R.moe_experts(x, w13, w2, ids, wts, cdt=D64)
    for t in range(T):
        want = torch.zeros(Hd, dtype=D64)
        for j in range(K):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate, up = w13[e, :I] @ x[t], w13[e, I:] @ x[t]
            want += float(wts[t, j]) * (w2[e] @ (gate / (1 + torch.exp(-gate)) * up))
        torch.testing.assert_close(y[t], want, rtol=1e-12, atol=1e-12)
