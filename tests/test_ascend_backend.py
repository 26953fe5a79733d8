"""The Ascend backend under its CPU emulator (GLM52_ASCEND_EMULATE=1): each op against the float64
reference on fresh random inputs (cache rows an op must not read poisoned with NaN), the attention
op reading the caller's caches in place, no host synchronisation with a StepMeta, documented limits
and other weight formats falling back with a warning, the tiny model's greedy tokens, and the error
without torch_npu and without emulation."""

import importlib.util
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from glm52_backends import ops as ref
from glm52_backends.backends.ascend import EMULATED_NAME, create
from glm52_backends.backends.ascend.backend import AscendBackend
from glm52_backends.backends.ascend.common import AscendStep
from glm52_backends.backends.ascend.emulator import NpuEmulator
from glm52_backends.ops import OP_NAMES, Capabilities, OpUnsupported, check_signature
from glm52_backends.registry import BackendUnavailable, BoundBackend, get_backend, list_backends
from glm52_backends.step import StepMeta
from glm52_backends.tiny import make_tiny_checkpoint
from glm52_backends.weights import Weight

F64 = torch.float64


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setenv("GLM52_ASCEND_EMULATE", "1")


@pytest.fixture(scope="module")
def asc():
    return create(emulate=True)                         # float32 allowed in the attention ops


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
    assert caps.weight_formats == ("dense",) and caps.cache_formats == ("dense",) and caps.devices == ("cpu",)
    assert caps.max_topk == 8192 and 16 in caps.block_sizes and 1024 in caps.block_sizes
    assert 8 not in caps.block_sizes and 24 not in caps.block_sizes and 1040 not in caps.block_sizes
    assert caps.get("emulated") is True and BoundBackend(asc).capabilities.get("max_topk") == 8192
    for mod in ("backend", "common", "indexer_topk", "sparse_mla"):        # StepMeta.positions replaced it
        assert not hasattr(sys.modules[f"glm52_backends.backends.ascend.{mod}"], "token_positions"), mod


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
    meta = StepMeta.from_tensors(table, lens, cu, bs)
    assert torch.equal(be.indexer_topk(q, w, cache, table, lens, cu, topk, meta=meta), idx)
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
    meta = StepMeta.from_tensors(table, lens, cu, bs)
    assert torch.equal(be.sparse_mla(q, c, kpe, idx, table, lens, cu, scale, meta=meta), out)


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
            self.calls.append(SimpleNamespace(name=name, args=args, kwargs=kwargs))
            self.inside += 1
            try:
                return attr(*args, **kwargs)
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


def test_paged_ops_with_step_meta_use_prepared_data_and_make_no_host_sync(monkeypatch):
    """With a StepMeta (and the per-step data prepare_step built once), indexer_topk and
    sparse_mla read nothing back from the device outside the torch_npu calls, reuse the prepared
    block table and lengths, and equal the results of calls without a meta."""
    npu = TracingNpu(NpuEmulator())
    be = AscendBackend(npu, name="traced", device=torch.device("cpu"), priority=0, default_dtype=torch.float32)
    bound = BoundBackend(be)
    g = gen(13)
    bs, topk = 16, 8
    (c, kpe, k_idx), table, lens, cu, _ = batch(REQS, bs, g, (512, 64, 128), torch.float32)
    T = int(cu[-1])
    q, qi = torch.randn(T, 4, 576, generator=g), torch.randn(T, 3, 128, generator=g)
    w = torch.randn(T, 3, generator=g)
    meta = StepMeta.from_tensors(table, lens, cu, bs)
    with BackendOps(npu, monkeypatch) as mode:
        bound.prepare_step(meta)
        idx = bound.indexer_topk(qi, w, k_idx, table, lens, cu, topk, meta=meta)
        out = bound.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, meta=meta)
    assert mode.syncs == []
    assert bound.ran_natively()["indexer_topk"] == bound.ran_natively()["sparse_mla"] == "native"
    st = meta.backend_data
    assert isinstance(st, AscendStep)
    for call in npu.calls:
        if call.name in ("npu_lightning_indexer", "npu_sparse_flash_attention"):
            assert call.kwargs["block_table"] is st.block_table and call.kwargs["actual_seq_lengths_query"] is st.act_q
    assert torch.equal(st.act_q, cu[1:]) and torch.equal(st.act_kv, lens) and torch.equal(st.positions, meta.positions)
    assert torch.equal(idx, be.indexer_topk(qi, w, k_idx, table, lens, cu, topk))
    assert torch.equal(out, be.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1))


