"""The CPU emulator of the torch_npu ops, against the examples and constraints of their documentation
(torch_npu/_op_plugin_docs.py and the op-plugin API pages) and against independent float64
formulations written here. Output shapes follow the wheel's meta registrations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glm52_backends.backends.ascend.emulator import NpuEmulator, NpuOpError

emu = NpuEmulator(allow_float32=False)   # the documented dtypes only
emu32 = NpuEmulator(allow_float32=True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def uniform(g, lo, hi, *shape, dtype=torch.float32):
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def paged(dense_rows, bs, g, extra_blocks=3):
    """Scatter per-request rows [L_b, ...] into a shuffled PA_BSND cache -> (cache, block_table)."""
    need = [-(-len(r) // bs) for r in dense_rows]
    nblk = sum(need) + extra_blocks
    perm = torch.randperm(nblk, generator=g)
    tail = dense_rows[0].shape[1:]
    cache = torch.full((nblk, bs, *tail), float("nan"), dtype=dense_rows[0].dtype)  # unowned: NaN
    table = torch.zeros(len(dense_rows), max(need), dtype=torch.int32)
    used = 0
    for b, rows in enumerate(dense_rows):
        blocks = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = blocks.int()
        for p in range(len(rows)):
            cache[blocks[p // bs], p % bs] = rows[p]
    return cache, table


# ---- npu_lightning_indexer ---------------------------------------------------------------------

def li_scores(q, k, w):
    """float64 sum_h w[h] relu(q[h] . k[s]) -> [Lq, Lk]; q [Lq, N, D], k [Lk, D], w [Lq, N]."""
    return torch.einsum("qh,qhs->qs", w.double(), torch.relu(torch.einsum("qhd,sd->qhs", q.double(), k.double())))


def check_topk(idx, score, n_valid, tol):
    """idx [count]: n_valid distinct allowed positions first (scores >= k-th best - tol), -1 after."""
    valid, rest = idx[:n_valid], idx[n_valid:]
    assert bool((rest == -1).all()), f"-1 expected after {n_valid} entries: {idx.tolist()}"
    assert bool((valid >= 0).all()) and len(set(valid.tolist())) == n_valid
    assert bool(torch.isfinite(score[valid.long()]).all()), "a masked (non-causal) position was selected"
    kth = score.sort(descending=True).values[n_valid - 1]
    assert float(score[valid.long()].min()) >= float(kth) - tol


def test_lightning_indexer_doc_example():
    """The doc's single-operator example (BSND query, PA_BSND key of identity block table, 64 heads,
    bf16), with s2 cut from 8192 to 4096 to keep CI quick: [B,S1,N2,2048] int32 of the top-2048 keys."""
    g = gen(0)
    b, s1, s2, n1, d, block_size = 1, 1, 4096, 64, 128, 256
    query = uniform(g, -10, 10, b, s1, n1, d, dtype=torch.bfloat16)
    key = uniform(g, -10, 10, b * (s2 // block_size), block_size, 1, d, dtype=torch.bfloat16)
    weights = uniform(g, -1, 1, b, s1, n1, dtype=torch.bfloat16)
    act_q = torch.full((b,), s1, dtype=torch.int32)
    act_k = torch.full((b,), s2, dtype=torch.int32)
    block_table = torch.arange(b * s2 // block_size, dtype=torch.int32).reshape(b, -1)
    idx, values = emu.npu_lightning_indexer(query, key, weights, actual_seq_lengths_query=act_q,
                                            actual_seq_lengths_key=act_k, block_table=block_table,
                                            layout_query="BSND", layout_key="PA_BSND", sparse_count=2048,
                                            sparse_mode=3)
    assert idx.shape == (1, 1, 1, 2048) and idx.dtype == torch.int32
    assert values.numel() == 0 and values.dtype == torch.bfloat16           # meta: [0] unless return_value
    score = li_scores(query[0], key.reshape(-1, d), weights[0])[0]          # [s2]
    check_topk(idx[0, 0, 0], score, 2048, tol=1e-3 * float(score.abs().max()))


@pytest.mark.parametrize("bs", [16, 32])
def test_lightning_indexer_tnd_paged_matches_dense_formulation(bs):
    """TND query (prefix-sum lengths) over a shuffled PA_BSND cache, mixed requests, sparse_mode=3."""
    g = gen(bs)
    reqs = [(1, 1), (3, 40), (5, 5), (2, 70), (0, 9)]            # (q_len, kv_len): decode, chunks, empty
    N1, D, count = 7, 128, 24
    keys = [uniform(g, -1, 1, L, D) for _, L in reqs]
    cache, table = paged([k[:, None, :] for k in keys], bs, g)  # [nblk, bs, 1, D]
    T = sum(q for q, _ in reqs)
    query, weights = uniform(g, -1, 1, T, N1, D), uniform(g, -1, 1, T, N1)
    cu = torch.tensor(np.cumsum([q for q, _ in reqs]), dtype=torch.int32)
    act_k = torch.tensor([L for _, L in reqs], dtype=torch.int32)
    idx, _ = emu32.npu_lightning_indexer(query, cache, weights, actual_seq_lengths_query=cu,
                                         actual_seq_lengths_key=act_k, block_table=table, layout_query="TND",
                                         layout_key="PA_BSND", sparse_count=count, sparse_mode=3)
    assert idx.shape == (T, 1, count) and idx.dtype == torch.int32
    t = 0
    for (Lq, Lk), k in zip(reqs, keys):
        score = li_scores(query[t:t + Lq], k, weights[t:t + Lq])
        for i in range(Lq):
            pos = Lk - Lq + i                                        # right-down causal
            s = score[i].masked_fill(torch.arange(Lk) > pos, float("-inf"))
            check_topk(idx[t + i, 0], s, min(count, pos + 1), tol=1e-5)
        t += Lq


def test_lightning_indexer_layouts_agree():
    """The same data as BSND/BSND, TND/TND and TND/PA_BSND selects the same positions."""
    g = gen(5)
    B, S, N1, D, count = 2, 20, 4, 128, 8
    q, k, w = uniform(g, -1, 1, B, S, N1, D), uniform(g, -1, 1, B, S, 1, D), uniform(g, -1, 1, B, S, N1)
    lens = torch.tensor([S, S], dtype=torch.int32)
    bsnd, _ = emu32.npu_lightning_indexer(q, k, w, actual_seq_lengths_query=lens, actual_seq_lengths_key=lens,
                                          sparse_count=count)
    cu = torch.tensor([S, 2 * S], dtype=torch.int32)
    tnd, _ = emu32.npu_lightning_indexer(q.reshape(B * S, N1, D), k.reshape(B * S, 1, D), w.reshape(B * S, N1),
                                         actual_seq_lengths_query=cu, actual_seq_lengths_key=cu,
                                         layout_query="TND", layout_key="TND", sparse_count=count)
    pa_key = torch.cat([k.flip(0), torch.zeros(B, 12, 1, D)], 1).reshape(B * 2, 16, 1, D)  # requests' blocks swapped
    pa, _ = emu32.npu_lightning_indexer(q.reshape(B * S, N1, D), pa_key, w.reshape(B * S, N1),
                                        actual_seq_lengths_query=cu, actual_seq_lengths_key=lens,
                                        block_table=torch.tensor([[2, 3], [0, 1]], dtype=torch.int32),
                                        layout_query="TND", layout_key="PA_BSND", sparse_count=count)
    for other in (tnd, pa):
        assert torch.equal(bsnd.reshape(B * S, 1, count).sort(-1).values, other.sort(-1).values)


def _li_args(**over):
    g = gen(9)
    a = dict(query=uniform(g, -1, 1, 3, 4, 128, dtype=torch.bfloat16),
             key=uniform(g, -1, 1, 2, 16, 1, 128, dtype=torch.bfloat16),
             weights=uniform(g, -1, 1, 3, 4), actual_seq_lengths_query=torch.tensor([3], dtype=torch.int32),
             actual_seq_lengths_key=torch.tensor([20], dtype=torch.int32),
             block_table=torch.tensor([[1, 0]], dtype=torch.int32), layout_query="TND", layout_key="PA_BSND",
             sparse_count=8, sparse_mode=3)
    a.update(over)
    return a


LI_REJECTED = {
    "head dim 64": dict(query=torch.zeros(3, 4, 64, dtype=torch.bfloat16),
                        key=torch.zeros(2, 16, 1, 64, dtype=torch.bfloat16)),
    "65 heads": dict(query=torch.zeros(3, 65, 128, dtype=torch.bfloat16), weights=torch.zeros(3, 65)),
    "N2 = 2": dict(key=torch.zeros(2, 16, 2, 128, dtype=torch.bfloat16)),
    "block 24": dict(key=torch.zeros(2, 24, 1, 128, dtype=torch.bfloat16)),
    "block 2048": dict(key=torch.zeros(1, 2048, 1, 128, dtype=torch.bfloat16)),
    "sparse_count 0": dict(sparse_count=0),
    "sparse_count 2049": dict(sparse_count=2049),
    "sparse_mode 1": dict(sparse_mode=1),
    "float32 query": dict(query=torch.zeros(3, 4, 128), key=torch.zeros(2, 16, 1, 128)),
    "fp16 weights, bf16 query": dict(weights=torch.zeros(3, 4, dtype=torch.float16)),
    "key dtype": dict(key=torch.zeros(2, 16, 1, 128, dtype=torch.float16)),
    "key layout TND for BSND query": dict(layout_query="BSND", layout_key="TND"),
    "no key lengths with PA": dict(actual_seq_lengths_key=None),
    "no block table with PA": dict(block_table=None),
    "narrow block table": dict(actual_seq_lengths_key=torch.tensor([40], dtype=torch.int32)),
    "TND without query lengths": dict(actual_seq_lengths_query=None),
    "decreasing prefix sums": dict(actual_seq_lengths_query=torch.tensor([2, 1], dtype=torch.int32),
                                   actual_seq_lengths_key=torch.tensor([5, 5], dtype=torch.int32),
                                   block_table=torch.tensor([[0], [1]], dtype=torch.int32)),
    "int64 lengths": dict(actual_seq_lengths_key=torch.tensor([20])),
    "return_value with PA": dict(return_value=True),
    "pre_tokens": dict(pre_tokens=100),
    "non-contiguous query": dict(query=torch.zeros(4, 3, 128, dtype=torch.bfloat16).transpose(0, 1)),
}


@pytest.mark.parametrize("case", sorted(LI_REJECTED))
def test_lightning_indexer_rejects(case):
    with pytest.raises(NpuOpError, match="npu_lightning_indexer"):
        emu.npu_lightning_indexer(**_li_args(**LI_REJECTED[case]))


def test_lightning_indexer_accepts_the_base_arguments():
    idx, _ = emu.npu_lightning_indexer(**_li_args())
    assert idx.shape == (3, 1, 8)


# the documentation line of the emulated CANN (Ascend/op-plugin branches 7.3.0 and 26.0.0)
LI_BY_LINE = {   # case -> (over, accepted on the 7.3.0 line / CANN 8.5.0, accepted from 26.0.0 / CANN 9.0.0)
    "64 heads (7.3.0: N1仅支持64)": (dict(query=torch.zeros(3, 64, 128, dtype=torch.bfloat16),
                                         weights=torch.zeros(3, 64, dtype=torch.bfloat16)), True, True),
    "32 heads (GLM-5.2)": (dict(query=torch.zeros(3, 32, 128, dtype=torch.bfloat16),
                               weights=torch.zeros(3, 32, dtype=torch.bfloat16)), False, True),
    "float32 weights": (dict(query=torch.zeros(3, 64, 128, dtype=torch.bfloat16), weights=torch.zeros(3, 64)),
                        False, True),
    "sparse_count 3072": (dict(query=torch.zeros(3, 64, 128, dtype=torch.bfloat16),
                               weights=torch.zeros(3, 64, dtype=torch.bfloat16), sparse_count=3072), False, True),
}


@pytest.mark.parametrize("case", sorted(LI_BY_LINE))
@pytest.mark.parametrize("cann", ["8.5.0", "9.0.0", "9.1.0"])
def test_lightning_indexer_limits_follow_the_emulated_line(case, cann):
    over, on_73, later = LI_BY_LINE[case]
    e = NpuEmulator(allow_float32=False, cann=cann)
    if (on_73 if cann == "8.5.0" else later):
        idx, _ = e.npu_lightning_indexer(**_li_args(**over))
        assert idx.shape == (3, 1, over.get("sparse_count", 8))
    else:
        with pytest.raises(NpuOpError, match="npu_lightning_indexer: .*7.3.0 line"):
            e.npu_lightning_indexer(**_li_args(**over))


# ---- npu_quant_lightning_indexer (C8: int8 query and keys, per-token-head float16 scales) -------------

def qli_scores(q, k, w, sq, sk):
    """float64 sum_g w[g] relu(sq[g] sk[s] (q[g] . k[s])) -> [Lq, Lk] (the doc's 计算公式); q [Lq, N, D]
    int8, k [Lk, D] int8, w and sq [Lq, N], sk [Lk]."""
    dots = torch.einsum("qhd,sd->qhs", q.double(), k.double())
    return torch.einsum("qh,qhs->qs", w.double(), torch.relu(sq.double()[..., None] * sk.double()[None, None] * dots))


def int8s(g, *shape):
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("bs", [16, 48])
def test_quant_lightning_indexer_tnd_paged_matches_the_formula(bs):
    """TND int8 query over a shuffled PA_BSND int8 cache whose key and key_dequant_scale are strided views
    of one packed tensor per block (codes then scales, as a c8_li cache), mixed requests, sparse_mode=3:
    the top-k of the doc's formula in float64. Unowned rows hold the largest codes and scales: read, they
    would win every selection."""
    g = gen(bs)
    reqs = [(1, 1), (3, 40), (5, 5), (2, 70), (0, 9)]
    N1, D, count = 32, 128, 24
    keys = [int8s(g, L, D) for _, L in reqs]
    kscales = [uniform(g, 0, 0.1, L, dtype=torch.float16) for _, L in reqs]
    need = [-(-L // bs) for _, L in reqs]
    nblk = sum(need) + 2
    packed = torch.full((nblk, bs * (D + 2)), 0x7B, dtype=torch.uint8)          # poison: codes 123, f16 scale 57200
    codes = packed[:, :bs * D].view(nblk, bs, 1, D).view(torch.int8)
    scales = packed[:, bs * D:].view(nblk, bs, 2).view(torch.float16)           # [nblk, bs, 1]
    perm, used = torch.randperm(nblk, generator=g), 0
    table = torch.zeros(len(reqs), max(need), dtype=torch.int32)
    for b, (_, L) in enumerate(reqs):
        blocks = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = blocks.int()
        pos = torch.arange(L)
        codes[blocks[pos // bs], pos % bs, 0] = keys[b]
        scales[blocks[pos // bs], pos % bs, 0] = kscales[b]
    assert not codes.is_contiguous() and not scales.is_contiguous()
    T = sum(q for q, _ in reqs)
    query, w = int8s(g, T, N1, D), uniform(g, -1, 1, T, N1, dtype=torch.float16)
    sq = uniform(g, 0, 0.1, T, N1, dtype=torch.float16)
    cu = torch.tensor(np.cumsum([q for q, _ in reqs]), dtype=torch.int32)
    act_k = torch.tensor([L for _, L in reqs], dtype=torch.int32)
    idx = emu.npu_quant_lightning_indexer(query, codes, w, sq, scales, 0, 0, actual_seq_lengths_query=cu,
                                          actual_seq_lengths_key=act_k, block_table=table, layout_query="TND",
                                          layout_key="PA_BSND", sparse_count=count, sparse_mode=3)
    assert isinstance(idx, torch.Tensor) and idx.shape == (T, 1, count) and idx.dtype == torch.int32
    t = 0
    for (Lq, Lk), k, sk in zip(reqs, keys, kscales):
        score = qli_scores(query[t:t + Lq], k, w[t:t + Lq], sq[t:t + Lq], sk)
        for i in range(Lq):
            pos = Lk - Lq + i
            s = score[i].masked_fill(torch.arange(Lk) > pos, float("-inf"))
            check_topk(idx[t + i, 0], s, min(count, pos + 1), tol=1e-6 * float(s[torch.isfinite(s)].abs().max()))
        t += Lq


def test_quant_lightning_indexer_doc_example_bsnd():
    """The doc's example at a smaller size: BSND int8 query [b, s1, 64, 128] over an identity-table
    PA_BSND cache, sparse_mode=0 (no mask), every key scored."""
    g = gen(4)
    b, s1, s2, n1, d, block_size, count = 3, 4, 256, 64, 128, 128, 100
    nb = s2 // block_size
    key = int8s(g, b * nb, block_size, 1, d)
    sk = uniform(g, 0, 10, b * nb, block_size, 1, dtype=torch.float16)
    query = int8s(g, b, s1, n1, d)
    sq = uniform(g, 0, 10, b, s1, n1, dtype=torch.float16)
    w = uniform(g, 0, 0.01, b, s1, n1, dtype=torch.float16)
    table = torch.arange(b * nb, dtype=torch.int32).reshape(b, -1)
    idx = emu.npu_quant_lightning_indexer(query, key, w, sq, sk, query_quant_mode=0, key_quant_mode=0,
                                          actual_seq_lengths_query=torch.full((b,), s1, dtype=torch.int32),
                                          actual_seq_lengths_key=torch.full((b,), s2, dtype=torch.int32),
                                          block_table=table, layout_query="BSND", layout_key="PA_BSND",
                                          sparse_count=count, sparse_mode=0)
    assert idx.shape == (b, s1, 1, count)
    for i in range(b):
        ks = key[i * nb:(i + 1) * nb].reshape(s2, d)
        score = qli_scores(query[i], ks, w[i], sq[i], sk[i * nb:(i + 1) * nb].reshape(s2))
        for j in range(s1):
            check_topk(idx[i, j, 0], score[j], count, tol=1e-6 * float(score[j].abs().max()))


def _qli_args(**over):
    g = gen(10)
    a = dict(query=int8s(g, 3, 4, 128), key=int8s(g, 2, 16, 1, 128), weights=uniform(g, -1, 1, 3, 4, dtype=torch.float16),
             query_dequant_scale=uniform(g, 0, 1, 3, 4, dtype=torch.float16),
             key_dequant_scale=uniform(g, 0, 1, 2, 16, 1, dtype=torch.float16), query_quant_mode=0, key_quant_mode=0,
             actual_seq_lengths_query=torch.tensor([3], dtype=torch.int32),
             actual_seq_lengths_key=torch.tensor([20], dtype=torch.int32),
             block_table=torch.tensor([[1, 0]], dtype=torch.int32), layout_query="TND", layout_key="PA_BSND",
             sparse_count=8, sparse_mode=3)
    a.update(over)
    return a


QLI_REJECTED = {
    "bf16 query": dict(query=torch.zeros(3, 4, 128, dtype=torch.bfloat16)),
    "bf16 key": dict(key=torch.zeros(2, 16, 1, 128, dtype=torch.bfloat16)),
    "bf16 weights (A2/A3: float16)": dict(weights=torch.zeros(3, 4, dtype=torch.bfloat16)),
    "float32 query scale": dict(query_dequant_scale=torch.zeros(3, 4)),
    "float32 key scale": dict(key_dequant_scale=torch.zeros(2, 16, 1)),
    "key scale shape": dict(key_dequant_scale=torch.zeros(2, 16, dtype=torch.float16)),
    "weights shape": dict(weights=torch.zeros(3, 5, dtype=torch.float16)),
    "negative key scale": dict(key_dequant_scale=-torch.ones(2, 16, 1, dtype=torch.float16)),
    "negative query scale": dict(query_dequant_scale=-torch.ones(3, 4, dtype=torch.float16)),
    "w * scale past float16": dict(weights=torch.full((3, 4), 60000.0, dtype=torch.float16),
                                   query_dequant_scale=torch.full((3, 4), 2.0, dtype=torch.float16)),
    "quant mode 1": dict(query_quant_mode=1),
    "65 heads": dict(query=torch.zeros(3, 65, 128, dtype=torch.int8), weights=torch.zeros(3, 65, dtype=torch.float16),
                     query_dequant_scale=torch.zeros(3, 65, dtype=torch.float16)),
    "head dim 64": dict(query=torch.zeros(3, 4, 64, dtype=torch.int8), key=torch.zeros(2, 16, 1, 64, dtype=torch.int8)),
    "block 24": dict(key=torch.zeros(2, 24, 1, 128, dtype=torch.int8),
                     key_dequant_scale=torch.zeros(2, 24, 1, dtype=torch.float16)),
    "sparse_count 3072": dict(sparse_count=3072),
    "sparse_mode 1": dict(sparse_mode=1),
    "narrow block table": dict(actual_seq_lengths_key=torch.tensor([40], dtype=torch.int32)),
    "non-contiguous query": dict(query=torch.zeros(4, 3, 128, dtype=torch.int8).transpose(0, 1)),
}


@pytest.mark.parametrize("case", sorted(QLI_REJECTED))
def test_quant_lightning_indexer_rejects(case):
    with pytest.raises(NpuOpError, match="npu_quant_lightning_indexer"):
        emu.npu_quant_lightning_indexer(**_qli_args(**QLI_REJECTED[case]))


def test_quant_lightning_indexer_float8_codes_are_not_emulated():
    with pytest.raises(NpuOpError, match="not emulated"):
        emu.npu_quant_lightning_indexer(**_qli_args(query_dtype=torch.int8))


def _strided_key():
    packed = torch.zeros(2, 16 * 130, dtype=torch.uint8)
    return dict(key=packed[:, :16 * 128].view(2, 16, 1, 128).view(torch.int8),
                key_dequant_scale=packed[:, 16 * 128:].view(2, 16, 2).view(torch.float16))


QLI_BY_LINE = {   # case -> (over, accepted on 7.3.0 / 26.0.0 (the pages without the 950 column), from 26.1.0)
    "64 heads": (dict(query=torch.zeros(3, 64, 128, dtype=torch.int8), weights=torch.zeros(3, 64, dtype=torch.float16),
                      query_dequant_scale=torch.zeros(3, 64, dtype=torch.float16)), True, True),
    "4 heads": ({}, False, True),
    "strided key and key scale (a c8_li cache)": (dict(query=torch.zeros(3, 64, 128, dtype=torch.int8),
                                                      weights=torch.zeros(3, 64, dtype=torch.float16),
                                                      query_dequant_scale=torch.zeros(3, 64, dtype=torch.float16),
                                                      **_strided_key()), False, True),
}


@pytest.mark.parametrize("case", sorted(QLI_BY_LINE))
@pytest.mark.parametrize("cann", ["8.5.0", "9.0.0", "9.1.0"])
def test_quant_lightning_indexer_limits_follow_the_emulated_line(case, cann):
    over, early, later = QLI_BY_LINE[case]
    e = NpuEmulator(allow_float32=False, cann=cann)
    if (later if cann == "9.1.0" else early):
        assert e.npu_quant_lightning_indexer(**_qli_args(**over)).shape == (3, 1, 8)
    else:
        with pytest.raises(NpuOpError, match="npu_quant_lightning_indexer: "):
            e.npu_quant_lightning_indexer(**_qli_args(**over))


def test_fused_attention_ops_absent_before_cann_8_5():
    e = NpuEmulator(cann="8.3.RC1")
    assert e.line is None
    with pytest.raises(NpuOpError, match="npu_lightning_indexer: not in torch_npu before the 7.3.0 line"):
        e.npu_lightning_indexer(**_li_args(query=torch.zeros(3, 64, 128, dtype=torch.bfloat16),
                                           weights=torch.zeros(3, 64, dtype=torch.bfloat16)))
    with pytest.raises(NpuOpError, match="npu_sparse_flash_attention: not in torch_npu before"):
        e.npu_sparse_flash_attention(torch.zeros(1, 1, 1, 512), torch.zeros(1, 4, 1, 512), torch.zeros(1, 4, 1, 512),
                                     torch.zeros(1, 1, 1, 1, dtype=torch.int32), 0.1, attention_mode=2)
    with pytest.raises(NpuOpError, match="npu_quant_lightning_indexer: not in torch_npu before"):
        e.npu_quant_lightning_indexer(**_qli_args())


# ---- npu_sparse_flash_attention -----------------------------------------------------------------

def sfa_dense(q, qr, k, kr, v, sel, scale, Lkv, sbs=1, causal=True):
    """float64: one batch. q [Lq,N,512], qr [Lq,N,64], k/kr/v [Lkv,*], sel [Lq,S] block ids (-1 skip)."""
    Lq = q.shape[0]
    out = torch.zeros(Lq, q.shape[1], v.shape[-1], dtype=torch.float64)
    lse = torch.full((Lq, q.shape[1]), float("-inf"), dtype=torch.float64)
    for i in range(Lq):
        toks = sorted({int(b) * sbs + j for b in sel[i].tolist() if b >= 0 for j in range(sbs)})
        toks = [t for t in toks if t < Lkv and (not causal or t <= Lkv - Lq + i)]
        if not toks:
            continue
        kk = torch.cat([k[toks], kr[toks]], -1).double()
        s = torch.cat([q[i], qr[i]], -1).double() @ kk.T * scale           # [N, n]
        lse[i] = torch.logsumexp(s, -1)
        out[i] = torch.softmax(s, -1) @ v[toks].double()
    return out, lse


def test_sparse_flash_attention_doc_example_scaled():
    """The doc's example (BSND query and key, key = value, 2 heads of rope, random distinct indices
    below s2_act - s1 + 1, fp16), shrunk: b=4, s1=1, n1=16, s2=512, s2_act=256, 64 indices."""
    g = gen(1)
    b, s1, n1, dn, dr, s2, s2_act, count, scale = 4, 1, 16, 512, 64, 512, 256, 64, 0.041666666666666664
    query = uniform(g, -10, 10, b, s1, n1, dn, dtype=torch.float16)
    key = uniform(g, -5, 10, b, s2, 1, dn, dtype=torch.float16)
    value = key.clone()
    idxs = torch.randperm(s2_act - s1 + 1, generator=g)[:count]
    sparse_indices = idxs.repeat(b * s1).reshape(b, s1, 1, count).int()
    query_rope = uniform(g, -10, 10, b, s1, n1, dr, dtype=torch.float16)
    key_rope = uniform(g, -10, 10, b, s2, 1, dr, dtype=torch.float16)
    act_q = torch.full((b,), s1, dtype=torch.int32)
    act_kv = torch.full((b,), s2_act, dtype=torch.int32)
    out, smax, ssum = emu.npu_sparse_flash_attention(
        query, key, value, sparse_indices, scale, block_table=None, actual_seq_lengths_query=act_q,
        actual_seq_lengths_kv=act_kv, query_rope=query_rope, key_rope=key_rope, sparse_block_size=1,
        layout_query="BSND", layout_kv="BSND", sparse_mode=3, pre_tokens=(1 << 63) - 1,
        next_tokens=(1 << 63) - 1, attention_mode=2, return_softmax_lse=False)
    assert out.shape == (b, s1, n1, dn) and out.dtype == torch.float16
    assert smax.shape == (0,) and ssum.shape == (0,) and smax.dtype == torch.float32       # meta
    for i in range(b):
        ref, _ = sfa_dense(query[i], query_rope[i], key[i, :, 0], key_rope[i, :, 0], value[i, :, 0],
                           sparse_indices[i, :, 0], scale, s2_act)
        err = (out[i].double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-3, err                                   # fp16 output rounding


def test_sparse_flash_attention_softmax_lse_bsnd():
    """return_softmax_lse (allowed without PA_BSND): [B, N2, S1, N1/N2] max and sum, lse = max + log(sum)."""
    g = gen(2)
    B, S1, N1, S2 = 2, 3, 4, 32
    bf = torch.bfloat16
    q, qr = uniform(g, -1, 1, B, S1, N1, 512, dtype=bf), uniform(g, -1, 1, B, S1, N1, 64, dtype=bf)
    k, kr = uniform(g, -1, 1, B, S2, 1, 512, dtype=bf), uniform(g, -1, 1, B, S2, 1, 64, dtype=bf)
    sel = torch.stack([torch.randperm(S2 - S1 + 1, generator=g)[:6] for _ in range(B * S1)]).view(B, S1, 1, 6).int()
    out, smax, ssum = emu.npu_sparse_flash_attention(q, k, k, sel, 0.1, query_rope=qr, key_rope=kr,
                                                     attention_mode=2, return_softmax_lse=True)
    assert smax.shape == ssum.shape == (B, 1, S1, N1)
    for b in range(B):
        ref, lse = sfa_dense(q[b], qr[b], k[b, :, 0], kr[b, :, 0], k[b, :, 0], sel[b, :, 0], 0.1, S2)
        assert torch.allclose((smax[b, 0] + ssum[b, 0].log()).double(), lse, atol=1e-4)
        assert (out[b].double() - ref).abs().max() < 2e-2 * ref.abs().max()


@pytest.mark.parametrize("sbs", [1, 4])
def test_sparse_flash_attention_tnd_paged(sbs):
    """TND query, shuffled PA_BSND cache, -1 padding, a row with no index, block-wise selection;
    every cache row no query token may read is NaN."""
    g = gen(10 + sbs)
    reqs = [(1, 37), (4, 20), (2, 2), (3, 64)]
    N1, S, bs, scale = 8, 6, 16, 0.07
    lat = [uniform(g, -1, 1, L, 1, 512) for _, L in reqs]
    rope = [uniform(g, -1, 1, L, 1, 64) for _, L in reqs]
    kc, table = paged(lat, bs, gen(3))
    krc, table2 = paged(rope, bs, gen(3))
    assert torch.equal(table, table2)
    T = sum(q for q, _ in reqs)
    q, qr = uniform(g, -1, 1, T, N1, 512), uniform(g, -1, 1, T, N1, 64)
    sel = torch.full((T, 1, S), -1, dtype=torch.int32)
    t = 0
    for Lq, L in reqs:
        for i in range(Lq):
            nblk = -(-(L - Lq + i + 1) // sbs)
            n = min(S, nblk) if (t + i) % 5 else 0                    # every 5th row: no index at all
            sel[t + i, 0, :n] = torch.randperm(nblk, generator=g)[:n].int()
        t += Lq
    # poison every owned row that no query token reads (unselected, or selected but past its
    # causal limit), position 0 included: a -1 entry or a masked one must not read anything
    t, poisoned = 0, set()
    for b, (Lq, L) in enumerate(reqs):
        read = {int(blk) * sbs + j for i in range(Lq) for blk in sel[t + i, 0].tolist() if blk >= 0
                for j in range(sbs) if int(blk) * sbs + j <= L - Lq + i}
        for p in set(range(L)) - read:
            kc[int(table[b, p // bs]), p % bs] = float("nan")
            krc[int(table[b, p // bs]), p % bs] = float("nan")
            poisoned.add((b, p))
        t += Lq
    assert any(p == 0 for _, p in poisoned) and len(poisoned) > 40
    cu = torch.tensor(np.cumsum([q for q, _ in reqs]), dtype=torch.int32)
    lens = torch.tensor([L for _, L in reqs], dtype=torch.int32)
    out, _, _ = emu32.npu_sparse_flash_attention(
        q, kc, kc, sel, scale, block_table=table, actual_seq_lengths_query=cu, actual_seq_lengths_kv=lens,
        query_rope=qr, key_rope=krc, sparse_block_size=sbs, layout_query="TND", layout_kv="PA_BSND",
        attention_mode=2)
    assert out.shape == (T, N1, 512)
    t = 0
    for (Lq, L), k, kr in zip(reqs, lat, rope):
        ref, _ = sfa_dense(q[t:t + Lq], qr[t:t + Lq], k[:, 0], kr[:, 0], k[:, 0], sel[t:t + Lq, 0], scale, L, sbs)
        assert torch.allclose(out[t:t + Lq].double(), ref, atol=2e-6), (Lq, L)
        t += Lq
    assert bool(torch.isfinite(out).all())                            # NaN rows were never read


def _sfa_args(**over):
    g = gen(4)
    a = dict(query=uniform(g, -1, 1, 2, 4, 512, dtype=torch.bfloat16),
             key=uniform(g, -1, 1, 2, 16, 1, 512, dtype=torch.bfloat16),
             sparse_indices=torch.tensor([[[0, 1, -1]], [[2, -1, -1]]], dtype=torch.int32), scale_value=0.1,
             block_table=torch.tensor([[1, 0]], dtype=torch.int32),
             actual_seq_lengths_query=torch.tensor([2], dtype=torch.int32),
             actual_seq_lengths_kv=torch.tensor([20], dtype=torch.int32),
             query_rope=uniform(g, -1, 1, 2, 4, 64, dtype=torch.bfloat16),
             key_rope=uniform(g, -1, 1, 2, 16, 1, 64, dtype=torch.bfloat16),
             layout_query="TND", layout_kv="PA_BSND", sparse_mode=3, attention_mode=2)
    a.update(over)
    a.setdefault("value", a["key"])
    return a


def bz(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


SFA_REJECTED = {
    "attention_mode 0": dict(attention_mode=0),
    "latent 256": dict(query=bz(2, 4, 256), key=bz(2, 16, 1, 256)),
    "rope 32": dict(query_rope=torch.zeros(2, 4, 32, dtype=torch.bfloat16)),
    "no key_rope": dict(key_rope=None),
    "3 heads": dict(query=bz(2, 3, 512), query_rope=bz(2, 3, 64)),
    "KV_N 2": dict(key=bz(2, 16, 2, 512), key_rope=bz(2, 16, 2, 64)),
    "block 8": dict(key=bz(4, 8, 1, 512), key_rope=bz(4, 8, 1, 64)),
    "sparse_block_size 3": dict(sparse_block_size=3),
    "sparse_block_size 256": dict(sparse_block_size=256),
    "invalid before valid": dict(sparse_indices=torch.tensor([[[0, -1, 1]], [[2, -1, -1]]], dtype=torch.int32)),
    "int64 indices": dict(sparse_indices=torch.tensor([[[0, 1, -1]], [[2, -1, -1]]])),
    "lse with PA": dict(return_softmax_lse=True),
    "BSND kv for TND query": dict(layout_kv="BSND"),
    "sinks": dict(sinks=torch.zeros(4)),
    "value None": dict(value=None),
    "float32 query": dict(query=torch.zeros(2, 4, 512)),
    "value shape": dict(value=torch.zeros(2, 16, 1, 256, dtype=torch.bfloat16)),
    "sparse_mode 1": dict(sparse_mode=1),
    "no kv lengths with PA": dict(actual_seq_lengths_kv=None),
}


@pytest.mark.parametrize("case", sorted(SFA_REJECTED))
def test_sparse_flash_attention_rejects(case):
    with pytest.raises(NpuOpError, match="npu_sparse_flash_attention"):
        emu.npu_sparse_flash_attention(**_sfa_args(**SFA_REJECTED[case]))


def test_sparse_flash_attention_accepts_the_base_arguments():
    out, _, _ = emu.npu_sparse_flash_attention(**_sfa_args())
    assert out.shape == (2, 4, 512) and out.dtype == torch.bfloat16


def test_sparse_flash_attention_has_no_sinks_in_released_lines():
    """`sinks` entered the schema after 26.1.0 (op-plugin master only); on Atlas A2/A3 it is refused anyway."""
    g = gen(40)
    q, qr = uniform(g, -1, 1, 1, 2, 4, 512, dtype=torch.bfloat16), uniform(g, -1, 1, 1, 2, 4, 64, dtype=torch.bfloat16)
    k, kr = uniform(g, -1, 1, 1, 8, 1, 512, dtype=torch.bfloat16), uniform(g, -1, 1, 1, 8, 1, 64, dtype=torch.bfloat16)
    sel = torch.tensor([[[[0, 1]], [[2, 0]]]], dtype=torch.int32)
    for cann in ("8.5.0", "9.1.0"):
        with pytest.raises(NpuOpError, match=r"sinks is not in the schema of the (7\.3\.0|26\.1\.0) line"):
            NpuEmulator(allow_float32=False, cann=cann).npu_sparse_flash_attention(
                q, k, k, sel, 0.1, query_rope=qr, key_rope=kr, attention_mode=2, sinks=torch.zeros(4))


# ---- npu_moe_gating_top_k -----------------------------------------------------------------------

def gating_numpy(x, k, bias, k_group, group_count, group_select_mode, norm_type, scale, eps):
    """The documented golden logic (等价计算逻辑), in numpy, float64."""
    x = x.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True) \
        if norm_type == 0 else 1 / (1 + np.exp(-x))
    c = p + bias
    T, E = c.shape
    if group_count > 1:
        gc = c.reshape(T, group_count, -1)
        gs = gc.max(-1) if group_select_mode == 0 else np.sort(gc, -1)[..., -2:].sum(-1)
        keep = np.argsort(-gs, -1, kind="stable")[:, :k_group]
        drop = np.ones((T, group_count), bool)
        drop[np.arange(T)[:, None], keep] = False
        c = np.where(drop[..., None], -np.inf, gc).reshape(T, E)
    ids = np.argsort(-c, -1, kind="stable")[:, :k]
    y = np.take_along_axis(p, ids, 1)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdims=True) + eps)
    return y * scale, ids


@pytest.mark.parametrize("mode,norm_type", [(1, 1), (0, 1), (1, 0)])
def test_moe_gating_top_k_doc_example(mode, norm_type):
    """The doc's example: x (8, 256) ~ U(-2, 2), bias ~ U(-2, 2), k=6, k_group=4, group_count=8."""
    rng = np.random.default_rng(mode * 2 + norm_type)
    x = rng.uniform(-2, 2, (8, 256)).astype(np.float32)
    bias = rng.uniform(-2, 2, (256,)).astype(np.float32)
    y, ids, norm = emu.npu_moe_gating_top_k(torch.tensor(x), 6, bias=torch.tensor(bias), k_group=4, group_count=8,
                                            group_select_mode=mode, renorm=0, norm_type=norm_type,
                                            routed_scaling_factor=2.5, eps=1e-20)
    assert y.shape == ids.shape == (8, 6) and ids.dtype == torch.int32 and y.dtype == torch.float32
    assert norm.shape == (8, 256) and norm.dtype == torch.float32                     # meta: normOut
    y_ref, ids_ref = gating_numpy(x, 6, bias, 4, 8, mode, norm_type, 2.5, 1e-20)
    assert np.array_equal(ids.numpy(), ids_ref)
    assert np.allclose(y.numpy(), y_ref, rtol=1e-5)


