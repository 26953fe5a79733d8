"""The engine's input boundary: prompts, token ids, step chunks, generation and sampling arguments,
caches and user-supplied weights, each checked once here with a message naming the culprit.

Token ids must be Python ints (or numpy / torch integers): a float, bool or string is refused,
never converted (`int(2.7)` would silently be token 2). Every float argument must be finite.
Prompts longer than the context are refused up front; generation past the context stops there
with the finish reason "context" (engine/generation.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from ..config import FLOAT_DTYPES, is_int
from ..engine_config import dtype_name
from ..sampling import check_sampling


_is_int = is_int


def parse_dtype(name: str | None):
    """A dtype name (or None) -> the torch dtype (or None)."""
    return None if name is None else FLOAT_DTYPES[dtype_name(name)]


def _kind(v: Any) -> str:
    return f"{type(v).__name__} {v!r}" if not isinstance(v, torch.Tensor) else f"tensor of {v.dtype}"


# ---- token ids -----------------------------------------------------------------------------------
def token_ids(seq: Any, where: str, vocab_size: int) -> list[int]:
    """A sequence of token ids as a list of ints in [0, vocab_size); anything else is refused."""
    if isinstance(seq, torch.Tensor):
        if seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise ValueError(f"{where}: token ids must be integers, got a tensor of {seq.dtype}")
        if seq.dim() != 1:
            raise ValueError(f"{where}: token ids must be a 1-D sequence, got a tensor of shape {list(seq.shape)}")
        seq = seq.tolist()
    elif hasattr(seq, "dtype") and hasattr(seq, "tolist"):  # numpy arrays
        if getattr(seq.dtype, "kind", "i") not in "iu":
            raise ValueError(f"{where}: token ids must be integers, got an array of {seq.dtype}")
        seq = seq.tolist()
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
        raise ValueError(f"{where}: expected a sequence of token ids, got {_kind(seq)}")
    out = []
    for j, t in enumerate(seq):
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.dtype.is_floating_point and t.dtype != torch.bool:
            t = t.item()
        if not _is_int(t):
            raise ValueError(f"{where}: token id at position {j} is {_kind(t)}; token ids must be integers "
                             f"(floats, bools and strings are refused, not converted)")
        t = int(t)
        if not 0 <= t < vocab_size:
            raise ValueError(f"{where}: token id {t} at position {j} is outside the vocabulary [0, {vocab_size})")
        out.append(t)
    return out


def prompts(model, prompts: Any) -> list[list[int]]:
    """Token-id lists from a `[B, T]` integer tensor, token-id lists, or strings (with a tokenizer);
    each non-empty and no longer than the context."""
    cfg = model.cfg
    if not isinstance(prompts, torch.Tensor) and hasattr(prompts, "ndim") and hasattr(prompts, "tolist"):
        prompts = list(prompts) if prompts.ndim == 2 else [prompts]  # numpy: rows are checked as arrays
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts tensor must be [B, T], got shape {tuple(prompts.shape)}")
        prompts = list(prompts)
    elif isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and _is_int(prompts[0])):
        prompts = [prompts]
    if isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of token-id lists or strings, or a [B, T] tensor; got {_kind(prompts)}")
    if not prompts:
        raise ValueError("prompts: no prompts given")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("text prompts need a tokenizer.json in the checkpoint; pass token ids instead")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:   # lone surrogates: bytes the command line could not decode
                raise ValueError(f"prompt {i} is not valid UTF-8 text: character {e.start} is "
                                 f"{p[e.start]!r}, a lone surrogate (undecodable bytes, e.g. from a command "
                                 f"line in another encoding); pass UTF-8 text or token ids") from None
            p = model.tokenizer.encode(p)
        ids = token_ids(p, f"prompt {i}", cfg.vocab_size)
        if not ids:
            raise ValueError(f"prompt {i}: every prompt needs at least one token")
        if len(ids) > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than the model's context "
                             f"(max_position_embeddings = {cfg.max_position_embeddings})")
        out.append(ids)
    return out


def chunks(cache, chunks: Any, vocab_size: int) -> dict[Hashable, list[int]]:
    """`extend`'s {request: token ids}: a mapping of hashable ids to integer sequences."""
    from ..cache import PagedCache
    if not isinstance(cache, PagedCache):
        raise ValueError(f"cache must be a PagedCache from model.new_cache(...), got {_kind(cache)}")
    if not isinstance(chunks, Mapping):
        raise ValueError(f"chunks must be a dict {{request id: token ids}}, got {_kind(chunks)}")
    out = {}
    for r, seq in chunks.items():
        try:
            hash(r)
        except TypeError:
            raise ValueError(f"request id {r!r} is not hashable") from None
        out[r] = token_ids(seq, f"request {r!r}", vocab_size)
    return out


