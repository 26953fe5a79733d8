"""indexer_topk's benchmark (the contract: glm52_backends/ops/indexer_topk.py): decode at 32K and 128K
contexts and an 8K prefill, checked against the reference by the overlap of the selected sets."""

from __future__ import annotations

from .common import F32, Case, Env, decode_step, paged


def plan(add, d, small: bool, A: int) -> None:
    idx_decode = ((4, 500), (2, 1000), (1, 1000)) if small else ((32, 32768), (8, 131072), (1, 131072))
    for (B, L), tgt in zip(idx_decode, ("<= 2.0x floor", "<= 2.0x floor", "<= 30 us")):
        add("indexer_topk", f"decode B={B} L={L}", {"B": B, "L": L, "q": 1},
            B * L * d.DI * A + B * d.HI * (d.DI * A + F32) + B * d.TOPK * 4, 2 * B * L * d.HI * d.DI, True, tgt)
    S = 200 if small else 8192
    add("indexer_topk", f"prefill S={S}", {"B": 1, "L": S, "q": S},
        S * d.DI * A + S * d.HI * (d.DI * A + F32) + S * d.TOPK * 4, 2 * d.HI * d.DI * S * (S + 1) / 2, False,
        "<= 4x floor")


def inputs(env: Env, be, case: Case, ref):
    torch, dev, dt, d = env.torch, env.device, env.dtype, env.d
    p = case.params
    B, L, q_len = p["B"], p["L"], p.get("q", 1)
    bt, (kc,) = paged(env, B, L, (d.DI,))
    cu, lens = decode_step(env, B, L, q_len)
    q = torch.randn(B * q_len, d.HI, d.DI, dtype=dt, device=dev)
    w = torch.randn(B * q_len, d.HI, device=dev) * (d.HI * d.DI) ** -0.5
    base = lambda: ref.indexer_topk(q, w, kc, bt, lens, cu, d.TOPK)  # noqa: E731
    return ((lambda: be.indexer_topk(q, w, kc, bt, lens, cu, d.TOPK)), base, base, "topk",
            "reference")
