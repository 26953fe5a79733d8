"""sparse_mla on Ascend: `npu_sparse_flash_attention` (doc page torch_npu-npu_sparse_flash_attention.md).

    attention_mode=2 (MLA-absorb): query = q_lat [T, H, 512], query_rope = q_pe [T, H, 64] (TND);
    key = value = the latent cache c_cache viewed as PA_BSND [NB, BS, 1, 512], key_rope = kpe_cache
    viewed as [NB, BS, 1, 64]: the caller's cache tensors themselves (views, no copy), addressed by
    the step's real block table; actual_seq_lengths_query = TND prefix sums, actual_seq_lengths_kv =
    seq_lens; sparse_mode=3, sparse_block_size=1 (one index = one position).
This is the call vllm-ascend's SFA path (sfa_v1.py) and Huawei's GLM-5.2 recipe make with their
split `kv_cache[0]` / `kv_cache[1]` caches.

A C8 latent cache (`c8_sfa`: each row int8 k_nope | bf16 k_rope | f32 scale per 128 of k_nope, 656
bytes) goes to `npu_kv_quant_sparse_flash_attention` (doc page of that name, torch_npu 2.9.0 on):
query = q itself (q_nope || q_rope, bfloat16 only), key = value = the packed rows viewed int8
[NB, BS, 1, 656] in place (the doc's "int8 k_nope, query-dtype k_rope and float32 quant params
concatenated along D"), key/value_quant_mode=2 (per_tile), quant_scale_repo_mode=1 (combine),
tile_size=128, rope_head_dim=64; the rest as above. Passed by keyword: releases order the
positional arguments differently.

Indices: the op wants each row's valid entries first and the -1 ones after; the contract allows -1
anywhere (positions are distinct by contract). An index tensor this backend's indexer_topk returned
is valid-first with a valid entry in every row by construction and marked so: it goes to the op as
it is, with no reorder and no empty-row fix-up, on its own layer and on every IndexShare layer that
reuses the same tensor. Any other index tensor (a caller's, a slice, the reference indexer's) gets
its -1 entries moved behind the positions with one stable sort of the rows' validity flags on the
device, and a row without any valid index gives 0 (the op leaves it unspecified).

lse: `return_lse=False` (the default, and all the model asks for) returns `out` only and computes
no lse. `return_lse=True` is DECLINED with OpUnsupported, so the registry's reference computes out
and lse: the op returns softmax_max/softmax_sum only with return_softmax_lse=True, which the docs
allow in training and never with PA_BSND, and computing lse here would need the [T, topk, 576]
gather of the selected rows that this path exists to avoid. The backend declares it
(`Capabilities.sparse_mla_lse = False`), so decode context parallelism never asks: it brings the selected
rows to every rank and calls this op without lse (model._sparse_mla_dcp_gather).

Declined as well (-> reference): a CANN older than 8.5.0 (no such op), latent != 512 or rope != 64,
heads outside 1, 2, 4, ..., 128, float32 on the device, dense cache dtypes other than q's, an fp8 latent
cache (no fp8 on A2/A3), a C8 cache with a non-bfloat16 query, block sizes
not a multiple of 16 up to 1024, non-contiguous caches (the op reads them in place; a copy per call
would cost the whole cache).

Glue memory per call, outside the op (README "Memory outside the fused ops"): the query split into
the op's two contiguous inputs (T*H*576 elements, the size of q) and, for an unmarked index tensor,
the reordered indices (T*topk: int8 flags, int64 order, int32 result) and a [T] mask; the caches
are handed over as views (no byte proportional to the cache), the output is fixed in place.
"""

from __future__ import annotations

import torch

from glm52_backends.cache_formats import latent_format_of, packed_latent

from .common import (SFA_HEADS, SFA_LATENT, SFA_ROPE, decline, is_marked_valid_first, paged_block_size, step_for,
                     version_decline)


def valid_first(idx: torch.Tensor) -> torch.Tensor:
    """[T, K] positions (-1 = none, anywhere) -> [T, K] int32 with each row's positions first, in
    their order, then -1: the order npu_sparse_flash_attention requires. On the device, no host read."""
    order = (idx < 0).to(torch.int8).argsort(dim=-1, stable=True)
    return idx.gather(-1, order).to(torch.int32)


