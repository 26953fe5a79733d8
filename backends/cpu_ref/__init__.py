"""cpu_ref: the reference backend, a thin binding of the contract's references (glm52_backends/ops/).

Plain torch, float32 (or float64 on request: the conformance oracle), slow, obviously right.
"""

from __future__ import annotations

import functools

import torch

from glm52_backends.cache_formats import FORMATS as CACHE_FORMATS
from glm52_backends.ops import OP_NAMES, REFERENCES, Capabilities
from glm52_backends.weights import WEIGHT_FORMATS


class CpuRefBackend:
    """Every op of the contract, computed in `compute_dtype` by the reference functions."""

    name = "cpu_ref"
    priority = 0  # `auto` prefers any other available backend

    def __init__(self, compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"cpu_ref computes in float32 or float64, not {compute_dtype}")
        self.compute_dtype = compute_dtype
        self.device = torch.device(device)
        self.capabilities = Capabilities(
            dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), devices=("cpu",),
            weight_formats=WEIGHT_FORMATS, cache_formats=tuple(CACHE_FORMATS))
        for op in OP_NAMES:
            fn = functools.partial(REFERENCES[op], cdt=compute_dtype)
            functools.update_wrapper(fn, REFERENCES[op])
            setattr(self, op, fn)

    def __repr__(self) -> str:
        return f"CpuRefBackend(compute_dtype={self.compute_dtype})"


def create(**kwargs) -> CpuRefBackend:
    return CpuRefBackend(**kwargs)
