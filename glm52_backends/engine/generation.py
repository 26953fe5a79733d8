"""`generate`: batched generation, plain or MTP-speculative, through the one loop of decoding.py."""

from __future__ import annotations

from .decoding import GenerationResult, PlainDecoder, check_generation_args, run_generation
from .speculative import generate_speculative


def generate(model, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, speculative: int = 0, prefill_chunk: int | None = None,
             stop_at_eos: bool = True, cache_tokens: int | None = None) -> GenerationResult:
    """`GLM52.generate`'s body: `speculative=k > 0` drafts with the MTP layer, else plain decoding."""
    if speculative:
        return generate_speculative(model, prompts, max_new_tokens=max_new_tokens, k=speculative,
                                    temperature=temperature, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos,
                                    prefill_chunk=prefill_chunk, cache_tokens=cache_tokens)
    check_generation_args(max_new_tokens, prefill_chunk)
    prompts = model.encode_prompts(prompts)
    need = cache_tokens or sum(len(p) + max_new_tokens + model.block_size for p in prompts)
    dec = PlainDecoder(model, temperature=temperature, top_p=top_p, seed=seed, cache_tokens=need)
    return run_generation(model, dec, prompts, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                          prefill_chunk=prefill_chunk)


__all__ = ["generate", "generate_speculative", "GenerationResult"]
