"""indexer_topk on Ascend: `npu_lightning_indexer` (doc page torch_npu-npu_lightning_indexer.md).

    TND query [T, Hi, 128], PA_BSND index-key cache viewed as [NB, BS, 1, 128] (a view of the
    caller's cache, no copy) with the step's block table, weights [T, Hi] in the query dtype (as
    vllm-ascend and Huawei's GLM-5.2 recipe pass them: float32 weights are refused on the 7.3.0 line
    and on the 950), actual_seq_lengths_query = the TND prefix sums, actual_seq_lengths_key =
    seq_lens, sparse_mode=3 (right-down causal), sparse_count=topk.

The op leaves the index slots past min(topk, pos+1) unspecified; the contract wants -1 there, so
they are masked with the step's token positions (`slot j is valid iff j <= pos`). The result is
valid-first with at least one valid entry per row, and marked so (common.mark_valid_first):
sparse_mla then hands it to npu_sparse_flash_attention without reordering, on this layer and on
the IndexShare layers that reuse it. The op's int32 lengths, block table and the token positions
come from the call's own tensors on the device (common.step_for): nothing here reads a device value
back, on every call.

Declined (-> reference): a CANN older than 8.5.0 (no such op), index heads the installed line
does not take (exactly 64 on the 7.3.0 line / CANN 8.5.0, at most 64 from CANN 9.0.0: GLM-5.2's
32 heads need CANN >= 9.0.0), index head dim != 128, topk outside [1, 2048] (and, from CANN
9.0.0, 3072..8192 step 1024), float32 queries on the device, a key cache of another dtype, block
sizes that are not a multiple of 16 up to 1024, a non-contiguous cache (the op reads it in place).

Glue memory per call, outside the op: the weights cast [T, Hi], the masked result [T, topk]
int32 (+ its [T, topk] bool mask) and the token positions (a few [T] and [B+1] int64 vectors);
nothing proportional to the cache.

A C8 index-key cache (`c8_li`: per block BS x 128 int8 codes of the Hadamard-rotated keys, then BS
float16 scales) goes to `npu_quant_lightning_indexer` (store 8, compute 8), as vllm-ascend's LI C8
path calls it: the query is rotated the same way (q @ H, H the orthonormal Sylvester Hadamard
matrix, so (H q) . (H k) = q . k), quantized per token and head by `npu_dynamic_quant` (int8 codes,
scale rowmax/127, cast to the op's float16 `query_dequant_scale`); key = the codes view
[NB, BS, 1, 128] and key_dequant_scale = the float16 view [NB, BS, 1] of the scale bytes behind each
block's codes (both in place, strided: block stride BS * 130 bytes); weights cast to float16;
query_quant_mode = key_quant_mode = 0 (per-token-head); TND / PA_BSND / sparse_mode=3 as above.
What it adds to the float path's error: the query's int8 rounding (half a code step of each head's
rowmax/127 per element) and its float16 scale. The op reads W * scale_q in float16: weights past
float16's range (|w| > 65504) would overflow there; GLM-5.2's are O(1).
Declined (-> reference) besides the limits above: a line before 26.1.0 (CANN 9.1.0), whose page
takes only contiguous keys and exactly 64 heads (the packed cache is strided: a copy per call would
cost the whole cache), topk outside [1, 2048], float32 queries on the device.
Glue memory: the rotated query (T x Hi x 128 in float32, then the query dtype), its int8 codes and
scales, the float16 weights; nothing proportional to the cache.
"""

from __future__ import annotations

import torch

from glm52_backends.cache_formats import hadamard, index_format_of, index_parts

from .common import LI_HEAD_DIM, decline, mark_valid_first, paged_block_size, step_for, version_decline

_HADAMARD: dict = {}     # (Di, device) -> the float32 Sylvester Hadamard matrix / sqrt(Di), built once


def _hadamard_matrix(Di: int, device: torch.device) -> torch.Tensor:
    key = (Di, str(device))
    if key not in _HADAMARD:
        _HADAMARD[key] = hadamard(torch.eye(Di, dtype=torch.float32, device=device))
    return _HADAMARD[key]


