"""Shared pieces of the Ascend backend: documented limits, declines, dense weights, per-step data.

Limits are the Atlas A2/A3 columns of the torch_npu op docs (section names: emulator.py), of the
release line the installed CANN belongs to where they differ between lines (versions.py). An input
outside them raises `OpUnsupported` and the registry runs the reference with one warning; a caller
error (shapes that contradict each other) raises ValueError naming it.

Step data (`AscendStep`, built by `step_for` on each paged-op call) holds the tensors the fused
ops take besides the activations: TND prefix sums, key lengths and the block table, all int32 and
contiguous, plus (for indexer_topk) each token's position. They come from the op's own loose
tensors (`block_table`, `seq_lens`, `cu_seqlens_q`, the contract's one carrier of the step) by
device-side casts, slices and `step.token_requests` / `step.token_positions`: no host read, so a
decode step through the ops can be captured as a graph. Host facts come from shapes only; the
values of the lengths are never checked here (a caller's contract violation need not be detected).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm52_backends.ops import OpUnsupported
from glm52_backends.step import token_positions, token_requests
from glm52_backends.weights import Weight, weight_format

from .versions import OLDEST, Installed

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# npu_lightning_indexer
LI_HEAD_DIM = 128                       # D of query and key
LI_MAX_HEADS = 64                       # N1 <= 64 (26.0.0 line on); exactly 64 on the 7.3.0 line
LI_SPARSE_COUNTS_73 = frozenset(range(1, 2049))                                   # 7.3.0 line
LI_SPARSE_COUNTS = LI_SPARSE_COUNTS_73 | {3072, 4096, 5120, 6144, 7168, 8192}     # 26.0.0 line on
LI_MAX_TOPK = 8192
# npu_sparse_flash_attention, attention_mode=2 (MLA-absorb)
SFA_LATENT, SFA_ROPE = 512, 64
SFA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)
# PA_BSND caches of both attention ops: block_size a multiple of 16, at most 1024. 128 is the size
# vllm-ascend's SFA path supports and Huawei's GLM-5.2 recipe uses: listed first, the default.
MAX_BLOCK_SIZE = 1024
DEFAULT_BLOCK_SIZE = 128
BLOCK_SIZES = (DEFAULT_BLOCK_SIZE,) + tuple(b for b in range(16, MAX_BLOCK_SIZE + 1, 16) if b != DEFAULT_BLOCK_SIZE)
# npu_moe_gating_top_k
GATING_MAX_EXPERTS = 2048
# npu_grouped_matmul (one 3-D weight, group_type=0) and npu_moe_token_unpermute
GMM_MAX_GROUPS = 1024
GMM_INNER_LIMIT = 65536                 # last dim of x and weight must stay below this
UNPERMUTE_MAX_TOPK = 512
# npu_interleave_rope (Atlas A2/A3): D = 64
IROPE_DIM = 64


@dataclass(frozen=True)
class LineLimits:
    """The documented limits of the two fused attention ops that depend on the release line."""
    li_heads: frozenset           # allowed N1 of npu_lightning_indexer
    li_sparse_counts: frozenset   # allowed sparse_count
    max_topk: int
    qli_heads: frozenset          # allowed N1 of npu_quant_lightning_indexer (sparse_count 1..2048 on every line)
    qli_strided_key: bool         # whether it reads a non-contiguous key / key_dequant_scale (a packed c8_li cache)


def line_limits(inst: Installed) -> LineLimits | None:
    """The limits of `inst`'s line; None before the 7.3.0 line (the fused attention ops are absent)."""
    if inst.line is None:
        return None
    heads = frozenset(range(1, LI_MAX_HEADS + 1))
    if inst.line.name == "7.3.0":
        return LineLimits(frozenset({64}), LI_SPARSE_COUNTS_73, 2048, frozenset({64}), False)
    if inst.line.name == "26.0.0":
        return LineLimits(heads, LI_SPARSE_COUNTS, LI_MAX_TOPK, frozenset({64}), False)
    return LineLimits(heads, LI_SPARSE_COUNTS, LI_MAX_TOPK, heads, True)


def version_decline(backend, op: str) -> LineLimits:
    """The line limits of `backend`'s CANN, declining `op` when its line lacks the fused attention ops."""
    lim = backend.line_limits
    decline(lim is not None, f"{op} is not in torch_npu before the {OLDEST}: {backend.installed.describe()}; "
                             f"install CANN >= 8.5.0 (CANN >= 9.0.0 for GLM-5.2's 32 index heads)")
    return lim


