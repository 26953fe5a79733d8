"""Host offload of cold latent blocks on CPU: bytes fetched per step and IndexShare group vs the dense fetch.

    python benchmarks/offload_cpu.py [--out benchmarks/results/offload-cpu.md]

A tiny checkpoint (4 layers: full, shared, full, shared; MTP; indexer top-k 8) with 4-token cache blocks
runs two prompts (chunked prefill, 16-token chunks) and 12 greedy decode steps through `extend`, with
and without `offload_blocks` (device-resident latent blocks per layer). Host and device are both CPU
memory here: what is measured is the fetch plan (cache.HostOffload), in bytes, and that the logits and tokens
are the same. Per step and IndexShare group: the dense fetch (every block of the step's requests, every
layer of the group), the blocks the group's top-k selects, and what was fetched (selected minus
resident; once for the group). Greedy `generate` with MTP speculative decoding (k = 2) is compared too.
A last section runs the first case under decode context parallelism (tp2 dcp2: two gloo processes of
benchmarks/offload_dcp_worker.py, one thread each, file:// rendezvous): each rank offloads its own rows
(1/2 of every block) with its own fetch plan; per step and group each rank's bytes against the dense fetch,
and its logits and tokens against the one-process run without offload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from glm52_backends.benchmarks.machine import cpu_name, publish, run_ranks

BS, TOPK = 4, 8
CASES = [((64, 80), 16), ((200, 240), 32)]       # (prompt lengths, offload_blocks)
NEW = 12
HERE = os.path.dirname(os.path.abspath(__file__))
DCP_WORKER = os.path.join(HERE, "offload_dcp_worker.py")
DCP_CASE = 0                                     # the CASES entry the DCP section runs


def run(model, prompts, slots):
    """Chunked prefill and greedy decode through `extend`: (logits per step, tokens, cache)."""
    cache = model.new_cache(sum(map(len, prompts)) + len(prompts) * (NEW + 2) * 2, offload_blocks=slots)
    steps, last, toks = [], {}, {i: [] for i in range(len(prompts))}
    for a in range(0, max(map(len, prompts)), 16):
        out = model.extend(cache, {i: p[a:a + 16] for i, p in enumerate(prompts) if p[a:a + 16]})
        steps.append(out)
        last.update({i: int(lg[-1].argmax()) for i, lg in out.items()})
    for _ in range(NEW):
        for i, t in last.items():
            toks[i].append(t)
        out = model.extend(cache, {i: [t] for i, t in last.items()})
        steps.append(out)
        last = {i: int(lg[-1].argmax()) for i, lg in out.items()}
    return steps, toks, cache


def dcp_ranks(tmp, ckpt, prompts, slots, world=2, timeout=900):
    """offload_dcp_worker.py on `world` gloo ranks (tp = dcp = world): each rank's JSON."""
    pj = os.path.join(tmp, "dcp-prompts.json")
    with open(pj, "w") as f:
        json.dump(prompts, f)
    return run_ranks(tmp, DCP_WORKER, lambda r, out: [ckpt, pj, slots, out], world, timeout)


