"""Routed experts as permute -> grouped GEMM -> unpermute (the layout fused MoE kernels use).

    x [T, Hd]; w13 [E, 2I, Hd] (gate rows, then up rows); w2 [E, Hd, I]
    topk_ids [T, K] int (-1 = unused slot); topk_weights [T, K] f32  ->  y [T, Hd] (x.dtype)

Computes in float32. float64 inputs are declined (OpUnsupported), so they run on the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm52_backends.ops import OpUnsupported


def grouped_moe_experts(x, w13, w2, topk_ids, topk_weights):
    if x.dtype == torch.float64:
        raise OpUnsupported("example_vendor's grouped MoE computes in float32")
    T, K = topk_ids.shape
    E, I = w13.shape[0], w2.shape[-1]
    if w13.shape[1] != 2 * I or w13.shape[2] != x.shape[1] or w2.shape[:2] != (E, x.shape[1]):
        raise ValueError(f"moe_experts: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not match "
                         f"x {tuple(x.shape)} (expect [E, 2I, Hd] and [E, Hd, I])")
    flat = topk_ids.reshape(-1).long()                                   # [T*K], copy j = token j // K
    valid = flat >= 0
    # expert-major order of the valid copies; unused slots (-1) sort last and are cut off
    order = torch.argsort(torch.where(valid, flat, E), stable=True)[: int(valid.sum())]   # [N]
    counts = torch.bincount(flat[order], minlength=E).tolist()                            # [E]
    xs = x.float()[order // K]                                           # [N, Hd] permuted copies
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):                                       # one GEMM pair per group
        if n == 0:
            continue
        h = xs[start:start + n] @ w13[e].float().T                       # [n, 2I]
        out[start:start + n] = (F.silu(h[:, :I]) * h[:, I:]) @ w2[e].float().T
        start += n
    scale = topk_weights.reshape(-1)[order].float()[:, None]             # [N, 1]
    y = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    y.index_add_(0, order // K, out * scale)                             # unpermute + combine
    return y.to(x.dtype)
