"""indexer_topk: the lightning indexer's scores and the top-k positions each query token attends.

    indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk) -> idx
    q        [T, Hi, Di]   indexer queries, RoPE applied (interleaved, first Dr dims)
    w        [T, Hi] f32   head weights with Hi^-0.5 * Di^-0.5 folded in
    k_cache  [NB, BS, Di]  paged index keys (LayerNorm + RoPE applied), same dtype as q; or a
                           quantized index cache (glm52_backends/cache_formats.py): the codes,
                           float8_e4m3fn (fp8) or int8 (c8_li), a view whose blocks also hold the
                           scales. q is always the plain query: c8_li stores Hadamard-rotated keys,
                           and a reader undoes that on the keys (the reference) or rotates q the
                           same way (a kernel; cache_formats.hadamard), which scores the same.
    returns  [T, topk] int32 positions: score[t,s] = sum_h w[t,h] * relu(q[t,h] . k[s]) over
             s <= pos(t); the min(topk, pos+1) best positions first (any order, ties any way),
             -1 after. Cache rows outside 0..seq_len-1 are never read.
"""

from __future__ import annotations

import torch

from ..cache_formats import index_format_of
from ._checks import arg, tensor
from ._paged import gather_index, request_spans


CHUNK_ELEMENTS = 1 << 24   # query tokens per chunk: bounds the [chunk, Hi, L] scores (64 MB in float32)


def indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk, *, cdt=torch.float32):
    T, Hi = q.shape[:2]
    idx = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    for b, (t0, t1, L) in enumerate(request_spans(cu_seqlens_q, seq_lens)):
        if t1 == t0:
            continue
        k = gather_index(k_cache, block_table[b], L).to(cdt)                    # [L, Di], dequantized if packed
        step = max(1, CHUNK_ELEMENTS // max(Hi * L, 1))   # an 8K-token prefill: 64 queries at a time, not 8.6 GB
        for a in range(t0, t1, step):
            _select(idx, q, w, k, a, min(a + step, t1), L - (t1 - a), topk, cdt)
    return idx


def _select(idx, q, w, k, a, e, first, topk, cdt):
    """Rows a:e of idx: the top-k of query tokens a..e-1, whose positions start at `first`."""
    L = k.shape[0]
    qb, wb = q[a:e].to(cdt), w[a:e].to(cdt)                                 # [q, Hi, Di], [q, Hi]
    score = torch.einsum("th,ths->ts", wb, torch.relu(torch.einsum("thd,sd->ths", qb, k)))
    pos = torch.arange(first, first + (e - a), device=q.device)             # query positions
    causal = torch.arange(L, device=q.device)[None, :] <= pos[:, None]       # [q, L]
    score = score.masked_fill(~causal, float("-inf"))
    n = min(topk, L)
    # stable sort: exact ties (ReLU zeros are common) go to the earlier position, whatever
    # the row length, so decode, chunked prefill and verify steps select the same set
    top = score.sort(dim=-1, descending=True, stable=True).indices[:, :n]    # [q, n]
    n_valid = (pos + 1).clamp(max=topk)                                      # min(topk, pos+1)
    keep = torch.arange(n, device=q.device)[None, :] < n_valid[:, None]
    idx[a:e, :n] = torch.where(keep, top, -1).to(torch.int32)


def check_output(args, kwargs, out):
    """The output check (registry): idx [T, topk] int32 on q's device."""
    q, topk = arg(args, kwargs, 0, "q"), arg(args, kwargs, 6, "topk")
    return tensor("idx", out, (q.shape[0], topk), (torch.int32,), q.device)


def cache_format(args, kwargs) -> str:
    """The format of the index cache handed in (cache_formats.py: the code view's dtype names it). A
    backend that does not list it in `Capabilities.cache_formats` gets the reference (registry)."""
    return index_format_of(arg(args, kwargs, 2, "k_cache"))
