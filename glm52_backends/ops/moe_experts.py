"""moe_experts: the routed experts of a MoE layer, weighted and summed per token.

    moe_experts(x, w13, w2, topk_ids, topk_weights) -> y
    x [T, Hd]; w13 [E, 2I, Hd] (gate rows then up rows); w2 [E, Hd, I]: tensors or `Weight`s
    (glm52_backends/weights.py: data + scales + format; a backend declares the formats it runs);
    topk_ids [T, K] int (-1 = slot unused); topk_weights [T, K] f32
    y [T, Hd] (x.dtype) = sum_k w[t,k] * W2[e] (silu(W1[e] x) * W3[e] x),  e = topk_ids[t,k]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm52_backends.weights import as_dense


def moe_experts(x, w13, w2, topk_ids, topk_weights, *, cdt=torch.float32):
    w13, w2 = as_dense(w13), as_dense(w2)
    I = w2.shape[-1]
    xc = x.to(cdt)
    y = torch.zeros(x.shape[0], x.shape[1], dtype=cdt, device=x.device)
    for e in topk_ids.unique().tolist():
        if e < 0:
            continue
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = xc[tok] @ w13[e].to(cdt).T                                          # [n, 2I]
        h = F.silu(h[:, :I]) * h[:, I:]
        y.index_add_(0, tok, (h @ w2[e].to(cdt).T) * topk_weights[tok, slot, None].to(cdt))
    return y.to(x.dtype)