def test_moe_gating_top_k_one_group_and_half_precision():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 2, (16, 64)).astype(np.float16)
    bias = rng.uniform(0, 2, (64,)).astype(np.float16)
    y, ids, _ = emu.npu_moe_gating_top_k(torch.tensor(x), 4, bias=torch.tensor(bias), norm_type=1)
    assert y.dtype == torch.float16
    y_ref, ids_ref = gating_numpy(x.astype(np.float32), 4, bias.astype(np.float32), 1, 1, 0, 1, 1.0, 1e-20)
    assert np.array_equal(np.sort(ids.numpy(), -1), np.sort(ids_ref, -1))
    assert np.allclose(y.float().numpy(), y_ref, rtol=2e-3)


GATING_REJECTED = {
    "renorm 1": dict(renorm=1),
    "k too large": dict(k=65, k_group=1, group_count=2),
    "groups of 2": dict(group_count=32, k_group=1, k=2),
    "group count does not divide": dict(group_count=3),
    "k_group > group_count": dict(k_group=5, group_count=4),
    "bias dtype": dict(bias=torch.zeros(64, dtype=torch.float16)),
    "bias shape": dict(bias=torch.zeros(63)),
    "3-D x": dict(x=torch.zeros(2, 4, 64)),
    "2049 experts": dict(x=torch.zeros(2, 2049), bias=None),
    "input_ids without tid2eid": dict(input_ids=torch.zeros(4, dtype=torch.int32)),
    "norm_type 2": dict(norm_type=2),
}


