"""rms_norm's cases (the contract: glm52_backends/ops/rms_norm.py)."""

from __future__ import annotations

from .common import SIZES, Arg, Case, CaseInputs, randn, seeded


def _hidden(scale: str) -> CaseInputs:
    s = SIZES[scale]
    g = seeded("rms_norm", "x", scale)
    x = randn(g, 5, s["Hd"], std=3.0)
    return CaseInputs({"x": Arg(x, "act"), "weight": Arg(1 + 0.1 * randn(g, s["Hd"]), "weight"),
                       "eps": Arg(1e-5, "const")})


def _norm_odd(scale: str) -> CaseInputs:  # 3-D input, odd width
    g = seeded("rms_norm", "odd", scale)
    return CaseInputs({"x": Arg(randn(g, 3, 5, 37), "act"), "weight": Arg(1 + 0.1 * randn(g, 37), "weight"),
                       "eps": Arg(1e-6, "const")})


CASES: list[Case] = [
    Case("rms_norm", "hidden", _hidden, "close"),
    Case("rms_norm", "odd", _norm_odd, "close", "3-D input, width 37"),
]
