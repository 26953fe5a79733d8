"""Run a backend's ops on the catalogue's inputs and judge them against the reference.

For each case and dtype: the inputs are built once on the CPU from the case's seed, handed to the
backend in the dtype under test on its device, and to the reference (cpu_ref computing in float64,
on the CPU) as the same dtype-rounded values in float64. The backend's output is judged by the
case's judge with the dtype's row of the tolerance table. Whether the op ran natively or fell back
to the reference is read from the bound backend's call counters.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Iterable

import torch

from glm52_backends.backends.cpu_ref import CpuRefBackend
from glm52_backends.registry import BoundBackend, get_backend

from . import judges
from .cases import CASES, Case, indexer_scores, selection_scores
from .cases.sparse_mla import judge_dcp
from .report import CaseResult, Report, crash_detail
from .tolerances import cache_format_tolerance, format_tolerance, tolerance

REFERENCE = CpuRefBackend(torch.float64)


def _sync(device: torch.device) -> None:
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def _poison_allocator(device: torch.device, nbytes: int = 64 << 20) -> None:
    """Fill memory the device's caching allocator will hand out next with NaN, so an output a kernel
    allocates with `empty` and leaves partly unwritten shows NaN instead of stale zeros."""
    if device.type == "cpu":
        return  # the CPU allocator returns fresh pages; unwritten outputs are caught by shape checks
    try:
        torch.full((nbytes // 4,), float("nan"), device=device)
    except Exception:  # noqa: BLE001 - poisoning is best effort, never a reason to fail a case
        pass


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def tolerance_dtype(inputs, dtype: torch.dtype) -> torch.dtype:
    """The tolerance row a case is judged by: the dtype under test when some input is cast to it
    (an "act" or "weight" argument), else float32. moe_route and mtp_verify take float32 inputs by
    contract whatever the model dtype, so a bfloat16 run must not judge them by the bfloat16 row
    (500x looser than the arithmetic they do)."""
    return dtype if any(a.role in ("act", "weight", "qweight") for a in inputs.args.values()) else torch.float32


def case_tolerance(inputs, dtype: torch.dtype) -> float:
    """The case's bound: its dtype row, or for quantized weights or caches the looser of that and the
    format's row."""
    tol = tolerance(tolerance_dtype(inputs, dtype)).tol
    for a in inputs.args.values():
        if a.role == "qweight":
            tol = max(tol, format_tolerance(a.value.format).tol)
        if a.role == "qcache":
            tol = max(tol, cache_format_tolerance(a.value.fmt))
    return tol


def judge_case(case: Case, out: Any, inputs, dtype: torch.dtype) -> judges.Verdict:
    """Compute the reference and judge `out` (already on the CPU)."""
    tol = case_tolerance(inputs, dtype)
    ref_args = inputs.for_reference(dtype)
    if case.judge == "topk":
        batch = inputs.meta["batch"]
        return judges.topk_validity(out, indexer_scores(ref_args, batch), batch.positions, ref_args[-1], tol)
    ref = getattr(REFERENCE, case.op)(*ref_args, **inputs.kwargs)
    if case.judge == "close":
        return judges.close(out, ref, tol, dtype=dtype)
    if case.judge == "mla":
        if not inputs.kwargs.get("return_lse"):
            if isinstance(out, (tuple, list)):
                return judges.Verdict(False, detail="sparse_mla must return out alone unless return_lse=True")
            return judges.close(out, ref, tol, dtype=dtype)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            return judges.Verdict(False, detail="sparse_mla(..., return_lse=True) must return (out, lse)")
        return judges.close_lse(out[0], out[1], ref[0], ref[1], tol, dtype)
    if case.judge == "dcp":       # decode context parallelism: the ranks' partials merged, vs the whole cache
        return judge_dcp(out, inputs, dtype, tol, REFERENCE, ref)
    if case.judge == "route":
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            return judges.Verdict(False, detail="moe_route must return (topk_ids, topk_weights)")
        choice = selection_scores(ref_args)
        return judges.route(out[0], out[1], ref[0], ref[1], choice, tol)
    if case.judge == "exact":
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            return judges.Verdict(False, detail=f"{case.op} must return two tensors")
        v = judges.exact(tuple(out), tuple(ref), ("accepted", "tokens"))
        for o, name, want in zip(out, ("accepted", "tokens"), (torch.int32, torch.int64)):
            if v.passed and o.dtype != want:
                return judges.Verdict(False, detail=f"{name}: dtype {o.dtype}, expected {want}")
        return v
    raise AssertionError(case.judge)


