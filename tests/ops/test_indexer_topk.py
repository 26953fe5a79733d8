"""indexer_topk's reference tests (the contract: glm52_backends/ops/indexer_topk.py): the reference checked
against an independent naive formulation (not against itself), its cache reads confined to the context, and
its bounded chunks."""

from __future__ import annotations

import pytest
import torch

from glm52_backends import ops as R
from glm52_backends.conformance.inputs import Batch, generator

from paged_inputs import D64, batch_caches, paged_case

F64 = D64


def test_indexer_topk_is_the_exact_top_set_by_loops():
    g = generator("naive", "indexer")
    batch = Batch([(3, 20), (1, 9), (2, 2)])
    Hi, Di, topk = 3, 8, 6
    keys, cache, table = batch_caches(g, batch, Di, 4)
    q = torch.randn(batch.T, Hi, Di, generator=g, dtype=D64)
    w = torch.randn(batch.T, Hi, generator=g, dtype=D64)
    idx = R.indexer_topk(q, w, cache, table, batch.seq_lens_t, batch.cu_seqlens_q, topk, cdt=D64)
    for t, b, pos in batch.tokens():
        score = {}
        for s in range(pos + 1):
            score[s] = sum(float(w[t, h]) * max(0.0, float(q[t, h] @ keys[b][s])) for h in range(Hi))
        n = min(topk, pos + 1)
        want = set(sorted(score, key=lambda s: -score[s])[:n])        # continuous scores: no ties
        got = idx[t].tolist()
        assert set(got[:n]) == want and got[n:] == [-1] * (topk - n), (t, got, want)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_indexer_topk_never_reads_outside_the_context(poison):
    g = torch.Generator().manual_seed(5)
    lens, q_lens, bs, Hi, Di, K = [30, 5, 70], [2, 1, 3], 8, 4, 12, 7
    kc, table = paged_case(g, lens, bs, Di)
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(6, Hi, Di, generator=g, dtype=F64)
    w = torch.randn(6, Hi, generator=g, dtype=F64)
    want = R.indexer_topk(q, w, kc, table, seq, cu, K, cdt=F64)
    inside = torch.zeros(kc.shape[0] * bs, dtype=torch.bool)
    for b, L in enumerate(lens):
        for p in range(L):
            inside[int(table[b, p // bs]) * bs + p % bs] = True
    k2 = kc.clone().view(-1, Di)
    k2[~inside] = poison
    assert torch.equal(R.indexer_topk(q, w, k2.view_as(kc), table, seq, cu, K, cdt=F64), want)


def test_reference_indexer_scores_a_long_prefill_in_bounded_chunks(monkeypatch):
    """The reference indexer (every backend's fallback) scores query tokens in chunks of at most
    CHUNK_ELEMENTS / (Hi x L), so an 8K-token prefill with 32 heads holds ~64 MB of scores, not 8.6 GB;
    chunk boundaries change nothing (ties included: the same stable rule per row)."""
    import importlib
    ref = importlib.import_module("glm52_backends.ops.indexer_topk")    # the module (the package exports the function)
    g = torch.Generator().manual_seed(3)
    q_lens, lens, Hi, Di, bs, topk = [37, 1, 20], [50, 9, 20], 4, 8, 8, 12
    cu = torch.tensor([0, 37, 38, 58], dtype=torch.int32)
    nb = sum(-(-L // bs) for L in lens)
    table = torch.arange(nb, dtype=torch.int32)
    bt = torch.stack([torch.nn.functional.pad(table[i:i + 7], (0, 7 - len(table[i:i + 7])))
                      for i in (0, 7, 9)])
    q = torch.relu(torch.randn(58, Hi, Di, generator=g)) * (torch.rand(58, Hi, 1, generator=g) > 0.5)
    w, kc = torch.randn(58, Hi, generator=g), torch.randn(nb, bs, Di, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32)
    whole = ref.indexer_topk(q, w, kc, bt, sl, cu, topk)
    assert ref.CHUNK_ELEMENTS // (32 * 8192) == 64      # the 8K prefill: 64 query tokens per chunk
    seen = []
    real = ref._select
    monkeypatch.setattr(ref, "_select", lambda idx, q, w, k, a, e, *r: (seen.append(e - a), real(idx, q, w, k, a, e, *r)))
    for elements in (1, Hi * 50 * 7, 1 << 30):
        seen.clear()
        monkeypatch.setattr(ref, "CHUNK_ELEMENTS", elements)
        assert torch.equal(ref.indexer_topk(q, w, kc, bt, sl, cu, topk), whole), elements
        assert max(seen) <= max(1, elements // (Hi * 20)) and sum(seen) == 58