@pytest.mark.parametrize("case", sorted(GATING_REJECTED))
def test_moe_gating_top_k_rejects(case):
    a = dict(x=torch.zeros(4, 64), k=4, bias=torch.zeros(64), k_group=1, group_count=1)
    a.update(GATING_REJECTED[case])
    with pytest.raises(NpuOpError, match="npu_moe_gating_top_k"):
        emu.npu_moe_gating_top_k(a.pop("x"), a.pop("k"), **a)


# ---- npu_moe_init_routing_v2 ----------------------------------------------------------------------

def test_moe_init_routing_v2_doc_example():
    """The doc's example: bs=1, h=613, k=475, 226 experts, active range [23, 35), count mode."""
    g = gen(3)
    bs, h, k, E, rng = 1, 613, 475, 226, [23, 35]
    x = torch.randn(bs, h, generator=g)
    expert_idx = torch.randint(0, E, (bs, k), generator=g, dtype=torch.int32)
    scale = torch.randn(bs, generator=g)
    ex, row, counts, ex_scale = emu.npu_moe_init_routing_v2(
        x, expert_idx, scale=scale, offset=None, active_num=475, expert_capacity=-1, expert_num=E,
        drop_pad_mode=0, expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=rng,
        quant_mode=-1, row_idx_type=0)
    flat = expert_idx.flatten()
    inside = (flat >= 23) & (flat < 35)
    n = int(inside.sum())
    # meta shapes: [min(active_num, bs*k), h], [bs*k], [end - start], [bs*k]
    assert ex.shape == (475, h) and row.shape == (475,) and counts.shape == (12,) and ex_scale.shape == (475,)
    assert row.dtype == torch.int32 and counts.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(flat[inside].long() - 23, minlength=12))
    # gather index: in-range slots get their row in the expert-sorted order (stable), others -1
    assert bool((row[~inside] == -1).all())
    order = sorted(range(k), key=lambda i: (int(flat[i]), i))
    order = [i for i in order if inside[i]]
    assert [int(row[i]) for i in order] == list(range(n))
    assert torch.equal(ex[:n], x[[i // k for i in order]])
    assert torch.equal(ex_scale[:n], scale[[i // k for i in order]])


def test_moe_init_routing_v2_scatter_index_and_key_value_counts():
    g = gen(4)
    x = torch.randn(6, 5, generator=g)
    ids = torch.tensor([[3, 0], [3, 1], [0, 2], [5, 3], [1, 0], [3, 5]], dtype=torch.int32)
    ex, row, kv, _ = emu.npu_moe_init_routing_v2(x, ids, expert_num=8, expert_tokens_num_type=2,
                                                 expert_tokens_num_flag=True, row_idx_type=1)
    flat = ids.flatten().tolist()
    order = sorted(range(12), key=lambda i: (flat[i], i))
    assert row.tolist() == order                                            # scatter: row i <- slot order[i]
    assert torch.equal(ex, x[[i // 2 for i in order]])
    assert kv.shape == (8, 2)                                               # meta: [expert_num, 2]
    assert kv[:5].tolist() == [[0, 3], [1, 2], [2, 1], [3, 4], [5, 2]] and kv[5:].abs().sum() == 0


def test_moe_init_routing_v2_ids_outside_the_range_and_unspecified_rows():
    """ids below the active range (e.g. -1) sort last with gather index -1 and no count (the doc's
    golden); expanded_x rows past the available ones are unspecified: NaN here."""
    g = gen(5)
    x = torch.randn(3, 4, generator=g)
    ids = torch.tensor([[2, -1], [0, 2], [-1, 1]], dtype=torch.int32)
    ex, row, counts, _ = emu.npu_moe_init_routing_v2(x, ids, expert_num=3, expert_tokens_num_type=1,
                                                     expert_tokens_num_flag=True, active_expert_range=[0, 3])
    assert row.tolist() == [2, -1, 0, 3, -1, 1] and counts.tolist() == [1, 1, 2]
    assert torch.equal(ex[:4], x[[1, 2, 0, 1]]) and bool(ex[4:].isnan().all())


ROUTING_REJECTED = {
    "expert_num -1 with counts (cannot size them)": dict(expert_num=-1),
    "expert_num -1 with a range": dict(expert_num=-1, expert_tokens_num_flag=False, active_expert_range=[0, 4]),
    "int64 ids": dict(expert_idx=torch.zeros(4, 2, dtype=torch.int64)),
    "3-D x": dict(x=torch.zeros(4, 2, 8)),
    "row mismatch": dict(expert_idx=torch.zeros(3, 2, dtype=torch.int32)),
    "drop_pad_mode 2": dict(drop_pad_mode=2),
    "row_idx_type 2": dict(row_idx_type=2),
    "expert_tokens_num_type 3": dict(expert_tokens_num_type=3),
    "decreasing range": dict(active_expert_range=[5, 2]),
    "range beyond expert_num": dict(active_expert_range=[0, 9]),
    "id beyond expert_num": dict(expert_idx=torch.full((4, 2), 8, dtype=torch.int32)),
    "active_num -2": dict(active_num=-2),
    "static quantisation (not emulated)": dict(quant_mode=0, scale=torch.ones(1), offset=torch.zeros(1)),
    "quant_mode 2 (not in this line's page)": dict(quant_mode=2),
    "dynamic: offset given": dict(quant_mode=1, offset=torch.zeros(1)),
    "dynamic: 1-D scale": dict(quant_mode=1, scale=torch.ones(4)),
    "dynamic: float16 scale": dict(quant_mode=1, scale=torch.ones(1, 8, dtype=torch.float16)),
    "dynamic: scale rows neither 1 nor the range": dict(quant_mode=1, scale=torch.ones(3, 8)),
    "dynamic: scale width": dict(quant_mode=1, scale=torch.ones(1, 7)),
    "dynamic: int8 x (undefined output, not emulated)": dict(quant_mode=1, x=torch.zeros(4, 8, dtype=torch.int8)),
}


def test_moe_init_routing_v2_expert_num_default_without_counts():
    """expert_num=-1 (the default) is fine when nothing has to be sized by it."""
    x, ids = torch.randn(4, 8, generator=gen(6)), torch.tensor([[1, 0], [3, 1], [0, 0], [2, 3]], dtype=torch.int32)
    ex, row, counts, _ = emu.npu_moe_init_routing_v2(x, ids)
    assert ex.shape == (8, 8) and counts.shape == () and sorted(row.tolist()) == list(range(8))


@pytest.mark.parametrize("case", sorted(ROUTING_REJECTED))
def test_moe_init_routing_v2_rejects(case):
    a = dict(x=torch.zeros(4, 8), expert_idx=torch.zeros(4, 2, dtype=torch.int32), expert_num=8,
             expert_tokens_num_type=1, expert_tokens_num_flag=True)
    a.update(ROUTING_REJECTED[case])
    with pytest.raises(NpuOpError, match="npu_moe_init_routing_v2"):
        emu.npu_moe_init_routing_v2(a.pop("x"), a.pop("expert_idx"), **a)


# ---- npu_grouped_matmul / npu_swiglu / npu_moe_token_unpermute --------------------------------------

@pytest.mark.parametrize("list_type", [0, 1])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_matmul_single_weight_groups_along_m(list_type, transposed):
    g = gen(list_type * 2 + transposed)
    E, K, N = 5, 12, 7
    sizes = [3, 0, 6, 1, 0]                                               # empty groups included
    M = sum(sizes)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).float()
    w = torch.randn(E, K, N, generator=g)
    weight = w.transpose(1, 2).contiguous().transpose(1, 2) if transposed else w   # a transposed view
    gl = torch.tensor(np.cumsum(sizes) if list_type == 0 else sizes, dtype=torch.int64)
    y = emu.npu_grouped_matmul([x], [weight], group_list=gl, split_item=3, group_type=0,
                               group_list_type=list_type)
    assert len(y) == 1 and y[0].shape == (M, N)
    ref = torch.cat([x[s:s + n].double() @ w[e].double() for e, (s, n) in
                     enumerate(zip(np.cumsum([0] + sizes[:-1]), sizes))])
    assert torch.allclose(y[0].double(), ref, atol=1e-5)


def test_grouped_matmul_weight_list_and_ungrouped():
    g = gen(8)
    x = torch.randn(6, 4, generator=g)
    ws = [torch.randn(4, 3, generator=g) for _ in range(2)]
    y = emu.npu_grouped_matmul([x], ws, group_list=torch.tensor([2, 6]), split_item=2, group_type=0)[0]
    assert torch.allclose(y, torch.cat([x[:2] @ ws[0], x[2:] @ ws[1]]), atol=1e-6)
    xs = [torch.randn(2, 4, generator=g), torch.randn(5, 4, generator=g)]
    bias = [torch.randn(3, generator=g), torch.randn(3, generator=g)]
    ys = emu.npu_grouped_matmul(xs, ws, bias=bias, split_item=0, group_type=-1)
    for xi, wi, bi, yi in zip(xs, ws, bias, ys):
        assert torch.allclose(yi, xi @ wi + bi, atol=1e-6)


GMM_REJECTED = {
    "cumsum short of M": dict(group_list=torch.tensor([2, 3, 5])),
    "cumsum decreasing": dict(group_list=torch.tensor([4, 2, 6])),
    "counts do not sum to M": dict(group_list=torch.tensor([1, 1, 1]), group_list_type=1),
    "group_list length": dict(group_list=torch.tensor([3, 6])),
    "group_list int32": dict(group_list=torch.tensor([2, 4, 6], dtype=torch.int32)),
    "split_item 0 for group_type 0": dict(split_item=0),
    "group_type 1": dict(group_type=1),
    "transposed x": dict(x=[torch.zeros(4, 6).t()]),
    "act_type silu": dict(act_type=5),
    "dtype mismatch": dict(weight=[torch.zeros(3, 4, 5, dtype=torch.float16)]),
    "scale with float x": dict(scale=[torch.ones(3, 5)]),
    "per_token_scale with float x": dict(per_token_scale=[torch.ones(6)]),
    "antiquant (not emulated)": dict(antiquant_scale=[torch.ones(3, 5)]),
    "int8 weight with float x (not emulated)": dict(weight=[torch.zeros(3, 4, 5, dtype=torch.int8)]),
    "offset": dict(offset=[torch.zeros(5)]),
    "group_list_type 2": dict(group_list_type=2),
}


@pytest.mark.parametrize("case", sorted(GMM_REJECTED))
def test_grouped_matmul_rejects(case):
    a = dict(x=[torch.zeros(6, 4)], weight=[torch.zeros(3, 4, 5)], group_list=torch.tensor([2, 4, 6]),
             split_item=2, group_type=0, group_list_type=0)
    a.update(GMM_REJECTED[case])
    with pytest.raises(NpuOpError, match="npu_grouped_matmul"):
        emu.npu_grouped_matmul(a.pop("x"), a.pop("weight"), **a)


def test_swiglu():
    x = torch.randn(5, 2, 12, generator=gen(9))
    a, b = x.chunk(2, -1)
    assert torch.allclose(emu.npu_swiglu(x), F.silu(a) * b, atol=1e-6)
    a, b = x[:4].chunk(2, 0)
    assert torch.allclose(emu.npu_swiglu(x[:4], dim=0), F.silu(a) * b, atol=1e-6)
    assert emu.npu_swiglu(x.bfloat16()).shape == (5, 2, 6)                  # meta: split dim halves
    with pytest.raises(NpuOpError, match="npu_swiglu"):
        emu.npu_swiglu(torch.zeros(3, 5))


def test_moe_token_unpermute_doc_examples():
    permuted = torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4], [1, 1], [2, 2], [3, 3], [4, 4]], dtype=torch.float16)
    sorted_indices = torch.tensor([0, 4, 5, 1, 2, 6, 7, 3], dtype=torch.int32)
    probs = torch.ones((4, 2), dtype=torch.float16) / 2
    out = emu.npu_moe_token_unpermute(permuted, sorted_indices, probs=probs)
    assert out.dtype == torch.float16
    assert out.tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]]
    out = emu.npu_moe_token_unpermute(permuted[:4], torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    assert out.tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]]


def test_moe_token_unpermute_random_and_rejects():
    g = gen(11)
    T, K, H = 5, 3, 4
    perm = torch.randn(T * K, H, generator=g)
    s = torch.randperm(T * K, generator=g).int()
    p = torch.rand(T, K, generator=g)
    out = emu.npu_moe_token_unpermute(perm, s, probs=p)
    ref = torch.stack([sum(perm[s[i * K + j]] * p[i, j] for j in range(K)) for i in range(T)])
    assert torch.allclose(out, ref, atol=1e-6)
    bad = {"repeated index": dict(sorted_indices=torch.zeros(T * K, dtype=torch.int32)),
           "out of range": dict(sorted_indices=s + 1),
           "int64": dict(sorted_indices=s.long()),
           "padded_mode": dict(padded_mode=True),
           "topk 513": dict(permuted_tokens=torch.zeros(513, H), sorted_indices=torch.arange(513, dtype=torch.int32),
                            probs=torch.ones(1, 513))}
    for case, over in bad.items():
        a = dict(permuted_tokens=perm, sorted_indices=s, probs=p)
        a.update(over)
        with pytest.raises(NpuOpError, match="npu_moe_token_unpermute"):
            emu.npu_moe_token_unpermute(**a)


# ---- npu_rms_norm / npu_rotary_mul ----------------------------------------------------------------

def test_rms_norm_doc_example_shape_and_formula():
    g = gen(12)
    x, w = torch.randn(24, 1, 128, generator=g), torch.randn(128, generator=g)
    y, rstd = emu.npu_rms_norm(x, w, epsilon=1e-5)
    assert y.shape == x.shape and rstd.shape == (24, 1, 1) and rstd.dtype == torch.float32   # meta
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert torch.allclose(y.double(), ref, atol=1e-5)
    for bad in (dict(gamma=w.half()), dict(self=torch.zeros(128), gamma=w), dict(gamma=torch.zeros(64))):
        a = dict(self=x, gamma=w)
        a.update(bad)
        with pytest.raises(NpuOpError, match="npu_rms_norm"):
            emu.npu_rms_norm(a["self"], a["gamma"])


@pytest.mark.parametrize("mode", ["half", "interleave"])
def test_rotary_mul_against_complex_rotation(mode):
    g = gen(13)
    S, B, N, D = 5, 1, 3, 16
    x = torch.randn(S, B, N, D, generator=g)                          # SBND, r1/r2 S11D
    ang = torch.rand(S, 1, 1, D // 2, generator=g) * 6
    rep = (lambda t: t.repeat_interleave(2, -1)) if mode == "interleave" else (lambda t: torch.cat([t, t], -1))
    y = emu.npu_rotary_mul(x, rep(ang.cos()), rep(ang.sin()), rotary_mode=mode)
    xd = x.double()
    if mode == "interleave":
        z = torch.view_as_complex(xd.view(S, B, N, D // 2, 2).contiguous())
        ref = torch.view_as_real(z * torch.polar(torch.ones_like(ang.double()), ang.double())).flatten(-2)
    else:
        z = torch.complex(xd[..., :D // 2], xd[..., D // 2:]) * torch.polar(torch.ones_like(ang.double()), ang.double())
        ref = torch.cat([z.real, z.imag], -1)
    assert torch.allclose(y.double(), ref, atol=1e-5)


def test_interleave_rope_against_complex_rotation():
    """The doc's formula: pairs (2i, 2i+1) split into halves, rotated in rotate-half form with
    cos/sin [B, 1, S, 64] holding each half-angle twice; the output keeps the half layout. Here:
    pair i as the complex number x[2i] + j x[2i+1] times e^(j angle_i), real part -> out[i],
    imaginary part -> out[32 + i]; cos/sin with S = 1 broadcast over x's S."""
    g = gen(14)
    for dtype, S, cos_s in ((torch.bfloat16, 1, 1), (torch.float16, 3, 3), (torch.bfloat16, 3, 1)):
        B, N, D = 4, 5, 64
        x = torch.randn(B, N, S, D, generator=g).to(dtype)
        ang = torch.rand(B, 1, cos_s, D // 2, generator=g, dtype=torch.float64) * 6
        cos, sin = ang.cos().repeat(1, 1, 1, 2).to(dtype), ang.sin().repeat(1, 1, 1, 2).to(dtype)
        y = emu.npu_interleave_rope(x, cos, sin)
        assert y.shape == x.shape and y.dtype == dtype
        z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
        rot = z * torch.complex(cos[..., :32].double(), sin[..., :32].double())     # the rounded tables
        want = torch.cat([rot.real, rot.imag], -1)
        assert float((y.double() - want).abs().max()) <= 1e-2 * float(want.abs().max())


def test_interleave_rope_doc_example_shapes_and_rejects():
    x, c = torch.randn(32, 32, 1, 64).half(), torch.randn(32, 1, 1, 64).half()
    assert emu.npu_interleave_rope(x, c, c).shape == (32, 32, 1, 64)
    bad = {"D 32": dict(x=x[..., :32].contiguous(), cos=c[..., :32].contiguous(), sin=c[..., :32].contiguous()),
           "cos N 2": dict(cos=torch.zeros(32, 2, 1, 64).half(), sin=torch.zeros(32, 2, 1, 64).half()),
           "cos B 1": dict(cos=c[:1], sin=c[:1]),
           "float32 on A2/A3": dict(x=x.float(), cos=c.float(), sin=c.float()),
           "cos dtype": dict(cos=c.bfloat16(), sin=c.bfloat16()),
           "sin shape": dict(sin=torch.zeros(16, 1, 1, 64).half()),
           "non-contiguous x": dict(x=torch.randn(32, 32, 1, 128).half()[..., ::2]),
           "3-D x": dict(x=x[:, :, 0])}
    for case, over in bad.items():
        a = dict(x=x, cos=c, sin=c)
        a.update(over)
        with pytest.raises(NpuOpError, match="npu_interleave_rope"):
            emu.npu_interleave_rope(**a)
    assert emu32.npu_interleave_rope(x.float(), c.float(), c.float()).dtype == torch.float32   # allow_float32


def test_rotary_mul_rotate_matrix_only_from_26_0_0():
    x, r = torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 1, 8)
    with pytest.raises(NpuOpError, match="rotate is in the schema from the 26.0.0 line"):
        NpuEmulator(cann="8.5.0").npu_rotary_mul(x, r, r, rotate=torch.eye(8))
    assert NpuEmulator(cann="9.0.0").npu_rotary_mul(x, r, r, rotate=torch.eye(8)).shape == x.shape


def test_rotary_mul_rejects():
    x, r = torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 1, 8)
    for a in (dict(input=x[0], r1=r[0], r2=r[0]), dict(input=torch.zeros(2, 1, 3, 7), r1=r[..., :7], r2=r[..., :7]),
              dict(input=x, r1=r + 2, r2=r), dict(input=x, r1=torch.zeros(2, 1, 3, 8), r2=torch.zeros(2, 1, 3, 8),
                                                  rotary_mode="interleave"),
              dict(input=x, r1=r, r2=r, rotary_mode="full")):
        with pytest.raises(NpuOpError, match="npu_rotary_mul"):
            emu.npu_rotary_mul(**a)


# ---- the int8 (W8A8) ops: npu_dynamic_quant, npu_quantize, npu_quant_matmul, quantised routing / GMM ----
# Independent formulations in numpy: float32 where the docs put the scale arithmetic in float32 (so
# codes and scales must agree exactly: IEEE division is the same in numpy and torch), float64 / int64
# for the matmul products. np.rint / np.round round half to even.

def np32(t):
    return t.float().numpy()


def int8_rows_numpy(x32):
    """Per-row symmetric int8 of float32 rows: (codes, scale = rowmax|x| / 127); a zero row -> 0, 0."""
    scale = (np.abs(x32).max(-1) if x32.shape[-1] else np.zeros(x32.shape[:-1], np.float32)) / np.float32(127)
    safe = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    return np.clip(np.rint(x32 / safe[..., None]), -128, 127).astype(np.int8), scale.astype(np.float32)


def with_special_rows(x):
    """x [..., K] with row 0 all zeros and row 1 one large outlier (the rows the quantisers must get right)."""
    x = x.clone()
    flat = x.view(-1, x.shape[-1])
    if flat.shape[0] > 1:
        flat[0] = 0
        flat[1, -1] = 50 * float(flat[1].abs().max())
    return x


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (7, 33)), (torch.float16, (3, 4, 129)),
                                         (torch.float32, (5, 1)), (torch.bfloat16, (0, 16)),
                                         (torch.float16, (1, 8))])
def test_dynamic_quant_per_token_against_numpy(dtype, shape):
    e = emu32 if dtype == torch.float32 else emu
    x = with_special_rows((torch.randn(*shape, generator=gen(40)) * 3).to(dtype))
    y, s = e.npu_dynamic_quant(x)
    assert y.dtype == torch.int8 and y.shape == x.shape and s.dtype == torch.float32 and s.shape == x.shape[:-1]
    want_y, want_s = int8_rows_numpy(np32(x))
    assert np.array_equal(y.numpy(), want_y) and np.array_equal(s.numpy(), want_s)
    flat, fs = y.view(-1, shape[-1]), s.view(-1)
    if flat.shape[0]:
        nz = fs > 0                                       # symmetric: the row max maps to +-127, never -128
        assert bool((flat[nz].abs().amax(-1) == 127).all()) and int(flat.min()) >= -127
        if flat.shape[0] > 1:
            assert float(fs[0]) == 0 and bool((flat[0] == 0).all())


def test_dynamic_quant_smooth_scales_and_groups():
    g = gen(41)
    x = torch.randn(9, 24, generator=g).bfloat16()
    sm = (torch.rand(24, generator=g) + 0.5).bfloat16()
    y, s = emu.npu_dynamic_quant(x, smooth_scales=sm)
    want_y, want_s = int8_rows_numpy(np32(x) * np32(sm))
    assert np.array_equal(y.numpy(), want_y) and np.array_equal(s.numpy(), want_s)
    groups = (torch.rand(3, 24, generator=g) + 0.5).bfloat16()           # rows 0-1, (none), 2-8
    idx = torch.tensor([2, 2, 9], dtype=torch.int32)
    y, s = emu.npu_dynamic_quant(x, smooth_scales=groups, group_index=idx)
    per_row = np.concatenate([np32(groups[[0]]).repeat(2, 0), np32(groups[[2]]).repeat(7, 0)])
    want_y, want_s = int8_rows_numpy(np32(x) * per_row)
    assert np.array_equal(y.numpy(), want_y) and np.array_equal(s.numpy(), want_s)


DQ_REJECTED = {
    "float32 input (documented float16/bfloat16)": dict(input=torch.ones(2, 8)),
    "1-D input": dict(input=torch.ones(8, dtype=torch.bfloat16)),
    "dst_type float8 (950 only)": dict(dst_type=torch.float8_e4m3fn),
    "dst_type quint4x2 (not emulated)": dict(dst_type=torch.quint4x2),
    "quant_mode pertensor (950 only)": dict(quant_mode="pertensor"),
    "dst_type_max": dict(dst_type_max=127.0),
    "smooth_scales of another dtype": dict(smooth_scales=torch.ones(8)),
    "smooth_scales length": dict(smooth_scales=torch.ones(7, dtype=torch.bfloat16)),
    "group_index without smooth_scales": dict(group_index=torch.tensor([2], dtype=torch.int32)),
    "group_index short of the rows": dict(smooth_scales=torch.ones(2, 8, dtype=torch.bfloat16),
                                          group_index=torch.tensor([1, 1], dtype=torch.int32)),
    "group_index decreasing": dict(smooth_scales=torch.ones(2, 8, dtype=torch.bfloat16),
                                   group_index=torch.tensor([2, 1], dtype=torch.int32)),
    "group_index int64": dict(smooth_scales=torch.ones(1, 8, dtype=torch.bfloat16),
                              group_index=torch.tensor([2])),
}


@pytest.mark.parametrize("case", sorted(DQ_REJECTED))
def test_dynamic_quant_rejects(case):
    a = dict(input=torch.ones(2, 8, dtype=torch.bfloat16))
    a.update(DQ_REJECTED[case])
    with pytest.raises(NpuOpError, match="npu_dynamic_quant"):
        emu.npu_dynamic_quant(a.pop("input"), **a)


@pytest.mark.parametrize("div_mode", [True, False])
def test_quantize_against_numpy_with_saturation(div_mode):
    g = gen(42)
    x = torch.randn(6, 13, generator=g) * 40
    x[0, :4] = torch.tensor([1e4, -1e4, 127.5, -128.5])             # saturate; .5 ties round to even
    if div_mode:
        sc, zp = torch.tensor([0.75]), torch.tensor([3], dtype=torch.int8)
        want = np.rint(np32(x) / np.float32(0.75) + np.float32(3))
        got = emu.npu_quantize(x, sc, zp, torch.qint8, -1, True)
    else:
        sc, zp = torch.tensor([1 / 0.75]), torch.tensor([3.0])
        want = np.rint(np32(x) * np.float32(1 / 0.75) + np.float32(3))
        got = emu.npu_quantize(x, sc, zp, torch.qint8, -1, False)
    want = np.clip(want, -128, 127).astype(np.int8)
    assert got.dtype == torch.int8 and np.array_equal(got.numpy(), want)
    assert got[0, 0] == 127 and got[0, 1] == -128
    # per-channel scales along the last axis, bfloat16 input, quint8 output (range 0..255), empty input
    chan = torch.rand(13, generator=g) + 0.5
    xb = x.bfloat16()
    u8 = emu.npu_quantize(xb, chan, torch.full((13,), 100, dtype=torch.int32), torch.quint8, -1, True)
    want = np.clip(np.rint(np32(xb) / np32(chan) + np.float32(100)), 0, 255).astype(np.uint8)
    assert u8.dtype == torch.uint8 and np.array_equal(u8.numpy(), want)
    assert emu.npu_quantize(torch.zeros(0, 13), sc, None, torch.qint8, -1, div_mode).shape == (0, 13)


QZ_REJECTED = {
    "div_mode=False, scales of another dtype": dict(x=torch.ones(2, 4, dtype=torch.bfloat16), div_mode=False),
    "div_mode=False, quint8": dict(dtype=torch.quint8, div_mode=False),
    "div_mode=False, quint4x2 (not emulated)": dict(dtype=torch.quint4x2, div_mode=False),
    "div_mode=True, int8 dtype": dict(dtype=torch.int8),
    "div_mode=True, float16 scales": dict(scales=torch.ones(1, dtype=torch.float16)),
    "div_mode=True, int64 zero points": dict(zero_points=torch.zeros(1, dtype=torch.int64)),
    "axis out of range": dict(axis=2),
    "scales length": dict(scales=torch.ones(3)),
    "int8 input": dict(x=torch.ones(2, 4, dtype=torch.int8)),
}


@pytest.mark.parametrize("case", sorted(QZ_REJECTED))
def test_quantize_rejects(case):
    a = dict(x=torch.ones(2, 4), scales=torch.ones(1), zero_points=None, dtype=torch.qint8, axis=-1, div_mode=True)
    a.update(QZ_REJECTED[case])
    with pytest.raises(NpuOpError, match="npu_quantize"):
        emu.npu_quantize(a.pop("x"), a.pop("scales"), a.pop("zero_points"), a.pop("dtype"), **a)


def qmm_numpy(x1, x2, scale, pertoken=None, bias=None, offset=None):
    """The doc's formula in float64 / int64: int32 bias before the scales, float bias after."""
    acc = np.matmul(x1.numpy().astype(np.int64), x2.numpy().astype(np.int64))
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.numpy().astype(np.int64)
    y = acc.astype(np.float64) * scale.double().numpy()
    if pertoken is not None:
        y = y * pertoken.double().numpy()[:, None]
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.double().numpy()
    if offset is not None:
        y = y + offset.double().numpy()
    return y


def i8(g, *shape):
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


# one ulp relative to the value (2^-mantissa bits) of each output dtype; float32: 2^-21 = 8 float32
# ulps, room for the three float32 steps (scale, per-token scale, float bias) of the ops
ULP = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -21}


@pytest.mark.parametrize("case", ["pertoken bf16", "pertoken fp16 + float bias", "int32 bias fp16",
                                  "int32 bias + pertoken bf16", "bf16 scale", "batched 3-D bias",
                                  "float32 (emulator)"])
def test_quant_matmul_against_numpy(case):
    g = gen(43)
    M, K, N = (1, 33, 7) if "fp16" in case else (5, 64, 9)
    x1, w = i8(g, M, K), i8(g, N, K)
    x2 = w.t()                                                    # a transposed view, as the backend passes
    scale = torch.rand(N, generator=g) * 1e-3
    pt = torch.rand(M, generator=g) * 0.1
    kw, e, out = {}, emu, torch.bfloat16
    if case == "pertoken bf16":
        kw = dict(pertoken_scale=pt)
    elif case == "pertoken fp16 + float bias":
        kw, out = dict(pertoken_scale=pt, bias=torch.randn(N, generator=g).bfloat16()), torch.float16
    elif case == "int32 bias fp16":
        kw, out = dict(bias=torch.randint(-5000, 5000, (N,), generator=g, dtype=torch.int32)), torch.float16
    elif case == "int32 bias + pertoken bf16":
        kw = dict(pertoken_scale=pt, bias=torch.randint(-5000, 5000, (N,), generator=g, dtype=torch.int32))
    elif case == "bf16 scale":
        scale = scale.bfloat16()
    elif case == "batched 3-D bias":
        x1, x2 = i8(g, 3, M, K), i8(g, K, N)
        kw = dict(bias=torch.randint(-99, 99, (3, 1, N), generator=g, dtype=torch.int32))
    else:
        e, out, kw = emu32, torch.float32, dict(pertoken_scale=pt)
    y = e.npu_quant_matmul(x1, x2, scale, output_dtype=out, **kw)
    want = qmm_numpy(x1, x2, scale, kw.get("pertoken_scale"), kw.get("bias"))
    assert y.dtype == out and y.shape == want.shape
    # float32 steps (a few 2^-24) and one rounding to the output dtype (half an ulp): under one ulp of
    # the output dtype, relative to the magnitude of the terms added (a float bias can cancel)
    fb = kw["bias"].double().numpy() if "bias" in kw and kw["bias"].dtype != torch.int32 else 0.0
    mag = np.abs(want - fb) + np.abs(fb)
    assert np.all(np.abs(y.double().numpy() - want) <= ULP[out] * mag)


def test_quant_matmul_int8_output_offset_and_saturation():
    """int8 output: round((x1 @ x2 + bias) * scale + offset), saturated; power-of-two scales keep
    every step exact, so the codes must equal the formula's exactly."""
    g = gen(44)
    x1, x2 = i8(g, 6, 40), i8(g, 40, 5)
    scale = torch.tensor([2.0 ** -8, 2.0 ** -10, 2.0 ** -6, 1.0, 2.0 ** -12])
    offset = torch.tensor([3.0, -2.0, 0.5, 0.0, 1.5])
    bias = torch.randint(-300, 300, (5,), generator=g, dtype=torch.int32)
    y = emu.npu_quant_matmul(x1, x2, scale, offset=offset, bias=bias)           # output_dtype None: int8
    want = np.clip(np.rint(qmm_numpy(x1, x2, scale, bias=bias, offset=offset)), -128, 127).astype(np.int8)
    assert y.dtype == torch.int8 and np.array_equal(y.numpy(), want)
    assert int(y[:, 3].max()) == 127 and int(y[:, 3].min()) == -128          # scale 1: saturated


QMM_REJECTED = {
    "empty x1 (zero rows)": dict(x1=torch.zeros(0, 8, dtype=torch.int8), pertoken_scale=torch.ones(0)),
    "int4 in int32 (not emulated)": dict(x1=torch.zeros(3, 1, dtype=torch.int32),
                                         x2=torch.zeros(8, 1, dtype=torch.int32)),
    "float x1": dict(x1=torch.zeros(3, 8)),
    "1-D x1": dict(x1=torch.zeros(8, dtype=torch.int8), pertoken_scale=None),
    "7-D x1": dict(x1=torch.zeros(1, 1, 1, 1, 1, 3, 8, dtype=torch.int8)),
    "K mismatch": dict(x2=torch.zeros(9, 5, dtype=torch.int8)),
    "last dim 65536": dict(x2=torch.zeros(8, 65536, dtype=torch.int8), scale=torch.ones(65536)),
    "2-D scale (int4 only)": dict(scale=torch.ones(1, 5)),
    "scale length": dict(scale=torch.ones(4)),
    "float16 scale": dict(scale=torch.ones(5, dtype=torch.float16)),
    "int64 scale with bfloat16 output (not in 表 2)": dict(scale=torch.ones(5, dtype=torch.int64)),
    "int64 scale with a per-token scale, float16 output": dict(scale=torch.ones(5, dtype=torch.int64),
                                                              output_dtype=torch.float16),
    "offset with bfloat16 output": dict(offset=torch.zeros(5)),
    "pertoken with int8 output": dict(output_dtype=torch.int8),
    "pertoken length": dict(pertoken_scale=torch.ones(4)),
    "pertoken float16": dict(pertoken_scale=torch.ones(3, dtype=torch.float16)),
    "float16 bias with float16 output (not in 表 2)": dict(output_dtype=torch.float16,
                                                          bias=torch.zeros(5, dtype=torch.float16)),
    "bfloat16 scale with float16 output": dict(output_dtype=torch.float16, scale=torch.ones(5, dtype=torch.bfloat16)),
    "float bias without pertoken, float16 output": dict(output_dtype=torch.float16, pertoken_scale=None,
                                                       bias=torch.zeros(5)),
    "bias shape": dict(bias=torch.zeros(4, dtype=torch.int32)),
    "int64 bias": dict(bias=torch.zeros(5, dtype=torch.int64)),
    "float32 output (documented: int8/float16/bfloat16/int32)": dict(output_dtype=torch.float32),
    "int32 output (not emulated)": dict(output_dtype=torch.int32, pertoken_scale=None),
    "group_sizes (not emulated)": dict(group_sizes=[1, 1, 8]),
}


@pytest.mark.parametrize("case", sorted(QMM_REJECTED))
def test_quant_matmul_rejects(case):
    a = dict(x1=torch.zeros(3, 8, dtype=torch.int8), x2=torch.zeros(8, 5, dtype=torch.int8), scale=torch.ones(5),
             pertoken_scale=torch.ones(3), output_dtype=torch.bfloat16)
    a.update(QMM_REJECTED[case])
    with pytest.raises(NpuOpError, match="npu_quant_matmul"):
        emu.npu_quant_matmul(a.pop("x1"), a.pop("x2"), a.pop("scale"), **a)


@pytest.mark.parametrize("smooth", [None, "per-expert", "shared"])
def test_moe_init_routing_v2_dynamic_quant_against_numpy(smooth):
    """quant_mode=1: the expanded rows (expert-sorted, stable) quantised per row as the doc's numpy
    golden does (float32, times the row's expert smooth scale when given, rowmax / 127, np.round);
    ids outside the range sort last with no row; a token of zeros gets scale 0 and codes 0."""
    g = gen(45)
    T, H, K, E = 7, 19, 3, 6
    x = (torch.randn(T, H, generator=g) * 2).bfloat16()
    x[2] = 0
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    ids[4, 1] = -1                                                     # below the range: no row
    scale = None if smooth is None else (torch.rand(E if smooth == "per-expert" else 1, H, generator=g) + 0.5)
    ex, row, counts, ex_scale = emu.npu_moe_init_routing_v2(
        x, ids, scale=scale, active_num=T * K, expert_num=E, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, quant_mode=1, row_idx_type=0)
    flat = ids.flatten().tolist()
    order = [i for i in sorted(range(T * K), key=lambda i: (flat[i], i)) if flat[i] >= 0]
    n = len(order)
    rows = np32(x)[[i // K for i in order]]
    if scale is not None:
        rows = rows * (np32(scale)[[flat[i] for i in order]] if smooth == "per-expert" else np32(scale))
    want_x, want_s = int8_rows_numpy(rows.astype(np.float32))
    assert ex.dtype == torch.int8 and ex.shape == (T * K, H) and ex_scale.shape == (T * K,)
    assert np.array_equal(ex[:n].numpy(), want_x) and np.array_equal(ex_scale[:n].numpy(), want_s)
    assert bool((ex[n:] == 0).all()) and bool((ex_scale[n:] == 0).all())   # unspecified rows: 0 here
    assert [int(row[i]) for i in order] == list(range(n)) and int(row[4 * K + 1]) == -1
    assert counts.tolist() == np.bincount([flat[i] for i in order], minlength=E).tolist()
    zero_rows = [j for j, i in enumerate(order) if i // K == 2]
    assert zero_rows and all(float(ex_scale[j]) == 0 and not ex[j].any() for j in zero_rows)


@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["3-D transposed, counts", "weight list, cumsum"])
def test_grouped_matmul_int8_against_numpy(out, layout):
    """int8 x int8 grouped along M with per-channel and per-token scales (公式3 without bias):
    scale bfloat16 -> bfloat16 output, scale float32 -> float16 (float32: the emulator's convenience);
    empty groups and odd sizes included."""
    g = gen(46 + (out == torch.float16))
    sizes, K, N = [3, 0, 6, 1, 0, 5], 37, 11
    M, E = sum(sizes), len(sizes)
    x = i8(g, M, K)
    w = i8(g, E, K, N)
    sc = torch.rand(E, N, generator=g) * 1e-2
    sc = sc.bfloat16() if out == torch.bfloat16 else sc
    pt = torch.rand(M, generator=g)
    if layout.startswith("3-D"):
        weight, scale = [w.transpose(1, 2).contiguous().transpose(1, 2)], [sc]
        gl, gl_type = torch.tensor(sizes), 1
    else:
        weight, scale = list(w), list(sc)
        gl, gl_type = torch.tensor(np.cumsum(sizes)), 0
    e = emu32 if out == torch.float32 else emu
    y = e.npu_grouped_matmul([x], weight, scale=scale, per_token_scale=[pt], group_list=gl, split_item=2,
                             group_type=0, group_list_type=gl_type, output_dtype=out)[0]
    starts = np.cumsum([0] + sizes[:-1])
    want = np.concatenate([(x[s:s + n].numpy().astype(np.int64) @ w[i].numpy().astype(np.int64)) *
                           sc[i].double().numpy()[None] * pt[s:s + n].double().numpy()[:, None]
                           for i, (s, n) in enumerate(zip(starts, sizes))])
    assert y.dtype == out and y.shape == (M, N)
    assert np.all(np.abs(y.double().numpy() - want) <= ULP[out] * np.abs(want))


GMM_INT8_REJECTED = {
    "float32 scale with bfloat16 output (表 2)": dict(output_dtype=torch.bfloat16),
    "bfloat16 scale with float16 output (表 2)": dict(scale=[torch.ones(3, 5, dtype=torch.bfloat16)]),
    "output_dtype None (int8 output needs int64 scale)": dict(output_dtype=None),
    "float32 output (documented: float16/bfloat16/int8)": dict(output_dtype=torch.float32),
    "no scale": dict(scale=None),
    "scale shape": dict(scale=[torch.ones(3, 4)]),
    "float16 scale": dict(scale=[torch.ones(3, 5, dtype=torch.float16)]),
    "int64 scale (not emulated)": dict(scale=[torch.ones(3, 5, dtype=torch.int64)]),
    "per_token_scale length": dict(per_token_scale=[torch.ones(5)]),
    "per_token_scale bfloat16": dict(per_token_scale=[torch.ones(6, dtype=torch.bfloat16)]),
    "bias (not emulated)": dict(bias=[torch.zeros(3, 5, dtype=torch.int32)]),
    "act_type silu (not emulated)": dict(act_type=5),
    "group_list_type 2 (not emulated)": dict(group_list_type=2),
    "group_type -1 (not emulated)": dict(group_type=-1, group_list=None, split_item=0),
    "float weights": dict(weight=[torch.zeros(3, 4, 5)]),
    "int4 weights in int32 (not emulated)": dict(weight=[torch.zeros(3, 4, 1, dtype=torch.int32)]),
    "scale_dtype (950 only)": dict(scale_dtype=torch.float32),
    "counts do not sum to M": dict(group_list=torch.tensor([1, 1, 1]), group_list_type=1),
    "transposed x": dict(x=[torch.zeros(4, 6, dtype=torch.int8).t()]),
}


@pytest.mark.parametrize("case", sorted(GMM_INT8_REJECTED))
def test_grouped_matmul_int8_rejects(case):
    a = dict(x=[torch.zeros(6, 4, dtype=torch.int8)], weight=[torch.zeros(3, 4, 5, dtype=torch.int8)],
             scale=[torch.ones(3, 5)], per_token_scale=[torch.ones(6)], group_list=torch.tensor([2, 4, 6]),
             split_item=2, group_type=0, group_list_type=0, output_dtype=torch.float16)
    a.update(GMM_INT8_REJECTED[case])
    with pytest.raises(NpuOpError, match="npu_grouped_matmul"):
        emu.npu_grouped_matmul(a.pop("x"), a.pop("weight"), **a)


# ---- npu_trans_quant_param, int64 scales, npu_format_cast ---------------------------------------------------
def _f32(bits: int) -> torch.Tensor:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)


def test_trans_quant_param_encodes_as_its_page_shows():
    """功能说明: out = (bits(scale) & 0xFFFFE000) | 1 << 46, the offset's 9 bits at 37-45. The page's own
    example outputs decode as scale 0x3F85E000 with offset 1 and scale 0x3E326000 with offset -2."""
    from glm52_backends.backends.ascend.emulator import trans_quant_scale
    emu = NpuEmulator()
    assert emu.npu_trans_quant_param(_f32(0x3F85E000), _f32(0x3F800000)).tolist() == [70507248869376]
    assert emu.npu_trans_quant_param(_f32(0x3E326000), torch.tensor([-2.0])).tolist() == [140463653937152]
    s = torch.randn(37, generator=gen(90)) * 1e-3
    enc = emu.npu_trans_quant_param(s)
    assert enc.dtype == torch.int64 and enc.shape == (37,)                                  # meta: scale's shape
    kept = trans_quant_scale(enc)
    assert torch.equal(kept.view(torch.int32) & 0x1FFF, torch.zeros(37, dtype=torch.int32))   # 19 bits kept
    assert ((kept - s).abs() <= s.abs() * 2 ** -10).all() and ((kept.abs() <= s.abs())).all()   # truncation
    with pytest.raises(NpuOpError, match="round_mode=1"):
        emu.npu_trans_quant_param(s, round_mode=1)
    with pytest.raises(NpuOpError, match="only \\(1, \\) and \\(1, n\\)"):
        emu.npu_trans_quant_param(s.reshape(1, 37).expand(2, 37).contiguous())


def test_quant_matmul_takes_the_int64_scale_for_float16_output():
    emu = NpuEmulator(allow_float32=False)
    g = gen(91)
    x1 = torch.randint(-128, 128, (5, 24), generator=g, dtype=torch.int8)
    x2 = torch.randint(-128, 128, (24, 7), generator=g, dtype=torch.int8)
    s = torch.rand(7, generator=g) * 1e-3
    enc = emu.npu_trans_quant_param(s)
    from glm52_backends.backends.ascend.emulator import trans_quant_scale
    want = (x1.double() @ x2.double() * trans_quant_scale(enc).double()).to(torch.float16)
    assert torch.equal(emu.npu_quant_matmul(x1, x2, enc, output_dtype=torch.float16), want)
    with pytest.raises(NpuOpError, match="unsupported combination"):          # bfloat16 output: no int64 scale
        emu.npu_quant_matmul(x1, x2, enc, output_dtype=torch.bfloat16)


def test_format_cast_to_nz_is_checked_where_the_weight_goes():
    """A FRACTAL_NZ operand: the weight operand only, as cast ([.., k, n] contiguous); a view of it with
    other strides, or an NZ activation, is refused; the values are the cast tensor's."""
    emu = NpuEmulator(allow_float32=False)
    g = gen(92)
    x1 = torch.randint(-128, 128, (5, 24), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (7, 24), generator=g, dtype=torch.int8)             # [n, k] as stored
    nz = emu.npu_format_cast(w.t().contiguous(), 29)
    assert emu.get_npu_format(nz) == 29 and emu.get_npu_format(w) == 2 and torch.equal(nz, w.t())
    s = torch.rand(7, generator=g)
    y = emu.npu_quant_matmul(x1, nz, s, output_dtype=torch.bfloat16)
    assert torch.equal(y, emu.npu_quant_matmul(x1, w.t(), s, output_dtype=torch.bfloat16))
    with pytest.raises(NpuOpError, match="x2 is a view .* of a FRACTAL_NZ tensor"):
        emu.npu_quant_matmul(x1[:, :7].contiguous(), nz.t(), torch.rand(24, generator=g), output_dtype=torch.bfloat16)
    with pytest.raises(NpuOpError, match="x1 is in FRACTAL_NZ"):
        emu.npu_quant_matmul(emu.npu_format_cast(x1, 29), nz, s, output_dtype=torch.bfloat16)
    with pytest.raises(NpuOpError, match="contiguous tensor"):
        emu.npu_format_cast(w.t(), 29)
