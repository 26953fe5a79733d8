"""The parallel plan: how one model is laid out over `tp x dp` ranks (spec/distributed.md).

    plan = ParallelPlan(tp=4, ep=4)          # experts over 4 ranks; tp=4, ep=1: experts TP-split
    plan.validate(cfg)                       # names the number that does not divide
    layout = plan.layout(rank, cfg)          # this rank's coordinates and slices
    layout.slice_of(name, shape)             # what of checkpoint tensor `name` this rank holds

Rank order is (dp, tp) with tp fastest, as vLLM and SGLang number them. Placements come from THE
sharding table (`weights.SHARDING`): replicated tensors whole; column-split (q_b, kv_b, gate/up)
by output rows, row-split (o_proj, down) by input columns, vocabulary-split (embedding, lm_head)
by rows, over the tp ranks; routed experts whole over ep ranks (ep = tp x dp), or TP-split like a
dense MLP when ep = 1. Column/row splits of a block-FP8 weight must cut whole 128-blocks so each
rank's scales are whole rows/columns of the scale grid.

Decode context parallelism (`dcp`, dividing tp): the tp group's ranks form tp / dcp groups of dcp
consecutive ranks (tp ranks g*dcp .. g*dcp + dcp-1); within one, each rank stores 1/dcp of every
request's cache rows (position p on dcp rank p % dcp, ops/dcp.py has the layout and the merges), and
the ranks with the same dcp rank in different groups hold the same rows.

Layouts: tp >= 1 with ep = 1 (experts TP-split) or ep = tp (local experts: EP stage 1); dp > 1 splits
the requests over dp groups of tp ranks: with ep = 1 each group is a full replica; with ep = tp x dp
every rank's experts serve every group (EP stage 2), so every group steps in lockstep, idle ones with
no tokens (engine/turns.py: DpTurns.take / serve_idle; MTP draft steps included). With ep > 1 each tp
rank dispatches its slice of the step's tokens to the ranks owning their experts and combines the
results back (model._moe_dispatched, ops/comm.py moe_dispatch / moe_combine); a captured step (ep = tp;
dp > 1 is never captured) keeps the replicated form: all tokens on every rank, others' slots -1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .config import ConfigError, ModelConfig, setting
from .weights import placement


class LayoutError(ConfigError):
    """A parallel layout that does not fit the model or the world; the message names the number."""


@dataclass(frozen=True)
class ParallelPlan:
    tp: int = setting(1, "tensor-parallel ranks (torchrun --nproc-per-node tp x dp)", minimum=1)
    dp: int = setting(1, "data-parallel groups of tp ranks", minimum=1)
    ep: int = setting(1, "expert-parallel ranks: 1 (experts TP-split) or tp x dp", minimum=1)
    dcp: int = setting(1, "decode context parallelism: ranks of the tp group that split every request's "
                          "cache (divides tp)", minimum=1)

    def __post_init__(self):
        for k in ("tp", "dp", "ep", "dcp"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LayoutError(f"parallel plan: {k} must be a positive integer, got {v!r}")
        if self.tp % self.dcp:
            raise LayoutError(f"parallel plan: dcp = {self.dcp} must divide tp = {self.tp} (decode context "
                              f"parallelism splits the cache over ranks of one tp group)")

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @property
    def expert_shards(self) -> int:
        return self.ep if self.ep > 1 else self.tp

    def validate(self, cfg: ModelConfig, *, fp8_block: tuple[int, int] | None = None,
                 world_size: int | None = None) -> None:
        """Refuse a layout this model or world cannot take, naming the number that does not divide."""
        tp, ep = self.tp, self.ep
        if ep not in (1, self.world_size):
            raise LayoutError(f"parallel plan: ep = {ep} must be 1 (experts TP-split) or tp x dp = {self.world_size}")
        if world_size is not None and world_size != self.world_size:
            raise LayoutError(f"parallel plan tp={tp} x dp={self.dp} needs {self.world_size} processes, but the "
                              f"process group has {world_size}")
        checks = [("attention heads (num_attention_heads)", cfg.num_attention_heads, tp),
                  ("vocabulary (vocab_size)", cfg.vocab_size, tp)]
        if any(not cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
            checks.append(("dense MLP width (intermediate_size)", cfg.intermediate_size, tp))
        if cfg.n_shared_experts:
            checks.append(("shared expert width (moe_intermediate_size x n_shared_experts)",
                           cfg.moe_intermediate_size * cfg.n_shared_experts, tp))
        if ep > 1:
            checks.append(("routed experts (n_routed_experts)", cfg.n_routed_experts, ep))
        else:
            checks.append(("expert width (moe_intermediate_size)", cfg.moe_intermediate_size, tp))
        for what, n, parts in checks:
            if n % parts:
                raise LayoutError(f"parallel plan tp={tp} ep={ep}: {what} = {n} does not divide over {parts} ranks")
        if fp8_block is not None and tp > 1:
            b0, b1 = fp8_block      # rows (column-parallel cuts) in b0, columns (row-parallel cuts) in b1;
            H = cfg.num_attention_heads   # an MLP width is cut both ways (gate/up rows, down columns)
            cuts = [("q_b_proj rows per rank", H * cfg.qk_head_dim // tp, b0),
                    ("kv_b_proj rows per rank", H * (cfg.qk_nope_head_dim + cfg.v_head_dim) // tp, b0),
                    ("o_proj columns per rank", H * cfg.v_head_dim // tp, b1)]
            if any(not cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
                cuts.append(("dense MLP width per rank", cfg.intermediate_size // tp, math.lcm(b0, b1)))
            if cfg.n_shared_experts:
                cuts.append(("shared expert width per rank", cfg.moe_intermediate_size * cfg.n_shared_experts // tp,
                             math.lcm(b0, b1)))
            if ep == 1:
                cuts.append(("expert width per rank", cfg.moe_intermediate_size // tp, math.lcm(b0, b1)))
            for what, n, b in cuts:
                if n % b:
                    raise LayoutError(f"parallel plan tp={tp} ep={ep}: {what} = {n} is not a whole number of "
                                      f"{b}-wide FP8 blocks; use expert parallelism or a smaller tp")

    def layout(self, rank: int, cfg: ModelConfig) -> "RankLayout":
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside the plan's world of {self.world_size}")
        return RankLayout(self, rank, cfg.n_routed_experts)


@dataclass(frozen=True)
class RankLayout:
    """One rank's place in the plan and the slices of each tensor it holds."""
    plan: ParallelPlan
    rank: int
    n_experts: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.plan.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.plan.tp

    @property
    def dcp_rank(self) -> int:
        """This rank's place in its dcp group: it stores the cache rows of positions p with p % dcp == dcp_rank."""
        return self.tp_rank % self.plan.dcp

    def dcp_group_ranks(self, dp_rank: int, group: int) -> list[int]:
        """The global ranks of dcp group `group` (0 .. tp/dcp - 1) of tp group `dp_rank`: consecutive tp ranks."""
        D = self.plan.dcp
        return [dp_rank * self.plan.tp + group * D + i for i in range(D)]

    @property
    def dispatch(self) -> bool:
        """True when the MoE layers exchange tokens between dp groups (dp > 1 with ep = tp x dp)."""
        return self.plan.dp > 1 and self.plan.ep > 1

    def tp_group_ranks(self, dp_rank: int) -> list[int]:
        return [dp_rank * self.plan.tp + t for t in range(self.plan.tp)]

    def dp_group_ranks(self, tp_rank: int) -> list[int]:
        return [d * self.plan.tp + tp_rank for d in range(self.plan.dp)]

    def part(self, n: int, parts: int, index: int) -> tuple[int, int]:
        return n // parts * index, n // parts * (index + 1)

    @property
    def expert_range(self) -> tuple[int, int]:
        """[e0, e1): the routed experts this rank holds (all of them, TP-split, when ep = 1)."""
        if self.plan.ep == 1:
            return 0, self.n_experts
        return self.part(self.n_experts, self.plan.ep, self.rank)

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        return self.part(vocab, self.plan.tp, self.tp_rank)

    def slice_of(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None | str:
        """How much of checkpoint tensor `name` (full `shape`) this rank holds:
        "all" (replicated), None (a routed expert of another rank: never read), or (dim, start, stop)."""
        pl = placement(name)
        tp = self.plan.tp
        if pl.kind == "expert":
            e = int(name.split(".mlp.experts.")[1].split(".")[0])
            e0, e1 = self.expert_range
            if self.plan.ep > 1:
                return "all" if e0 <= e < e1 else None
            dim = 1 if name.endswith("down_proj.weight") else 0
            a, b = self.part(shape[dim], tp, self.tp_rank)
            return (dim, a, b) if tp > 1 else "all"
        if pl.kind == "replicated" or tp == 1:
            return "all"
        dim = pl.dim
        a, b = self.part(shape[dim], tp, self.tp_rank)
        return dim, a, b

    def local(self, name: str, t):
        """This rank's part of a whole tensor already in memory (load-then-slice; random weights)."""
        s = self.slice_of(name, tuple(t.shape))
        if s is None or s == "all":
            return None if s is None else t
        dim, a, b = s
        return t.narrow(dim, a, b - a)


# ---- the launch: torchrun's environment ------------------------------------------------------------
def env_int(name: str, low: int, high: int | None = None, default: int | None = None) -> int:
    """An integer from torchrun's environment in [low, high], refused naming the variable."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        if default is not None:
            return default
        raise LayoutError(f"{name} is not set in the environment (torchrun sets it)")
    try:
        v = int(text.strip())
    except ValueError:
        raise LayoutError(f"{name}={text!r} in the environment is not an integer (torchrun sets it; "
                          f"check the launcher)") from None
    if v < low or (high is not None and v > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise LayoutError(f"{name}={v} in the environment is outside {rng}")
    return v


def launched_world() -> int:
    """WORLD_SIZE of the launch this process belongs to (1 outside torchrun or an initialised group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if os.environ.get("WORLD_SIZE", "").strip():
        return env_int("WORLD_SIZE", 1)
    return 1
