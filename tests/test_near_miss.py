"""Near-miss planted backends: wrong by a little, the way real kernel bugs are.

The planted backends of test_conformance.py are grossly wrong and are caught by shape, NaN,
causality or duplicate checks before any tolerance is consulted. Here each judge and each row of
the tolerance table meets a backend that is wrong by a small, known amount:

  * value outputs (the `close` ops, sparse_mla's out and lse, moe_route's weights) computed in
    float64 from the very inputs the backend got, then perturbed by c x the tolerance of the row
    they are judged by: c = 2, 4, 10 must fail in EVERY case of the catalogue, c = 0.5 must pass in
    every case (the output rounding to the dtype uses at most a quarter of the row);
  * selections (indexer top-k, routing): a winner swapped for the best loser in every catalogue
    case, and judge-level rows with a designed score gap of c x tol (a chosen loser c x tol below
    the k-th best, or a winner c x tol above it left out);
  * one routed expert's down projection scaled by 1.01 (caught in float32, the row that can see 1 %);
  * an mtp_verify that accepts one draft more whenever u is within 1 % above p/q.

Inputs are the catalogue's quick scale, built once per case and shared by every planted backend.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from glm52_backends.conformance import judges
from glm52_backends.conformance.cases import BOUNDARY, CASES, Case, verify_ratios
from glm52_backends.conformance.inputs import Arg, CaseInputs, generator
from glm52_backends.conformance.report import Report
from glm52_backends.conformance.runner import judge_case, run_case, tolerance_dtype
from glm52_backends.conformance.tolerances import CACHE_FORMAT_TOLERANCES, FORMAT_TOLERANCES, MODEL_DTYPES, TOLERANCES, parse_dtype, table_rows, tolerance
from glm52_backends.ops import REFERENCES
from glm52_backends.registry import get_backend
from glm52_backends.sampling import probs_from_logits
from glm52_backends.weights import Weight
from conftest import Planted

CAUGHT = (2.0, 4.0, 10.0)
PASSES = 0.5
CPU = torch.device("cpu")
DTYPE_IDS = [str(d).removeprefix("torch.") for d in MODEL_DTYPES]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ---- plumbing --------------------------------------------------------------------------------------

_INPUTS: dict[tuple[str, str], CaseInputs] = {}


def _inputs(case: Case) -> CaseInputs:
    key = (case.op, case.name)
    if key not in _INPUTS:
        _INPUTS[key] = case.build("quick")
    return _INPUTS[key]


def _cases(op: str) -> list[Case]:
    return [c for c in CASES if c.op == op]


def _run(op: str, fn, dtype: torch.dtype, cases: list[Case] | None = None):
    bound = get_backend(Planted(f"near-miss-{op}", **{op: fn}))
    res = [run_case(bound, c, dtype, "quick", CPU, _inputs(c)) for c in (cases or _cases(op))]
    assert all(r.path == "native" for r in res), [r.line() for r in res]
    return res


def _f64(args):
    """Floating arguments in float64, except a quantized latent cache (sparse_mla's c_cache codes and the
    kpe_cache view of the same packed rows: they are the format itself, read dequantized)."""
    packed = len(args) > 2 and isinstance(args[1], torch.Tensor) and args[1].dtype in (torch.float8_e4m3fn, torch.int8)
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() and not (packed and i in (1, 2))
            else a for i, a in enumerate(args)]


def _contract(op: str):
    """Decorator: give a planted op the contract's signature (the registry checks it)."""
    return functools.wraps(REFERENCES[op])


def _row(dtype: torch.dtype, args=()) -> float:
    """The row a case is judged by: its dtype's, or the looser of that and a quantized weight's format row."""
    tol = TOLERANCES[dtype].tol
    for a in args:
        if isinstance(a, Weight) and a.quantized:
            tol = max(tol, FORMAT_TOLERANCES[a.format].tol)
    return tol


