"""The emulator's MC2 ops: `npu_moe_distribute_dispatch_v2` and `npu_moe_distribute_combine_v2`.

They are collectives: on an NPU the pair moves each (token, expert) row to the card that holds the
expert and the experts' outputs back, inside HCCL's buffer. Here they run over a torch.distributed
process group (gloo on the CPU) registered under a name, as HCCL's are known by their comm name
(`group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)` on a device;
`NpuEmulator.register_group(group)` here). Every rank all-gathers what the op's alltoallv would
send it and keeps its part: the values are the documented ones, not the traffic.

Source: the doc pages torch_npu-npu_moe_distribute_dispatch_v2.md / _combine_v2.md (Ascend/op-plugin,
docs/zh/custom_APIs/torch_npu), Atlas A3 columns (the 910C of configs/ascend-910c.yaml), and the
wheel's meta registrations for the output shapes. Emulated: no TP domain (tp_world_size 0 or 1),
quant_mode=0, no shared-expert cards, no special experts, comm_alg "" / "fullmesh_v1", a 1-D
x_active_mask. The rest is rejected as not emulated.

Layout of the outputs whose values the docs leave to the implementation ("模型其他业务逻辑不应对其存在
依赖": only the pair should read them): expand_x holds this card's rows grouped by local expert, within
an expert by source card, then token, then slot; rows past the received ones are NaN (unspecified on
the device). ep_recv_counts is the running count over (local expert, source card); assist_info_for_combine
holds (source card, token, slot) in the first three of each row's 128 entries, -1 elsewhere. combine's
rows for tokens outside x_active_mask are NaN (the docs do not say what the device leaves there).
"""

from __future__ import annotations

import torch

from .npu_errors import NpuOpError, _check, _not_emulated

# 约束说明 / 参数说明, Atlas A3
MC2_H_RANGE = (1024, 8192)          # H
MC2_MAX_BS = 512                    # BS, comm_alg "" / "fullmesh_v1"
MC2_MAX_K = 16                      # K
MC2_EP_RANGE = (2, 768)             # ep_world_size
MC2_MAX_EXPERTS = 1024              # moe_expert_num
MC2_MAX_EXPERT_SLOTS = 2048         # local_expert_num * ep_world_size
MC2_ASSIST_WIDTH = 128              # assist_info_for_combine: A * 128 entries
MC2_DTYPES = (torch.bfloat16, torch.float16)
HCCL_BUFFSIZE_DEFAULT_MB = 200      # 约束说明 "HCCL通信域缓存区大小 ... 不配置时默认为200MB"


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def mc2_buffer_bytes(local: int, max_bs: int, W: int, K: int, H: int, shared_expert_num: int = 0) -> int:
    """约束说明, Atlas A3, EP domain, comm_alg "" / "fullmesh_v1": the HCCL buffer the pair needs,
    2 * (local_expert_num * max_bs * ep_world_size * Align512(Align32(2H) + 64)
         + (K + shared_expert_num) * max_bs * Align512(2H))."""
    return 2 * (local * max_bs * W * _align(_align(2 * H, 32) + 64, 512) + (K + shared_expert_num) * max_bs
                * _align(2 * H, 512))


