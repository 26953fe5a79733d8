"""layer_norm's cases (the contract: glm52_backends/ops/layer_norm.py: the indexer's key norm)."""

from __future__ import annotations

from .common import SIZES, Arg, Case, CaseInputs, randn, seeded


def _index_key(scale: str) -> CaseInputs:
    s = SIZES[scale]
    g = seeded("layer_norm", "x", scale)
    x = randn(g, 7, s["Di"], std=2.0) + 0.5
    return CaseInputs({"x": Arg(x, "act"), "weight": Arg(1 + 0.1 * randn(g, s["Di"]), "weight"),
                       "bias": Arg(0.1 * randn(g, s["Di"]), "weight"), "eps": Arg(1e-6, "const")})


CASES: list[Case] = [
    Case("layer_norm", "index-key", _index_key, "close"),
]
