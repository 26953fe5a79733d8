"""Prefill context parallelism on CPU processes (gloo): one long prefill, timed, per layout.

    python benchmarks/prefill_cp_cpu.py [--tokens 2048] [--reps 3] [--backends cpu_ref,torch]
        [--out benchmarks/results/prefill-cp-cpu.md]

A random checkpoint wide enough for the token-wise projections to matter (hidden 1024, q_lora 512,
kv_lora 256, 8 heads, 16 indexer heads of 64, 4 layers: full, shared, full, shared; indexer top-k 64;
about 70 MB in BF16) prefills one prompt of --tokens random tokens in one step
(benchmarks/prefill_cp_worker.py: a warm-up, then --reps timed prefills, the ranks lined up by a barrier
before each; one thread per process). Layouts: one process (the baseline), tp2 dcp1 (the cache replicated
on both ranks), tp2 dcp2 with the query split off (`net.prefill_cp_min_tokens = 10**9`: each rank runs the
key-side projections on the rows it stores, the query side on every token) and tp2 dcp2 with the split on
(the default: the query side on half the tokens, one all-gather per layer). Per layout: the median over
the reps of the slowest rank's prefill, the median time inside the tp / dcp collectives (the slowest
rank), the rows through layer 0's q_a / kv_a / indexer wk per rank, the cache bytes per rank, and the
last token's logits against one process's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

from glm52_backends.benchmarks.machine import cpu_name, publish, run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "prefill_cp_worker.py")
SHAPE = dict(hidden_size=1024, q_lora_rank=512, kv_lora_rank=256, num_attention_heads=8, qk_nope_head_dim=64,
             qk_rope_head_dim=32, v_head_dim=64, index_n_heads=16, index_head_dim=64, intermediate_size=1024,
             moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2)
LAYERS, TOPK = 4, 64
# (label, world, tp, dcp, extra worker arguments)
LAYOUTS = [("one process", 1, 1, 1, ()),
           ("tp2 dcp1 (cache replicated)", 2, 2, 1, ()),
           ("tp2 dcp2, query split off", 2, 2, 2, ("--cp-min", str(10 ** 9))),
           ("tp2 dcp2, query split on (default)", 2, 2, 2, ())]


def launch(tmp, ckpt, world, tp, dcp, extra, timeout=1200):
    return run_ranks(tmp, WORKER, lambda r, out: [ckpt, tp, dcp, out, *extra], world, timeout)


def table(backend, rows) -> str:
    head = (f"## Backend {backend}\n\n"
            "| layout | prefill s (median, slowest rank) | speed-up vs one process | each rep s | "
            "in linear / indexer_topk / sparse_mla / collectives s | "
            "rows through layer 0's q_a / kv_a / wk per rank (of T) | cache per rank | last-token max logit diff "
            "/ max logit |\n"
            "|---|---|---|---|---|---|---|---|\n")
    return head + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)


def run_backend(tmp, ckpt, args, backend):
    extra = ("--tokens", str(args.tokens), "--reps", str(args.reps), "--backend", backend)
    rows, ref = [], None
    for label, world, tp, dcp, more in LAYOUTS:
        outs = launch(tmp, ckpt, world, tp, dcp, (*extra, *more))
        if ref is None:
            ref = torch.tensor(outs[0]["last_logits"], dtype=torch.float64)
        slowest = [max(o["times"][i] for o in outs) for i in range(args.reps)]
        parts = {k: statistics.median(max(o["parts"][k][i] for o in outs) for i in range(args.reps))
                 for k in ("linear", "indexer_topk", "sparse_mla", "collectives")}
        worst = max(float((torch.tensor(o["last_logits"], dtype=torch.float64) - ref).abs().max() / ref.abs().max())
                    for o in outs)
        T = outs[0]["tokens"]
        pr = lambda k: max(o["proj_rows"][k] for o in outs)  # noqa: E731
        per_rank = max(o["cache_bytes"] for o in outs)
        rows.append([label, statistics.median(slowest), " / ".join(f"{t:.2f}" for t in slowest),
                     " / ".join(f"{v:.2f}" for v in parts.values()) if world > 1 else
                     " / ".join(f"{v:.2f}" for v in list(parts.values())[:3]) + " / -",
                     f"{pr('wq_a')} / {pr('wkv_a')} / {pr('wk')} of {T}",
                     f"{per_rank / 2 ** 20:.2f} MiB", f"{worst:.1e}"])
        print(backend, rows[-1], flush=True)
    base = rows[0][1]
    return [(r[0], f"{r[1]:.2f}", f"{base / r[1]:.2f}x", *r[2:]) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length (one prefill step)")
    ap.add_argument("--reps", type=int, default=3, help="timed prefills after one warm-up")
    ap.add_argument("--backends", default="cpu_ref,torch", help="comma-separated backends, one table each")
    ap.add_argument("--out", help="also write the markdown tables here")
    args = ap.parse_args()
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

    tmp = tempfile.mkdtemp()
    ckpt = make_tiny_checkpoint(os.path.join(tmp, "bf16"), layers=LAYERS, seed=5, index_topk=TOPK, **SHAPE)
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    backends = args.backends.split(",")
    tables = [table(b, run_backend(tmp, ckpt, args, b)) for b in backends]
    head = (f"# Prefill context parallelism on CPU processes (gloo): one {args.tokens}-token prefill\n\n"
            f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, float32, "
            f"`python benchmarks/prefill_cp_cpu.py --tokens {args.tokens} --reps {args.reps} --backends "
            f"{args.backends}`. Random checkpoint ({size / 2 ** 20:.0f} MB BF16): hidden 1024, q_lora 512, kv_lora "
            f"256, 8 heads (64 + 32 rope), 16 indexer heads of 64, {LAYERS} layers (full, shared, full, shared; "
            f"the first dense, then MoE 8 experts x 256, 2 per token, one shared), indexer top-k {TOPK}, vocabulary "
            f"256. One prompt of {args.tokens} random tokens prefilled in one step (`extend(cache, {{0: prompt}}, "
            f"last_only=True)` into a fresh cache; benchmarks/prefill_cp_worker.py): one warm-up, then "
            f"{args.reps} timed, the ranks lined up by a barrier before each; one thread per process, file:// "
            f"rendezvous. Prefill s = the slowest rank's prefill, median over the reps (each rep listed); speed-up = "
            f"one process's median / the layout's. In ... s = seconds inside the backend's `linear`, "
            f"`indexer_topk` and `sparse_mla` and inside the tp / dcp collectives (all-reduce, all-gather, "
            f"reduce-scatter, the query split's all-gather of rows; waiting for the other rank counts there), "
            f"the slowest rank's, median over the reps. Rows = the rows through layer 0's wq_a (query side) / "
            f"wkv_a / the indexer's wk (key side) on a rank during the warm-up prefill (the most of any rank), "
            f"counted by wrapping the backend's `linear` as tests/dcp_worker.py does. Under tp2 the heads (q_b, "
            f"kv_b, o_proj), the MLP widths and the vocabulary are split, but q_a, kv_a and the indexer's wq_b / "
            f"w_proj / wk run on every token on both ranks, and so does the indexer's scoring; DCP splits the key "
            f"side by cache row (each rank stores every other position; the indexer scores against its own rows "
            f"and the candidates are merged) and, for a step of at least 64 tokens, the query side by token slice "
            f"(one all-gather of [q_a rows | indexer queries | head weights] per layer). Cache = the bytes of the "
            f"prefill's cache (`new_cache({args.tokens} + block)`) per rank. Logit diff = the last token's max "
            f"|logit - one process's| / max |one process's logit|, worst rank (one process of the same backend).\n\n"
            f"Honest caveat: two gloo processes on a shared 2-core machine (other jobs run beside this one) make "
            f"every collective a copy through shared memory plus a wake-up of the other process, and the two "
            f"ranks compete with whatever else runs: the times are upper bounds, and the collectives' share "
            f"is far larger than over NVLink / HCCS.\n\n"
            f"Reading the columns: the query split (the last two rows of a table) halves the rows through q_a "
            f"and the indexer's wq_b / w_proj, which shows in the linear column, and adds one all-gather per layer, "
            f"which shows in the collectives column; over gloo here the two are of the same order, so the "
            f"split's net effect on the prefill is small. The larger costs of DCP on these CPU backends are "
            f"elsewhere: under DCP the paged ops get one block-table row per query token (step.DcpStep: each "
            f"token sees its own count of this rank's rows), so the reference's `sparse_mla` and `indexer_topk` "
            f"loop over {args.tokens} one-token \"requests\" instead of one, and the torch backend's "
            f"`indexer_topk` gathers the keys per token instead of once per request (backends/generic/batched.py, "
            f"SHARED_KEY_REQUESTS); the indexer's scoring itself, replicated under tp2 dcp1, is split by key rows "
            f"under DCP.\n\n")
    publish(head + "\n".join(tables), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
