"""indexer_topk on Ascend: `npu_lightning_indexer` (doc page torch_npu-npu_lightning_indexer.md).

    TND query [T, Hi, 128], PA_BSND index-key cache viewed as [NB, BS, 1, 128] (a view, no copy)
    with the step's block table, actual_seq_lengths_query = the TND prefix sums, actual_seq_lengths_key
    = seq_lens, sparse_mode=3 (right-down causal), sparse_count=topk.

The op leaves the index slots past min(topk, pos+1) unspecified; the contract wants -1 there, so
they are masked with the step's token positions (`slot j is valid iff j <= pos`). With a `StepMeta`
nothing here reads a device value back to the host.

Declined (-> reference): index head dim != 128, more than 64 index heads, topk outside [1, 2048]
and 3072..8192 step 1024, float32 queries on the device, key/weight dtypes the op rejects, block
sizes that are not a multiple of 16 up to 1024, a non-contiguous cache (the op reads it in place).
"""

from __future__ import annotations

import torch

from .common import LI_HEAD_DIM, LI_MAX_HEADS, LI_SPARSE_COUNTS, decline, paged_block_size, step_for


def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk, *, meta=None):
    """A method of `AscendBackend` (`self.npu`: torch_npu or the emulator)."""
    T, Hi, Di = q.shape
    decline(Di == LI_HEAD_DIM, f"npu_lightning_indexer needs index head dim {LI_HEAD_DIM}, got {Di}")
    decline(Hi <= LI_MAX_HEADS, f"npu_lightning_indexer takes at most {LI_MAX_HEADS} index heads, got {Hi}")
    decline(topk in LI_SPARSE_COUNTS, f"npu_lightning_indexer sparse_count must be in [1, 2048] or "
                                      f"3072..8192 in steps of 1024, got {topk}")
    decline(q.dtype in self.attention_dtypes, f"npu_lightning_indexer takes bfloat16/float16 queries, got {q.dtype}")
    decline(k_cache.dtype == q.dtype, f"index-key cache dtype {k_cache.dtype} != query dtype {q.dtype}")
    decline(w.dtype in (torch.float32, q.dtype), f"weights must be float32 or the query dtype, got {w.dtype}")
    paged_block_size(k_cache.shape[1], "npu_lightning_indexer")
    decline(k_cache.is_contiguous(), "npu_lightning_indexer reads the index-key cache in place: it must be "
                                     "contiguous (a copy per call would cost the whole cache)")
    if T == 0:
        return torch.full((0, topk), -1, dtype=torch.int32, device=q.device)
    st = step_for(self, "indexer_topk", meta, T, block_table, seq_lens, cu_seqlens_q, k_cache.shape[1])
    idx, _ = self.npu.npu_lightning_indexer(
        q.contiguous(),                                    # TND  [T, N1, 128]
        k_cache.unsqueeze(2),                              # PA_BSND [NB, BS, N2=1, 128], a view
        w.contiguous(),                                    # [T, N1]
        actual_seq_lengths_query=st.act_q, actual_seq_lengths_key=st.act_kv, block_table=st.block_table,
        layout_query="TND", layout_key="PA_BSND", sparse_count=topk, sparse_mode=3)
    idx = idx[:, 0, :]                                                             # [T, topk]
    keep = torch.arange(topk, device=idx.device)[None, :] <= st.positions[:, None]   # j < min(topk, pos+1)
    return torch.where(keep, idx, -1).to(torch.int32)
