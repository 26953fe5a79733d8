"""Shared host-side helpers of the cuda backend: checks, token metadata, launch constants.

Everything here is torch on the tensors' own device, without a host synchronisation, so that the
kernels' launches can be captured in a CUDA graph (the benchmark times decode sizes that way).
Grid sizes come from tensor *shapes* only (T, topk, max_blocks * block_size), never from values.
"""

from __future__ import annotations

import os

import torch
import triton

from glm52_backends.ops import OpUnsupported

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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
    """True while a CUDA graph is being captured: value checks (which synchronise) are skipped."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def need(cond: bool, op: str, why: str) -> None:
    """Decline an input this kernel does not support: the registry falls back to the reference."""
    if not cond:
        raise OpUnsupported(f"{op}: {why}")


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        need(t.dtype in FLOATS, op, f"{name} has dtype {t.dtype}; kernels take {', '.join(map(str, FLOATS))}")


def check_same_device(op: str, device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != device.type:
            raise ValueError(f"{op}: {name} is on {t.device}, the backend runs on {device}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` entries that are None match anything."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")


def token_metadata(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, T: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(request of each query token [T] int32, its position [T] int32), on the device, no sync.

    position of token i of request b = seq_lens[b] - q_len[b] + i (right-down causal).
    """
    cu = cu_seqlens_q.to(torch.int64)
    t = torch.arange(T, device=cu.device)
    req = torch.searchsorted(cu[1:].contiguous(), t, right=True)                    # [T]
    req = req.clamp(max=max(seq_lens.shape[0] - 1, 0))
    q_len = cu[1:] - cu[:-1]                                                         # [B]
    pos = seq_lens.to(torch.int64)[req] - q_len[req] + (t - cu[req])
    return req.to(torch.int32), pos.to(torch.int32)


def check_batch(op: str, T: int, block_table: torch.Tensor, seq_lens: torch.Tensor,
                cu_seqlens_q: torch.Tensor, block_size: int) -> None:
    """Shape checks always; value checks (they synchronise) unless a CUDA graph is being captured."""
    B = seq_lens.shape[0]
    check_shape(op, "seq_lens", seq_lens, (B,))
    check_shape(op, "cu_seqlens_q", cu_seqlens_q, (B + 1,))
    check_shape(op, "block_table", block_table, (B, None))
    for name, t in (("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q), ("block_table", block_table)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if capturing():
        return
    cu = cu_seqlens_q.tolist()
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{op}: cu_seqlens_q must rise from 0 to T={T}, got {cu}")
    lens = seq_lens.tolist()
    cap = block_table.shape[1] * block_size
    for b, L in enumerate(lens):
        if not cu[b + 1] - cu[b] <= L <= cap:
            raise ValueError(f"{op}: request {b} has seq_len {L}, but q_len {cu[b + 1] - cu[b]} and "
                             f"{block_table.shape[1]} blocks of {block_size} allow {cu[b + 1] - cu[b]}..{cap}")
