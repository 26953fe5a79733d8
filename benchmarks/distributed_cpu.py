"""Layouts over several CPU processes (gloo) against one process, as a table.

    python benchmarks/distributed_cpu.py [--out benchmarks/results/distributed-cpu.md]

For each layout: W ranks of tests/dist_worker.py on one tiny checkpoint (file:// rendezvous, one
thread per rank), compared with a single-process run of the same checkpoint: the largest logit
difference (relative to the largest logit), greedy / chunked / MTP-speculative tokens equal, bytes
of checkpoint data read per rank (of the whole), weight bytes held per rank against `glm52 plan`'s
per-device figure (bfloat16 weights), and the wall time of the whole case (process start included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(os.path.dirname(HERE), "tests", "dist_worker.py")
PROMPTS = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [250, 4], [8] * 9]
LAYOUTS = [("bf16", 2, 1, 1), ("bf16", 2, 1, 2), ("bf16", 4, 1, 1), ("bf16", 4, 1, 4), ("fp8", 2, 1, 2),
           ("bf16", 2, 2, 4), ("bf16", 1, 2, 1)]


def ranks(tmp, ckpt, tp, dp, ep, dtype):
    init = os.path.join(tmp, f"rdzv-{time.monotonic_ns()}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    W = tp * dp
    procs = [subprocess.Popen([sys.executable, WORKER, init, str(r), str(W), ckpt, str(tp), str(ep), dtype, "--dp",
                               str(dp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(W)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(e[-2000:])
        outs.append(json.loads(o.strip().splitlines()[-1]))
    return outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    from glm52_backends import GLM52
    from glm52_backends.deploy import load_deployment
    from glm52_backends.planner import plan
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    from glm52_backends.tiny import tiny_config
    from glm52_backends.weights import COMPONENTS

    tmp = tempfile.mkdtemp()
    ck = {"bf16": make_tiny_checkpoint(os.path.join(tmp, "bf16"), layers=4, seed=3, mtp=True, index_topk=8),
          "fp8": make_tiny_checkpoint(os.path.join(tmp, "fp8"), layers=4, seed=4, mtp=True, index_topk=8, fp8=True,
                                      fp8_block=(8, 8))}
    cfg, _ = tiny_config(layers=4, mtp=True, index_topk=8)
    rows = []
    for fmt, tp, dp, ep in LAYOUTS:
        ref = GLM52(ck[fmt], backend="cpu_ref", dtype=torch.float32, progress=False)
        want = [x.double() for x in ref(PROMPTS)]
        greedy = ref.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False).tokens
        spec = ref.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False, speculative=3).tokens
        t0 = time.perf_counter()
        outs = ranks(tmp, ck[fmt], tp, dp, ep, "float32")
        wall = time.perf_counter() - t0
        diff = max(float((torch.tensor(g, dtype=torch.float64) - w).abs().max() / w.abs().max())
                   for o in outs for g, w in zip(o["logits"], want))
        held = ranks(tmp, ck["bf16"], tp, dp, ep, "bfloat16")[0]["held"] if fmt == "bf16" else None
        d = load_deployment("cpu-tiny").replace(**{"parallel.tp": tp, "parallel.dp": dp, "parallel.ep": ep,
                                                   "devices_per_node": tp * dp, "dtypes.weights": "bf16",
                                                   "dtypes.kv_cache": "bf16"})
        planned = sum(r.bytes for r in plan(d, cfg).rows if r.component in COMPONENTS)
        read = [o["bytes_read"] for o in outs]
        moe = [o["moe"] for o in outs]
        per_rank = ("-" if ep == 1 else
                    ", ".join(f"{m['rows']}/{m['tokens']}" for m in moe)
                    + f" ({max(m['rows'] / m['tokens'] for m in moe):.2f} at most)")
        sent = "-" if ep == 1 else f"{min(o['sent_bytes'] for o in outs) / 1e3:.0f}-{max(o['sent_bytes'] for o in outs) / 1e3:.0f} kB"
        rows.append([f"{fmt} tp{tp} dp{dp} ep{ep}", f"{diff:.1e}", str(all(o["greedy"] == greedy for o in outs)),
                     "-" if outs[0]["spec"] is None else str(all(o["spec"] == spec for o in outs)),
                     f"{min(read) / 1e3:.0f}-{max(read) / 1e3:.0f} of {outs[0]['bytes_total'] / 1e3:.0f} kB",
                     "-" if held is None else f"{held / 1e3:.1f} / {planned / 1e3:.1f} kB", per_rank, sent,
                     f"{wall:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    head = ["layout (tiny checkpoint)", "max logit diff / max logit", "greedy + chunked equal", "MTP spec equal",
            "read per rank", "held / planned per rank (bf16)", "MoE rows computed / tokens seen, per rank",
            "sent in dispatch + combine, per rank", "wall s"]
    md = ["# Layouts on CPU processes (gloo) vs one process", "",
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"cpu_ref float32, `python benchmarks/distributed_cpu.py`. Wall times include process start; on a "
          f"machine shared with other jobs they are upper bounds. Held = what one rank's network holds with "
          f"bfloat16 weights; planned = `glm52 plan`'s per-device weight bytes for the same layout "
          f"(fp8 rows: `-`, the planner counts 128-wide blocks, this checkpoint uses 8x8). MoE rows: with ep > 1 "
          f"each token is dispatched to the ranks owning its experts (all-to-all over gloo), so a rank's "
          f"moe_experts computes only the rows routed to it; before dispatch every rank computed every token the "
          f"layer saw (rows = tokens). Tokens seen = the step's tokens (ep = tp) or all dp groups' (EP stage 2), "
          f"summed over the MoE layers and steps of the run (logits, greedy, chunked, MTP, sampled).", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