def cache_fits(model, cache) -> None:
    """A cache built for this model: same layers and widths, dtype and device."""
    cfg = model.cfg
    c0 = cache.c.get(0)
    want = (cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    got = (c0.shape[-1], cache.k_pe[0].shape[-1]) if c0 is not None else None
    if got != want or cache.num_layers != cfg.num_hidden_layers:
        raise ValueError("cache: it was not built for this model (layers or latent widths differ); "
                         "use model.new_cache(...)")
    dev = torch.device(model.device)
    dt = cache.dtype      # the dtype it was built for (a quantized cache's codes are float8/int8 views)
    if dt != model.dtype or c0.device.type != dev.type or (dev.index is not None and c0.device.index != dev.index):
        raise ValueError(f"cache: {dt} on {c0.device}, the model computes in {model.dtype} on "
                         f"{model.device}; use model.new_cache(...)")


# ---- generation ----------------------------------------------------------------------------------
def positive_int(name: str, v: Any, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if v is None and allow_none:
        return
    if not _is_int(v) or v < 0 or (v == 0 and not allow_zero):
        want = "an integer >= 0" if allow_zero else "a positive integer"
        raise ValueError(f"{name} must be {want}{' or None' if allow_none else ''}, got {v!r}")


def generation(*, max_new_tokens: Any, temperature: Any, top_p: Any, seed: Any, speculative: Any,
               prefill_chunk: Any, stop_at_eos: Any, cache_tokens: Any, adaptive: Any = False,
               draft_threshold: Any = None, graph: Any = None) -> None:
    """Every argument of `GLM52.generate` except the prompts."""
    positive_int("max_new_tokens", max_new_tokens, allow_zero=True)
    if graph is not None:
        graph_choice("generate: graph", graph)
    if not _is_int(speculative) or speculative < 0:
        raise ValueError(f"speculative must be 0 (plain decoding) or a positive integer number of draft tokens, "
                         f"got {speculative!r}")
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
    if adaptive and not speculative:
        raise ValueError("adaptive=True needs speculative=k > 0: it adapts how many of the k MTP draft tokens "
                         "each round proposes")
    if draft_threshold is not None and not adaptive:
        raise ValueError(f"draft_threshold={draft_threshold!r} is used only with adaptive=True "
                         f"(and speculative=k > 0); pass adaptive=True or leave draft_threshold out")
    check_draft_threshold(draft_threshold, allow_none=True)
    positive_int("prefill_chunk", prefill_chunk, allow_none=True)
    positive_int("cache_tokens", cache_tokens, allow_none=True)
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if not isinstance(stop_at_eos, bool):
        raise ValueError(f"stop_at_eos must be True or False, got {stop_at_eos!r}")
    check_sampling(temperature, top_p)


def graph_choice(name: str, v: Any) -> Any:
    """"auto", True, False, or a capture mode by name: "trace" / "compile" (engine/graph.py)."""
    if not (v in ("auto", "trace", "compile") if isinstance(v, str) else isinstance(v, bool)):
        raise ValueError(f"{name} must be 'auto', True, False, 'trace' or 'compile', got {v!r}")
    return v


def check_draft_threshold(v: Any, *, allow_none: bool = False) -> float | None:
    """Adaptive drafting's threshold: a number in [0, 1] (a probability; 0 never stops drafting
    early, 1 always stops after the first draft)."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"draft_threshold must be a probability in [0, 1] (0: never stop drafting early, "
                         f"1: always stop after the first draft), got {v!r}")
    return float(v)


def budgets(model, prompts: list[list[int]], max_new_tokens: int) -> list[int]:
    """New tokens each request may emit: max_new_tokens, or fewer where the context ends first."""
    C = model.cfg.max_position_embeddings
    return [min(max_new_tokens, C - len(p)) for p in prompts]


# ---- weights and outputs -------------------------------------------------------------------------
def quantization(v: Any) -> str | None:
    """`GLM52(quantization=...)`: None (the checkpoint's stored format), "none", "fp8", "w8a8", "w4a8"."""
    from ..loader import check_quantization
    return check_quantization(v, "GLM52: quantization")


def state_dict(cfg, sd: Any, include_mtp: bool) -> None:
    """User-supplied weights for a `ModelConfig`: every expected name, its shape, a float dtype, finite
    (a linear may also be a `weights.Weight`: its logical shape and finite scales are checked)."""
    from ..loader import SCALE_SUFFIX
    from ..quant import check_weight
    from ..weights import Weight, expected_tensors
    if not isinstance(sd, Mapping):
        raise ValueError(f"state_dict must be a dict of tensors, got {_kind(sd)}")
    want = expected_tensors(cfg, include_mtp=include_mtp)
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want and not k.endswith(SCALE_SUFFIX)]
    problems = [f"missing tensor '{k}' (expected {list(want[k])})" for k in missing[:5]]
    problems += [f"unexpected tensor '{k}'" for k in extra[:5]]
    for k, shape in want.items():
        t = sd.get(k)
        if t is None:
            continue
        if isinstance(t, Weight):
            if tuple(t.shape) != tuple(shape):
                problems.append(f"Weight '{k}' has shape {list(t.shape)}, expected {list(shape)}")
            for part, v in t.tensors().items():
                if v.is_floating_point() and not bool(torch.isfinite(v.float()).all()):
                    problems.append(f"Weight '{k}': its {part} hold NaN/inf value(s)")
            try:                       # the loader's ranges: scales no quantizer writes (quant.part_problem)
                check_weight(t, f"Weight '{k}'")
            except ValueError as e:
                problems.append(str(e))
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"'{k}' is {_kind(t)}, not a tensor")
        elif tuple(t.shape) != tuple(shape):
            problems.append(f"tensor '{k}' has shape {list(t.shape)}, expected {list(shape)}")
        elif not t.is_floating_point():
            problems.append(f"tensor '{k}' has dtype {t.dtype}, expected a floating dtype")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"tensor '{k}' holds {int((~torch.isfinite(t)).sum())} NaN/inf value(s)")
    if problems:
        raise ValueError(f"state_dict does not match the config ({len(problems)} problem(s)"
                         f"{', first ones' if len(missing) > 5 or len(extra) > 5 else ''}):\n  " + "\n  ".join(problems))


def finite_logits(logits: torch.Tensor, ops, what: str = "logits") -> torch.Tensor:
    """Logits must be finite (one reduction per step): NaN/inf would silently become token 0 or EOS."""
    if not bool(torch.isfinite(logits).all()):
        bad = ~torch.isfinite(logits)
        rows = bad.any(-1).nonzero().flatten().tolist() if logits.dim() > 1 else [0]
        nonfinite(ops, what, rows, int(bad.sum()))
    return logits


def nonfinite(ops, what: str, rows: list, count: int | None = None) -> None:
    """Raise FloatingPointError: `what` (logits of a step) held NaN/inf in `rows`."""
    hint = "" if ops.debug else "; run with GLM52_DEBUG=1 to find the first op that produced one"
    n = f"{count} NaN/inf value(s)" if count is not None else "NaN/inf values"
    raise FloatingPointError(f"backend {ops.name!r}: {what} hold {n} (rows {rows[:8]}"
                             f"{'...' if len(rows) > 8 else ''}){hint}")
