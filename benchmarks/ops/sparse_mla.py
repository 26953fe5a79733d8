"""sparse_mla's benchmark (the contract: glm52_backends/ops/sparse_mla.py): decode at 32K and 128K
contexts, checked against the reference."""

from __future__ import annotations

from .common import Case, Env, decode_step, paged


def plan(add, d, small: bool, A: int) -> None:
    mla_decode = ((4, 500), (16, 500), (1, 1000)) if small else ((32, 32768), (128, 32768), (1, 131072))
    for (B, L), tgt in zip(mla_decode, ("<= 2.0x floor", "<= 2.0x floor", "<= 20 us")):
        # c and k_pe rows read once, q read and out written once, the indices read once
        add("sparse_mla", f"decode B={B} L={L}", {"B": B, "L": L},
            B * d.TOPK * (d.DL + d.DR) * A + B * d.H * (d.DL + d.DR + d.DL) * A + B * d.TOPK * 4,
            2 * B * d.H * d.TOPK * (d.DL + d.DR + d.DL), True, tgt)


def inputs(env: Env, be, case: Case, ref):
    torch, dev, dt, d = env.torch, env.device, env.dtype, env.d
    p = case.params
    B, L = p["B"], p["L"]
    bt, (c, kpe) = paged(env, B, L, (d.DL, d.DR))
    cu, lens = decode_step(env, B, L)
    q = torch.randn(B, d.H, d.DL + d.DR, dtype=dt, device=dev)
    idx = torch.stack([torch.randperm(L, device=dev)[:d.TOPK] for _ in range(B)]).to(torch.int32)
    scale = (d.DN + d.DR) ** -0.5
    base = lambda: ref.sparse_mla(q, c, kpe, idx, bt, lens, cu, scale)  # noqa: E731
    return ((lambda: be.sparse_mla(q, c, kpe, idx, bt, lens, cu, scale)), base, base, "close",
            "reference")
