"""One step's batch metadata, derived once per step, and the step as the paged ops receive it.

The paged ops (`indexer_topk`, `sparse_mla`) take the step through ONE carrier: the loose device
tensors `block_table`, `seq_lens`, `cu_seqlens_q` of the contract (what torch_npu's fused ops take,
what a `torch.library` custom op can carry, what a captured graph reads from its buffers). An op
derives each token's request and position from them on the device (`token_requests`,
`token_positions`: no host read) and sizes its work from shapes only.

`StepMeta` is the engine's record of a step: those tensors plus each token's position (for RoPE)
and host copies of the lengths, validated once when the step is planned. It is not handed to ops.
`Step` is the model's view of a step: request ids, token ids, cache slots and the `StepMeta`;
`plan_step` validates the tokens and reserves cache room before anything is written.

With decode context parallelism (a cache with `dcp_size` > 1) the step also carries `DcpStep`:
this rank's view of it for the paged ops (ops/dcp.py). Each query token becomes a one-token
request over the rank's local rows that it may see (its request's block-table row, `seq_len` = the
local rows at or before its position), so the ops run unchanged, and the tokens whose rows this rank
stores with their local slots.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


def token_requests(cu_seqlens_q: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] int64: the request of each query token, on the device (no host read)."""
    t = torch.arange(num_tokens, device=cu_seqlens_q.device)
    return torch.searchsorted(cu_seqlens_q[1:].long().contiguous(), t, right=True)


def token_positions(seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, req: torch.Tensor) -> torch.Tensor:
    """[T] int64: each query token's position, seq_len - q_len + i (right-down causal), on the device.
    `req` is `token_requests(cu_seqlens_q, T)`. A padded decode row (seq_len 0, one token) gets -1."""
    t = torch.arange(req.shape[0], device=req.device)
    return seq_lens.long()[req] - (cu_seqlens_q.long()[req + 1] - t)


class HostLengthsUnavailable(RuntimeError):
    """An op asked for a captured step's host lengths, which change on every replay."""


