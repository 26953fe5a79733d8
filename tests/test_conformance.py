"""The conformance suite itself: cpu_ref passes, and every deliberately wrong backend is caught.

Each planted backend is cpu_ref with one op changed the way real kernels go wrong; conformance must
report a failure in exactly that op.
"""

from __future__ import annotations

import json

import pytest
import torch

from glm52_backends.quant import QUANT_FORMATS

from glm52_backends import ops as R
from glm52_backends.ops._paged import gather_paged
from glm52_backends.cli import main as cli_main
from glm52_backends.conformance import run
from glm52_backends.conformance.cases import CASES
from glm52_backends.registry import register_backend, unregister_backend
from conftest import Planted


def test_cpu_ref_quick_passes_and_reports():
    rep = run("cpu_ref", quick=True)
    assert rep.passed, "\n".join(r.line() for r in rep.failures)
    assert {r.op for r in rep.results} >= {"indexer_topk", "sparse_mla", "moe_experts", "mtp_verify", "model"}
    assert all(r.path == "native" for r in rep.results)
    d = json.loads(rep.to_json())
    assert d["passed"] and len(d["results"]) == len(rep.results) and d["tolerances"]
    assert "| indexer_topk | decode |" in rep.to_markdown()


def test_catalogue_covers_every_hot_op_with_edge_cases():
    names = {(c.op, c.name) for c in CASES}
    for op in ("indexer_topk", "sparse_mla", "moe_experts", "mtp_verify"):
        assert sum(o == op for o, _ in names) >= 4, op
    assert {("indexer_topk", "relu-ties"), ("sparse_mla", "padding"), ("moe_experts", "empty-experts"),
            ("moe_experts", "one-expert")} <= names


# ---- the wrong ops ---------------------------------------------------------------------------------

