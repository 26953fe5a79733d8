"""Setting up one rank of a parallel plan: the process group, the device, this rank's layout.

`GLM52(..., tp=, dp=, ep=, dcp=)` calls `setup(plan, ...)`: inside torchrun (RANK / WORLD_SIZE /
MASTER_ADDR in the environment) it initialises the default process group itself when the caller
has not (`collective`: nccl / hccl / gloo; default by device type), checks that the world equals
the plan, and picks the rank's device (`cuda:LOCAL_RANK`, `npu:LOCAL_RANK`, or the CPU).
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..ops.comm import TorchDistributed
from ..parallel import LayoutError, ParallelPlan, RankLayout, env_int, launched_world

DEFAULT_COLLECTIVE = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
TIMEOUT_ENV = "GLM52_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0          # a dead or stopped rank fails the others by then (torch's own default: 30 min)


def collective_timeout() -> datetime.timedelta:
    """The timeout of every process group this package makes (the default group and each tp / dp group):
    `GLM52_COLLECTIVE_TIMEOUT_S` seconds, default 300. A value that is not a positive finite number is
    refused naming the variable."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0 or v > 86400 * 365:
        raise LayoutError(f"{TIMEOUT_ENV}={text!r}: must be a positive number of seconds, at most a year "
                          f"(31536000; default {DEFAULT_TIMEOUT_S:g}): how long a rank waits for a stopped one "
                          f"before failing")
    return datetime.timedelta(seconds=v)


def launch_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of a torchrun launch, MASTER_PORT and LOCAL_RANK checked too: each refused
    naming the variable, before torch.distributed reads them (it fails with C++ backtraces)."""
    world = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0, world - 1)
    env_int("MASTER_PORT", 1, 65535)
    if os.environ.get("LOCAL_RANK", "").strip():
        env_int("LOCAL_RANK", 0, world - 1)
    return rank, world


def check_world(plan: ParallelPlan) -> None:
    """A plan for one process under a launch of several is refused: every rank would run the whole model
    on its own (and print), exiting 0 (the layout must come from --tp/--dp/--ep or the deployment)."""
    world = launched_world()
    if plan.world_size != world:
        raise LayoutError(f"this process is one of WORLD_SIZE={world} launched processes, but the parallel plan "
                          f"(tp={plan.tp}, dp={plan.dp}, ep={plan.ep}) needs {plan.world_size}: give the layout "
                          f"(--tp / --dp / --ep, or a deployment's parallel section) with tp x dp = {world}, or "
                          f"launch {plan.world_size} process(es)")


def init_process_group(device_type: str, collective: str | None = None) -> None:
    """The default process group from torchrun's environment, unless the caller made one."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LayoutError(f"a parallel plan needs torch.distributed: launch with torchrun (missing "
                          f"{', '.join(missing)} in the environment) or call init_process_group first")
    launch_env()
    timeout = collective_timeout()
    dist.init_process_group(collective or DEFAULT_COLLECTIVE.get(device_type, "gloo"), timeout=timeout)
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
    MoE dispatch/combine between dp groups), over the whole world (gathering results); `timeout`: the
    one every group is made with (`collective_timeout`), for groups a backend makes in `setup_parallel`."""
    tp: TorchDistributed
    dp: TorchDistributed
    world: TorchDistributed
    timeout: datetime.timedelta | None = None    # of every group; a backend's own groups take it too
    dcp: TorchDistributed | None = None          # dcp > 1: this rank's dcp group (consecutive tp ranks)


def setup(plan: ParallelPlan, cfg: ModelConfig, device: torch.device, collective: str | None = None
          ) -> tuple[RankLayout, torch.device, Comms]:
    """(this rank's layout, its device, its collectives). Every rank creates every group, in the
    same order (torch.distributed requires it)."""
    import torch.distributed as dist
    timeout = collective_timeout()       # checked before anything waits on another rank
    init_process_group(device.type, collective)
    plan.validate(cfg, fp8_block=cfg.fp8_block, world_size=dist.get_world_size())
    rank = dist.get_rank()
    if device.type in ("cuda", "npu") and device.index is None:
        local = env_int("LOCAL_RANK", 0, default=rank)
        device = torch.device(device.type, local)
        getattr(torch, device.type).set_device(device)
    layout = plan.layout(rank, cfg)
    # every group gets the timeout: a hung rank (SIGSTOP, a stuck kernel) fails the others after it, not
    # after torch's 30-minute default for groups made without one
    tp_groups = [dist.new_group(layout.tp_group_ranks(d), timeout=timeout) for d in range(plan.dp)]
    dp_groups = [dist.new_group(layout.dp_group_ranks(t), timeout=timeout) for t in range(plan.tp)]
    dcp = None
    if plan.dcp > 1:        # tp / dcp groups of dcp consecutive ranks in every tp group (parallel.RankLayout)
        D = plan.dcp
        dcp_groups = {(d, g): dist.new_group(layout.dcp_group_ranks(d, g), timeout=timeout)
                      for d in range(plan.dp) for g in range(plan.tp // D)}
        dcp = TorchDistributed(dcp_groups[layout.dp_rank, layout.tp_rank // D])
    comms = Comms(TorchDistributed(tp_groups[layout.dp_rank]), TorchDistributed(dp_groups[layout.tp_rank]),
                  TorchDistributed(), timeout, dcp)
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
    from .generation import GenerationResult
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