class DeviceOnlyLengths(Sequence):
    """`seq_lens_host` of a static (captured) step: its length (the bucket's request count) is known,
    its values live only on the device and change on every replay, so reading one raises. An op
    that needs them (a reference looping over requests, a kernel given host lists) cannot be
    captured; the graph runner then keeps that bucket eager."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        raise HostLengthsUnavailable("this step is captured as a graph: its sequence lengths are on the device "
                                     "only (meta.seq_lens), not on the host")

    def __repr__(self) -> str:
        return f"DeviceOnlyLengths({self.n})"


@dataclass
class StepMeta:
    """cu_seqlens_q [B+1] int32, seq_lens [B] int32, block_table [B, max_blocks] int32,
    positions [T] int64 and token_request [T] int32: on the ops' device. cu_host, seq_lens_host:
    the same lengths as host tuples. block_size: tokens per cache block."""
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    positions: torch.Tensor
    token_request: torch.Tensor
    cu_host: tuple[int, ...]
    seq_lens_host: Sequence[int]                  # a tuple, or DeviceOnlyLengths in a captured step
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.cu_host[-1]

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_host)

    @property
    def q_lens_host(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.cu_host, self.cu_host[1:]))

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens_host, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)

    @classmethod
    def build(cls, q_lens: Sequence[int], seq_lens: Sequence[int], block_table: torch.Tensor,
              block_size: int, device: torch.device | str | None = None) -> "StepMeta":
        """From host lengths (validated here, once) and the block table; tensors land on `device`."""
        q_lens, seq_lens = [int(n) for n in q_lens], [int(n) for n in seq_lens]
        if len(q_lens) != len(seq_lens):
            raise ValueError(f"step: {len(q_lens)} query lengths but {len(seq_lens)} sequence lengths")
        if block_table.dim() != 2 or block_table.shape[0] != len(seq_lens):
            raise ValueError(f"step: block_table must be [B={len(seq_lens)}, max_blocks], got {list(block_table.shape)}")
        cap = block_table.shape[1] * block_size
        for b, (q, L) in enumerate(zip(q_lens, seq_lens)):
            if not 0 <= q <= L <= cap:
                raise ValueError(f"step: request {b} has q_len {q} and seq_len {L}; need 0 <= q_len <= seq_len <= "
                                 f"{cap} ({block_table.shape[1]} blocks of {block_size})")
        cu = [0]
        for q in q_lens:
            cu.append(cu[-1] + q)
        pos = [p for q, L in zip(q_lens, seq_lens) for p in range(L - q, L)]
        req = [b for b, q in enumerate(q_lens) for _ in range(q)]
        device = torch.device(device) if device is not None else block_table.device
        return cls(torch.tensor(cu, dtype=torch.int32).to(device), torch.tensor(seq_lens, dtype=torch.int32).to(device),
                   block_table.to(device=device, dtype=torch.int32), torch.tensor(pos, dtype=torch.int64).to(device),
                   torch.tensor(req, dtype=torch.int32).to(device), tuple(cu), tuple(seq_lens), int(block_size))

    @classmethod
    def from_tensors(cls, block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     block_size: int) -> "StepMeta":
        """For a direct op call without a step (tests, conformance): reads the lengths back once."""
        cu = [int(v) for v in cu_seqlens_q.tolist()]
        if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens_q must rise from 0, got {cu}")
        q_lens = [b - a for a, b in zip(cu, cu[1:])]
        meta = cls.build(q_lens, seq_lens.tolist(), block_table, block_size, device=block_table.device)
        # the caller's own tensors stay the ones the ops see
        meta.cu_seqlens_q, meta.seq_lens, meta.block_table = cu_seqlens_q, seq_lens, block_table
        return meta


@dataclass
class DcpStep:
    """One dcp rank's view of a step (ops/dcp.py). For the paged ops, one row per query token:
    block_table [T, max_blocks] int32 (its request's row), seq_lens [T] int32 (this rank's rows at
    positions <= the token's), cu_seqlens_q [T+1] int32 (0, 1, ..., T). For the cache writes: rows
    [n] int64, the step tokens this rank stores, and slots [n] int64, their local slots. A captured
    step (`static`) has rows None: every token is written, those another rank stores (and padding)
    to the null block, so its shapes do not depend on which rank stores what."""
    size: int
    rank: int
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    rows: torch.Tensor | None
    slots: torch.Tensor

    @classmethod
    def static(cls, cache, meta: StepMeta, slots: torch.Tensor) -> "DcpStep":
        """The view of a captured step, from device tensors only: `slots` [T] are the local slots the
        host filled (the null block's for a token another rank stores)."""
        from .ops.dcp import visible_rows
        T = meta.positions.shape[0]
        return cls(cache.dcp_size, cache.dcp_rank, meta.block_table.index_select(0, meta.token_request.long()),
                   visible_rows(meta.positions, cache.dcp_size, cache.dcp_rank),
                   torch.arange(T + 1, dtype=torch.int32, device=meta.positions.device), None, slots)

    @classmethod
    def build(cls, cache, meta: StepMeta, reqs: Sequence[Hashable], starts: Sequence[int]) -> "DcpStep":
        from .ops.dcp import visible_rows
        D, r = cache.dcp_size, cache.dcp_rank
        rows: list[int] = []
        slots: list[int] = []
        for b, (req, start) in enumerate(zip(reqs, starts)):
            offs, sl = cache.local_slots(req, start, meta.seq_lens_host[b])
            rows += [meta.cu_host[b] + o for o in offs]
            slots += sl
        dev = meta.block_table.device
        T = meta.num_tokens
        return cls(D, r, meta.block_table.index_select(0, meta.token_request.long()),
                   visible_rows(meta.positions, D, r), torch.arange(T + 1, dtype=torch.int32, device=dev),
                   torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(slots, dtype=torch.long, device=dev))


@dataclass
class Step:
    """The model's step: requests in batch order, token ids [T] int64 and cache slots [T] int64 on
    the device, and the ops' metadata; `dcp`: this rank's view under decode context parallelism."""
    reqs: list
    ids: torch.Tensor
    slots: torch.Tensor
    meta: StepMeta
    dcp: DcpStep | None = None

    @property
    def positions(self) -> torch.Tensor:
        """Each token's position [T] (RoPE); the ops' tensors are read from `meta`."""
        return self.meta.positions


def plan_step(cache, chunks: dict[Hashable, Sequence[int]], *, vocab_size: int, max_positions: int,
              device: torch.device) -> Step:
    """Validate `chunks[req]` (tokens to append to each request) and reserve their cache room.

    Raises before anything is reserved or written: a token id outside the vocabulary, a context
    over `max_positions`, or (from the cache) too few free blocks.
    """
    reqs = [r for r, c in chunks.items() if len(c)]
    new_lens, start = {}, {}
    for r in reqs:
        for j, t in enumerate(chunks[r]):
            if not 0 <= int(t) < vocab_size:
                raise ValueError(f"request {r!r}: token id {int(t)} at position {j} is outside the vocabulary "
                                 f"[0, {vocab_size})")
        start[r] = cache.lens.get(r, 0)
        new_lens[r] = start[r] + len(chunks[r])
        if new_lens[r] > max_positions:
            raise ValueError(f"request {r!r}: context of {new_lens[r]} tokens exceeds max_position_embeddings "
                             f"({max_positions})")
    cache.reserve(new_lens)  # all-or-nothing: raises CacheExhausted before any write
    ids = torch.tensor([int(t) for r in reqs for t in chunks[r]], dtype=torch.long)
    slots = torch.cat([cache.slots(r, start[r], new_lens[r]) for r in reqs]) if reqs else torch.zeros(0, dtype=torch.long)
    meta = StepMeta.build([len(chunks[r]) for r in reqs], [new_lens[r] for r in reqs], cache.block_table(reqs),
                          cache.block_size, device)
    dcp = DcpStep.build(cache, meta, reqs, [start[r] for r in reqs]) if getattr(cache, "dcp_size", 1) > 1 else None
    return Step(reqs, ids.to(device), slots.to(device), meta, dcp)
