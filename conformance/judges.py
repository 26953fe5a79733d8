"""Judges: does a backend's output agree with the reference's?

Each judge takes the backend output (moved to the CPU), the reference output (float64), the case
inputs and the tolerance row, and returns a `Verdict`. Every judge first checks the output's shape,
dtype and finiteness: NaN or inf never passes (the poison in `inputs.py` turns stray reads into NaN).

  close        floating outputs: max|out - ref| / max|ref| <= tol
  topk         indexer top-k by validity (DESIGN §5): per row the right count, every index distinct
               and causal, -1 after the valid ones, every chosen score >= the reference's k-th best
               score minus tol * max|score of the row|, and every causal position left out scores
               <= the k-th best plus the same margin (a dropped winner is caught even when the
               loser that replaced it is close to the k-th best)
  route        routing ids as sets (selection scores checked like top-k), weights by `close`
  exact        integer outputs that must match exactly (mtp_verify: accepted counts and tokens)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Verdict:
    passed: bool
    max_abs: float = float("nan")
    rel: float = float("nan")
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _fail(msg: str, **kw) -> Verdict:
    return Verdict(False, detail=msg, **kw)


def _check_like(name: str, out: Any, shape: tuple, dtype: torch.dtype | None) -> str | None:
    if not isinstance(out, torch.Tensor):
        return f"{name}: expected a tensor, got {type(out).__name__}"
    if tuple(out.shape) != tuple(shape):
        return f"{name}: shape {tuple(out.shape)}, expected {tuple(shape)}"
    if dtype is not None and out.dtype != dtype:
        return f"{name}: dtype {out.dtype}, expected {dtype}"
    if out.is_floating_point() and not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).sum().item()
        return f"{name}: {bad} non-finite values (NaN/inf: an unwritten or out-of-bounds element)"
    return None


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|); both 0 when out == ref == 0."""
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    return err, (err / scale if scale > 0 else (0.0 if err == 0 else math.inf))


def close(out, ref, tol: float, *, name: str = "out", dtype: torch.dtype | None = None) -> Verdict:
    why = _check_like(name, out, ref.shape, dtype)
    if why:
        return _fail(why)
    err, rel = rel_error(out, ref)
    ok = rel <= tol
    return Verdict(ok, err, rel, "" if ok else f"{name}: relative error {rel:.3e} > tol {tol:.3e}")


