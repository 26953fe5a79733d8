"""The Ascend backend under its CPU emulator (GLM52_ASCEND_EMULATE=1): each op against the float64
reference on fresh random inputs (cache rows an op must not read poisoned with NaN), the attention
op reading the caller's caches in place, no host synchronisation on any call, documented limits
and other weight formats falling back with a warning, the tiny model's greedy tokens, and the error
without torch_npu and without emulation."""

import importlib.util
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from glm52_backends import ops as ref
from glm52_backends import quant
from glm52_backends.backends.ascend import EMULATED_NAME, create
from glm52_backends.backends.ascend.backend import AscendBackend
from glm52_backends.backends.ascend.emulator import NpuEmulator
from glm52_backends.ops import OP_NAMES, Capabilities, OpUnsupported, check_signature
from glm52_backends.registry import BackendUnavailable, BoundBackend, get_backend, list_backends
from glm52_backends import step as step_mod
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
from glm52_backends.weights import Weight, cat_rows, quantize_weight, select, stack

F64 = torch.float64


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setenv("GLM52_ASCEND_EMULATE", "1")


@pytest.fixture(scope="module")
def asc():
    return create(emulate=True)                         # float32 allowed in the half-only ops


@pytest.fixture(scope="module")
def asc_strict():
    return create(emulate=True, allow_float32=False)    # the documented dtypes only


def gen(seed):
    return torch.Generator().manual_seed(seed)