# ---- indices the backend's own indexer produced -----------------------------------------------------
# npu_sparse_flash_attention wants each row's valid indices first; the contract lets a caller put -1
# anywhere, so sparse_mla reorders the rows, except for an index tensor this backend's indexer_topk
# returned: those rows are valid-first with at least one valid entry (min(topk, pos+1) >= 1) by
# construction. The mark travels with the tensor object (IndexShare layers pass the same object);
# a slice or copy loses it and is reordered again. Editing a marked tensor in place between the two
# calls would void the guarantee; the model never does.
_VALID_FIRST = "_glm52_ascend_valid_first"


def mark_valid_first(idx: torch.Tensor) -> torch.Tensor:
    setattr(idx, _VALID_FIRST, (idx.data_ptr(), tuple(idx.shape), idx.dtype))
    return idx


def is_marked_valid_first(idx: torch.Tensor) -> bool:
    return getattr(idx, _VALID_FIRST, None) == (idx.data_ptr(), tuple(idx.shape), idx.dtype)


def decline(cond: bool, why: str) -> None:
    """OpUnsupported(why) unless `cond`: the registry then runs the reference on the same inputs."""
    if not cond:
        raise OpUnsupported(why)


def paged_block_size(bs: int, what: str) -> None:
    decline(bs % 16 == 0 and 0 < bs <= MAX_BLOCK_SIZE,
            f"{what}: PA_BSND needs a cache block size that is a multiple of 16 up to {MAX_BLOCK_SIZE}, got {bs}")


def dense(w: torch.Tensor | Weight, op: str, name: str) -> torch.Tensor:
    """The tensor of a dense weight (bare or `Weight`). The int8 formats go to quantized.py before
    this is called; anything else reaching here is declined (the reference executes it)."""
    fmt = weight_format(w)
    decline(fmt == "dense", f"{op}: weight {name} has format {fmt!r}; this backend runs dense, w8a8_dynamic, "
                            f"w8a8_static weights")
    return w.data if isinstance(w, Weight) else w


@dataclass
class AscendStep:
    """One paged-op call's arguments of the torch_npu ops besides the activations (`step_for`).

    act_q       [B] int32  actual_seq_lengths_query: TND prefix sums (cu_seqlens_q[1:])
    act_kv      [B] int32  actual_seq_lengths_key / _kv: each request's length (seq_lens)
    block_table [B, nb] int32, contiguous
    positions   [T] int64  position of each query token, or None when the op did not ask for them
    """
    act_q: torch.Tensor
    act_kv: torch.Tensor
    block_table: torch.Tensor
    positions: torch.Tensor | None = None


def build_step(block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, num_tokens: int,
               *, positions: bool = False) -> AscendStep:
    """`AscendStep` from the contract's loose step tensors: device-side casts, slices and the
    step.py helpers only, no host read. The casts are no-ops (no copy) for the int32, contiguous
    tensors the model passes. `positions`: also derive each token's position ([T] int64)."""
    i32 = torch.int32
    pos = None
    if positions:
        pos = token_positions(seq_lens, cu_seqlens_q, token_requests(cu_seqlens_q, num_tokens))
    return AscendStep(act_q=cu_seqlens_q[1:].to(i32).contiguous(), act_kv=seq_lens.to(i32).contiguous(),
                      block_table=block_table.to(i32).contiguous(), positions=pos)


def step_for(op: str, T: int, block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
             *, positions: bool = False) -> AscendStep:
    """The step data for one paged-op call, built now from the call's tensors (no host read).
    Checks shapes only: one request per block-table row, per `seq_lens` entry, per `cu_seqlens_q`
    step. That `cu_seqlens_q[-1] == T` and the lengths fit the table is the caller's contract."""
    if block_table.dim() != 2 or seq_lens.dim() != 1 or cu_seqlens_q.dim() != 1:
        raise ValueError(f"{op}: block_table must be [B, max_blocks], seq_lens [B], cu_seqlens_q [B+1]; got "
                         f"{list(block_table.shape)}, {list(seq_lens.shape)}, {list(cu_seqlens_q.shape)}")
    B = block_table.shape[0]
    if seq_lens.shape[0] != B or cu_seqlens_q.shape[0] != B + 1:
        raise ValueError(f"{op}: block_table has {B} rows, so seq_lens must hold {B} entries and cu_seqlens_q "
                         f"{B + 1}; got {seq_lens.shape[0]} and {cu_seqlens_q.shape[0]}")
    return build_step(block_table, seq_lens, cu_seqlens_q, T, positions=positions)
