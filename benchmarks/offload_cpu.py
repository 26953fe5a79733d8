"""Host offload of cold latent blocks on CPU: bytes fetched per step and IndexShare group vs the dense fetch.

    python benchmarks/offload_cpu.py [--out benchmarks/results/offload-cpu.md]

A tiny checkpoint (4 layers: full, shared, full, shared; MTP; indexer top-k 8) with 4-token cache blocks
runs two prompts (chunked prefill, 16-token chunks) and 12 greedy decode steps through `extend`, with
and without `offload_blocks` (device-resident latent blocks per layer). Host and device are both CPU
memory here: what is measured is the fetch plan (cache.HostOffload), in bytes, and that the logits and tokens
are the same. Per step and IndexShare group: the dense fetch (every block of the step's requests, every
layer of the group), the blocks the group's top-k selects, and what was fetched (selected minus
resident; once for the group). Greedy `generate` with MTP speculative decoding (k = 2) is compared too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from glm52_backends.benchmarks.machine import cpu_name, publish

BS, TOPK = 4, 8
CASES = [((64, 80), 16), ((200, 240), 32)]       # (prompt lengths, offload_blocks)
NEW = 12




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
           f"runs of query tokens (`runs` > 1) and may fetch a block again per layer.\n"]
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
    table = "".join(out)
    publish(table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