def scaled_output(op: str, c: float):
    """`op` computed in float64 from the backend's inputs, every value output scaled by 1 + c * tol of
    the row it is judged by, then rounded to the contract's output dtype. For moe_route only the
    weights are scaled (float32 row: its inputs are float32 by contract); for sparse_mla the
    attention output (the lse stays exact)."""
    ref = REFERENCES[op]

    @_contract(op)
    def fn(*args, **kw):
        want = ref(*args, **kw, cdt=torch.float64)          # the contract's output dtypes
        # quantized weights: the format rounds activations to their dtype between GEMMs, so the
        # float64 arithmetic runs on the backend's own inputs (`want`, then output-rounded)
        quantized = any(isinstance(a, Weight) and a.quantized for a in args)
        exact = want if quantized else ref(*_f64(args), **kw, cdt=torch.float64)
        if op == "moe_route":
            return want[0], (exact[1] * (1 + c * _row(torch.float32))).float()
        if isinstance(want, tuple):                         # sparse_mla(..., return_lse=True)
            return (exact[0] * (1 + c * _row(want[0].dtype))).to(want[0].dtype), want[1]
        return (exact * (1 + c * _row(want.dtype, args))).to(want.dtype)
    return fn


def lse_off(c: float):
    """sparse_mla whose log-sum-exp is off by c x the lse bound (tol * max(1, max|lse|)); out exact."""
    @_contract("sparse_mla")
    def fn(*args, **kw):
        out = REFERENCES["sparse_mla"](*args, **kw, cdt=torch.float64)
        if not isinstance(out, tuple):
            return out
        o, lse64 = REFERENCES["sparse_mla"](*_f64(args), **kw, cdt=torch.float64)
        finite = lse64[torch.isfinite(lse64)]
        bound = _row(args[0].dtype) * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
        return out[0], (lse64.double() + c * bound).float()      # -inf rows stay -inf
    return fn


VALUE_OPS = [  # (op, planted factory, the cases the perturbation touches)
    ("moe_experts", lambda c: scaled_output("moe_experts", c), None),
    ("rms_norm", lambda c: scaled_output("rms_norm", c), None),
    ("layer_norm", lambda c: scaled_output("layer_norm", c), None),
    ("rope", lambda c: scaled_output("rope", c), None),
    ("linear", lambda c: scaled_output("linear", c), None),
    ("mlp", lambda c: scaled_output("mlp", c), None),
    ("sparse_mla", lambda c: scaled_output("sparse_mla", c), None),                 # judge "mla": out
    ("sparse_mla", lse_off, "return_lse"),                                           # judge "mla": lse
    ("moe_route", lambda c: scaled_output("moe_route", c), None),                   # judge "route": weights
]
VALUE_IDS = ["moe_experts", "rms_norm", "layer_norm", "rope", "linear", "mlp", "mla-out", "mla-lse", "route-weights"]


# ---- every value judge x every tolerance row ------------------------------------------------------------

@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op,make,touched", VALUE_OPS, ids=VALUE_IDS)
def test_value_near_miss_is_caught_in_every_case(op, make, touched, dtype):
    names = {c.name for c in _cases(op)}
    if touched == "return_lse":                       # only the cases that ask for the lse
        touched = {c.name for c in _cases(op) if _inputs(c).kwargs.get("return_lse")}
        assert touched, "the catalogue has no sparse_mla case with return_lse=True"
    touched = touched or names
    for c in CAUGHT:
        res = _run(op, make(c), dtype)
        missed = [r.case for r in res if r.passed and r.case in touched]
        assert not missed, f"{op} wrong by {c:g} x tol ({dtype}) passed in {missed}"
        assert all(r.passed for r in res if r.case not in touched), [r.line() for r in res]
        for r in res:
            if r.case in touched:   # the reason is the error, not a shape or dtype accident
                assert ("relative error" in r.detail or "lse: max error" in r.detail), r.detail
    res = _run(op, make(PASSES), dtype)
    assert all(r.passed for r in res), "wrong by 0.5 x tol must pass:\n" + "\n".join(r.line() for r in res)


def test_near_pass_uses_at_most_the_row():
    """The 0.5x backends really are 0.5x off (a backend equal to the reference would pass too)."""
    dense = [c for c in _cases("linear") if c.name.split("-")[0] not in FORMAT_TOLERANCES]
    res = _run("linear", scaled_output("linear", PASSES), torch.float32, dense)
    assert all(0.45 * _row(torch.float32) < r.rel <= 0.55 * _row(torch.float32) for r in res), [r.rel for r in res]
    res = _run("linear", scaled_output("linear", 2.0), torch.bfloat16, dense)
    assert all(1.7 * _row(torch.bfloat16) < r.rel < 2.3 * _row(torch.bfloat16) for r in res), [r.rel for r in res]
    fp8 = [c for c in _cases("linear") if c.name.startswith("fp8_block")]          # judged by the format row
    res = _run("linear", scaled_output("linear", PASSES), torch.float32, fp8)
    row = FORMAT_TOLERANCES["fp8_block"].tol
    assert len(res) == 2 and all(0.45 * row < r.rel <= 0.55 * row for r in res), [r.rel for r in res]


