"""Headers against the config: every tensor the config implies present with its shape and dtype,
nothing unexpected, an AscendV1 weight's parts as its format lays them out; every problem listed
in one `CheckpointError` before any tensor data is read.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..quant import layout
from ..weights import expected_tensors, fp8_scale_shape, is_fp8_weight
from .ascend import ASCEND_DESCRIPTION, ASCEND_NAMES, ASCEND_PARTS, ASCEND_TYPES, _ascend_owner, ascend_part_name
from .headers import CheckpointError, TensorEntry
from .layout import SCALE_SUFFIX
from .schemes import DEFAULT_FP8_BLOCK, quantizable

NORMAL_DTYPES = {"BF16", "F16", "F32"}
FP8_DTYPE = "F8_E4M3"
_MAX_LISTED = 10  # problems spelled out in one error message


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


def _check_expert_count(cfg: ModelConfig, entries: dict[str, TensorEntry], where: str) -> None:
    """A config whose routed experts need more tensors than the checkpoint holds in all is refused before
    the expected inventory is built (n_routed_experts = 1e8 would need a dict of 1e8 x 3 x layers names)."""
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    need = 3 * cfg.n_routed_experts * moe_layers
    if need > len(entries):
        raise CheckpointError(f"checkpoint {where} does not match its config: n_routed_experts = "
                              f"{cfg.n_routed_experts} in {moe_layers} MoE layer(s) needs {need:,} expert tensors "
                              f"(gate, up, down each), but the checkpoint holds {len(entries):,} tensors in all")


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
