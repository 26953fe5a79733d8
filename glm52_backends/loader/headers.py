"""safetensors headers: each file's tensor table, parsed and checked against the file's size before
a single tensor is read, and the tensors of a sharded set through its `*.index.json`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1,
             "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match what its config describes."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its safetensors header describes it."""
    name: str
    file: str  # absolute path of the .safetensors file holding it
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]


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


def _entry_bytes(e: TensorEntry) -> int:
    n = 1
    for d in e.shape:
        n *= d
    return n * _ITEMSIZE.get(e.dtype, 4)
