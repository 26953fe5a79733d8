"""The generic `torch` backend and the example vendor plugin, checked against float64 references.

Inputs are fresh random tensors at odd sizes; the oracle is the reference op in float64 (or, for
the indexer, the score formula written out here). The vendor plugin is pip-installed offline into a
temporary folder and found through its entry point, as a real vendor package would be.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from glm52_backends.quant import QUANT_FORMATS

from glm52_backends import ops as ref
from glm52_backends.ops._paged import gather_paged
from glm52_backends.backends.generic import TorchDeviceBackend, create
from glm52_backends.ops import OP_NAMES
from glm52_backends.registry import BackendUnavailable, get_backend, list_backends
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

F64 = torch.float64
PLUGIN_SRC = Path(__file__).parent / "vendor_plugin"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


# ---- inputs ---------------------------------------------------------------------------------------
def _batch(g, seq_lens=(7, 13, 1, 5), q_lens=(1, 4, 1, 0), bs=4):
    """Paged layout for requests of `seq_lens` total tokens, `q_lens` of them in this step."""
    blocks = [-(-n // bs) for n in seq_lens]
    nb = sum(blocks) + 3                                                     # + unused (poison) blocks
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(L - q, L) for L, q in zip(seq_lens, q_lens)])
    return dict(nb=nb, bs=bs, table=table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), cu=cu, pos=pos)


def _moe_inputs(g, T=7, Hd=24, I=10, E=6, K=3, dtype=torch.float32):
    x = torch.randn(T, Hd, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, Hd, generator=g) / Hd ** 0.5).to(dtype)
    w2 = (torch.randn(E, Hd, I, generator=g) / I ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])   # expert E-1 stays empty
    ids[1, 2] = -1                                                                  # an unused slot
    ids[3, :] = -1                                                                  # a token with no expert
    wts = torch.rand(T, K, generator=g)
    return x, w13, w2, ids, wts


# ---- the generic backend on the CPU ----------------------------------------------------------------
@pytest.fixture(scope="module")
def generic():
    return get_backend("torch", device="cpu")


def test_generic_is_native_for_every_op_and_wins_auto_on_cpu(generic):
    assert set(generic.native_ops) == set(OP_NAMES)
    assert generic.backend.device == torch.device("cpu") and generic.backend.priority == 1
    info = {b.name: b for b in list_backends()}
    assert info["torch"].available and set(info["torch"].native_ops) == set(OP_NAMES)
    assert get_backend("auto").name == "torch"  # above cpu_ref (0); no accelerator backend loads here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk_is_valid_against_the_score_formula(generic, dtype):
    g = torch.Generator().manual_seed(1)
    bt = _batch(g)
    T, Hi, Di, topk = int(bt["cu"][-1]), 3, 16, 6
    q = torch.randn(T, Hi, Di, generator=g).to(dtype)
    w = torch.randn(T, Hi, generator=g)
    kc = torch.randn(bt["nb"], bt["bs"], Di, generator=g).to(dtype)
    idx = generic.indexer_topk(q, w, kc, bt["table"], bt["seq_lens"], bt["cu"], topk)
    assert idx.shape == (T, topk) and idx.dtype == torch.int32
    cu = bt["cu"].tolist()
    for b in range(len(bt["seq_lens"])):
        L = int(bt["seq_lens"][b])
        k = gather_paged(kc, bt["table"][b], L).to(F64)                       # [L, Di]
        for t in range(cu[b], cu[b + 1]):
            pos = int(bt["pos"][t])
            score = (w[t].to(F64)[:, None] * torch.relu(q[t].to(F64) @ k.T)).sum(0)[:pos + 1]   # [pos+1]
            n = min(topk, pos + 1)
            row = idx[t].tolist()
            assert all(i == -1 for i in row[n:]) and all(0 <= i <= pos for i in row[:n])
            assert len(set(row[:n])) == n
            kth = score.sort(descending=True).values[n - 1]
            assert (score[row[:n]] >= kth - 1e-4 * (1 + kth.abs())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_matches_float64_reference(generic, dtype):
    g = torch.Generator().manual_seed(2)
    bt = _batch(g)
    T, H, Dl, Dr, topk = int(bt["cu"][-1]), 5, 24, 8, 6
    q = torch.randn(T, H, Dl + Dr, generator=g).to(dtype)
    kv = torch.randn(bt["nb"], bt["bs"], Dl + Dr, generator=g).to(dtype)
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    for t in range(T):                                                         # random causal positions
        n = min(topk - 1, int(bt["pos"][t]) + 1)
        idx[t, :n] = torch.randperm(int(bt["pos"][t]) + 1, generator=g)[:n].to(torch.int32)
    idx[0] = -1                                                                # a row with nothing to attend
    args = (idx, bt["table"], bt["seq_lens"], bt["cu"], (Dl + Dr) ** -0.5)
    c, kpe = kv[..., :Dl].contiguous(), kv[..., Dl:].contiguous()
    out, lse = generic.sparse_mla(q, c, kpe, *args, return_lse=True)
    want, want_lse = ref.sparse_mla(q.to(F64), c.to(F64), kpe.to(F64), *args, return_lse=True, cdt=F64)
    assert torch.equal(generic.sparse_mla(q, c, kpe, *args), out)       # out alone unless lse is asked for
    assert out.dtype == dtype and out.shape == (T, H, Dl) and lse.dtype == torch.float32
    torch.testing.assert_close(out.to(F64), want, **TOL[dtype])
    torch.testing.assert_close(lse.to(F64), want_lse.to(F64), rtol=1e-5, atol=1e-5)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_ops_match_float64_reference(generic, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 14, generator=g).to(dtype)
    wn, bn = torch.randn(14, generator=g).to(dtype), torch.randn(14, generator=g).to(dtype)
    cases = {
        "rms_norm": (x, wn, 1e-5),
        "layer_norm": (x, wn, bn, 1e-6),
        "rope": (x, torch.tensor([0, 3, 17, 1000, 65535]), 10000.0),
        "linear": (x[:, 0], (torch.randn(9, 14, generator=g) / 14 ** 0.5).to(dtype)),
        "mlp": (x[:, 0], (torch.randn(2 * 6, 14, generator=g) / 14 ** 0.5).to(dtype),
                (torch.randn(14, 6, generator=g) / 6 ** 0.5).to(dtype)),            # O(1) activations
        "moe_experts": _moe_inputs(g, dtype=dtype),
    }
    for op, args in cases.items():
        got = getattr(generic, op)(*args)
        want = getattr(ref, op)(*[a.to(F64) if torch.is_tensor(a) and a.is_floating_point() else a for a in args],
                                cdt=F64)
        assert got.dtype == dtype and got.shape == want.shape, op
        torch.testing.assert_close(got.to(F64), want, **TOL[dtype], msg=op)


def test_moe_route_and_mtp_verify_match_the_reference(generic):
    g = torch.Generator().manual_seed(4)
    logits, bias = torch.randn(9, 16, generator=g), torch.randn(16, generator=g) * 0.1
    ids, wts = generic.moe_route(logits, bias, 3, 4, 2, True, 2.5)
    rids, rwts = ref.moe_route(logits.to(F64), bias.to(F64), 3, 4, 2, True, 2.5, cdt=F64)
    order, rorder = ids.sort(-1), rids.sort(-1)
    assert torch.equal(order.values, rorder.values)
    torch.testing.assert_close(wts.gather(1, order.indices).to(F64), rwts.to(F64).gather(1, rorder.indices),
                               rtol=1e-5, atol=1e-6)
    B, k, V = 4, 3, 11
    tl = torch.randn(B, k + 1, V, generator=g)
    draft = tl[:, :k].argmax(-1)
    draft[1, 1] = (draft[1, 1] + 1) % V                                          # a miss in request 1
    dp = torch.softmax(torch.randn(B, k, V, generator=g), -1)
    u = torch.rand(B, k + 1, generator=g)
    for kw in (dict(), dict(draft_probs=dp, temperature=0.8, top_p=0.9, uniforms=u)):
        got = generic.mtp_verify(draft, tl, **kw)
        want = ref.mtp_verify(draft, tl.to(F64), **{**kw, **({"draft_probs": dp.to(F64)} if kw else {})}, cdt=F64)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert generic.calls["mtp_verify"] == {"native": 2, "fallback": 0}


def test_generic_model_matches_cpu_ref(tmp_path):
    ckpt = make_tiny_checkpoint(str(tmp_path / "ck"), mtp=True, layers=3, seed=5)
    from glm52_backends.engine import GLM52
    ids = torch.tensor([[5, 1, 99, 42, 7, 200, 3, 3, 18]])
    a = GLM52(ckpt, backend=create(device="cpu"), progress=False)
    b = GLM52(ckpt, backend="cpu_ref", progress=False)
    torch.testing.assert_close(a(ids), b(ids), rtol=1e-5, atol=1e-5)
    assert a.ops.ran_natively()["sparse_mla"] == "native"


# ---- devices ------------------------------------------------------------------------------------
def test_devices_that_are_not_here_say_what_is_missing():
    with pytest.raises(BackendUnavailable, match="torch_mlu"):
        create(device="mlu")
    with pytest.raises(BackendUnavailable, match="torch_musa"):
        get_backend("torch", device="musa:1")
    with pytest.raises(BackendUnavailable, match="does not know the device 'tpu9'"):
        create(device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no 'cuda' device is available"):
            create(device="cuda")
    with pytest.raises(BackendUnavailable, match="float32 or float64"):
        create(device="cpu", compute_dtype=torch.float16)


def test_an_input_on_another_device_is_named():
    meta = TorchDeviceBackend(device="meta")       # a device every torch has: the check runs on the CPU
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"rms_norm argument 0 is on cpu; move the inputs to meta"):
        meta.rms_norm(x, torch.ones(8, device="meta"), 1e-5)
    assert meta.rms_norm(x.to("meta"), torch.ones(8, device="meta"), 1e-5).device.type == "meta"


# ---- the example vendor plugin --------------------------------------------------------------------
def install_example_plugin(target: Path) -> Path:
    """pip-install tests/vendor_plugin (offline, no deps) into `target`; returns the site folder."""
    src = target / "src"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = target / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(site), str(src)],
                   check=True, capture_output=True, text=True)
    return site


@pytest.fixture(scope="module")
def plugin_installed(tmp_path_factory):
    site = install_example_plugin(tmp_path_factory.mktemp("vendor"))
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    for mod in [m for m in sys.modules if m.startswith("glm52_example_vendor")]:
        del sys.modules[mod]
    importlib.invalidate_caches()


def test_plugin_is_found_through_its_entry_point(plugin_installed):
    info = {b.name: b for b in list_backends()}
    assert "example_vendor" in info, sorted(info)
    ev = info["example_vendor"]
    assert ev.available and ev.source == "entry point" and "moe_experts" in ev.native_ops
    b = get_backend("example_vendor")
    assert type(b.backend).__module__.startswith("glm52_example_vendor")
    assert Path(sys.modules["glm52_example_vendor"].__file__).is_relative_to(plugin_installed)
    # its own op, not the reference's
    assert type(b.backend).moe_experts is not TorchDeviceBackend.__dict__.get("moe_experts")


@pytest.mark.parametrize("T,dtype", [(7, torch.float32), (1, torch.float32), (13, torch.bfloat16)])
def test_plugin_op_matches_cpu_ref(plugin_installed, T, dtype):
    b = get_backend("example_vendor")
    g = torch.Generator().manual_seed(10 + T)
    args = _moe_inputs(g, T=max(T, 4), Hd=20, I=12, E=8, K=3, dtype=dtype)
    args = tuple(a[:T] if i in (0, 3, 4) else a for i, a in enumerate(args))   # T tokens (edge: one)
    got = b.moe_experts(*args)
    want = ref.moe_experts(*[a.to(F64) if a.is_floating_point() else a for a in args], cdt=F64)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.to(F64), want, **TOL[dtype])
    assert b.calls["moe_experts"] == {"native": 1, "fallback": 0}


def test_plugin_declines_float64_and_falls_back(plugin_installed):
    b = get_backend("example_vendor")
    args = _moe_inputs(torch.Generator().manual_seed(20), dtype=F64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = b.moe_experts(*args)
    assert b.calls["moe_experts"] == {"native": 0, "fallback": 1}
    assert any("declined" in str(x.message) for x in w)
    torch.testing.assert_close(got, ref.moe_experts(*args, cdt=torch.float32))


def test_plugin_runs_the_model(plugin_installed, tmp_path):
    from glm52_backends.engine import GLM52
    ckpt = make_tiny_checkpoint(str(tmp_path / "ck"), layers=3, seed=6)
    ids = torch.tensor([[9, 8, 7, 6, 5, 4, 3]])
    a = GLM52(ckpt, backend="example_vendor", progress=False)
    b = GLM52(ckpt, backend="cpu_ref", progress=False)
    torch.testing.assert_close(a(ids), b(ids), rtol=1e-5, atol=1e-5)
    assert a.ops.ran_natively()["moe_experts"] == "native"


def test_plugin_passes_conformance(plugin_installed):
    """A vendor package is covered by registering: the same suite as the built-ins, no extra code."""
    from glm52_backends.conformance import run
    rep = run("example_vendor", quick=True)
    assert rep.passed, "\n".join(r.line() for r in rep.failures)
    moe = [r for r in rep.results if r.op == "moe_experts"]
    quantized = [r for r in moe if r.case.split("-")[0] in QUANT_FORMATS]
    assert len(moe) - len(quantized) >= 8 and all(r.path == "native" for r in moe if r not in quantized)
    assert quantized and all(r.path == "fallback" for r in quantized)   # the example declines non-dense weights
