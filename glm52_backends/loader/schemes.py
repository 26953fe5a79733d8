"""Quantization schemes: which format each tensor takes under a scheme (the loader, make-tiny and the
planner alike), a checkpoint's stored scheme, what `quantization=` may ask of it, and an in-memory
state dict converted by the same rules (the table in glm52_backends/loader/__init__.py).
"""

from __future__ import annotations

from typing import Any

import torch

from ..weights import Weight, is_fp8_weight, quantize_weight

DEFAULT_FP8_BLOCK = (128, 128)   # GLM-5.2-FP8's weight_block_size: online FP8 quantizes in it

# quantization= choices (GLM52(..., quantization=...), deployment `dtypes.weights`)
QUANTIZATIONS = ("none", "fp8", "w8a8", "w4a8")


def recipe_format(name: str, scheme: str | None, *, static_attention: bool = True) -> str:
    """The format checkpoint tensor `name` takes under quantization scheme `scheme`.

    "fp8": the linears GLM-5.2-FP8 quantizes (`weights.is_fp8_weight`) -> `fp8_block`.
    "w8a8": the GLM-5 msModelSlim mixed recipe: attention projections (q_a, q_b, kv_a, o_proj,
            indexer wq_b) `w8a8_static` (`w8a8_dynamic` when `static_attention=False`: online
            quantization has no calibrated input scale); dense MLP, shared and routed experts
            `w8a8_dynamic`; kv_b_proj, indexer wk and weights_proj, the router, embeddings, lm_head,
            norms and the MTP glue stay float ("dense").
    "w4a8": as w8a8, with the routed experts `w4a8_dynamic`.
    None / "none": "dense".
    """
    if scheme in (None, "none"):
        return "dense"
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {scheme!r}; known: {', '.join(QUANTIZATIONS)}")
    if not is_fp8_weight(name):
        return "dense"
    if scheme == "fp8":
        return "fp8_block"
    if name.endswith(("self_attn.kv_b_proj.weight", "self_attn.indexer.wk.weight")):
        return "dense"
    if ".mlp." in name:
        return "w4a8_dynamic" if scheme == "w4a8" and ".mlp.experts." in name else "w8a8_dynamic"
    return "w8a8_static" if static_attention else "w8a8_dynamic"


def quantizable(name: str) -> bool:
    """Linear weights the model can hold in a quantized format (what a checkpoint may quantize)."""
    return is_fp8_weight(name) or name.endswith(("self_attn.indexer.weights_proj.weight", ".eh_proj.weight"))


def scheme_of(formats: dict[str, str]) -> str:
    """"none" | "fp8" | "w8a8" | "w4a8": the quantization scheme of a checkpoint's stored formats."""
    fs = set(formats.values()) - {"dense"}
    if not fs:
        return "none"
    if "fp8_block" in fs:
        return "fp8"
    return "w4a8" if "w4a8_dynamic" in fs else "w8a8"


_SCHEME_WORDS = {"none": "unquantized (BF16/F32) weights", "fp8": "block-FP8 weights (GLM-5.2-FP8 format)",
                 "w8a8": "msModelSlim W8A8 weights", "w4a8": "msModelSlim W4A8 weights"}


def check_quantization(quantization: Any, where: str = "quantization") -> str | None:
    if quantization is not None and (not isinstance(quantization, str) or quantization not in QUANTIZATIONS):
        raise ValueError(f"{where} must be None (run the checkpoint's stored format) or one of "
                         f"{', '.join(map(repr, QUANTIZATIONS))}, got {quantization!r}")
    return quantization


def quantization_problem(stored: str, quantization: str | None, where: str) -> str | None:
    """Why checkpoint `where` (stored scheme `stored`) cannot give `quantization`; None when it can."""
    if quantization in (None, "none") or stored in ("none", quantization):
        return None
    return (f"quantization={quantization!r} asks for {_SCHEME_WORDS[quantization]}, but {where} holds "
            f"{_SCHEME_WORDS[stored]}: run it as stored (quantization=None or {stored!r}), or dequantized "
            f"('none'); a quantized checkpoint is not re-quantized to another format (quantize the BF16 "
            f"release instead)")


def _wanted(name: str, stored: str, scheme: str, quantization: str | None) -> str:
    if quantization is None or (quantization != "none" and scheme == quantization):
        return stored
    if quantization == "none":
        return "dense"
    return recipe_format(name, quantization, static_attention=False)   # a float checkpoint, quantized online


def convert_state_dict(sd: dict[str, Any], quantization: str | None) -> dict[str, Any]:
    """An in-memory state dict (tensors and `Weight`s, e.g. `GLM52(cfg, state_dict=...)`) converted as
    `quantization` says, with the loader's rules (module docstring): None keeps it as it is."""
    check_quantization(quantization)
    if quantization is None:
        return sd
    formats = {k: v.format if isinstance(v, Weight) else "dense" for k, v in sd.items()}
    scheme = scheme_of(formats)
    why = quantization_problem(scheme, quantization, "the state_dict")
    if why:
        raise ValueError(why)
    out: dict[str, Any] = {}
    for k, v in sd.items():
        want = _wanted(k, formats[k], scheme, quantization)
        if want == formats[k]:
            out[k] = v
        elif want == "dense":
            out[k] = v.dense(torch.float32)
        else:
            t = v.data if isinstance(v, Weight) else v
            out[k] = quantize_weight(t.detach().float().cpu(), want, block=DEFAULT_FP8_BLOCK).to(t.device)
    return out
