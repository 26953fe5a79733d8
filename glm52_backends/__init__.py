"""glm52_backends: GLM-5.2 inference with a pluggable hardware layer."""

from .registry import get_backend, list_backends, register_backend

__all__ = ["GLM52", "get_backend", "register_backend", "list_backends", "ModelConfig", "default_checkpoint"]
__version__ = "0.1.0"


def default_checkpoint() -> str:
    """The embedded default model: a tiny GLM-5.2 trained on the Python standard library's source
    (`glm52_backends/train_tiny.py`; MLA + DSA indexer with IndexShare + MoE + MTP, BF16), shipped
    inside the package at `glm52_backends/default_model/`. What `glm52 generate` runs without a
    checkpoint. Loads with `GLM52(default_checkpoint())`."""
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the embedded default model is missing from {path} (an incomplete install? "
                                f"reinstall glm52_backends, or rebuild it with "
                                f"`python -m glm52_backends.train_tiny --out {path}`)")
    return path


def __getattr__(name):  # the model pulls in torch-heavy modules; keep `import glm52_backends` light
    if name == "GLM52":
        from .engine import GLM52
        return GLM52
    if name == "ModelConfig":
        from .config import ModelConfig
        return ModelConfig
    raise AttributeError(f"module 'glm52_backends' has no attribute {name!r}")
