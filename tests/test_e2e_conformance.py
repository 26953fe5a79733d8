"""End-to-end conformance (conformance/e2e.py): the command line on cpu_ref and on the emulated Ascend
backend, and planted backends that are right op by op but wrong end to end, each of which a named
e2e check must catch, while an honest backend that only sums in another order passes both levels.

  stale top-k      indexer_topk keeps its first result of a step and returns it to every later layer
  MTP hidden       the MTP layer's eh_proj sees [embedding || 0] instead of [embedding || hidden]
  one scale        sparse_mla dequantizes every gathered latent row with the first selected row's scales
  in-tolerance     every float output of every op moved by 0.9 x the float32 row (random signs, seeded)
  reordered        sparse_mla over the top-k reversed, routed experts summed last slot first (honest)

Each planted backend is a TorchDeviceBackend (the CPU's default) with one op wrapped; rows are few
and float32, so the module stays well under a minute on two cores.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from glm52_backends import default_checkpoint
from glm52_backends.backends.generic import TorchDeviceBackend
from glm52_backends.cache_formats import decode_latent, latent_format_of, latent_row_layout, packed_latent
from glm52_backends.conformance import e2e, run
from glm52_backends.conformance.cases import CASES
from glm52_backends.conformance.e2e import Row, run_e2e
from glm52_backends.conformance.tolerances import tolerance
from glm52_backends.loader import load_config
from glm52_backends.ops._paged import masked_softmax
from glm52_backends.step import token_requests
from glm52_backends.weights import Weight

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

CPU = torch.device("cpu")
SPECULATIVE = ("spec1", "spec2", "spec3", "adaptive")


# ---- the planted backends ---------------------------------------------------------------------------
class StaleTopk(TorchDeviceBackend):
    """indexer_topk that remembers its first result of a step (keyed on the step's `seq_lens` tensor,
    held strongly so its id is never reused) and returns it to every later call of that step: every
    layer with an indexer attends to layer 0's selection."""
    name = "planted-stale-topk"

    def __init__(self):
        super().__init__("cpu")
        inner, self._last = self.indexer_topk, None

        def indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
            last = self._last
            if last is not None and last[0] is seq_lens and tuple(last[1].shape) == (q.shape[0], topk):
                return last[1].clone()
            out = inner(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk)
            self._last = (seq_lens, out)
            return out
        self.indexer_topk = indexer_topk


class MtpWrongHidden(TorchDeviceBackend):
    """linear that zeroes the hidden half of a [hidden || hidden]-wide input: only the MTP layer's
    eh_proj over [embedding || hidden] has that width, so the drafts come from the embedding alone."""
    name = "planted-mtp-hidden"

    def __init__(self, hidden: int):
        super().__init__("cpu")
        inner = self.linear

        def linear(x, weight):
            if x.shape[-1] == 2 * hidden:
                x = torch.cat([x[..., :hidden], torch.zeros_like(x[..., hidden:])], -1)
            return inner(x, weight)
        self.linear = linear


