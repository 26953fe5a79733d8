"""msModelSlim AscendV1 folders (spec/quantization.md §1): `quant_model_description.json` gives one
type string per tensor, `quant_model_weights*.safetensors` hold each quantized weight as its parts
(`X.weight`, `X.weight_scale`, `X.weight_offset`, ...: `ASCEND_PARTS`). How their shapes and dtypes
are checked is validation.py's; how they are read, materialise.py's.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from ..config import ModelConfig
from .headers import CheckpointError, TensorEntry, _sharded_entries, read_safetensors_header

# msModelSlim AscendV1 (spec/quantization.md §1)
ASCEND_DESCRIPTION = "quant_model_description.json"
ASCEND_SINGLE = "quant_model_weights.safetensors"
ASCEND_INDEX = ASCEND_SINGLE + ".index.json"
ASCEND_TYPES = {"FLOAT": "dense", "W8A8": "w8a8_static", "W8A8_DYNAMIC": "w8a8_dynamic",
                "W4A8_DYNAMIC": "w4a8_dynamic"}               # type string -> quant.FORMATS
ASCEND_NAMES = {fmt: t for t, fmt in ASCEND_TYPES.items()}
# Weight part (quant.layout) -> what replaces the trailing "weight" of `X.weight` in the checkpoint
ASCEND_PARTS = {"data": "weight", "scales": "weight_scale", "offset": "weight_offset", "input_scale": "input_scale",
                "input_offset": "input_offset", "deq_scale": "deq_scale", "quant_bias": "quant_bias",
                "scale_bias": "scale_bias"}


def _ascend_config(cfg_path: str) -> ModelConfig:
    """An AscendV1 folder's config.json: the quantization is described by quant_model_description.json;
    a `quantization_config` that is not block-FP8 (msModelSlim may leave one) is not this config's."""
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError, RecursionError):
        return ModelConfig.from_file(cfg_path)   # its own message for the file's problem
    if isinstance(d, dict) and isinstance(d.get("quantization_config"), dict) \
            and d["quantization_config"].get("quant_method") != "fp8":
        d.pop("quantization_config")
    return ModelConfig.from_hf_dict(d)


def _ascend_files(folder: str) -> tuple[dict[str, TensorEntry], str]:
    """An AscendV1 folder's tensors: `quant_model_weights.safetensors.index.json` when there is one,
    else every `quant_model_weight*.safetensors` file (one or several; a tensor stored twice is refused)."""
    for name in (ASCEND_INDEX, "quant_model_weight.safetensors.index.json"):
        index = os.path.join(folder, name)
        if os.path.isfile(index):
            return _sharded_entries(folder, index), index
    files = sorted(glob.glob(os.path.join(glob.escape(folder), "quant_model_weight*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder}: has {ASCEND_DESCRIPTION} but no quant_model_weights*.safetensors "
                              f"(an msModelSlim AscendV1 folder holds both)")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for name, e in read_safetensors_header(file).items():
            if name in entries:
                raise CheckpointError(f"{file}: tensor '{name}' is also stored in {entries[name].file}; each tensor "
                                      f"must be stored once")
            entries[name] = e
    return entries, files[0] if len(files) == 1 else os.path.join(folder, "quant_model_weight*.safetensors")


def _description(folder: str) -> dict[str, Any] | None:
    """The AscendV1 `quant_model_description.json` of a folder (None when it has none)."""
    file = os.path.join(folder, ASCEND_DESCRIPTION)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: must be a JSON object (tensor name -> quantization type), "
                              f"got {type(d).__name__}")
    return d


def ascend_part_name(name: str, part: str) -> str:
    """Checkpoint name of Weight part `part` of the quantized linear `name` (`X.weight`)."""
    return name[: -len("weight")] + ASCEND_PARTS[part]


def _ascend_owner(name: str) -> tuple[str, str] | None:
    """(`X.weight`, part) when `name` is an aux tensor name `X.<aux>`; else None."""
    for part, suffix in ASCEND_PARTS.items():
        if part != "data" and name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight", part
    return None
