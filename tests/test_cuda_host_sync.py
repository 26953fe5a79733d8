"""The cuda backend's paged ops make no host synchronisation, on any call.

Method. A host sync is the host waiting for the device: reading a device value back. In Python it
enters through a few torch entry points: `Tensor.item`, `.tolist`, `.__bool__`, `.__int__`,
`.__float__`, `.__index__`, `.nonzero`, `.cpu`, `.numpy` and `torch.nonzero`. A worker process
started with TRITON_INTERPRET=1 (the kernels run on CPU tensors in Triton's interpreter, so no GPU
is needed) replaces each of them with a wrapper that counts the call when it is made on behalf of
the cuda backend, then calls the original:
  - the calling frame is found by skipping torch's own Python frames (so `x.tolist()` reached
    through a torch wrapper is still attributed to the code that called the wrapper);
  - the call is counted when that frame's file is under backends/cuda/, or when it is core code
    (glm52_backends/, e.g. `step.token_requests` or a reference's `request_spans`) that a
    backends/cuda frame further up the stack called: a helper the op calls syncs for the op;
  - calls made by Triton's interpreter (its stand-in for a kernel launch copies tensors to numpy)
    are not counted: on a GPU a launch reads nothing back.
The worker then runs, through the registry's bound backend (so a fallback to the reference would
show in its call counters, and does not happen), `indexer_topk` and `sparse_mla` on the step as
the contract's loose tensors (block_table, seq_lens, cu_seqlens_q), with no other carrier, for
several steps: a decode batch with int32 tensors, the same with int64 tensors, and a mixed batch
(prefill, decode and MTP-like rows). Zero calls must be counted on every one, and the results must
match the reference. To show the counter can fail, a probe whose code is attributed to
backends/cuda/ reads the lengths back directly and through a core helper: both must be counted,
while the same core helper called from the test itself must not be. Last, one decode step of a tiny
GLM52 model on the cuda backend (`model.extend` on a paged cache after a prefill) runs under the
counter: zero counted in every cuda op, with indexer_topk and sparse_mla native in that step.

What this does not see: a sync made inside torch's C++ (e.g. boolean-mask indexing, torch.unique,
repeat_interleave without output_size) never passes through these Python entry points. On a GPU,
`test_no_sync_on_gpu` closes that gap with `torch.cuda.set_sync_debug_mode("error")`, which fails
on any synchronising CUDA call; the CUDA-graph capture check in tests/cuda_checks.py does too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


# ---- the counter ----------------------------------------------------------------------------------
class SyncCounter:
    """Counts host-sync entry points called on behalf of backends/cuda (see the module docstring)."""

    def __init__(self):
        import importlib.util

        import torch

        import glm52_backends
        self.torch = torch
        self.cuda_dir = os.path.dirname(importlib.util.find_spec("glm52_backends.backends.cuda").origin) + os.sep
        self.core_dir = os.path.dirname(os.path.abspath(glm52_backends.__file__)) + os.sep
        self.torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
        self.root = os.path.dirname(os.path.dirname(self.cuda_dir.rstrip(os.sep)))   # the repository
        self.records: list[str] = []
        self.active = False
        self._saved: list[tuple[object, str, object]] = []

    def _where(self, frame) -> str | None:
        """'file:line (method)' to record, or None when the call is not the backend's."""
        while frame is not None and frame.f_code.co_filename.startswith(self.torch_dir):
            frame = frame.f_back
        if frame is None:
            return None
        fn = frame.f_code.co_filename
        here = f"{os.path.relpath(fn, self.root)}:{frame.f_lineno}"
        if fn.startswith(self.cuda_dir):
            return here
        if fn.startswith(self.core_dir):
            up = frame.f_back
            while up is not None:
                if up.f_code.co_filename.startswith(self.cuda_dir):
                    return f"{here} called from {os.path.basename(up.f_code.co_filename)}:{up.f_lineno}"
                up = up.f_back
        return None

    def _wrap(self, name, original):
        counter = self

        def wrapper(*args, **kwargs):
            if counter.active:
                where = counter._where(sys._getframe(1))
                if where is not None:
                    counter.records.append(f"{name} at {where}")
            return original(*args, **kwargs)
        wrapper.__name__ = getattr(original, "__name__", name)
        return wrapper

    def install(self) -> None:
        T = self.torch.Tensor
        for m in SYNC_METHODS:
            orig = getattr(T, m)
            self._saved.append((T, m, orig))
            setattr(T, m, self._wrap(f"Tensor.{m}", orig))
        self._saved.append((self.torch, "nonzero", self.torch.nonzero))
        self.torch.nonzero = self._wrap("torch.nonzero", self.torch.nonzero)

    def uninstall(self) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()

    def measure(self, fn):
        """(fn(), the records made while it ran)."""
        self.records, self.active = [], True
        try:
            out = fn()
        finally:
            self.active = False
        return out, list(self.records)


