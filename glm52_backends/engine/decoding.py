"""The generation loop, shared by plain and speculative decoding, and the plain decoder.

A decoder owns its caches and sampling state and offers two calls:
    prefill(prompts, prefill_chunk) -> the first new token of each request
    step(reqs) -> {request: (drafts accepted, tokens emitted this round)}
`run_generation` drives any decoder: it emits tokens up to `max_new_tokens`, the first EOS or the
end of the context (whichever comes first: `finish_reasons` says "length", "eos" or "context"),
times prefill and decode, and reports the same stats for every decoder (plus the decoder's own).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling import check_sampling, probs_from_logits, sample_from
from .arguments import budgets, nonfinite
from .graph import StaticDecode, capture_mode

FINISH_REASONS = ("length", "eos", "context")


@dataclass
class GenerationResult:
    """`tokens[i]`: the new tokens of request i; `finish_reasons[i]`: why it stopped: "length"
    (max_new_tokens), "eos", or "context" (max_position_embeddings reached first)."""
    tokens: list[list[int]]
    stats: dict[str, Any] = field(default_factory=dict)
    text: list[str] | None = None
    finish_reasons: list[str] = field(default_factory=list)


def prefill_chunks(prompts: dict[Hashable, Sequence[int]], prefill_chunk: int | None
                   ) -> Iterator[dict[Hashable, list[int]]]:
    """Steps of a (chunked) prefill: every request with prompt left gets its next chunk in each step."""
    done = {r: 0 for r in prompts}
    while any(done[r] < len(p) for r, p in prompts.items()):
        chunks = {}
        for r, p in prompts.items():
            n = len(p) - done[r] if prefill_chunk is None else min(prefill_chunk, len(p) - done[r])
            if n > 0:
                chunks[r] = [int(t) for t in p[done[r]:done[r] + n]]
                done[r] += n
        yield chunks


def pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [N, V] -> tokens [N] and, when sampling, the distribution they were drawn from [N, V]."""
    if temperature == 0.0:
        return logits.argmax(-1), None
    p = probs_from_logits(logits, temperature, top_p)
    u = torch.rand(logits.shape[0], generator=gen).to(p.device)
    return sample_from(p, u), p


class PlainDecoder:
    """One token per request per step from the target model. Decode steps run through captured
    graphs where `graph` allows (engine/graph.py), else eagerly; either way the step's tokens and
    its finiteness come back to the host in one read."""

    steps_stat = "decode_steps"

    def __init__(self, model, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 cache_tokens: int, graph="auto", batch: int = 1):
        temperature, top_p = check_sampling(temperature, top_p)
        self.model, self.temperature, self.top_p = model, temperature, top_p
        self.gen = torch.Generator().manual_seed(0 if seed is None else seed)
        self.last_token: dict[int, int] = {}
        self.graph = graph
        self.graph_mode, self.graph_why = capture_mode(model, graph)
        self.static: StaticDecode | None = None
        if self.graph_mode:
            # graphs read one cache and one set of buffers: kept on the model and reused by later runs
            # that fit them (vLLM captures once per engine), else made anew (and captured anew)
            kept = model.decode_graphs
            if kept is not None and kept.serves(model, self.graph_mode, cache_tokens, batch):
                self.static, self.cache = kept, kept.reset()
            else:
                self.cache = model.new_cache(cache_tokens + model.block_size)     # + the null block
                self.static = model.decode_graphs = StaticDecode(model, self.cache, batch, self.graph_mode,
                                                                 strict=graph != "auto")
        else:
            self.cache = model.new_cache(cache_tokens)
        self.steps = 0

    def _sample(self, logits: torch.Tensor, reqs: list[int], what: str) -> list[int]:
        """Tokens of logits [N, V], sampled on the device; the tokens and whether each row was finite
        come back in the step's one host read. NaN/inf logits raise, naming the step and requests."""
        toks, _ = pick(logits, self.temperature, self.top_p, self.gen)
        bad = ~torch.isfinite(logits).all(-1)
        toks, bad = torch.stack([toks.long(), bad.long()]).tolist()          # the one host read
        if any(bad):
            nonfinite(self.model.ops, what, [r for r, b in zip(reqs, bad) if b])
        self.last_token.update(zip(reqs, toks))
        return toks

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], prefill_chunk: int | None = None) -> list[int]:
        last: dict[int, torch.Tensor] = {}
        reqs = list(range(len(prompts)))
        for chunks in prefill_chunks(dict(enumerate(prompts)), prefill_chunk):
            last.update(self.model.extend(self.cache, chunks, last_only=True))
        return self._sample(torch.cat([last[i] for i in reqs]), reqs, "logits of the prefill")

    @torch.inference_mode()
    def step(self, reqs: Sequence[int]) -> dict[int, tuple[int, list[int]]]:
        reqs = list(reqs)
        self.steps += 1
        tokens = [self.last_token[i] for i in reqs]
        mark = self.cache.mark(reqs)
        try:
            logits = self.static.step(reqs, tokens) if self.static is not None else None
            if logits is None:                        # eager (no graphs, or this bucket stays eager)
                last = self.model.extend(self.cache, {i: [t] for i, t in zip(reqs, tokens)}, last_only=True,
                                         check_finite=False)
                logits = torch.cat([last[i] for i in reqs])
            toks = self._sample(logits, reqs, f"logits of decode step {self.steps}")
        except BaseException:
            self.cache.rollback(mark)                # by length: the step never happened
            raise
        return {i: (0, [t]) for i, t in zip(reqs, toks)}

    def stats(self) -> dict[str, Any]:
        if self.static is not None:
            return self.static.stats()      # cumulative over the runs that reused these graphs
        return {"graph": self.graph_why if self.graph_mode is None else self.graph_mode, "graphs_captured": 0}