def sparse_mla(self, q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False):
    """A method of `AscendBackend` (`self.npu`: torch_npu or the emulator)."""
    T, H, D = q.shape
    NB, BS, Dl = c_cache.shape
    Dr = kpe_cache.shape[-1]
    if tuple(kpe_cache.shape[:2]) != (NB, BS):
        raise ValueError(f"sparse_mla: c_cache {list(c_cache.shape)} and kpe_cache {list(kpe_cache.shape)} must "
                         f"share [num_blocks, block_size]")
    if D != Dl + Dr:
        raise ValueError(f"sparse_mla: q's last dim {D} != latent {Dl} + rope {Dr} of the caches")
    if idx.dim() != 2 or idx.shape[0] != T:
        raise ValueError(f"sparse_mla: idx must be [T={T}, topk], got {list(idx.shape)}")
    decline(not return_lse, "return_lse=True: npu_sparse_flash_attention returns softmax statistics only in "
                            "training and never with PA_BSND; the reference computes out and lse")
    version_decline(self, "npu_sparse_flash_attention")
    decline(Dl == SFA_LATENT and Dr == SFA_ROPE,
            f"npu_sparse_flash_attention (attention_mode=2) needs latent {SFA_LATENT} + rope {SFA_ROPE}, "
            f"got {Dl} + {Dr}")
    decline(H in SFA_HEADS, f"npu_sparse_flash_attention takes {SFA_HEADS} query heads, got {H}")
    fmt = latent_format_of(c_cache, kpe_cache)
    decline(fmt in ("dense", "c8_sfa"), f"a {fmt} latent cache: A2/A3 have no fp8 attention (dense or c8_sfa only)")
    if fmt == "c8_sfa":
        decline(q.dtype == torch.bfloat16, f"npu_kv_quant_sparse_flash_attention takes a bfloat16 query, got {q.dtype}")
    else:
        decline(q.dtype in self.half_op_dtypes, f"npu_sparse_flash_attention takes bfloat16/float16, got {q.dtype}")
        decline(c_cache.dtype == q.dtype and kpe_cache.dtype == q.dtype,
                f"cache dtypes (c {c_cache.dtype}, k_pe {kpe_cache.dtype}) must equal the query dtype {q.dtype}")
        decline(c_cache.is_contiguous() and kpe_cache.is_contiguous(),
                "npu_sparse_flash_attention reads the caches in place: c_cache and kpe_cache must be contiguous")
    decline(idx.shape[1] > 0, "npu_sparse_flash_attention needs at least one index per row")
    paged_block_size(BS, "npu_sparse_flash_attention")
    if fmt == "c8_sfa":
        _, rows = packed_latent(c_cache, kpe_cache)                     # [NB, BS, 656] uint8, the rows in place
        decline(rows.is_contiguous(), "npu_kv_quant_sparse_flash_attention reads the C8 rows in place: they must "
                                      "be contiguous (build caches with PagedCache)")
    if T == 0:
        return torch.zeros(0, H, Dl, dtype=q.dtype, device=q.device)
    st = step_for("sparse_mla", T, block_table, seq_lens, cu_seqlens_q)   # no positions: the op needs none
    ours = is_marked_valid_first(idx) and idx.dtype == torch.int32 and idx.is_contiguous()
    sel = idx if ours else valid_first(idx)                             # [T, topk] int32, valid first
    if fmt == "c8_sfa":
        # C8: the packed rows are the op's key rows as they are (int8 k_nope | bf16 k_rope | f32 per-128 scales)
        key = rows.view(torch.int8).unsqueeze(2)                        # [NB, BS, 1, 656], a view
        out = self.npu.npu_kv_quant_sparse_flash_attention(
            query=q.contiguous(), key=key, value=key, sparse_indices=sel.unsqueeze(1), scale_value=scale,
            sparse_block_size=1, key_quant_mode=2, value_quant_mode=2,                  # per_tile
            block_table=st.block_table, actual_seq_lengths_query=st.act_q, actual_seq_lengths_kv=st.act_kv,
            layout_query="TND", layout_kv="PA_BSND", sparse_mode=3, attention_mode=2,
            quant_scale_repo_mode=1, tile_size=128, rope_head_dim=Dr)                  # combine: scales in the rows
        if not ours:
            out.masked_fill_((sel[:, 0] < 0)[:, None, None], 0)
        return out
    latent = c_cache.unsqueeze(2)                                       # [NB, BS, 1, 512], a view
    out, _, _ = self.npu.npu_sparse_flash_attention(
        q[..., :Dl].contiguous(), latent, latent,          # key and value are the latent (mode 2)
        sel.unsqueeze(1), scale,                           # [T, KV_N=1, topk]
        block_table=st.block_table, actual_seq_lengths_query=st.act_q, actual_seq_lengths_kv=st.act_kv,
        query_rope=q[..., Dl:].contiguous(), key_rope=kpe_cache.unsqueeze(2),
        sparse_block_size=1, layout_query="TND", layout_kv="PA_BSND", sparse_mode=3, attention_mode=2,
        return_softmax_lse=False)
    if not ours:   # a row with no valid index: the contract says 0 (the op's value there is unspecified)
        out.masked_fill_((sel[:, 0] < 0)[:, None, None], 0)
    return out