def prepared(bound: BoundBackend, case: Case, inputs, dtype: torch.dtype):
    """The case with its quantized weights as the backend prepares them at load (`prepare_weight`): the
    backend and the reference both get the prepared values, so the case judges the backend's kernels,
    and the preparation is what the format row's arithmetic runs on (e.g. Ascend's bfloat16-rounded
    W8A8 expert scales in a bfloat16 model)."""
    import dataclasses
    args = {}
    for name, a in inputs.args.items():
        if a.role == "qweight":
            a = dataclasses.replace(a, value=bound.prepare_weight(f"{case.op}.{name}", a.value, dtype=dtype))
        args[name] = a
    return dataclasses.replace(inputs, args=args)


def run_case(bound: BoundBackend, case: Case, dtype: torch.dtype, scale: str, device: torch.device,
             inputs=None) -> CaseResult:
    res = CaseResult(op=case.op, case=case.name, dtype=str(dtype).removeprefix("torch."), about=case.about)
    try:
        inputs = prepared(bound, case, inputs or case.build(scale), dtype)
        args = inputs.for_backend(dtype, device)
        before = dict(bound.calls[case.op])
        _poison_allocator(device)
        _sync(device)
        t0 = time.perf_counter()
        out = getattr(bound, case.op)(*args, **inputs.kwargs)
        _sync(device)
        res.time_ms = (time.perf_counter() - t0) * 1e3
        after = bound.calls[case.op]
        res.path = "native" if after["native"] > before["native"] else "fallback"
        v = judge_case(case, _to_cpu(out), inputs, dtype)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a crashing op is a failed case, reported with its cause
        # (a backend op calling sys.exit too: it must not end the suite; Ctrl-C still does)
        res.passed, res.detail = False, crash_detail(e, bound.name)
        res.traceback = traceback.format_exc(limit=4)
        return res
    res.passed, res.max_abs, res.rel, res.detail = v.passed, v.max_abs, v.rel, v.detail
    return res


def run(backend: Any = "cpu_ref", quick: bool = False, *, dtypes: Iterable[torch.dtype] | None = None,
        ops: Iterable[str] | None = None, model: bool = True, progress: bool = False) -> Report:
    """Check `backend` (a registered name, a backend object or a `BoundBackend`) against the reference.

    `dtypes`: the dtypes to test in (default: the backend's `capabilities["default_dtype"]`, or
    float32). `ops`: restrict to these ops. `model`: also run the model-level case (logits and
    greedy tokens of a tiny checkpoint against cpu_ref). Returns a `Report`.
    """
    bound = get_backend(backend)
    device = torch.device(getattr(bound.backend, "device", None) or "cpu")
    caps = bound.capabilities
    if dtypes is None:
        dtypes = [caps.get("default_dtype") or torch.float32]
    dtypes = list(dtypes)
    scale = "quick" if quick else "full"
    report = Report(backend=bound.name, scale=scale, device=str(device), dtypes=[str(d).removeprefix("torch.")
                                                                                for d in dtypes])
    wanted = set(ops) if ops is not None else None
    if wanted is not None:            # an unknown op would select no case and "pass" with nothing run
        from glm52_backends.ops import OP_NAMES
        unknown = sorted(map(str, wanted - set(OP_NAMES) - {"model"}))
        if unknown or not wanted:
            raise ValueError(f"conformance.run: unknown op{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown)) or '(none given)'}; the ops are "
                             f"{', '.join(OP_NAMES)}, and 'model' for the model case")
        if wanted == {"model"} and not model:
            raise ValueError("conformance.run: ops=['model'] with model=False selects no case")
    t_start = time.perf_counter()
    for case in CASES:
        if wanted is not None and case.op not in wanted:
            continue
        inputs = None
        for dtype in dtypes:
            try:
                inputs = inputs or case.build(scale)
            except Exception:  # noqa: BLE001 - run_case reports it
                inputs = None
            r = run_case(bound, case, dtype, scale, device, inputs)
            report.results.append(r)
            if progress:
                print(r.line(), flush=True)
    if model and (wanted is None or "model" in wanted):
        from .model_case import run_model_case
        for r in run_model_case(bound, quick=quick):
            report.results.append(r)
            if progress:
                print(r.line(), flush=True)
    report.seconds = time.perf_counter() - t_start
    return report
