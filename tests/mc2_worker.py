"""One rank of an MC2 test run (tests/test_ascend_mc2.py starts W of these under gloo).

    python tests/mc2_worker.py INIT_FILE RANK WORLD ops
    python tests/mc2_worker.py INIT_FILE RANK WORLD model CKPT TP EP DP

`ops`: the emulated npu_moe_distribute_dispatch_v2 / _combine_v2 against a float64 oracle built from
every rank's inputs (each rank regenerates them all from seeds), the output shapes of the wheel's meta
registrations, and the documented argument checks. `model`: GLM52 on the emulated Ascend backend laid
out over the ranks, its expert dispatch through MC2; prints greedy and MTP speculative tokens, MC2 call
counts and the rows and (row, expert) pairs each rank computed. One JSON line on stdout.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist


def inputs(src: int, bs: int, H: int, E: int, K: int, dtype, seed: int):
    """Card `src`'s tokens, expert ids (K distinct per row) and routing weights."""
    g = torch.Generator().manual_seed(seed * 1000 + src)
    x = torch.randn(bs, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(bs)]).to(torch.int32)
    w = torch.rand(bs, K, generator=g)
    return x, ids, w


def ops_case(emu, name, rank, W, *, H, local, K, dtype, sizes, active, global_bs, seed):
    """One dispatch -> experts (row * (global expert id + 1)) -> combine; returns what was checked."""
    E = local * W
    every = [inputs(s, sizes[s], H, E, K, dtype, seed) for s in range(W)]
    x, ids, w = every[rank]
    mask = None if active is None else torch.arange(sizes[rank]) < active[rank]
    out = emu.npu_moe_distribute_dispatch_v2(x, ids, name, W, rank, E, x_active_mask=mask, shared_expert_num=0,
                                             global_bs=global_bs)
    expand_x, dyn, assist, counts, ep_recv, tp_recv, exp_scales = out
    max_bs = global_bs // W if global_bs else sizes[rank]
    A = max_bs * W * min(local, K)
    # meta registration (npu_moe_distribute_dispatch_v2_meta), quant_mode 0, no TP domain, no expert_scales
    assert expand_x.shape == (A, H) and expand_x.dtype == dtype
    assert dyn.shape == (A,) and dyn.dtype == torch.float32
    assert assist.shape == (max(sizes[rank] * K, A * 128),) and assist.dtype == torch.int32
    assert counts.shape == (local,) and counts.dtype == torch.int64
    assert ep_recv.shape == (W * local,) and ep_recv.dtype == torch.int32
    assert tp_recv.shape == (0,) and tp_recv.dtype == torch.int32
    assert exp_scales.shape == (0,) and exp_scales.dtype == torch.float32
    # oracle: this card's rows grouped by local expert, then source card, token (float64 copies)
    n_act = [sizes[s] if active is None else active[s] for s in range(W)]
    want_rows, want_counts = [], []
    for e in range(rank * local, (rank + 1) * local):
        got = [every[s][0][t].double() for s in range(W) for t in range(n_act[s]) if e in every[s][1][t].tolist()]
        want_counts.append(len(got))
        want_rows += got
    n = sum(want_counts)
    assert counts.tolist() == want_counts, (counts.tolist(), want_counts)
    assert int(ep_recv[-1]) == n
    if n:
        assert torch.equal(expand_x[:n].double(), torch.stack(want_rows))
    assert bool(expand_x[n:].isnan().all())                          # unspecified rows poisoned
    # the experts: row * (global id + 1), rounded to the dtype as a device's grouped GEMM output is
    gid = torch.repeat_interleave(torch.arange(local), counts) + rank * local
    y = torch.full_like(expand_x, float("nan"))                      # rows past n: never read
    y[:n] = (expand_x[:n].double() * (gid[:, None] + 1)).to(dtype)
    back = emu.npu_moe_distribute_combine_v2(y, ids, assist, ep_recv, w, name, W, rank, E, tp_send_counts=tp_recv,
                                             x_active_mask=mask, shared_expert_num=0, global_bs=global_bs)
    assert back.shape == (sizes[rank], H) and back.dtype == dtype       # meta: (BS, H), expand_x's dtype
    want = torch.zeros(sizes[rank], H, dtype=torch.float64)
    for t in range(n_act[rank]):
        for k in range(K):
            e = int(ids[t, k])
            want[t] += w[t, k].double() * (x[t].double() * (e + 1)).to(dtype).double()
    err = (back[:n_act[rank]].double() - want[:n_act[rank]]).abs().max().item() if n_act[rank] else 0.0
    bound = 2 ** -7 * want.abs().max().item() + 1e-6                # one bf16/f16 rounding of the sum
    assert err <= bound, (err, bound)
    assert bool(back[n_act[rank]:].isnan().all())                    # inactive tokens: not computed
    return {"n": n, "err": err, "bound": bound}


