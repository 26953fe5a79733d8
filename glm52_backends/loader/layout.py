"""The HF checkpoint layout: `config.json` beside `model.safetensors` (or `model-*.safetensors` +
`model.safetensors.index.json`), block-FP8 scales as `<name>.weight_scale_inv`; an AscendV1 folder
is told by its description (ascend.py). Also where the embedded default model lives.
"""

from __future__ import annotations

import glob
import os

from ..config import ConfigError, ModelConfig
from ..files import regular_file
from .ascend import ASCEND_DESCRIPTION, _ascend_config, _ascend_files
from .headers import CheckpointError, TensorEntry, _sharded_entries, read_safetensors_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # `<name>.weight` -> `<name>.weight_scale_inv`


def load_config(path: str | os.PathLike) -> ModelConfig:
    """`ModelConfig` of a checkpoint folder (or a `config.json` path); any problem -> ConfigError
    naming the file."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if os.path.exists(cfg_path) and not regular_file(cfg_path):    # a FIFO would block open() forever
        raise ConfigError(f"{cfg_path}: not a regular file (a FIFO, socket, device or folder); config.json must "
                          f"be a JSON file")
    try:
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, ASCEND_DESCRIPTION)):
            return _ascend_config(cfg_path)
        return ModelConfig.from_file(cfg_path)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith(cfg_path):
            raise
        msg = msg.removeprefix("config.json: ")
        raise ConfigError(f"{cfg_path}: {msg}") from None
    except (TypeError, ValueError, AttributeError, KeyError, OSError, RecursionError) as e:
        # a safety net: the config boundary (config.py) names the key for every case it knows
        raise ConfigError(f"{cfg_path}: invalid config ({type(e).__name__}: {e})") from None


def _weight_files(folder: str) -> tuple[dict[str, TensorEntry], str]:
    """All tensors of the checkpoint (name -> entry), and a label for messages about it."""
    if os.path.isfile(os.path.join(folder, ASCEND_DESCRIPTION)):
        return _ascend_files(folder)
    single = os.path.join(folder, SINGLE_FILE)
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):  # HF prefers the single file too
        return read_safetensors_header(single), single
    if os.path.isfile(index):
        return _sharded_entries(folder, index), index
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    ascend = sorted(glob.glob(os.path.join(glob.escape(folder), "quant_model_weight*.safetensors")))
    if ascend:   # msModelSlim weights without their description: say that, not "no model.safetensors"
        raise CheckpointError(f"{folder}: holds {os.path.basename(ascend[0])} (an msModelSlim AscendV1 folder) but "
                              f"no {ASCEND_DESCRIPTION}, which gives each tensor's quantization type; copy it from "
                              f"the msModelSlim output next to the weights")
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
                          f"are supported)")


def default_checkpoint() -> str:
    """The embedded default model: a tiny GLM-5.2 trained on the Python standard library's source
    (`glm52_backends/devtools/train_tiny.py`; MLA + DSA indexer with IndexShare + MoE + MTP, BF16),
    shipped inside the package at `glm52_backends/default_model/`. What `glm52 generate` runs without a
    checkpoint. Loads with `GLM52(default_checkpoint())`."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "default_model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the embedded default model is missing from {path} (an incomplete install? "
                                f"reinstall glm52_backends, or rebuild it with "
                                f"`python -m glm52_backends.devtools.train_tiny --out {path}`)")
    return path