# ---- selections: top-k and routing ------------------------------------------------------------------------

@_contract("indexer_topk")
def indexer_swaps_best_winner(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
    """The top-k with its best winner replaced by the best loser (the (k+1)-th), where there is one."""
    args = _f64([q, w, k_cache]) + [block_table, seq_lens, cu_seqlens_q]
    idx = REFERENCES["indexer_topk"](*args, topk, cdt=torch.float64)          # sorted: column 0 = best
    more = REFERENCES["indexer_topk"](*args, topk + 1, cdt=torch.float64)
    loser = more[:, topk]
    idx[:, 0] = torch.where(loser >= 0, loser, idx[:, 0])
    return idx


@_contract("moe_route")
def route_swaps_best_winner(router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                            routed_scaling_factor=1.0):
    ids, w = REFERENCES["moe_route"](router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                                     routed_scaling_factor, cdt=torch.float64)
    more, _ = REFERENCES["moe_route"](router_logits, correction_bias, top_k + 1, n_group, topk_group,
                                      norm_topk_prob, routed_scaling_factor, cdt=torch.float64)
    ids = ids.clone()
    ids[:, 0] = more[:, top_k]                     # topk's order: column 0 is the best expert
    return ids, w.float()


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=DTYPE_IDS)
def test_topk_swapping_the_best_winner_for_the_best_loser_is_caught(dtype):
    for r in _run("indexer_topk", indexer_swaps_best_winner, dtype):
        assert not r.passed and "a winner is missing" in r.detail, r.line()


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=DTYPE_IDS)
def test_route_swapping_the_best_winner_for_the_best_loser_is_caught(dtype):
    for r in _run("moe_route", route_swaps_best_winner, dtype):
        assert not r.passed and "a winner is missing" in r.detail, r.line()


def _designed_row(kind: str, c: float, tol: float, topk: int = 8, L: int = 40, amp: float = 4.0):
    """One query at position L-1 whose scores (max|score| = amp) are designed around the k-th best
    (amp / 2): `loser-in`: the selection takes a loser c * tol * amp below the k-th best instead of
    the k-th; `winner-out`: it leaves out a winner c * tol * amp above the k-th best and takes a loser
    0.1 * tol * amp below it. Returns (idx [1, topk] int32, scores [1, L] float64, positions [1])."""
    g = torch.Generator().manual_seed(7)
    s = torch.empty(L, dtype=torch.float64)
    order = torch.randperm(L, generator=g)                          # rank r lives at position order[r]
    ranks = torch.empty(L, dtype=torch.float64)
    ranks[: topk - 1] = 1.0 - 0.01 * torch.arange(topk - 1)          # clear winners; rank 0 scores 1.0
    ranks[topk - 1] = 0.5                                            # the k-th best
    ranks[topk:] = 0.2 - 0.001 * torch.arange(L - topk)              # clear losers
    if kind == "loser-in":
        ranks[topk] = 0.5 - c * tol
        chosen = list(range(topk - 1)) + [topk]
    else:
        ranks[topk - 2] = 0.5 + c * tol                              # a winner just above the k-th
        ranks[topk] = 0.5 - 0.1 * tol
        chosen = [r for r in range(topk + 1) if r != topk - 2]
    s[order] = ranks * amp
    idx = order[chosen].to(torch.int32)[None]
    return idx, s[None], torch.tensor([L - 1])


