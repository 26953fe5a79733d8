"""The engine: the `GLM52` facade (loading, tokenizer, caches), the continuous-batching engine
(scheduler.py: the one loop, plain and MTP-speculative) and `generate`, its batch client. The network itself is
`glm52_backends.model`; a step's metadata is `glm52_backends.step`."""

from .generation import GenerationResult
from .llm import GLM52

__all__ = ["GLM52", "GenerationResult"]