def batch(reqs, bs, g, dims, dtype, n_extra=2):
    """Paged caches [NB, BS, D] for each D in `dims`, sharing one shuffled block table (unowned
    slots NaN); -> (caches, block table, seq_lens, cu_seqlens_q, dense rows per cache per request)."""
    need = [-(-L // bs) for _, L in reqs]
    NB = sum(need) + n_extra
    perm = torch.randperm(NB, generator=g)
    caches = [torch.full((NB, bs, D), float("nan"), dtype=dtype) for D in dims]
    table = torch.zeros(len(reqs), max(need), dtype=torch.int32)
    dense = [[] for _ in dims]
    used = 0
    for b, (_, L) in enumerate(reqs):
        blocks = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = blocks.int()
        pos = torch.arange(L)
        for cache, rows_of in zip(caches, dense):
            rows = torch.randn(L, cache.shape[-1], generator=g).to(dtype)
            cache[blocks[pos // bs], pos % bs] = rows
            rows_of.append(rows)
    cu = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([q for q, _ in reqs]).cumsum(0)
    return caches, table, torch.tensor([L for _, L in reqs], dtype=torch.int32), cu, dense


REQS = [(1, 1), (3, 40), (7, 7), (1, 100), (0, 5), (2, 19)]   # decode, chunk, prefill, long, empty, odd


def sparse_indices(reqs, topk, g):
    """[T, topk] int32 causal positions: -1 scattered anywhere, every 4th row without any index,
    every 3rd row with a position listed twice."""
    T = sum(q for q, _ in reqs)
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    t = 0
    for Lq, L in reqs:
        for i in range(Lq):
            pos = L - Lq + i
            n = min(topk, pos + 1) if (t + i) % 4 else 0
            sel = torch.randperm(pos + 1, generator=g)[:n].int()
            slots = torch.randperm(topk, generator=g)[:n]              # not only at the front
            idx[t + i, slots] = sel
        t += Lq
    return idx


def poison_unselected(caches, table, reqs, idx, bs):
    """NaN into every owned cache row that no query token of its request selects."""
    t = 0
    for b, (Lq, L) in enumerate(reqs):
        chosen = set(idx[t:t + Lq].flatten().tolist()) - {-1}
        for p in set(range(L)) - chosen:
            for cache in caches:
                cache[int(table[b, p // bs]), p % bs] = float("nan")
        t += Lq


def rel_err(got, want):
    return float((got.double() - want.double()).abs().max()) / float(want.double().abs().max())


# ---- the backend object ----------------------------------------------------------------------------------

def test_backend_matches_the_contract_and_declares_typed_capabilities(asc):
    for op in OP_NAMES:
        assert callable(getattr(asc, op)), op
        assert check_signature(op, getattr(asc, op)) is None, op
    caps = asc.capabilities
    assert isinstance(caps, Capabilities)
    assert caps.weight_formats == ("dense", "w8a8_dynamic", "w8a8_static")
    assert caps.cache_formats == ("dense", "c8_sfa", "c8_li") and caps.sparse_mla_lse is False and caps.devices == ("cpu",)
    assert caps.max_topk == 8192 and 16 in caps.block_sizes and 1024 in caps.block_sizes
    assert 8 not in caps.block_sizes and 24 not in caps.block_sizes and 1040 not in caps.block_sizes
    # 128, the block size of vllm-ascend's SFA path and of Huawei's GLM-5.2 recipe, is the default
    assert caps.block_sizes[0] == 128 == caps.get("default_block_size")
    assert len(set(caps.block_sizes)) == len(caps.block_sizes) == 64
    assert "CANN 9.1.0" in caps.get("cann") and "26.1.0" in caps.get("cann")
    assert caps.get("emulated") is True and BoundBackend(asc).capabilities.get("max_topk") == 8192
    for mod in ("backend", "common", "indexer_topk", "sparse_mla"):     # positions: the core's one helper
        mod = sys.modules[f"glm52_backends.backends.ascend.{mod}"]
        assert getattr(mod, "token_positions", step_mod.token_positions) is step_mod.token_positions, mod
        assert getattr(mod, "token_requests", step_mod.token_requests) is step_mod.token_requests, mod
    assert not hasattr(asc, "prepare_step")                              # the loose tensors are the one carrier


# ---- indexer_topk ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,bs,topk", [(torch.float32, 16, 16), (torch.bfloat16, 32, 24)])
def test_indexer_topk_valid_against_reference(asc, asc_strict, dtype, bs, topk):
    be = asc if dtype == torch.float32 else asc_strict
    g = gen(bs)
    Hi, Di = 5, 128
    (cache,), table, lens, cu, (dense,) = batch(REQS, bs, g, (Di,), dtype)
    T = int(cu[-1])
    q = torch.randn(T, Hi, Di, generator=g).to(dtype)
    w = torch.randn(T, Hi, generator=g) * Hi ** -0.5 * Di ** -0.5
    idx = be.indexer_topk(q, w, cache, table, lens, cu, topk)
    assert torch.equal(be.indexer_topk(q, w, cache, table, lens, cu, topk), idx)          # deterministic
    want = ref.indexer_topk(q, w, cache, table, lens, cu, topk, cdt=F64)
    assert idx.shape == want.shape == (T, topk) and idx.dtype == torch.int32
    t = 0
    for (Lq, L), k in zip(REQS, dense):
        s_all = torch.einsum("th,ths->ts", w[t:t + Lq].double(),
                             torch.relu(torch.einsum("thd,sd->ths", q[t:t + Lq].double(), k.double())))
        for i in range(Lq):
            pos, row = L - Lq + i, idx[t + i]
            n = min(topk, pos + 1)
            assert bool((row[n:] == -1).all()) and bool((row[:n] >= 0).all()) and bool((row[:n] <= pos).all())
            assert len(set(row[:n].tolist())) == n
            s = s_all[i, :pos + 1]
            kth = s.sort(descending=True).values[n - 1]
            assert float(s[row[:n].long()].min()) >= float(kth) - 1e-2 * float(s.abs().max()) - 1e-6
            # the valid count and the -1 tail agree exactly with the reference
            assert int((want[t + i] >= 0).sum()) == n
        t += Lq


def traced(**emu_kw):
    """A backend on the emulator whose torch_npu calls are recorded (`.npu.calls`)."""
    npu = TracingNpu(NpuEmulator(**emu_kw))
    return AscendBackend(npu, name="traced", device=torch.device("cpu"), priority=0, default_dtype=torch.float32)


@pytest.mark.parametrize("cann,Hi", [("8.5.0", 64), ("9.0.0", 32)])
def test_indexer_weights_go_in_the_query_dtype(cann, Hi):
    """Both hardware clients pass the head weights in the query dtype; the 7.3.0 line (CANN 8.5.0)
    refuses float32 weights, so handing the contract's float32 weights through would fail there."""
    be = traced(allow_float32=False, cann=cann)
    g = gen(31)
    bs, topk, Di = 16, 12, 128
    (cache,), table, lens, cu, _ = batch(REQS, bs, g, (Di,), torch.bfloat16)
    T = int(cu[-1])
    q = torch.randn(T, Hi, Di, generator=g).bfloat16()
    w = torch.randn(T, Hi, generator=g) * Hi ** -0.5 * Di ** -0.5                  # float32 (the contract)
    idx = be.indexer_topk(q, w, cache, table, lens, cu, topk)
    li = [c for c in be.npu.calls if c.name == "npu_lightning_indexer"]
    assert len(li) == 1
    weights = li[0].args[2]
    assert weights.dtype == torch.bfloat16 and torch.equal(weights, w.bfloat16())
    assert li[0].args[1].untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()   # the cache itself
    want = ref.indexer_topk(q, w, cache, table, lens, cu, topk, cdt=F64)
    assert torch.equal((idx >= 0).sum(-1), (want >= 0).sum(-1))


def test_installed_cann_line_decides_what_runs_natively(monkeypatch):
    """The indexer limits of the CANN the backend runs on: on CANN 8.5.0 (torch_npu 7.3.0 line) only
    64 index heads and top-k <= 2048, so GLM-5.2's 32-head indexer declines with a message naming
    the version and the fix; from CANN 9.0.0 it runs. Before 8.5.0 neither attention op exists."""
    monkeypatch.delenv("GLM52_ASCEND_CANN", raising=False)
    g = gen(32)
    bs, Di = 16, 128
    (cache,), table, lens, cu, _ = batch([(2, 9), (1, 30)], bs, g, (Di,), torch.float32)
    q32, q64 = torch.randn(3, 32, Di, generator=g), torch.randn(3, 64, Di, generator=g)
    w32, w64 = torch.randn(3, 32, generator=g), torch.randn(3, 64, generator=g)
    old, new = create(emulate=True, cann="8.5.0"), create(emulate=True, cann="9.0.0")
    assert old.capabilities.max_topk == 2048 and new.capabilities.max_topk == 8192
    with pytest.raises(OpUnsupported, match=r"CANN 8\.5\.0 .*7\.3\.0 doc line.*exactly 64 index heads, got 32; "
                                            r"CANN >= 9\.0\.0"):
        old.indexer_topk(q32, w32, cache, table, lens, cu, 8)
    with pytest.raises(OpUnsupported, match=r"sparse_count must be in \[1, 2048\] on the installed CANN 8\.5\.0"):
        old.indexer_topk(q64, w64, cache, table, lens, cu, 3072)
    for be, q, w, k in ((old, q64, w64, 8), (new, q32, w32, 8), (new, q64, w64, 3072)):
        idx = be.indexer_topk(q, w, cache, table, lens, cu, k)
        assert torch.equal((idx >= 0).sum(-1), (ref.indexer_topk(q, w, cache, table, lens, cu, k) >= 0).sum(-1))
    ancient = create(emulate=True, cann="8.3.RC1")
    assert ancient.capabilities.max_topk == 0 and "older than" in ancient.capabilities.get("cann")
    with pytest.raises(OpUnsupported, match=r"npu_lightning_indexer is not in torch_npu before .*CANN 8\.3\.RC1"):
        ancient.indexer_topk(q32, w32, cache, table, lens, cu, 8)
    (c, kpe), table2, lens2, cu2, _ = batch([(2, 9), (1, 30)], bs, g, (512, 64), torch.float32)
    sel = torch.tensor([[0, 3, -1], [8, 1, 2], [5, -1, 29]], dtype=torch.int32)
    with pytest.raises(OpUnsupported, match="npu_sparse_flash_attention is not in torch_npu before"):
        ancient.sparse_mla(torch.randn(3, 4, 576, generator=g), c, kpe, sel, table2, lens2, cu2, 0.1)
    # the model-facing path: one warning naming the version, then the reference
    monkeypatch.setenv("GLM52_ASCEND_EMULATE", "1")
    monkeypatch.setenv("GLM52_ASCEND_CANN", "8.5.0")
    bound = get_backend("ascend")
    with pytest.warns(RuntimeWarning, match="indexer_topk falls back.*CANN 8.5.0.*exactly 64"):
        got = bound.indexer_topk(q32, w32, cache, table, lens, cu, 8)
    assert torch.equal(got, ref.indexer_topk(q32, w32, cache, table, lens, cu, 8))


def test_cann_version_detection(monkeypatch):
    """torch.version.cann (torch_npu sets it) wins; GLM52_ASCEND_CANN declares it where it is unset;
    neither: not determined, and the strictest line (7.3.0) applies."""
    from glm52_backends.backends.ascend.versions import installed, line_for, parse_cann
    assert parse_cann("8.5.0") == (8, 5, 0) and parse_cann("8.3.RC1") == (8, 3, 0)
    assert parse_cann("CANN-9.1.0-b020") == (9, 1, 0) and parse_cann(None) is None and parse_cann("n/a") is None
    assert line_for((8, 3, 0)) is None and line_for((8, 5, 1)).name == "7.3.0"
    assert line_for((9, 0, 0)).name == "26.0.0" and line_for((9, 2, 0)).name == "26.1.0"
    device = SimpleNamespace()                                     # torch_npu stands in: not emulated
    monkeypatch.delenv("GLM52_ASCEND_CANN", raising=False)
    monkeypatch.setattr(torch.version, "cann", "9.0.0", raising=False)
    monkeypatch.setenv("GLM52_ASCEND_CANN", "8.5.0")
    got = installed(device)
    assert got.cann == (9, 0, 0) and got.line.name == "26.0.0" and got.source == "torch.version.cann"
    monkeypatch.setattr(torch.version, "cann", None, raising=False)
    got = installed(device)
    assert got.cann == (8, 5, 0) and got.line.name == "7.3.0" and "GLM52_ASCEND_CANN" in got.source
    monkeypatch.delenv("GLM52_ASCEND_CANN")
    got = installed(device)
    assert got.cann is None and got.line.name == "7.3.0" and "not determined" in got.describe()
    monkeypatch.setenv("GLM52_ASCEND_CANN", "soon")
    assert installed(device).cann is None and "'soon' is not a version" in installed(device).describe()
    with pytest.raises(ValueError, match="not a CANN version"):
        NpuEmulator(cann="latest")
    with pytest.raises(TypeError, match="cann= declares the emulated CANN"):
        create(emulate=False, cann="9.0.0")


# ---- sparse_mla --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,H", [(torch.float32, 4), (torch.bfloat16, 8)])
def test_sparse_mla_against_reference(asc, asc_strict, dtype, H):
    be = asc if dtype == torch.float32 else asc_strict
    g = gen(H)
    bs, topk = 16, 12
    (c, kpe), table, lens, cu, _ = batch(REQS, bs, g, (512, 64), dtype)
    T = int(cu[-1])
    q = torch.randn(T, H, 576, generator=g).to(dtype)
    idx = sparse_indices(REQS, topk, g)
    poison_unselected((c, kpe), table, REQS, idx, bs)
    scale = 192 ** -0.5
    out = be.sparse_mla(q, c, kpe, idx, table, lens, cu, scale)
    want = ref.sparse_mla(q, c, kpe, idx, table, lens, cu, scale, cdt=F64)
    assert isinstance(out, torch.Tensor) and out.shape == (T, H, 512) and out.dtype == dtype
    assert bool(torch.isfinite(out).all()), "a NaN row the op must not read reached the output"
    tol = 3e-5 if dtype == torch.float32 else 1.6e-2
    assert rel_err(out, want) <= tol
    empty = (idx < 0).all(-1)
    assert bool(empty.any()) and bool((out[empty] == 0).all())
    assert torch.equal(be.sparse_mla(q, c, kpe, idx, table, lens, cu, scale), out)        # deterministic


def test_sparse_mla_on_a_c8_cache_runs_the_quantized_op(asc_strict, monkeypatch):
    """A c8_sfa latent cache (Ascend's C8: int8 k_nope | bf16 k_rope | f32 per-128 scales per row) goes to
    npu_kv_quant_sparse_flash_attention natively, the packed rows handed over in place as the op's int8
    key = value rows: the reference's attention over the same dequantized rows (bf16 tolerance), unselected
    rows poisoned (0xFF bytes: NaN scales), empty rows 0. A float16 query declines to the reference."""
    import glm52_backends.cache_formats as cf
    g, bs, topk, H = gen(8), 16, 12, 8
    (c, kpe), table, lens, cu, _ = batch(REQS, bs, g, (512, 64), torch.float32)
    idx = sparse_indices(REQS, topk, g)
    NB = c.shape[0]
    store = cf.allocate("c8_sfa", (512, 64), NB, bs)
    rows = cf.part_views("c8_sfa", (512, 64), store, bs)["row"]
    rows.copy_(cf.encode_latent("c8_sfa", c.reshape(-1, 512).nan_to_num(), kpe.reshape(-1, 64).nan_to_num())["row"]
               .view(NB, bs, -1))
    flag = torch.zeros(NB, bs, 1)
    poison_unselected((flag,), table, REQS, idx, bs)
    rows[flag[..., 0].isnan()] = 0xFF                              # rows the op must not read
    c8, kpe8 = cf.op_views("c8_sfa", (512, 64), store, bs)
    T = int(cu[-1])
    q = torch.randn(T, H, 576, generator=g).to(torch.bfloat16)
    scale = 192 ** -0.5
    calls = []
    real = asc_strict.npu.npu_kv_quant_sparse_flash_attention
    monkeypatch.setattr(asc_strict.npu, "npu_kv_quant_sparse_flash_attention",
                        lambda *a, **k: calls.append(k["key"]) or real(*a, **k))
    out = asc_strict.sparse_mla(q, c8, kpe8, idx, table, lens, cu, scale)
    want = ref.sparse_mla(q, c8, kpe8, idx, table, lens, cu, scale, cdt=F64)
    assert len(calls) == 1 and calls[0].dtype == torch.int8 and calls[0].shape == (NB, bs, 1, 656)
    assert calls[0].data_ptr() == store.data_ptr()                 # the cache itself, no copy
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    assert rel_err(out, want) <= 1.6e-2
    empty = (idx < 0).all(-1)
    assert bool(empty.any()) and bool((out[empty] == 0).all())
    from glm52_backends.ops.protocol import OpUnsupported
    with pytest.raises(OpUnsupported, match="bfloat16 query"):
        asc_strict.sparse_mla(q.half(), c8, kpe8, idx, table, lens, cu, scale)


def c8_li_case(g, bs, Hi, dtype, reqs=None):
    """A c8_li index-key cache over `reqs` (default REQS; PagedCache's packed layout: per block the codes,
    then the float16 scales) whose unowned rows hold codes 127 and scale 65504 (read, they win every
    selection); -> (codes view, packed storage, table, lens, cu, q, w, the keys as stored, dequantized)."""
    import glm52_backends.cache_formats as cf
    (k,), table, lens, cu, _ = batch(reqs or REQS, bs, g, (128,), torch.float32)
    NB = k.shape[0]
    store = cf.allocate("c8_li", (128,), NB, bs)
    parts = cf.part_views("c8_li", (128,), store, bs)
    enc = cf.encode_index("c8_li", k.reshape(-1, 128).nan_to_num())
    parts["values"].copy_(enc["values"].view(NB, bs, -1))
    parts["scales"].copy_(enc["scales"].view(NB, bs, -1))
    unowned = k[..., 0].isnan()
    parts["values"][unowned] = 127
    parts["scales"][unowned] = torch.tensor([65504.0], dtype=torch.float16).view(torch.uint8)
    kc, = cf.op_views("c8_li", (128,), store, bs)
    T = int(cu[-1])
    q = torch.randn(T, Hi, 128, generator=g).to(dtype)
    w = torch.randn(T, Hi, generator=g) * Hi ** -0.5 * 128 ** -0.5
    keys = cf.decode_index("c8_li", parts["values"], parts["scales"]).double()
    return kc, store, table, lens, cu, q, w, keys


def traced_line(cann):
    npu = TracingNpu(NpuEmulator(allow_float32=False, cann=cann))
    return AscendBackend(npu, name="traced", device=torch.device("cpu"), priority=0, default_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_indexer_topk_on_a_c8_li_cache_runs_the_quantized_op(dtype):
    """A c8_li index cache (Ascend's LI C8: int8 codes of the Hadamard-rotated keys + a float16 scale per
    token) goes to npu_quant_lightning_indexer natively: the query rotated and quantized per token and head
    by npu_dynamic_quant, the cache's codes and scales handed over in place (strided views of the one
    storage). Its selections are valid top-k of the reference's scores (the plain query against the
    dequantized keys) within the bfloat16 row of the tolerance table; the -1 tail is exact; unowned rows
    (codes 127, scale 65504) are never chosen. GLM-5.2's 32 index heads."""
    import glm52_backends.cache_formats as cf
    from glm52_backends.backends.ascend.common import is_marked_valid_first
    be = traced_line("9.1.0")
    g, bs, topk, Hi = gen(21), 16, 12, 32
    kc, store, table, lens, cu, q, w, keys = c8_li_case(g, bs, Hi, dtype)
    idx = be.indexer_topk(q, w, kc, table, lens, cu, topk)
    names = [c.name for c in be.npu.calls]
    assert names == ["npu_dynamic_quant", "npu_quant_lightning_indexer"]
    kw = be.npu.calls[1].kwargs
    assert kw["key"].dtype == torch.int8 and kw["key"].shape == (kc.shape[0], bs, 1, 128)
    assert kw["key"].data_ptr() == store.data_ptr()                                      # in place, no copy
    assert kw["key_dequant_scale"].dtype == torch.float16 and kw["key_dequant_scale"].shape == (kc.shape[0], bs, 1)
    assert kw["key_dequant_scale"].data_ptr() == store.data_ptr() + bs * 128
    assert kw["query"].dtype == torch.int8 and kw["query"].shape == (q.shape[0], Hi, 128)
    assert kw["weights"].dtype == kw["query_dequant_scale"].dtype == torch.float16
    assert idx.dtype == torch.int32 and idx.shape == (q.shape[0], topk) and is_marked_valid_first(idx)
    want = ref.indexer_topk(q, w, kc, table, lens, cu, topk, cdt=F64)
    t = 0
    for b, (Lq, L) in enumerate(REQS):
        pos = torch.arange(L)
        k = keys[table[b, pos // bs].long(), pos % bs]                                     # [L, 128]
        s_all = torch.einsum("th,ths->ts", w[t:t + Lq].double(),
                             torch.relu(torch.einsum("thd,sd->ths", q[t:t + Lq].double(), k)))
        for i in range(Lq):
            p, row = L - Lq + i, idx[t + i]
            n = min(topk, p + 1)
            assert bool((row[n:] == -1).all()) and bool((row[:n] >= 0).all()) and bool((row[:n] <= p).all())
            assert len(set(row[:n].tolist())) == n and int((want[t + i] >= 0).sum()) == n
            s = s_all[i, :p + 1]
            kth = s.sort(descending=True).values[n - 1]
            assert float(s[row[:n].long()].min()) >= float(kth) - 1.56e-2 * float(s.abs().max())
        t += Lq
    with pytest.raises(OpUnsupported, match="bfloat16/float16"):
        be.indexer_topk(q.float(), w, kc, table, lens, cu, topk)


@pytest.mark.parametrize("cann", ["8.5.0", "9.0.0"])
def test_c8_li_indexer_declines_where_the_op_takes_only_contiguous_keys(cann):
    """The 7.3.0 and 26.0.0 pages of npu_quant_lightning_indexer take a contiguous key only (and exactly 64
    heads); the c8_li cache is strided (each block's scales follow its codes): declined with the reason,
    not copied, and the model's reference then reads it."""
    be = traced_line(cann)
    kc, _, table, lens, cu, q, w, _ = c8_li_case(gen(3), 16, 64, torch.bfloat16)
    with pytest.raises(OpUnsupported, match="contiguous key"):
        be.indexer_topk(q, w, kc, table, lens, cu, 8)
    assert be.npu.calls == []
    bound = BoundBackend(be)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        got = bound.indexer_topk(q, w, kc, table, lens, cu, 8)
    assert bound.ran_natively()["indexer_topk"] != "native"
    assert torch.equal(got, ref.indexer_topk(q, w, kc, table, lens, cu, 8))


def test_c8_li_indexer_edges():
    """sparse_count 1 and 2048 run natively (one decode token, the -1 tail from its position), 2049 and a
    block size the op does not take (24) decline with the reason, an empty step gives [0, topk]."""
    from glm52_backends.backends.ascend.common import is_marked_valid_first
    be = traced_line("9.1.0")
    kc, _, table, lens, cu, q, w, _ = c8_li_case(gen(6), 16, 8, torch.bfloat16, reqs=[(1, 40)])
    want = ref.indexer_topk(q, w, kc, table, lens, cu, 2048, cdt=F64)
    for topk in (1, 2048):
        idx = be.indexer_topk(q, w, kc, table, lens, cu, topk)
        assert idx.shape == (1, topk) and int((idx >= 0).sum()) == min(topk, 40) and is_marked_valid_first(idx)
    assert set(idx[0, :40].tolist()) == set(want[0, :40].tolist()) == set(range(40))     # all 40 positions
    assert [c.name for c in be.npu.calls].count("npu_quant_lightning_indexer") == 2
    for bad in (0, 2049):
        with pytest.raises(OpUnsupported, match=f"sparse_count must be in \\[1, 2048\\], got {bad}"):
            be.indexer_topk(q, w, kc, table, lens, cu, bad)
    kc24, _, table24, lens24, cu24, q24, w24, _ = c8_li_case(gen(6), 24, 8, torch.bfloat16, reqs=[(1, 40)])
    with pytest.raises(OpUnsupported, match="multiple of 16"):
        be.indexer_topk(q24, w24, kc24, table24, lens24, cu24, 8)
    empty = be.indexer_topk(q[:0], w[:0], kc, table[:0], lens[:0], cu[:1], 8)
    assert empty.shape == (0, 8) and empty.dtype == torch.int32 and is_marked_valid_first(empty)


def test_c8_li_indexer_makes_no_host_sync_and_bounded_glue(monkeypatch):
    """The C8 path (rotation, npu_dynamic_quant, the quant indexer, the mask) reads nothing back outside
    the torch_npu calls, on the first call and after (it can be captured in a decode graph), and
    allocates what README "Memory outside the fused ops" says: the query's rotation and scales, the
    float16 weights, the mask; nothing proportional to the cache."""
    be = traced_line("9.1.0")
    kc, store, table, lens, cu, q, w, _ = c8_li_case(gen(5), 16, 32, torch.bfloat16)
    be.indexer_topk(q, w, kc, table, lens, cu, 8)                  # the Hadamard matrix, built once per device
    with BackendOps(be.npu, monkeypatch) as mode:
        a = be.indexer_topk(q, w, kc, table, lens, cu, 8)
    glue = new_bytes(mode, (kc, store, table, lens, cu, q, w))
    with BackendOps(be.npu, monkeypatch) as mode2:
        b = be.indexer_topk(q, w, kc, table, lens, cu, 8)
    assert mode.syncs == mode2.syncs == [] and torch.equal(a, b)
    T, Hi, e, topk, B = q.shape[0], q.shape[1], q.element_size(), 8, table.shape[0]
    bound = 2 * T * Hi + T * Hi * (128 * (8 + e) + 6) + 5 * T * topk + 8 * topk + 64 * T + 24 * B + 8 + 16
    assert glue <= bound, (glue, bound)


def test_sparse_indices_valid_first():
    """The op's index order: each row's positions first, in their order, -1 after."""
    from glm52_backends.backends.ascend.sparse_mla import valid_first
    idx = torch.tensor([[-1, 5, 2, -1, 7, 0], [-1, -1, -1, -1, -1, -1], [9, 8, 7, 6, 5, 4]], dtype=torch.int64)
    assert valid_first(idx).tolist() == [[5, 2, 7, 0, -1, -1], [-1, -1, -1, -1, -1, -1], [9, 8, 7, 6, 5, 4]]
    assert valid_first(idx).dtype == torch.int32


class TracingNpu:
    """The emulator, recording each torch_npu call; `inside` > 0 while one runs."""

    def __init__(self, emu):
        self._emu, self.inside, self.calls = emu, 0, []

    def __getattr__(self, name):
        attr = getattr(self._emu, name)
        if not name.startswith("npu_"):
            return attr

        def call(*args, **kwargs):
            rec = SimpleNamespace(name=name, args=args, kwargs=kwargs, out=None)
            self.calls.append(rec)
            self.inside += 1
            try:
                rec.out = attr(*args, **kwargs)
                return rec.out
            finally:
                self.inside -= 1
        return call


SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_dim", "unique_consecutive")


class BackendOps(TorchDispatchMode):
    """Every aten op the backend's own code runs (not the emulated torch_npu ops'), and every
    host read: aten ops that synchronise, and Tensor.tolist (which does not dispatch)."""

    def __init__(self, npu, monkeypatch):
        super().__init__()
        self.npu, self.ops, self.syncs = npu, [], []
        tolist = torch.Tensor.tolist

        def spy(t):
            if not self.npu.inside:
                self.syncs.append("Tensor.tolist")
            return tolist(t)
        monkeypatch.setattr(torch.Tensor, "tolist", spy)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.npu.inside:
            self.ops.append((func, args, kwargs, out))
            name = func.__name__.split(".")[0]
            if name in SYNC_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None):
                self.syncs.append(str(func))
        return out


def storage(t):
    return t.untyped_storage().data_ptr()


def tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def test_sparse_mla_reads_the_callers_caches_in_place_and_computes_no_lse(monkeypatch):
    """The emulated npu_sparse_flash_attention gets the caller's c / k_pe cache tensors themselves
    (same storage, the real block table); outside the op the backend never reads a cache row (only
    views of the caches), makes no logsumexp, and returns `out` alone."""
    npu = TracingNpu(NpuEmulator())
    be = AscendBackend(npu, name="traced", device=torch.device("cpu"), priority=0, default_dtype=torch.float32)
    g = gen(11)
    bs, topk, H = 16, 8, 4
    (c, kpe), table, lens, cu, _ = batch(REQS, bs, g, (512, 64), torch.float32)
    T = int(cu[-1])
    q = torch.randn(T, H, 576, generator=g)
    idx = sparse_indices(REQS, topk, g)
    poison_unselected((c, kpe), table, REQS, idx, bs)
    with BackendOps(npu, monkeypatch) as mode:
        out = be.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1)
    assert isinstance(out, torch.Tensor) and out.shape == (T, H, 512)
    sfa = [call for call in npu.calls if call.name == "npu_sparse_flash_attention"]
    assert len(sfa) == 1
    key, value, kw = sfa[0].args[1], sfa[0].args[2], sfa[0].kwargs
    assert storage(key) == storage(value) == storage(c) and storage(kw["key_rope"]) == storage(kpe)
    assert key.shape == (*c.shape[:2], 1, 512) and kw["key_rope"].shape == (*kpe.shape[:2], 1, 64)
    assert torch.equal(kw["block_table"], table) and kw["return_softmax_lse"] is False
    cache_storages = {storage(c), storage(kpe)}
    for func, args, kwargs, res in mode.ops:
        reads = {storage(t) for t in tensors((args, kwargs))} & cache_storages
        if reads:   # only views of a cache (same storage in and out) may touch it outside the op
            assert all(storage(t) in reads for t in tensors(res)), f"{func} reads the cache outside the op"
        assert "logsumexp" not in str(func), "lse computed with return_lse=False"
    assert bool(torch.isfinite(out).all())
    assert rel_err(out, ref.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, cdt=F64)) <= 3e-5


def test_sparse_mla_return_lse_declines_to_the_reference(asc, emulate):
    g = gen(12)
    (c, kpe), table, lens, cu, _ = batch([(2, 9), (1, 30)], 16, g, (512, 64), torch.float32)
    q = torch.randn(3, 4, 576, generator=g)
    idx = torch.tensor([[0, 3, -1], [8, 1, 2], [5, -1, 29]], dtype=torch.int32)
    with pytest.raises(OpUnsupported, match="return_lse=True.*reference computes"):
        asc.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, return_lse=True)
    bound = get_backend("ascend")
    with pytest.warns(RuntimeWarning, match="sparse_mla falls back.*return_lse=True"):
        out, lse = bound.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, return_lse=True)
    o_ref, lse_ref = ref.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, return_lse=True)
    assert torch.equal(out, o_ref) and torch.equal(lse, lse_ref)
    assert bound.calls["sparse_mla"] == {"native": 0, "fallback": 1}
    native = bound.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1)                 # the default: native
    assert isinstance(native, torch.Tensor) and rel_err(native, out) <= 3e-5
    assert bound.calls["sparse_mla"] == {"native": 1, "fallback": 1}


def test_paged_ops_make_no_host_sync_on_any_call(monkeypatch):
    """indexer_topk and sparse_mla read nothing back from the device outside the torch_npu calls, on
    every call (there is no per-step preparation: the loose tensors are the one carrier of the
    step); the fused ops get the caller's own int32 block table and lengths (the prefix sums a view
    of cu_seqlens_q), and the results are the reference's."""
    npu = TracingNpu(NpuEmulator())
    be = AscendBackend(npu, name="traced", device=torch.device("cpu"), priority=0, default_dtype=torch.float32)
    bound = BoundBackend(be)
    g = gen(13)
    bs, topk = 16, 8
    (c, kpe, k_idx), table, lens, cu, _ = batch(REQS, bs, g, (512, 64, 128), torch.float32)
    T = int(cu[-1])
    q, qi = torch.randn(T, 4, 576, generator=g), torch.randn(T, 3, 128, generator=g)
    w = torch.randn(T, 3, generator=g)
    with BackendOps(npu, monkeypatch) as mode:
        idx = bound.indexer_topk(qi, w, k_idx, table, lens, cu, topk)
        out = bound.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1)
        idx2 = bound.indexer_topk(qi, w, k_idx, table, lens, cu, topk)                 # every call, not a first
        out2 = bound.sparse_mla(q, c, kpe, idx.clone(), table, lens, cu, 0.1)          # unmarked: reordered
    assert mode.syncs == []
    assert bound.ran_natively()["indexer_topk"] == bound.ran_natively()["sparse_mla"] == "native"
    paged = [call for call in npu.calls if call.name in ("npu_lightning_indexer", "npu_sparse_flash_attention")]
    assert len(paged) == 4
    for call in paged:
        kw = call.kwargs
        assert kw["block_table"] is table and storage(kw["actual_seq_lengths_query"]) == storage(cu)
        act_q = kw["actual_seq_lengths_query"]
        assert torch.equal(act_q, cu[1:]) and act_q.dtype == torch.int32
        kv = kw.get("actual_seq_lengths_key", kw.get("actual_seq_lengths_kv"))
        assert kv is lens
    assert torch.equal(idx, idx2) and torch.equal(out, out2)
    want = ref.indexer_topk(qi, w, k_idx, table, lens, cu, topk, cdt=F64)
    assert torch.equal((idx >= 0).sum(-1), (want >= 0).sum(-1))                       # the -1 tail from positions
    assert rel_err(out, ref.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, cdt=F64)) <= 3e-5


def test_step_data_is_derived_on_the_device_from_the_loose_tensors():
    """common.step_for: the fused ops' int32 arguments and the token positions from block_table,
    seq_lens, cu_seqlens_q alone (int64 inputs cast), equal to the engine's own record of the step."""
    from glm52_backends.backends.ascend.common import step_for
    g = gen(15)
    (_,), table, lens, cu, _ = batch(REQS, 16, g, (8,), torch.float32)
    T = int(cu[-1])
    want = step_mod.StepMeta.from_tensors(table, lens, cu, 16)
    for tb, sl, cq in ((table, lens, cu), (table.long(), lens.long(), cu.long())):
        st = step_for("indexer_topk", T, tb, sl, cq, positions=True)
        assert st.act_q.dtype == st.act_kv.dtype == st.block_table.dtype == torch.int32
        assert st.act_q.is_contiguous() and st.block_table.is_contiguous()
        assert torch.equal(st.act_q, cu[1:]) and torch.equal(st.act_kv, lens) and torch.equal(st.block_table, table)
        assert st.positions.dtype == torch.int64 and torch.equal(st.positions, want.positions)
    assert step_for("sparse_mla", T, table, lens, cu).positions is None                # sparse_mla needs none


def sorts(mode):
    """The sorts the backend ran (searchsorted, which derives each token's request, sorts nothing)."""
    return [str(func) for func, *_ in mode.ops if "sort" in str(func) and "searchsorted" not in str(func)]


def test_sparse_mla_takes_the_indexers_own_output_as_it_is(monkeypatch):
    """The indexer's result (valid-first, no empty row) goes to npu_sparse_flash_attention as it is,
    on its layer and on an IndexShare layer reusing it: no sort, no empty-row fix-up. The same
    indices as a copy (unmarked) are reordered and give the same output."""
    be = traced()
    bound = BoundBackend(be)
    g = gen(33)
    bs, topk = 16, 8
    (c, kpe, k_idx), table, lens, cu, _ = batch(REQS, bs, g, (512, 64, 128), torch.float32)
    T = int(cu[-1])
    qi, w = torch.randn(T, 3, 128, generator=g), torch.randn(T, 3, generator=g)
    q1, q2 = torch.randn(T, 4, 576, generator=g), torch.randn(T, 4, 576, generator=g)
    idx = bound.indexer_topk(qi, w, k_idx, table, lens, cu, topk)
    with BackendOps(be.npu, monkeypatch) as mode:
        outs = [bound.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1) for q in (q1, q2)]
    sfa = [call for call in be.npu.calls if call.name == "npu_sparse_flash_attention"]
    assert len(sfa) == 2 and all(storage(call.args[3]) == storage(idx) for call in sfa)
    assert sorts(mode) == [] and not [f for f, *_ in mode.ops if "masked_fill" in str(f)]
    with BackendOps(be.npu, monkeypatch) as mode:
        again = bound.sparse_mla(q1, c, kpe, idx.clone(), table, lens, cu, 0.1)
    assert sorts(mode) and torch.equal(again, outs[0])
    for q, out in zip((q1, q2), outs):
        assert rel_err(out, ref.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, cdt=F64)) <= 3e-5


