"""ascend: GLM-5.2's hot ops on Huawei Ascend NPUs through torch_npu's fused ops.

`create()` builds the backend:
  - `GLM52_ASCEND_EMULATE=1` (or `create(emulate=True)`): the ops run on the CPU through
    `emulator.NpuEmulator`, a CPU implementation of the torch_npu functions written from their
    documentation; the backend is then named "ascend (emulated)". Nothing imports torch_npu.
  - otherwise torch_npu is imported here, lazily (never by `import glm52_backends`), and an NPU
    must be visible; the backend is named "ascend".
  - neither: `BackendUnavailable` saying what is missing and how to install it.

The CANN version decides which documented limits apply (versions.py): torch_npu's
`torch.version.cann`, or GLM52_ASCEND_CANN where that is unset; the emulator emulates the line of
`create(emulate=True, cann=...)`, else GLM52_ASCEND_CANN, else versions.EMULATED_CANN. An op the
installed line cannot run (e.g. GLM-5.2's 32-head indexer on CANN 8.5.0) falls back to the
reference with a warning naming the version.

torch_npu registers itself as a torch device backend, so once it is installed a plain
`import torch` tries to load it (and fails without CANN); `TORCH_DEVICE_BACKEND_AUTOLOAD=0`
turns that off, and this module then imports torch_npu itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from glm52_backends.registry import BackendUnavailable

ENV_EMULATE = "GLM52_ASCEND_EMULATE"
# torch_npu 7.3.0 line (CANN 8.5.0) is the first with npu_lightning_indexer / npu_sparse_flash_attention
MIN_CANN = "8.5.0"
EMULATED_NAME = "ascend (emulated)"


def emulation_requested() -> bool:
    return os.environ.get(ENV_EMULATE, "").strip().lower() not in ("", "0", "false", "no", "off")


def _torch_version() -> str:
    import torch
    return torch.__version__.split("+")[0]


def _install_hint() -> str:
    v = _torch_version()
    return (f"install torch-npu built for this torch ({v}): `pip install torch-npu=={v}` (or the "
            f"`glm52_backends[ascend]` extra) on a machine with Huawei's Ascend driver and CANN >= {MIN_CANN} "
            f"(the CANN release your torch-npu version's notes name), then `source "
            f"/usr/local/Ascend/ascend-toolkit/set_env.sh`. To run these ops without an NPU, through the "
            f"CPU emulator of the torch_npu ops, set {ENV_EMULATE}=1.")


def _import_torch_npu():
    """torch_npu, imported now; BackendUnavailable with the cause and the fix otherwise."""
    if "torch_npu" in sys.modules:  # already loaded (torch's device-backend autoload, or the user)
        return sys.modules["torch_npu"]
    if importlib.util.find_spec("torch_npu") is None:
        raise BackendUnavailable(f"backend 'ascend' needs torch_npu, which is not installed: {_install_hint()}")
    try:
        return importlib.import_module("torch_npu")
    except Exception as e:  # noqa: BLE001 - missing CANN libraries raise ImportError/OSError/RuntimeError
        raise BackendUnavailable(
            f"backend 'ascend': torch_npu is installed but cannot be imported ({type(e).__name__}: {e}). "
            f"It needs the CANN runtime (libascendcl.so, libhccl.so): source set_env.sh of the CANN "
            f"installation; if `import torch` itself fails with 'Failed to load the backend extension: "
            f"torch_npu', export TORCH_DEVICE_BACKEND_AUTOLOAD=0. {_install_hint()}") from e


def create(*, emulate: bool | None = None, allow_float32: bool = True, cann: str | None = None, **kwargs):
    """The Ascend backend. `emulate`: None = follow GLM52_ASCEND_EMULATE. `allow_float32`: let the
    emulated ops documented for bfloat16/float16 only take float32 too. `cann`: the CANN version
    the emulator emulates (default GLM52_ASCEND_CANN, else versions.EMULATED_CANN); on a device the
    installed version is read from torch_npu."""
    import torch

    from .backend import AscendBackend
    if kwargs:
        raise TypeError(f"ascend backend: unknown options {sorted(kwargs)}")
    if emulate is None:
        emulate = emulation_requested()
    if emulate:
        from .emulator import NpuEmulator
        from .versions import EMULATED_CANN, ENV_CANN
        cann = cann or os.environ.get(ENV_CANN, "").strip() or EMULATED_CANN
        return AscendBackend(NpuEmulator(allow_float32=allow_float32, cann=cann), name=EMULATED_NAME,
                             device=torch.device("cpu"), priority=-1, default_dtype=torch.float32)
    if cann is not None:
        raise TypeError("ascend backend: cann= declares the emulated CANN; on a device the installed one is "
                        "read from torch_npu (declare it with GLM52_ASCEND_CANN where torch.version.cann is unset)")
    npu = _import_torch_npu()
    if not (hasattr(torch, "npu") and torch.npu.is_available()):
        raise BackendUnavailable("backend 'ascend': torch_npu imported but no NPU is visible (check `npu-smi info`, "
                                 "ASCEND_RT_VISIBLE_DEVICES and the driver installation)")
    return AscendBackend(npu, name="ascend", device=torch.device("npu", torch.npu.current_device()),
                         priority=30, default_dtype=torch.bfloat16)


def _prepared_parts(fmt, shape, dtype):
    """What `AscendBackend.prepare_weight` allocates besides a weight's own tensors (quantized.prepared_parts),
    declared on the factory so the planner counts it without creating the backend."""
    from .quantized import prepared_parts
    return prepared_parts(fmt, tuple(shape), dtype)


create.prepared_parts = _prepared_parts
create.sparse_mla_lse = False      # Capabilities.sparse_mla_lse, declared for the planner (no backend created)

__all__ = ["create", "emulation_requested", "ENV_EMULATE", "EMULATED_NAME", "MIN_CANN"]
