"""Shared host-side helpers of the cuda backend: checks, the per-call step data, launch helpers.

No kernels and no triton import here: the package imports this module before it knows whether
Triton runs on a GPU or in its interpreter.

The step reaches the paged ops as the contract's loose device tensors (block_table, seq_lens,
cu_seqlens_q) and nothing else. `step_data` turns them, at each call, into what a kernel launch
reads (`CudaStepData`): int32 contiguous copies and each query token's request and position,
derived on the device (`step.token_requests`, `step.token_positions`). Grid sizes come from tensor
*shapes* only (T = q.shape[0], B = seq_lens.shape[0], topk, max_blocks * block_size), never from
device values: no path reads the host, so the launches can be captured in a CUDA graph and
replayed on new lengths. The ops check shapes and dtypes only; the lengths' values are the
caller's contract (validated where a step is planned, `step.plan_step`), not re-checked here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from glm52_backends.ops import OpUnsupported
from glm52_backends.step import token_positions, token_requests
from glm52_backends.weights import Weight

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FP8_GROUP = 128          # inputs per activation-quantization group = the K block of every FP8 kernel
FP8_RECIPES = ("fp8_g128", "fp8_g128_ue8m0")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_f32(dtype: torch.dtype) -> bool:
    """Whether kernels convert `tl.dot` operands to float32 first.

    float32 inputs: yes, with input_precision="ieee" (TF32 would not meet the float32 tolerance).
    Under the interpreter: always, because its bfloat16 `tl.dot` returns wrong values (float16,
    float32 and bfloat16 loads are right).
    """
    return dtype == torch.float32 or interpreting()


def capturing() -> bool:
    """True while a CUDA graph is being captured (a host read would fail there)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def pow2(n: int, lo: int = 1) -> int:
    """The next power of two >= n (and >= lo); as triton.next_power_of_2, without importing triton."""
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def need(cond: bool, op: str, why: str) -> None:
    """Decline an input this kernel does not support: the registry falls back to the reference."""
    if not cond:
        raise OpUnsupported(f"{op}: {why}")


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        need(t.dtype in FLOATS, op, f"{name} has dtype {t.dtype}; kernels take {', '.join(map(str, FLOATS))}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` entries that are None match anything."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")


def dense(op: str, name: str, w: Any) -> torch.Tensor:
    """The tensor of a dense weight (a bare tensor or a `Weight` of format "dense"); other formats
    are declined (OpUnsupported -> the reference dequantizes them)."""
    if isinstance(w, Weight):
        need(w.format == "dense", op, f"{name} is a {w.format!r} Weight; the cuda backend runs 'dense' and "
                                      f"'fp8_block' weights")
        return w.data
    return w


def is_fp8_block(w: Any) -> bool:
    return isinstance(w, Weight) and w.format == "fp8_block"


def fp8_block(op: str, name: str, w: Any, lead: int = 0) -> Weight:
    """`w` as a block-FP8 `Weight` the FP8 kernels run: codes float8_e4m3fn `[*lead, N, K]`, f32
    scales `[*lead, ceil(N/b0), ceil(K/b1)]`, any row block b0 (128, or 1 after a gate/up
    concatenation of odd widths), input block b1 = 128 (the activation group and the kernels' K
    block), recipe fp8_g128 or fp8_g128_ue8m0. Other formats, blocks, recipes or scale dtypes are
    declined (OpUnsupported -> the reference); a scale tensor of the wrong shape is an error."""
    need(is_fp8_block(w), op, f"{name} is a {getattr(w, 'format', type(w).__name__)!r} weight; the FP8 kernels "
                              f"take 'fp8_block' Weights")
    b0, b1 = w.block
    need(b1 == FP8_GROUP, op, f"{name} has FP8 blocks of {b1} inputs; the kernels take {FP8_GROUP}-input blocks")
    need(b0 >= 1, op, f"{name} has an FP8 row block of {b0}")
    need(w.recipe in FP8_RECIPES, op, f"{name}: activation recipe {w.recipe!r}; the kernels run {FP8_RECIPES}")
    need(w.scales.dtype == torch.float32, op, f"{name}: FP8 scales are {w.scales.dtype}; the kernels read float32")
    if w.data.dim() != lead + 2:
        raise ValueError(f"{op}: {name} must have {lead + 2} dims, got FP8 codes of shape {list(w.data.shape)}")
    *lo, N, K = w.data.shape
    check_shape(op, f"{name}.scales", w.scales, (*lo, -(-N // b0), -(-K // b1)))
    return w


# ---- per-call step data ---------------------------------------------------------------------------
@dataclass
class CudaStepData:
    """What the kernels read about the step, on the ops' device, derived from the loose tensors.

    cu_seqlens_q [B+1], seq_lens [B], block_table [B, max_blocks] (contiguous): int32;
    token_request [T] int32 and positions [T] int32: each query token's request and position
    (a padded decode row, seq_len 0, gets position -1 and so selects nothing);
    num_tokens T, num_requests B: from shapes.
    """
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    token_request: torch.Tensor
    positions: torch.Tensor
    num_tokens: int
    num_requests: int


def step_data(op: str, T: int, block_table: torch.Tensor, seq_lens: torch.Tensor,
              cu_seqlens_q: torch.Tensor) -> CudaStepData:
    """The step data for one op call of T query tokens: shape and dtype checks, then device ops only
    (no host read on any path, so the call can be captured in a CUDA graph)."""
    B = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_shape(op, "seq_lens", seq_lens, (B,))
    check_shape(op, "cu_seqlens_q", cu_seqlens_q, (B + 1,))
    check_shape(op, "block_table", block_table, (B, None))
    for name, t in (("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q), ("block_table", block_table)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if T > 0 and B == 0:
        raise ValueError(f"{op}: q has T={T} tokens but the step has no requests (seq_lens is empty)")
    i32 = torch.int32
    req = token_requests(cu_seqlens_q, T)
    pos = token_positions(seq_lens, cu_seqlens_q, req)
    return CudaStepData(
        cu_seqlens_q=cu_seqlens_q.to(i32).contiguous(), seq_lens=seq_lens.to(i32).contiguous(),
        block_table=block_table.to(i32).contiguous(), token_request=req.to(i32), positions=pos.to(i32),
        num_tokens=T, num_requests=B)
