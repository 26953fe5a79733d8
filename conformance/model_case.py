"""Model-level case: logits and greedy tokens of a tiny checkpoint on the backend against cpu_ref.

The tiny model has the real format and schedule kinds (IndexShare full and shared layers, dense and
MoE layers) with 32 indexer heads, so exact ReLU-zero ties at the top-k boundary, which would let
two correct backends select different keys, are practically absent. It runs in float32 (the whole
network in bfloat16 legitimately flips top-k selections, so its logits are not comparable; op cases
cover bfloat16); the reference runs in float64.
"""

from __future__ import annotations

import functools
import time

import torch

from glm52_backends.backends.cpu_ref import CpuRefBackend

from . import judges
from .inputs import generator
from .report import CaseResult, crash_detail
from .tolerances import tolerance

PROMPT_LENGTHS = (5, 8, 27, 1)  # < top-k, = top-k, > 3x top-k, one token (top-k 8)
NEW_TOKENS = 12


def _tiny():
    from glm52_backends.tiny import random_state_dict, tiny_config
    cfg, _ = tiny_config(layers=4, vocab_size=256, index_topk=8, index_n_heads=32)
    return cfg, random_state_dict(cfg, seed=11)


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[list[list[int]], list[torch.Tensor], list[list[int]]]:
    """(prompts, float64 logits, greedy tokens) of the reference model: computed once per process."""
    from glm52_backends.engine import GLM52
    cfg, sd = _tiny()
    g = generator("model", "prompts")
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    ref = GLM52(cfg, backend=CpuRefBackend(torch.float64), dtype=torch.float64, state_dict=sd, progress=False)
    return prompts, ref(prompts), ref.generate(prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False).tokens


def _path(ops: dict[str, str]) -> str:
    used = {how for how in ops.values() if how != "unused"}
    return "native" if used == {"native"} else "fallback" if used == {"fallback"} else "mixed"


def run_model_case(bound, quick: bool = False) -> list[CaseResult]:
    from glm52_backends.engine import GLM52
    caps = bound.capabilities
    dtype = torch.float32 if torch.float32 in caps.get("dtypes", [torch.float32]) else caps.get("default_dtype")
    dname = str(dtype).removeprefix("torch.")
    logits = CaseResult("model", "logits", dname, about="tiny checkpoint, ragged batch, 4 layers")
    greedy = CaseResult("model", "greedy", dname, about=f"{NEW_TOKENS} greedy tokens per request")
    try:
        prompts, want, b = _reference()
        cfg, sd = _tiny()
        ours = GLM52(cfg, backend=bound, dtype=dtype, state_dict=sd, progress=False)
        t0 = time.perf_counter()
        got = ours(prompts)
        logits.time_ms = (time.perf_counter() - t0) * 1e3
        v = judges.close(torch.cat([x.cpu() for x in got]), torch.cat(want), tolerance(dtype).tol, name="logits")
        logits.passed, logits.max_abs, logits.rel, logits.detail = v.passed, v.max_abs, v.rel, v.detail
        t0 = time.perf_counter()
        a = ours.generate(prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False).tokens
        greedy.time_ms = (time.perf_counter() - t0) * 1e3
        greedy.passed = a == b
        greedy.detail = "" if a == b else f"greedy tokens differ: {a} vs reference {b}"
        logits.path = greedy.path = _path(ours.ops.ran_natively())
    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported as a failed case with its cause
        for r in (logits, greedy):
            if not r.passed:
                r.detail = r.detail or crash_detail(e, bound.name)
    return [logits, greedy]
