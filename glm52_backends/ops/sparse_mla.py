"""sparse_mla: absorbed MLA attention over the positions the indexer selected.

    sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *,
               return_lse=False) -> out   (or (out, lse) when return_lse)
    q          [T, H, Dl+Dr]  absorbed query: q_lat (W_UK^T q_nope) || q_pe (RoPE applied)
    c_cache    [NB, BS, Dl]   paged latent cache, c after kv_a_layernorm (the values, too)
    kpe_cache  [NB, BS, Dr]   paged rope keys, k_pe after RoPE; same dtype as q and c_cache
               A quantized latent cache (glm52_backends/cache_formats.py) arrives as the same two
               arguments: c_cache the codes, float8_e4m3fn (fp8_ds_mla) or int8 (c8_sfa), a view
               into packed rows that also hold the scales; kpe_cache the bfloat16 view of those
               rows' rope bytes. The dtype names the format (`cache_formats.latent_format_of`);
               the reference dequantizes the rows it reads and runs the float op on them.
    idx        [T, topk] int32 distinct positions to attend, -1 = none (anywhere in the row); a
               position > pos(t) or listed twice is a contract violation of the caller (the
               indexer's output never has either), so kernels need not sort or deduplicate
    scale      softmax scale on q . [c || k_pe]
    returns    out [T, H, Dl] (q.dtype) = sum_s softmax_s(scale * q.[c||k_pe][s]) * c[s];
               lse [T, H] f32, the natural log-sum-exp of the scaled scores, only when asked.
               A row with no valid index gives out = 0, lse = -inf. Only the selected rows are
               read: NaN or inf (or any byte pattern) in any other cache row never reaches the output.
"""

from __future__ import annotations

import torch

from ..cache_formats import latent_format_of
from ._checks import arg, pair, tensor
from ._paged import gather_latent, masked_softmax, request_spans

CHUNK = 64  # query tokens per gather: bounds the [chunk, topk, Dl] working set


def sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False,
               cdt=torch.float32):
    T, H, _ = q.shape
    if idx.dim() != 2 or idx.shape[0] != T:          # shapes only: no host read
        raise ValueError(f"sparse_mla: idx must be [T={T}, topk] (one row per query token), got {tuple(idx.shape)}")
    Dl = c_cache.shape[-1]
    out = torch.zeros(T, H, Dl, dtype=cdt, device=q.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    for b, (t0, t1, _) in enumerate(request_spans(cu_seqlens_q, seq_lens)):
        for a in range(t0, t1, CHUNK):
            e = min(a + CHUNK, t1)
            sel = idx[a:e].long()                                                    # [q, K]
            keep = sel >= 0
            pos = sel.clamp(min=0)
            c, kpe = gather_latent(c_cache, kpe_cache, block_table[b], pos)         # dequantized if packed
            c, kpe = c.to(cdt), kpe.to(cdt)                                          # [q, K, Dl], [q, K, Dr]
            c = torch.where(keep[..., None], c, 0.0)            # rows of -1 entries: never used
            kpe = torch.where(keep[..., None], kpe, 0.0)
            qa = q[a:e].to(cdt)
            score = (torch.einsum("thd,tkd->thk", qa[..., :Dl], c)
                     + torch.einsum("thd,tkd->thk", qa[..., Dl:], kpe)) * scale       # [q, H, K]
            p, m = masked_softmax(score, keep)                                       # [q, H, K], [q, H]
            out[a:e] = torch.einsum("thk,tkc->thc", p, c)
            lse[a:e] = m.float()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def check_output(args, kwargs, out):
    """The output check (registry): out [T, H, Dl] in q's dtype, and lse [T, H] float32 when asked."""
    q, c = arg(args, kwargs, 0, "q"), arg(args, kwargs, 1, "c_cache")
    want = (q.shape[0], q.shape[1], c.shape[-1])
    if not kwargs.get("return_lse", False):
        if isinstance(out, (tuple, list)):
            return "returned a tuple, expected `out` alone (return_lse=False)"
        return tensor("out", out, want, (q.dtype,), q.device)
    return (pair(out, "out, lse") or tensor("out", out[0], want, (q.dtype,), q.device)
            or tensor("lse", out[1], want[:2], (torch.float32,), q.device))


def cache_format(args, kwargs) -> str:
    """The format of the latent cache handed in (cache_formats.py: the code view's dtype names it). A
    backend that does not list it in `Capabilities.cache_formats` gets the reference (registry)."""
    return latent_format_of(arg(args, kwargs, 1, "c_cache"))


# outputs that may hold -inf (the finiteness check in debug mode): lse, for a row with nothing to attend
NEG_INF_OUTPUTS = {1: "lse"}
