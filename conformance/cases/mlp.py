"""mlp's cases (the contract: glm52_backends/ops/mlp.py: the shared expert); `QUANT_CASES` on quantized
weights.
"""

from __future__ import annotations

from .common import QUANT_FFN_FORMATS, SIZES, Arg, Case, CaseInputs, quantized, quantized_w13, randn, seeded


def _mlp(scale: str) -> CaseInputs:  # the shared expert: [2 x 2048, 6144], [6144, 2048]
    s = SIZES[scale]
    g = seeded("mlp", "shared", scale)
    return CaseInputs({"x": Arg(randn(g, 4, s["Hd"]), "act"),
                       "w13": Arg(randn(g, 2 * s["I"], s["Hd"], std=s["Hd"] ** -0.5), "weight"),
                       "w2": Arg(randn(g, s["Hd"], s["I"], std=s["I"] ** -0.5), "weight")})


def _q_mlp(fmt: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = seeded("mlp", fmt, scale)
        Hd, I = s["Hd"], s["I"]
        return CaseInputs({"x": Arg(randn(g, 4, Hd), "act"),
                           "w13": Arg(quantized_w13(randn(g, 2 * I, Hd, std=Hd ** -0.5), fmt), "qweight"),
                           "w2": Arg(quantized(randn(g, Hd, I, std=I ** -0.5), fmt), "qweight")})
    return build


CASES: list[Case] = [
    Case("mlp", "shared-expert", _mlp, "close"),
]

QUANT_CASES: list[Case] = [
    *[Case("mlp", f"{fmt}-shared-expert", _q_mlp(fmt), "close", f"{fmt}: the shared expert") for fmt in QUANT_FFN_FORMATS],
]
