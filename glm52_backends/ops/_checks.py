"""What the ops' output checks share (each op's own check is `check_output` in ops/<op>.py).

An output check is `check_output(args, kwargs, out) -> what is wrong, or None`: metadata only (tuple
arity, shape, dtype, device; no device sync), so the registry runs it on every native call. The
expected shapes and dtypes are the op's contract (its module docstring).
"""

from __future__ import annotations

from typing import Any

import torch


def arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """The call's argument at position `i`, or passed by keyword as `name`."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def tensor(what: str, t: Any, shape: tuple | None, dtypes: tuple, device) -> str | None:
    if not isinstance(t, torch.Tensor):
        return f"{what} is a {type(t).__name__}, expected a tensor"
    if shape is not None and tuple(t.shape) != tuple(shape):
        return f"{what} has shape {list(t.shape)}, expected {list(shape)}"
    if dtypes and t.dtype not in dtypes:
        return f"{what} has dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}"
    if device is not None and t.device != device:
        return f"{what} is on {t.device}, expected {device} (where its inputs are)"
    return None


def pair(out: Any, names: str) -> str | None:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return f"returned a {type(out).__name__}, expected the pair ({names})"
    return None


def shape_of(w: Any) -> tuple:
    return tuple(w.shape)  # a tensor or a weights.Weight


def same_as_input(args: tuple, kwargs: dict, out: Any) -> str | None:
    """The output has x's shape, dtype and device (rms_norm, layer_norm, rope, moe_experts)."""
    x = arg(args, kwargs, 0, "x")
    return tensor("the output", out, x.shape, (x.dtype,), x.device)
