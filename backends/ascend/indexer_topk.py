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
"""

from __future__ import annotations

import torch

from .common import LI_HEAD_DIM, decline, mark_valid_first, paged_block_size, step_for, version_decline


def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
    """A method of `AscendBackend` (`self.npu`: torch_npu or the emulator)."""
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
    keep = torch.arange(topk, device=idx.device)[None, :] <= st.positions[:, None]   # j < min(topk, pos+1)
    return mark_valid_first(torch.where(keep, idx[:, 0, :], -1).to(torch.int32))
