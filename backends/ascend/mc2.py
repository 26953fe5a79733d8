"""Expert parallelism on Ascend through MC2: `npu_moe_distribute_dispatch_v2` / `_combine_v2`.

`AscendBackend.setup_parallel` returns `Mc2Collectives` when the layout has ep > 1: the model's
`moe_dispatch` / `moe_combine` (ops/comm.py) then run as the fused pair vllm-ascend uses
(`TokenDispatcherWithMC2`), on a process group of its own (the docs allow no other op in MC2's
communication domain). The v2 pair, because GLM-5.2's hidden size 6144 is outside v1's A3 range.

    dispatch   each active (token, expert) row of this rank's token slice goes to the card holding the
               expert; the card gets its rows grouped by local expert and their counts
    experts    the backend's moe_experts on those rows, one local expert per row, weight 1
    combine    the rows back to their tokens, each times its routing weight (`expert_scales`), summed

Called without a TP domain (tp_world_size=0): the model splits a step's tokens over the tp ranks
before dispatch, and every rank of the world is one EP card. Every rank passes the same number of
rows (`max_rows`, the step's largest tp slice, padded with inactive rows named by `x_active_mask`),
so BS > 0 on every card even at batch 1 with tp 8, and `global_bs` is max_bs * ep_world_size.

Outside the documented Atlas A3 limits (H in [1024, 8192], BS <= 512, K <= 16, at most 1024 experts,
local experts x cards <= 2048, and the HCCL buffer the doc's formula asks for within HCCL_BUFFSIZE:
about 6.4 MB per token per card for GLM-5.2 at ep16, so 31 tokens per card at the default 200 MB)
a call takes the generic all-to-all dispatch (ops/comm.py) instead;
the decision depends on shapes every rank shares, so all ranks take the same path. One host read
per call remains: the number of rows received, to size the grouped GEMMs (as the generic form
reads its split counts).
"""

from __future__ import annotations

import torch

from glm52_backends.ops.comm import TorchDistributed

from .emulator_mc2 import (MC2_EP_RANGE, MC2_H_RANGE, MC2_MAX_BS, MC2_MAX_EXPERT_SLOTS, MC2_MAX_EXPERTS, MC2_MAX_K,
                           hccl_buffer_mb, mc2_buffer_bytes)


def comm_name(npu, group, rank: int) -> str:
    """HCCL's name of `group` (what the MC2 ops take as group_ep); the emulator's registered name."""
    if getattr(npu, "emulated", False):
        return npu.register_group(group)
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


def mc2_fits(hidden: int, rows: int, k: int, experts: int, cards: int) -> str | None:
    """None when the documented A3 limits admit the call, else the reason they do not."""
    if not MC2_H_RANGE[0] <= hidden <= MC2_H_RANGE[1]:
        return f"hidden size {hidden} outside [1024, 8192]"
    if not 0 < rows <= MC2_MAX_BS:
        return f"{rows} tokens per card outside (0, 512]"
    if not 0 < k <= min(MC2_MAX_K, experts):
        return f"top-k {k} outside (0, 16]"
    if not (MC2_EP_RANGE[0] <= cards <= MC2_EP_RANGE[1] and experts <= MC2_MAX_EXPERTS and experts % cards == 0
            and experts <= MC2_MAX_EXPERT_SLOTS):
        return f"{experts} experts over {cards} cards outside the documented ranges"
    need = mc2_buffer_bytes(experts // cards, rows, cards, k, hidden)
    if need > hccl_buffer_mb() * 2 ** 20:
        return f"{rows} tokens per card need a {need / 2 ** 20:.0f} MB HCCL buffer, HCCL_BUFFSIZE is {hccl_buffer_mb()} MB"
    return None


class Mc2Collectives(TorchDistributed):
    """The generic collectives over every rank (`generic`), with expert dispatch and combine through MC2
    on `group` (a process group over the same ranks, kept for MC2 alone)."""

    def __init__(self, npu, group, generic: TorchDistributed):
        super().__init__(group)
        self.npu, self.generic = npu, generic
        self.name = comm_name(npu, group if group is not None else self.dist.group.WORLD, self.rank)
        self.calls = 0            # dispatches that went through MC2
        self.fallbacks: dict[str, int] = {}

    def moe_dispatch(self, x, topk_ids, topk_weights, experts_per_rank, max_rows=None):
        W, (T, K) = self.world_size, topk_ids.shape
        E = experts_per_rank * W
        rows = max(max_rows if max_rows is not None else T, 1)
        # the choice depends only on what every rank shares (shapes, max_rows), never on this rank's values:
        # ranks taking different paths would wait on each other forever. (topk_ids are the router's: K
        # distinct experts per token, no unused -1 slot, which MC2 does not take.)
        why = mc2_fits(x.shape[1], rows, K, E, W) if max_rows is not None else "no agreed row count"
        if why is not None:
            self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
            xr, idr, wr, h = self.generic.moe_dispatch(x, topk_ids, topk_weights, experts_per_rank)
            return xr, idr, wr, ("generic", h)
        self.calls += 1
        pad = rows - T
        ids = topk_ids.to(torch.int32)
        if pad:   # inactive rows: any K distinct valid ids (not sent: x_active_mask)
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
            ids = torch.cat([ids, torch.arange(K, dtype=torch.int32, device=ids.device).expand(pad, K)])
        active = torch.arange(rows, device=x.device) < T
        expand_x, _, assist, counts, ep_recv, tp_recv, _ = self.npu.npu_moe_distribute_dispatch_v2(
            x.contiguous(), ids.contiguous(), self.name, W, self.rank, E, x_active_mask=active,
            shared_expert_num=0, shared_expert_rank_num=0, quant_mode=0, global_bs=rows * W,
            expert_token_nums_type=1)
        n = int(counts.sum())                                     # the one host read: rows received here
        local = torch.repeat_interleave(torch.arange(experts_per_rank, device=x.device), counts.long(),
                                        output_size=n)[:, None]
        scales = topk_weights.float()
        if pad:
            scales = torch.cat([scales, scales.new_zeros(pad, K)])
        self.sent_bytes += T * K * x.shape[1] * x.element_size()            # one row per (token, expert)
        handle = ("mc2", (assist, ep_recv, tp_recv, ids, scales.contiguous(), active, expand_x.shape[0], T, rows, E))
        return expand_x[:n], local, torch.ones(n, 1, dtype=torch.float32, device=x.device), handle

    def moe_combine(self, y, handle):
        kind, h = handle
        if kind == "generic":
            return self.generic.moe_combine(y, h)
        assist, ep_recv, tp_recv, ids, scales, active, A, T, rows, E = h
        self.sent_bytes += y.shape[0] * y.shape[1] * y.element_size()
        full = torch.cat([y, y.new_zeros(A - y.shape[0], y.shape[1])]) if y.shape[0] < A else y
        out = self.npu.npu_moe_distribute_combine_v2(
            full.contiguous(), ids, assist, ep_recv, scales, self.name, self.world_size, self.rank, E,
            tp_send_counts=tp_recv, x_active_mask=active, shared_expert_num=0, shared_expert_rank_num=0,
            global_bs=rows * self.world_size)
        return out[:T]