@pytest.mark.parametrize("amp", [4.0, 0.5])
@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["loser-in", "winner-out"])
def test_topk_judge_by_designed_gap(kind, dtype, amp):
    """Scores of any magnitude (max|score| 4 or 0.5): the shortfall is measured relative to it."""
    tol = _row(dtype)
    for c in CAUGHT:
        idx, s, pos = _designed_row(kind, c, tol, amp=amp)
        v = judges.topk_validity(idx, s, pos, idx.shape[1], tol)
        assert not v.passed, f"{kind} at {c} x tol passed"
        assert v.rel == pytest.approx(c * tol, rel=1e-6)
        assert ("below the k-th best" if kind == "loser-in" else "a winner is missing") in v.detail
    idx, s, pos = _designed_row(kind, PASSES, tol, amp=amp)
    v = judges.topk_validity(idx, s, pos, idx.shape[1], tol)
    assert v.passed, v.detail
    assert v.rel == pytest.approx(PASSES * tol, rel=1e-6) == v.extra["worst_shortfall"]


def test_topk_judge_on_rows_of_equal_scores():
    """All scores equal (every head's ReLU zero, or one key): any selection is valid, error 0."""
    s = torch.zeros(2, 12, dtype=torch.float64)
    s[1] = 0.25
    idx = torch.tensor([[3, 7, 0, 11], [1, 2, 5, 9]], dtype=torch.int32)
    v = judges.topk_validity(idx, s, torch.tensor([11, 11]), 4, 1e-5)
    assert v.passed and v.rel == 0.0, v.detail
    v = judges.topk_validity(idx[:, :2], s, torch.tensor([0, 1]), 2, 1e-5)   # pos 0: one valid, then -1
    assert not v.passed and "entries after the first 1 must be -1" in v.detail


@pytest.mark.parametrize("kind", ["loser-in", "winner-out"])
def test_route_judge_by_designed_gap(kind):
    """moe_route's selection, judged by the float32 row whatever the model dtype."""
    tol = _row(torch.float32)
    for c in (*CAUGHT, PASSES):
        idx, s, _ = _designed_row(kind, c, tol, topk=4, L=16)
        ids = idx.long()
        w = torch.full(ids.shape, 0.25)
        v = judges.route(ids, w, ids, w.double(), s, tol)
        assert v.passed == (c < 1), (kind, c, v.detail)
        assert v.rel == pytest.approx(c * tol, rel=1e-6) if c > 1 else v.extra["worst_selection"] == pytest.approx(c * tol)


def test_route_is_judged_by_the_float32_row_in_every_run():
    route = next(c for c in CASES if c.op == "moe_route")
    assert tolerance_dtype(_inputs(route), torch.bfloat16) == torch.float32
    mla = next(c for c in CASES if c.op == "sparse_mla")
    assert tolerance_dtype(_inputs(mla), torch.bfloat16) == torch.bfloat16


def test_topk_zero_is_judged_not_crashed():
    s = torch.randn(3, 5, dtype=torch.float64)
    v = judges.topk_validity(torch.zeros(3, 0, dtype=torch.int32), s, torch.tensor([4, 4, 4]), 0, 1e-5)
    assert v.passed, v.detail
    v = judges.topk_validity(torch.zeros(3, 1, dtype=torch.int32), s, torch.tensor([4, 4, 4]), 0, 1e-5)
    assert not v.passed and "shape" in v.detail


# ---- one expert slightly off ------------------------------------------------------------------------------

@_contract("moe_experts")
def one_expert_scaled(x, w13, w2, topk_ids, topk_weights):
    """Expert e's down projection scaled by 1.01, e = the expert carrying the most routing weight."""
    ids = topk_ids.long()
    load = torch.zeros(w2.shape[0], dtype=torch.float64)
    load.index_add_(0, ids[ids >= 0], topk_weights[ids >= 0].double())
    e = int(load.argmax())
    if isinstance(w2, Weight) and w2.quantized:              # scale that expert's dequantized weight
        w2 = Weight(w2.data, w2.scales.clone(), w2.format, w2.block, dict(w2.aux), w2.recipe)
        w2.scales[e] *= 1.01
        return REFERENCES["moe_experts"](x, w13, w2, topk_ids, topk_weights)
    w2 = w2.double().clone()
    w2[e] *= 1.01
    return REFERENCES["moe_experts"](x.double(), w13.double(), w2, topk_ids, topk_weights,
                                     cdt=torch.float64).to(x.dtype)


def test_one_expert_scaled_by_one_percent_is_caught_in_float32():
    """In every case but the FP8 ones: there the format row (4e-3, one e4m3 code step) is looser
    than 1 % of one of three experts; the FP8 cases catch 2x their row (the value near-miss test)."""
    cases = [c for c in _cases("moe_experts") if not c.name.startswith("fp8_block")]
    for r in _run("moe_experts", one_expert_scaled, torch.float32, cases):
        assert not r.passed and "relative error" in r.detail, r.line()


