"""The generation loop, shared by plain and speculative decoding, and the plain decoder.

A decoder owns its caches and sampling state and offers two calls:
    prefill(prompts, prefill_chunk) -> the first new token of each request
    step(reqs) -> {request: (drafts accepted, tokens emitted this round)}
`run_generation` drives any decoder: it emits tokens up to `max_new_tokens` or the first EOS,
times prefill and decode, and reports the same stats for every decoder (plus the decoder's own).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling import probs_from_logits, sample_from


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    stats: dict[str, Any] = field(default_factory=dict)
    text: list[str] | None = None


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
    """One token per request per step from the target model."""

    steps_stat = "decode_steps"

    def __init__(self, model, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 cache_tokens: int):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature > 0:
            probs_from_logits(torch.zeros(1, 2), temperature, top_p)  # validates top_p early
        self.model, self.temperature, self.top_p = model, float(temperature), float(top_p)
        self.gen = torch.Generator().manual_seed(0 if seed is None else seed)
        self.cache = model.new_cache(cache_tokens)
        self.last_token: dict[int, int] = {}

    def _sample(self, logits: dict[int, torch.Tensor], reqs: list[int]) -> list[int]:
        toks, _ = pick(torch.cat([logits[i] for i in reqs]), self.temperature, self.top_p, self.gen)
        toks = [int(t) for t in toks.tolist()]
        self.last_token.update(zip(reqs, toks))
        return toks

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], prefill_chunk: int | None = None) -> list[int]:
        last: dict[int, torch.Tensor] = {}
        for chunks in prefill_chunks(dict(enumerate(prompts)), prefill_chunk):
            last.update(self.model.extend(self.cache, chunks, last_only=True))
        return self._sample(last, list(range(len(prompts))))

    @torch.inference_mode()
    def step(self, reqs: Sequence[int]) -> dict[int, tuple[int, list[int]]]:
        reqs = list(reqs)
        last = self.model.extend(self.cache, {i: [self.last_token[i]] for i in reqs}, last_only=True)
        return {i: (0, [t]) for i, t in zip(reqs, self._sample(last, reqs))}


def check_generation_args(max_new_tokens: int, prefill_chunk: int | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")


def run_generation(model, decoder, prompts: list[list[int]], *, max_new_tokens: int, stop_at_eos: bool,
                   prefill_chunk: int | None, extra_stats: dict[str, Any] | None = None) -> GenerationResult:
    """Drive `decoder` until every request has `max_new_tokens` tokens or emitted an EOS."""
    B = len(prompts)
    eos = set(model.cfg.eos_token_id) if stop_at_eos else set()
    out: list[list[int]] = [[] for _ in range(B)]

    def emit(i: int, toks: list[int]) -> bool:
        """Append up to max_new_tokens / the first eos; True while request i goes on."""
        for t in toks:
            out[i].append(int(t))
            if len(out[i]) >= max_new_tokens or t in eos:
                return False
        return True

    t0 = time.perf_counter()
    active: list[int] = []
    if max_new_tokens > 0:
        first = decoder.prefill(prompts, prefill_chunk)
        active = [i for i in range(B) if emit(i, [first[i]])]
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
        "ops": model.ops.ran_natively(),
    }
    text = [model.tokenizer.decode(o) for o in out] if model.tokenizer is not None else None
    return GenerationResult(out, stats, text)
