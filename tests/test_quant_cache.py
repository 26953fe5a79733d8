"""Quantized paged caches (glm52_backends/cache_formats.py): byte layouts, quantization error,
the reference ops reading them, rollback, the model generating with them, the memory they hold.

Independent formulas here: e4m3 bit patterns from `math.frexp`, f32/f16/bf16 bytes from `struct`,
the Hadamard matrix from popcount, scales from Python floats."""

from __future__ import annotations

import math
import struct
import warnings

import pytest
import torch

from glm52_backends import GLM52
from glm52_backends import cache_formats as cf
from glm52_backends.cache import PagedCache
from glm52_backends.config import GLM52_CONFIG
from glm52_backends.deploy import load_deployment
from glm52_backends.ops import REFERENCES, Capabilities, OP_NAMES
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
from glm52_backends.tiny import tiny_config

from conftest import cache_state, same_cache_state  # noqa: E402

F64, F32 = torch.float64, torch.float32
R_MLA, R_TOPK = REFERENCES["sparse_mla"], REFERENCES["indexer_topk"]
LATENT_Q = ("fp8_ds_mla", "c8_sfa")
INDEX_Q = ("fp8", "c8_li")
NB = 12            # blocks of 4 in the op tests: 9 used, 3 never handed out


def e4m3_bits(v: float) -> int:
    """float8_e4m3fn bit pattern of an exactly representable normal number or zero (bias 7)."""
    if v == 0:
        return 0
    sign = 0x80 if v < 0 else 0
    m, e = math.frexp(abs(v))            # v = m * 2^e, 0.5 <= m < 1
    mant = (m * 2 - 1) * 8               # 1.mmm
    assert mant == int(mant) and 1 <= e - 1 + 7 <= 15, v
    return sign | ((e - 1 + 7) << 3) | int(mant)


def f32_bytes(v: float) -> bytes:
    return struct.pack("<f", v)


def bf16_bytes(v: float) -> bytes:          # v exactly representable in bf16: the top half of its f32
    return struct.pack("<f", v)[2:]


def f16_bytes(v: float) -> bytes:
    return struct.pack("<e", v)


def _cfg(**kw):
    base = dict(layers=2, kv_lora_rank=160, qk_rope_head_dim=8, index_head_dim=32)   # 160: a partial 128-group
    base.update(kw)
    return tiny_config(**base)[0]


# ---- sizes ------------------------------------------------------------------------------------------------
def test_bytes_per_token_of_glm52():
    g = GLM52_CONFIG
    want = {("latent", "dense"): 1152, ("latent", "fp8_ds_mla"): 656, ("latent", "c8_sfa"): 656,
            ("index", "dense"): 256, ("index", "fp8"): 132, ("index", "c8_li"): 130}
    for (kind, fmt), n in want.items():
        assert cf.bytes_per_token(fmt, g, kind=kind) == n, (kind, fmt)
    assert cf.bytes_per_token("dense", g, kind="latent", dtype=torch.float32) == 2304
    with pytest.raises(ValueError, match="dense format needs kind"):
        cf.bytes_per_token("dense", g)
    with pytest.raises(ValueError, match="'fp8' is an index cache format"):
        cf.bytes_per_token("fp8", g, kind="latent")
    with pytest.raises(ValueError, match="unknown cache format 'int4'"):
        cf.bytes_per_token("int4", g)
    # the deployment YAML's names, as the planner reads them
    for kind, name, n in (("latent", "fp8", 656), ("latent", "int8", 656), ("latent", "bf16", 1152),
                          ("latent", "fp32", 2304), ("index", "fp8", 132), ("index", "int8", 130),
                          ("index", "bf16", 256)):
        fmt, dt = cf.format_for(kind, name)
        assert cf.bytes_per_token(fmt, g, kind=kind, dtype=dt) == n, (kind, name)


@pytest.mark.parametrize("lat,idx", [("dense", "dense"), ("fp8_ds_mla", "fp8"), ("c8_sfa", "c8_li"),
                                     ("fp8_ds_mla", "dense"), ("dense", "c8_li")])
