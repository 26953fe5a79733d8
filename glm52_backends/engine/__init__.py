"""The engine: the `GLM52` facade (loading, tokenizer, caches), the generation loop shared by
plain and speculative decoding, and the MTP speculative decoder. The network itself is
`glm52_backends.model`; a step's metadata is `glm52_backends.step`."""

from .generation import GenerationResult
from .llm import GLM52

__all__ = ["GLM52", "GenerationResult"]