# ---- worker (TRITON_INTERPRET=1) ------------------------------------------------------------------
def _shuffled_table(torch, g, lens, bs):
    """(number of blocks, block table [B, max blocks]): each request's blocks at shuffled places, one spare."""
    need = [-(-L // bs) for L in lens]
    nb = sum(need) + 1
    perm = torch.randperm(nb, generator=g)
    bt = torch.zeros(len(lens), max(need), dtype=torch.int32)
    j = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[j:j + n]
        j += n
    return nb, bt


def _decode_inputs(torch):
    """A decode batch (1 token per request, contexts below, at and above topk) over shuffled paged caches."""
    g = torch.Generator().manual_seed(7)
    lens = [45, 9, 130]
    B, bs, Hi, Di, H, Dl, Dr, topk = len(lens), 16, 4, 32, 5, 40, 16, 16
    nb, bt = _shuffled_table(torch, g, lens, bs)
    return dict(lens=lens, bs=bs, topk=topk, bt=bt, q=torch.randn(B, Hi, Di, generator=g),
                w=torch.randn(B, Hi, generator=g), kc=torch.randn(nb, bs, Di, generator=g),
                qm=torch.randn(B, H, Dl + Dr, generator=g), c=torch.randn(nb, bs, Dl, generator=g),
                kpe=torch.randn(nb, bs, Dr, generator=g), scale=0.2)


def _mixed_inputs(torch):
    """A mixed step over shuffled paged caches: a prefill chunk, a decode row, an MTP-like row."""
    g = torch.Generator().manual_seed(8)
    q_lens, lens = [5, 1, 3], [21, 40, 17]
    B, bs, Hi, Di, H, Dl, Dr, topk = len(lens), 8, 4, 32, 5, 40, 16, 12
    T = sum(q_lens)
    nb, bt = _shuffled_table(torch, g, lens, bs)
    cu = torch.tensor([0] + [sum(q_lens[:i + 1]) for i in range(B)], dtype=torch.int32)
    return dict(lens=lens, cu=cu, bs=bs, topk=topk, bt=bt, q=torch.randn(T, Hi, Di, generator=g),
                w=torch.randn(T, Hi, generator=g), kc=torch.randn(nb, bs, Di, generator=g),
                qm=torch.randn(T, H, Dl + Dr, generator=g), c=torch.randn(nb, bs, Dl, generator=g),
                kpe=torch.randn(nb, bs, Dr, generator=g), scale=0.2)


# A probe attributed to backends/cuda/ (compiled under that file name): it reads the lengths back
# directly and through a core helper, as a cuda op with a host read would.
PROBE = """
def probe(cu, lens):
    from glm52_backends.ops._paged import request_spans
    spans = request_spans(cu, lens)
    return spans, bool((lens > 0).all())
"""


def _op_level(counter) -> dict:
    import torch

    from glm52_backends import ops as ref
    from glm52_backends.registry import get_backend
    be = get_backend("cuda")
    res = {}
    dec = _decode_inputs(torch)
    dec["cu"] = torch.arange(len(dec["lens"]) + 1, dtype=torch.int32)
    cases = {"decode": (dec, torch.int32), "decode_int64": (dec, torch.int64),
             "mixed": (_mixed_inputs(torch), torch.int32)}
    for name, (d, it) in cases.items():
        args = (d["bt"].to(it), torch.tensor(d["lens"], dtype=it), d["cu"].to(it))   # the one carrier
        idx, rec_idx = counter.measure(lambda: be.indexer_topk(d["q"], d["w"], d["kc"], *args, d["topk"]))
        out, rec_mla = counter.measure(lambda: be.sparse_mla(d["qm"], d["c"], d["kpe"], idx, *args, d["scale"]))
        lse, rec_lse = counter.measure(lambda: be.sparse_mla(d["qm"], d["c"], d["kpe"], idx, *args, d["scale"],
                                                             return_lse=True)[1])
        # the results are right (a wrong or skipped computation would make "no sync" meaningless)
        want_idx = ref.indexer_topk(d["q"].double(), d["w"].double(), d["kc"].double(), *args, d["topk"],
                                    cdt=torch.float64)
        same_sets = all(sorted(a) == sorted(b) for a, b in zip(idx.tolist(), want_idx.tolist()))
        want, want_lse = ref.sparse_mla(d["qm"].double(), d["c"].double(), d["kpe"].double(), idx, *args,
                                        d["scale"], return_lse=True, cdt=torch.float64)
        res[name] = {"indexer_topk": rec_idx, "sparse_mla": rec_mla, "sparse_mla_lse": rec_lse,
                     "same_sets": same_sets, "mla_rel_err": float((out.double() - want).abs().max() / want.abs().max()),
                     "lse_abs_err": float((lse.double() - want_lse).abs().max())}
    res["calls"] = {op: be.calls[op] for op in ("indexer_topk", "sparse_mla")}
    # the counter can fail: a read in code attributed to backends/cuda/, direct or through a core
    # helper, is counted; the same core helper called from here is not
    ns: dict = {}
    exec(compile(PROBE, os.path.join(counter.cuda_dir, "_sync_probe.py"), "exec"), ns)
    lens, cu = torch.tensor(dec["lens"], dtype=torch.int32), dec["cu"]
    _, res["probe"] = counter.measure(lambda: ns["probe"](cu, lens))
    from glm52_backends.ops._paged import request_spans
    _, res["core_from_test"] = counter.measure(lambda: request_spans(cu, lens))
    return res


def _model_level(counter) -> dict:
    import tempfile

    import torch
    try:
        from glm52_backends import GLM52
    except ImportError as e:
        return {"skipped": f"GLM52 is not importable: {e}"}
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(tmp, layers=2, seed=4, index_topk=8)
        m = GLM52(path, backend="cuda", dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(3)
    prompts = {r: torch.randint(0, m.cfg.vocab_size, (n,), generator=g).tolist() for r, n in ((0, 13), (1, 5))}
    cache = m.new_cache(64)
    first = m.extend(cache, prompts, last_only=True)                          # prefill: not measured
    nxt = {r: [int(first[r][-1].argmax())] for r in prompts}
    before = {op: dict(c) for op, c in m.ops.calls.items()}
    logits, records = counter.measure(lambda: m.extend(cache, nxt))          # one decode step
    ran = {op: {k: m.ops.calls[op][k] - before[op][k] for k in ("native", "fallback")} for op in m.ops.calls}
    return {"records": records, "ran": ran, "backend": m.backend_name,
            "finite": all(bool(torch.isfinite(v).all()) for v in logits.values())}


def _worker() -> None:
    import warnings
    warnings.filterwarnings("ignore")
    counter = SyncCounter()
    counter.install()
    try:
        res = {"ops": _op_level(counter), "model": _model_level(counter)}
    finally:
        counter.uninstall()
    print("RESULT " + json.dumps(res), flush=True)


# ---- pytest side ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, HERE, "--worker"], capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"the interpreter worker failed (exit {p.returncode}):\n{p.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("case", ["decode", "decode_int64", "mixed"])
def test_hot_ops_make_no_host_sync(measured, case):
    """Every call of indexer_topk and sparse_mla (with and without lse), given the step only as the
    contract's loose tensors: no host read, native, and right."""
    ops = measured["ops"]
    assert ops["calls"]["indexer_topk"]["fallback"] == 0 and ops["calls"]["sparse_mla"]["fallback"] == 0
    assert ops["calls"]["indexer_topk"]["native"] == 3 and ops["calls"]["sparse_mla"]["native"] == 6
    res = ops[case]
    assert res["same_sets"] and res["mla_rel_err"] <= 3.05e-5 and res["lse_abs_err"] <= 1e-4, res
    for part in ("indexer_topk", "sparse_mla", "sparse_mla_lse"):
        assert res[part] == [], f"{part} ({case}) made host syncs: {res[part]}"


def test_counter_sees_syncs_of_cuda_code(measured):
    """The measurement can fail: reads made by code under backends/cuda/ (directly, or through core
    code it calls) are recorded; the same core code called from outside the backend is not."""
    ops = measured["ops"]
    rec = ops["probe"]
    assert any(r.startswith("Tensor.tolist at glm52_backends/ops/_paged.py") and "_sync_probe.py" in r
               for r in rec), rec
    assert any(r.startswith("Tensor.__bool__ at backends/cuda/_sync_probe.py") for r in rec), rec
    assert ops["core_from_test"] == [], ops["core_from_test"]


def test_model_decode_step_makes_no_host_sync_in_cuda_ops(measured):
    model = measured["model"]
    if "skipped" in model:
        pytest.skip(model["skipped"])
    assert model["backend"] == "cuda (triton interpreter)" and model["finite"]
    for op in ("indexer_topk", "sparse_mla", "moe_experts", "moe_route"):
        assert model["ran"][op]["native"] > 0 and model["ran"][op]["fallback"] == 0, (op, model["ran"][op])
    assert model["records"] == [], f"a decode step made host syncs inside the cuda ops: {model['records']}"


def test_no_sync_on_gpu():
    """On a GPU: the same decode calls (the step as loose device tensors) under
    torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising CUDA call,
    Python-visible or not."""
    import torch
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("needs a CUDA GPU without TRITON_INTERPRET")
    pytest.importorskip("triton")
    from glm52_backends.registry import get_backend
    be = get_backend("cuda")
    dev = torch.device("cuda")
    d = _decode_inputs(torch)
    B = len(d["lens"])
    args = (d["bt"].to(dev), torch.tensor(d["lens"], dtype=torch.int32, device=dev),
            torch.arange(B + 1, dtype=torch.int32, device=dev))
    for dt in (torch.float32, torch.bfloat16):
        t = {k: v.to(dev, dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in d.items()}
        t["w"] = d["w"].to(dev)
        idx = be.indexer_topk(t["q"], t["w"], t["kc"], *args, d["topk"])           # compile outside the check
        be.sparse_mla(t["qm"], t["c"], t["kpe"], idx, *args, d["scale"], return_lse=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            idx = be.indexer_topk(t["q"], t["w"], t["kc"], *args, d["topk"])
            out = be.sparse_mla(t["qm"], t["c"], t["kpe"], idx, *args, d["scale"])
            be.sparse_mla(t["qm"], t["c"], t["kpe"], idx, *args, d["scale"], return_lse=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert bool(torch.isfinite(out).all())


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