def test_cache_holds_bytes_per_token(lat, idx):
    cfg = _cfg(layers=4, mtp=True)
    NB, BS = 3, 4
    cache = PagedCache(cfg, NB, BS, dtype=torch.bfloat16, mtp=True, latent_format=lat, index_format=idx)
    n_lat, n_idx = cfg.num_hidden_layers + 1, len(cfg.full_layers) + 1
    per_token = (n_lat * cf.bytes_per_token(lat, cfg, kind="latent") +
                 n_idx * cf.bytes_per_token(idx, cfg, kind="index"))
    assert cache.nbytes == NB * BS * per_token
    assert cache.bytes_per_token() == {"latent": cf.bytes_per_token(lat, cfg, kind="latent"),
                                       "index": cf.bytes_per_token(idx, cfg, kind="index")}


# ---- byte layouts, byte by byte ---------------------------------------------------------------------------
def _one_token_cache(cfg, lat, idx, BS=4):
    cache = PagedCache(cfg, 3, BS, dtype=torch.float32, latent_format=lat, index_format=idx)
    cache.reserve({"a": BS + 3})                               # blocks 0, 1; position BS+2 -> block 1, offset 2
    return cache, cache.slots("a", BS + 2, BS + 3)


def test_fp8_ds_mla_row_layout():
    C, Dr = 256, 4
    cfg = _cfg(kv_lora_rank=C, qk_rope_head_dim=Dr)
    vals = [3.0, 1.0, -0.5, 0.0, 2.75]                        # group 0: amax 3 -> scale 2^ceil(log2(3/448)) = 2^-7
    c = torch.zeros(1, C)
    c[0, :5] = torch.tensor(vals)                              # group 1 all zeros -> scale floor 1e-4 -> 2^-13
    rope = [1.5, -2.0, 0.0, 0.375]
    k_pe = torch.tensor([rope])
    cache, slot = _one_token_cache(cfg, "fp8_ds_mla", "dense")
    cache.write_latent(0, slot, c, k_pe)
    row = bytes(cache._latent_store[0][0].view(3, 4, -1)[1, 2].tolist())
    assert len(row) == C + 4 * 2 + 2 * Dr == 272
    s0 = 2.0 ** math.ceil(math.log2(3.0 / 448))
    s1 = 2.0 ** math.ceil(math.log2(1e-4))
    assert s0 == 2 ** -7 and s1 == 2 ** -13
    assert list(row[:5]) == [e4m3_bits(v / s0) for v in vals]           # codes at bytes 0..C-1
    assert row[5:C] == bytes(C - 5)
    assert row[C:C + 4] == f32_bytes(s0) and row[C + 4:C + 8] == f32_bytes(s1)   # scales at C..C+7
    assert row[C + 8:] == b"".join(bf16_bytes(v) for v in rope)                   # rope last, bf16
    # the views the ops receive: the codes and the rope of the same rows
    assert cache.c[0].dtype == torch.float8_e4m3fn and cache.c[0].stride()[1:] == (272, 1)
    assert cache.k_pe[0].dtype == torch.bfloat16 and cache.k_pe[0][1, 2].tolist() == rope
    dc, dk = cf.decode_latent("fp8_ds_mla", torch.tensor(list(row), dtype=torch.uint8), C, Dr)
    assert torch.equal(dc, c[0]) and torch.equal(dk, k_pe[0])           # these values are exact in e4m3


def test_c8_sfa_row_layout():
    C, Dr = 256, 4
    cfg = _cfg(kv_lora_rank=C, qk_rope_head_dim=Dr)
    codes = [127, -127, 3, 0, -64]
    c = torch.zeros(1, C)
    c[0, :5] = torch.tensor(codes, dtype=torch.float32) * 0.5          # amax 63.5 -> scale 63.5 / 127 = 0.5
    rope = [0.25, -1.0, 3.0, 0.0]
    cache, slot = _one_token_cache(cfg, "c8_sfa", "dense")
    cache.write_latent(0, slot, c, torch.tensor([rope]))
    row = bytes(cache._latent_store[0][0].view(3, 4, -1)[1, 2].tolist())
    assert len(row) == C + 2 * Dr + 4 * 2 == 272
    assert row[:C] == struct.pack(f"<{C}b", *(codes + [0] * (C - 5)))  # int8 codes first
    assert row[C:C + 2 * Dr] == b"".join(bf16_bytes(v) for v in rope)    # then the rope (before the scales!)
    assert row[C + 2 * Dr:] == f32_bytes(0.5) + f32_bytes(0.0)           # then one f32 scale per 128; zeros -> 0
    assert cache.c[0].dtype == torch.int8 and cache.k_pe[0][1, 2].tolist() == rope