# ---- mtp_verify: one draft too many at the acceptance boundary ---------------------------------------------

NEAR = 0.01  # "within 1 % of u"


_ratios = verify_ratios


@_contract("mtp_verify")
def verify_accepts_near_boundary(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
    """Accepts the first rejected draft too when u is within 1 % above p/q (a `<=` with slack, or a
    ratio computed a little too large), then walks on as the reference does."""
    acc, tok = REFERENCES["mtp_verify"](draft, target_logits, draft_probs, temperature, top_p, uniforms)
    if temperature == 0.0:
        return acc, tok
    ratio = _ratios(draft, target_logits, draft_probs, temperature, top_p)
    u = uniforms.clone()
    bumped = False
    for b in range(draft.shape[0]):
        n = int(acc[b])
        if n < draft.shape[1]:
            r, x = float(ratio[b, n]), float(uniforms[b, n])
            if r <= x <= r * (1 + NEAR):
                u[b, n] = 0.0
                bumped = True
    if not bumped:
        return acc, tok
    return REFERENCES["mtp_verify"](draft, target_logits, draft_probs, temperature, top_p, u)


def _boundary_verify_case(with_probs: bool) -> Case:
    return next(c for c in CASES if c.op == "mtp_verify" and c.name == f"boundary-{'q' if with_probs else 'onehot'}")


@pytest.mark.parametrize("with_probs", [False, True], ids=["onehot", "probs"])
def test_verify_one_too_many_at_the_boundary_is_caught(with_probs):
    assert BOUNDARY < NEAR   # the planted slack reaches the case's uniform
    case = _boundary_verify_case(with_probs)
    ok = run_case(get_backend("cpu_ref"), case, torch.float32, "quick", CPU)
    assert ok.passed, ok.line()
    bad = run_case(get_backend(Planted("verify-slack", mtp_verify=verify_accepts_near_boundary)), case,
                   torch.float32, "quick", CPU)
    assert not bad.passed and "accepted: differs from the reference" in bad.detail, bad.line()


def test_catalogue_catches_verify_one_too_many_at_the_boundary():
    res = _run("mtp_verify", verify_accepts_near_boundary, torch.float32)
    assert not all(r.passed for r in res)


# ---- the judges' own edges -----------------------------------------------------------------------------

def test_lse_judge_rejects_each_malformed_lse():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 2, 3, generator=g)
    lse = torch.randn(4, 2, generator=g).double()
    lse[3] = float("-inf")                                                         # an empty row
    ref_out = out.double()
    tol = _row(torch.float32)
    good = judges.close_lse(out, lse.float(), ref_out, lse, tol, torch.float32)
    assert good.passed, good.detail

    def bad(new_lse, why):
        v = judges.close_lse(out, new_lse, ref_out, lse, tol, torch.float32)
        assert not v.passed and why in v.detail, v.detail

    bad(lse.clone(), "lse: expected float32")                                      # float64 lse
    bad(lse.float()[:3], "lse: expected float32")                                  # short
    bad(lse.float().T.contiguous(), "lse: expected float32")                       # transposed shape
    x = lse.float().clone(); x[0, 0] = float("inf")
    bad(x, "NaN or +inf")
    x = lse.float().clone(); x[0, 1] = float("nan")
    bad(x, "NaN or +inf")
    x = lse.float().clone(); x[3] = 0.0
    bad(x, "-inf in 0 rows, expected in 2")                                        # an empty row not empty
    x = lse.float().clone(); x[1, 0] = float("-inf")
    bad(x, "-inf in 3 rows, expected in 2")
    v = judges.close_lse(out * (1 + 3 * tol), lse.float(), ref_out, lse, tol, torch.float32)
    assert not v.passed and v.detail.startswith("out: relative error")
    bad(lse.float() + 3 * tol * max(1.0, lse[:3].abs().max().item()), "lse: max error")
    # below 1 the bound is absolute: tol * 1
    small = lse * 1e-3
    v = judges.close_lse(out, (small + 0.5 * tol).float(), ref_out, small, tol, torch.float32)
    assert v.passed, v.detail
    v = judges.close_lse(out, (small + 1.5 * tol).float(), ref_out, small, tol, torch.float32)
    assert not v.passed and "lse: max error" in v.detail


