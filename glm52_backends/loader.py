"""Load a GLM-5.x checkpoint folder: `config.json` + safetensors (single file or sharded), BF16 or
block-FP8 (spec §2, §10).

Everything is validated from the safetensors headers before a single tensor is read, so a bad
checkpoint fails fast, names the culprit tensor and file, and leaves no partial state behind.
Only safetensors is read (never pickle); tensors come through `safetensors.safe_open` (mmap).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, ModelConfig
from .weights import expected_tensors, float32_tensor, fp8_scale_shape, is_fp8_weight

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # `<name>.weight` -> `<name>.weight_scale_inv`
DEFAULT_FP8_BLOCK = (128, 128)

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
    try:
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


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The folder's `tokenizer.json` as a `Tokenizer`, or None when there is none."""
    file = os.path.join(os.fspath(path), "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        from tokenizers import Tokenizer as _HFTokenizer  # lazy: optional dependency
    except ImportError as e:
        raise ImportError(f"{file} needs the 'tokenizers' package: pip install 'glm52_backends[tokenizer]'") from e
    try:
        return Tokenizer(_HFTokenizer.from_file(file))
    except Exception as e:  # tokenizers raises its own Exception type on malformed files
        raise ValueError(f"{file}: cannot read tokenizer ({e})") from None


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
    single = os.path.join(folder, SINGLE_FILE)
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):  # HF prefers the single file too
        return read_safetensors_header(single), single
    if os.path.isfile(index):
        return _sharded_entries(folder, index), index
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
                          f"are supported)")


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
                raise CheckpointError(f"{file}: tensor '{name}' is also stored in '{shard}', but {INDEX_FILE} maps "
                                      f"it to '{weight_map[name]}'; each tensor must be stored once")
            raise CheckpointError(f"{file}: tensor '{name}' is not listed in {INDEX_FILE}")
        entries.update({name: header[name] for name in names})
    return entries


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


def validate_entries(cfg: ModelConfig, entries: dict[str, TensorEntry], where: str,
                     include_mtp: bool) -> None:
    """Raise CheckpointError listing every mismatch between the headers and the config."""
    expected = expected_tensors(cfg, include_mtp=include_mtp)
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
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(f"checkpoint {where} does not match its config ({len(problems)} problem"
                              f"{'s' if len(problems) > 1 else ''}):\n  "
                              + "\n  ".join(problems[:_MAX_LISTED]) + more)


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


# ---- materialising ---------------------------------------------------------------------------