def hccl_buffer_mb() -> int:
    """HCCL_BUFFSIZE (MB per communicator), CANN's default 200 when unset."""
    import os
    raw = os.environ.get("HCCL_BUFFSIZE", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else HCCL_BUFFSIZE_DEFAULT_MB


def _fail(op: str, msg: str) -> NpuOpError:
    return NpuOpError(f"{op}: {msg}")


def _gather(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """[world, *t.shape]: every rank's t (same shape everywhere), bit-exact for 2-byte floats."""
    import torch.distributed as dist
    src = t.contiguous()
    raw = src.view(torch.uint8) if src.dtype in (torch.bfloat16, torch.float16) else src   # gloo: bytes
    out = [torch.empty_like(raw) for _ in range(world)]
    dist.all_gather(out, raw, group=group)
    got = torch.stack(out)
    return got.view(src.dtype) if got.dtype != src.dtype else got


class Mc2Emulation:
    """Mixed into `NpuEmulator` (which wraps each `npu_*` method as a device kernel)."""

    def register_group(emu, group) -> str:
        """The name the MC2 ops know `group` by (HCCL's comm name on a device); None: the default group."""
        import torch.distributed as dist
        group = group if group is not None else dist.group.WORLD
        groups = emu.__dict__.setdefault("_mc2_groups", {})
        for name, g in groups.items():
            if g is group:
                return name
        name = f"emulated_hccl_{len(groups)}"
        groups[name] = group
        return name

    def _mc2_common(emu, op, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, x_active_mask,
                    group_tp, tp_world_size, expert_shard_type, shared_expert_num, shared_expert_rank_num,
                    global_bs, comm_alg, zero_expert_num, copy_expert_num, const_expert_num, elastic_info,
                    performance_info):
        """The checks dispatch and combine share; returns (group, local_expert_num)."""
        import torch.distributed as dist
        _check(isinstance(group_ep, str) and 1 <= len(group_ep) < 128, op,
               f"group_ep must be a comm name of length [1, 128), got {group_ep!r}")
        group = emu.__dict__.get("_mc2_groups", {}).get(group_ep)
        _check(group is not None, op, f"group_ep {group_ep!r} is not a communication domain of this process")
        _check(MC2_EP_RANGE[0] <= ep_world_size <= MC2_EP_RANGE[1], op,
               f"ep_world_size must be in [2, 768] (Atlas A3), got {ep_world_size}")
        _check(ep_world_size == dist.get_world_size(group), op,
               f"ep_world_size {ep_world_size} is not the size {dist.get_world_size(group)} of group_ep {group_ep!r}")
        _check(0 <= ep_rank_id < ep_world_size, op,
               f"ep_rank_id should be in [0, ep_world_size), got ep_world_size={ep_world_size}, ep_rank_id={ep_rank_id}")
        _check(ep_rank_id == dist.get_rank(group), op,
               f"ep_rank_id {ep_rank_id} is not this card's rank {dist.get_rank(group)} in group_ep")
        if tp_world_size == 2 or group_tp:
            raise _not_emulated(op, "a TP domain (tp_world_size=2, group_tp)")
        _check(tp_world_size in (0, 1), op, f"tp_world_size must be in [0, 2], got {tp_world_size}")
        _check(expert_shard_type == 0, op, f"expert_shard_type supports only 0 (Atlas A3), got {expert_shard_type}")
        _check(0 <= shared_expert_rank_num < ep_world_size, op,
               f"shared_expert_rank_num should be in [0, ep_world_size), got {shared_expert_rank_num}")
        if shared_expert_rank_num:
            raise _not_emulated(op, "shared-expert cards (shared_expert_rank_num > 0)")
        _check(shared_expert_num in (0, 1), op,
               f"shared expert setting invalid, got shared_expert_num={shared_expert_num}, shared_expert_rank_num=0")
        _check(1 <= moe_expert_num <= MC2_MAX_EXPERTS, op, f"moe_expert_num must be in [1, 1024], got {moe_expert_num}")
        _check(moe_expert_num % ep_world_size == 0, op,
               f"moe_expert_num % (ep_world_size - shared_expert_rank_num) must be 0, got {moe_expert_num} % "
               f"{ep_world_size}")
        local = moe_expert_num // ep_world_size
        _check(local * ep_world_size <= MC2_MAX_EXPERT_SLOTS, op,
               f"local_expert_num * ep_world_size must be <= 2048 (Atlas A3), got {local * ep_world_size}")
        if zero_expert_num or copy_expert_num or const_expert_num:
            raise _not_emulated(op, "special experts (zero / copy / const)")
        if comm_alg not in ("", "fullmesh_v1"):
            _check(comm_alg in ("fullmesh_v2", "hierarchy"), op,
                   f"comm_alg must be '', 'fullmesh_v1', 'fullmesh_v2' or 'hierarchy' (Atlas A3), got {comm_alg!r}")
            raise _not_emulated(op, f"comm_alg={comm_alg!r}")
        if elastic_info is not None:
            raise _fail(op, "elastic_info is reserved (预留参数): pass None")
        if performance_info is not None:
            raise _not_emulated(op, "performance_info")
        _check(global_bs >= 0 and global_bs % ep_world_size == 0, op,
               f"global_bs must be 0 or max_bs * ep_world_size, got {global_bs} (ep_world_size {ep_world_size})")
        _check(expert_ids.dim() == 2 and expert_ids.dtype == torch.int32, op,
               f"expert_ids must be 2-D (BS, K) int32, got {tuple(expert_ids.shape)} {expert_ids.dtype}")
        BS, K = expert_ids.shape
        _check(0 < BS <= MC2_MAX_BS, op, f"BS must be in (0, 512] (comm_alg '' / fullmesh_v1), got {BS}")
        _check(0 < K <= min(MC2_MAX_K, moe_expert_num), op, f"K must be in (0, 16] and <= moe_expert_num, got {K}")
        _check(bool(((expert_ids >= 0) & (expert_ids < moe_expert_num)).all()), op,
               f"expert_ids values must be in [0, moe_expert_num={moe_expert_num})")
        _check(bool((expert_ids.sort(1).values.diff(dim=1) != 0).all()), op,
               "the K values in one row of expert_ids must not repeat")
        if x_active_mask is not None:
            _check(x_active_mask.dtype == torch.bool, op, f"x_active_mask must be bool, got {x_active_mask.dtype}")
            if x_active_mask.dim() == 2:
                raise _not_emulated(op, "a 2-D x_active_mask")
            _check(tuple(x_active_mask.shape) == (BS,), op,
                   f"x_active_mask must be (BS={BS},), got {tuple(x_active_mask.shape)}")
            _check(bool((x_active_mask[1:].int() <= x_active_mask[:-1].int()).all()), op,
                   "x_active_mask: every true must come before every false")
        return group, local

    def _mc2_sizes(emu, op, group, W, BS, K, local, global_bs, x_active_mask):
        """(max_bs, A, every card's active token count [W]) after agreeing the batch sizes."""
        n_active = int(x_active_mask.sum()) if x_active_mask is not None else BS
        sizes = _gather(torch.tensor([BS, n_active]), group, W)                        # [W, 2]
        if global_bs == 0:
            _check(bool((sizes[:, 0] == BS).all()), op,
                   f"global_bs=0 needs the same BS on every card, got {sizes[:, 0].tolist()}: pass max_bs * ep_world_size")
            max_bs = BS
        else:
            max_bs = global_bs // W
            _check(bool((sizes[:, 0] <= max_bs).all()), op,
                   f"global_bs {global_bs} / ep_world_size is below a card's BS {sizes[:, 0].tolist()}")
        if not bool((sizes[:, 0] == sizes[0, 0]).all()):
            _check(bool((sizes[:, 1] == sizes[:, 0]).all()), op,
                   "when the cards' BS differ every token must be active (x_active_mask all true)")
        return max_bs, max_bs * W * min(local, K), sizes[:, 1]

    def npu_moe_distribute_dispatch_v2(emu, x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                       scales=None, x_active_mask=None, expert_scales=None, elastic_info=None,
                                       performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                       expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
                                       quant_mode=0, global_bs=0, expert_token_nums_type=1, comm_alg="",
                                       zero_expert_num=0, copy_expert_num=0, const_expert_num=0, y_dtype=None,
                                       x_dtype=None, scales_dtype=None):
        op = "npu_moe_distribute_dispatch_v2"
        group, local = emu._mc2_common(op, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num,
                                       x_active_mask, group_tp, tp_world_size, expert_shard_type, shared_expert_num,
                                       shared_expert_rank_num, global_bs, comm_alg, zero_expert_num, copy_expert_num,
                                       const_expert_num, elastic_info, performance_info)
        dtypes = MC2_DTYPES + ((torch.float32,) if emu.allow_float32 else ())
        _check(x.dim() == 2 and x.dtype in dtypes, op,
               f"x must be 2-D (BS, H) bfloat16 or float16, got {tuple(x.shape)} {x.dtype}")
        BS, H = x.shape
        _check(expert_ids.shape[0] == BS, op, f"expert_ids has {expert_ids.shape[0]} rows, x has {BS}")
        _check(MC2_H_RANGE[0] <= H <= MC2_H_RANGE[1], op, f"H must be in [1024, 8192] (Atlas A3), got {H}")
        _check(quant_mode in (0, 2), op, f"quant_mode supports 0 (none) and 2 (dynamic), got {quant_mode}")
        if quant_mode == 2 or scales is not None:
            raise _not_emulated(op, "quant_mode=2 / scales (dynamic int8 dispatch)")
        if expert_scales is not None:
            raise _fail(op, "expert_scales is not supported with comm_alg '' / 'fullmesh_v1' on Atlas A3: pass None")
        if y_dtype is not None or x_dtype is not None or scales_dtype is not None:
            raise _not_emulated(op, "y_dtype / x_dtype / scales_dtype")
        _check(expert_token_nums_type in (0, 1), op, "the expert_token_nums_type should be 0 or 1")
        W, K = ep_world_size, expert_ids.shape[1]
        max_bs, A, n_active = emu._mc2_sizes(op, group, W, BS, K, local, global_bs, x_active_mask)
        need = mc2_buffer_bytes(local, max_bs, W, K, H)
        _check(need <= hccl_buffer_mb() * 2 ** 20, op,
               f"the HCCL buffer of group_ep must hold {need / 2 ** 20:.1f} MB for max_bs {max_bs} (约束说明); "
               f"HCCL_BUFFSIZE is {hccl_buffer_mb()} MB")
        # 功能说明 (quant_mode 0): expand_x = alltoallv(x): every active (token, slot) row to its expert's card
        pad = max_bs - BS
        xs = _gather(torch.cat([x, x.new_zeros(pad, H)]) if pad else x, group, W)                  # [W, max_bs, H]
        ids = _gather(torch.cat([expert_ids, expert_ids.new_zeros(pad, K)]) if pad else expert_ids, group, W)
        src, tok, slot = torch.meshgrid(torch.arange(W), torch.arange(max_bs), torch.arange(K), indexing="ij")
        e = ids.long() - ep_rank_id * local                                                         # local expert
        mine = (e >= 0) & (e < local) & (tok < n_active[:, None, None])
        e, src, tok, slot = e[mine], src[mine], tok[mine], slot[mine]
        order = torch.argsort((e * W + src) * (max_bs * K) + tok * K + slot)       # expert, card, token, slot
        e, src, tok, slot = e[order], src[order], tok[order], slot[order]
        n = e.numel()
        expand_x = torch.full((A, H), float("nan"), dtype=x.dtype)                  # meta: (max(tp, 1) * A, H)
        expand_x[:n] = xs[src, tok]
        counts = torch.bincount(e, minlength=local)                                  # per local expert
        expert_token_nums = (counts if expert_token_nums_type == 1 else counts.cumsum(0)).to(torch.int64)
        ep_recv_counts = torch.bincount(e * W + src, minlength=local * W).cumsum(0).to(torch.int32)   # (W*local,)
        assist = torch.full((max(BS * K, A * MC2_ASSIST_WIDTH),), -1, dtype=torch.int32)
        at = torch.arange(n) * MC2_ASSIST_WIDTH
        assist[at], assist[at + 1], assist[at + 2] = src.int(), tok.int(), slot.int()
        dynamic_scales = torch.full((A,), float("nan"), dtype=torch.float32)         # meta: (A,) for quant_mode 0
        tp_recv_counts = torch.zeros(tp_world_size, dtype=torch.int32)               # meta: (tp_world_size,)
        expand_scales = torch.empty(0, dtype=torch.float32)                          # meta: (0,) without expert_scales
        return expand_x, dynamic_scales, assist, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales

    def npu_moe_distribute_combine_v2(emu, expand_x, expert_ids, assist_info_for_combine, ep_send_counts,
                                      expert_scales, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                      tp_send_counts=None, x_active_mask=None, expand_scales=None, shared_expert_x=None,
                                      elastic_info=None, ori_x=None, const_expert_alpha_1=None,
                                      const_expert_alpha_2=None, const_expert_v=None, performance_info=None,
                                      group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                                      shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, comm_quant_mode=0,
                                      comm_alg="", zero_expert_num=0, copy_expert_num=0, const_expert_num=0):
        op = "npu_moe_distribute_combine_v2"
        group, local = emu._mc2_common(op, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num,
                                       x_active_mask, group_tp, tp_world_size, expert_shard_type, shared_expert_num,
                                       shared_expert_rank_num, global_bs, comm_alg, zero_expert_num, copy_expert_num,
                                       const_expert_num, elastic_info, performance_info)
        dtypes = MC2_DTYPES + ((torch.float32,) if emu.allow_float32 else ())
        _check(expand_x.dim() == 2 and expand_x.dtype in dtypes, op,
               f"expand_x must be 2-D (A, H) bfloat16 or float16, got {tuple(expand_x.shape)} {expand_x.dtype}")
        BS, K = expert_ids.shape
        W, (A, H) = ep_world_size, expand_x.shape
        _check(MC2_H_RANGE[0] <= H <= MC2_H_RANGE[1], op, f"H must be in [1024, 8192] (Atlas A3), got {H}")
        _check(expert_scales is not None and expert_scales.dtype == torch.float32
               and tuple(expert_scales.shape) == (BS, K), op,
               f"expert_scales must be float32 (BS={BS}, K={K}), got "
               f"{None if expert_scales is None else (tuple(expert_scales.shape), expert_scales.dtype)}")
        _check(assist_info_for_combine.dtype == torch.int32 and assist_info_for_combine.dim() == 1
               and assist_info_for_combine.numel() >= A * MC2_ASSIST_WIDTH, op,
               f"assist_info_for_combine must be int32 (A * 128 = {A * MC2_ASSIST_WIDTH},), dispatch_v2's output")
        _check(ep_send_counts.dtype == torch.int32 and tuple(ep_send_counts.shape) == (W * local,), op,
               f"ep_send_counts must be int32 (ep_world_size * local_expert_num = {W * local},) on Atlas A3, "
               f"dispatch_v2's ep_recv_counts; got {tuple(ep_send_counts.shape)} {ep_send_counts.dtype}")
        if tp_send_counts is not None:
            _check(tp_send_counts.numel() == tp_world_size, op, "tp_send_counts must be (tp_world_size,)")
        if shared_expert_x is not None:
            raise _fail(op, "shared_expert_x is used only with shared-expert cards (shared_expert_rank_num > 0)")
        if ori_x is not None or const_expert_alpha_1 is not None or const_expert_alpha_2 is not None \
                or const_expert_v is not None:
            raise _not_emulated(op, "ori_x / const_expert_* (special experts)")
        if expand_scales is not None and expand_scales.numel():
            raise _fail(op, "expand_scales is not supported with comm_alg '' on Atlas A3: pass None")
        _check(comm_quant_mode in (0, 2), op, f"comm_quant_mode supports 0 and 2, got {comm_quant_mode}")
        if comm_quant_mode == 2:
            raise _not_emulated(op, "comm_quant_mode=2 (int8 communication)")
        max_bs, A_expected, _ = emu._mc2_sizes(op, group, W, BS, K, local, global_bs, x_active_mask)
        _check(A == A_expected, op, f"expand_x must have A = {A_expected} rows (dispatch_v2's), got {A}")
        # 功能说明: x = Sum(expert_scales * AlltoAllv(expand_x)): each row back to its token's card
        n = int(ep_send_counts[-1])
        ys = _gather(expand_x, group, W)                                                    # [W, A, H]
        info = _gather(assist_info_for_combine[:A * MC2_ASSIST_WIDTH].view(A, MC2_ASSIST_WIDTH)[:, :3], group, W)
        rows = _gather(torch.tensor([n]), group, W)[:, 0]
        card = torch.arange(A)[None, :] < rows[:, None]                                     # [W, A]
        back = card & (info[..., 0] == ep_rank_id)
        y, meta = ys[back].float(), info[back].long()
        out = torch.zeros(BS, H, dtype=torch.float32)
        out.index_add_(0, meta[:, 1], y * expert_scales.float()[meta[:, 1], meta[:, 2]][:, None])
        if x_active_mask is not None:
            out[~x_active_mask] = float("nan")       # not said by the docs: left unspecified here
        return out.to(expand_x.dtype)                                              # meta: (BS, H), expand_x's dtype


__all__ = ["Mc2Emulation"]
