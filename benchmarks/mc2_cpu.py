"""Ascend expert dispatch through MC2 (emulated, gloo ranks) against one process, as a table.

    python benchmarks/mc2_cpu.py [--out benchmarks/results/ascend-mc2-cpu.md]

For each layout: W ranks of tests/mc2_worker.py (`model`) on a tiny checkpoint at hidden size 1024 (the
smallest MC2 takes on Atlas A3), the emulated Ascend backend in float32, against a single-process run
of the same backend: greedy and MTP speculative tokens equal, MC2 dispatches per rank, the grouped-GEMM
rows each rank computed (one per (token, expert) pair routed to its experts) against what the replicated
form computes on Ascend (every token the layer saw, each of its top-k slots a row: the other ranks'
slots go to a local expert with weight 0), and the bytes MC2 moves per rank.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
LAYOUTS = [(2, 2, 1), (4, 4, 1), (2, 4, 2)]
PROMPTS = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [250, 4], [8] * 9]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    os.environ["GLM52_ASCEND_EMULATE"] = "1"
    from test_ascend_mc2 import ranks

    from glm52_backends import GLM52
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    tmp = tempfile.mkdtemp()
    ckpt = make_tiny_checkpoint(os.path.join(tmp, "h1024"), layers=3, seed=5, mtp=True, hidden_size=1024)
    one = GLM52(ckpt, backend="ascend", dtype=torch.float32, progress=False)
    K = one.net.cfg.num_experts_per_tok
    greedy = one.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False).tokens
    spec = one.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False, speculative=2).tokens
    rows = []
    for tp, ep, dp in LAYOUTS:
        t0 = time.perf_counter()
        outs = ranks(pathlib.Path(tmp), tp * dp, "model", ckpt, tp, ep, dp)
        wall = time.perf_counter() - t0
        tokens = outs[0]["moe"]["tokens"]
        pairs = [o["moe"]["pairs"] for o in outs]
        rows.append(f"| tp{tp} dp{dp} ep{ep} | {all(o['greedy'] == greedy for o in outs)} | "
                    f"{all(o['spec'] == spec for o in outs)} | {outs[0]['calls']} | "
                    f"{', '.join(str(p) for p in pairs)} (sum {sum(pairs)} = {tokens} x {K}: "
                    f"{sum(pairs) == tokens * K}) | {tokens * K} | {max(pairs) / (tokens * K):.2f} | "
                    f"{min(o['sent_bytes'] for o in outs) / 1e3:.0f}-{max(o['sent_bytes'] for o in outs) / 1e3:.0f} kB | "
                    f"{wall:.1f} |")
    text = "\n".join([
        "# Ascend MC2 expert dispatch (emulated) on CPU processes (gloo) vs one process", "",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, emulated Ascend backend "
        f"(npu_moe_distribute_dispatch_v2 / _combine_v2 over gloo), float32, tiny checkpoint at hidden 1024, "
        f"{K} experts per token, `python benchmarks/mc2_cpu.py`. Rows = grouped-GEMM rows moe_experts ran on a "
        f"rank, summed over the MoE layers and steps (greedy then MTP k=2, 8 new tokens, 3 prompts). The "
        f"replicated form (no dispatch) runs tokens x top-k rows on every rank on this backend. Wall includes "
        f"process start.", "",
        "| layout | greedy equal | MTP spec equal | MC2 dispatches per rank | rows per rank (MC2) | rows per rank "
        "(replicated) | MC2 / replicated, worst rank | MC2 bytes per rank | wall s |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""])
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
