"""moe_route: GLM-5.2's router in one fused Triton kernel.

Kernel versions and their idea:
  _route_kernel  one program per token: sigmoid, correction bias, group-limited selection (top-2
                 sum per group, topk_group argmax rounds), top-K by K argmax rounds, renormalise,
                 scale. Fusion wins: the torch version is ~10 small launches at decode sizes.
Constants: none beyond the power-of-two padding of E and K (E <= 4096, top_k <= 64, else declined).
Checked by an sm_90 ahead-of-time compile (tests/test_cuda_compile.py); not tuned on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import FLOATS, check_shape, need, pow2


@triton.jit
def _route_kernel(logit_ptr, bias_ptr, ids_ptr, w_ptr, E, s_l0, s_l1, scaling,
                  E_P: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  K: tl.constexpr, K_P: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, E_P)
    ok = e < E
    x = tl.load(logit_ptr + t.to(tl.int64) * s_l0 + e * s_l1, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)                                                        # [E_P]
    choice = tl.where(ok, s + tl.load(bias_ptr + e, mask=ok, other=0.0).to(tl.float32), float("-inf"))
    if G > 1:
        c2 = tl.reshape(choice, (G, EG))
        j = tl.arange(0, EG)
        a1 = tl.argmax(c2, axis=1)
        m1 = tl.max(c2, axis=1)
        m2 = tl.max(tl.where(j[None, :] == a1[:, None], float("-inf"), c2), axis=1)
        gs = m1 + m2                                                         # top-2 sum per group
        gi = tl.arange(0, G)
        keep = gi < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(tl.where(keep, float("-inf"), gs), axis=0)
            keep = keep | (gi == best)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, None], (G, EG)), (E_P,))
        choice = tl.where(keep_e, choice, float("-inf"))
    kk = tl.arange(0, K_P)
    wsel = tl.zeros((K_P,), dtype=tl.float32)
    isel = tl.zeros((K_P,), dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.argmax(choice, axis=0)
        wsel = tl.where(kk == k, tl.sum(tl.where(e == best, s, 0.0), axis=0), wsel)
        isel = tl.where(kk == k, best.to(tl.int64), isel)
        choice = tl.where(e == best, float("-inf"), choice)
    if NORM:
        wsel = wsel / (tl.sum(wsel, axis=0) + 1e-20)
    tl.store(ids_ptr + t.to(tl.int64) * K + kk, isel, mask=kk < K)
    tl.store(w_ptr + t.to(tl.int64) * K + kk, wsel * scaling, mask=kk < K)


def moe_route(router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
              routed_scaling_factor=1.0):
    """Contract: glm52_backends/ops/moe_route.py. router_logits [T, E] -> (ids [T, K] int64, weights [T, K] f32)."""
    op = "moe_route"
    if router_logits.dim() != 2:
        raise ValueError(f"{op}: router_logits must be [T, E], got shape {list(router_logits.shape)}")
    T, E = router_logits.shape
    check_shape(op, "correction_bias", correction_bias, (E,))
    if not 0 < top_k <= E:
        raise ValueError(f"{op}: top_k={top_k} must be in 1..E={E}")
    if n_group < 1 or E % n_group or not 0 < topk_group <= n_group:
        raise ValueError(f"{op}: n_group={n_group} must divide E={E} and topk_group={topk_group} be in 1..n_group")
    need(router_logits.dtype in FLOATS, op, f"router_logits has dtype {router_logits.dtype}")
    need(E <= 4096 and top_k <= 64, op, f"E={E}, top_k={top_k}: kernel takes E <= 4096, top_k <= 64")
    G = n_group if n_group > 1 else 1
    need(G == 1 or (E & (E - 1) == 0 and G & (G - 1) == 0), op,
         f"group-limited routing needs power-of-two E and n_group, got E={E}, n_group={n_group}")
    ids = torch.empty(T, top_k, dtype=torch.int64, device=router_logits.device)
    wts = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    if T == 0:
        return ids, wts
    bias = correction_bias.float().contiguous()
    wrap_triton(_route_kernel)[(T,)](router_logits, bias, ids, wts, E, router_logits.stride(0), router_logits.stride(1),
                        float(routed_scaling_factor), E_P=pow2(E), G=G, EG=pow2(E) // G,
                        TOPK_GROUP=topk_group if G > 1 else 1, K=top_k, K_P=pow2(top_k),
                        NORM=bool(norm_topk_prob), num_warps=4)
    return ids, wts
