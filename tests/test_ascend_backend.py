"""The Ascend backend under its CPU emulator (GLM52_ASCEND_EMULATE=1): each op against the cpu_ref
functions on fresh random inputs, documented limits falling back with a warning, the tiny model's
greedy tokens, and the error without torch_npu and without emulation."""

import importlib.util
import sys
import warnings

import pytest
import torch

from glm52_backends import GLM52
from glm52_backends.backends.ascend import EMULATED_NAME, create
from glm52_backends.backends.cpu_ref import ops as ref
from glm52_backends.registry import BackendUnavailable, BoundBackend, get_backend, list_backends
from glm52_backends.tiny import make_tiny_checkpoint

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


def batch(reqs, bs, g, D, dtype, n_extra=2):
    """Paged cache [NB, BS, D] (unowned slots NaN), block table, seq_lens, cu_seqlens_q, and the dense rows."""
    need = [-(-L // bs) for _, L in reqs]
    NB = sum(need) + n_extra
    perm = torch.randperm(NB, generator=g)
    cache = torch.full((NB, bs, D), float("nan"), dtype=dtype)
    table = torch.zeros(len(reqs), max(need), dtype=torch.int32)
    dense, used = [], 0
    for b, (_, L) in enumerate(reqs):
        rows = torch.randn(L, D, generator=g).to(dtype)
        blocks = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = blocks.int()
        for p in range(L):
            cache[blocks[p // bs], p % bs] = rows[p]
        dense.append(rows)
    cu = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([q for q, _ in reqs]).cumsum(0)
    return cache, table, torch.tensor([L for _, L in reqs], dtype=torch.int32), cu, dense


REQS = [(1, 1), (3, 40), (7, 7), (1, 100), (0, 5), (2, 19)]   # decode, chunk, prefill, long, empty, odd


# ---- indexer_topk ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,bs,topk", [(torch.float32, 16, 16), (torch.bfloat16, 32, 24)])
def test_indexer_topk_valid_against_reference(asc, asc_strict, dtype, bs, topk):
    be = asc if dtype == torch.float32 else asc_strict
    g = gen(bs)
    Hi, Di = 5, 128
    cache, table, lens, cu, dense = batch(REQS, bs, g, Di, dtype)
    T = int(cu[-1])
    q = torch.randn(T, Hi, Di, generator=g).to(dtype)
    w = torch.randn(T, Hi, generator=g) * Hi ** -0.5 * Di ** -0.5
    idx = be.indexer_topk(q, w, cache, table, lens, cu, topk)
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
    cache, table, lens, cu, _ = batch(REQS, 16, g, 576, dtype)
    T, topk = int(cu[-1]), 12
    q = torch.randn(T, H, 576, generator=g).to(dtype)
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    t = 0
    for Lq, L in REQS:
        for i in range(Lq):
            pos = L - Lq + i
            n = min(topk, pos + 1) if (t + i) % 4 else 0               # every 4th row: no index
            sel = torch.randperm(pos + 1, generator=g)[:n].int()
            slots = torch.randperm(topk, generator=g)[:n]              # -1 scattered, not only at the end
            idx[t + i, slots] = sel
        t += Lq
    scale = 192 ** -0.5
    out, lse = be.sparse_mla(q, cache, idx, table, lens, cu, scale, v_dim=512)
    o_ref, lse_ref = ref.sparse_mla(q, cache, idx, table, lens, cu, scale, v_dim=512, cdt=F64)
    assert out.shape == (T, H, 512) and out.dtype == dtype and lse.shape == (T, H) and lse.dtype == torch.float32
    tol = 3e-5 if dtype == torch.float32 else 1.6e-2
    assert float((out.double() - o_ref.double()).abs().max()) <= tol * float(o_ref.double().abs().max())
    empty = (idx < 0).all(-1)
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
    assert torch.allclose(lse[~empty].double(), lse_ref[~empty].double(), atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_against_reference(asc, dtype):
    g = gen(3)
    T, Hd, I, E, K = 9, 24, 10, 6, 3
    x = torch.randn(T, Hd, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, Hd, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(E, Hd, I, generator=g) * 0.2).to(dtype)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])     # expert E-1 stays empty
    ids[2, 1] = -1                                                                     # unused slots
    ids[5, 0] = -1
    wts = torch.rand(T, K, generator=g)
    y = asc.moe_experts(x, w13, w2, ids, wts)
    y_r = ref.moe_experts(x, w13, w2, ids, wts, cdt=F64)
    tol = 3e-5 if dtype == torch.float32 else 1.6e-2
    assert y.dtype == dtype and y.shape == (T, Hd)
    assert float((y.double() - y_r.double()).abs().max()) <= tol * float(y_r.double().abs().max())


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
    assert torch.allclose(asc.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), atol=1e-5)
    pos = torch.tensor([0, 3, 17, 1000, 4095])
    for t in (x[..., :8], x[:, 0, :8]):                           # [T, H, Dr] slice and [T, Dr]
        assert torch.allclose(asc.rope(t, pos, 10000.0), ref.rope(t, pos, 10000.0), atol=1e-5)
    w13, w2 = torch.randn(12, 16, generator=g), torch.randn(16, 6, generator=g)
    assert torch.allclose(asc.mlp(x, w13, w2), ref.mlp(x, w13, w2), atol=1e-4)
    b = torch.randn(16, generator=g)
    assert torch.allclose(asc.layer_norm(x, w, b, 1e-6), ref.layer_norm(x, w, b, 1e-6), atol=1e-5)
    assert torch.allclose(asc.linear(x, w13), ref.linear(x, w13), atol=1e-5)


# ---- documented limits fall back with one warning ------------------------------------------------------------

def test_documented_limits_fall_back_to_the_reference(emulate):
    bound = get_backend("ascend")
    assert bound.name == EMULATED_NAME
    g = gen(5)
    cache, table, lens, cu, _ = batch([(2, 9), (1, 4)], 8, g, 16, torch.float32)     # Di 16, block size 8
    q, w = torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, generator=g)
    with pytest.warns(RuntimeWarning, match="indexer_topk falls back.*index head dim 128"):
        idx = bound.indexer_topk(q, w, cache, table, lens, cu, 4)
    assert torch.equal(idx, ref.indexer_topk(q, w, cache, table, lens, cu, 4))
    kv, table, lens, cu, _ = batch([(2, 9), (1, 4)], 8, g, 576, torch.float32)
    qa = torch.randn(3, 4, 576, generator=g)
    sel = torch.tensor([[0, 3, -1], [8, 1, 2], [0, -1, -1]], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="sparse_mla falls back.*multiple of 16"):
        out, _ = bound.sparse_mla(qa, kv, sel, table, lens, cu, 0.1)
    assert torch.equal(out, ref.sparse_mla(qa, kv, sel, table, lens, cu, 0.1)[0])
    with pytest.warns(RuntimeWarning, match="moe_route falls back.*renormalises"):
        bound.moe_route(torch.randn(3, 8, generator=g), torch.zeros(8), 2, 1, 1, False, 1.0)
    calls = bound.ran_natively()
    assert calls["indexer_topk"] == calls["sparse_mla"] == calls["moe_route"] == "fallback"
    with warnings.catch_warnings():                               # one warning per op, not per call
        warnings.simplefilter("error")
        bound.moe_route(torch.randn(3, 8, generator=g), torch.zeros(8), 2, 1, 1, False, 1.0)
    assert bound.calls["moe_route"] == {"native": 0, "fallback": 2}


# ---- the model ------------------------------------------------------------------------------------------------

def _prompts(V):
    g = gen(7)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in (11, 4, 17)]


@pytest.mark.parametrize("dims", ["tiny", "attention-dims"])
def test_tiny_model_greedy_tokens_match_cpu_ref(emulate, tmp_path, dims):
    """'tiny': the default tiny checkpoint (index head dim 16, latent 32): the two attention ops fall
    back, the rest runs on the emulated torch_npu ops. 'attention-dims': the tiny model with the real
    attention widths (index head dim 128, latent 512 + rope 64), so every hot op runs natively."""
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
