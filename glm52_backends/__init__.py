"""glm52_backends: GLM-5.2 inference with a pluggable hardware layer."""

from .registry import get_backend, list_backends, register_backend

__all__ = ["GLM52", "get_backend", "register_backend", "list_backends", "ModelConfig", "default_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name):  # the model pulls in torch-heavy modules; keep `import glm52_backends` light
    if name == "GLM52":
        from .engine import GLM52
        return GLM52
    if name == "ModelConfig":
        from .config import ModelConfig
        return ModelConfig
    if name == "default_checkpoint":   # the embedded default model's folder (glm52_backends/loader/layout.py)
        from .loader import default_checkpoint
        return default_checkpoint
    raise AttributeError(f"module 'glm52_backends' has no attribute {name!r}")