def test_close_judge_edges():
    ref = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    assert judges.close(ref.float(), ref, 1e-6).passed
    assert judges.close(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.float64), 1e-6).passed
    z = torch.zeros(2, 2, dtype=torch.float64)
    assert judges.close(z.float(), z, 1e-6).passed                                   # 0 == 0
    v = judges.close(z.float() + 1e-30, z, 1e-6)
    assert not v.passed and math.isinf(v.rel)                                        # anything vs 0
    assert judges.rel_error(torch.zeros(0), torch.zeros(0)) == (0.0, 0.0)
    err, rel = judges.rel_error(ref * 1.5, ref)
    assert err == pytest.approx(2.0) and rel == pytest.approx(0.5)
    for out, why in [([1.0], "expected a tensor"), (ref.float()[:1], "shape"), (ref.half(), "dtype"),
                     (torch.tensor([[1.0, float("inf")], [0.5, 4.0]]), "1 non-finite")]:
        v = judges.close(out, ref, 1e-6, dtype=torch.float32)
        assert not v.passed and why in v.detail, v.detail
    assert judges.close(ref.half(), ref, 1e-2).passed                                # dtype not asked for
    v = judges.close(ref.float() * (1 + 2e-6), ref, 1e-6, name="logits")
    assert not v.passed and v.detail.startswith("logits: relative error")
    # integer outputs need no finiteness check, floating ones do
    assert judges._check_like("x", torch.zeros(2, dtype=torch.int32), (2,), torch.int32) is None


def test_exact_judge_names_the_first_difference():
    a = torch.tensor([1, 2, 3]), torch.tensor([[5, -1], [6, 7]])
    v = judges.exact(a, a, ("accepted", "tokens"))
    assert v.passed and v.rel == 0.0 and v.max_abs == 0.0                       # the report's error column
    v = judges.exact((a[0], torch.tensor([[5, -1], [6, 8]])), a, ("accepted", "tokens"))
    assert not v.passed and v.detail == "tokens: differs from the reference first at [1, 1]: 8 vs 7"
    v = judges.exact((a[0], torch.tensor([[5, 0], [6, 8]])), a, ("accepted", "tokens"))
    assert v.detail == "tokens: differs from the reference first at [0, 1]: 0 vs -1"   # the first of two
    v = judges.exact((a[0][:2], a[1]), a, ("accepted", "tokens"))
    assert not v.passed and "accepted: shape (2,), expected (3,)" in v.detail


def test_route_judge_rejects_malformed_routings():
    E, K = 8, 2
    choice = torch.linspace(1.0, 0.1, E, dtype=torch.float64)[None]
    ids, w = torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]])
    ok = judges.route(ids, w, ids, w.double(), choice, 1e-5)
    assert ok.passed and ok.rel == 0.0 and ok.extra["worst_selection"] == 0.0, ok.detail
    one = judges.route(torch.tensor([[1]]), torch.tensor([[1.0]]), torch.tensor([[0]]), torch.ones(1, 1,
                       dtype=torch.float64), choice, 1e-5)                               # top-1, the wrong one
    assert not one.passed and "below the k-th best" in one.detail
    assert judges.route(ids.flip(-1), w.flip(-1), ids, w.double(), choice, 1e-5).passed   # any order
    for bad_ids, bad_w, why in [
            (ids.float(), w, "expected int32 or int64"), (ids, w.double(), "dtype"), (ids[:, :1], w, "shape"),
            (torch.tensor([[0, 0]]), w, "not 2 distinct experts"), (torch.tensor([[0, -1]]), w, "distinct"),
            (torch.tensor([[0, E]]), w, "distinct"), (torch.tensor([[0, 2]]), w, "below the k-th best"),
            (ids, torch.tensor([[0.6, 0.41]]), "relative error")]:
        v = judges.route(bad_ids, bad_w, ids, w.double(), choice, 1e-5)
        assert not v.passed and why in v.detail, (why, v.detail)
    masked = choice.clone()
    masked[0, 1] = float("-inf")                                                      # a group left out
    v = judges.route(ids, w, torch.tensor([[0, 2]]), w.double(), masked, 1e-5)
    assert not v.passed and "below the k-th best" in v.detail


