"""moe_route's reference tests (the contract: glm52_backends/ops/moe_route.py): the reference checked against an
independent naive formulation (not against itself)."""

from __future__ import annotations

import math

import pytest
import torch

from glm52_backends import ops as R
from glm52_backends.conformance.inputs import generator

D64 = torch.float64


def test_moe_route_equals_per_token_rule():
    g = generator("naive", "route")
    T, E, K, ng, tg, rsf = 4, 16, 3, 4, 2, 2.5
    logits = torch.randn(T, E, generator=g, dtype=D64)
    bias = torch.rand(E, generator=g, dtype=D64) * 0.3
    ids, w = R.moe_route(logits, bias, K, ng, tg, True, rsf, cdt=D64)
    for t in range(T):
        s = [1 / (1 + math.exp(-float(v))) for v in logits[t]]
        c = [s[e] + float(bias[e]) for e in range(E)]
        grp = sorted(range(ng), key=lambda q: -sum(sorted(c[q * 4:(q + 1) * 4])[-2:]))[:tg]
        allowed = [e for e in range(E) if e // 4 in grp]
        chosen = sorted(allowed, key=lambda e: -c[e])[:K]
        total = sum(s[e] for e in chosen)
        want = {e: s[e] / total * rsf for e in chosen}
        got = dict(zip(ids[t].tolist(), w[t].tolist()))
        assert set(got) == set(want)
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-6)