def run_generation(model, decoder, prompts: list[list[int]], *, max_new_tokens: int, stop_at_eos: bool,
                   prefill_chunk: int | None, extra_stats: dict[str, Any] | None = None) -> GenerationResult:
    """Drive `decoder` until every request has `max_new_tokens` tokens, emitted an EOS, or filled
    the context (prompt + new tokens = max_position_embeddings)."""
    B = len(prompts)
    eos = set(model.cfg.eos_token_id) if stop_at_eos else set()
    out: list[list[int]] = [[] for _ in range(B)]
    budget = budgets(model, prompts, max_new_tokens)
    reason = ["length" if budget[i] == max_new_tokens else "context" for i in range(B)]

    def emit(i: int, toks: list[int]) -> bool:
        """Append up to the request's budget / the first eos; True while request i goes on."""
        for t in toks:
            if len(out[i]) >= budget[i]:
                return False
            out[i].append(int(t))
            if t in eos:
                reason[i] = "eos"
                return False
        return len(out[i]) < budget[i]

    t0 = time.perf_counter()
    active: list[int] = []
    if any(n > 0 for n in budget):
        first = decoder.prefill(prompts, prefill_chunk)
        active = [i for i in range(B) if budget[i] > 0 and emit(i, [first[i]])]
    t1 = time.perf_counter()
    steps = 0
    while active:
        steps += 1
        res = decoder.step(active)
        active = [i for i in active if emit(i, res[i][1])]
    t2 = time.perf_counter()

    n_new = sum(len(o) for o in out)
    stats = {
        "backend": model.backend_name, "requests": B, "prompt_tokens": sum(map(len, prompts)),
        "new_tokens": n_new, "prefill_s": t1 - t0, "decode_s": t2 - t1, decoder.steps_stat: steps,
        "tokens_per_s": n_new / (t2 - t0) if t2 > t0 else float("nan"),
        "decode_tokens_per_s": (n_new - B) / (t2 - t1) if t2 > t1 and n_new > B else float("nan"),
        **(extra_stats or {}),
        **(decoder.stats() if hasattr(decoder, "stats") else {}),
        "ops": model.ops.ran_natively(),
    }
    stats["finish_reasons"] = {r: reason.count(r) for r in FINISH_REASONS if r in reason}
    text = [model.tokenizer.decode(o) for o in out] if model.tokenizer is not None else None
    return GenerationResult(out, stats, text, reason)