def expect_error(fn, *words):
    from glm52_backends.backends.ascend.emulator import NpuOpError
    try:
        fn()
    except NpuOpError as e:
        assert all(w in str(e) for w in words), str(e)
        return str(e)
    raise AssertionError(f"no error for {words}")


def run_ops(rank: int, W: int) -> dict:
    from glm52_backends.backends.ascend.emulator import NpuEmulator
    from glm52_backends.backends.ascend.mc2 import comm_name
    emu = NpuEmulator(allow_float32=False)
    name = comm_name(emu, dist.group.WORLD, rank)
    res = {}
    # ragged cards (global_bs = max_bs * W, every token active), bf16, 4 experts per card, top-3
    res["ragged"] = ops_case(emu, name, rank, W, H=1024, local=4, K=3, dtype=torch.bfloat16,
                             sizes=[5 + s for s in range(W)], active=None, global_bs=(4 + W) * W, seed=1)
    # equal cards with padding rows (x_active_mask), f16, one expert per card, top-2
    res["masked"] = ops_case(emu, name, rank, W, H=1536, local=1, K=2, dtype=torch.float16, sizes=[6] * W,
                             active=[6 - (s % 3) for s in range(W)], global_bs=0, seed=2)
    # a card that receives nothing: every token routed to experts of card 0 (local 4 >= K)
    E = 4 * W
    x = torch.randn(3, 1024).bfloat16()
    ids = torch.tensor([[0, 1], [2, 3], [1, 3]], dtype=torch.int32)
    out = emu.npu_moe_distribute_dispatch_v2(x, ids, name, W, rank, E, shared_expert_num=0)
    assert out[3].sum().item() == (6 * W if rank == 0 else 0)      # 3 tokens x 2 experts from each card
    # documented checks
    bad = torch.tensor([[0, 0], [2, 3], [1, 3]], dtype=torch.int32)
    res["dup"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(x, bad, name, W, rank, E), "must not repeat")
    res["h"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(x[:, :512].contiguous(), ids, name, W, rank, E),
                            "H must be in [1024, 8192]")
    res["name"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(x, ids, "nosuch", W, rank, E), "nosuch")
    res["rank"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(x, ids, name, W, (rank + 1) % W, E),
                               "ep_rank_id")
    res["experts"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(x, ids, name, W, rank, E + 1),
                                  "moe_expert_num %")
    res["tp"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(x, ids, name, W, rank, E, tp_world_size=2,
                                                                      group_tp="tp"), "not emulated")
    gap = torch.tensor([True, False, True])
    res["mask"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(x, ids, name, W, rank, E,
                                                                        x_active_mask=gap), "true must come before")
    os.environ["HCCL_BUFFSIZE"] = "1"          # 1 MB: below what max_bs 512 x 4 local experts x W cards need
    res["buffer"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(x, ids, name, W, rank, E, global_bs=512 * W),
                                 "HCCL buffer", "HCCL_BUFFSIZE is 1 MB")
    del os.environ["HCCL_BUFFSIZE"]
    # global_bs = 0 with cards of different BS: every card raises (they all see the sizes)
    res["global_bs"] = expect_error(lambda: emu.npu_moe_distribute_dispatch_v2(
        x[:1 + rank % 2], ids[:1 + rank % 2], name, W, rank, E), "global_bs=0 needs the same BS")
    return res


def run_model(rank: int, ckpt: str, tp: int, ep: int, dp: int) -> dict:
    from glm52_backends import GLM52
    m = GLM52(ckpt, backend="ascend", dtype=torch.float32, progress=False, tp=tp, ep=ep, dp=dp)
    prompts = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [250, 4], [8] * 9]
    greedy = m.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
    spec = m.generate(prompts, max_new_tokens=8, stop_at_eos=False, speculative=2).tokens
    comm = m.net.ep_comm
    return {"rank": rank, "greedy": greedy, "spec": spec, "kind": type(comm).__name__,
            "calls": getattr(comm, "calls", None), "fallbacks": getattr(comm, "fallbacks", None),
            "moe": dict(m.net.moe_stats), "sent_bytes": comm.sent_bytes, "backend": m.backend_name}


def main() -> int:
    init, rank, world, mode = sys.argv[1:5]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    if mode == "ops":
        out = run_ops(rank, world)
    else:
        ckpt, tp, ep, dp = sys.argv[5], *map(int, sys.argv[6:9])
        out = run_model(rank, ckpt, tp, ep, dp)
    print(json.dumps(out))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLM52_ASCEND_EMULATE", "1")
    from rank_exit import leave
    leave(main())
