"""`generate`: batched generation, plain or MTP-speculative, as a client of the continuous-batching
engine (engine/scheduler.py): one loop schedules, drafts, verifies and samples for `generate` and for
`glm52 serve`.

A `generate` call adds every prompt as a request of one engine and steps it until all have finished.
The engine is sized so nothing waits or is preempted: a cache holding every request's prompt, its
new tokens (and drafts in flight), a step budget taking every prompt at once (or `prefill_chunk`
tokens of each per step), as many running requests as prompts, no prefix sharing. Request i samples
with its own generator, seeded from `seed` and i (the same tokens whatever else runs beside it).
Under torchrun each rank runs the same engine on the same requests (no leader: the ranks' steps
meet in the model's collectives); with dp groups sharing their experts the engine's steps take turns
(engine/turns.py). With graphs, the engine (its cache and captured steps) stays on the model and
serves later calls that fit it, as vLLM captures once per engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import arguments
from .scheduler import Engine, SamplingParams
from .speculative import DEFAULT_DRAFT_THRESHOLD, acceptance_stats

FINISH_REASONS = ("length", "eos", "context")


@dataclass
class GenerationResult:
    """`tokens[i]`: the new tokens of request i; `finish_reasons[i]`: why it stopped: "length"
    (max_new_tokens), "eos", or "context" (max_position_embeddings reached first)."""
    tokens: list[list[int]]
    stats: dict[str, Any] = field(default_factory=dict)
    text: list[str] | None = None
    finish_reasons: list[str] = field(default_factory=list)


def fits(kept: Engine | None, *, k: int, graph: Any, batch: int, cache_tokens: int) -> bool:
    """Whether a kept engine (its cache and captured graphs) serves a `generate` call of `batch` requests
    needing `cache_tokens` cache tokens, with k drafts and the same graph request."""
    return (kept is not None and kept.graph_mode is not None and kept.k == k and kept.graph_request == graph
            and kept.max_seqs >= batch and kept.cache_capacity >= cache_tokens)


def _engine(model, *, k: int, cache_tokens: int, batch: int, step_tokens: int, graph: Any, seed: int,
            **kw) -> Engine:
    """An engine for one `generate` call: the model's kept one when it fits (graphs), else a new one."""
    kept = getattr(model, "generate_engine", None)
    if fits(kept, k=k, graph=graph, batch=batch, cache_tokens=cache_tokens):
        kept.reset(seed=seed, max_num_batched_tokens=step_tokens, **kw)
        return kept
    eng = Engine(model, cache_tokens=cache_tokens, max_num_batched_tokens=step_tokens, max_num_seqs=batch,
                 speculative=k, prefix_caching=False, seed=seed, graph=graph, lockstep=False, dp_turns=True,
                 on_nonfinite="raise", **kw)
    if eng.graph_mode:
        model.generate_engine = eng
    return eng


