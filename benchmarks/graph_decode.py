"""Decode steps as captured graphs against eager decoding, per batch bucket and depth, on one backend.

    python benchmarks/graph_decode.py --backend cuda --device cuda            # on a GPU (CUDA graphs)
    python benchmarks/graph_decode.py --backend torch --graph trace --small   # a CPU rehearsal

For each depth (random weights at the shipped default's widths, GLM-5.2's IndexShare schedule) and each
batch bucket: greedy `generate` with `graph=False`, then with graphs (one warm run first, which
captures; the timed runs replay), medians of `--repeats`. Reported per row: milliseconds per decode
step eager and with graphs, their ratio, the graph capture time, and whether the tokens are equal
(they must be: a row whose tokens differ is a failed check, exit status 1). The time per step against
depth is the host cost per layer: flat in layers with graphs where the device, not the host, is the
bottleneck (a GPU at these widths); on a CPU the CPU does the compute, so nothing is flat there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from glm52_backends import GLM52
from glm52_backends.benchmarks.engine_cpu import deep_config


def _run(model, prompts, steps: int, graph, repeats: int) -> tuple[float, list, dict]:
    """Median ms per decode step, the tokens, the last stats."""
    times, out = [], None
    for _ in range(repeats):
        out = model.generate(prompts, max_new_tokens=steps + 1, stop_at_eos=False, graph=graph)
        times.append(1e3 * out.stats["decode_s"] / max(out.stats["decode_steps"], 1))
    return statistics.median(times), out.tokens, out.stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--graph", default="on", choices=("on", "trace", "compile"),
                    help="on: graph=True (CUDA/NPU graphs; inductor on a CPU); trace / compile: the CPU's forms")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 20, 78])
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=32, help="decode steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="rehearsal: layers 2 4, buckets 1 4, 8 steps, 1 repeat")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.small:
        args.layers, args.buckets, args.steps, args.repeats = [2, 4], [1, 4], 8, 1
    graph = {"on": True}.get(args.graph, args.graph)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    rows, ok = [], True
    print(f"{'layers':>6} {'batch':>5} {'eager ms/step':>14} {'graph ms/step':>14} {'eager/graph':>12} "
          f"{'capture s':>10}  tokens", flush=True)
    for L in args.layers:
        model = GLM52(deep_config(L), backend=args.backend, device=args.device, dtype=dtype, progress=False,
                      include_mtp=False)
        for B in args.buckets:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(1, model.cfg.vocab_size - 1, (B, 32), generator=g).tolist()
            _run(model, prompts, 2, False, 1)                                   # warm-up
            eager_ms, eager_tok, _ = _run(model, prompts, args.steps, False, args.repeats)
            t0 = time.perf_counter()
            _run(model, prompts, args.steps, graph, 1)                         # captures this bucket
            first_s = time.perf_counter() - t0
            graph_ms, graph_tok, st = _run(model, prompts, args.steps, graph, args.repeats)
            same = graph_tok == eager_tok
            ok &= same
            rows.append(dict(layers=L, batch=B, eager_ms=eager_ms, graph_ms=graph_ms, ratio=eager_ms / graph_ms,
                             capture_s=st.get("graph_capture_s"), first_run_s=first_s, graph=st.get("graph"),
                             buckets=st.get("graph_buckets"), tokens_equal=same, backend=st["backend"]))
            print(f"{L:6d} {B:5d} {eager_ms:14.3f} {graph_ms:14.3f} {eager_ms / graph_ms:11.2f}x "
                  f"{st.get('graph_capture_s') or 0:10.1f}  {'equal' if same else 'DIFFER'}  ({st.get('graph')})",
                  flush=True)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
