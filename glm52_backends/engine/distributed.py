"""Setting up one rank of a parallel plan: the process group, the device, this rank's layout.

`GLM52(..., tp=, dp=, ep=)` calls `setup(plan, ...)`: inside torchrun (RANK / WORLD_SIZE /
MASTER_ADDR in the environment) it initialises the default process group itself when the caller
has not (`collective`: nccl / hccl / gloo; default by device type), checks that the world equals
the plan, and picks the rank's device (`cuda:LOCAL_RANK`, `npu:LOCAL_RANK`, or the CPU).
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..ops.comm import TorchDistributed
from ..parallel import LayoutError, ParallelPlan, RankLayout

DEFAULT_COLLECTIVE = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
TIMEOUT_S = float(os.environ.get("GLM52_COLLECTIVE_TIMEOUT_S", "300"))   # a dead rank fails the others by then


def init_process_group(device_type: str, collective: str | None = None) -> None:
    """The default process group from torchrun's environment, unless the caller made one."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LayoutError(f"a parallel plan needs torch.distributed: launch with torchrun (missing "
                          f"{', '.join(missing)} in the environment) or call init_process_group first")
    dist.init_process_group(collective or DEFAULT_COLLECTIVE.get(device_type, "gloo"),
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    atexit.register(_destroy_process_group)   # ours: torn down before the interpreter's threads are


def _destroy_process_group() -> None:
    """Destroy the process group this module made, at exit: left to the interpreter's teardown, a
    backend's threads may still be joinable and abort the process ("terminate called without an
    active exception") after every result was returned."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Comms:
    """The collectives this rank uses: over its tp group (the TP seams), over its dp group (the
    MoE dispatch/combine between dp groups), over the whole world (gathering results)."""
    tp: TorchDistributed
    dp: TorchDistributed
    world: TorchDistributed


def setup(plan: ParallelPlan, cfg: ModelConfig, device: torch.device, collective: str | None = None
          ) -> tuple[RankLayout, torch.device, Comms]:
    """(this rank's layout, its device, its collectives). Every rank creates every group, in the
    same order (torch.distributed requires it)."""
    import torch.distributed as dist
    init_process_group(device.type, collective)
    plan.validate(cfg, fp8_block=cfg.fp8_block, world_size=dist.get_world_size())
    rank = dist.get_rank()
    if device.type in ("cuda", "npu") and device.index is None:
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", rank)))
        getattr(torch, device.type).set_device(device)
    layout = plan.layout(rank, cfg)
    tp_groups = [dist.new_group(layout.tp_group_ranks(d)) for d in range(plan.dp)]
    dp_groups = [dist.new_group(layout.dp_group_ranks(t)) for t in range(plan.tp)]
    comms = Comms(TorchDistributed(tp_groups[layout.dp_rank]), TorchDistributed(dp_groups[layout.tp_rank]),
                  TorchDistributed())
    return layout, device, comms


# ---- data parallelism: requests split over dp groups, results gathered on every rank -----------------
def own_requests(n: int, layout: RankLayout) -> list[int]:
    """The request indices dp group `layout.dp_rank` serves: every dp-th one."""
    return list(range(layout.dp_rank, n, layout.plan.dp))


def gather_results(comms: Comms, layout: RankLayout, mine: dict[int, object], n: int) -> list[object]:
    """Every request's result on every rank, in request order (each tp group's rank 0 contributes)."""
    got = comms.world.all_gather_object((layout.tp_rank, mine))
    out: dict[int, object] = {}
    for tp_rank, part in got:
        if tp_rank == 0:
            out.update(part)
    missing = [i for i in range(n) if i not in out]
    if missing:
        raise RuntimeError(f"data-parallel gather: no dp group returned requests {missing[:5]}")
    return [out[i] for i in range(n)]


def forward_dp(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """`GLM52(prompts)` with dp > 1: each dp group runs its share, idle groups join the MoE steps."""
    mine_idx = own_requests(len(prompts), model.layout)
    cache = model.new_cache(sum(len(prompts[i]) + model.block_size for i in mine_idx) or 1)
    mine: dict[int, torch.Tensor] = {}
    if mine_idx:
        out = model.extend(cache, {i: prompts[i] for i in mine_idx})
        mine = {i: out[i].cpu() for i in mine_idx}
    if model.turns is not None:
        model.turns.serve_idle(cache)
    return [t.to(model.device) for t in gather_results(model.comms, model.layout, mine, len(prompts))]


def generate_dp(model, prompts: list[list[int]], run, **kwargs):
    """`GLM52.generate` with dp > 1: `run(model, own_prompts, **kwargs)` on this dp group's share,
    then the tokens of every request gathered on every rank."""
    from .decoding import GenerationResult
    mine_idx = own_requests(len(prompts), model.layout)
    res = run(model, [prompts[i] for i in mine_idx], **kwargs) if mine_idx else None
    if model.turns is not None:
        model.turns.serve_idle(model.new_cache(1, mtp=True))  # empty steps write nothing; MTP layers exist
    mine = {i: (toks, why) for i, toks, why in zip(mine_idx, res.tokens, res.finish_reasons)} if res else {}
    both = gather_results(model.comms, model.layout, mine, len(prompts))
    tokens, reasons = [t for t, _ in both], [w for _, w in both]
    stats = dict(res.stats) if res is not None else {"backend": model.backend_name,
                                                     "ops": model.ops.ran_natively()}
    stats.update(requests=len(prompts), new_tokens=sum(len(t) for t in tokens), dp=model.plan.dp,
                 dp_group_requests=len(mine_idx))
    text = [model.tokenizer.decode(t) for t in tokens] if model.tokenizer is not None else None
    return GenerationResult(tokens, stats, text, reasons)