def rope_half_split(x, positions, theta):  # NeoX (DeepSeek-V3.2 indexer) instead of GLM's interleaved pairs
    Dr = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, Dr, 2, dtype=torch.float32) / Dr))
    ang = positions.float()[:, None] * inv[None, :]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (Dr // 2,)
    c, s = ang.cos().view(shape), ang.sin().view(shape)
    a, b = x[..., : Dr // 2].float(), x[..., Dr // 2:].float()
    return torch.cat([a * c - b * s, b * c + a * s], -1).to(x.dtype)


def route_without_scaling(router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                          routed_scaling_factor=1.0):
    return R.moe_route(router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob, 1.0)


def indexer_off_by_one(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
    """Lets each query see one position past itself (s <= pos + 1)."""
    T = q.shape[0]
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    cu = cu_seqlens_q.tolist()
    for b in range(len(cu) - 1):
        t0, t1 = cu[b], cu[b + 1]
        L = int(seq_lens[b])
        k = gather_paged(k_cache, block_table[b], L).float()
        s = torch.einsum("th,ths->ts", w[t0:t1].float(), torch.relu(torch.einsum("thd,sd->ths", q[t0:t1].float(), k)))
        pos = torch.arange(L - (t1 - t0), L)
        s = s.masked_fill(torch.arange(L)[None, :] > pos[:, None] + 1, float("-inf"))
        for i in range(t1 - t0):
            n = min(topk, int(pos[i]) + 1)
            idx[t0 + i, :n] = s[i].topk(n).indices.to(torch.int32)
    return idx


def indexer_drops_a_winner(*args, **kw):
    idx = R.indexer_topk(*args, **kw)
    full = (idx >= 0).all(-1)                           # rows with topk valid entries
    idx[full, 0] = idx[full, 1]                          # the best one replaced by a duplicate of another
    idx[full, 1] = -1
    return idx.sort(dim=-1, descending=True).values     # and hidden among the others


def mla_attends_padding(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *,
                        return_lse=False):
    """Gathers -1 like a Python index: the request's last position."""
    idx = idx.clone()
    cu = cu_seqlens_q.tolist()
    for b in range(len(cu) - 1):
        rows = idx[cu[b]:cu[b + 1]]
        rows[rows < 0] = int(seq_lens[b]) - 1
    return R.sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, return_lse=return_lse)


def verify_accepts_one_more(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
    acc, tok = R.mtp_verify(draft, target_logits, draft_probs, temperature, top_p, uniforms)
    k = draft.shape[1]
    for b in range(draft.shape[0]):
        n = int(acc[b])
        if n < k:                                       # accept the draft the target rejected
            tok[b, n] = draft[b, n]
            acc[b] = n + 1
            tok[b, n + 1] = target_logits[b, n + 1].argmax()
    return acc, tok


def experts_gate_up_swapped(x, w13, w2, topk_ids, topk_weights):
    I = w2.shape[-1]
    return R.moe_experts(x, torch.cat([w13[:, I:], w13[:, :I]], 1), w2, topk_ids, topk_weights)


def mla_leaves_rows_unwritten(*args, **kw):
    res = R.sparse_mla(*args, **kw)
    out = res[0] if isinstance(res, tuple) else res
    out[out.shape[0] // 2:] = float("nan")               # what torch.empty + a short grid leaves
    return res


def mla_dense(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False):
    """Ignores the selection and attends to every causal position (a dense fallback)."""
    dense = torch.full_like(idx, -1)
    cu = cu_seqlens_q.tolist()
    for b in range(len(cu) - 1):
        L, n = int(seq_lens[b]), cu[b + 1] - cu[b]
        for i in range(n):
            pos = L - n + i
            dense[cu[b] + i, :min(pos + 1, idx.shape[1])] = torch.arange(min(pos + 1, idx.shape[1]))
    return R.sparse_mla(q, c_cache, kpe_cache, dense, block_table, seq_lens, cu_seqlens_q, scale,
                        return_lse=return_lse)


# (name, replaced ops, the op that must fail, the reason every failure must give)
PLANTED = [
    ("half-split-rope", {"rope": rope_half_split}, "rope", "out: relative error"),
    ("no-routed-scaling", {"moe_route": route_without_scaling}, "moe_route", "topk_weights (by expert): relative error"),
    ("indexer-off-by-one", {"indexer_topk": indexer_off_by_one}, "indexer_topk", "non-causal index"),
    ("indexer-drops-winner", {"indexer_topk": indexer_drops_a_winner}, "indexer_topk", "(a winner is missing)"),
    ("mla-attends-padding", {"sparse_mla": mla_attends_padding}, "sparse_mla", "out: relative error"),
    ("verify-accepts-extra", {"mtp_verify": verify_accepts_one_more}, "mtp_verify", "accepted: differs from the reference"),
    ("experts-gate-up-swapped", {"moe_experts": experts_gate_up_swapped}, "moe_experts", "out: relative error"),
    ("mla-unwritten-rows", {"sparse_mla": mla_leaves_rows_unwritten}, "sparse_mla", "non-finite values"),
    ("mla-ignores-selection", {"sparse_mla": mla_dense}, "sparse_mla", "out: relative error"),
]


@pytest.mark.parametrize("name,ops,op,reason", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_wrong_backend_is_caught(name, ops, op, reason):
    register_backend(name, lambda: Planted(name, **ops))
    try:
        rep = run(name, quick=True, ops=[op], model=False)
    finally:
        unregister_backend(name)
    assert not rep.passed, f"{name}: conformance did not notice\n{rep}"
    assert {r.op for r in rep.failures} == {op}
    # the planted ops take dense tensors; the quantized-weight cases (their own planted tests:
    # tests/test_quant.py) and quantized-cache cases (test_planted_wrong_cache_reader_is_caught) are
    # left out here
    dense = [r for r in rep.results if r.case.split("-")[0] not in QUANT_FORMATS + ("cache",)]
    assert dense and all(r.path == "native" for r in dense)
    for r in rep.failures:                              # caught for the planted reason, not by accident
        if r in dense:
            assert reason in r.detail, r.line()


def indexer_skips_the_rotation(q, w, k_cache, *args):
    """Reads a c8_li cache as codes x scales, without rotating the keys back (the Hadamard rotation is
    the format's: a reader must undo it, or rotate the query)."""
    from glm52_backends import cache_formats as cf
    if cf.index_format_of(k_cache) != "c8_li":
        return R.indexer_topk(q, w, k_cache, *args)
    _, values, scales = cf.index_parts(k_cache)
    rotated = values.view(torch.int8).float() * scales.contiguous().view(torch.float16).float()
    return R.indexer_topk(q, w, rotated, *args)


def mla_ignores_the_scales(q, c_cache, kpe_cache, *args, **kw):
    """Attends a quantized latent cache's codes as values (scales dropped), the rope as stored."""
    from glm52_backends import cache_formats as cf
    if cf.latent_format_of(c_cache) == "dense":
        return R.sparse_mla(q, c_cache, kpe_cache, *args, **kw)
    return R.sparse_mla(q, c_cache.float(), kpe_cache.float(), *args, **kw)


def mla_reads_poisoned_rows(q, c_cache, kpe_cache, idx, block_table, seq_lens, *args, **kw):
    """A c8_sfa / fp8_ds_mla reader that dequantizes whole blocks, including the rows no request owns,
    into its output (a masked add instead of a select): the 0xFF poison reaches it."""
    from glm52_backends import cache_formats as cf
    out = R.sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, *args, **kw)
    if cf.latent_format_of(c_cache) == "dense":
        return out
    NB, BS, _ = c_cache.shape
    c, _ = cf.read_latent(c_cache, kpe_cache, torch.arange(NB).repeat_interleave(BS), torch.arange(BS).repeat(NB))
    leak = 0.0 * c.sum()                                  # NaN if any row of the cache is poisoned
    return tuple(o + leak for o in out) if isinstance(out, tuple) else out + leak


CACHE_PLANTED = [   # (name, replaced ops, op, the case that must fail, the reason it must give)
    ("indexer-skips-rotation", {"indexer_topk": indexer_skips_the_rotation}, "indexer_topk", "cache-c8_li",
     "a winner is missing"),
    ("mla-ignores-scales", {"sparse_mla": mla_ignores_the_scales}, "sparse_mla", "cache-", "out: relative error"),
    ("mla-reads-poison", {"sparse_mla": mla_reads_poisoned_rows}, "sparse_mla", "cache-", "non-finite"),
]


@pytest.mark.parametrize("name,ops,op,case,reason", CACHE_PLANTED, ids=[p[0] for p in CACHE_PLANTED])
def test_planted_wrong_cache_reader_is_caught(name, ops, op, case, reason):
    """The quantized-cache cases catch readers that get the format wrong, and only those cases fail."""
    register_backend(name, lambda: Planted(name, **ops))
    try:
        rep = run(name, quick=True, ops=[op], model=False)
    finally:
        unregister_backend(name)
    failed = {r.case for r in rep.failures}
    assert failed and all(c.startswith(case) for c in failed), sorted(failed)
    assert all(reason in r.detail for r in rep.failures), [r.line() for r in rep.failures]
    assert all(r.path == "native" for r in rep.results if r.case.startswith("cache-"))


def test_wrong_indexer_rope_is_caught_at_model_level():
    """Half-split RoPE on the indexer's queries only (the tiny model's indexer has 32 heads, its MLA 4,
    so the call is recognised by shape): the rope op cases cannot see it, the model case must."""
    calls = []

    def rope(x, positions, theta):
        calls.append(x.shape)
        return rope_half_split(x, positions, theta) if x.dim() == 3 and x.shape[1] == 32 else R.rope(x, positions, theta)

    rep_ok = run(Planted("indexer-rope-ok", rope=lambda x, positions, theta: R.rope(x, positions, theta)), quick=True, ops=["model"])
    assert rep_ok.passed, str(rep_ok)
    rep = run(Planted("indexer-rope-neox", rope=rope), quick=True, ops=["model"])
    assert any(s[1] == 32 for s in calls if len(s) == 3), "the indexer's rope was never called"
    assert not rep.passed and {r.case for r in rep.failures} >= {"logits"}


def test_missing_op_falls_back_and_is_reported():
    class Partial:
        name = "partial"

        def rms_norm(self, x, weight, eps):
            return R.rms_norm(x, weight, eps)

    with pytest.warns(RuntimeWarning, match="falls back"):
        rep = run(Partial(), quick=True, ops=["rms_norm", "linear"], model=False)
    assert rep.passed
    assert {r.op: r.path for r in rep.results} == {"rms_norm": "native", "linear": "fallback"}


def test_a_run_where_every_op_fell_back_is_not_a_pass():
    class Partial:
        name = "partial-none-native"

        def rms_norm(self, x, weight, eps):
            return R.rms_norm(x, weight, eps)

    with pytest.warns(RuntimeWarning, match="falls back"):
        rep = run(Partial(), quick=True, ops=["linear"], model=False)
    assert rep.results and all(r.passed and r.path == "fallback" for r in rep.results)
    assert not rep.passed   # only the reference's results: nothing of the backend was tested


def test_crashing_op_is_a_failure_not_an_error():
    def boom(*a, **k):
        raise IndexError("kernel launch failed")

    rep = run(Planted("crash", linear=boom), quick=True, ops=["linear"], model=False)
    assert not rep.passed and "IndexError: kernel launch failed" in rep.failures[0].detail


def test_cli_exit_status_and_reports(tmp_path):
    register_backend("bad-rope", lambda: Planted("bad-rope", rope=rope_half_split))
    try:
        assert cli_main(["conformance", "--backend", "bad-rope", "--quick", "--op", "rope", "--no-model",
                         "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]) == 1
    finally:
        unregister_backend("bad-rope")
    assert json.loads((tmp_path / "r.json").read_text())[0]["passed"] is False
    assert "**FAIL**" in (tmp_path / "r.md").read_text()
    assert cli_main(["conformance", "--backend", "cpu_ref", "--quick", "--op", "rope", "--no-model"]) == 0
    assert cli_main(["conformance", "--backend", "no-such-backend", "--quick"]) == 2


def test_nan_never_passes():
    def nan_linear(x, weight):
        y = R.linear(x, weight)
        y[0, 0] = float("nan")
        return y

    rep = run(Planted("nan", linear=nan_linear), quick=True, ops=["linear"], model=False)
    assert not rep.passed and "non-finite" in rep.failures[0].detail


def test_bfloat16_row_is_used_for_bfloat16():
    rep = run("cpu_ref", quick=True, dtypes=[torch.bfloat16], ops=["sparse_mla", "moe_experts"], model=False)
    assert rep.passed, str(rep)
    assert all(r.dtype == "bfloat16" for r in rep.results)
    # bf16 arithmetic really differs from the float64 reference (quantized cases: both compute the
    # format's float64 arithmetic on the same bf16 activations, equal up to the output rounding)
    assert all(0 < r.rel for r in rep.results if r.case.split("-")[0] not in QUANT_FORMATS)
