"""cpu_ref, the oracle, checked against independent naive formulations (not against itself).

Each check writes the op a second, different way: explicit loops, dense attention with a mask, the
non-absorbed MLA form, complex-number RoPE, per-token expert loops, and for rejection sampling the
exact output distribution it must preserve.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glm52_backends import ops as R
from glm52_backends.conformance.inputs import Batch, generator, page

D64 = torch.float64


def _batch_caches(g, batch: Batch, D: int, bs: int):
    rows = [torch.randn(L, D, generator=g, dtype=D64) for L in batch.seq_lens]
    cache, table = page(g, rows, bs)
    return rows, cache, table


def test_indexer_topk_is_the_exact_top_set_by_loops():
    g = generator("naive", "indexer")
    batch = Batch([(3, 20), (1, 9), (2, 2)])
    Hi, Di, topk = 3, 8, 6
    keys, cache, table = _batch_caches(g, batch, Di, 4)
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


def test_sparse_mla_equals_dense_masked_attention():
    g = generator("naive", "mla")
    batch = Batch([(3, 11), (1, 5), (2, 2)])
    H, Dl, Dr, topk = 3, 10, 4, 4
    rows, cache, table = _batch_caches(g, batch, Dl + Dr, 3)
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


def test_moe_experts_equals_per_token_loop():
    g = generator("naive", "moe")
    T, Hd, I, E, K = 6, 8, 5, 5, 2
    x = torch.randn(T, Hd, generator=g, dtype=D64)
    w13 = torch.randn(E, 2 * I, Hd, generator=g, dtype=D64)
    w2 = torch.randn(E, Hd, I, generator=g, dtype=D64)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[2, 1] = -1
    wts = torch.rand(T, K, generator=g, dtype=torch.float32)
    y = R.moe_experts(x, w13, w2, ids, wts, cdt=D64)
    for t in range(T):
        want = torch.zeros(Hd, dtype=D64)
        for j in range(K):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate, up = w13[e, :I] @ x[t], w13[e, I:] @ x[t]
            want += float(wts[t, j]) * (w2[e] @ (gate / (1 + torch.exp(-gate)) * up))
        torch.testing.assert_close(y[t], want, rtol=1e-12, atol=1e-12)


def test_moe_route_equals_per_token_rule():
    g = generator("naive", "route")
    T, E, K, ng, tg, rsf = 4, 16, 3, 4, 2, 2.5
    logits = torch.randn(T, E, generator=g, dtype=D64)
    bias = torch.rand(E, generator=g, dtype=D64) * 0.3
    ids, w = R.moe_route(logits, bias, K, ng, tg, True, rsf, cdt=D64)
    for t in range(T):
        s = [1 / (1 + math.exp(-float(v))) for v in logits[t]]
        c = [s[e] + float(bias[e]) for e in range(E)]
        grp = sorted(range(ng), key=lambda q: -sum(sorted(c[q * 4:(q + 1) * 4])[-2:]))[:tg]
        allowed = [e for e in range(E) if e // 4 in grp]
        chosen = sorted(allowed, key=lambda e: -c[e])[:K]
        total = sum(s[e] for e in chosen)
        want = {e: s[e] / total * rsf for e in chosen}
        got = dict(zip(ids[t].tolist(), w[t].tolist()))
        assert set(got) == set(want)
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-6)


def test_rope_equals_complex_rotation():
    g = generator("naive", "rope")
    T, H, Dr, theta = 5, 3, 8, 1e4
    x = torch.randn(T, H, Dr, generator=g, dtype=D64)
    pos = torch.tensor([0, 1, 7, 100, 31])
    y = R.rope(x, pos, theta, cdt=D64)
    freqs = theta ** (-torch.arange(0, Dr, 2, dtype=D64) / Dr)
    rot = torch.polar(torch.ones(T, Dr // 2, dtype=D64), pos[:, None].double() * freqs)   # e^{i pos w}
    want = torch.view_as_real(torch.view_as_complex(x.view(T, H, Dr // 2, 2)) * rot[:, None]).view(T, H, Dr)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)   # angles in float32, as HF computes them


def test_norms_equal_their_formulas():
    g = generator("naive", "norms")
    x = torch.randn(4, 12, generator=g, dtype=D64) * 3
    wt, b = torch.rand(12, generator=g, dtype=D64), torch.randn(12, generator=g, dtype=D64)
    rms = wt * x / torch.sqrt((x * x).sum(-1, keepdim=True) / 12 + 1e-5)
    torch.testing.assert_close(R.rms_norm(x, wt, 1e-5, cdt=D64), rms)
    mu = x.sum(-1, keepdim=True) / 12
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / 12
    torch.testing.assert_close(R.layer_norm(x, wt, b, 1e-6, cdt=D64), (x - mu) / torch.sqrt(var + 1e-6) * wt + b)
    w13, w2 = torch.randn(10, 12, generator=g, dtype=D64), torch.randn(12, 5, generator=g, dtype=D64)
    h = x @ w13.T
    torch.testing.assert_close(R.mlp(x, w13, w2, cdt=D64), (h[:, :5] * torch.sigmoid(h[:, :5]) * h[:, 5:]) @ w2.T)


def test_mtp_verify_greedy_by_hand():
    logits = torch.full((3, 4, 6), -1.0)
    best = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2], [3, 3, 3, 3]])
    logits.scatter_(2, best[..., None], 5.0)
    draft = torch.tensor([[1, 2, 3], [0, 0, 1], [3, 3, 2]])
    acc, tok = R.mtp_verify(draft, logits)
    assert acc.tolist() == [3, 0, 2]                                  # all (bonus), none, two
    assert tok.tolist() == [[1, 2, 3, 4], [5, -1, -1, -1], [3, 3, 3, -1]]


def test_mtp_verify_sampling_preserves_the_target_distribution():
    """Leviathan et al.: drafting from q and verifying against p emits tokens distributed as p.
    With k = 1 the first emitted token's law is exactly p; a chi-square test over 20000 draws
    (draft drawn from q with its own uniform) must not reject at significance 1e-3."""
    g = generator("naive", "mtp-law")
    V, N = 6, 20000
    target = torch.randn(V, generator=g, dtype=D64)
    p = torch.softmax(target / 0.8, 0)
    q = torch.softmax(torch.randn(V, generator=g, dtype=D64), 0)
    u_draft = torch.rand(N, generator=g, dtype=D64)
    draft = torch.searchsorted(q.cumsum(0), u_draft * q.sum()).clamp(max=V - 1)
    acc, tok = R.mtp_verify(draft[:, None], target.expand(N, 2, V), q.expand(N, 1, V), 0.8, 1.0,
                            torch.rand(N, 2, generator=g, dtype=D64), cdt=D64)
    first = tok[:, 0]
    counts = torch.bincount(first, minlength=V).double()
    chi2 = float(((counts - N * p) ** 2 / (N * p)).sum())
    # chi-square with V-1 = 5 degrees of freedom: P(X > 20.52) = 1e-3
    assert chi2 < 20.52, (chi2, counts.tolist(), (N * p).tolist())
    assert 0.2 < acc.double().mean() < 0.99                           # the draft is neither always right nor never
    # the test has power: the drafts themselves (law q, what accepting everything would emit) are rejected
    chi2_wrong = float(((torch.bincount(draft, minlength=V).double() - N * p) ** 2 / (N * p)).sum())
    assert chi2_wrong > 20.52


def test_sample_from_never_returns_a_token_without_mass():
    from glm52_backends.sampling import sample_from
    p = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    top = torch.tensor([1 - 1e-9, 1 - 1e-9], dtype=torch.float64)      # rounds to 1.0 in float32
    assert sample_from(p, top).tolist() == [1, 2]
    assert sample_from(p, torch.tensor([0.0, 0.0])).tolist() == [0, 1]
    assert sample_from(p, torch.tensor([0.29, 0.49])).tolist() == [0, 1]
    assert sample_from(p, torch.tensor([0.31, 0.51])).tolist() == [1, 2]


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