def dcp_section(tmp, ckpt, prompts, slots, s0, t0, spec0, one, kb) -> str:
    """Host offload under DCP (tp2 dcp2) on the prompts of one case, against one process (s0 / t0 / spec0:
    its logits, greedy and MTP tokens without offload; `one`: its HostOffload with offload, for the bytes)."""
    outs = sorted(dcp_ranks(tmp, ckpt, prompts, slots), key=lambda o: o["dcp_rank"])
    worst, exact = 0.0, True
    for o in outs:
        assert len(o["steps"]) == len(s0)
        for got, want in zip(o["steps"], s0):
            for r, lg in want.items():
                g = torch.tensor(got[str(r)], dtype=torch.float64)
                w = lg.double()
                worst = max(worst, float((g - w).abs().max() / w.abs().max()))
                exact = exact and torch.equal(g.float(), lg)
    tokens = all({int(i): t for i, t in o["tokens"].items()} == t0 for o in outs)
    spec = all(o["spec"] == spec0 for o in outs)
    ranks_agree = all(o["steps"] == outs[0]["steps"] for o in outs)
    logs = [o["log"] for o in outs]
    keys = lambda log: [(r["step"], r["group"]) for r in log]  # noqa: E731
    if any(keys(log) != keys(one.log) for log in logs):
        raise RuntimeError("the ranks' offload logs do not line up with one process's (steps, groups)")
    dec = lambda log: [r for r in log if r["tokens"] == len(prompts)]  # noqa: E731
    lines = [f"\n## Under decode context parallelism: tp2 dcp2 (2 gloo ranks), prompts of "
             f"{' and '.join(str(len(p)) for p in prompts)} tokens, offload_blocks = {slots}\n\n"
             f"The same prompts and steps as the first case, on two gloo processes (benchmarks/offload_dcp_worker.py, "
             f"one thread each, `GLM52(..., tp=2, dcp=2)`, file:// rendezvous). Each rank stores the positions "
             f"p % 2 == its rank: every {BS}-token block holds {BS // 2} rows on each rank, so a rank's block, "
             f"staging slot and fetch are half of one process's ({outs[0]['block_bytes']} vs {one.block_bytes} "
             f"bytes per block and layer). Each rank plans its fetch from the selected positions it holds "
             f"(the merged top-k is the same on both ranks; the blocks each rank needs differ). Dense = every "
             f"block of the step's requests, every layer of the group, in the rank's block bytes.\n\n"]
    for o in outs:
        d = dec(o["log"])
        bb = o["block_bytes"]
        dense = sum(r["dense_blocks"] * r["layers"] for r in d) * bb
        fetched = sum(r["fetched_bytes"] for r in d)
        sel = sum(r["selected_blocks"] * r["layers"] for r in d) * bb
        lines.append(f"- rank {o['rank']} (dcp rank {o['dcp_rank']}): device cache {kb(o['device_nbytes'])} kB "
                     f"({kb(o['nbytes'] - o['device_nbytes'])} kB of latent rows in host memory); decode steps, "
                     f"all groups: fetched {kb(fetched)} kB, selected {kb(sel)} kB, dense {kb(dense)} kB: "
                     f"fetched / dense = {fetched / dense:.2f}\n")
    d1 = dec(one.log)
    f1 = sum(r["fetched_bytes"] for r in d1)
    lines.append(f"- one process (the first case with offload): decode steps fetched {kb(f1)} kB, dense "
                 f"{kb(sum(r['dense_blocks'] * r['layers'] for r in d1) * one.block_bytes)} kB; the two ranks "
                 f"together fetched {kb(sum(sum(r['fetched_bytes'] for r in dec(o['log'])) for o in outs))} kB\n"
                 f"- against one process without offload: every step's logits max |diff| / max |logit| = "
                 f"{worst:.1e} (bitwise equal: {exact}; DCP merges the attention of the two ranks' rows by "
                 f"log-sum-exp, so the float32 sums round differently); greedy tokens equal: {tokens}; MTP "
                 f"speculative (k = 2, offload {max(slots, 2 * TOPK)}) tokens equal: {spec}; the two ranks' logits "
                 f"bitwise equal: {ranks_agree}\n\n"
                 "| step | kind | tokens | group (layers) | dense kB per rank | selected kB (rank 0 / 1) | "
                 "fetched kB (rank 0 / 1) | fetched / dense (rank 0 / 1) | runs (rank 0 / 1) | one process: "
                 "fetched / dense |\n"
                 "|---|---|---|---|---|---|---|---|---|---|\n")
    for i, r1 in enumerate(one.log):
        rs = [log[i] for log in logs]
        bb = outs[0]["block_bytes"]
        dense = rs[0]["dense_blocks"] * rs[0]["layers"] * bb
        d1 = r1["dense_blocks"] * r1["layers"] * one.block_bytes
        lines.append(f"| {r1['step']} | {'decode' if r1['tokens'] == len(prompts) else 'prefill'} | {r1['tokens']} | "
                     f"{r1['group']} ({r1['layers']}) | {kb(dense)} | "
                     + " / ".join(kb(r["selected_blocks"] * r["layers"] * o["block_bytes"]) for r, o in zip(rs, outs))
                     + " | " + " / ".join(kb(r["fetched_bytes"]) for r in rs)
                     + " | " + " / ".join(f"{r['fetched_bytes'] / (r['dense_blocks'] * r['layers'] * o['block_bytes']):.2f}"
                                          for r, o in zip(rs, outs))
                     + " | " + " / ".join(str(r["runs"]) for r in rs)
                     + f" | {r1['fetched_bytes'] / d1:.2f} |\n")
    return "".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    from glm52_backends import GLM52
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    ckpt = make_tiny_checkpoint(os.path.join(tmp, "bf16"), layers=4, seed=3, mtp=True, index_topk=TOPK)
    kw = dict(backend="cpu_ref", dtype=torch.float32, progress=False, block_size=BS)
    plain = GLM52(ckpt, **kw)
    g = torch.Generator().manual_seed(11)
    kb = lambda n: f"{n / 1024:.1f}"  # noqa: E731
    out = [f"# Host offload of cold KV blocks (IndexShare-aware) on CPU\n\n"
           f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu_ref float32, "
           f"`python benchmarks/offload_cpu.py`. Tiny checkpoint: 4 layers (IndexShare groups: layers 0-1 and "
           f"2-3; the MTP layer is its own group), indexer top-k {TOPK}, {BS}-token blocks. Two prompts, prefill "
           f"in 16-token chunks, then {NEW} greedy decode steps (`extend`). Host and device are both CPU memory "
           f"here: the bytes are those the fetch plan moves host -> device. Dense = every block of the step's "
           f"requests for every layer of the group (what a step reading the whole context from the host moves); "
           f"selected = the blocks the group's top-k selects; fetched = selected minus the blocks already "
           f"resident, once per group (the shared layer fetches nothing). Without offload nothing moves and "
           f"the device holds every block. A prefill step whose selection exceeds the staging area runs in "
           f"runs of query tokens (`runs` > 1) and may fetch a block again per layer. The last section runs the "
           f"first case under decode context parallelism (tp2 dcp2, two gloo processes).\n"]
    seen = []
    for lens, slots in CASES:
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
        s0, t0, c0 = run(plain, prompts, None)
        s1, t1, c1 = run(plain, prompts, slots)
        same_logits = all(torch.equal(a[r], b[r]) for a, b in zip(s0, s1) for r in a)
        spec0 = plain.generate(prompts, max_new_tokens=NEW, speculative=2).tokens
        off = GLM52(ckpt, offload=max(slots, 2 * TOPK), **kw)
        spec1 = off.generate(prompts, max_new_tokens=NEW, speculative=2).tokens
        bb = c1.offload.block_bytes
        log = c1.offload.log
        dec = [r for r in log if r["tokens"] == len(prompts)]
        tot = lambda rs, k: sum(r[k] * (r["layers"] if k != "fetched_bytes" else 1) for r in rs)  # noqa: E731
        dense_b, sel_b = tot(dec, "dense_blocks") * bb, tot(dec, "selected_blocks") * bb
        fetched_b = tot(dec, "fetched_bytes")
        out.append(f"\n## Prompts of {' and '.join(map(str, lens))} tokens, offload_blocks = {slots}\n\n"
                   f"- device cache bytes: {kb(c0.device_nbytes)} kB without offload, {kb(c1.device_nbytes)} kB with "
                   f"(index keys + {slots}+1 staging blocks per layer; {kb(c1.nbytes - c1.device_nbytes)} kB of "
                   f"latent rows in host memory); {c1.used_blocks} blocks in use at the end\n"
                   f"- logits equal (every step, exact): {same_logits}; greedy tokens equal: {t0 == t1}; MTP "
                   f"speculative (k = 2, offload_blocks = {max(slots, 2 * TOPK)}) tokens equal: {spec0 == spec1}\n"
                   f"- decode steps, all groups: fetched {kb(fetched_b)} kB, selected {kb(sel_b)} kB, dense "
                   f"{kb(dense_b)} kB: fetched / dense = {fetched_b / dense_b:.2f}\n\n"
                   "| step | kind | tokens | group (layers) | dense kB | selected kB | fetched kB | fetched / dense | runs |\n"
                   "|---|---|---|---|---|---|---|---|---|\n")
        for r in log:
            d, s = r["dense_blocks"] * r["layers"] * bb, r["selected_blocks"] * r["layers"] * bb
            out.append(f"| {r['step']} | {'decode' if r in dec else 'prefill'} | {r['tokens']} | {r['group']} "
                       f"({r['layers']}) | {kb(d)} | {kb(s)} | {kb(r['fetched_bytes'])} | "
                       f"{r['fetched_bytes'] / d:.2f} | {r['runs']} |\n")
        print(out[-2], flush=True)
        if len(seen) == DCP_CASE:
            seen.append((prompts, slots, s0, t0, spec0, c1.offload))
    out.append(dcp_section(tmp, ckpt, *seen[DCP_CASE], kb))
    print(out[-1], flush=True)
    table = "".join(out)
    publish(table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
