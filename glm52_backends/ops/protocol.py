"""What a backend is: a plain object with the ops it implements, typed capabilities, a few hooks.

    class MyBackend:                       # satisfies `Backend`
        name = "mychip"                    # what reports print
        priority = 10                      # higher wins under backend="auto"
        capabilities = Capabilities(dtypes=(torch.bfloat16,), devices=("npu",), max_topk=2048)
        device = torch.device("npu", 0)    # where the model puts weights and caches
        def sparse_mla(self, q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale,
                       *, return_lse=False): ...
        opaque_ops = True                  # optional: False = its ops are plain torch, which graph
                                           # capture may trace through (ops/library.py)
        triton_ops = False                 # optional: True = its ops launch Triton kernels through
                                           # torch.library.wrap_triton (defined with triton_op)
        def prepare_weight(self, name, weight, *, dtype): ...   # optional: once per weight at load, the
                                           # form its kernels take (same shape and format; registry.py)
        def setup_parallel(self, comms, layout): ...  # optional, over several ranks: the process groups;
                                           # may return Collectives for the expert dispatch (e.g. MC2)
        comm = None                        # optional: Collectives overriding ops/comm.py's

An op the backend lacks, or an input it declines by raising `OpUnsupported`, runs the reference.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

import torch


_KERNEL = threading.local()


@contextmanager
def device_kernel() -> Iterator[None]:
    """Marks the body of a device kernel emulated on the CPU (the Ascend backend's torch_npu emulator):
    the values it reads are read on the device by the real kernel, so the host-read counter and the
    graph capture guard (engine/host_reads.py) do not count them. Never for a backend's host code."""
    _KERNEL.depth = getattr(_KERNEL, "depth", 0) + 1
    try:
        yield
    finally:
        _KERNEL.depth -= 1


def in_device_kernel() -> bool:
    return getattr(_KERNEL, "depth", 0) > 0


class OpUnsupported(Exception):
    """Raised by a backend op that declines these inputs; the caller falls back to the reference."""


@dataclass
class Capabilities:
    """What a backend executes natively (everything else falls back to the reference).

    dtypes          activation/cache dtypes its kernels take
    default_dtype   the model dtype when the user names none (None: float32)
    devices         torch device types it runs on ("cuda", "npu", "cpu", ...)
    weight_formats  `Weight` formats its linear/mlp/moe ops execute (weights.WEIGHT_FORMATS)
    cache_formats   paged-cache row formats its attention ops read ("dense" = the model dtype)
    max_topk        the largest indexer top-k its kernels take (None: any)
    block_sizes     paged-cache block sizes it supports (None: any)
    default_block_size  the paged-cache block size the engine takes when the user names none
                    (None: the engine's own default)
    sparse_mla_lse  whether its sparse_mla returns the log-sum-exp natively (return_lse=True). False:
                    under decode context parallelism the model brings each query's selected rows to
                    every rank of the group and runs the op without it (model._sparse_mla_dcp_gather),
                    instead of the reference computing out and lse
    extra           anything backend-specific (e.g. the CUDA backend's MoE GEMM choice)
    """
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    default_dtype: torch.dtype | None = None
    devices: tuple[str, ...] = ("cpu",)
    weight_formats: tuple[str, ...] = ("dense",)
    cache_formats: tuple[str, ...] = ("dense",)
    max_topk: int | None = None
    block_sizes: tuple[int, ...] | None = None
    default_block_size: int | None = None
    sparse_mla_lse: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = self.extra.pop("default_block_size", None)    # where backends gave it before it was typed
        if self.default_block_size is None:
            self.default_block_size = given

    @classmethod
    def coerce(cls, caps: "Capabilities | Mapping[str, Any] | None") -> "Capabilities":
        """A `Capabilities` from itself, None, or a plain dict (older plugins): known keys map onto
        fields (`fp8: True` adds the fp8_block weight format), the rest go to `extra`."""
        if isinstance(caps, Capabilities):
            return caps
        caps = dict(caps or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        kw: dict[str, Any] = {}
        extra = dict(caps.pop("extra", {}) or {})
        for k, v in caps.items():
            if k in known:
                kw[k] = tuple(v) if isinstance(v, list) else v
            elif k == "fp8":
                if v:
                    kw["weight_formats"] = tuple(kw.get("weight_formats", ("dense",))) + ("fp8_block",)
            else:
                extra[k] = v
        return cls(**kw, extra=extra)

    def get(self, key: str, default: Any = None) -> Any:
        """Mapping-style read of a field or an `extra` entry."""
        if key in self.extra:
            return self.extra[key]
        v = getattr(self, key, default)
        return default if v is None else v


@runtime_checkable
class Backend(Protocol):
    """The attributes every backend has; ops, `priority`, `device`, `opaque_ops` and `comm` are optional."""
    name: str
    capabilities: Capabilities | Mapping[str, Any]
