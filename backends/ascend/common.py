"""Shared pieces of the Ascend backend: documented limits, declines, dense weights, per-step data.

Limits are the Atlas A2/A3 columns of the torch_npu op docs (section names: emulator.py). An input
outside them raises `OpUnsupported` and the registry runs the reference with one warning; a caller
error (shapes that contradict each other or the step metadata) raises ValueError naming it.

Per-step data (`AscendStep`, built by `prepare_step(meta)` once per step and kept by the model in
`meta.backend_data`) holds the tensors the fused ops take besides the activations: TND prefix sums,
key lengths and the block table, all int32 and contiguous, plus each token's position. They are
derived on the device from the `StepMeta`'s own tensors (no host read); host facts (token and
request counts, block size) come from the meta's host tuples. A direct op call without a meta
builds one with `StepMeta.from_tensors` (one host read of the lengths, which is what it is for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm52_backends.ops import OpUnsupported
from glm52_backends.step import StepMeta
from glm52_backends.weights import Weight, weight_format

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# npu_lightning_indexer
LI_HEAD_DIM = 128                       # D of query and key
LI_MAX_HEADS = 64                       # N1 <= 64
LI_SPARSE_COUNTS = frozenset(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
LI_MAX_TOPK = 8192
# npu_sparse_flash_attention, attention_mode=2 (MLA-absorb)
SFA_LATENT, SFA_ROPE = 512, 64
SFA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)
# PA_BSND caches of both attention ops: block_size a multiple of 16, at most 1024
MAX_BLOCK_SIZE = 1024
BLOCK_SIZES = tuple(range(16, MAX_BLOCK_SIZE + 1, 16))
# npu_moe_gating_top_k
GATING_MAX_EXPERTS = 2048
# npu_grouped_matmul (one 3-D weight, group_type=0) and npu_moe_token_unpermute
GMM_MAX_GROUPS = 1024
GMM_INNER_LIMIT = 65536                 # last dim of x and weight must stay below this
UNPERMUTE_MAX_TOPK = 512
# npu_rotary_mul: D even and < 896; B * N < 1000 in interleave mode
ROPE_MAX_DIM = 896


def decline(cond: bool, why: str) -> None:
    """OpUnsupported(why) unless `cond`: the registry then runs the reference on the same inputs."""
    if not cond:
        raise OpUnsupported(why)


def paged_block_size(bs: int, what: str) -> None:
    decline(bs % 16 == 0 and 0 < bs <= MAX_BLOCK_SIZE,
            f"{what}: PA_BSND needs a cache block size that is a multiple of 16 up to {MAX_BLOCK_SIZE}, got {bs}")


def dense(w: torch.Tensor | Weight, op: str, name: str) -> torch.Tensor:
    """The tensor of a dense weight (bare or `Weight`); other formats are declined (the reference
    dequantizes them): quantised grouped matmuls are not wired on this backend."""
    fmt = weight_format(w)
    decline(fmt == "dense", f"{op}: weight {name} has format {fmt!r}; this backend runs dense weights only")
    return w.data if isinstance(w, Weight) else w


@dataclass
class AscendStep:
    """One step's arguments of the paged torch_npu ops, built once (`prepare_step`).

    act_q       [B] int32  actual_seq_lengths_query: TND prefix sums (cu_seqlens_q[1:])
    act_kv      [B] int32  actual_seq_lengths_key / _kv: each request's length
    block_table [B, nb] int32, contiguous
    positions   [T] int64  position of each query token
    num_tokens, block_size: host ints from the meta
    """
    act_q: torch.Tensor
    act_kv: torch.Tensor
    block_table: torch.Tensor
    positions: torch.Tensor
    num_tokens: int
    block_size: int


def build_step(meta: StepMeta) -> AscendStep:
    """`AscendStep` from a `StepMeta`: device-side casts and slices only, no host read."""
    i32 = torch.int32
    return AscendStep(act_q=meta.cu_seqlens_q[1:].to(i32).contiguous(),
                      act_kv=meta.seq_lens.to(i32).contiguous(),
                      block_table=meta.block_table.to(i32).contiguous(),
                      positions=meta.positions.to(torch.int64),
                      num_tokens=meta.num_tokens, block_size=meta.block_size)


def step_for(backend, op: str, meta: StepMeta | None, T: int, block_table: torch.Tensor, seq_lens: torch.Tensor,
             cu_seqlens_q: torch.Tensor, block_size: int) -> AscendStep:
    """The step data for one paged-op call: `meta.backend_data` when the model prepared it, else
    built now (from `meta`, or from a meta read off the tensors when the caller passed none)."""
    if meta is None:
        meta = StepMeta.from_tensors(block_table, seq_lens, cu_seqlens_q, block_size)
    if meta.block_size != block_size:
        raise ValueError(f"{op}: the step metadata says block size {meta.block_size}, the cache has {block_size}")
    if meta.num_tokens != T:
        raise ValueError(f"{op}: the step metadata has {meta.num_tokens} query tokens, q has {T}")
    if meta.num_requests != block_table.shape[0]:
        raise ValueError(f"{op}: the step metadata has {meta.num_requests} requests, block_table has "
                         f"{block_table.shape[0]} rows")
    data = meta.backend_data
    return data if isinstance(data, AscendStep) else backend.prepare_step(meta)
