"""Decode context parallelism over CPU processes (gloo) against one process, as a table.

    python benchmarks/dcp_cpu.py [--out benchmarks/results/dcp-cpu.md]

For each layout: W ranks of tests/dcp_worker.py on one tiny checkpoint (4 layers + MTP, indexer top-k 8;
file:// rendezvous, one thread per rank) run three prompts of 41, 30 and 57 tokens: the logits of a
full forward, greedy decoding (whole and chunked prefill) and MTP speculative decoding (k = 3). Compared
with one process on the same checkpoint (the same backend and cache format, no offload): the largest
logit difference (relative to the largest logit), whether every token and every indexer selection is
equal on every rank, the rows layer 0's q_a and kv_a projections take on each rank during the 128-token
forward (prefill context parallelism: under DCP the key side runs on the rows a rank stores, the query
side on 1/dcp of a step of at least `prefill_cp_min_tokens` tokens), the cache bytes each rank allocates
for 4096 tokens (`new_cache(4096, mtp=True)`) against one process's, and the wall time of the run on each
rank (after loading; the slowest rank), next to one process's. tp > 1 with dcp = 1 rows are the
tensor-parallel baseline (the cache replicated on every rank). Three more tp2 dcp2 rows: the query split
off (`--cp-min 100000`: every rank projects every query token, the layout before prefill context
parallelism), decode steps captured as graphs (`--graph trace --backend torch`, against one torch-backend
process) and host offload of the latent rows (`--offload 8` staged blocks per layer, against one process
without offload).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from glm52_backends.benchmarks.machine import cpu_name, publish, run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
WORKER = os.path.join(TESTS, "dcp_worker.py")
# (tp, dcp, ep, cache format, extra worker arguments, what the row is)
LAYOUTS = [(2, 1, 1, "auto", (), ""), (2, 2, 1, "auto", (), ""), (4, 1, 4, "auto", (), ""),
           (4, 2, 4, "auto", (), ""), (4, 4, 4, "auto", (), ""),
           (2, 2, 1, "fp8", (), ""), (4, 4, 4, "fp8", (), ""),
           (2, 2, 1, "auto", ("--cp-min", "100000"), "query split off"),
           (2, 2, 1, "auto", ("--graph", "trace", "--backend", "torch"), "torch backend, graph trace"),
           (2, 2, 1, "auto", ("--offload", "8"), "offload 8"),
           (2, 2, 1, "auto", ("--dcp-attention", "gather"), "gather form"),
           (4, 4, 4, "auto", ("--dcp-attention", "gather"), "gather form")]


def option(extra, name, default):
    return extra[extra.index(name) + 1] if name in extra else default


def ranks(tmp, ckpt, tp, dcp, ep, kv, extra=()):
    return run_ranks(tmp, WORKER, lambda r, out: [ckpt, tp, dcp, out, "--ep", ep, "--kv-cache-dtype", kv, *extra], tp)


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
    for kv, backend in (("auto", "cpu_ref"), ("fp8", "cpu_ref"), ("auto", "torch")):
        m = GLM52(ckpt, backend=backend, dtype=torch.float32, progress=False, kv_cache_dtype=kv)
        run(m)                                              # warm-up: first calls pay one-time costs
        refs[kv, backend] = run(m)
    m = GLM52(ckpt, backend="torch", dtype=torch.float32, progress=False, graph="trace")
    run(m)
    traced = run(m)                 # one process capturing its decode steps too: the wall of the graph row's peer
    rows = []
    for tp, dcp, ep, kv, extra, what in LAYOUTS:
        backend = option(extra, "--backend", "cpu_ref")
        ref = refs[kv, backend]
        outs = ranks(tmp, ckpt, tp, dcp, ep, kv, extra)
        worst = 0.0
        for o in outs:
            for got, want in zip(o["logits"], ref["logits"]):
                got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        tokens = all(o[k] == ref[k] for o in outs for k in ("greedy", "chunked", "spec"))
        if "--graph" in extra:      # a captured decode step's top-k is not seen by the worker's spy
            topk = f"{all(o['forward_topk'] == ref['forward_topk'] for o in outs)} (forward only)"
        else:
            topk = all(o["topk"] == ref["topk"] and o["forward_topk"] == ref["forward_topk"] for o in outs)
        T = outs[0]["tokens"]
        proj = (f"{max(o['proj_rows']['wq_a'] for o in outs)} / {max(o['proj_rows']['wkv_a'] for o in outs)} "
                f"of {T}")
        per_rank = max(o["cache_bytes"] for o in outs)
        notes = []
        if "--graph" in extra:
            notes.append(f"graphs captured per rank: {min(o['graphs'] for o in outs)}-{max(o['graphs'] for o in outs)}"
                         f" (one process: {ref['graphs']}); one torch-backend process with graph trace: "
                         f"{traced['wall_s']:.2f} s, {traced['graphs']} graph, tokens equal: "
                         f"{all(traced[k] == ref[k] for k in ('greedy', 'chunked', 'spec'))}")
        if "--offload" in extra:
            off = [o["offload"] for o in outs]
            notes.append("one decode step, fetched / dense per rank: " + ", ".join(
                f"{x['decode_fetched'] / 1024:.1f} / {x['decode_dense'] / 1024:.1f} kB" for x in off)
                + f"; staging {max(x['stage_bytes'] for x in off) / 1024:.0f} kB per rank")
        label = f"tp{tp} dcp{dcp} ep{ep}" + (f", {what}" if what else "")
        fmt = ("fp8" if kv == "fp8" else "float32") + (f" ({backend})" if backend != "cpu_ref" else "")
        rows.append((label, fmt, f"{worst:.1e}", tokens, topk, proj,
                     f"{per_rank / 1024:.0f} / {ref['cache_bytes'] / 1024:.0f} kB ({per_rank / ref['cache_bytes']:.2f}x)",
                     f"{max(o['wall_s'] for o in outs):.2f} / {ref['wall_s']:.2f}", "; ".join(notes)))
        print(rows[-1], flush=True)
    head = (f"# Decode context parallelism on CPU processes (gloo) vs one process\n\n"
            f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu_ref float32 (unless the "
            f"format column names the torch backend), `python benchmarks/dcp_cpu.py`. Tiny checkpoint (4 layers "
            f"+ MTP, indexer top-k 8), prompts of 41, 30 and 57 tokens: the logits of a full forward, greedy "
            f"decoding of 10 tokens, 6 with 7-token prefill chunks, MTP speculative decoding of 10 (k = 3, "
            f"16-token chunks). Every token and every indexer selection (each full layer's top-k, every step) "
            f"compared with one process (same backend and cache format, no offload) on every rank. Rows q_a / "
            f"kv_a = the rows layer 0's wq_a / wkv_a projected on a rank during the one-shot forward of the three "
            f"prompts (T = 128 tokens in one step; the most of any rank): under DCP the key side (kv_a, the "
            f"indexer's wk) runs only on the rows a rank stores (positions p % dcp == rank) and a step of at "
            f"least 64 tokens (`prefill_cp_min_tokens`) projects the query side (q_a, the indexer's wq_b and "
            f"w_proj) on a 1/dcp slice of its tokens, one all-gather per layer; decode and short chunks keep "
            f"every query token on every rank. \"query split off\" runs with `--cp-min 100000` (the key side "
            f"still split: the layout before the query split). \"torch backend, graph trace\" captures the "
            f"decode steps (greedy, MTP verify and draft) as traced graphs and is compared with one torch-backend "
            f"process without graphs (its top-k column covers the forward only: the worker's spy does not see a "
            f"captured step's selection); its wall includes the tracing, which each of the run's `generate` "
            f"calls repeats for its decode (and MTP) buckets and which costs seconds on CPU: one torch-backend "
            f"process with graph trace is in the notes. \"offload 8\" keeps each rank's latent rows in host memory with 8 staged blocks "
            f"per layer (its own fetch plan per rank; notes: one batch decode step's fetched vs dense bytes per "
            f"rank) and is compared with one process without offload. \"gather form\" attends as a backend without "
            f"a native log-sum-exp does (Ascend): each query's selected rows brought to every rank by one bytewise "
            f"all-reduce, the op run on them for the rank's heads, instead of merging partials by lse. Cache = `new_cache(4096, mtp=True)` bytes "
            f"per rank / one process's (for offload: the whole cache, host rows included). Wall = the run after "
            f"loading, slowest rank / one process (one thread per process on a 2-core machine shared with other "
            f"jobs: upper bounds; the extra collectives of DCP, several per layer, cost more over gloo than the "
            f"work they split at this size).\n\n"
            "| layout | cache format | max logit diff / max logit | tokens equal (greedy, chunked, MTP) | "
            "top-k equal | rows through layer 0's q_a / kv_a per rank (of T) | cache per rank / one process | "
            "wall s (rank / one process) | notes |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    table = head + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
    publish(table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
