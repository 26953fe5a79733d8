"""moe_experts: the routed experts of a MoE layer, weighted and summed per token.

    moe_experts(x, w13, w2, topk_ids, topk_weights) -> y
    x [T, Hd]; w13 [E, 2I, Hd] (gate rows then up rows); w2 [E, Hd, I]: tensors or `Weight`s
    (glm52_backends/weights.py: data + scales + format; a backend declares the formats it runs);
    topk_ids [T, K] int (-1 = slot unused); topk_weights [T, K] f32
    y [T, Hd] (x.dtype) = sum_k w[t,k] * W2[e] (silu(W1[e] x) * W3[e] x),  e = topk_ids[t,k]
    Quantized experts compute as `linear` does (glm52_backends/quant.py): the input of each GEMM is
    quantized per token by the format's recipe (the SwiGLU output, rounded to x.dtype, is the
    second GEMM's input), operands dequantized, float64 accumulation; the weighted sum is float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm52_backends.quant import matmul_reference
from glm52_backends.weights import Weight, select

from ._checks import same_as_input


def moe_experts(x, w13, w2, topk_ids, topk_weights, *, cdt=torch.float32):
    quant = isinstance(w13, Weight) and w13.quantized
    if not quant:
        w13 = w13.data if isinstance(w13, Weight) else w13
    if isinstance(w2, Weight) and not w2.quantized:
        w2 = w2.data
    I = w2.shape[-1]
    acc = torch.float64 if quant else cdt
    xc = x.to(cdt)
    y = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
    for e in topk_ids.unique().tolist():
        if e < 0:
            continue
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if quant:
            h = matmul_reference(x[tok], select(w13, e)).to(x.dtype).to(cdt)               # [n, 2I]
            a = (F.silu(h[:, :I]) * h[:, I:]).to(x.dtype)
            out = matmul_reference(a, select(w2, e) if isinstance(w2, Weight) else Weight(w2[e]))
        else:
            h = xc[tok] @ w13[e].to(cdt).T                                              # [n, 2I]
            h = F.silu(h[:, :I]) * h[:, I:]
            out = h @ w2[e].to(cdt).T
        y.index_add_(0, tok, out * topk_weights[tok, slot, None].to(acc))
    return y.to(x.dtype)


# the output check (registry): x's shape, dtype and device
check_output = same_as_input

# the `Weight` arguments: a format the backend does not list in `Capabilities.weight_formats` runs on
# the reference (registry)
WEIGHT_ARGS = ((1, "w13"), (2, "w2"))
