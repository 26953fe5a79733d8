"""Collectives: the contract of the seams between devices (a separate contract from the math ops).

The model calls these at the tensor/expert-parallel seams only (after o_proj and the row-parallel
MLP halves, around the routed experts, on the vocabulary-split logits). `Collectives` is one
device: every call is the identity. `TorchDistributed` runs them through torch.distributed (NCCL,
HCCL through torch_npu, gloo on CPU) on a process group; a backend may supply its own subclass as
`backend.comm` (e.g. Ascend's fused MoE dispatch/combine).

    all_reduce(x)                  sum over the group, same shape
    all_gather(x, dim)             concatenation of every rank's x along dim
    reduce_scatter(x, dim)         sum over the group, this rank's 1/world slice along dim
    all_to_all(x, in_splits, out_splits)   rows of x sent to ranks by in_splits (dim 0)
    broadcast(x, src)              src's x on every rank
    moe_dispatch(x, topk_ids) / moe_combine(y, handle)   tokens to the ranks owning their experts
                                   and back (defaults: the identity at one device)
"""

from __future__ import annotations

from typing import Any

import torch


class Collectives:
    """One device: the identity everywhere."""

    world_size = 1
    rank = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return x

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return x

    def all_to_all(self, x: torch.Tensor, in_splits: list[int] | None = None,
                   out_splits: list[int] | None = None) -> torch.Tensor:
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return x

    def all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's rows (rank r has counts[r] of them), concatenated in rank order."""
        return x

    def reduce_scatter_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The sum over ranks of x [sum(counts), ...], this rank's counts[rank] rows of it."""
        return x

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def moe_dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(tokens this rank computes, their expert ids, a handle for moe_combine)."""
        return x, topk_ids, None

    def moe_combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return y


class TorchDistributed(Collectives):
    """The collectives through torch.distributed on `group` (None: the default group)."""

    def __init__(self, group: Any = None):
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistributed needs an initialised torch.distributed process group "
                               "(torchrun sets the environment; GLM52 calls init_process_group)")
        self.dist, self.group = dist, group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # While a step is being traced as a graph (engine/graph.py sets this), the collectives a decode step
    # makes are the functional ones (torch.distributed._functional_collectives): they return new tensors
    # and are recorded as graph nodes, where the in-place `dist.*` calls would run once and vanish.
    functional = False

    def _funcol(self):
        import torch.distributed._functional_collectives as funcol
        return funcol, (self.group if self.group is not None else self.dist.group.WORLD)

    def all_reduce(self, x):
        if self.world_size == 1:
            return x
        if self.functional:
            funcol, group = self._funcol()
            return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))
        x = x.contiguous()
        self.dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x, dim=0):
        if self.world_size == 1:
            return x
        if self.functional:
            funcol, group = self._funcol()
            return funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), dim, group))
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x, dim=0):
        if self.world_size == 1:
            return x
        if x.shape[dim] % self.world_size:
            raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} does not split over "
                             f"{self.world_size} ranks")
        x = self.all_reduce(x.clone())   # gloo has no reduce_scatter: sum, then keep this rank's slice
        return x.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def all_to_all(self, x, in_splits=None, out_splits=None):
        if self.world_size == 1:
            return x
        if in_splits is None:
            if x.shape[0] % self.world_size:
                raise ValueError(f"all_to_all: {x.shape[0]} rows do not split over {self.world_size} ranks; "
                                 "pass in_splits")
            in_splits = [x.shape[0] // self.world_size] * self.world_size
        if out_splits is None:   # learn what every rank sends here
            counts = torch.tensor(list(in_splits), dtype=torch.int64)
            got = [torch.empty_like(counts) for _ in range(self.world_size)]
            self.dist.all_gather(got, counts, group=self.group)
            out_splits = [int(g[self.rank]) for g in got]
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        self.dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=self.group)
        return out

    def broadcast(self, x, src=0):
        if self.world_size == 1:
            return x
        x = x.contiguous()
        self.dist.broadcast(x, src=self.dist.get_global_rank(self.group, src) if self.group is not None else src,
                            group=self.group)
        return x

    def all_gather_rows(self, x, counts):
        if self.world_size == 1:
            return x
        n = max(counts)
        parts = self.all_gather(_pad_rows(x, n)[None], dim=0)              # [W, n, ...] (equal sizes)
        return torch.cat([parts[r, :c] for r, c in enumerate(counts)])

    def reduce_scatter_rows(self, x, counts):
        if self.world_size == 1:
            return x
        x = self.all_reduce(x.clone())
        start = sum(counts[:self.rank])
        return x[start:start + counts[self.rank]].contiguous()

    def all_gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[0] == n else torch.cat([x, x.new_zeros((n - x.shape[0],) + tuple(x.shape[1:]))])


def default_collectives() -> Collectives:
    """torch.distributed's when a process group of more than one rank is up, else one device."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    return Collectives()
