"""`generate`: batched generation, plain or MTP-speculative, through the one loop of decoding.py."""

from __future__ import annotations

from . import arguments
from .decoding import GenerationResult, PlainDecoder, run_generation
from .speculative import generate_speculative


def generate(model, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, speculative: int = 0, prefill_chunk: int | None = None,
             stop_at_eos: bool = True, cache_tokens: int | None = None, adaptive: bool = False,
             draft_threshold: float | None = None, graph="auto") -> GenerationResult:
    """`GLM52.generate`'s body: `speculative=k > 0` drafts with the MTP layer (`adaptive=True`: up
    to k per round, engine/speculative.py), else plain decoding. Every argument is checked before
    anything runs (engine/arguments.py)."""
    arguments.generation(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         speculative=speculative, prefill_chunk=prefill_chunk, stop_at_eos=stop_at_eos,
                         cache_tokens=cache_tokens, adaptive=adaptive, draft_threshold=draft_threshold, graph=graph)
    if speculative:
        return generate_speculative(model, prompts, max_new_tokens=max_new_tokens, k=speculative,
                                    temperature=temperature, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos,
                                    prefill_chunk=prefill_chunk, cache_tokens=cache_tokens, adaptive=adaptive,
                                    draft_threshold=draft_threshold, graph=graph)
    prompts = model.encode_prompts(prompts)
    # room for each request's prompt and the tokens it may still emit (never past the context)
    budget = arguments.budgets(model, prompts, max_new_tokens)
    need = cache_tokens or sum(len(p) + n + model.block_size for p, n in zip(prompts, budget))
    dec = PlainDecoder(model, temperature=temperature, top_p=top_p, seed=seed, cache_tokens=need, graph=graph,
                       batch=len(prompts))
    return run_generation(model, dec, prompts, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                          prefill_chunk=prefill_chunk)


__all__ = ["generate", "generate_speculative", "GenerationResult"]
