"""sparse_mla's reference tests (the contract: glm52_backends/ops/sparse_mla.py): the reference checked against
an independent naive formulation (not against itself) (dense masked attention, the non-absorbed MLA form), and
no read of an unselected cache row."""

from __future__ import annotations

import math

import pytest
import torch

from glm52_backends import ops as R
from glm52_backends.conformance.inputs import Batch, generator

from paged_inputs import D64, batch_caches, paged_case

F64 = D64


def test_sparse_mla_equals_dense_masked_attention():
    g = generator("naive", "mla")
    batch = Batch([(3, 11), (1, 5), (2, 2)])
    H, Dl, Dr, topk = 3, 10, 4, 4
    rows, cache, table = batch_caches(g, batch, Dl + Dr, 3)
    q = torch.randn(batch.T, H, Dl + Dr, generator=g, dtype=D64)
    idx = torch.full((batch.T, topk), -1, dtype=torch.int32)
    for t, _, pos in batch.tokens():
        n = min(topk, pos + 1)
        idx[t, torch.randperm(topk, generator=g)[:n]] = torch.randperm(pos + 1, generator=g)[:n].int()
    idx[-1] = -1                                                      # a row with nothing to attend
    out, lse = R.sparse_mla(q, cache[..., :Dl], cache[..., Dl:], idx, table, batch.seq_lens_t, batch.cu_seqlens_q, 0.3,
                            return_lse=True, cdt=D64)
    for t, b, pos in batch.tokens():
        kv = rows[b]                                                  # [L, Dl+Dr]
        mask = torch.zeros(kv.shape[0], dtype=torch.bool)
        for s in idx[t].tolist():
            if s >= 0:
                mask[s] = True
        if not mask.any():
            assert out[t].abs().max() == 0 and torch.isneginf(lse[t]).all()
            continue
        for h in range(H):
            sc = torch.where(mask, (kv @ q[t, h]) * 0.3, torch.tensor(-math.inf, dtype=D64))
            p = torch.softmax(sc, 0)
            torch.testing.assert_close(out[t, h], p @ kv[:, :Dl], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(lse[t, h].double(), torch.logsumexp(sc, 0), rtol=1e-6, atol=1e-6)


def test_absorbed_mla_equals_the_naive_per_head_form():
    """What the model does with sparse_mla (absorb W_UK into q, W_UV after) equals attention with
    keys [W_UK c ; k_pe] and values W_UV c (spec §4.3)."""
    g = generator("naive", "absorb")
    H, dn, dr, dv, C, L = 2, 6, 4, 5, 8, 7
    c = torch.randn(L, C, generator=g, dtype=D64)
    k_pe = torch.randn(L, dr, generator=g, dtype=D64)
    w_uk = torch.randn(H, dn, C, generator=g, dtype=D64)
    w_uv = torch.randn(H, dv, C, generator=g, dtype=D64)
    q_nope = torch.randn(1, H, dn, generator=g, dtype=D64)
    q_pe = torch.randn(1, H, dr, generator=g, dtype=D64)
    scale = (dn + dr) ** -0.5
    sel = torch.tensor([[0, 3, 6, -1]], dtype=torch.int32)
    q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk)
    o_lat = R.sparse_mla(torch.cat([q_lat, q_pe], -1), c.view(1, L, C), k_pe.view(1, L, dr), sel,
                         torch.zeros(1, 1, dtype=torch.int32), torch.tensor([L], dtype=torch.int32),
                         torch.tensor([0, 1], dtype=torch.int32), scale, cdt=D64)
    got = torch.einsum("thc,hvc->thv", o_lat, w_uv)[0]
    keep = [0, 3, 6]
    for h in range(H):
        k = torch.cat([c[keep] @ w_uk[h].T, k_pe[keep]], -1)            # [3, dn+dr]
        v = c[keep] @ w_uv[h].T                                         # [3, dv]
        p = torch.softmax(k @ torch.cat([q_nope[0, h], q_pe[0, h]]) * scale, 0)
        torch.testing.assert_close(got[h], p @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_sparse_mla_never_reads_unselected_rows(poison):
    g = torch.Generator().manual_seed(4)
    lens, q_lens, bs, H, Dl, Dr, K = [37, 9, 64], [3, 1, 2], 8, 3, 16, 4, 6
    c, table = paged_case(g, lens, bs, Dl)
    kpe = torch.randn(c.shape[0], bs, Dr, generator=g, dtype=F64)
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32)
    T = 6
    idx = torch.full((T, K), -1, dtype=torch.int32)
    t = 0
    for b, (L, q) in enumerate(zip(lens, q_lens)):
        for i in range(q):
            pos = L - q + i
            n = min(K - 1, pos + 1)
            idx[t, torch.randperm(K, generator=g)[:n]] = torch.randperm(pos + 1, generator=g)[:n].int()
            t += 1
    q = torch.randn(T, H, Dl + Dr, generator=g, dtype=F64)
    want, want_lse = R.sparse_mla(q, c, kpe, idx, table, seq, cu, 0.3, return_lse=True, cdt=F64)
    # poison every row no token selected, in both caches
    sel = torch.zeros(c.shape[0] * bs, dtype=torch.bool)
    t = 0
    for b, q_len in enumerate(q_lens):
        for _ in range(q_len):
            for p in idx[t].tolist():
                if p >= 0:
                    sel[int(table[b, p // bs]) * bs + p % bs] = True
            t += 1
    c2, kpe2 = c.clone().view(-1, Dl), kpe.clone().view(-1, Dr)
    c2[~sel], kpe2[~sel] = poison, poison
    got, got_lse = R.sparse_mla(q, c2.view_as(c), kpe2.view_as(kpe), idx, table, seq, cu, 0.3, return_lse=True, cdt=F64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=0)