def generate(model, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, speculative: int = 0, prefill_chunk: int | None = None,
             stop_at_eos: bool = True, cache_tokens: int | None = None, adaptive: bool = False,
             draft_threshold: float | None = None, graph="auto", draft_filter=None,
             return_engine: bool = False):
    """`GLM52.generate`'s body: `speculative=k > 0` drafts with the MTP layer (`adaptive=True`: up
    to k per round, stopping a request's drafting once the MTP layer's probability of its last draft
    is <= `draft_threshold`, default 0.5; engine/speculative.py), else plain decoding. Every argument
    is checked before anything runs (engine/arguments.py). `draft_filter` (request, position, token)
    -> token replaces the MTP layer's draft choice (benchmarks: a set acceptance rate). With
    `return_engine` the engine comes back too: (result, engine)."""
    arguments.generation(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         speculative=speculative, prefill_chunk=prefill_chunk, stop_at_eos=stop_at_eos,
                         cache_tokens=cache_tokens, adaptive=adaptive, draft_threshold=draft_threshold, graph=graph)
    k = speculative
    if k and model.mtp is None:
        raise ValueError("speculative decoding needs the MTP layer, which this model does not have "
                         "(num_nextn_predict_layers = 0, or model.layers.N.* tensors missing, or "
                         "loaded with include_mtp=False)")
    threshold = (DEFAULT_DRAFT_THRESHOLD if draft_threshold is None else float(draft_threshold)) if adaptive else None
    prompts = model.encode_prompts(prompts)
    B, C, bs = len(prompts), model.cfg.max_position_embeddings, model.block_size
    budget = arguments.budgets(model, prompts, max_new_tokens)
    # room for each request's prompt, the tokens it may still emit and k drafts in flight (never past
    # the context), a spare block per cache id; the MTP entries (speculative) as many again
    per = [min(len(p) + n + k, C) + bs for p, n in zip(prompts, budget)]
    need = cache_tokens or sum(per) * (2 if k else 1)
    step_tokens = max(sum(map(len, prompts)) + B * (k + 1), k + 2)
    eng = _engine(model, k=k, cache_tokens=need, batch=B, step_tokens=step_tokens, graph=graph,
                  seed=0 if seed is None else seed, prefill_chunk=prefill_chunk, draft_threshold=threshold,
                  draft_filter=draft_filter)
    eng.finished_log = []
    out: list[list[int]] = [[] for _ in range(B)]
    reason = ["context" if budget[i] < max_new_tokens else "length" for i in range(B)]
    try:
        for i, p in enumerate(prompts):
            if budget[i] > 0:
                eng.add_request(p, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                                  ignore_eos=not stop_at_eos), request_id=i)
        # the prefill ends when every request that may emit has its first token; the decode steps follow
        first_pending = {i for i in range(B) if budget[i] > 0}
        t0, t1, steps_at_prefill = time.perf_counter(), None, 0
        while eng.has_unfinished():
            for o in eng.step():
                i = o.request_id
                first_pending.discard(i)
                out[i] += o.token_ids
                if o.finished and o.finish_reason == "stop":
                    reason[i] = "eos"
            if t1 is None and not first_pending:
                t1, steps_at_prefill = time.perf_counter(), eng.stats["steps"]
        t2 = time.perf_counter()
    except BaseException:
        for i in range(B):       # the engine is dropped (or kept clean for the next call): nothing held
            eng.abort(i)
        raise
    t1 = t2 if t1 is None else t1
    n_new = sum(map(len, out))
    steps = eng.stats["steps"] - steps_at_prefill
    stats: dict[str, Any] = {
        "backend": model.backend_name, "requests": B, "prompt_tokens": sum(map(len, prompts)),
        "new_tokens": n_new, "prefill_s": t1 - t0, "decode_s": t2 - t1,
        "prefill_steps": steps_at_prefill, ("verify_steps" if k else "decode_steps"): steps,
        "preemptions": eng.stats["preemptions"],
        "tokens_per_s": n_new / (t2 - t0) if t2 > t0 else float("nan"),
        "decode_tokens_per_s": (n_new - B) / (t2 - t1) if t2 > t1 and n_new > B else float("nan"),
    }
    if k:
        stats.update(speculative=k, adaptive=adaptive, draft_threshold=threshold)
    stats.update(graph_stats(eng))
    if k:
        stats.update(acceptance_stats(eng.finished_log))
    stats["ops"] = model.ops.ran_natively()
    stats["finish_reasons"] = {r: reason.count(r) for r in FINISH_REASONS if r in reason}
    text = [model.tokenizer.decode(o) for o in out] if model.tokenizer is not None else None
    res = GenerationResult(out, stats, text, reason)
    return (res, eng) if return_engine else res


def graph_stats(eng: Engine) -> dict[str, Any]:
    """Whether graphs ran: the buckets of the engine's target step (decode, or verify under speculative
    decoding) and of its MTP draft step."""
    g = eng.graphs.get("verify" if eng.k else "decode")
    if g is None:
        return {"graph": eng.graph_why if eng.graph_mode is None else eng.graph_mode, "graphs_captured": 0}
    v = g.stats()
    if not eng.k:
        return v
    d = eng.graphs["mtp"].stats() if "mtp" in eng.graphs else {}
    return {"graph": v["graph"], "graphs_captured": v["graphs_captured"] + d.get("graphs_captured", 0),
            "graph_buckets": v["graph_buckets"], "eager_buckets": v["eager_buckets"],
            "mtp_graph_buckets": d.get("graph_buckets", []), "mtp_eager_buckets": d.get("eager_buckets", []),
            "graph_capture_s": v["graph_capture_s"] + d.get("graph_capture_s", 0.0)}


__all__ = ["generate", "GenerationResult", "FINISH_REASONS", "graph_stats", "fits"]
