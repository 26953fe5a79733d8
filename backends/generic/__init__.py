"""torch: the contract's ops in plain torch on whatever torch device a deployment names. The starting
point for vendors, and the CPU's default backend.

Every op of the contract runs plain device-agnostic torch on the backend's device: `mlu`, `musa`,
`xpu`, `supa`, `npu` without its fused ops, a CUDA-compatible stack, or the CPU. The paged ops
(`indexer_topk`, `sparse_mla`), `moe_experts` and greedy `mtp_verify` run in batched form
(batched.py: gathers with masks, no loop over requests, no host read, so a decode step through them
can be captured as a graph); the others are the references (`glm52_backends/ops/`). So every vendor
YAML in `configs/` runs correctly before anyone writes a kernel, and conformance checks the batched
ops against the references like any backend's.

Writing a vendor backend starts here:

    class MyChipBackend(TorchDeviceBackend):
        name, priority = "mychip", 50
        def moe_experts(self, x, w13, w2, topk_ids, topk_weights):
            if x.dtype not in (torch.bfloat16,) or weight_format(w13) != "dense":
                raise OpUnsupported("grouped GEMM kernel is bf16 only")   # -> reference, one warning
            return my_kernels.grouped_moe(...)

    # pyproject.toml of the vendor package
    [project.entry-points."glm52_backends.backends"]
    mychip = "my_package:create"

then check it with `glm52 conformance --backend mychip`. `tests/vendor_plugin/` is a complete,
installable example. Inputs reach the ops on the backend's device; an argument on another device
type is a caller bug and raises ValueError naming it.
"""

from __future__ import annotations

import functools

import torch

from glm52_backends.cache_formats import FORMATS as CACHE_FORMATS
from glm52_backends.ops import OP_NAMES, REFERENCES, Capabilities
from glm52_backends.weights import WEIGHT_FORMATS
from glm52_backends.registry import BackendUnavailable

from . import batched
from .device import resolve_device

ACCELERATOR_PRIORITY = 10  # below native backends (cuda, ascend), above cpu_ref (0)
CPU_PRIORITY = 1           # on the CPU above cpu_ref (0): the batched paged ops are as fast or faster
                           # (benchmarks/results/engine-cpu.md), and capture-safe


class TorchDeviceBackend:
    """The reference op set bound to one torch device, computing in `compute_dtype` (float32 default).

    `device`: a torch device or string ("mlu", "musa:1", "npu", "xpu", "cuda", "cpu"); None = the
    current accelerator if torch sees one, else the CPU. float64 compute is refused on devices that
    have no float64 (mps).
    """

    name = "torch"
    opaque_ops = False     # plain torch: graph tracing inlines its ops (inductor fuses them)

    def __init__(self, device: str | torch.device | None = None, compute_dtype: torch.dtype = torch.float32):
        self.device = resolve_device(device)
        if compute_dtype not in (torch.float32, torch.float64):
            raise BackendUnavailable(f"torch backend computes in float32 or float64, not {compute_dtype}")
        if compute_dtype == torch.float64 and self.device.type == "mps":
            raise BackendUnavailable("torch backend: mps has no float64; use compute_dtype=torch.float32")
        self.compute_dtype = compute_dtype
        on_cpu = self.device.type == "cpu"
        if not hasattr(type(self), "priority"):  # a subclass states its own
            self.priority = CPU_PRIORITY if on_cpu else ACCELERATOR_PRIORITY
        dtypes = (torch.float32, torch.bfloat16, torch.float16) + (() if self.device.type == "mps" else (torch.float64,))
        self.capabilities = Capabilities(dtypes=dtypes, default_dtype=torch.float32 if on_cpu else torch.bfloat16,
                                         devices=(self.device.type,), weight_formats=WEIGHT_FORMATS,
                                         cache_formats=tuple(CACHE_FORMATS))
        for op in OP_NAMES:
            if not callable(getattr(type(self), op, None)):  # a subclass's own op wins
                fn = batched.OPS.get(op, REFERENCES[op])     # the paged ops batched: no loop over requests
                ref = functools.update_wrapper(functools.partial(fn, cdt=compute_dtype), fn)
                setattr(self, op, ref if on_cpu else self._on_device(op, ref))   # CPU: torch names a wrong device

    def _on_device(self, op: str, fn):
        kind = self.device.type

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.device.type != kind:
                    raise ValueError(f"torch backend on {self.device}: {op} argument {i} is on {a.device}; "
                                     f"move the inputs to {self.device}")
            for k, a in kwargs.items():
                if isinstance(a, torch.Tensor) and a.device.type != kind:
                    raise ValueError(f"torch backend on {self.device}: {op} {k} is on {a.device}; "
                                     f"move the inputs to {self.device}")
            return fn(*args, **kwargs)
        call.__name__ = op
        return call

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={str(self.device)!r}, compute_dtype={self.compute_dtype})"


def create(**kwargs) -> TorchDeviceBackend:
    """Entry point `torch`: `create(device="mlu")`; no device = current accelerator or CPU."""
    return TorchDeviceBackend(**kwargs)
