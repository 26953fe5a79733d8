"""Materialising a validated checkpoint: tensors read through `safetensors.safe_open` (mmap; a rank
reads only its slices with `get_slice`), NaN/inf and impossible scales refused naming file and
tensor, quantized weights kept as stored `Weight`s, dequantized or quantized online as
`quantization=` says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any

import torch

from ..config import ModelConfig
from ..quant import INT4_MAX, INT4_MIN, layout, pack_int4_rows, part_problem
from ..weights import Weight, expected_tensors, float32_tensor, quantize_weight
from .ascend import ASCEND_NAMES, _description, ascend_part_name
from .headers import CheckpointError, TensorEntry, _entry_bytes
from .layout import SCALE_SUFFIX, _weight_files, load_config
from .schemes import DEFAULT_FP8_BLOCK, _wanted, check_quantization, quantization_problem, scheme_of
from .slicing import _check_cut, _part_where, _scale_slice, slice_weight
from .validation import _check_expert_count, _layer_of, _resolve_mtp, validate_entries

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


def _float_out(raw: torch.Tensor, e: TensorEntry, target: torch.dtype, device) -> torch.Tensor:
    """A float tensor on `device` in `target`; NaN/inf (stored, or by overflowing `target`) refused."""
    out = raw.to(device).to(target)
    if not bool(torch.isfinite(out).all()):
        _refuse_non_finite(raw, e, "")
        _refuse_non_finite(out, e, f" after conversion to {str(target).removeprefix('torch.')} "
                                   f"(a value overflows it; load in a wider dtype)")
    return out


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


def checkpoint_quantization(path: str | os.PathLike) -> str:
    """The scheme a checkpoint folder stores ("none" | "fp8" | "w8a8" | "w4a8"), from its headers and
    description only (no tensor data is read)."""
    return _prepare(os.fspath(path), None, None, None)[3]