def test_exact_case_checks_both_output_dtypes():
    case = next(c for c in CASES if c.op == "mtp_verify")
    inputs = _inputs(case)
    acc, tok = REFERENCES["mtp_verify"](*inputs.for_backend(torch.float32, CPU), **inputs.kwargs)
    assert judge_case(case, (acc, tok), inputs, torch.float32).passed
    v = judge_case(case, (acc.long(), tok), inputs, torch.float32)
    assert not v.passed and v.detail == "accepted: dtype torch.int64, expected torch.int32"
    v = judge_case(case, (acc, tok.int()), inputs, torch.float32)
    assert not v.passed and v.detail == "tokens: dtype torch.int32, expected torch.int64"
    assert not judge_case(case, acc, inputs, torch.float32).passed


# ---- the tolerance table itself ---------------------------------------------------------------------------

def test_tolerance_rows_are_pinned():
    """Each row, exactly: changing one is a reviewed act (never widen a row to make a backend pass)."""
    rows = {t.name: (t.mantissa_bits, t.tol) for t in TOLERANCES.values()}
    assert rows == {"float32": (23, 2.0 ** -15), "float16": (10, 2.0 ** -9), "bfloat16": (7, 2.0 ** -6)}
    for dt, t in TOLERANCES.items():
        assert t.dtype == dt and torch.finfo(dt).eps == 2.0 ** -t.mantissa_bits and t.reason
        assert tolerance(dt) is t
    assert MODEL_DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    assert [r["dtype"] for r in table_rows()] == ["float32", "float16", "bfloat16", "format fp8_block",
                                                  "format w8a8_dynamic", "format w8a8_static", "format w4a8_dynamic",
                                                  "cache c8_li"]
    assert {f: t.tol for f, t in CACHE_FORMAT_TOLERANCES.items()} == {"c8_li": 2.0 ** -6}
    assert {f: t.tol for f, t in FORMAT_TOLERANCES.items()} == {"fp8_block": 4e-3, "w8a8_dynamic": 1e-3,
                                                               "w8a8_static": 1e-3, "w4a8_dynamic": 1e-3}
    assert all(t.reason for t in FORMAT_TOLERANCES.values())
    assert table_rows()[0] == {"dtype": "float32", "mantissa_bits": 23, "tol": 2.0 ** -15,
                               "reason": TOLERANCES[torch.float32].reason}
    with pytest.raises(KeyError, match="no tolerance row for torch.float64; rows: float32, float16, bfloat16"):
        tolerance(torch.float64)
    with pytest.raises(AttributeError):            # frozen: nothing (a plugin, a test) can loosen a row at run time
        TOLERANCES[torch.bfloat16].tol = 1.0
    assert TOLERANCES[torch.bfloat16].tol == 2.0 ** -6


def test_parse_dtype_aliases():
    for name, dt in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("half", torch.float16),
                     ("float", torch.float32), ("f32", torch.float32), ("fp32", torch.float32),
                     ("double", torch.float64), ("f64", torch.float64), ("fp64", torch.float64),
                     ("f16", torch.float16), ("torch.bfloat16", torch.bfloat16), ("float16", torch.float16),
                     (torch.int8, torch.int8)]:
        assert parse_dtype(name) is dt, name
    for bad in ("float128", "Size", "bfloat"):
        with pytest.raises(ValueError, match=f"unknown dtype '{bad}'"):
            parse_dtype(bad)


def test_report_lines_and_markdown_show_the_judged_error():
    res = _run("linear", scaled_output("linear", 2.0), torch.float32, [c for c in _cases("linear") if c.name == "kv_a"])
    rep = Report("near", "quick", "cpu", ["float32"], res, 1.0)
    assert not rep.passed and rep.failures == res
    assert rep.summary().startswith("conformance near (quick, float32, cpu): 0 passed, 1 failed of 1 cases")
    line = res[0].line()
    assert line.startswith("FAIL linear") and f"rel={res[0].rel:.2e}" in line
    md = rep.to_markdown()
    assert f"| linear | kv_a | float32 | **FAIL** | native | {res[0].rel:.2e} |" in md
    assert "| float32 | 3.05e-05 |" in md
    assert not Report("empty", "quick", "cpu", []).passed                            # no results: no pass