def test_paged_ops_name_a_step_meta_that_contradicts_the_call(asc):
    g = gen(14)
    (c, kpe), table, lens, cu, _ = batch([(2, 9), (1, 30)], 16, g, (512, 64), torch.float32)
    q = torch.randn(3, 4, 576, generator=g)
    idx = torch.tensor([[0, 3, -1], [8, 1, 2], [5, -1, 29]], dtype=torch.int32)
    other = StepMeta.from_tensors(table[:1], lens[:1], cu[:2], 16)
    with pytest.raises(ValueError, match="sparse_mla: the step metadata has 2 query tokens, q has 3"):
        asc.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, meta=other)
    with pytest.raises(ValueError, match="block size 32, the cache has 16"):
        asc.sparse_mla(q, c, kpe, idx, table, lens, cu, 0.1, meta=StepMeta.from_tensors(table, lens, cu, 32))
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
        with pytest.raises(OpUnsupported, match="format 'fp8_block'; this backend runs dense weights only"):
            call(asc)
    bound = get_backend("ascend")
    with pytest.warns(RuntimeWarning, match="linear falls back.*fp8_block"):
        assert torch.equal(bound.linear(x, w13), ref.linear(x, w13))
    with pytest.warns(RuntimeWarning, match="mlp falls back"):
        assert torch.equal(bound.mlp(x, w13, w2), ref.mlp(x, w13, w2))
    with pytest.warns(RuntimeWarning, match="moe_experts falls back"):
        assert torch.equal(bound.moe_experts(x, e13, e2, ids, wts), ref.moe_experts(x, e13, e2, ids, wts))
    assert {bound.ran_natively()[op] for op in ("linear", "mlp", "moe_experts")} == {"fallback"}


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
    pos = torch.tensor([0, 3, 17, 1000, 4095])
    for t in (x[..., :8], x[:, 0, :8]):                           # [T, H, Dr] slice and [T, Dr]
        assert torch.allclose(asc.rope(t, pos, 10000.0), ref.rope(t, pos, 10000.0, cdt=F64), atol=1e-5)
    w13, w2 = torch.randn(12, 16, generator=g), torch.randn(16, 6, generator=g)
    for a13, a2 in ((w13, w2), (Weight(w13), Weight(w2))):
        assert torch.allclose(asc.mlp(x, a13, a2), ref.mlp(x, w13, w2, cdt=F64), atol=1e-4)
        assert torch.allclose(asc.linear(x, a13), ref.linear(x, w13, cdt=F64), atol=1e-5)
    b = torch.randn(16, generator=g)
    assert torch.allclose(asc.layer_norm(x, w, b, 1e-6), ref.layer_norm(x, w, b, 1e-6, cdt=F64), atol=1e-5)


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
    """'tiny': the default tiny checkpoint (index head dim 16, latent 32): the two attention ops fall
    back, the rest runs on the emulated torch_npu ops. 'attention-dims': the tiny model with the real
    attention widths (index head dim 128, latent 512 + rope 64), so every hot op runs natively."""
    GLM52 = _glm52()
    over = {} if dims == "tiny" else dict(kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128)
    path = make_tiny_checkpoint(tmp_path / dims, layers=2, seed=4, index_topk=8, **over)
    cpu = GLM52(path, backend="cpu_ref", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        npu = GLM52(path, backend="ascend", progress=False)
        prompts = _prompts(cpu.cfg.vocab_size)
        got = npu.generate(prompts, max_new_tokens=6, stop_at_eos=False, prefill_chunk=8)
    want = cpu.generate(prompts, max_new_tokens=6, stop_at_eos=False, prefill_chunk=8)
    assert got.tokens == want.tokens
    assert got.stats["backend"] == "ascend (emulated)"
    ops = got.stats["ops"]
    assert ops["moe_experts"] == ops["moe_route"] == ops["rms_norm"] == ops["rope"] == "native"
    fell_back = {str(w.message) for w in caught if "falls back" in str(w.message)}
    if dims == "tiny":
        assert ops["indexer_topk"] == ops["sparse_mla"] == "fallback" and len(fell_back) == 2
    else:
        assert ops["indexer_topk"] == ops["sparse_mla"] == "native" and not fell_back


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
