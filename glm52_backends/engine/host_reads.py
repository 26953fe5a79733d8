"""Host reads: the points where the host waits for tensor values (a device synchronisation on a GPU or
NPU), counted or refused.

A read is `t.item()`, `bool(t)`, `int(t)`, `float(t)` (aten `_local_scalar_dense`), `t.tolist()`,
`t.numpy()`, or an op whose output shape depends on the values (`nonzero`, `unique`, `masked_select`):
on an accelerator each one stalls the host until the device catches up, and inside a captured graph
each one is an error (CUDA) or a value silently baked into the graph. `HostReads()` counts them in a
block; `HostReads(forbid=True)` raises `HostReadInCapture` at the first one, which is how a graph
capture (engine/graph.py) refuses a step that reads the host, as the device would. Reads inside an
emulated device kernel (`ops.protocol.device_kernel`: the torch_npu emulator's ops) are the device's
own and are not counted; the backend code around them is.

    with HostReads() as reads:
        decoder.step(reqs)
    print(reads.count, reads.where)
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops.protocol import in_device_kernel

_aten = torch.ops.aten
# aten ops that read values back to the host (item / bool / int / float) or size their output by them
_READS = {_aten._local_scalar_dense, _aten.nonzero, _aten._unique2, _aten.unique_dim, _aten.unique_consecutive,
          _aten.masked_select}
# Tensor methods that read values (counted here too: under inference_mode the aten call is not seen)
_PATCHED = ("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__")


class HostReadInCapture(RuntimeError):
    """A host read inside a step being captured as a graph."""


class HostReads(TorchDispatchMode):
    """Counts (or, `forbid=True`, refuses) the host reads made inside the block. `count` is their
    number, `where` what each was (the aten op or Tensor method)."""

    def __init__(self, forbid: bool = False, what: str = "a captured step"):
        super().__init__()
        self.forbid, self.what = forbid, what
        self.count, self.where = 0, []
        self._saved = {}
        self._inside = 0            # > 0 inside a patched method: its own aten call is not a second read

    def _hit(self, name: str) -> None:
        if in_device_kernel():      # an emulated device kernel reading its inputs: on the device, not a host read
            return
        self.count += 1
        self.where.append(name)
        if self.forbid:
            raise HostReadInCapture(f"{self.what} reads tensor values on the host ({name}); a graph replays "
                                    f"without the host, so the step must keep these values on the device")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside and func.overloadpacket in _READS:
            self._hit(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in _PATCHED:
            orig = self._saved[name] = getattr(torch.Tensor, name)

            def read(t, *a, _orig=orig, _name=name, **k):
                if not self._inside:
                    self._hit(f"Tensor.{_name}")
                self._inside += 1
                try:
                    return _orig(t, *a, **k)
                finally:
                    self._inside -= 1
            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, orig in self._saved.items():
                setattr(torch.Tensor, name, orig)
            self._saved.clear()