def new_bytes(mode, keep=()):
    """Bytes of the new storages that aten ops outside the torch_npu calls allocated (views and
    in-place ops allocate none); `keep`: tensors that existed before."""
    seen = {storage(t) for t in keep}
    total = 0
    for _, args, kwargs, out in mode.ops:
        inputs = {storage(t) for t in tensors((args, kwargs))}
        for t in tensors(out):
            p = storage(t)
            if p not in inputs and p not in seen and t.untyped_storage().nbytes():
                seen.add(p)
                total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glue_memory_per_call_is_bounded_and_the_caches_are_the_models(monkeypatch, dtype):
    """README "Memory outside the fused ops": what the backend's own torch ops allocate around
    npu_lightning_indexer and npu_sparse_flash_attention per call is bounded by the activations
    (q, weights, indices), never by the cache; the caches handed to the ops are the caller's."""
    be = traced(allow_float32=dtype == torch.float32)
    g = gen(34)
    bs, topk, H, Hi = 16, 16, 8, 32
    reqs = [(1, 300), (5, 40), (2, 2), (6, 77)]
    (c, kpe, k_idx), table, lens, cu, _ = batch(reqs, bs, g, (512, 64, 128), dtype, n_extra=200)
    T, e = int(cu[-1]), c.element_size()
    cache_bytes = sum(t.untyped_storage().nbytes() for t in (c, kpe, k_idx))
    qi, w = torch.randn(T, Hi, 128, generator=g).to(dtype), torch.randn(T, Hi, generator=g)
    q = torch.randn(T, H, 576, generator=g).to(dtype)
    before = (c.clone(), kpe.clone(), k_idx.clone())
    everything = (c, kpe, k_idx, qi, w, q, table, lens, cu)
    with BackendOps(be.npu, monkeypatch) as mode:
        idx = be.indexer_topk(qi, w, k_idx, table, lens, cu, topk)
    li_bytes = new_bytes(mode, everything)
    cast = T * Hi * e if dtype != torch.float32 else 0                  # the weights in the query dtype
    B = table.shape[0]
    positions = 64 * T + 24 * B + 8                                     # step.token_requests / token_positions
    assert li_bytes <= cast + 5 * T * topk + 8 * topk + positions + 16, li_bytes   # 16: scalars
    with BackendOps(be.npu, monkeypatch) as mode:
        be.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1)
    assert new_bytes(mode, everything + (idx,)) <= q.nbytes + 16, new_bytes(mode, everything + (idx,))
    theirs = idx.clone()                                                # a caller's indices: reordered
    with BackendOps(be.npu, monkeypatch) as mode:
        be.sparse_mla(q, c, kpe, theirs, table, lens, cu, 0.1)
    mla_bytes = new_bytes(mode, everything + (theirs,))
    assert mla_bytes <= q.nbytes + 15 * T * topk + T + 16, mla_bytes
    assert max(li_bytes, mla_bytes) < cache_bytes / 20                # a copy of any cache would not fit
    for call in be.npu.calls:
        if call.name == "npu_lightning_indexer":
            assert storage(call.args[1]) == storage(k_idx)
        if call.name == "npu_sparse_flash_attention":
            assert storage(call.args[1]) == storage(call.args[2]) == storage(c)
            assert storage(call.kwargs["key_rope"]) == storage(kpe)
    for a, b in zip(before, (c, kpe, k_idx)):                            # nothing written into a cache
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    # moe_experts: only [T, K] routing bookkeeping; the expert weights go in as transposed views
    E, K, Hd, I = 6, 4, 32, 16
    x = torch.randn(T, Hd, generator=g).to(dtype)
    w13, w2 = torch.randn(E, 2 * I, Hd, generator=g).to(dtype), torch.randn(E, Hd, I, generator=g).to(dtype)
    ids, wts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]), torch.rand(T, K, generator=g)
    ids[1, 2] = -1
    with BackendOps(be.npu, monkeypatch) as mode:
        be.moe_experts(x, w13, w2, ids, wts)
    assert new_bytes(mode, (x, w13, w2, ids, wts)) <= 19 * T * K + 25 * T + 16
    gmm = [call for call in be.npu.calls if call.name == "npu_grouped_matmul"]
    assert [storage(call.args[1][0]) for call in gmm] == [storage(w13), storage(w2)]


