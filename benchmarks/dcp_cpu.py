"""Decode context parallelism over CPU processes (gloo) against one process, as a table.

    python benchmarks/dcp_cpu.py [--out benchmarks/results/dcp-cpu.md]

For each layout: W ranks of tests/dcp_worker.py on one tiny checkpoint (4 layers + MTP, indexer top-k 8;
file:// rendezvous, one thread per rank) run three prompts of 41, 30 and 57 tokens: the logits of a
full forward, greedy decoding (whole and chunked prefill) and MTP speculative decoding (k = 3). Compared
with one process on the same checkpoint: the largest logit difference (relative to the largest logit),
whether every token and every indexer selection is equal on every rank, the cache bytes each rank
allocates for 4096 tokens (`new_cache(4096, mtp=True)`) against one process's, and the wall time of the
run on each rank (after loading; the slowest rank), next to one process's. tp > 1 with dcp = 1 rows are
the tensor-parallel baseline (the cache replicated on every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from glm52_backends.benchmarks.machine import cpu_name, publish

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
WORKER = os.path.join(TESTS, "dcp_worker.py")
LAYOUTS = [(2, 1, 1, "auto"), (2, 2, 1, "auto"), (4, 1, 4, "auto"), (4, 2, 4, "auto"), (4, 4, 4, "auto"),
           (2, 2, 1, "fp8"), (4, 4, 4, "fp8")]


def ranks(tmp, ckpt, tp, dcp, ep, kv):
    init = os.path.join(tmp, f"rdzv-{time.monotonic_ns()}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    outs = [os.path.join(tmp, f"out-{tp}-{dcp}-{r}.json") for r in range(tp)]
    procs = [subprocess.Popen([sys.executable, WORKER, init, str(r), str(tp), ckpt, str(tp), str(dcp), outs[r],
                               "--ep", str(ep), "--kv-cache-dtype", kv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(tp)]
    for p in procs:
        _, e = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(e[-2000:])
    res = []
    for o in outs:
        with open(o) as f:
            res.append(json.load(f))
    return res




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    sys.path.insert(0, TESTS)
    from dcp_worker import run

    from glm52_backends import GLM52
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    ckpt = make_tiny_checkpoint(os.path.join(tmp, "bf16"), layers=4, seed=3, mtp=True, index_topk=8)
    refs = {}
    for kv in ("auto", "fp8"):
        m = GLM52(ckpt, backend="cpu_ref", dtype=torch.float32, progress=False, kv_cache_dtype=kv)
        run(m)                                              # warm-up: first calls pay one-time costs
        refs[kv] = run(m)
    rows = []
    for tp, dcp, ep, kv in LAYOUTS:
        ref = refs[kv]
        outs = ranks(tmp, ckpt, tp, dcp, ep, kv)
        worst = 0.0
        for o in outs:
            for got, want in zip(o["logits"], ref["logits"]):
                got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        tokens = all(o[k] == ref[k] for o in outs for k in ("greedy", "chunked", "spec"))
        topk = all(o["topk"] == ref["topk"] and o["forward_topk"] == ref["forward_topk"] for o in outs)
        per_rank = max(o["cache_bytes"] for o in outs)
        rows.append((f"tp{tp} dcp{dcp} ep{ep}", "fp8" if kv == "fp8" else "float32", f"{worst:.1e}", tokens, topk,
                     f"{per_rank / 1024:.0f} / {ref['cache_bytes'] / 1024:.0f} kB ({per_rank / ref['cache_bytes']:.2f}x)",
                     f"{max(o['wall_s'] for o in outs):.2f} / {ref['wall_s']:.2f}"))
        print(rows[-1], flush=True)
    head = (f"# Decode context parallelism on CPU processes (gloo) vs one process\n\n"
            f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu_ref float32, "
            f"`python benchmarks/dcp_cpu.py`. Tiny checkpoint (4 layers + MTP, indexer top-k 8), prompts of 41, "
            f"30 and 57 tokens: the logits of a full forward, greedy decoding of 10 tokens, 6 with 7-token "
            f"prefill chunks, MTP speculative decoding of 10 (k = 3, 16-token chunks). Every token and every "
            f"indexer selection (each full layer's top-k, every step) compared with one process on every rank. "
            f"Cache = `new_cache(4096, mtp=True)` bytes per rank / one process's. Wall = the run after loading, "
            f"slowest rank / one process (one thread per process on a machine shared with other jobs: upper "
            f"bounds; the extra collectives of DCP, 4 per layer, cost more over gloo than the work they split).\n\n"
            "| layout | cache format | max logit diff / max logit | tokens equal (greedy, chunked, MTP) | "
            "top-k equal | cache per rank / one process | wall s (rank / one process) |\n"
            "|---|---|---|---|---|---|---|\n")
    table = head + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
    publish(table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
