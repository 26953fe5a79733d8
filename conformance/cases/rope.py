"""rope's cases (the contract: glm52_backends/ops/rope.py)."""

from __future__ import annotations

import torch

from .common import HEAD_DIMS, SIZES, Arg, Case, CaseInputs, randn, seeded


def _rope(kind: str):
    """Positions stay below 256: float32 angles pos * inv_freq carry an absolute error ~pos * 2^-24,
    so two correct float32 implementations drift apart by more than the float32 row beyond a few
    hundred positions. Large positions are covered by the model-level case."""
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = seeded("rope", kind, scale)
        T = 9
        x = randn(g, T, s["H"], s["Dr"]) if kind == "heads" else randn(g, T, s["Dr"])
        pos = torch.randint(0, 256, (T,), generator=g)
        return CaseInputs({"x": Arg(x, "act"), "positions": Arg(pos, "int"), "theta": Arg(8e6, "const")})
    return build


def _rope_head_dims(scale: str) -> CaseInputs:
    g = seeded("rope", "head-dims", scale)
    x = randn(g, 9, HEAD_DIMS["H"], HEAD_DIMS["Dr"])
    pos = torch.randint(0, 256, (9,), generator=g)
    return CaseInputs({"x": Arg(x, "act"), "positions": Arg(pos, "int"), "theta": Arg(8e6, "const")})


CASES: list[Case] = [
    Case("rope", "heads", _rope("heads"), "close", "[T, H, 64]"),
    Case("rope", "shared-key", _rope("key"), "close", "[T, 64]"),
    Case("rope", "head-dims", _rope_head_dims, "close", "[T, 8, 64] at any scale"),
]