def test_paged_ops_name_step_tensors_whose_shapes_contradict(asc):
    """Shapes that contradict each other raise ValueError naming them (no host read needed); the
    lengths' values are the caller's contract and are not read back to be checked."""
    g = gen(14)
    (c, kpe, k_idx), table, lens, cu, _ = batch([(2, 9), (1, 30)], 16, g, (512, 64, 128), torch.float32)
    q, qi, w = torch.randn(3, 4, 576, generator=g), torch.randn(3, 3, 128, generator=g), torch.randn(3, 3, generator=g)
    idx = torch.tensor([[0, 3, -1], [8, 1, 2], [5, -1, 29]], dtype=torch.int32)
    with pytest.raises(ValueError, match="sparse_mla: block_table has 2 rows, so seq_lens must hold 2 entries and "
                                         "cu_seqlens_q 3; got 1 and 3"):
        asc.sparse_mla(q, c, kpe, idx, table, lens[:1], cu, 0.1)
    with pytest.raises(ValueError, match="indexer_topk: block_table has 1 rows.*got 2 and 3"):
        asc.indexer_topk(qi, w, k_idx, table[:1], lens, cu, 4)
    with pytest.raises(ValueError, match="sparse_mla: block_table must be \\[B, max_blocks\\]"):
        asc.sparse_mla(q, c, kpe, idx, table[0], lens, cu, 0.1)
    with pytest.raises(ValueError, match="kpe_cache"):
        asc.sparse_mla(q, c, kpe[:-1], idx, table, lens, cu, 0.1)


# ---- moe_route / moe_experts -----------------------------------------------------------------------------

@pytest.mark.parametrize("E,n_group,topk_group,K", [(16, 4, 2, 4), (24, 1, 1, 3)])
def test_moe_route_against_reference(asc, E, n_group, topk_group, K):
    g = gen(E)
    logits = torch.randn(11, E, generator=g) * 2
    bias = torch.rand(E, generator=g) * 0.1
    ids, w = asc.moe_route(logits, bias, K, n_group, topk_group, True, 2.5)
    ids_r, w_r = ref.moe_route(logits, bias, K, n_group, topk_group, True, 2.5, cdt=F64)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == (11, K)
    o, o_r = ids.sort(-1), ids_r.sort(-1)
    assert torch.equal(o.values, o_r.values)
    assert torch.allclose(w.gather(1, o.indices).double(), w_r.gather(1, o_r.indices).double(), rtol=1e-5)


@pytest.mark.parametrize("as_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_against_reference(asc, dtype, as_weight):
    g = gen(3)
    T, Hd, I, E, K = 9, 24, 10, 6, 3
    x = torch.randn(T, Hd, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, Hd, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(E, Hd, I, generator=g) * 0.2).to(dtype)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])     # expert E-1 stays empty
    ids[2, 1] = -1                                                                     # unused slots
    ids[5, 0] = -1
    wts = torch.rand(T, K, generator=g)
    a13, a2 = (Weight(w13), Weight(w2)) if as_weight else (w13, w2)
    y = asc.moe_experts(x, a13, a2, ids, wts)
    y_r = ref.moe_experts(x, w13, w2, ids, wts, cdt=F64)
    tol = 3e-5 if dtype == torch.float32 else 1.6e-2
    assert y.dtype == dtype and y.shape == (T, Hd)
    assert rel_err(y, y_r) <= tol