def test_fp8_index_block_layout_values_then_scales():
    Di, BS = 128, 4
    cfg = _cfg(index_head_dim=Di)
    e = [448.0, -1.0, 0.5, 0.0, 2.5]
    k = torch.zeros(1, Di)
    k[0, :5] = torch.tensor(e) * 0.25                         # amax 112 -> scale 112 / 448 = 0.25
    cache, slot = _one_token_cache(cfg, "dense", "fp8", BS)
    l = cfg.full_layers[0]
    cache.write_index(l, slot, k)
    block = bytes(cache._index_store[l][0][1].tolist())        # block 1, offset 2
    assert len(block) == BS * 132
    assert list(block[2 * Di:2 * Di + 5]) == [e4m3_bits(v) for v in e]  # all BS code rows first
    assert block[2 * Di + 5:3 * Di] == bytes(Di - 5)
    assert block[BS * Di + 2 * 4:BS * Di + 3 * 4] == f32_bytes(0.25)    # then all BS scales
    assert block[:2 * Di] == bytes(2 * Di) and block[BS * Di:BS * Di + 8] == bytes(8)   # neighbours untouched
    assert cache.index_k[l].dtype == torch.float8_e4m3fn and cache.index_k[l].stride() == (BS * 132, Di, 1)


def test_c8_li_block_layout_and_rotation():
    Di, BS = 16, 4
    cfg = _cfg(index_head_dim=Di)
    k = torch.zeros(1, Di)
    k[0, 0] = 63.5               # H e0 / 4 = 63.5 / 4 = 15.875 everywhere -> scale 15.875 / 127 = 0.125, codes 127
    cache, slot = _one_token_cache(cfg, "dense", "c8_li", BS)
    l = cfg.full_layers[0]
    cache.write_index(l, slot, k)
    block = bytes(cache._index_store[l][0][1].tolist())
    assert len(block) == BS * 18
    assert block[2 * Di:3 * Di] == bytes([127] * Di)
    assert block[BS * Di + 2 * 2:BS * Di + 3 * 2] == f16_bytes(0.125)
    assert cache.index_k[l].dtype == torch.int8
    got = cf.read_index(cache.index_k[l], torch.tensor([1]), torch.tensor([2]))
    assert torch.equal(got, k)   # read back un-rotated: the key itself


def test_hadamard_is_the_normalised_sylvester_matrix():
    n = 128
    H = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], dtype=F64) / math.sqrt(n)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cf.hadamard(x).double(), x.double() @ H, rtol=0, atol=1e-5)
    torch.testing.assert_close(cf.hadamard(cf.hadamard(x)), x, rtol=0, atol=1e-5)   # its own inverse
    assert torch.equal(cf.hadamard(x)[2:3], cf.hadamard(x[2:3]))                   # batch-independent
    with pytest.raises(ValueError, match="not a power of two"):
        cf.hadamard(torch.zeros(3, 12))


# ---- round trip and quantization error ---------------------------------------------------------------------
def _data(N, D, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g) * torch.logspace(-3, 2, N)[:, None]   # tokens over five decades
    x[0, 7] = 40.0 * x[0].abs().max()                                        # an outlier
    x[1] = 0.0                                                               # an all-zero token
    return x