def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-FP8 -> float32: `W[i, j] = W_fp8[i, j] * scale_inv[i // b0, j // b1]` (partial last blocks)."""
    rows, cols = w.shape  # w: [out, in]; scale_inv: [ceil(out/b0), ceil(in/b1)]
    s = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]
    s = s.repeat_interleave(block[1], dim=1)[:, :cols]  # [out, in]
    return w.float() * s


def _materialise(cfg: ModelConfig, entries: dict[str, TensorEntry], names: list[str], dtype: torch.dtype,
                 device: str | torch.device, progress: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from tqdm import tqdm

    block = cfg.fp8_block or DEFAULT_FP8_BLOCK
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(entries[name].file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(names), desc="Loading checkpoint", unit="tensor", file=sys.stderr,
               disable=None if progress else True, leave=False)
    try:
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in file_names:
                    out[name] = _convert(f, name, entries, block, dtype, device)
                    bar.update(1)
    except (OSError, SafetensorError) as e:  # a file changed or broke after validation
        raise CheckpointError(f"{file}: failed to read tensor data ({type(e).__name__}: {e})") from e
    finally:
        bar.close()
    return out


def _convert(f: Any, name: str, entries: dict[str, TensorEntry], block: tuple[int, int],
             dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """One tensor in its compute dtype; NaN/inf (stored, from a scale, or by overflowing `dtype`) is
    refused naming the tensor: a non-finite weight gives wrong tokens, never an error, later on."""
    t = f.get_tensor(name).to(device)  # compact dtype crosses to the device; convert there
    target = torch.float32 if float32_tensor(name) else dtype
    raw = t
    if entries[name].dtype == FP8_DTYPE:
        scale = f.get_tensor(name + SCALE_SUFFIX) if entries[name + SCALE_SUFFIX].file == entries[name].file \
            else _read_one(entries[name + SCALE_SUFFIX])
        _refuse_non_finite(scale, entries[name + SCALE_SUFFIX], "")
        raw = t = dequantize_fp8(t, scale.to(device), block)
    out = t.to(target)
    if not bool(torch.isfinite(out).all()):
        _refuse_non_finite(raw, entries[name], "")
        _refuse_non_finite(out, entries[name], f" after conversion to {str(target).removeprefix('torch.')} "
                                               f"(a value overflows it; load in a wider dtype)")
    return out


def _refuse_non_finite(t: torch.Tensor, e: TensorEntry, how: str) -> None:
    bad = ~torch.isfinite(t.float() if t.dtype == torch.float8_e4m3fn else t)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0].tolist()]
        raise CheckpointError(f"{e.file}: tensor '{e.name}' holds {int(bad.sum())} NaN/inf value(s){how} "
                              f"(first at index {first}); a checkpoint with non-finite weights is refused")


def _read_one(e: TensorEntry) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(e.file, framework="pt", device="cpu") as f:
        return f.get_tensor(e.name)


def load_checkpoint(path: str | os.PathLike, cfg: ModelConfig | None = None, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", include_mtp: bool | None = None,
                    progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Validate, then load every tensor of the checkpoint folder `path`.

    Returns `(cfg, tensors)`: FP8 weights dequantised (no `_scale_inv` entries), every tensor in
    `dtype` except the float32 ones (`float32_tensor`). `include_mtp`: None loads the MTP layer when
    the config has one and the checkpoint holds it (HF-saved checkpoints drop it), True requires it,
    False skips it. When the MTP layer is not loaded the returned config has
    `num_nextn_predict_layers=0`, so it always describes exactly the returned tensors.
    """
    folder = os.fspath(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load_checkpoint: dtype must be a floating torch dtype, got {dtype!r}")
    if cfg is None:
        cfg = load_config(folder)
    entries, where = _weight_files(folder)
    use_mtp = _resolve_mtp(cfg, entries, where, include_mtp)
    if not use_mtp and cfg.num_nextn_predict_layers:
        mtp = cfg.num_hidden_layers  # skip the MTP layer's tensors if present (include_mtp=False)
        entries = {k: v for k, v in entries.items() if _layer_of(k) != mtp}
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    validate_entries(cfg, entries, where, include_mtp=use_mtp)
    names = [k for k in entries if not k.endswith(SCALE_SUFFIX)]
    return cfg, _materialise(cfg, entries, names, dtype, device, progress)


# ---- rank-sharded loading (parallel.RankLayout) -------------------------------------------------------
def load_checkpoint_shard(path: str | os.PathLike, layout, cfg: ModelConfig | None = None, *,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          include_mtp: bool | None = None, progress: bool = True,
                          stats: dict | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """`load_checkpoint` for one rank of a parallel layout: validate the whole checkpoint (headers
    only), then read only this rank's slices with `safe_open(...).get_slice` (`layout.slice_of`,
    from THE sharding table); a block-FP8 weight's `weight_scale_inv` is sliced on the same dim in
    whole blocks and the slice dequantised; routed experts of other ranks are never read.
    `stats` (a dict) receives `bytes_read` (tensor data bytes this rank read) and `bytes_total`.
    """
    from safetensors import SafetensorError, safe_open
    from tqdm import tqdm

    folder = os.fspath(path)
    if cfg is None:
        cfg = load_config(folder)
    entries, where = _weight_files(folder)
    use_mtp = _resolve_mtp(cfg, entries, where, include_mtp)
    if not use_mtp and cfg.num_nextn_predict_layers:
        mtp = cfg.num_hidden_layers
        entries = {k: v for k, v in entries.items() if _layer_of(k) != mtp}
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    validate_entries(cfg, entries, where, include_mtp=use_mtp)
    block = cfg.fp8_block or DEFAULT_FP8_BLOCK
    names = [k for k in entries if not k.endswith(SCALE_SUFFIX)]
    plan = {n: layout.slice_of(n, tuple(entries[n].shape)) for n in names}
    todo = [n for n in names if plan[n] is not None]
    by_file: dict[str, list[str]] = {}
    for n in todo:
        by_file.setdefault(entries[n].file, []).append(n)
    read = 0
    total = sum(_entry_bytes(e) for e in entries.values())
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(todo), desc=f"Loading rank {layout.rank}", unit="tensor", file=sys.stderr,
               disable=None if progress else True, leave=False)
    try:
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for n in file_names:
                    t, nbytes = _read_slice(f, entries[n], plan[n])
                    read += nbytes
                    if entries[n].dtype == FP8_DTYPE:
                        se = entries[n + SCALE_SUFFIX]
                        s_slice = _scale_slice(plan[n], block, n)
                        if se.file == file:
                            s, sb = _read_slice(f, se, s_slice)
                        else:
                            with safe_open(se.file, framework="pt", device="cpu") as g:
                                s, sb = _read_slice(g, se, s_slice)
                        read += sb
                        _refuse_non_finite(s, se, "")
                        t = dequantize_fp8(t.to(device), s.to(device), block)
                    target = torch.float32 if float32_tensor(n) else dtype
                    out[n] = t.to(device=device, dtype=target)
                    if not bool(torch.isfinite(out[n]).all()):       # the same rule as load_checkpoint
                        _refuse_non_finite(t, entries[n], "")
                        _refuse_non_finite(out[n], entries[n], f" after conversion to "
                                                               f"{str(target).removeprefix('torch.')} (a value "
                                                               f"overflows it; load in a wider dtype)")
                    bar.update(1)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: failed to read tensor data ({type(e).__name__}: {e})") from e
    finally:
        bar.close()
    if stats is not None:
        stats.update(bytes_read=read, bytes_total=total)
    return cfg, out


def _entry_bytes(e: TensorEntry) -> int:
    n = 1
    for d in e.shape:
        n *= d
    return n * _ITEMSIZE.get(e.dtype, 4)


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
