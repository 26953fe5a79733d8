"""moe_experts' cases (the contract: glm52_backends/ops/moe_experts.py).

Two dimensions are split rather than run at full size together, because one op call would not fit
a 24 GB CI machine: the 256-expert top-8 routing runs with a small hidden size, and the real hidden
6144 x width 2048 experts run with 4 experts (8 full-size experts in float32 alone are 1.2 GB, 256
would be 39 GB). `QUANT_CASES`: the same op on quantized experts.
"""

from __future__ import annotations

import torch

from .common import QUANT_FFN_FORMATS, SIZES, Arg, Case, CaseInputs, quantized, quantized_w13, rand, randn, randperm, seeded


def _moe_inputs(g, T: int, Hd: int, I: int, E: int, K: int, ids: torch.Tensor | None = None) -> CaseInputs:
    if ids is None:
        ids = torch.stack([randperm(g, E)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    wts = rand(g, T, K) * 0.5 + 0.05
    return CaseInputs(
        {"x": Arg(randn(g, T, Hd), "act"),
         "w13": Arg(randn(g, E, 2 * I, Hd, std=Hd ** -0.5), "weight"),
         "w2": Arg(randn(g, E, Hd, I, std=I ** -0.5), "weight"),
         "topk_ids": Arg(ids.long(), "int"), "topk_weights": Arg(wts, "f32")})


def _moe_routing(T: int):
    def build(scale: str) -> CaseInputs:  # the real 256-expert top-8 routing, small hidden size
        s = SIZES[scale]
        E, K = (256, 8) if scale == "full" else (s["E"], s["top"])
        return _moe_inputs(seeded("moe_experts", f"T{T}", scale), T, 128 if scale == "full" else s["Hd"],
                           64 if scale == "full" else s["I"], E, K)
    return build


def _moe_real_width(scale: str) -> CaseInputs:  # hidden 6144 x width 2048, every expert used
    s = SIZES[scale]
    return _moe_inputs(seeded("moe_experts", "width", scale), 3, s["Hd"], s["I"], 4, 4)


def _moe_special(kind: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = seeded("moe_experts", kind, scale)
        Hd, I = (256, 128) if scale == "full" else (s["Hd"], s["I"])
        if kind == "empty-experts":            # 64 experts, 3 tokens x 2: most experts get nothing
            return _moe_inputs(g, 3, Hd, I, 64, 2)
        if kind == "one-expert":               # every token routed to expert 5 (slot 0) and others
            T, E, K = 33, 16, 4
            ids = torch.stack([torch.cat([torch.tensor([5]), (randperm(g, E - 1)[:K - 1] + 6) % E])
                               for _ in range(T)])
            return _moe_inputs(g, T, Hd, I, E, K, ids)
        if kind == "unused-slots":             # -1 ids: slots a router left empty contribute nothing
            T, E, K = 9, 12, 3
            ids = torch.stack([randperm(g, E)[:K] for _ in range(T)])
            ids[::2, -1] = -1
            ids[1, :] = -1
            return _moe_inputs(g, T, Hd, I, E, K, ids)
        if kind == "odd":
            return _moe_inputs(g, 7, 72, 40, 7, 3)
        raise KeyError(kind)
    return build


def _q_moe(fmt: str, kind: str):
    def build(scale: str) -> CaseInputs:
        from glm52_backends.weights import stack
        s = SIZES[scale]
        g = seeded("moe_experts", f"{fmt}-{kind}", scale)
        if kind == "real-width":
            T, Hd, I, E, K = 3, s["Hd"], s["I"], 4, 4
        else:                                    # 16 tokens, unused slots, experts without tokens
            T, Hd, I, E, K = 16, (256 if scale == "full" else s["Hd"]), (128 if scale == "full" else s["I"]), 12, 3
        ids = torch.stack([randperm(g, E)[:K] for _ in range(T)]) if kind == "real-width" else \
            torch.stack([randperm(g, E - 4)[:K] for _ in range(T)])       # the last 4 experts get no token
        if kind != "real-width":
            ids[::3, -1] = -1
        w13 = randn(g, E, 2 * I, Hd, std=Hd ** -0.5)
        w2 = randn(g, E, Hd, I, std=I ** -0.5)
        return CaseInputs(
            {"x": Arg(randn(g, T, Hd), "act"),
             "w13": Arg(stack([quantized_w13(w13[e], fmt) for e in range(E)]), "qweight"),
             "w2": Arg(stack([quantized(w2[e], fmt) for e in range(E)]), "qweight"),
             "topk_ids": Arg(ids.long(), "int"), "topk_weights": Arg(rand(g, T, K) * 0.5 + 0.05, "f32")})
    return build


CASES: list[Case] = [
    *[Case("moe_experts", f"T{T}", _moe_routing(T), "close", f"{T} tokens, 256 experts top-8 (small hidden)")
      for T in (1, 16, 128)],
    Case("moe_experts", "real-width", _moe_real_width, "close", "hidden 6144 x width 2048, 4 experts"),
    Case("moe_experts", "empty-experts", _moe_special("empty-experts"), "close", "most experts get no token"),
    Case("moe_experts", "one-expert", _moe_special("one-expert"), "close", "every token routed to expert 5"),
    Case("moe_experts", "unused-slots", _moe_special("unused-slots"), "close", "-1 ids, one token with none"),
    Case("moe_experts", "odd", _moe_special("odd"), "close", "hidden 72, width 40, 7 experts top-3"),
]

QUANT_CASES: list[Case] = [
    *[Case("moe_experts", f"{fmt}-{kind}", _q_moe(fmt, kind), "close", f"{fmt}: {about}")
      for fmt in QUANT_FFN_FORMATS for kind, about in (("real-width", "hidden 6144 x width 2048, 4 experts"),
                                                        ("slots", "16 tokens, -1 slots, idle experts"))],
]
