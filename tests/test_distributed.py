"""GLM-5.2 over several processes (torch.distributed, gloo on the CPU) against one process.

Each case starts W ranks of tests/dist_worker.py on a tiny checkpoint (file:// rendezvous, one
thread per rank) and compares what every rank returns with a single-process run of the same
checkpoint: logits of a ragged batch, greedy tokens (whole and chunked prefill), MTP speculative
tokens, sampled tokens, the indexer's top-k on every rank, and the bytes each rank read and holds
(against `glm52 plan`'s per-device weights for that layout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import spawn_ranks

from glm52_backends import GLM52
from glm52_backends.config import ConfigError
from glm52_backends.deploy import load_deployment
from glm52_backends.parallel import LayoutError, ParallelPlan
from glm52_backends.planner import plan as plan_memory
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
from glm52_backends.tiny import tiny_config
from glm52_backends.weights import COMPONENTS

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
PROMPTS = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [250, 4], [8] * 9]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    return {"bf16": make_tiny_checkpoint(str(d / "bf16"), layers=4, seed=3, mtp=True, index_topk=8),
            # non-square blocks: a rank's slice of the scale grid uses the block of the cut dim (rows 8, columns 16)
            "fp8": make_tiny_checkpoint(str(d / "fp8"), layers=4, seed=4, mtp=True, index_topk=8, fp8=True,
                                        fp8_block=(8, 16))}


def run_ranks(tmp_path, ckpt, world, tp, ep, dtype="float32", extra=(), timeout=240, dp=1, debug=False):
    init = tmp_path / f"rdzv-{tp}-{ep}-{time.monotonic_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GLM52_DEBUG="1" if debug else "0")
    return spawn_ranks(lambda r: [sys.executable, WORKER, str(init), str(r), str(world), ckpt, str(tp), str(ep), dtype,
                                  "--dp", str(dp), *extra], world, env=env, timeout=timeout)


def single(ckpt, dtype=torch.float32):
    m = GLM52(ckpt, backend="cpu_ref", dtype=dtype, progress=False)
    return {"logits": [x.double() for x in m(PROMPTS)],
            "greedy": m.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False).tokens,
            "chunked": m.generate(PROMPTS, max_new_tokens=4, stop_at_eos=False, prefill_chunk=5).tokens,
            "spec": m.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False, speculative=3).tokens}


@pytest.mark.parametrize("fmt,tp,dp,ep", [("bf16", 2, 1, 1), ("bf16", 2, 1, 2), ("bf16", 4, 1, 4), ("bf16", 4, 1, 1),
                                          ("fp8", 2, 1, 2), ("bf16", 2, 2, 4), ("bf16", 1, 2, 1)])
def test_layout_matches_one_process(tmp_path, ckpts, fmt, tp, dp, ep):
    """tp x dp ranks against one process. dp = 2 with ep = 4: EP stage 2 (the dp groups' tokens meet
    in every MoE layer; the group with fewer requests joins the other's steps with none);
    dp = 2 with ep = 1: two replicas."""
    ref = single(ckpts[fmt])
    outs = []
    # GLM52_DEBUG=1 in two cases: every op's output checked, the indexer's top-k compared across tp ranks
    for rc, o, e in run_ranks(tmp_path, ckpts[fmt], tp * dp, tp, ep, dp=dp, debug=fmt == "fp8" or dp > 1):
        assert rc == 0, e[-3000:]
        outs.append(json.loads(o.strip().splitlines()[-1]))
    worst = 0.0
    for o in outs:
        for got, want in zip(o["logits"], ref["logits"]):
            got = torch.tensor(got, dtype=torch.float64)
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        assert o["greedy"] == ref["greedy"] and o["chunked"] == ref["chunked"]
        assert o["spec"] == ref["spec"]
    assert worst <= 1e-5, f"tp={tp} dp={dp} ep={ep}: logits differ from one process by {worst:.2e} (relative)"
    # every rank returns the same; the ranks of one dp group computed the same indexer top-k
    for g in range(dp):
        assert len({o["topk"] for o in outs if o["dp_rank"] == g}) == 1
    assert outs[0]["n_topk"] > 0
    assert all(o["sampled"] == outs[0]["sampled"] and o["logits"] == outs[0]["logits"] for o in outs)
    # each rank read a part of the checkpoint (all of it at tp = 1 with ep = 1)
    total = outs[0]["bytes_total"]
    assert all(0 < o["bytes_read"] <= total for o in outs)
    assert all(o["bytes_read"] < total for o in outs) or (tp == 1 and ep == 1)
    assert sum(o["bytes_read"] for o in outs) >= total          # together: all of it (replicated ones W times)
    if ep > 1:   # expert parallelism dispatches: a rank computes the rows routed to its experts, not every token
        # (8 experts, 2 per token: a token reaches a given one of 2 ranks with p = 1 - C(4,2)/C(8,2) = 0.79,
        # one of 4 ranks with p = 1 - C(6,2)/C(8,2) = 0.46)
        bound = 0.75 if ep >= 4 else 0.9
        for o in outs:
            assert 0 < o["moe"]["rows"] <= bound * o["moe"]["tokens"], o["moe"]
            assert o["sent_bytes"] > 0
    else:
        assert all(o["moe"] == {"rows": 0, "pairs": 0, "tokens": 0} for o in outs)


def test_ep_stage2_adaptive_drafts_where_the_groups_want_different_steps(tmp_path, ckpts):
    """EP stage 2 (tp2 dp2 ep4) with adaptive MTP drafts: the dp groups draft different numbers of tokens,
    so one group wants an MTP draft step while the other wants its verify step; the one that waits runs
    the other's step empty (engine/turns.py). Every rank returns plain greedy's tokens, for a threshold
    that never stops early and one that does."""
    prompts = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5], [250, 4], [8] * 9, [1, 2]]
    want = GLM52(ckpts["bf16"], backend="cpu_ref", dtype=torch.float32, progress=False).generate(
        prompts, max_new_tokens=9, stop_at_eos=False).tokens
    outs = []
    for rc, o, e in run_ranks(tmp_path, ckpts["bf16"], 4, 2, 4, dp=2, extra=("--adaptive",), timeout=180):
        assert rc == 0, e[-3000:]
        outs.append(json.loads(o.strip().splitlines()[-1]))
    for o in outs:
        assert o["adaptive"] == {"0.0": want, "0.02": want}, o["rank"]
    # the groups wanted different step kinds at least once: a group ran an MTP step empty
    assert sum(o["empty_steps"]["1"] for o in outs) > 0, [o["empty_steps"] for o in outs]


def test_a_backend_brings_its_own_expert_dispatch(tmp_path, ckpts):
    """setup_parallel: the backend gets the process groups at setup and may return the collectives the
    experts are dispatched through (where Ascend's MC2 plugs in); tokens still equal one process."""
    ref = single(ckpts["bf16"])
    for rc, o, e in run_ranks(tmp_path, ckpts["bf16"], 2, 2, 2, extra=("--own-dispatch",)):
        assert rc == 0, e[-3000:]
        out = json.loads(o.strip().splitlines()[-1])
        assert out["greedy"] == ref["greedy"] and out["spec"] == ref["spec"]
        assert out["own_dispatch_calls"] > 0 and out["moe"]["rows"] > 0


@pytest.mark.parametrize("tp,ep", [(2, 1), (2, 2)])
def test_graph_decode_over_ranks_equals_eager(tmp_path, ckpts, tp, ep):
    """tp2 under gloo (and ep2 within the tp group): decode steps, and MTP speculative verify and draft
    steps, captured as graphs with the tp seams as functional collectives recorded in them, give eager's
    greedy tokens on every rank (3 requests: the bucket of 4 with a padding row)."""
    outs = []
    for rc, o, e in run_ranks(tmp_path, ckpts["bf16"], tp, tp, ep, extra=("--graph", "trace")):
        assert rc == 0, e[-3000:]
        outs.append(json.loads(o.strip().splitlines()[-1]))
    for o in outs:
        assert o["graph"] == o["eager"] == outs[0]["eager"]
        assert o["spec_graph"] == o["spec_eager"] == o["eager"] and o["spec_buckets"]     # MTP k=2: verify graphs
        assert o["stats"]["graph"] == "trace" and o["stats"]["graph_buckets"] and not o["stats"]["eager_buckets"]


@pytest.mark.parametrize("tp,ep", [(2, 2), (2, 1), (4, 4)])
def test_planned_bytes_equal_held_bytes(tmp_path, ckpts, tp, ep):
    """`glm52 plan`'s weight bytes per device for the layout = what a rank holds (bfloat16 weights)."""
    outs = run_ranks(tmp_path, ckpts["bf16"], tp, tp, ep, dtype="bfloat16")
    held = []
    for rc, o, e in outs:
        assert rc == 0, e[-3000:]
        held.append(json.loads(o.strip().splitlines()[-1])["held"])
    cfg, _ = tiny_config(layers=4, mtp=True, index_topk=8)
    d = load_deployment("cpu-tiny").replace(**{"parallel.tp": tp, "parallel.ep": ep, "devices_per_node": tp,
                                               "dtypes.weights": "bf16", "dtypes.kv_cache": "bf16"})
    pl = plan_memory(d, cfg)
    weight_rows = [r for r in pl.rows if r.component in COMPONENTS]
    assert len(weight_rows) == len(COMPONENTS)
    planned = sum(r.bytes for r in weight_rows)
    assert len(set(held)) == 1, held                       # the layout is balanced
    assert held[0] == planned, (held, planned)


def test_a_dead_rank_fails_the_others_with_a_clear_error(tmp_path, ckpts):
    t0 = time.monotonic()
    res = run_ranks(tmp_path, ckpts["bf16"], 2, 2, 2, extra=("--die-after-load",), timeout=120)
    assert res[1][0] == 3
    rc, _, err = res[0]
    assert rc != 0 and ("Connection closed" in err or "Connection reset" in err or "timed out" in err.lower()
                        or "Broken pipe" in err), err[-2000:]
    assert time.monotonic() - t0 < 120


def test_bad_layouts_are_refused_by_name():
    cfg, _ = tiny_config(layers=4, mtp=True)
    with pytest.raises(LayoutError, match=r"attention heads \(num_attention_heads\) = 4 does not divide over 3"):
        ParallelPlan(tp=3).validate(cfg)
    with pytest.raises(LayoutError, match=r"routed experts \(n_routed_experts\) = 8 does not divide over 16"):
        ParallelPlan(tp=16, ep=16).validate(tiny_config(layers=4, num_attention_heads=16, vocab_size=256,
                                                        intermediate_size=96, moe_intermediate_size=32)[0])
    with pytest.raises(LayoutError, match="ep = 3 must be 1 .* or tp x dp = 2"):
        ParallelPlan(tp=2, ep=3).validate(cfg)
    with pytest.raises(LayoutError, match="needs 4 processes, but the process group has 2"):
        ParallelPlan(tp=4).validate(cfg, world_size=2)
    ParallelPlan(tp=2, dp=2, ep=4).validate(cfg)                                 # EP stage 2
    ParallelPlan(tp=2, dp=2, ep=1).validate(cfg)                                 # dp replicas
    with pytest.raises(LayoutError, match="ep = 2 must be 1 .* or tp x dp = 4"):
        ParallelPlan(tp=2, dp=2, ep=2).validate(cfg)
    with pytest.raises(LayoutError, match="q_b_proj rows per rank = 48 is not a whole number of 128-wide FP8 blocks"):
        ParallelPlan(tp=2).validate(cfg, fp8_block=(128, 128))
    big = tiny_config(layers=4, num_attention_heads=16, qk_nope_head_dim=96, qk_rope_head_dim=32, v_head_dim=128,
                      index_head_dim=32, moe_intermediate_size=128, n_shared_experts=2, intermediate_size=256)[0]
    ParallelPlan(tp=2, ep=2).validate(big, fp8_block=(128, 128))                 # heads cut in whole blocks
    with pytest.raises(LayoutError, match="expert width per rank = 64 is not a whole number of 128-wide FP8"):
        ParallelPlan(tp=2).validate(big, fp8_block=(128, 128))                   # experts TP-split: no
    with pytest.raises(LayoutError, match="tp must be a positive integer"):
        ParallelPlan(tp=0)
    assert issubclass(LayoutError, ConfigError)


def test_a_plan_outside_torchrun_says_how_to_launch(tmp_path, ckpts, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(LayoutError, match="launch with torchrun"):
        GLM52(ckpts["bf16"], backend="cpu_ref", tp=2, progress=False)


def _torchrun(args, nodes=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nodes is None:
        return [subprocess.run(cmd + ["--standalone", *args], capture_output=True, text=True, env=env,
                               timeout=timeout)]
    import socket
    with socket.socket() as s:                         # a free loopback port for the static rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(cmd + ["--nnodes", str(nodes), "--node-rank", str(n), "--master-addr", "127.0.0.1",
                                     "--master-port", str(port), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for n in range(nodes)]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


GEN = ["-m", "glm52_backends.cli", "generate", "--backend", "cpu_ref", "--dtype", "float32", "--ids", "3,17,200,5,9",
       "--batch", "3", "--max-new-tokens", "6", "--json", "--quiet"]


@pytest.mark.parametrize("how", ["one node, tp2 ep2", "two nodes on loopback, tp2 dp2 ep4"])
def test_cli_under_torchrun_prints_once_and_matches_one_process(ckpts, how):
    ref = GLM52(ckpts["bf16"], backend="cpu_ref", dtype=torch.float32, progress=False)
    want = ref.generate([[3, 17, 200, 5, 9]] * 3, max_new_tokens=6).tokens
    if how.startswith("one"):
        runs = _torchrun(["--nproc-per-node", "2", *GEN, ckpts["bf16"], "--tp", "2", "--ep", "2"])
    else:
        runs = _torchrun(["--nproc-per-node", "2", *GEN, ckpts["bf16"], "--tp", "2", "--dp", "2", "--ep", "4"],
                         nodes=2)
    printed = []
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        printed += [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, "rank 0 alone prints"
    assert printed[0]["tokens"] == want


def test_debug_mode_catches_a_rank_whose_topk_differs(tmp_path, ckpts):
    res = run_ranks(tmp_path, ckpts["bf16"], 2, 2, 2, extra=("--skew-topk",), debug=True, timeout=120)
    rc, _, err = res[1]
    assert rc != 0 and "the indexer's top-k on tp rank 1 differs from tp rank 0's" in err, err[-2000:]
    assert res[0][0] != 0                                   # the other rank stops too, it does not hang


AG_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.fx.experimental.proxy_tensor import make_fx
from glm52_backends.ops.comm import TorchDistributed
rank = int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2)
comm = TorchDistributed()
comm.functional = True
traced = make_fx(lambda x: comm.all_gather(x, dim=-1))(torch.zeros(1, 4))
print(traced(torch.full((1, 4), float(rank))).tolist(), flush=True)
dist.destroy_process_group()
import os
os._exit(0)   # torch's functional-collective threads may abort the interpreter's teardown; the result is out
"""


def test_functional_all_gather_of_one_row_along_the_last_dim(tmp_path):
    """The logits' vocabulary seam of a captured one-request step: the functional all-gather of a single row
    along dim -1 (torch's own mis-reshapes a negative dim there; comm.py passes it non-negative)."""
    init = tmp_path / f"rdzv-{time.monotonic_ns()}"
    outs = spawn_ranks(lambda r: [sys.executable, "-c", AG_SCRIPT, str(init), str(r)], 2,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=120)
    for rc, o, e in outs:
        assert rc == 0, e[-2000:]
        assert json.loads(o.strip().splitlines()[-1]) == [[0.0] * 4 + [1.0] * 4]
