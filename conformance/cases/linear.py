"""linear's cases (the contract: glm52_backends/ops/linear.py); `QUANT_CASES` on quantized weights."""

from __future__ import annotations

from .common import QUANT_LINEAR_FORMATS, SIZES, Arg, Case, CaseInputs, quantized, randn, seeded


def _linear(scale: str) -> CaseInputs:  # kv_a_proj_with_mqa: [576, 6144]
    s = SIZES[scale]
    g = seeded("linear", "kv_a", scale)
    return CaseInputs({"x": Arg(randn(g, 5, s["Hd"]), "act"),
                       "weight": Arg(randn(g, s["Dl"] + s["Dr"], s["Hd"], std=s["Hd"] ** -0.5), "weight")})


def _q_linear(fmt: str, odd: bool = False):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = seeded("linear", f"{fmt}-{'odd' if odd else 'kv_a'}", scale)
        N, K = (300, 200) if odd else (s["Dl"] + s["Dr"], s["Hd"])
        x = randn(g, 7 if odd else 5, K)
        x[0, :3] *= 30  # an outlier channel: groups and rows with very different ranges
        w = randn(g, N, K, std=K ** -0.5)
        return CaseInputs({"x": Arg(x, "act"), "weight": Arg(quantized(w, fmt, x), "qweight")})
    return build


CASES: list[Case] = [
    Case("linear", "kv_a", _linear, "close"),
]

QUANT_CASES: list[Case] = [
    *[Case("linear", f"{fmt}-kv_a", _q_linear(fmt), "close", f"{fmt}: kv_a [576, 6144], an outlier channel")
      for fmt in QUANT_LINEAR_FORMATS],
    *[Case("linear", f"{fmt}-odd", _q_linear(fmt, True), "close", f"{fmt}: [300, 200], partial blocks")
      for fmt in QUANT_LINEAR_FORMATS],
]