class OneScale(TorchDeviceBackend):
    """sparse_mla that, on a quantized latent cache (fp8_ds_mla, c8_sfa), dequantizes every row a token
    gathers with the scales of the token's FIRST selected row instead of each row's own; dense caches
    go to the honest op."""
    name = "planted-one-scale"

    def __init__(self):
        super().__init__("cpu")
        inner = self.sparse_mla

        def sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False):
            if latent_format_of(c_cache, kpe_cache) == "dense":
                return inner(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale,
                             return_lse=return_lse)
            fmt, packed = packed_latent(c_cache, kpe_cache)                   # [NB, BS, row bytes]
            C, Dr, bs, MB = c_cache.shape[-1], kpe_cache.shape[-1], c_cache.shape[1], block_table.shape[1]
            s0, sn = latent_row_layout(fmt, C, Dr)["scales"]
            sel = idx.long()
            keep, pos = sel >= 0, sel.clamp(min=0)
            req = token_requests(cu_seqlens_q, q.shape[0])
            blk = torch.where(keep, block_table[req].long().gather(1, (pos // bs).clamp(max=MB - 1)), 0)
            rows = packed[blk, pos % bs].clone()                               # [T, K, row bytes]
            rows[..., s0:s0 + sn] = rows[:, :1, s0:s0 + sn]                    # THE BUG: one row's scales
            c, kpe = decode_latent(fmt, rows, C, Dr)
            kv = torch.where(keep[..., None], torch.cat([c, kpe], -1), 0.0)
            p, m = masked_softmax(torch.bmm(q.float(), kv.transpose(1, 2)) * scale, keep)
            out = torch.bmm(p, kv[..., :C]).to(q.dtype)
            return (out, m.float()) if return_lse else out
        self.sparse_mla = sparse_mla


FLOAT_OUTPUT_OPS = ("sparse_mla", "moe_experts", "moe_route", "rms_norm", "layer_norm", "rope", "linear", "mlp")


class InTolerance(TorchDeviceBackend):
    """Every float output of every op (sparse_mla's out and lse, moe_route's weights, ...) moved by
    +-`frac` x the float32 row x max|output| with seeded random signs: each op stays within its bound."""
    name = "planted-in-tolerance"

    def __init__(self, frac: float = 0.9, seed: int = 1):
        super().__init__("cpu")
        g = torch.Generator().manual_seed(seed)
        tol = tolerance(torch.float32).tol

        def noisy(t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                return t
            finite = torch.isfinite(t)
            if not finite.any():
                return t
            amp = frac * tol * float(t[finite].abs().max())
            sign = torch.randint(0, 2, t.shape, generator=g).to(torch.float64) * 2 - 1
            return torch.where(finite, (t.double() + amp * sign).to(t.dtype), t)

        def wrap(fn):
            @functools.wraps(fn)
            def op(*args, **kwargs):
                out = fn(*args, **kwargs)
                return tuple(noisy(o) for o in out) if isinstance(out, tuple) else noisy(out)
            return op
        for op in FLOAT_OUTPUT_OPS:
            setattr(self, op, wrap(getattr(self, op)))


class Reordered(TorchDeviceBackend):
    """Honest: sparse_mla over each row's top-k in reverse order, moe_experts summing the routed slots
    last first (dense experts; quantized ones get the slots reversed)."""
    name = "honest-reordered"

    def __init__(self):
        super().__init__("cpu")
        mla, moe = self.sparse_mla, self.moe_experts

        def sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False):
            return mla(q, c_cache, kpe_cache, idx.flip(-1).contiguous(), block_table, seq_lens, cu_seqlens_q, scale,
                       return_lse=return_lse)

        def moe_experts(x, w13, w2, topk_ids, topk_weights):
            if any(isinstance(w, Weight) and w.quantized for w in (w13, w2)):
                return moe(x, w13, w2, topk_ids.flip(-1), topk_weights.flip(-1))
            W13 = (w13.data if isinstance(w13, Weight) else w13).float()
            W2 = (w2.data if isinstance(w2, Weight) else w2).float()
            I = W2.shape[-1]
            y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
            for k in reversed(range(topk_ids.shape[1])):
                e = topk_ids[:, k].long()
                h = torch.bmm(W13[e.clamp(min=0)], x.float()[:, :, None]).squeeze(-1)           # [T, 2I]
                o = torch.bmm(W2[e.clamp(min=0)], (F.silu(h[:, :I]) * h[:, I:])[:, :, None]).squeeze(-1)
                y = y + torch.where((e >= 0)[:, None], o * topk_weights[:, k, None].float(), 0.0)
            return y.to(x.dtype)
        self.sparse_mla, self.moe_experts = sparse_mla, moe_experts


# ---- helpers ------------------------------------------------------------------------------------------
def _e2e(backend, rows: list[Row]) -> dict[str, e2e.E2EResult]:
    report = run_e2e(backend, select=rows)
    assert not any(r.skipped for r in report.results), str(report)
    return {r.name: r for r in report.results}


def _op_cases_pass(backend) -> None:
    """Every op case of the quick catalogue passes, natively."""
    rep = run(backend, quick=True, model=False)
    assert rep.passed, "\n".join(r.line() for r in rep.failures)
    assert all(r.path == "native" for r in rep.results), [r.line() for r in rep.results if r.path != "native"]


def _only_model_case_fails(backend) -> list:
    """The op cases pass; the model-level case of the op catalogue (a tiny random checkpoint against
    cpu_ref at the 1x row) is what catches it. Returns its failures."""
    rep = run(backend, quick=True)
    assert not rep.passed
    assert {r.op for r in rep.failures} == {"model"}, "\n".join(r.line() for r in rep.failures)
    return rep.failures


@functools.lru_cache(maxsize=1)
def _cfg():
    return load_config(default_checkpoint())


# ---- the command line ---------------------------------------------------------------------------------
def _cli_e2e(tmp_path, backend: str, extra_env: dict[str, str] | None = None):
    out = tmp_path / f"{backend}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "glm52_backends.cli", "conformance", "--backend", backend, "--e2e",
                           "--quick", "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _check_quick_json(reports) -> dict:
    assert isinstance(reports, list) and len(reports) == 1
    rep = reports[0]
    assert rep["passed"] and rep["scale"] == "quick"
    rows = rep["results"]
    assert [(r["weights"], r["cache"], r["mode"]) for r in rows] == \
        [(r.weights, r.cache, r.mode) for r in e2e.rows(quick=True)]
    spec = [r for r in rows if r["mode"] in SPECULATIVE and not r["skipped"]]
    assert len(spec) >= 3, rows
    for r in spec:      # acceptance reported, at least the reference's 0.9, and > 1 (the MTP drafts land)
        assert r["acceptance"] is not None and r["ref_acceptance"] is not None, r
        assert r["acceptance"] >= e2e.ACCEPTANCE_RATIO * r["ref_acceptance"] and r["acceptance"] > 1.0, r
    for r in rows:
        if r["mode"] not in SPECULATIVE:
            assert r["acceptance"] is None, r
    weights = {r["weights"] for r in rows if not r["skipped"] and r["passed"]}
    assert {"fp8", "w8a8"} <= weights, weights
    assert all(r["passed"] for r in rows if not r["skipped"]), rows
    assert {c["check"] for c in rep["thresholds"]} >= {"logits", "acceptance", "greedy", "sampled", "degenerate"}
    return rep


def test_cli_e2e_quick_cpu_ref(tmp_path):
    proc, reports = _cli_e2e(tmp_path, "cpu_ref")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = _check_quick_json(reports)
    assert rep["backend"] == "cpu_ref"
    assert "0 failed" in proc.stdout


def test_cli_e2e_quick_ascend_emulated(tmp_path):
    proc, reports = _cli_e2e(tmp_path, "ascend", {"GLM52_ASCEND_EMULATE": "1"})
    failing = [f"{r['weights']}/{r['cache']}/{r['mode']}/{r['dtype']}: {r['detail']}"
               for rep in reports or [] for r in rep["results"] if not r["skipped"] and not r["passed"]]
    assert proc.returncode == 0, "\n".join(failing) + "\n" + proc.stdout + proc.stderr[-4000:]
    rep = _check_quick_json(reports)
    assert "emulated" in rep["backend"]


# ---- a. state kept across the calls of a step --------------------------------------------------------
def test_stale_topk_passes_the_op_cases_and_the_model_case_catches_it():
    _op_cases_pass(StaleTopk())
    _only_model_case_fails(StaleTopk())


def test_stale_topk_caught_end_to_end():
    """e2e's prompts outgrow the indexer's top-k (64), so every full layer's selection is sparse and a
    layer that reuses layer 0's selection attends to other positions."""
    assert min(len(s) for s in e2e.reference("none", "auto").seqs) > _cfg().index_topk
    res = _e2e(StaleTopk(), [Row(), Row(mode="spec2")])
    for r in res.values():
        assert not r.passed and "logits error" in r.detail and r.logits_rel > 10 * r.logits_bound, r.line()
    honest = _e2e(TorchDeviceBackend("cpu"), [Row()])["none/auto/greedy/float32"]
    assert honest.passed, honest.line()


# ---- b. an MTP path that drafts from the wrong hidden state ----------------------------------------------
def test_mtp_from_the_wrong_hidden_is_caught_by_acceptance():
    planted = MtpWrongHidden(_cfg().hidden_size)
    rep = run(planted, quick=True)
    assert rep.passed, "\n".join(r.line() for r in rep.failures)
    res = _e2e(planted, [Row(), Row(mode="spec2"), Row(weights="w8a8", mode="spec2")])
    assert res["none/auto/greedy/float32"].passed, res["none/auto/greedy/float32"].line()   # the target is fine
    for name in ("none/auto/spec2/float32", "w8a8/auto/spec2/float32"):
        r = res[name]
        assert not r.passed and "MTP acceptance length" in r.detail, r.line()
        assert "logits error" not in r.detail and r.greedy == "equal", r.line()   # tokens stay the target's
        assert r.acceptance < e2e.ACCEPTANCE_RATIO * r.ref_acceptance, r.line()


# ---- c. a quantized cache read with one row's scales ------------------------------------------------------
def test_one_scale_cache_read_is_caught_on_quantized_cache_rows():
    """Caught twice: by the op catalogue's quantized-cache sparse_mla cases (and only those), and end to
    end on the int8 and fp8 cache rows."""
    planted = OneScale()
    rep = run(planted, quick=True)
    assert rep.failures and {(r.op, r.case) for r in rep.failures} <= {("sparse_mla", "cache-fp8_ds_mla"),
                                                                        ("sparse_mla", "cache-c8_sfa")}, \
        "\n".join(r.line() for r in rep.failures)
    res = _e2e(planted, [Row(), Row(cache="int8"), Row(cache="fp8")])
    assert res["none/auto/greedy/float32"].passed, res["none/auto/greedy/float32"].line()
    for name in ("none/int8/greedy/float32", "none/fp8/greedy/float32"):
        r = res[name]
        assert not r.passed and "logits error" in r.detail and "top-1 agreement" in r.detail, r.line()
        assert r.path == "native" and r.logits_rel > 4 * r.logits_bound, r.line()


# ---- d. error within each op's bound that grows over the layers ------------------------------------------
def test_in_tolerance_noise_in_every_op_is_caught_end_to_end():
    _op_cases_pass(InTolerance())
    model_case = _only_model_case_fails(InTolerance())
    assert all("logits" in r.case for r in model_case), [r.line() for r in model_case]
    r = _e2e(InTolerance(), [Row()])["none/auto/greedy/float32"]
    honest = _e2e(TorchDeviceBackend("cpu"), [Row()])["none/auto/greedy/float32"]
    assert honest.passed and honest.logits_rel < honest.logits_bound / 20, honest.line()
    assert not r.passed and "logits error" in r.detail and r.logits_rel > r.logits_bound, (r.line(), honest.line())


# ---- an honest backend that sums in another order passes --------------------------------------------------
def test_reordered_honest_backend_passes_op_level_and_end_to_end():
    ours, torch_backend = Reordered(), TorchDeviceBackend("cpu")
    differs = set()
    for case in CASES:      # the reordering is real: some outputs differ in their last bits
        if case.op in ("sparse_mla", "moe_experts"):
            inputs = case.build("quick")
            a = getattr(ours, case.op)(*inputs.for_backend(torch.float32, CPU), **inputs.kwargs)
            b = getattr(torch_backend, case.op)(*inputs.for_backend(torch.float32, CPU), **inputs.kwargs)
            a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
            if not torch.equal(a, b):
                differs.add(case.op)
    assert differs == {"sparse_mla", "moe_experts"}, differs
    rep = run(ours, quick=True)
    assert rep.passed, "\n".join(r.line() for r in rep.failures)
    res = _e2e(ours, [Row(), Row(mode="spec2"), Row(mode="chunked"), Row(cache="int8", mode="spec2"),
                      Row(weights="w8a8", mode="spec2")])
    assert all(r.passed and r.path == "native" for r in res.values()), [r.line() for r in res.values()]


def test_torch_backend_passes_the_quick_rows_including_bfloat16_and_graph():
    """The generic backend on the CPU: every quick row runs (graph mode through the trace stand-in, its
    own 16-bit dtype as bfloat16) and passes."""
    rep = e2e.run_e2e("torch", quick=True)
    assert rep.passed and not [r for r in rep.results if r.skipped], str(rep)
    by = {r.name: r for r in rep.results}
    assert by["none/auto/graph/float32"].greedy == "equal"
    assert by["none/auto/greedy/bfloat16"].passed and by["none/auto/greedy/bfloat16"].logits_rel > 1e-4   # really bf16
    assert "| none | auto | spec2 | float32 | pass |" in rep.to_markdown()
