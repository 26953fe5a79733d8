"""Resolve a torch device string for any vendor's PyTorch adapter, or say what is missing.

Out-of-tree device types ("npu", "mlu", "musa", "supa", "hpu") exist only after their adapter
package has been imported (it renames torch's PrivateUse1 backend); CUDA-compatible stacks
(Kunlunxin xpytorch, Hygon DTK, MetaX MACA, T-Head PPU) use "cuda". Sources: spec/ascend-and-chips.md §4.1.
"""

from __future__ import annotations

import importlib

import torch

from glm52_backends.registry import BackendUnavailable

# device type -> (adapter module imported before torch.device(type) works, how to get it)
ADAPTERS: dict[str, tuple[str, str]] = {
    "npu": ("torch_npu", "Huawei's torch_npu matching your torch version, on a host with the CANN runtime"),
    "mlu": ("torch_mlu", "Cambricon's torch_mlu wheel (CNToolkit, CNNL, CNCL)"),
    "musa": ("torch_musa", "Moore Threads' torch_musa wheel (MUSA SDK)"),
    "supa": ("torch_br", "Biren's torch_br wheel (SUPA SDK)"),
    "hpu": ("habana_frameworks.torch", "the Intel Gaudi software stack"),
}


def default_device() -> torch.device:
    """The current accelerator when torch sees one (cuda, xpu, mps, or an adapter's), else the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return torch.device(acc.current_accelerator().type, acc.current_device_index())
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable `torch.device`, importing the vendor adapter if the type needs one.

    Raises `BackendUnavailable` naming the missing adapter or the absent device.
    """
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        kind = device.type
    elif isinstance(device, str) and device:
        kind = device.split(":", 1)[0]
    else:
        raise BackendUnavailable(f"torch backend: device must be a torch device or a string like 'mlu:0', "
                                 f"got {device!r}")
    if kind in ADAPTERS:
        module, how = ADAPTERS[kind]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise BackendUnavailable(f"device {kind!r} needs the {module} package ({how}); importing it "
                                     f"failed: {e}") from e
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise BackendUnavailable(f"torch does not know the device {device!r} ({e})") from e
    if dev.type in ("cpu", "meta"):
        return dev
    mod = getattr(torch, dev.type, None)
    available = getattr(mod, "is_available", None)
    if available is None or not available():
        raise BackendUnavailable(f"no {dev.type!r} device is available here "
                                 f"(torch.{dev.type}.is_available() is not true)")
    count = getattr(mod, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise BackendUnavailable(f"device {str(dev)!r} does not exist: {count} {dev.type} device(s) visible")
    return dev
