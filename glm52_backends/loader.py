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
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, ModelConfig
from .files import regular_file
from .quant import INT4_MAX, INT4_MIN, layout, pack_int4_rows, part_problem
from .weights import Weight, expected_tensors, float32_tensor, fp8_scale_shape, is_fp8_weight, quantize_weight

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # `<name>.weight` -> `<name>.weight_scale_inv`
DEFAULT_FP8_BLOCK = (128, 128)

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

# quantization= choices (GLM52(..., quantization=...), deployment `dtypes.weights`)
QUANTIZATIONS = ("none", "fp8", "w8a8", "w4a8")

NORMAL_DTYPES = {"BF16", "F16", "F32"}
FP8_DTYPE = "F8_E4M3"
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1,
             "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_MAX_LISTED = 10  # problems spelled out in one error message


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match what its config describes."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its safetensors header describes it."""
    name: str
    file: str  # absolute path of the .safetensors file holding it
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]


# ---- config and tokenizer -------------------------------------------------------------------

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


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` (the checkpoint's `tokenizer.json`)."""

    def __init__(self, tok: Any) -> None:
        self.tokenizer = tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


# A checkpoint's embedding may be padded past its tokenizer (to a multiple of 64 .. 128 x tp: Megatron,
# HF); a tokenizer covering less than this share of `vocab_size` is another model's.
TOKENIZER_MIN_SHARE = 7 / 8


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer | None:
    """The folder's `tokenizer.json` as a `Tokenizer`, or None when there is none. Checked against the
    model's `vocab_size` (default: the folder's config.json): a tokenizer with more ids than the model
    embeds, or far fewer (another model's: the ids it lacks would decode to nothing), is refused."""
    file = os.path.join(os.fspath(path), "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        from tokenizers import Tokenizer as _HFTokenizer  # lazy: optional dependency
    except ImportError as e:
        raise ImportError(f"{file} needs the 'tokenizers' package: pip install 'glm52_backends[tokenizer]'") from e
    try:
        tok = Tokenizer(_HFTokenizer.from_file(file))
    except Exception as e:  # tokenizers raises its own Exception type on malformed files
        raise ValueError(f"{file}: cannot read tokenizer ({e})") from None
    if vocab_size is None:
        vocab_size = load_config(path).vocab_size
    n = tok.vocab_size
    if n > vocab_size or n < TOKENIZER_MIN_SHARE * vocab_size:
        why = ("its ids past the embedding cannot be embedded" if n > vocab_size else
               f"{vocab_size - n} of the model's ids would decode to nothing")
        raise CheckpointError(f"{file}: the tokenizer has {n} tokens, but the model's vocab_size is {vocab_size} "
                              f"({why}); is it another model's tokenizer.json? (a padded embedding may exceed the "
                              f"tokenizer by up to {1 - TOKENIZER_MIN_SHARE:.1%})")
    return tok


# ---- safetensors headers ---------------------------------------------------------------------

def read_safetensors_header(file: str) -> dict[str, TensorEntry]:
    """Parse and sanity-check one file's header; the data region must hold every tensor."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file (header length {n} "
                                      f"runs past the file end at {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _header_entry(file, name, info, data_size)
    return entries


def _header_entry(file: str, name: str, info: Any, data_size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape) \
            and isinstance(begin, int) and isinstance(end, int)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor '{name}': {info!r}")
    if not 0 <= begin <= end or end > data_size:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file: tensor '{name}' data "
                              f"[{begin}, {end}) runs past the data end ({data_size} bytes)")
    numel = 1
    for d in shape:
        numel *= d
    if dtype in _ITEMSIZE and end - begin != numel * _ITEMSIZE[dtype]:
        raise CheckpointError(f"{file}: corrupt safetensors file: tensor '{name}' {dtype}{list(shape)} "
                              f"needs {numel * _ITEMSIZE[dtype]} bytes, header gives {end - begin}")
    return TensorEntry(name, file, dtype, shape)


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


def _sharded_entries(folder: str, index: str) -> dict[str, TensorEntry]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index ({type(e).__name__}: {e})") from None
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    entries: dict[str, TensorEntry] = {}
    for shard, names in by_shard.items():
        file = os.path.join(folder, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(file):
            raise CheckpointError(f"{index}: shard '{shard}' (holding e.g. tensor '{names[0]}') "
                                  f"is missing from {folder}")
        header = read_safetensors_header(file)
        for name in names:
            if name not in header:
                raise CheckpointError(f"{index}: tensor '{name}' is mapped to '{shard}', which does not hold it")
        for name in sorted(header.keys() - set(names)):
            if name in weight_map:  # listed, but for another shard: a duplicate, named with both shards
                raise CheckpointError(f"{file}: tensor '{name}' is also stored in '{shard}', but "
                                      f"{os.path.basename(index)} maps it to '{weight_map[name]}'; each tensor must "
                                      f"be stored once")
            raise CheckpointError(f"{file}: tensor '{name}' is not listed in {os.path.basename(index)}")
        entries.update({name: header[name] for name in names})
    return entries


# ---- quantization recipes: which format each tensor takes (loader, make-tiny and planner alike) --------

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


def checkpoint_quantization(path: str | os.PathLike) -> str:
    """The scheme a checkpoint folder stores ("none" | "fp8" | "w8a8" | "w4a8"), from its headers and
    description only (no tensor data is read)."""
    return _prepare(os.fspath(path), None, None, None)[3]


# ---- validation ------------------------------------------------------------------------------

def _layer_of(name: str) -> int | None:
    if not name.startswith("model.layers."):
        return None
    part = name.split(".")[2]
    return int(part) if part.isdigit() else None


def _resolve_mtp(cfg: ModelConfig, entries: dict[str, TensorEntry], where: str, include_mtp: bool | None) -> bool:
    n = cfg.num_hidden_layers
    if include_mtp and cfg.num_nextn_predict_layers == 0:
        raise CheckpointError("include_mtp=True but the config has num_nextn_predict_layers=0 (no MTP layer)")
    present = any(_layer_of(k) == n for k in entries)
    if include_mtp is None:  # HF save_pretrained drops layer N entirely: accept that as "no MTP"
        return cfg.num_nextn_predict_layers > 0 and present
    if include_mtp and not present:
        raise CheckpointError(f"{where}: include_mtp=True but the checkpoint has no tensors of MTP layer {n} "
                              f"(checkpoints written by HF save_pretrained drop it)")
    return bool(include_mtp)


def _raise_problems(where: str, problems: list[str]) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(f"checkpoint {where} does not match its config ({len(problems)} problem"
                              f"{'s' if len(problems) > 1 else ''}):\n  "
                              + "\n  ".join(problems[:_MAX_LISTED]) + more)


def validate_entries(cfg: ModelConfig, entries: dict[str, TensorEntry], where: str,
                     include_mtp: bool, desc: dict | None = None) -> dict[str, str]:
    """Raise CheckpointError listing every mismatch between the headers and the config (and, for an
    AscendV1 folder, its description `desc`). Returns the stored format of every expected tensor."""
    expected = expected_tensors(cfg, include_mtp=include_mtp)
    if desc is not None:
        return _validate_ascend(cfg, entries, where, expected, desc)
    block = cfg.fp8_block or DEFAULT_FP8_BLOCK
    problems: list[str] = []
    for name, shape in expected.items():
        if name not in entries:
            problems.append(f"missing tensor '{name}' (expected {list(shape)} in {where})")
            continue
        problems += _check_tensor(entries[name], shape, entries.get(name + SCALE_SUFFIX), block)
    for name, e in entries.items():
        if name in expected:
            continue
        weight = entries.get(name.removesuffix(SCALE_SUFFIX))
        if name.endswith(SCALE_SUFFIX) and weight is not None and weight.name in expected:
            if weight.dtype != FP8_DTYPE:
                problems.append(f"unexpected tensor '{name}' in {e.file}: its weight is not {FP8_DTYPE}")
            continue  # a missing weight is reported above
        problems.append(f"unexpected tensor '{name}' in {e.file}{_unexpected_hint(cfg, name)}")
    _raise_problems(where, problems)
    return {n: "fp8_block" if entries[n].dtype == FP8_DTYPE else "dense" for n in expected}


def _check_tensor(e: TensorEntry, shape: tuple[int, ...], scale: TensorEntry | None,
                  block: tuple[int, int]) -> list[str]:
    problems = []
    if e.shape != tuple(shape):
        problems.append(f"tensor '{e.name}' in {e.file} has shape {list(e.shape)}, expected {list(shape)}")
    if e.dtype == FP8_DTYPE:
        if not is_fp8_weight(e.name):
            problems.append(f"tensor '{e.name}' in {e.file} is {FP8_DTYPE}, but this tensor is never block-FP8")
        elif scale is None:
            problems.append(f"tensor '{e.name}' in {e.file} is {FP8_DTYPE} but has no '{e.name}{SCALE_SUFFIX}'")
        else:
            want = fp8_scale_shape(tuple(shape), block)
            if scale.dtype != "F32":
                problems.append(f"tensor '{scale.name}' in {scale.file} is {scale.dtype}, expected F32")
            if scale.shape != want:
                problems.append(f"tensor '{scale.name}' in {scale.file} has shape {list(scale.shape)}, expected "
                                f"{list(want)} (weight {list(shape)}, block {list(block)})")
    elif e.dtype not in NORMAL_DTYPES:
        problems.append(f"tensor '{e.name}' in {e.file} has dtype {e.dtype}, expected one of "
                        f"{sorted(NORMAL_DTYPES)}" + (f" or {FP8_DTYPE}" if is_fp8_weight(e.name) else ""))
    return problems


def _unexpected_hint(cfg: ModelConfig, name: str) -> str:
    layer = _layer_of(name)
    if layer is None:
        return ""
    if layer > cfg.num_hidden_layers or (layer == cfg.num_hidden_layers and cfg.num_nextn_predict_layers == 0):
        return f" (layer {layer} does not exist: num_hidden_layers={cfg.num_hidden_layers}, " \
               f"num_nextn_predict_layers={cfg.num_nextn_predict_layers})"
    if ".self_attn.indexer." in name and layer < cfg.num_hidden_layers and cfg.indexer_types[layer] == "shared":
        return f" (layer {layer} is 'shared' in indexer_types and has no indexer of its own)"
    return ""


# ---- AscendV1 (msModelSlim) validation ---------------------------------------------------------------

def ascend_part_name(name: str, part: str) -> str:
    """Checkpoint name of Weight part `part` of the quantized linear `name` (`X.weight`)."""
    return name[: -len("weight")] + ASCEND_PARTS[part]


def _ascend_owner(name: str) -> tuple[str, str] | None:
    """(`X.weight`, part) when `name` is an aux tensor name `X.<aux>`; else None."""
    for part, suffix in ASCEND_PARTS.items():
        if part != "data" and name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight", part
    return None


_FLOATS = ("F32", "BF16", "F16")


def _ascend_part_ok(fmt: str, part: str, e: TensorEntry, N: int, K: int) -> tuple[str | None, str | None]:
    """(what is wrong with the shape, with the dtype) of one stored part; None where right."""
    shape, dt = tuple(e.shape), e.dtype
    if part == "data":
        shapes = [(N // 2, K), (N, K)] if fmt == "w4a8_dynamic" else [(N, K)]
        dtypes = ("I8",)
    elif part in ("scales", "offset"):
        shapes, dtypes = [(N,), (N, 1)], _FLOATS
    elif part == "input_scale":
        shapes, dtypes = [(), (1,)], _FLOATS
    elif part == "input_offset":
        shapes, dtypes = [(), (1,)], _FLOATS + ("I8",)
    elif part == "deq_scale":
        shapes, dtypes = [(N,)], ("F32", "I64")
    elif part == "quant_bias":
        shapes, dtypes = [(N,)], ("I32",)
    elif part == "scale_bias":
        ok = len(shape) == 2 and shape[0] == N and shape[1] >= 1 or shape == (N,)
        return (None if ok else f"[{N}] or [{N}, m]"), (None if dt in _FLOATS else "/".join(_FLOATS))
    else:
        raise AssertionError(part)
    return (None if shape in shapes else " or ".join(str(list(s)) for s in shapes),
            None if dt in dtypes else "/".join(dtypes))


def _validate_ascend(cfg: ModelConfig, entries: dict[str, TensorEntry], where: str,
                     expected: dict[str, tuple[int, ...]], desc: dict) -> dict[str, str]:
    problems: list[str] = []
    formats: dict[str, str] = {}
    claimed: set[str] = set()
    known = ", ".join(ASCEND_TYPES)
    for name, shape in expected.items():
        if name not in entries:
            problems.append(f"missing tensor '{name}' (expected {list(shape)} in {where})")
            continue
        t = desc.get(name)
        if t is None:
            problems.append(f"tensor '{name}' has no entry in {ASCEND_DESCRIPTION} (one quantization type per "
                            f"tensor: {known})")
            continue
        if not isinstance(t, str) or t not in ASCEND_TYPES:
            problems.append(f"tensor '{name}': unknown quantization type {t!r} in {ASCEND_DESCRIPTION} "
                            f"(known: {known})")
            continue
        fmt = ASCEND_TYPES[t]
        e = entries[name]
        if fmt == "dense":
            formats[name] = fmt
            problems += _check_tensor(e, shape, None, DEFAULT_FP8_BLOCK)
            continue
        if not quantizable(name):
            problems.append(f"tensor '{name}' is {t} in {ASCEND_DESCRIPTION}, but only linear weights can be "
                            f"quantized (this tensor must be FLOAT)")
            continue
        N, K = shape
        try:
            parts = layout(fmt, shape)
        except ValueError as err:
            problems.append(f"tensor '{name}' ({t}): {err}")
            continue
        formats[name] = fmt
        for part in parts:
            pname = name if part == "data" else ascend_part_name(name, part)
            pe = entries.get(pname)
            if pe is None:
                problems.append(f"missing tensor '{pname}' ({t} weight '{name}' needs it, in {where})")
                continue
            claimed.add(pname)
            bad_shape, bad_dtype = _ascend_part_ok(fmt, part, pe, N, K)
            if bad_shape:
                problems.append(f"tensor '{pname}' in {pe.file} has shape {list(pe.shape)}, expected {bad_shape} "
                                f"({t} weight {list(shape)})")
            if bad_dtype:
                problems.append(f"tensor '{pname}' in {pe.file} has dtype {pe.dtype}, expected {bad_dtype} "
                                f"({t} weight '{name}')")
    for name, e in entries.items():
        if name in expected or name in claimed:
            t = desc.get(name)
            if name in claimed and t is not None and t not in ASCEND_TYPES:
                problems.append(f"tensor '{name}': unknown quantization type {t!r} in {ASCEND_DESCRIPTION} "
                                f"(known: {known})")
            continue
        owner = _ascend_owner(name)
        if owner is not None and owner[0] in expected:
            w, _ = owner
            if formats.get(w) == "dense":
                problems.append(f"unexpected tensor '{name}' in {e.file}: its weight '{w}' is FLOAT in "
                                f"{ASCEND_DESCRIPTION}")
            elif w in formats:
                problems.append(f"unexpected tensor '{name}' in {e.file}: a {ASCEND_NAMES[formats[w]]} weight has "
                                f"no '{ASCEND_PARTS[owner[1]]}'")
            continue   # the weight's own problem is reported above
        problems.append(f"unexpected tensor '{name}' in {e.file}{_unexpected_hint(cfg, name)}")
    _raise_problems(where, problems)
    return formats


# ---- reading ---------------------------------------------------------------------------------

class _Reader:
    """safe_open handles kept open while loading; counts the tensor bytes read."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.files: dict[str, Any] = {}
        self.bytes = 0

    def read(self, e: TensorEntry, where: Any = "all") -> torch.Tensor:
        from safetensors import safe_open
        f = self.files.get(e.file)
        if f is None:
            f = self.files[e.file] = self.stack.enter_context(safe_open(e.file, framework="pt", device="cpu"))
        t, n = _read_slice(f, e, where)
        self.bytes += n
        return t

    def close(self) -> None:
        self.stack.close()


def _read_slice(f: Any, e: TensorEntry, where) -> tuple[torch.Tensor, int]:
    """The tensor, or its (dim, start, stop) slice, read through `get_slice`; and the bytes read."""
    if where == "all":
        t = f.get_tensor(e.name)
    else:
        dim, a, b = where
        sl = f.get_slice(e.name)
        t = sl[a:b] if dim == 0 else sl[:, a:b]
    return t, t.numel() * t.element_size()


def _scale_slice(where, block: tuple[int, int], name: str):
    """The scale grid's slice for a weight slice: whole blocks on the same dim."""
    if where == "all":
        return "all"
    dim, a, b = where
    bs = block[dim]
    if a % bs:
        raise CheckpointError(f"{name}: the rank's slice starts at {a}, inside a {bs}-wide FP8 block")
    return dim, a // bs, -(-b // bs)


def _part_where(fmt: str, part: str, where, block: tuple[int, int], name: str, packed: bool):
    """The slice of one stored part of a quantized weight for the weight's logical slice `where`."""
    if where == "all":
        return "all"
    dim, a, b = where
    if fmt == "fp8_block":
        return where if part == "data" else _scale_slice(where, block, name)
    if part == "data":
        if dim == 0 and packed:
            if a % 2 or b % 2:
                raise CheckpointError(f"{name}: the rank's rows [{a}, {b}) split a byte of two int4 rows")
            return 0, a // 2, b // 2
        return where
    if part in ("input_scale", "input_offset") or dim == 1:
        return "all"                  # per-tensor, or per output row while the inputs are split
    return 0, a, b


def _part_tensor(fmt: str, part: str, t: torch.Tensor, e: TensorEntry) -> torch.Tensor:
    """A stored part in the dtype and shape `quant.layout` gives it (f32 scales `[N]`, ...)."""
    if part == "data":
        return t
    if part == "quant_bias":
        return t.to(torch.int32)
    if part == "deq_scale" and t.dtype == torch.int64:
        # fp16 models store the f32 bit pattern of each scale in an int64 (vllm-ascend, msModelSlim)
        if bool(((t < 0) | (t > 0xFFFFFFFF)).any()):
            raise CheckpointError(f"{e.file}: tensor '{e.name}' is int64 but not the bit pattern of float32 "
                                  f"scales (values outside [0, 2**32))")
        return torch.where(t >= 2 ** 31, t - 2 ** 32, t).to(torch.int32).view(torch.float32)
    if part == "scale_bias" and t.dim() == 2:
        return t.float().sum(dim=-1)
    if part in ("input_scale", "input_offset"):
        return t.float().reshape(())
    return t.float().reshape(-1)        # [N, 1] -> [N]


def _refuse_non_finite(t: torch.Tensor, e: TensorEntry, how: str) -> None:
    if not (t.is_floating_point()):
        return
    bad = ~torch.isfinite(t.float() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0].tolist()]
        raise CheckpointError(f"{e.file}: tensor '{e.name}' holds {int(bad.sum())} NaN/inf value(s){how} "
                              f"(first at index {first}); a checkpoint with non-finite weights is refused")


def _refuse_impossible(fmt: str, part: str, t: torch.Tensor, e: TensorEntry, K: int) -> None:
    """A scale, offset or `deq_scale` no quantizer writes (quant.part_problem: the range and its reason)
    is refused naming the file and tensor: loaded, it would change the logits without a word."""
    why = part_problem(fmt, part, t, K)
    if why:
        raise CheckpointError(f"{e.file}: tensor '{e.name}' ({ASCEND_NAMES.get(fmt, fmt)} {part}): {why}")


def _read_weight(reader: _Reader, name: str, fmt: str, entries: dict[str, TensorEntry], where,
                 block: tuple[int, int]) -> Weight:
    """A stored quantized weight (or this rank's slice of it) as a `Weight`, on the CPU."""
    if fmt == "fp8_block":
        e, se = entries[name], entries[name + SCALE_SUFFIX]
        data = reader.read(e, where)
        scale = reader.read(se, _scale_slice(where, block, name))
        _refuse_non_finite(scale, se, "")
        _refuse_non_finite(data, e, "")
        _refuse_impossible(fmt, "scales", scale.float(), se, e.shape[1])
        return Weight(data, scale.float(), fmt, block)
    e = entries[name]
    packed = fmt == "w4a8_dynamic" and e.shape[0] * 2 == expected_rows(e, entries, name)
    parts: dict[str, torch.Tensor] = {}
    for part in layout(fmt, (1, 1) if fmt != "w4a8_dynamic" else (2, 1)):
        pe = e if part == "data" else entries[ascend_part_name(name, part)]
        t = reader.read(pe, _part_where(fmt, part, where, block, name, packed))
        t = _part_tensor(fmt, part, t, pe)
        _refuse_non_finite(t, pe, "")
        if part != "data":
            _refuse_impossible(fmt, part, t, pe, e.shape[1])
        parts[part] = t
    data = parts.pop("data")
    if fmt == "w4a8_dynamic" and not packed:     # unpacked int4 codes in int8: pack them (quant.py's layout)
        if data.numel() and (int(data.min()) < INT4_MIN or int(data.max()) > INT4_MAX):
            raise CheckpointError(f"{e.file}: tensor '{name}' is W4A8_DYNAMIC with unpacked int8 codes outside "
                                  f"the int4 range [{INT4_MIN}, {INT4_MAX}]")
        data = pack_int4_rows(data)
    if fmt == "w8a8_static" and where != "all" and where[0] == 1 and where[1] > 0:
        # row-parallel: the ranks' partial products are summed, so only the first adds the bias
        parts["quant_bias"] = torch.zeros_like(parts["quant_bias"])
    scales = parts.pop("scales")
    return Weight(data, scales, fmt, aux=parts)


def expected_rows(e: TensorEntry, entries: dict[str, TensorEntry], name: str) -> int:
    """N of a quantized AscendV1 weight: the length of its per-channel `weight_scale`."""
    return entries[ascend_part_name(name, "scales")].shape[0]


def slice_weight(w: Weight, where, block_check: str = "") -> Weight:
    """A rank's (dim, start, stop) slice of an in-memory `Weight` in logical coordinates (the same
    rules as reading one from a checkpoint: FP8 scales in whole blocks, int4 rows in whole bytes,
    per-channel scales whole when the inputs are split, a static bias on the first rank only)."""
    if where == "all":
        return w
    dim, a, b = where
    if w.format == "dense":
        return Weight(w.data.narrow(dim, a, b - a))

    def cut(t: torch.Tensor, s):
        if s == "all":
            return t
        d, x, y = s
        return t.narrow(d, x, y - x)

    name = block_check or "weight"
    data = cut(w.data, _part_where(w.format, "data", where, w.block, name, w.format == "w4a8_dynamic"))
    scales = cut(w.scales, _part_where(w.format, "scales", where, w.block, name, False))
    aux = {k: cut(v, _part_where(w.format, k, where, w.block, name, False)) for k, v in w.aux.items()}
    if w.format == "w8a8_static" and dim == 1 and a > 0:
        aux["quant_bias"] = torch.zeros_like(aux["quant_bias"])
    return Weight(data, scales, w.format, w.block, aux=aux, recipe=w.recipe)


def local_part(layout_, name: str, v: "torch.Tensor | Weight"):
    """This rank's part of a tensor or `Weight` already in memory (None: another rank's expert)."""
    shape = tuple(v.shape)
    s = layout_.slice_of(name, shape)
    if s is None:
        return None
    if isinstance(v, Weight):
        return slice_weight(v, s, name)
    return layout_.local(name, v)


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


# ---- materialising ---------------------------------------------------------------------------

def _float_out(raw: torch.Tensor, e: TensorEntry, target: torch.dtype, device) -> torch.Tensor:
    """A float tensor on `device` in `target`; NaN/inf (stored, or by overflowing `target`) refused."""
    out = raw.to(device).to(target)
    if not bool(torch.isfinite(out).all()):
        _refuse_non_finite(raw, e, "")
        _refuse_non_finite(out, e, f" after conversion to {str(target).removeprefix('torch.')} "
                                   f"(a value overflows it; load in a wider dtype)")
    return out


def _check_cut(name: str, where, n: int, block: int, what: str) -> None:
    """An online-quantized slice must cut whole blocks, so every rank quantizes as one process does."""
    if where == "all":
        return
    _, a, b = where
    if a % block or (b % block and b != n):
        raise CheckpointError(f"{name}: the rank's slice [{a}, {b}) cuts a {block}-wide {what} block; quantizing it "
                              f"online would differ from one process (use another layout)")


def _load_one(reader: _Reader, name: str, shape: tuple[int, ...], stored: str, want: str,
              entries: dict[str, TensorEntry], where, block: tuple[int, int], dtype: torch.dtype, device):
    """One expected tensor, as `want` says: a plain tensor for "dense", else a `Weight` on `device`."""
    target = torch.float32 if float32_tensor(name) else dtype
    if stored == "dense":
        e = entries[name]
        if want == "dense":
            return _float_out(reader.read(e, where), e, target, device)
        # online quantization of a float weight (from the stored values, not after a cast to `dtype`)
        if want == "fp8_block" and where != "all":
            _check_cut(name, where, shape[where[0]], DEFAULT_FP8_BLOCK[where[0]], "FP8")
        whole_then_cut = where != "all" and (where[0] == 1 and want != "fp8_block")   # per-row scales need all K
        t = reader.read(e, "all" if whole_then_cut else where)
        _refuse_non_finite(t, e, "")
        w = quantize_weight(t.float(), want, block=DEFAULT_FP8_BLOCK)
        if whole_then_cut:
            w = slice_weight(w, where, name)
        return w.to(device)
    w = _read_weight(reader, name, stored, entries, where, block)
    if want == stored:
        return w.to(device)
    e = entries[name]
    return _float_out(w.to(device).dense(torch.float32), e, target, device)     # "none": dequantized


def _wanted(name: str, stored: str, scheme: str, quantization: str | None) -> str:
    if quantization is None or (quantization != "none" and scheme == quantization):
        return stored
    if quantization == "none":
        return "dense"
    return recipe_format(name, quantization, static_attention=False)   # a float checkpoint, quantized online


def _check_expert_count(cfg: ModelConfig, entries: dict[str, TensorEntry], where: str) -> None:
    """A config whose routed experts need more tensors than the checkpoint holds in all is refused before
    the expected inventory is built (n_routed_experts = 1e8 would need a dict of 1e8 x 3 x layers names)."""
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    need = 3 * cfg.n_routed_experts * moe_layers
    if need > len(entries):
        raise CheckpointError(f"checkpoint {where} does not match its config: n_routed_experts = "
                              f"{cfg.n_routed_experts} in {moe_layers} MoE layer(s) needs {need:,} expert tensors "
                              f"(gate, up, down each), but the checkpoint holds {len(entries):,} tensors in all")


def _prepare(folder: str, cfg: ModelConfig | None, include_mtp: bool | None, quantization: Any):
    check_quantization(quantization)
    if cfg is None:
        cfg = load_config(folder)
    entries, where = _weight_files(folder)
    _check_expert_count(cfg, entries, where)
    use_mtp = _resolve_mtp(cfg, entries, where, include_mtp)
    if not use_mtp and cfg.num_nextn_predict_layers:
        mtp = cfg.num_hidden_layers  # skip the MTP layer's tensors if present (include_mtp=False)
        entries = {k: v for k, v in entries.items() if _layer_of(k) != mtp}
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    formats = validate_entries(cfg, entries, where, include_mtp=use_mtp, desc=_description(folder))
    scheme = scheme_of(formats)
    why = quantization_problem(scheme, quantization, f"checkpoint {folder}")
    if why:
        raise CheckpointError(why)
    return cfg, entries, formats, scheme, use_mtp


def _materialise(cfg: ModelConfig, entries: dict[str, TensorEntry], formats: dict[str, str], scheme: str,
                 use_mtp: bool, quantization: str | None, dtype: torch.dtype, device, progress: bool, layout_=None,
                 stats: dict | None = None) -> dict[str, Any]:
    from safetensors import SafetensorError
    from tqdm import tqdm

    block = cfg.fp8_block or DEFAULT_FP8_BLOCK
    shapes = expected_tensors(cfg, include_mtp=use_mtp)
    names = list(formats)
    plan = {n: (layout_.slice_of(n, shapes[n]) if layout_ is not None else "all") for n in names}
    todo = sorted((n for n in names if plan[n] is not None), key=lambda n: entries[n].file)  # file by file
    reader = _Reader()
    out: dict[str, Any] = {}
    desc = f"Loading rank {layout_.rank}" if layout_ is not None else "Loading checkpoint"
    bar = tqdm(total=len(todo), desc=desc, unit="tensor", file=sys.stderr, disable=None if progress else True,
               leave=False)
    name = ""
    try:
        for name in todo:
            want = _wanted(name, formats[name], scheme, quantization)
            out[name] = _load_one(reader, name, shapes[name], formats[name], want, entries, plan[name], block,
                                  dtype, device)
            bar.update(1)
    except (OSError, SafetensorError) as e:  # a file changed or broke after validation
        file = entries[name].file if name in entries else "?"
        raise CheckpointError(f"{file}: failed to read tensor data ({type(e).__name__}: {e})") from e
    finally:
        bar.close()
        reader.close()
    if stats is not None:
        held: dict[str, int] = {}
        for v in out.values():
            f = v.format if isinstance(v, Weight) else "dense"
            held[f] = held.get(f, 0) + 1
        stats.update(bytes_read=reader.bytes, bytes_total=sum(_entry_bytes(e) for e in entries.values()),
                     stored=scheme, quantization=scheme if quantization is None else quantization, formats=held)
    return out


def load_checkpoint(path: str | os.PathLike, cfg: ModelConfig | None = None, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", include_mtp: bool | None = None,
                    progress: bool = True, quantization: str | None = None,
                    stats: dict | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Validate, then load every tensor of the checkpoint folder `path`.

    Returns `(cfg, tensors)`: quantized linears as `Weight`s in their stored format (or as
    `quantization` says: the module docstring's table), every other tensor in `dtype` except the
    float32 ones (`float32_tensor`); no `_scale_inv` / aux entries. `include_mtp`: None loads the MTP
    layer when the config has one and the checkpoint holds it (HF-saved checkpoints drop it), True
    requires it, False skips it. When the MTP layer is not loaded the returned config has
    `num_nextn_predict_layers=0`, so it always describes exactly the returned tensors. `stats` (a
    dict) receives `bytes_read`, `bytes_total`, `stored` (the checkpoint's scheme), `quantization`
    (what was loaded) and `formats` (tensor count per format).
    """
    folder = os.fspath(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load_checkpoint: dtype must be a floating torch dtype, got {dtype!r}")
    cfg, entries, formats, scheme, use_mtp = _prepare(folder, cfg, include_mtp, quantization)
    return cfg, _materialise(cfg, entries, formats, scheme, use_mtp, quantization, dtype, device, progress,
                             stats=stats)


# ---- rank-sharded loading (parallel.RankLayout) -------------------------------------------------------
def load_checkpoint_shard(path: str | os.PathLike, layout, cfg: ModelConfig | None = None, *,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          include_mtp: bool | None = None, progress: bool = True,
                          stats: dict | None = None, quantization: str | None = None
                          ) -> tuple[ModelConfig, dict[str, Any]]:
    """`load_checkpoint` for one rank of a parallel layout: validate the whole checkpoint (headers
    only), then read only this rank's slices with `safe_open(...).get_slice` (`layout.slice_of`,
    from THE sharding table). A quantized weight's parts follow its slice: block-FP8
    `weight_scale_inv` on the same dim in whole blocks; per-channel scales, offsets, `deq_scale`,
    `quant_bias` with the output rows (whole when the inputs are split; then only the first rank
    keeps the static `quant_bias`, the partial products being summed); int4 rows in whole bytes.
    Routed experts of other ranks are never read. `stats` (a dict) receives `bytes_read` (tensor
    data bytes this rank read) and `bytes_total`, and what `load_checkpoint` gives it.
    """
    folder = os.fspath(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load_checkpoint_shard: dtype must be a floating torch dtype, got {dtype!r}")
    cfg, entries, formats, scheme, use_mtp = _prepare(folder, cfg, include_mtp, quantization)
    return cfg, _materialise(cfg, entries, formats, scheme, use_mtp, quantization, dtype, device, progress, layout,
                             stats=stats)


def _entry_bytes(e: TensorEntry) -> int:
    n = 1
    for d in e.shape:
        n *= d
    return n * _ITEMSIZE.get(e.dtype, 4)