def test_moe_unused_slots_take_their_own_tokens_expert_not_a_fixed_one():
    """-1 slots are routed to their own token's first used expert with weight 0 (never to expert 0):
    an expert whose output overflows (here expert 0, inf weights) poisons only the tokens that use
    it, as in the reference; a token with no used slot gets exactly 0."""
    be = traced()
    g = gen(35)
    T, Hd, I, E, K = 6, 16, 8, 5, 3
    x = torch.randn(T, Hd, generator=g)
    w13 = torch.randn(E, 2 * I, Hd, generator=g) * 0.2
    w2 = torch.randn(E, Hd, I, generator=g) * 0.2
    w2[0] = float("inf")                                           # expert 0 overflows
    ids = torch.tensor([[1, -1, 2], [-1, 3, -1], [0, 4, -1], [-1, -1, -1], [2, 3, 4], [4, -1, 1]])
    wts = torch.rand(T, K, generator=g) + 0.1
    y = be.moe_experts(x, w13, w2, ids, wts)
    y_ref = ref.moe_experts(x, w13, w2, ids, wts, cdt=F64)
    clean = torch.tensor([0, 1, 3, 4, 5])                          # tokens not using expert 0
    assert bool(torch.isfinite(y[clean]).all()), "an unused slot reached another expert's overflow"
    assert rel_err(y[clean], y_ref[clean]) <= 3e-5
    assert bool((y[3] == 0).all()) and not bool(torch.isfinite(y[2]).all())   # as the reference: y_ref[2] inf
    routed = [c for c in be.npu.calls if c.name == "npu_moe_init_routing_v2"][0].args[1]
    assert routed.tolist() == [[1, 1, 2], [3, 3, 3], [0, 4, 0], [0, 0, 0], [2, 3, 4], [4, 4, 1]]