def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
    """A method of `AscendBackend` (`self.npu`: torch_npu or the emulator)."""
    if index_format_of(k_cache) == "c8_li":
        return _indexer_topk_c8(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk)
    T, Hi, Di = q.shape
    lim = version_decline(self, "npu_lightning_indexer")
    decline(Hi in lim.li_heads,
            f"npu_lightning_indexer on the installed {self.installed.describe()} takes "
            f"{'exactly 64' if len(lim.li_heads) == 1 else 'at most 64'} index heads, got {Hi}"
            + ("; CANN >= 9.0.0 (torch_npu 26.0.0 line) takes 1..64" if len(lim.li_heads) == 1 else ""))
    decline(Di == LI_HEAD_DIM, f"npu_lightning_indexer needs index head dim {LI_HEAD_DIM}, got {Di}")
    decline(topk in lim.li_sparse_counts,
            f"npu_lightning_indexer sparse_count must be in [1, 2048]"
            f"{'' if lim.max_topk == 2048 else ' or 3072..8192 in steps of 1024'} on the installed "
            f"{self.installed.describe()}, got {topk}")
    decline(q.dtype in self.half_op_dtypes, f"npu_lightning_indexer takes bfloat16/float16 queries, got {q.dtype}")
    decline(k_cache.dtype == q.dtype, f"index-key cache dtype {k_cache.dtype} != query dtype {q.dtype}")
    decline(w.is_floating_point(), f"indexer weights must be floating point, got {w.dtype}")
    paged_block_size(k_cache.shape[1], "npu_lightning_indexer")
    decline(k_cache.is_contiguous(), "npu_lightning_indexer reads the index-key cache in place: it must be "
                                     "contiguous (a copy per call would cost the whole cache)")
    if T == 0:
        return mark_valid_first(torch.full((0, topk), -1, dtype=torch.int32, device=q.device))
    st = step_for("indexer_topk", T, block_table, seq_lens, cu_seqlens_q, positions=True)
    idx, _ = self.npu.npu_lightning_indexer(
        q.contiguous(),                                    # TND  [T, N1, 128]
        k_cache.unsqueeze(2),                              # PA_BSND [NB, BS, N2=1, 128], a view
        w.to(q.dtype).contiguous(),                        # [T, N1] in the query dtype
        actual_seq_lengths_query=st.act_q, actual_seq_lengths_key=st.act_kv, block_table=st.block_table,
        layout_query="TND", layout_key="PA_BSND", sparse_count=topk, sparse_mode=3)
    return _masked(idx, st, topk)


def _masked(idx: torch.Tensor, st, topk: int) -> torch.Tensor:
    """The op's [T, 1, topk] result with the slots past min(topk, pos+1) set to -1, marked valid-first."""
    keep = torch.arange(topk, device=idx.device)[None, :] <= st.positions[:, None]   # j < min(topk, pos+1)
    return mark_valid_first(torch.where(keep, idx[:, 0, :], -1).to(torch.int32))


def _indexer_topk_c8(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
    """indexer_topk on a c8_li cache: npu_quant_lightning_indexer (module docstring)."""
    op = "npu_quant_lightning_indexer"
    T, Hi, Di = q.shape
    lim = version_decline(self, op)
    decline(lim.qli_strided_key,
            f"{op} on the installed {self.installed.describe()} reads only a contiguous key; the c8_li cache keeps "
            f"each block's scales behind its codes (a strided view, read in place from the 26.1.0 line, CANN 9.1.0)")
    decline(Hi in lim.qli_heads, f"{op} takes 1..64 index heads, got {Hi}")
    decline(Di == LI_HEAD_DIM, f"{op} needs index head dim {LI_HEAD_DIM}, got {Di}")
    decline(1 <= topk <= 2048, f"{op} sparse_count must be in [1, 2048], got {topk}")
    decline(q.dtype in self.half_op_dtypes, f"{op}'s query quantization (npu_dynamic_quant) takes bfloat16/float16 "
                                            f"queries, got {q.dtype}")
    decline(w.is_floating_point(), f"indexer weights must be floating point, got {w.dtype}")
    paged_block_size(k_cache.shape[1], op)
    _, _, scale_bytes = index_parts(k_cache)          # [NB, BS, 2] uint8, behind each block's codes
    if T == 0:
        return mark_valid_first(torch.full((0, topk), -1, dtype=torch.int32, device=q.device))
    st = step_for("indexer_topk", T, block_table, seq_lens, cu_seqlens_q, positions=True)
    rotated = (q.float() @ _hadamard_matrix(Di, q.device)).to(q.dtype)                 # H q, as the keys were
    codes, q_scale = self.npu.npu_dynamic_quant(rotated.reshape(T * Hi, Di), dst_type=torch.int8)
    idx = self.npu.npu_quant_lightning_indexer(
        query=codes.view(T, Hi, Di),                       # TND [T, N1, 128] int8
        key=k_cache.unsqueeze(2),                          # PA_BSND [NB, BS, N2=1, 128] int8, a strided view
        weights=w.to(torch.float16).contiguous(),          # [T, N1]
        query_dequant_scale=q_scale.view(T, Hi).to(torch.float16),
        key_dequant_scale=scale_bytes.view(torch.float16),   # [NB, BS, N2=1], a strided view
        query_quant_mode=0, key_quant_mode=0,
        actual_seq_lengths_query=st.act_q, actual_seq_lengths_key=st.act_kv, block_table=st.block_table,
        layout_query="TND", layout_key="PA_BSND", sparse_count=topk, sparse_mode=3)
    return _masked(idx, st, topk)
