"""Load a GLM-5.x checkpoint folder: `config.json` + safetensors (single file or sharded): BF16,
block-FP8 (spec §2, §10) or an msModelSlim AscendV1 W8A8 / W4A8 folder (spec/quantization.md §1).

Everything is validated from the safetensors headers before a single tensor is read, so a bad
checkpoint fails fast, names the culprit tensor and file, and leaves no partial state behind.
Only safetensors is read (never pickle); tensors come through `safetensors.safe_open` (mmap).

Quantized weights stay as stored: a block-FP8 linear becomes `Weight(fp8 codes, weight_scale_inv,
"fp8_block", block)`, an AscendV1 one a `Weight` of format `w8a8_static` / `w8a8_dynamic` /
`w4a8_dynamic` with its aux tensors (glm52_backends/quant.py has the table); every other tensor is a
plain tensor in the compute dtype. `quantization=` changes that at load:

| quantization | BF16 checkpoint | quantized checkpoint |
|---|---|---|
| None | dense | as stored |
| "none" | dense | dequantized to the compute dtype (what this loader did before) |
| "fp8" / "w8a8" / "w4a8" | quantized at load by `recipe_format` (online, like vLLM `--quantization fp8`; online w8a8 is dynamic only: static needs calibration) | as stored when it is that scheme, else refused |

AscendV1 (msModelSlim): `quant_model_description.json` gives one type string per tensor (`FLOAT`,
`W8A8` = static, `W8A8_DYNAMIC`, `W4A8_DYNAMIC`; unknown strings are refused naming the tensor);
`quant_model_weights*.safetensors` (+ optional `.index.json`) hold, for a quantized `X.weight`,
`X.weight` (int8; W4A8: two int4 per byte along the output dim, or unpacked int8 codes in [-8, 7]),
`X.weight_scale` and `X.weight_offset` (`[N, 1]`), static: `X.input_scale`, `X.input_offset` (`[1]`),
`X.deq_scale` (`[N]` f32, or the f32 bit pattern in int64 as fp16 models store it: converted),
`X.quant_bias` (int32 `[N]`); W4A8: `X.scale_bias` (`[N, 1]` or `[N, m]`, summed over the last dim).

One file per concern, each importing only those above it here:
  headers.py      safetensors headers and sharded indexes (`CheckpointError`, `TensorEntry`)
  ascend.py       msModelSlim AscendV1 folders: description, file names, part names
  layout.py       the HF layout: config.json, weight files, FP8 scale names; the embedded default model
  tokenizer.py    tokenizer.json, checked against the vocabulary
  schemes.py      quantization schemes: each tensor's format, what `quantization=` may ask
  validation.py   headers against the config, every problem in one error
  slicing.py      a rank's slice mapped onto each stored part of a weight
  materialise.py  reading the tensors: `load_checkpoint`, `load_checkpoint_shard`
"""

from .ascend import ASCEND_DESCRIPTION, ASCEND_INDEX, ASCEND_NAMES, ASCEND_PARTS, ASCEND_SINGLE, ASCEND_TYPES, \
    ascend_part_name
from .headers import CheckpointError, TensorEntry, read_safetensors_header
from .layout import INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE, default_checkpoint, load_config
from .materialise import checkpoint_quantization, expected_rows, load_checkpoint, load_checkpoint_shard
from .schemes import DEFAULT_FP8_BLOCK, QUANTIZATIONS, check_quantization, convert_state_dict, quantizable, \
    quantization_problem, recipe_format, scheme_of
from .slicing import local_part, slice_weight
from .tokenizer import TOKENIZER_MIN_SHARE, Tokenizer, load_tokenizer
from .validation import FP8_DTYPE, NORMAL_DTYPES, validate_entries

__all__ = ["ASCEND_DESCRIPTION", "ASCEND_INDEX", "ASCEND_NAMES", "ASCEND_PARTS", "ASCEND_SINGLE", "ASCEND_TYPES",
           "CheckpointError", "DEFAULT_FP8_BLOCK", "FP8_DTYPE", "INDEX_FILE", "NORMAL_DTYPES", "QUANTIZATIONS",
           "SCALE_SUFFIX", "SINGLE_FILE", "TOKENIZER_MIN_SHARE", "TensorEntry", "Tokenizer", "ascend_part_name",
           "check_quantization", "checkpoint_quantization", "convert_state_dict", "default_checkpoint",
           "expected_rows", "load_checkpoint", "load_checkpoint_shard", "load_config", "load_tokenizer",
           "local_part", "quantizable", "quantization_problem", "read_safetensors_header", "recipe_format",
           "scheme_of", "slice_weight", "validate_entries"]