def test_fp8_ds_mla_round_trip_and_error():
    C, Dr = 160, 8
    c, kpe = _data(64, C, 1), _data(64, Dr, 2)
    row = cf.encode_latent("fp8_ds_mla", c, kpe)["row"]
    dc, dk = cf.decode_latent("fp8_ds_mla", row, C, Dr)
    assert torch.equal(dk, kpe.to(torch.bfloat16).float())                       # rope: bf16, not quantized
    for g0 in (0, 128):
        grp = c[:, g0:g0 + 128]
        s = [2.0 ** math.ceil(math.log2(max(a / 448, 1e-4))) for a in grp.abs().amax(-1).tolist()]
        got = row[:, C + 4 * (g0 // 128):C + 4 * (g0 // 128) + 4].contiguous().view(F32)[:, 0]
        assert got.tolist() == s                                                  # the power-of-two scales
        st = torch.tensor(s)[:, None]
        err = (grp - dc[:, g0:g0 + 128]).abs()
        bound = torch.maximum(grp.abs() * 2 ** -4, st * 2 ** -10)                # 3 mantissa bits; subnormals
        assert (err <= bound).all()
    assert torch.equal(dc[1], torch.zeros(C))


def test_c8_sfa_round_trip_and_error():
    C, Dr = 160, 8
    c, kpe = _data(64, C, 3), _data(64, Dr, 4)
    row = cf.encode_latent("c8_sfa", c, kpe)["row"]
    dc, dk = cf.decode_latent("c8_sfa", row, C, Dr)
    assert torch.equal(dk, kpe.to(torch.bfloat16).float())
    for g0 in (0, 128):
        grp = c[:, g0:g0 + 128].double()
        s = grp.abs().amax(-1, keepdim=True) / 127
        err = (grp - dc[:, g0:g0 + 128].double()).abs()
        assert (err <= 0.5 * s * (1 + 1e-6)).all()                               # half a code step
    assert torch.equal(dc[1], torch.zeros(C))


def test_fp8_index_round_trip_and_error():
    k = _data(64, 128, 5)
    p = cf.encode_index("fp8", k)
    s = torch.tensor([max(a, 1e-4) / 448 for a in k.abs().amax(-1).tolist()])
    torch.testing.assert_close(p["scales"].contiguous().view(F32)[:, 0], s, rtol=2 ** -23, atol=0)
    dk = cf.decode_index("fp8", p["values"], p["scales"])
    assert ((k - dk).abs() <= torch.maximum(k.abs() * 2 ** -4, s[:, None] * 2 ** -10)).all()


def test_c8_li_round_trip_and_error():
    k = _data(64, 128, 6)
    p = cf.encode_index("c8_li", k)
    s16 = p["scales"].contiguous().view(torch.float16)[:, 0].double()
    dk = cf.decode_index("c8_li", p["values"], p["scales"]).double()
    # |rotated - codes * s| <= s / 2 per element; the rotation is orthonormal, so per token in L2:
    err = (k.double() - dk).norm(dim=-1)
    assert (err <= 0.5 * s16 * math.sqrt(128) + 1e-5 * k.double().norm(dim=-1)).all()
    assert torch.equal(dk[1], torch.zeros(128, dtype=F64))


# ---- the reference ops on quantized caches ----------------------------------------------------------------
def _filled(lat, idx, seed=0, lens=(9, 13, 5), q_lens=(3, 1, 5)):
    """A cache with random rows for three requests (prefill chunk, decode, whole prompt), layer 0."""
    cfg = _cfg()
    g = torch.Generator().manual_seed(seed)
    cache = PagedCache(cfg, NB, 4, latent_format=lat, index_format=idx)
    reqs = list(range(len(lens)))
    cache.reserve(dict(zip(reqs, lens)))
    l_idx = cfg.full_layers[0]
    written = {}
    for r, L in zip(reqs, lens):
        s = cache.slots(r, 0, L)
        c = torch.randn(L, cfg.kv_lora_rank, generator=g) * 2
        kpe = torch.randn(L, cfg.qk_rope_head_dim, generator=g)
        k = torch.randn(L, cfg.index_head_dim, generator=g)
        cache.write_latent(0, s, c, kpe)
        cache.write_index(l_idx, s, k)
        written[r] = (s, c, kpe, k)
    T = sum(q_lens)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32)
    topk = 6
    sel = torch.full((T, topk), -1, dtype=torch.int32)
    t = 0
    for b, (L, n) in enumerate(zip(lens, q_lens)):
        for i in range(n):
            p = L - n + i
            pick = torch.randperm(p + 1, generator=g)[:min(topk, p + 1) - (1 if p > 2 else 0)]
            row = torch.full((topk,), -1, dtype=torch.int32)
            where = torch.randperm(topk, generator=g)[:len(pick)]      # -1 anywhere in the row
            row[where] = pick.to(torch.int32)
            sel[t] = row
            t += 1
    meta = dict(block_table=cache.block_table(reqs), seq_lens=seq, cu_seqlens_q=cu)
    return cfg, cache, written, sel, meta, l_idx


def _dense_equivalent(cache, l_idx):
    """The float caches a reader of `cache` sees: every row decoded (garbage decodes to garbage)."""
    c, kpe = cache.c[0], cache.k_pe[0]
    if cf.latent_format_of(c, kpe) != "dense":
        fmt, rows = cf.packed_latent(c, kpe)
        c, kpe = cf.decode_latent(fmt, rows, c.shape[-1], kpe.shape[-1])
    k = cache.index_k[l_idx]
    if cf.index_format_of(k) != "dense":
        fmt, v, s = cf.index_parts(k)
        k = cf.decode_index(fmt, v, s)
    return c, kpe, k


def _poison_latent(cache, keep_slots):
    """Every latent row outside `keep_slots` (unused blocks too) -> all bytes 0xFF (NaN codes, scales, rope)."""
    if cache.latent_format == "dense":
        for t in (cache.c[0], cache.k_pe[0]):
            flat = t.view(-1, t.shape[-1])
            mask = torch.ones(flat.shape[0], dtype=torch.bool)
            mask[keep_slots] = False
            flat[mask] = float("nan")
        return
    rows = cache._latent_store[0][0].view(cache.num_blocks * cache.block_size, -1)
    mask = torch.ones(rows.shape[0], dtype=torch.bool)
    mask[keep_slots] = False
    rows[mask] = 0xFF


@pytest.mark.parametrize("lat", LATENT_Q)
@pytest.mark.parametrize("cdt", [F64, F32])
def test_sparse_mla_on_quantized_cache_is_the_float_op_on_its_dequantized_rows(lat, cdt):
    cfg, cache, written, sel, meta, l_idx = _filled(lat, "dense", seed=1)
    T = sel.shape[0]
    g = torch.Generator().manual_seed(9)
    q = torch.randn(T, 3, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=g)
    # only the selected rows are read: every other row (and every unused block) becomes garbage
    bt, cu = meta["block_table"], meta["cu_seqlens_q"].tolist()
    keep = set()
    for b in range(len(cu) - 1):
        for t in range(cu[b], cu[b + 1]):
            for p in sel[t].tolist():
                if p >= 0:
                    keep.add(int(bt[b, p // 4]) * 4 + p % 4)
    _poison_latent(cache, sorted(keep))
    c_d, kpe_d, _ = _dense_equivalent(cache, l_idx)
    args = (sel, meta["block_table"], meta["seq_lens"], meta["cu_seqlens_q"], 0.37)
    out, lse = R_MLA(q, cache.c[0], cache.k_pe[0], *args, return_lse=True, cdt=cdt)
    ref, ref_lse = R_MLA(q, c_d, kpe_d, *args, return_lse=True, cdt=cdt)
    assert torch.isfinite(out).all() and torch.equal(out, ref) and torch.equal(lse, ref_lse)
    # the dequantized rows are not the written floats: the test sees the quantization
    dense = PagedCache(cfg, NB, 4)
    dense.reserve({r: int(n) for r, n in enumerate(meta["seq_lens"].tolist())})
    for r, (s, c, kpe, _) in written.items():
        dense.write_latent(0, s, c, kpe)
    fl = R_MLA(q, dense.c[0], dense.k_pe[0], *args, cdt=cdt)
    assert not torch.equal(out, fl)     # (its size vs the float cache is reported by the model test, not gated)
    # and a selected row is really read: garbage there reaches the output
    rows = cache._latent_store[0][0].view(NB * 4, -1)
    rows[sorted(keep)[0]] = 0xFF
    assert torch.isnan(R_MLA(q, cache.c[0], cache.k_pe[0], *args, cdt=cdt)).any()


@pytest.mark.parametrize("idx_fmt", INDEX_Q)
@pytest.mark.parametrize("cdt", [F64, F32])
def test_indexer_topk_on_quantized_cache_is_the_float_op_on_its_dequantized_keys(idx_fmt, cdt):
    cfg, cache, written, sel, meta, l_idx = _filled("dense", idx_fmt, seed=2)
    T = sel.shape[0]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(T, 4, cfg.index_head_dim, generator=g)
    w = torch.rand(T, 4, generator=g)
    # rows outside 0..seq_len-1 of every request are never read: garbage there (values and scales)
    store = cache._index_store[l_idx][0]
    inside = torch.zeros(NB * 4, dtype=torch.bool)
    for r, (s, *_) in written.items():
        inside[s] = True
    pv = cf.part_views(idx_fmt, (cfg.index_head_dim,), store, 4)
    for part in pv.values():
        for slot in (~inside).nonzero()[:, 0].tolist():
            part[slot // 4, slot % 4] = 0xFF
    _, _, k_d = _dense_equivalent(cache, l_idx)
    args = (meta["block_table"], meta["seq_lens"], meta["cu_seqlens_q"], 6)
    got = R_TOPK(q, w, cache.index_k[l_idx], *args, cdt=cdt)
    assert torch.equal(got, R_TOPK(q, w, k_d, *args, cdt=cdt))
    assert (got >= 0).sum() > 0 and torch.isnan(k_d).any()      # the garbage is there, and never read
    # the scales are read: one key's scale x 2^10 (codes unchanged) changes its scores and the top-k
    slot = written[0][0][8].item()                              # request 0's last position (9 tokens)
    fmt, _, scales = cf.index_parts(cache.index_k[l_idx])
    sdt = torch.float32 if fmt == "fp8" else torch.float16
    s = scales[slot // 4, slot % 4].clone().view(sdt) * 1024
    scales[slot // 4, slot % 4] = s.view(torch.uint8)
    k2 = cf.read_index(cache.index_k[l_idx], torch.tensor([slot // 4]), torch.tensor([slot % 4]))
    torch.testing.assert_close(k2[0], k_d.view(-1, k_d.shape[-1])[slot] * 1024, rtol=1e-6, atol=0)


def test_reader_refuses_a_codes_tensor_that_is_not_a_packed_view():
    c = torch.zeros(2, 4, 160, dtype=torch.float8_e4m3fn)
    kpe = torch.zeros(2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="packed 184-byte rows"):
        cf.latent_format_of(c, kpe)
    with pytest.raises(ValueError, match="c_cache has dtype torch.uint8"):
        cf.latent_format_of(torch.zeros(2, 4, 160, dtype=torch.uint8))
    k = torch.zeros(2, 4, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="per block 4 x 32 code bytes then 4 x 2 scale bytes"):
        cf.index_parts(k)


# ---- transactions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lat,idx", [("fp8_ds_mla", "fp8"), ("c8_sfa", "c8_li")])
def test_rollback_restores_quantized_caches(lat, idx):
    cfg, cache, written, *_ , l_idx = _filled(lat, idx, seed=4)
    before = cache_state(cache)
    raw = [t.clone() for t in cache.tensors()]
    g = torch.Generator().manual_seed(5)
    with pytest.raises(RuntimeError, match="boom"):
        with cache.transaction():
            cache.reserve({0: 15, "new": 6})                       # grow a request, add one
            for r, a, e in ((0, 9, 15), ("new", 0, 6)):             # past the old length (9), and a new request
                s = cache.slots(r, a, e)
                cache.write_latent(0, s, torch.randn(e - a, cfg.kv_lora_rank, generator=g),
                                   torch.randn(e - a, cfg.qk_rope_head_dim, generator=g))
                cache.write_index(l_idx, s, torch.randn(e - a, cfg.index_head_dim, generator=g))
            assert not all(torch.equal(x, y) for x, y in zip(raw, cache.tensors()))
            raise RuntimeError("boom")
    # rolled back by length: what the ops can read (rows below each length, blocks, lengths, free list)
    # is as before; the rows written past the old lengths are unreachable
    assert same_cache_state(cache_state(cache), before)


# ---- the model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("qc") / "tiny"), mtp=True, layers=4, seed=7)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 250, (n,), generator=g).tolist() for n in (5, 14)]


def test_tiny_model_generates_with_quantized_caches(ckpt):
    prompts = _prompts()
    base = GLM52(ckpt, backend="cpu_ref", dtype=torch.bfloat16, progress=False)
    ref = base.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
    for kv in ("fp8", "int8"):
        m = GLM52(ckpt, backend="cpu_ref", dtype=torch.bfloat16, progress=False, kv_cache_dtype=kv)
        cache = m.new_cache(64, mtp=True)
        assert (cache.latent_format, cache.index_format) == {"fp8": ("fp8_ds_mla", "fp8"),
                                                             "int8": ("c8_sfa", "c8_li")}[kv]
        out = m.generate(prompts, max_new_tokens=8, stop_at_eos=False)
        assert [len(t) for t in out.tokens] == [8, 8]
        assert out.stats["ops"]["sparse_mla"] == "native"       # cpu_ref reads every format
        agree = sum(a == b for r, o in zip(ref, out.tokens) for a, b in zip(r, o))
        # reported, not gated: a random tiny model's greedy tokens flip under bf16 rounding alone
        print(f"\n{kv} caches vs bf16 caches: {agree}/16 greedy tokens agree")
        if kv == "fp8":
            spec = m.generate(prompts, max_new_tokens=4, stop_at_eos=False, speculative=2)   # MTP cache too
            assert [len(t) for t in spec.tokens] == [4, 4]


def test_cache_holding_of_a_model_cache(ckpt):
    m = GLM52(ckpt, backend="cpu_ref", dtype=torch.bfloat16, progress=False, kv_cache_dtype="fp8")
    cache = m.new_cache(32, mtp=True)
    cfg = m.cfg
    per_token = ((cfg.num_hidden_layers + 1) * cf.bytes_per_token("fp8_ds_mla", cfg) +
                 (len(cfg.full_layers) + 1) * cf.bytes_per_token("fp8", cfg))
    assert cache.nbytes == cache.num_blocks * cache.block_size * per_token
    c16 = m.new_cache(32, mtp=True, kv_cache_dtype="auto")
    assert c16.latent_format == c16.index_format == "dense" and c16.nbytes > cache.nbytes
    mixed = m.new_cache(32, index_cache_dtype="int8")
    assert (mixed.latent_format, mixed.index_format) == ("fp8_ds_mla", "c8_li")


class _DenseOnly:
    """cpu_ref's ops, but the cache readers refuse anything not dense: the model must not hand them one."""

    def __init__(self):
        self.name = "dense_only"
        self.capabilities = Capabilities(dtypes=(torch.float32, torch.bfloat16))
        for op in OP_NAMES:
            if not hasattr(type(self), op):          # the class's own ops stay
                setattr(self, op, REFERENCES[op])

    def sparse_mla(self, q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *,
                   return_lse=False):
        assert c_cache.is_floating_point() and c_cache.dtype != torch.float8_e4m3fn
        return REFERENCES["sparse_mla"](q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale,
                                        return_lse=return_lse)

    def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
        assert k_cache.is_floating_point() and k_cache.dtype != torch.float8_e4m3fn
        return REFERENCES["indexer_topk"](q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk)


def test_a_backend_without_the_format_gets_the_reference(ckpt):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42, 7, 9]])
    ref = GLM52(ckpt, backend="cpu_ref", progress=False, kv_cache_dtype="fp8")(ids)
    m = GLM52(ckpt, backend=_DenseOnly(), progress=False, kv_cache_dtype="fp8")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = m(ids)
        m(ids)
    msgs = [str(x.message) for x in w if "falls back" in str(x.message)]
    assert sorted(msgs) == sorted([
        "backend 'dense_only': sparse_mla falls back to the reference (the cache is 'fp8_ds_mla'; the backend reads dense)",
        "backend 'dense_only': indexer_topk falls back to the reference (the cache is 'fp8'; the backend reads dense)"])
    assert torch.equal(got, ref)
    assert m.ops.ran_natively()["sparse_mla"] == "fallback" and m.ops.ran_natively()["indexer_topk"] == "fallback"
    dense = GLM52(ckpt, backend=_DenseOnly(), progress=False)(ids)          # a dense cache: the backend's own
    assert not torch.equal(dense, got)


def test_cache_dtype_arguments_are_checked(ckpt):
    cfg = tiny_config(layers=2)[0]
    with pytest.raises(ValueError, match="'fp8_e5m2' is not supported"):
        GLM52(cfg, backend="cpu_ref", kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="kv_cache_dtype='int4' is not a cache dtype; choose one of auto"):
        GLM52(cfg, backend="cpu_ref", kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="a float cache is held in the model's dtype"):
        GLM52(cfg, backend="cpu_ref", dtype=torch.float32, kv_cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="index_cache_dtype='fp8_ds_mla' is not a cache dtype"):
        GLM52(cfg, backend="cpu_ref", index_cache_dtype="fp8_ds_mla")
    with pytest.raises(ValueError, match="must be a string"):
        GLM52(cfg, backend="cpu_ref", kv_cache_dtype=8)
    m = GLM52(cfg, backend="cpu_ref", dtype=torch.bfloat16, kv_cache_dtype="bfloat16", index_cache_dtype="c8_li")
    assert (m.kv_cache_format, m.index_cache_format) == ("dense", "c8_li")
    with pytest.raises(ValueError, match="unknown latent cache format 'fp8'"):
        PagedCache(cfg, 2, 4, latent_format="fp8")


def test_deployment_yaml_cache_dtypes_reach_the_model(tmp_path):
    kw = load_deployment("nvidia-h200").engine_config(model=str(tmp_path))[1].settings()
    assert (kw["kv_cache_dtype"], kw["index_cache_dtype"]) == ("fp8", "fp8")
    kw = load_deployment("ascend-910c").engine_config(model=str(tmp_path))[1].settings()     # kv_cache bf16, computes bf16
    assert (kw["kv_cache_dtype"], kw["index_cache_dtype"]) == ("auto", "auto")
    kw = load_deployment("ascend-910c").engine_config(model=str(tmp_path), dtype=torch.float32)[1].settings()
    assert (kw["kv_cache_dtype"], kw["index_cache_dtype"]) == ("bf16", "bf16")    # GLM52 refuses that pair
    d = load_deployment("ascend-910c").replace(**{"dtypes.kv_cache": "int8", "dtypes.index_cache": "int8"})
    kw = d.engine_config(model=str(tmp_path))[1].settings()
    assert (kw["kv_cache_dtype"], kw["index_cache_dtype"]) == ("int8", "int8")
    kw = load_deployment("ascend-910c").engine_config(model=str(tmp_path), kv_cache_dtype="fp8")[1].settings()
    assert kw["kv_cache_dtype"] == "fp8"            # an explicit argument wins over the YAML
    # and GLM52 turns them into formats
    cfg = tiny_config(layers=2)[0]
    m = GLM52(cfg, backend="cpu_ref", dtype=torch.bfloat16, kv_cache_dtype="int8", index_cache_dtype="int8")
    assert (m.kv_cache_format, m.index_cache_format) == ("c8_sfa", "c8_li")


class _FailsAtCall:
    """cpu_ref's ops reading every cache format, whose sparse_mla raises on its n-th call."""

    def __init__(self, n):
        self.name, self.n, self.calls = "fails_late", n, 0
        self.capabilities = Capabilities(dtypes=(torch.float32,), cache_formats=tuple(cf.FORMATS))
        for op in OP_NAMES:
            if not hasattr(type(self), op):          # the class's own ops stay
                setattr(self, op, REFERENCES[op])

    def sparse_mla(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("kernel failed")
        return REFERENCES["sparse_mla"](*args, **kwargs)


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_a_failed_step_leaves_a_quantized_cache_as_it_was(ckpt, kv):
    m = GLM52(ckpt, backend=_FailsAtCall(7), progress=False, kv_cache_dtype=kv)   # 4 layers: the 2nd step fails
    cache = m.new_cache(64)
    m.extend(cache, {0: [3, 1, 4, 1, 5]})
    before, raw = cache_state(cache), [t.clone() for t in cache.tensors()]
    with pytest.raises(RuntimeError, match="kernel failed"):
        m.extend(cache, {0: [9, 2], 1: [6, 5, 3]})
    assert same_cache_state(cache_state(cache), before)           # rolled back by length
    m.extend(cache, {0: [9, 2], 1: [6, 5, 3]})                    # the retry runs from the same state
    assert not all(torch.equal(a, b) for a, b in zip(raw, cache.tensors()))