def close_lse(out: torch.Tensor, lse: torch.Tensor, ref_out, ref_lse, tol: float, dtype) -> Verdict:
    """sparse_mla: `out` by `close`; `lse` -inf exactly where the reference's is (empty rows), the
    finite entries within tol * max(1, max|lse|) (an error delta in every score moves lse by delta)."""
    v = close(out, ref_out, tol, name="out", dtype=dtype)
    if not v.passed:
        return v
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(ref_lse.shape) or lse.dtype != torch.float32:
        return _fail(f"lse: expected float32 {tuple(ref_lse.shape)}, got "
                     f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")
    empty = torch.isneginf(ref_lse)
    if not torch.equal(torch.isneginf(lse), empty):
        return _fail(f"lse: -inf in {int(torch.isneginf(lse).sum())} rows, expected in {int(empty.sum())} "
                     f"(rows with no valid index)")
    if torch.isnan(lse).any() or torch.isposinf(lse).any():
        return _fail("lse: NaN or +inf")
    if (~empty).any():
        d = (lse[~empty].double() - ref_lse[~empty]).abs().max().item()
        bound = tol * max(1.0, ref_lse[~empty].abs().max().item())
        if d > bound:
            return _fail(f"lse: max error {d:.3e} > {bound:.3e}", max_abs=v.max_abs, rel=v.rel)
    return v


def topk_validity(idx, scores: torch.Tensor, positions: torch.Tensor, topk: int, tol: float) -> Verdict:
    """idx [T, topk] int32 from the backend; scores [T, L_max] float64 reference scores (-inf where
    not causal or beyond the request); positions [T] each query's position."""
    T = scores.shape[0]
    why = _check_like("idx", idx, (T, topk), torch.int32)
    if why:
        return _fail(why)
    worst = 0.0
    for t in range(T):
        pos = int(positions[t])
        n = min(topk, pos + 1)
        row = idx[t].long()
        valid, tail = row[:n], row[n:]
        if (tail != -1).any():
            return _fail(f"token {t} (pos {pos}): entries after the first {n} must be -1, got {tail[tail != -1][:5].tolist()}")
        if (valid < 0).any():
            return _fail(f"token {t} (pos {pos}): {int((valid < 0).sum())} of the first {n} entries are -1 "
                         f"(a winner is missing)")
        if (valid > pos).any():
            return _fail(f"token {t} (pos {pos}): non-causal index {int(valid.max())}")
        if valid.unique().numel() != n:
            return _fail(f"token {t} (pos {pos}): duplicate indices")
        if n == 0:  # topk == 0: nothing to choose
            continue
        v = _selection(scores[t, :pos + 1], valid, n, tol, f"token {t} (pos {pos})", "position")
        if not v.passed:
            return v
        worst = max(worst, v.rel)
    return Verdict(True, rel=worst, detail="", extra={"worst_shortfall": worst})


def _selection(s: torch.Tensor, chosen_ids: torch.Tensor, n: int, tol: float, where: str, what: str) -> Verdict:
    """Is `chosen_ids` (n distinct indices into the finite-or--inf scores `s`) a top-n of `s` up to
    tol * max|finite s|? Both directions: no chosen score below the n-th best by more than the
    margin, no score left out above it by more than the margin. `rel`: the larger of the two, over
    max|s|."""
    finite = s[torch.isfinite(s)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    kth = s.topk(n).values[-1].item()
    chosen = s[chosen_ids].min().item()
    left = torch.ones_like(s, dtype=torch.bool)
    left[chosen_ids] = False
    loser_i = int(torch.where(left, s, float("-inf")).argmax()) if left.any() else -1
    loser = s[loser_i].item() if loser_i >= 0 else float("-inf")
    margin = tol * scale
    short = (kth - chosen) / scale if scale > 0 else (0.0 if chosen >= kth else math.inf)
    excess = (loser - kth) / scale if scale > 0 else (0.0 if loser <= kth else math.inf)
    if loser > kth + margin:
        return _fail(f"{where}: {what} {loser_i} was left out, but its score {loser:.6g} is above the k-th best "
                     f"{kth:.6g} by {excess:.2e} of max|score| (tol {tol:.2e}): a winner is missing", rel=excess)
    if chosen < kth - margin:
        return _fail(f"{where}: a chosen score {chosen:.6g} is below the k-th best {kth:.6g} by {short:.2e} of "
                     f"max|score| (tol {tol:.2e})", rel=short)
    return Verdict(True, rel=max(short, excess, 0.0))


def route(ids, weights, ref_ids, ref_weights, choice: torch.Tensor, tol: float) -> Verdict:
    """moe_route: ids [T, K] (any order within a row), weights [T, K] f32 matched by id."""
    T, K = ref_ids.shape
    why = _check_like("topk_ids", ids, (T, K), None) or _check_like("topk_weights", weights, (T, K), torch.float32)
    if why:
        return _fail(why)
    if ids.dtype not in (torch.int32, torch.int64):
        return _fail(f"topk_ids: dtype {ids.dtype}, expected int32 or int64")
    ids = ids.long()
    worst = 0.0
    for t in range(T):
        if ids[t].unique().numel() != K or (ids[t] < 0).any() or (ids[t] >= choice.shape[1]).any():
            return _fail(f"token {t}: ids {ids[t].tolist()} are not {K} distinct experts")
        if K == 0:
            continue
        v = _selection(choice[t], ids[t], K, tol, f"token {t}", "expert")
        if not v.passed:
            return v
        worst = max(worst, v.rel)
    # compare weights by expert: scatter both into [T, E]
    E = choice.shape[1]
    w = torch.zeros(T, E, dtype=torch.float64).scatter_(1, ids, weights.double())
    r = torch.zeros(T, E, dtype=torch.float64).scatter_(1, ref_ids.long(), ref_weights.double())
    v = close(w, r, tol, name="topk_weights (by expert)")
    v.extra["worst_selection"] = worst
    return v


def exact(outs: tuple, refs: tuple, names: tuple[str, ...]) -> Verdict:
    for o, r, n in zip(outs, refs, names):
        why = _check_like(n, o, r.shape, None)
        if why:
            return _fail(why)
        if not torch.equal(o.long(), r.long()):
            bad = (o.long() != r.long()).nonzero()[0].tolist()
            return _fail(f"{n}: differs from the reference first at {bad}: {o[tuple(bad)].item()} vs "
                         f"{r[tuple(bad)].item()}")
    return Verdict(True, 0.0, 0.0)