def fp8(w):
    """`w` as an fp8_block Weight (per-matrix 128x128 block scales)."""
    s = torch.full((*w.shape[:-2], -(-w.shape[-2] // 128), -(-w.shape[-1] // 128)), 0.5)
    return Weight((w / 0.5).to(torch.float8_e4m3fn), s, "fp8_block")


def test_other_weight_formats_decline_to_the_reference(asc, emulate):
    g = gen(4)
    x = torch.randn(5, 16, generator=g)
    w13, w2 = fp8(torch.randn(12, 16, generator=g)), fp8(torch.randn(16, 6, generator=g))
    e13, e2 = fp8(torch.randn(3, 12, 16, generator=g)), fp8(torch.randn(3, 16, 6, generator=g))
    ids, wts = torch.randint(0, 3, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    for call in (lambda b: b.linear(x, w13), lambda b: b.mlp(x, w13, w2),
                 lambda b: b.moe_experts(x, e13, e2, ids, wts)):
        with pytest.raises(OpUnsupported, match="format 'fp8_block'; this backend runs dense, w8a8_dynamic, "
                                                "w8a8_static weights"):
            call(asc)
    bound = get_backend("ascend")
    with pytest.warns(RuntimeWarning, match="linear falls back.*fp8_block"):
        assert torch.equal(bound.linear(x, w13), ref.linear(x, w13))
    with pytest.warns(RuntimeWarning, match="mlp falls back"):
        assert torch.equal(bound.mlp(x, w13, w2), ref.mlp(x, w13, w2))
    with pytest.warns(RuntimeWarning, match="moe_experts falls back"):
        assert torch.equal(bound.moe_experts(x, e13, e2, ids, wts), ref.moe_experts(x, e13, e2, ids, wts))
    assert {bound.ran_natively()[op] for op in ("linear", "mlp", "moe_experts")} == {"fallback"}


# ---- int8 weights: w8a8_dynamic, w8a8_static ---------------------------------------------------------------
# Judged against quant.matmul_reference (the float64 oracle of glm52_backends/quant.py) on the SAME
# quantised weights and, GEMM by GEMM, on the same activations: the activation codes must be the
# recipe's (spec/quantization.md §2: at most one step apart on < 0.05% of elements), then every GEMM
# output is the oracle's up to the rounding of the output: one unit in the last place of x's dtype
# (bfloat16 2^-7, float16 2^-10 relative); float32 2^-21 (8 float32 ulps: the ops' float32 scale steps
# plus the oracle's own rounding to float32).
ULP_REL = {torch.float32: 2 ** -21, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
INT8 = ("w8a8_dynamic", "w8a8_static")


def qweight(w, fmt, x=None):
    """`w` quantised to `fmt`; w8a8_static calibrated on its input `x`, with an asymmetric offset."""
    if fmt == "w8a8_static":
        return quantize_weight(w, fmt, input_scale=float(x.float().abs().max()) * 1.05 / 120, input_offset=5)
    return quantize_weight(w, fmt)


def qw13(w13, fmt, x=None):
    """gate and up quantised separately, then concatenated (what the loader does)."""
    I = w13.shape[-2] // 2
    return cat_rows([qweight(w13[:I], fmt, x), qweight(w13[I:], fmt, x)])


def int8_backend(dtype):
    """float32 runs on the emulator's float32 convenience; halves on the documented dtypes only."""
    return traced() if dtype == torch.float32 else traced(allow_float32=False)


def assert_codes(got, want):
    """spec §2: int8 codes one step apart at most, on fewer than 0.05% of the elements."""
    d = (got.long() - want.long()).abs()
    assert d.numel() == 0 or (int(d.max()) <= 1 and int((d > 0).sum()) <= 0.0005 * d.numel()), int((d > 0).sum())


def oracle_slack(x, W):
    """The float64 oracle's own rounding: exact integer sums for w8a8_static; for w8a8_dynamic the
    K products (q_x s_x)(q_W scale) are rounded and summed in float64, K * 2^-53 of the sum of
    their magnitudes (matters only where the sum cancels to almost nothing)."""
    if W.format != "w8a8_dynamic":
        return 0.0
    q, s = quant.quantize_int8_token(x)
    terms = (q.double().abs() * s.double()[..., None]) @ quant.dequantize(W, F64).abs().T
    return x.shape[-1] * 2 ** -53 * terms


def swiglu_bound(h_ref, e, dtype):
    """|a - silu(h1) h2| for a = the dtype-rounded SwiGLU of h' with |h' - h_ref| <= e (each half):
    silu(h1') h2' - silu(h1) h2 = (silu(h1') - silu(h1)) h2' + silu(h1) (h2' - h2), |silu'| <= 1.1,
    |silu(z)| <= |z|, plus the rounding of a (one ulp u of the result)."""
    I = h_ref.shape[-1] // 2
    h1, h2, e1, e2 = h_ref[..., :I].abs(), h_ref[..., I:].abs(), e[..., :I], e[..., I:]
    return 1.1 * e1 * (h2 + e2) + h1 * e2 + ULP_REL[dtype] * (h1 + e1) * (h2 + e2)


def assert_ulp(got, want, dtype, what, slack=0.0):
    err = (got.double() - want.double()).abs()
    bound = ULP_REL[dtype] * want.double().abs() + slack
    assert bool((err <= bound).all()), f"{what}: {float((err - bound).max())} over one ulp"


def calls(be, name):
    return [c for c in be.npu.calls if c.name == name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", INT8)
def test_int8_linear_against_the_oracle(fmt, dtype):
    """linear: npu_dynamic_quant (or npu_quantize with the calibrated input scale and offset) then
    npu_quant_matmul; odd sizes, leading dims, a row of zeros, an outlier; the codes handed to
    npu_quant_matmul are the recipe's and its output is the oracle's to one ulp."""
    be = int8_backend(dtype)
    g = gen(50)
    N, K = 23, 37
    x = torch.randn(2, 5, K, generator=g)
    x[0, 0] = 0
    x[0, 1, 3] *= 40
    x = x.to(dtype)
    W = qweight(torch.randn(N, K, generator=g) * K ** -0.5, fmt, x)
    y = be.linear(x, W)
    assert y.dtype == dtype and y.shape == (2, 5, N)
    quantise = "npu_dynamic_quant" if fmt == "w8a8_dynamic" else "npu_quantize"
    assert [c.name for c in be.npu.calls] == [quantise, "npu_quant_matmul"]
    mm = calls(be, "npu_quant_matmul")[0]
    assert mm.args[1].data_ptr() == W.data.data_ptr() and mm.args[1].shape == (K, N)    # a view, no copy
    assert_codes(mm.args[0], quant.quantize_activation(x, W)[0].reshape(-1, K))
    if fmt == "w8a8_dynamic":
        assert torch.equal(mm.kwargs["pertoken_scale"], quant.quantize_int8_token(x)[1].reshape(-1))
    else:
        assert mm.kwargs["bias"].dtype == torch.int32 and torch.equal(mm.kwargs["bias"], W.aux["quant_bias"])
    assert_ulp(y, quant.matmul_reference(x, W), dtype, "linear", oracle_slack(x, W))
    if fmt == "w8a8_dynamic":
        assert bool((y[0, 0] == 0).all())                     # a row of zeros: scale 0, output exactly 0
    be.npu.calls.clear()
    assert be.linear(x[:0], W).shape == (0, 5, N) and be.npu.calls == []   # no rows: no op (x1 may not be empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmts", [("w8a8_dynamic", "w8a8_dynamic"), ("w8a8_static", "w8a8_static"),
                                  ("w8a8_dynamic", "dense")])
def test_int8_mlp_against_the_oracle(fmts, dtype):
    """mlp: linear(w13) -> npu_swiglu -> linear(w2), each GEMM judged on its own input: the first on
    x, the second on the SwiGLU output the backend produced, which itself is within the propagated
    one-ulp differences of the reference's SwiGLU output."""
    be = int8_backend(dtype)
    g = gen(51)
    Hd, I, T = 40, 24, 9
    x = (torch.randn(T, Hd, generator=g)).to(dtype)
    f13 = torch.randn(2 * I, Hd, generator=g) * Hd ** -0.5
    f2 = torch.randn(Hd, I, generator=g) * I ** -0.5
    w13 = qw13(f13, fmts[0], x)
    h_ref = quant.matmul_reference(x, w13)                                              # float64 oracle
    a_ref = F.silu(h_ref[:, :I]) * h_ref[:, I:]                                         # float64, unrounded
    w2 = qweight(f2, fmts[1], a_ref) if fmts[1] != "dense" else f2.to(dtype)
    y = be.mlp(x, w13, w2)
    assert y.dtype == dtype and y.shape == (T, Hd)
    mms = calls(be, "npu_quant_matmul")
    assert len(mms) == (2 if fmts[1] != "dense" else 1) and len(calls(be, "npu_swiglu")) == 1
    h = mms[0].out
    assert_codes(mms[0].args[0], quant.quantize_activation(x, w13)[0])
    slack = oracle_slack(x, w13)
    assert_ulp(h, h_ref, dtype, "GEMM1", slack)
    a = calls(be, "npu_swiglu")[0].out
    # the SwiGLU of an h within that bound of the oracle's, against the SwiGLU of the oracle's h
    bound = swiglu_bound(h_ref, ULP_REL[dtype] * h_ref.abs() + slack, dtype)
    assert bool(((a.double() - a_ref).abs() <= bound).all()), "swiglu"
    if fmts[1] == "dense":   # F.linear: float32 accumulation (I * 2^-24 of the |terms|) + one rounding
        want = a.double() @ w2.double().T
        mag = a.double().abs() @ w2.double().abs().T
        assert bool(((y.double() - want).abs() <= I * 2 ** -24 * mag + ULP_REL[dtype] * want.abs()).all())
    else:
        assert_codes(mms[1].args[0], quant.quantize_activation(a, w2)[0])
        assert_ulp(y, quant.matmul_reference(a, w2), dtype, "GEMM2", oracle_slack(a, w2))
    # end to end against the reference op: within the dtype's conformance row
    assert rel_err(y, ref.mlp(x, w13, w2)) <= (3e-5 if dtype == torch.float32 else 1.6e-2)


def moe_case(g, T, Hd, I, E, K, dtype, bf16_scales=False):
    x = torch.randn(T, Hd, generator=g)
    x[1] = 0                                                                           # a token of zeros
    x = x.to(dtype)
    w13 = stack([qw13(torch.randn(2 * I, Hd, generator=g) * Hd ** -0.5, "w8a8_dynamic") for _ in range(E)])
    w2 = stack([qweight(torch.randn(Hd, I, generator=g) * I ** -0.5, "w8a8_dynamic") for _ in range(E)])
    if bf16_scales:   # Atlas A2/A3's int8 grouped matmul outputs bfloat16 only with bfloat16 scales
        for w in (w13, w2):
            w.scales = w.scales.bfloat16().float()
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])      # expert E-1 stays empty
    ids[2, 1] = -1                                                                     # unused slots
    ids[5, 0] = -1
    return x, w13, w2, ids, torch.rand(T, K, generator=g) + 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_moe_experts_against_the_oracle(dtype):
    """moe_experts, w8a8_dynamic: npu_moe_init_routing_v2(quant_mode=1) -> int8 npu_grouped_matmul
    (scale, per_token_scale) -> npu_swiglu -> npu_dynamic_quant -> int8 npu_grouped_matmul ->
    npu_moe_token_unpermute. Each routed row's codes are its token's recipe codes, each GEMM is the
    oracle's on its own input to one ulp, the SwiGLU output is within the propagated bound of the
    reference's, and the output is the weighted sum of the rows (rounded to x's dtype per row by the
    grouped matmul, which the float64 reference does not do: bounded by one ulp of each term)."""
    be = int8_backend(dtype)
    g = gen(52)
    T, Hd, I, E, K = 9, 40, 16, 6, 3
    x, w13, w2, ids, wts = moe_case(g, T, Hd, I, E, K, dtype, bf16_scales=dtype == torch.bfloat16)
    y = be.moe_experts(x, w13, w2, ids, wts)
    assert y.dtype == dtype and y.shape == (T, Hd)
    names = [c.name for c in be.npu.calls]
    assert names == ["npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu", "npu_dynamic_quant",
                     "npu_grouped_matmul", "npu_moe_token_unpermute"]
    route, g1, sw, dq, g2, _ = be.npu.calls
    assert route.kwargs["quant_mode"] == 1
    sdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    assert g1.kwargs["scale"][0].dtype == sdt and g1.kwargs["output_dtype"] == dtype
    assert g1.args[1][0].data_ptr() == w13.data.data_ptr()                             # a view, no copy
    xq, row_of, _, xs = route.out
    used = [(t, k) for t in range(T) for k in range(K) if ids[t, k] >= 0]
    q_tok, s_tok = quant.quantize_int8_token(x)
    for t, k in used:
        r, e = int(row_of[t * K + k]), int(ids[t, k])
        assert_codes(xq[r], q_tok[t])
        assert float(xs[r]) == float(s_tok[t])
        h_ref = quant.matmul_reference(x[t:t + 1], select(w13, e))                      # float64 [1, 2I]
        slack = oracle_slack(x[t:t + 1], select(w13, e))
        assert_ulp(g1.out[0][r:r + 1], h_ref, dtype, f"GEMM1 token {t} expert {e}", slack)
        bound = swiglu_bound(h_ref, ULP_REL[dtype] * h_ref.abs() + slack, dtype)[0]      # as in the mlp test
        a_ref = F.silu(h_ref[0, :I]) * h_ref[0, I:]
        assert bool(((sw.out[r].double() - a_ref).abs() <= bound).all()), f"swiglu token {t} expert {e}"
        assert_codes(dq.out[0][r], quant.quantize_int8_token(sw.out[r])[0])
        assert_ulp(g2.out[0][r:r + 1], quant.matmul_reference(sw.out[r:r + 1], select(w2, e)), dtype,
                   f"GEMM2 token {t} expert {e}", oracle_slack(sw.out[r:r + 1], select(w2, e)))
    # unpermute: the weighted sum of each token's rows (unused slots weight 0), summed in float32 and
    # rounded once: within one ulp of the float64 sum of |terms|
    rows = g2.out[0].double()
    want = torch.zeros(T, Hd, dtype=F64)
    mag = torch.zeros(T, Hd, dtype=F64)
    for t, k in used:
        term = rows[int(row_of[t * K + k])] * float(wts[t, k])
        want[t] += term
        mag[t] += term.abs()
    err = (y.double() - want).abs()
    assert bool((err <= ULP_REL[dtype] * mag).all())
    assert bool((y[1] == 0).all())                                       # the token of zeros
    assert rel_err(y, ref.moe_experts(x, w13, w2, ids, wts)) <= (3e-5 if dtype == torch.float32 else 1.6e-2)


def moe_int8(g, dtype=torch.float32, fmt="w8a8_dynamic"):
    T, Hd, I, E, K = 5, 32, 8, 4, 2
    x = torch.randn(T, Hd, generator=g).to(dtype)
    w13 = stack([qw13(torch.randn(2 * I, Hd, generator=g) * 0.2, fmt, x) for _ in range(E)])
    w2 = stack([qweight(torch.randn(Hd, I, generator=g) * 0.3, fmt, x) for _ in range(E)])
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return x, w13, w2, ids, torch.rand(T, K, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_weights_are_prepared_at_load_and_read_nothing_back(monkeypatch, dtype):
    """prepare_weight builds the kernels' view of each int8 weight once, on the weight (the backend keeps
    no per-weight state): calls with prepared weights prepare nothing and read nothing back to the host,
    and equal a per-call preparation of the same (rounded, NZ-cast) tensors; a weight modified in place
    is prepared per call again, its load-time preparation no longer describing it."""
    import dataclasses
    import gc
    import weakref
    from glm52_backends.backends.ascend.quantized import Prepared
    be = int8_backend(dtype)
    g = gen(53)
    x = torch.randn(6, 32, generator=g).to(dtype)
    mx, e13, e2, ids, wts = moe_int8(g)
    mx = mx.to(dtype)
    W = qweight(torch.randn(16, 32, generator=g), "w8a8_dynamic")
    raw = {"W": W, "S": qweight(torch.randn(16, 32, generator=g), "w8a8_static", x), "e13": e13, "e2": e2,
           "m13": cat_rows([W, W]), "m2": qweight(torch.randn(32, 16, generator=g), "w8a8_dynamic")}
    prep = {k: be.prepare_weight(k, w, dtype=dtype) for k, w in raw.items()}
    assert all(isinstance(w.prepared, Prepared) and w.shape == raw[k].shape for k, w in prep.items())
    assert be.npu.get_npu_format(prep["W"].data) == 29 and be.npu.get_npu_format(raw["W"].data) == 2

    def run(ws):
        return (be.linear(x, ws["W"]), be.linear(x, ws["S"]), be.moe_experts(mx, ws["e13"], ws["e2"], ids, wts),
                be.mlp(x, ws["m13"], ws["m2"]))
    with BackendOps(be.npu, monkeypatch) as mode:
        first = run(prep)
    assert mode.syncs == [] and be.preparations == 0
    again = run({k: dataclasses.replace(w, prepared=None) for k, w in prep.items()})
    assert be.preparations == 6 and all(torch.equal(a, b) for a, b in zip(first, again))
    prep["W"].scales.mul_(2)                                                 # in place: prepared per call
    assert torch.allclose(be.linear(x, prep["W"]).float(), 2 * first[0].float(), rtol=1e-2) and be.preparations == 7
    tmp = be.prepare_weight("tmp", qweight(torch.randn(8, 32, generator=g), "w8a8_dynamic"), dtype=dtype)
    be.linear(x, tmp)
    codes = weakref.ref(tmp.data)
    be.npu.calls.clear()                                                     # the trace holds the codes too
    del tmp
    gc.collect()
    assert codes() is None                                                   # nothing in the backend holds it


@pytest.mark.parametrize("fmt", INT8)
def test_int8_linear_keeps_a_nonfinite_row_nonfinite(fmt):
    """The int8 codes hold no NaN: a NaN or inf input row gives a non-finite output row (as the reference,
    quant.nonfinite_rows), never numbers; the other rows are untouched."""
    be = int8_backend(torch.bfloat16)
    g = gen(58)
    x = torch.randn(4, 32, generator=g).bfloat16()
    w = be.prepare_weight("w", qweight(torch.randn(16, 32, generator=g), fmt, x), dtype=torch.bfloat16)
    clean = be.linear(x, w)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    y = be.linear(x, w)
    assert bool((~torch.isfinite(y[1:3])).all())
    assert torch.equal(y[[0, 3]], clean[[0, 3]])
    assert bool(quant.matmul_reference(x, w)[1:3].isnan().all())


def test_prepared_tensors_are_the_declared_parts():
    """What prepare makes besides the weight's own tensors is exactly `prepared_parts` (the planner counts
    those), for every int8 format, shape and activation dtype; the float16 static scale is the int64
    encoding of the truncated deq_scale the weight now holds, which the reference computes with."""
    from glm52_backends.backends.ascend.emulator import trans_quant_scale
    from glm52_backends.backends.ascend.quantized import prepared_parts
    g = gen(57)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        be = int8_backend(dtype)
        x = torch.randn(4, 32, generator=g).to(dtype)
        for fmt, w in (("w8a8_dynamic", qweight(torch.randn(16, 32, generator=g), "w8a8_dynamic")),
                       ("w8a8_static", qweight(torch.randn(16, 32, generator=g), "w8a8_static", x)),
                       ("w8a8_dynamic", moe_int8(g)[1])):
            p = be.prepare_weight("w", w, dtype=dtype)
            made = {k: (tuple(t.shape), t.dtype) for k, t in p.prepared.tensors().items()}
            assert made == prepared_parts(fmt, tuple(w.shape), dtype), (fmt, dtype, made)
            if fmt == "w8a8_static" and dtype == torch.float16:
                deq = p.aux["deq_scale"]
                assert torch.equal(trans_quant_scale(p.prepared.scale), deq)
                assert (deq - w.aux["deq_scale"]).abs().max() <= 2 ** -10 * w.aux["deq_scale"].abs().max()
                y = be.linear(x, p)
                assert calls(be, "npu_quant_matmul")[-1].args[2].dtype == torch.int64
                assert_ulp(y, quant.matmul_reference(x, p), dtype, "linear", oracle_slack(x, p))


def test_int8_declines_name_their_reason(asc, asc_strict, emulate):
    g = gen(54)
    x = torch.randn(5, 32, generator=g)
    W = qweight(torch.randn(16, 32, generator=g), "w8a8_dynamic")
    off = qweight(torch.randn(16, 32, generator=g), "w8a8_dynamic")
    off.aux["offset"][3] = 0.5
    w4 = quantize_weight(torch.randn(16, 32, generator=g), "w4a8_dynamic")
    w4t = quantize_weight(torch.randn(32, 8, generator=g), "w4a8_dynamic")
    S = qweight(torch.randn(16, 32, generator=g), "w8a8_static", x)
    S.aux["input_offset"] = torch.tensor(2.5)
    mx, e13, e2, ids, wts = moe_int8(g)
    s13 = stack([qw13(torch.randn(16, 32, generator=g), "w8a8_static", mx) for _ in range(4)])
    cases = [
        (lambda: asc.linear(x, off), "non-zero offset"),
        (lambda: asc.linear(x, w4), "w4a8_dynamic is not wired on this backend"),
        (lambda: asc.mlp(x, W, w4t), "mlp: weight w2: w4a8_dynamic is not wired"),
        (lambda: asc_strict.linear(x, W), "take bfloat16/float16 activations, got float32"),
        (lambda: asc_strict.linear(x.bfloat16(), S), "input_offset 2.5 is not an int8 integer"),
        (lambda: asc.linear(x[:, :30], W), "x has 30 inputs, weight weight takes 32"),
        (lambda: asc.linear(x, Weight(W.data[None], W.scales[None], W.format, aux={"offset": W.aux["offset"][None]})),
         "must be one matrix"),
        (lambda: asc_strict.moe_experts(mx.bfloat16(), e13, e2, ids, wts), "scales are not bfloat16 values"),
        (lambda: asc.moe_experts(mx, s13, e2, ids, wts), "w8a8_static is the recipe's attention format"),
        (lambda: asc.moe_experts(mx, e13, e2.dense(), ids, wts), "formats 'w8a8_dynamic' / 'dense'"),
        (lambda: asc.moe_experts(mx, select(e13, 0), e2, ids, wts), "expert weights are stacks"),
        (lambda: asc.moe_experts(mx[:, :30], e13, e2, ids, wts), "do not chain"),
    ]
    for call, why in cases:
        with pytest.raises(OpUnsupported, match=why):
            call()
    assert asc.linear(x, S).shape == (5, 16)              # float32 (emulated): the recipe's own arithmetic
    bound = get_backend("ascend")                          # through the registry: the reference, one warning
    with pytest.warns(RuntimeWarning, match="linear falls back.*weight weight is .w4a8_dynamic.; the backend runs dense, w8a8_dynamic, w8a8_static"):
        assert torch.equal(bound.linear(x, w4), ref.linear(x, w4))
    assert bound.ran_natively()["linear"] == "fallback"


def calibrated_w8a8(model, prompts):
    """msModelSlim's GLM-5 W8A8 mix built from `model`'s float weights: the attention projections
    (q_a, q_b, kv_a, o, the indexer's q_b) w8a8_static with an input scale and offset calibrated on
    the prompts, the dense MLP, shared and routed experts w8a8_dynamic; kv_b, the indexer's wk and
    weights_proj, the router and lm_head stay float. -> [(layer index, attribute path, Weight)]."""
    amax, lin = {}, model.ops.linear

    def spy(x, w, **kw):
        if x.numel():
            amax[id(w)] = max(amax.get(id(w), 0.0), float(x.abs().max()))
        return lin(x, w, **kw)
    model.ops.linear = spy
    try:
        model(prompts)
    finally:
        model.ops.linear = lin
    out = []
    for i, L in enumerate(model.net.layers):
        static = [("wq_a", L.wq_a), ("wq_b", L.wq_b), ("wkv_a", L.wkv_a), ("wo", L.wo)]
        if L.indexer is not None:
            static.append(("indexer.wq_b", L.indexer.wq_b))
        for name, w in static:
            out.append((i, name, quantize_weight(w.data, "w8a8_static", input_scale=amax[id(w)] * 1.1 / 125,
                                                 input_offset=2)))
        for name in ("w13", "w2", "s_w13", "s_w2"):
            w = getattr(L, name)
            if w is not None:
                out.append((i, name, qw13(w.data, "w8a8_dynamic") if name.endswith("13") else
                            qweight(w.data, "w8a8_dynamic")))
        if L.e_w13 is not None:
            out.append((i, "e_w13", stack([qw13(w, "w8a8_dynamic") for w in L.e_w13.data])))
            out.append((i, "e_w2", stack([qweight(w, "w8a8_dynamic") for w in L.e_w2.data])))
    return out


def install(model, weights):
    for i, path, w in weights:
        obj, *rest = path.split(".")
        target = model.net.layers[i]
        if rest:
            target, path = getattr(target, obj), rest[0]
        setattr(target, path, w)


def test_tiny_model_w8a8_greedy_tokens_match_cpu_ref(emulate, tmp_path):
    """A tiny model with msModelSlim's W8A8 mix (static attention projections, dynamic MLP and
    experts; the SAME quantised weights on both sides): the emulated Ascend backend runs linear, mlp
    and moe_experts natively on the int8 ops and gives cpu_ref's greedy tokens; each quantised weight
    is prepared once for the whole generation."""
    GLM52 = _glm52()
    path = make_tiny_checkpoint(tmp_path / "w8a8", layers=2, seed=4, index_topk=8)
    cpu = GLM52(path, backend="cpu_ref", progress=False)
    npu = GLM52(path, backend="ascend", progress=False)
    prompts = _prompts(cpu.cfg.vocab_size)
    weights = calibrated_w8a8(cpu, prompts)
    assert {w.format for _, _, w in weights} == {"w8a8_static", "w8a8_dynamic"}
    install(cpu, weights)
    install(npu, [(i, path, npu.ops.prepare_weight(path, w, dtype=npu.dtype)) for i, path, w in weights])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = npu.generate(prompts, max_new_tokens=6, stop_at_eos=False, prefill_chunk=8)
    want = cpu.generate(prompts, max_new_tokens=6, stop_at_eos=False, prefill_chunk=8)
    assert got.tokens == want.tokens
    ops = got.stats["ops"]
    assert ops["linear"] == ops["mlp"] == ops["moe_experts"] == "native"
    fell_back = [str(w.message) for w in caught if "falls back" in str(w.message)]
    assert not [m for m in fell_back if any(f"{op} falls back" in m for op in ("linear", "mlp", "moe_experts"))]
    assert npu.ops.backend.preparations == 0                               # prepared once, at install
    for a, b in zip(npu(prompts), cpu(prompts)):                           # logits: float32 row
        assert float((a - b).abs().max()) <= 3e-5 * float(b.abs().max())


# ---- mtp_verify --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p,with_q", [(0.0, 1.0, False), (0.8, 1.0, False), (1.0, 0.9, True)])
def test_mtp_verify_matches_reference(asc, temperature, top_p, with_q):
    g = gen(int(temperature * 10) + with_q)
    B, k, V = 7, 3, 11
    logits = torch.randn(B, k + 1, V, generator=g) * 2
    best = logits.argmax(-1)
    draft = torch.randint(0, V, (B, k), generator=g)
    draft[:3] = best[:3, :k]                                       # some fully accepted under greedy
    draft[3, :1] = best[3, :1]
    dq = torch.softmax(torch.randn(B, k, V, generator=g), -1) if with_q else None
    u = torch.rand(B, k + 1, generator=g)
    u[0] = 0.0                                                     # accept everything it can
    acc, tok = asc.mtp_verify(draft, logits, dq, temperature, top_p, u)
    acc_r, tok_r = ref.mtp_verify(draft, logits, dq, temperature, top_p, u)
    assert acc.dtype == torch.int32 and tok.dtype == torch.int64
    assert torch.equal(acc, acc_r) and torch.equal(tok, tok_r)


# ---- supporting ops ----------------------------------------------------------------------------------------

def test_supporting_ops_against_reference(asc):
    g = gen(21)
    x = torch.randn(5, 3, 16, generator=g)
    w = 1 + 0.1 * torch.randn(16, generator=g)
    assert torch.allclose(asc.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6, cdt=F64), atol=1e-5)
    w13, w2 = torch.randn(12, 16, generator=g), torch.randn(16, 6, generator=g)
    for a13, a2 in ((w13, w2), (Weight(w13), Weight(w2))):
        assert torch.allclose(asc.mlp(x, a13, a2), ref.mlp(x, w13, w2, cdt=F64), atol=1e-4)
        assert torch.allclose(asc.linear(x, a13), ref.linear(x, w13, cdt=F64), atol=1e-5)
    b = torch.randn(16, generator=g)
    assert torch.allclose(asc.layer_norm(x, w, b, 1e-6), ref.layer_norm(x, w, b, 1e-6, cdt=F64), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_goes_through_npu_interleave_rope(dtype):
    """rope -> npu_interleave_rope with x as [T, N, 1, 64] and cos/sin [T, 1, 1, 64] (the layout
    vllm-ascend rotates q_pe in), the result back in GPT-J pairs: equal to the reference on the MLA
    q_pe slice [T, H, 64] of a wider tensor and on the shared key [T, 64]; npu_rotary_mul unused."""
    be = traced(allow_float32=dtype == torch.float32)
    g = gen(36)
    q = torch.randn(7, 5, 192 + 64, generator=g).to(dtype)
    k = torch.randn(7, 64, generator=g).to(dtype)
    pos = torch.tensor([0, 1, 17, 255, 1000, 4095, 70000])
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    for x in (q[..., 192:], k):
        y = be.rope(x, pos, 8e6 if x is k else 1e4)
        want = ref.rope(x, pos, 8e6 if x is k else 1e4, cdt=F64)
        assert y.shape == x.shape and y.dtype == dtype and rel_err(y, want) <= tol
    names = [c.name for c in be.npu.calls]
    assert names == ["npu_interleave_rope"] * 2
    x_in, cos, sin = be.npu.calls[0].args
    assert x_in.shape == (7, 5, 1, 64) and cos.shape == sin.shape == (7, 1, 1, 64) and cos.dtype == dtype
    with pytest.raises(OpUnsupported, match="npu_interleave_rope needs a rotary width of 64, got 8"):
        be.rope(q[..., :8], pos, 1e4)
    with pytest.raises(OpUnsupported, match="npu_interleave_rope takes bfloat16/float16"):
        traced(allow_float32=False).rope(k.float(), pos, 1e4)


# ---- documented limits fall back with one warning ------------------------------------------------------------

def test_documented_limits_fall_back_to_the_reference(emulate):
    bound = get_backend("ascend")
    assert bound.name == EMULATED_NAME
    g = gen(5)
    (cache,), table, lens, cu, _ = batch([(2, 9), (1, 4)], 8, g, (16,), torch.float32)   # Di 16, block size 8
    q, w = torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, generator=g)
    with pytest.warns(RuntimeWarning, match="indexer_topk falls back.*index head dim 128"):
        idx = bound.indexer_topk(q, w, cache, table, lens, cu, 4)
    assert torch.equal(idx, ref.indexer_topk(q, w, cache, table, lens, cu, 4))
    (c, kpe), table, lens, cu, _ = batch([(2, 9), (1, 4)], 8, g, (512, 64), torch.float32)
    qa = torch.randn(3, 4, 576, generator=g)
    sel = torch.tensor([[0, 3, -1], [8, 1, 2], [0, -1, -1]], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="sparse_mla falls back.*multiple of 16"):
        out = bound.sparse_mla(qa, c, kpe, sel, table, lens, cu, 0.1)
    assert torch.equal(out, ref.sparse_mla(qa, c, kpe, sel, table, lens, cu, 0.1))
    with pytest.warns(RuntimeWarning, match="moe_route falls back.*renormalises"):
        bound.moe_route(torch.randn(3, 8, generator=g), torch.zeros(8), 2, 1, 1, False, 1.0)
    calls = bound.ran_natively()
    assert calls["indexer_topk"] == calls["sparse_mla"] == calls["moe_route"] == "fallback"
    with warnings.catch_warnings():                               # one warning per op, not per call
        warnings.simplefilter("error")
        bound.moe_route(torch.randn(3, 8, generator=g), torch.zeros(8), 2, 1, 1, False, 1.0)
    assert bound.calls["moe_route"] == {"native": 0, "fallback": 2}


# ---- the model ------------------------------------------------------------------------------------------------

def _glm52():
    from glm52_backends import GLM52
    return GLM52


def _prompts(V):
    g = gen(7)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in (11, 4, 17)]


@pytest.mark.parametrize("dims", ["tiny", "attention-dims"])
def test_tiny_model_greedy_tokens_match_cpu_ref(emulate, tmp_path, dims):
    """'tiny': the default tiny checkpoint (index head dim 16, latent 32, rotary width 8): the two
    attention ops and rope fall back, the rest runs on the emulated torch_npu ops. 'attention-dims':
    the tiny model with the real attention widths (index head dim 128, latent 512 + rope 64) and the
    default block size 128, so every hot op runs natively."""
    GLM52 = _glm52()
    over = {} if dims == "tiny" else dict(kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128)
    path = make_tiny_checkpoint(tmp_path / dims, layers=2, seed=4, index_topk=8, **over)
    cpu = GLM52(path, backend="cpu_ref", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bs = get_backend("ascend").capabilities.get("default_block_size")        # 128
        npu = GLM52(path, backend="ascend", progress=False, block_size=bs)
        prompts = _prompts(cpu.cfg.vocab_size)
        got = npu.generate(prompts, max_new_tokens=6, stop_at_eos=False, prefill_chunk=8)
    want = cpu.generate(prompts, max_new_tokens=6, stop_at_eos=False, prefill_chunk=8)
    assert got.tokens == want.tokens
    assert got.stats["backend"] == "ascend (emulated)"
    ops = got.stats["ops"]
    assert ops["moe_experts"] == ops["moe_route"] == ops["rms_norm"] == "native"
    fell_back = {str(w.message) for w in caught if "falls back" in str(w.message)}
    if dims == "tiny":   # rotary width 8: npu_interleave_rope takes 64 only
        assert ops["indexer_topk"] == ops["sparse_mla"] == ops["rope"] == "fallback" and len(fell_back) == 3
    else:
        assert ops["indexer_topk"] == ops["sparse_mla"] == ops["rope"] == "native" and not fell_back


def test_model_step_sorts_no_indices_and_shares_them(tmp_path, monkeypatch):
    """A model step on the emulated backend: every layer's npu_sparse_flash_attention gets the
    indices of the step's indexer call of its own full layer, IndexShare layers the same tensor,
    and nothing in the step sorts indices (no per-layer reorder)."""
    GLM52 = _glm52()
    path = make_tiny_checkpoint(tmp_path / "share", layers=3, seed=5, index_topk=8, kv_lora_rank=512,
                                qk_rope_head_dim=64, index_head_dim=128)
    be = traced()
    model = GLM52(path, backend=be, progress=False, block_size=128)
    kinds = list(model.cfg.indexer_types)
    assert "shared" in kinds and "full" in kinds
    cache = model.new_cache(3 * 128)                                        # a block per request
    prompts = _prompts(model.cfg.vocab_size)
    for chunks in (dict(enumerate(prompts)), {0: [1], 1: [2], 2: [3]}):       # prefill, then decode
        be.npu.calls.clear()
        with BackendOps(be.npu, monkeypatch) as mode:
            model.extend(cache, chunks)
        li = [c for c in be.npu.calls if c.name == "npu_lightning_indexer"]
        sfa = [c for c in be.npu.calls if c.name == "npu_sparse_flash_attention"]
        assert len(li) == kinds.count("full") and len(sfa) == len(kinds)
        owner = {}
        for layer, (kind, call) in enumerate(zip(kinds, sfa)):
            if kind == "full":
                owner = storage(call.args[3])
            assert storage(call.args[3]) == owner, f"layer {layer} ({kind}) got other indices"
        assert len({storage(c.args[3]) for c in sfa}) == kinds.count("full")
        assert sorts(mode) == [], sorts(mode)


def test_graph_capture_stand_in_records_the_npu_ops_and_replays_them(emulate, tmp_path):
    """The NPU-graph stand-in ("trace"): the emulated torch_npu ops are device kernels (their reads of
    their inputs are the device's), so a decode step with every hot op native is captured, one
    glm52::<op>.ascend_emulated node per op call, and its replays (plain and MTP speculative, k = 2)
    give eager's greedy tokens. A host read in the backend's own code around the ops still refuses."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from glm52_backends.engine.graph import GraphUnavailable, StaticDecode
    from glm52_backends.engine.host_reads import HostReads
    GLM52 = _glm52()
    path = make_tiny_checkpoint(tmp_path / "graph", layers=2, seed=4, index_topk=8, kv_lora_rank=512,
                                qk_rope_head_dim=64, index_head_dim=128, mtp=True)
    bs = get_backend("ascend").capabilities.get("default_block_size")
    m = GLM52(path, backend="ascend", progress=False, block_size=bs)
    prompts = _prompts(m.cfg.vocab_size)
    for kw in (dict(), dict(speculative=2)):
        eager = m.generate(prompts, max_new_tokens=6, stop_at_eos=False, graph=False, **kw)
        graph = m.generate(prompts, max_new_tokens=6, stop_at_eos=False, graph="trace", **kw)
        assert graph.tokens == eager.tokens and graph.stats["graph_buckets"] == [4], kw
        assert not graph.stats["eager_buckets"]
        assert all(graph.stats["ops"][op] == "native" for op in ("indexer_topk", "sparse_mla", "moe_experts", "rope"))
    cache = m.new_cache(4 * bs)
    m.extend(cache, {0: prompts[0], 1: prompts[1]})
    sd = StaticDecode(m, cache, 2, "trace", strict=True)
    with HostReads(forbid=True):
        gm = make_fx(lambda *b: sd._forward(2, *b), tracing_mode="real")(*sd._inputs())
    nodes = [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("glm52.")]
    assert nodes.count("glm52.sparse_mla.ascend_emulated") == 2 and "glm52.indexer_topk.ascend_emulated" in nodes
    orig = m.ops.backend.sparse_mla

    def reads_host(*a, **k):                     # backend glue (not a device kernel) reading a length
        int(a[5][0])
        return orig(*a, **k)
    m.ops.backend.sparse_mla = reads_host
    m.generate_engine = None
    with pytest.raises(GraphUnavailable, match="reads tensor values on the host"):
        m.generate(prompts, max_new_tokens=3, graph="trace")


def test_tiny_model_bfloat16_documented_dtypes_all_native(tmp_path):
    """bfloat16 through the emulator restricted to the documented dtypes: every hot op native,
    greedy tokens equal to cpu_ref's in bfloat16, logits within the bfloat16 row (1.6e-2)."""
    GLM52 = _glm52()
    path = make_tiny_checkpoint(tmp_path / "bf16", layers=2, seed=4, index_topk=8, kv_lora_rank=512,
                                qk_rope_head_dim=64, index_head_dim=128)
    cpu = GLM52(path, backend="cpu_ref", dtype=torch.bfloat16, progress=False)
    npu = GLM52(path, backend=create(emulate=True, allow_float32=False), dtype=torch.bfloat16, progress=False)
    prompts = _prompts(cpu.cfg.vocab_size)
    got = npu.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    logits = npu(prompts)
    assert got.tokens == cpu.generate(prompts, max_new_tokens=6, stop_at_eos=False).tokens
    for a, b in zip(logits, cpu(prompts)):
        assert float((a - b).abs().max()) <= 1.6e-2 * float(b.abs().max())
    assert set(npu.ops.ran_natively().values()) <= {"native", "unused"}      # no fallback at all


def test_tiny_model_with_c8_caches_runs_every_hot_op_natively_and_captures(tmp_path):
    """int8 caches (c8_sfa latent + c8_li index keys, the 1M layout's) in bfloat16 through the emulator
    restricted to the documented dtypes: the model's own PagedCache views go to
    npu_quant_lightning_indexer and npu_kv_quant_sparse_flash_attention, every hot op native; logits
    within the bfloat16 row (1.6e-2) of cpu_ref's on the same cache formats (the C8 indexer quantizes its
    query: tokens may part at near-ties, so logits are the check); a captured decode ("trace"), plain
    and MTP speculative, gives eager's tokens."""
    GLM52 = _glm52()
    path = make_tiny_checkpoint(tmp_path / "c8", layers=2, seed=4, index_topk=8, kv_lora_rank=512,
                                qk_rope_head_dim=64, index_head_dim=128, mtp=True)
    cpu = GLM52(path, backend="cpu_ref", dtype=torch.bfloat16, progress=False, kv_cache_dtype="int8")
    npu = GLM52(path, backend=create(emulate=True, allow_float32=False), dtype=torch.bfloat16, progress=False,
                kv_cache_dtype="int8", block_size=128)
    assert (npu.kv_cache_format, npu.index_cache_format) == (cpu.kv_cache_format, cpu.index_cache_format) \
        == ("c8_sfa", "c8_li")
    prompts = _prompts(cpu.cfg.vocab_size)
    for a, b in zip(npu(prompts), cpu(prompts)):
        assert float((a - b).abs().max()) <= 1.6e-2 * float(b.abs().max())
    for kw in (dict(), dict(speculative=2)):
        eager = npu.generate(prompts, max_new_tokens=6, stop_at_eos=False, graph=False, **kw)
        graph = npu.generate(prompts, max_new_tokens=6, stop_at_eos=False, graph="trace", **kw)
        assert graph.tokens == eager.tokens and graph.stats["graph_buckets"] == [4], kw
    assert set(npu.ops.ran_natively().values()) <= {"native", "unused"}      # no fallback at all


# ---- without an NPU and without emulation ----------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_without_torch_npu_one_clear_error_and_others_keep_working(monkeypatch, tmp_path):
    GLM52 = _glm52()
    monkeypatch.delenv("GLM52_ASCEND_EMULATE", raising=False)
    path = make_tiny_checkpoint(tmp_path / "t", layers=2, seed=1, index_topk=8)
    with pytest.raises(BackendUnavailable) as e:
        GLM52(path, backend="ascend", progress=False)
    msg = str(e.value)
    v = torch.__version__.split("+")[0]
    for part in ("torch_npu", f"torch-npu=={v}", "CANN >= 8.5.0", "GLM52_ASCEND_EMULATE=1"):
        assert part in msg, (part, msg)
    assert "torch_npu" not in sys.modules
    info = {b.name: b for b in list_backends()}
    assert not info["ascend"].available and "torch-npu" in info["ascend"].reason
    assert info["cpu_ref"].available
    model = GLM52(path, backend="cpu_ref", progress=False)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.cfg.vocab_size)
    assert isinstance(get_backend("auto"), BoundBackend)          # auto skips ascend quietly


def test_emulation_env_values(monkeypatch):
    for val, on in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("GLM52_ASCEND_EMULATE", val)
        if on:
            b = create()
            assert b.name == EMULATED_NAME and b.emulated and b.device.type == "cpu" and b.priority < 0
        elif importlib.util.find_spec("torch_npu") is None:
            with pytest.raises(BackendUnavailable):
                create()
    with pytest.raises(TypeError, match="unknown options"):
        create(emulate=True, bogus=1)


def test_w8a8_checkpoint_moe_native_in_bfloat16_and_float16_with_its_float32_scales(emulate, tmp_path):
    """`make-tiny --quant w8a8` (msModelSlim float32 scales, as written) on the emulated backend: the int8
    MoE runs natively in bfloat16 (its expert scales rounded to bfloat16 values once at load, by
    `prepare_weight`, as vllm-ascend does) and in float16 (float32 scales as they are); greedy tokens
    equal cpu_ref's in the same dtype. Dense and non-expert weights are left as loaded."""
    GLM52 = _glm52()
    path = make_tiny_checkpoint(tmp_path / "w8a8", layers=2, seed=3, quant="w8a8", mtp=True)
    prompts = _prompts(256)
    for dt in (torch.bfloat16, torch.float16):
        npu = GLM52(path, backend="ascend", dtype=dt, progress=False)
        got = npu.generate(prompts, max_new_tokens=5, stop_at_eos=False)
        assert got.stats["ops"]["moe_experts"] == "native", dt
        ref = GLM52(path, backend="cpu_ref", dtype=dt, progress=False)
        assert got.tokens == ref.generate(prompts, max_new_tokens=5, stop_at_eos=False).tokens, dt
        moe = [L for L in npu.net.layers if L.e_w13 is not None]
        for L, R in zip(moe, [L for L in ref.net.layers if L.e_w13 is not None]):
            s, s0 = L.e_w13.scales, R.e_w13.scales
            assert s.dtype == s0.dtype == torch.float32
            if dt == torch.bfloat16:
                assert torch.equal(s, s.to(torch.bfloat16).float()) and not torch.equal(s, s0)
                assert float(((s - s0).abs() / s0.abs()).max()) <= 2 ** -8     # one bfloat16 rounding
            else:
                assert torch.equal(s, s0)
            assert L.wq_a is not None and torch.equal(L.wq_a.scales, R.wq_a.scales)   # attention untouched
