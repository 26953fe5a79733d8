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
    moe_dispatch(x, topk_ids, topk_weights, experts_per_rank) / moe_combine(y, handle)
                                   expert parallelism: each token to the ranks owning its experts (once per
                                   rank, its other slots -1, ids made local), and the experts' weighted
                                   outputs back, summed per token (one device: the identity)
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

    def moe_dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     experts_per_rank: int, max_rows: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Expert parallelism over this group (rank r holds experts r*experts_per_rank ...): every token
        of x [T, Hd] reaches each rank owning one of its experts. Returns what this rank computes:
        (rows [m, Hd], their expert ids [m, K'] local to this rank, -1 where not computed here, their
        weights [m, K'] f32, a handle for `moe_combine`). The generic form sends a token once per rank
        (K' = K, the other ranks' slots -1); a fused form may send one row per (token, expert) pair
        (K' = 1, weight 1, the routing weights applied in its combine). `max_rows`: the most rows any
        rank passes in this call, the same number on every rank (None: not known), for forms that size
        fixed buffers by it (MC2's global_bs)."""
        return x, topk_ids, topk_weights, None

    def moe_combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """The weighted expert outputs y [m, Hd] of `moe_dispatch`'s rows back to their tokens, summed
        over the ranks that computed them: [T, Hd] in y's dtype."""
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
            # a non-negative dim: torch's functional all_gather mis-reshapes a negative one for a single row
            return funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), dim % x.dim(), group))
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

    def _exchange_counts(self, in_splits: list[int], device: torch.device) -> list[int]:
        """What every rank sends here, from what this rank sends each: one all_to_all of the counts, on
        the collective's device (HCCL and NCCL take no CPU tensors), read back once."""
        counts = torch.tensor(list(in_splits), dtype=torch.int64, device=device)
        got = torch.empty_like(counts)
        self.dist.all_to_all_single(got, counts, group=self.group)
        return [int(v) for v in got.tolist()]

    def all_to_all(self, x, in_splits=None, out_splits=None):
        if self.world_size == 1:
            return x
        if in_splits is None:
            if x.shape[0] % self.world_size:
                raise ValueError(f"all_to_all: {x.shape[0]} rows do not split over {self.world_size} ranks; "
                                 "pass in_splits")
            in_splits = [x.shape[0] // self.world_size] * self.world_size
        if out_splits is None:   # learn what every rank sends here
            out_splits = self._exchange_counts(in_splits, x.device)
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

    # ---- expert parallelism: dispatch and combine (the generic all-to-all form) --------------------
    sent_bytes = 0          # bytes this rank sent in dispatch and combine (all-to-all payloads)

    def moe_dispatch(self, x, topk_ids, topk_weights, experts_per_rank, max_rows=None):
        if self.world_size == 1:
            return x, topk_ids, topk_weights, None
        W, (T, K) = self.world_size, topk_ids.shape
        ids = topk_ids.long()
        owner = torch.where(ids >= 0, ids // experts_per_rank, -1)                      # [T, K]
        hit = torch.zeros(W, T, dtype=torch.bool, device=x.device)
        tok_of = torch.arange(T, device=x.device)[:, None].expand(T, K)
        valid = owner >= 0
        hit[owner[valid], tok_of[valid]] = True
        dst, tok = hit.nonzero(as_tuple=True)                 # rank-major: each rank's tokens in order
        in_splits = [int(v) for v in torch.bincount(dst, minlength=W).tolist()]
        out_splits = self._exchange_counts(in_splits, x.device)
        # int32 ids: HCCL's AIV-expanded all-to-all (HCCL_OP_EXPANSION_MODE=AIV) takes no int64
        local = torch.where(owner[tok] == dst[:, None], ids[tok] - dst[:, None] * experts_per_rank, -1).to(torch.int32)
        send = (x[tok], local, topk_weights[tok].float())
        self.sent_bytes += sum(t.numel() * t.element_size() for t in send)
        xr, idr, wr = (self.all_to_all(t, in_splits, out_splits) for t in send)
        return xr, idr, wr, (tok, in_splits, out_splits, T)

    def moe_combine(self, y, handle):
        if handle is None:
            return y
        tok, in_splits, out_splits, T = handle
        self.sent_bytes += y.numel() * y.element_size()
        back = self.all_to_all(y, out_splits, in_splits)                             # [sum(in_splits), Hd]
        out = torch.zeros((T,) + tuple(y.shape[1:]), dtype=torch.float32, device=y.device)
        out.index_add_(0, tok, back.float())
        return out.to(y.dtype)


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[0] == n else torch.cat([x, x.new_zeros((n - x.shape[0],) + tuple(x.shape[1:]))])


def default_collectives() -> Collectives:
    """torch.distributed's when a process group of more than one rank is up, else one device."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    return Collectives()
