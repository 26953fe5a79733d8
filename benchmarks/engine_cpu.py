"""GLM52 against HF transformers' eager `generate` on the same checkpoint, prompts and CPU, in one run.

Rows (each: GLM52 and HF, the same prompts, greedy, no EOS stop, float32, median of `--repeats`):
  decode B=1      one prompt of `--prompt-len` tokens, `--new` new tokens
  decode B=8      eight prompts of the same length (no padding on either side), `--new` new tokens
  prefill 1000    one 1000-token prompt, one new token (the time is the prefill)
on two checkpoints: the shipped trained default (4 layers) and a random tiny checkpoint at GLM-5.2's
depth (78 layers, the default's widths). The ratio is GLM52's tokens/s over HF's (> 1: GLM52 faster).
GLM52's tokens are checked equal to HF's greedy tokens before a time is reported (a row whose tokens
differ says so).

The second table is GLM52's time per decode step (B=1) against the number of layers: the slope is the
host cost of one layer, the intercept the per-step cost outside the layers.

    python benchmarks/engine_cpu.py --markdown benchmarks/results/engine-cpu.md
    python benchmarks/engine_cpu.py --quick          # fewer tokens and repeats: a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from glm52_backends import GLM52, default_checkpoint


def _median_time(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _prompts(vocab: int, B: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab - 1, (B, n), generator=g).tolist()


def _hf(path: str):
    from transformers import GlmMoeDsaForCausalLM
    m = GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return m


def _hf_generate(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def _ours_generate(model, prompts, new, **kw) -> tuple[list[list[int]], dict]:
    """Greedy, no EOS stop; `kw`: generate's (graph=...)."""
    r = model.generate(prompts, max_new_tokens=new, temperature=0.0, stop_at_eos=False, **kw)
    return r.tokens, r.stats


def compare(path: str, label: str, rows: list[tuple[str, int, int, int]], repeats: int, backend: str,
            graph: bool) -> list[dict]:
    """Each row: HF, GLM52 eager, and (decode rows, `graph`) GLM52 with decode steps as compiled graphs."""
    hf = _hf(path)
    ours = GLM52(path, backend=backend, dtype=torch.float32, progress=False)
    out = []
    for name, B, n, new in rows:
        prompts = _prompts(ours.cfg.vocab_size, B, n, seed=B * 1000 + n)
        _hf_generate(hf, prompts, new), _ours_generate(ours, prompts, new, graph=False)        # warm-up
        t_hf, hf_tok = _median_time(lambda: _hf_generate(hf, prompts, new), repeats)
        t_us, (our_tok, stats) = _median_time(lambda: _ours_generate(ours, prompts, new, graph=False), repeats)
        toks = B * (n + new) if new == 1 else B * new      # prefill row: prompt tokens per second
        r = dict(model=label, row=name, B=B, prompt=n, new=new, hf_s=t_hf, ours_s=t_us, hf_tps=toks / t_hf,
                 ours_tps=toks / t_us, ratio=t_hf / t_us, same=our_tok == hf_tok, backend=stats["backend"],
                 graph_tps=None, graph_ratio=None, capture_s=None, graph_same=None)
        if graph and new > 1:
            t0 = time.perf_counter()
            _ours_generate(ours, prompts, new, graph=True)                 # captures (compiles) the bucket
            first = time.perf_counter() - t0
            t_g, (g_tok, g_stats) = _median_time(lambda: _ours_generate(ours, prompts, new, graph=True), repeats)
            r.update(graph_tps=toks / t_g, graph_ratio=t_hf / t_g, capture_s=g_stats["graph_capture_s"],
                     first_s=first, graph_same=g_tok == hf_tok, graph_mode=g_stats["graph"])
        out.append(r)
        g = (f"  graph {r['graph_tps']:9.1f} tok/s ratio {r['graph_ratio']:.2f}x capture {r['capture_s']:.0f} s "
             f"tokens {'equal' if r['graph_same'] else 'DIFFER'}") if r["graph_tps"] else ""
        print(f"{label:>16} {name:>12}: HF {r['hf_tps']:9.1f} tok/s  GLM52 {r['ours_tps']:9.1f} tok/s  "
              f"ratio {r['ratio']:.2f}x  tokens {'equal' if r['same'] else 'DIFFER'}{g}", flush=True)
    return out


def layer_sweep(depths: list[int], new: int, repeats: int, backend: str) -> list[dict]:
    """GLM52's eager time per B=1 decode step at several depths (random weights, the default's widths)."""
    out = []
    for L in depths:
        cfg = deep_config(L)
        m = GLM52(cfg, backend=backend, dtype=torch.float32, progress=False, include_mtp=False)
        prompts = _prompts(cfg.vocab_size, 1, 16, seed=L)
        _ours_generate(m, prompts, new, graph=False)
        t, (_, stats) = _median_time(lambda: _ours_generate(m, prompts, new, graph=False), repeats)
        step_ms = 1e3 * stats["decode_s"] / max(stats["decode_steps"], 1)
        out.append(dict(layers=L, step_ms=step_ms))
        print(f"layers {L:3d}: {step_ms:7.2f} ms per decode step", flush=True)
    return out


def deep_config(layers: int):
    """The shipped default's config at another depth (GLM-5.2's IndexShare schedule, layer 0 dense)."""
    import dataclasses

    from glm52_backends.config import indexshare_schedule
    from glm52_backends.loader import load_config
    base = load_config(default_checkpoint())
    moe = ["dense"] + ["sparse"] * (layers - 1)
    return dataclasses.replace(base, num_hidden_layers=layers, indexer_types=indexshare_schedule(layers, None, 2, 1),
                               mlp_layer_types=moe)


def deep_checkpoint(tmp: str, layers: int) -> str:
    """A random checkpoint with the default model's widths and `layers` layers (HF can read it)."""
    from glm52_backends.loader import load_config
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    base = load_config(default_checkpoint())
    widths = {k: getattr(base, k) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size",
                                            "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
                                            "index_head_dim", "n_routed_experts", "num_experts_per_tok")}
    path = os.path.join(tmp, f"deep{layers}")
    return make_tiny_checkpoint(path, layers=layers, vocab_size=base.vocab_size, index_topk=base.index_topk,
                                seed=layers, **widths)


def _markdown(rows: list[dict], sweep: list[dict], args) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["# GLM52 vs HF transformers eager `generate` on the CPU",
             "",
             f"Device: CPU ({cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads); float32; greedy; medians of {args.repeats} runs after a warm-up; commit {rev}.",
             f"`python benchmarks/engine_cpu.py {' '.join(sys.argv[1:])}`",
             "",
             "| model | row | B | prompt | new | HF tok/s | GLM52 eager tok/s | eager / HF | GLM52 graph tok/s | "
             "graph / HF | capture s | backend | tokens = HF |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        same = "yes" if r["same"] and r["graph_same"] in (None, True) else "NO"
        lines.append(f"| {r['model']} | {r['row']} | {r['B']} | {r['prompt']} | {r['new']} | {r['hf_tps']:.1f} | "
                     f"{r['ours_tps']:.1f} | {r['ratio']:.2f}x | {fmt(r['graph_tps'], '.1f')} | "
                     f"{fmt(r['graph_ratio'], '.2f')}{'x' if r['graph_ratio'] else ''} | {fmt(r['capture_s'], '.0f')} | "
                     f"{r['backend']} | {same} |")
    lines += ["", "Decode rows: new tokens per second; prefill rows: (prompt + 1) tokens per second. \"graph\": "
              "`generate(..., graph=True)`, decode steps traced and compiled by inductor once per batch bucket "
              "(the capture column; not in the timed runs, which replay), prefill eager.", ""]
    if sweep:
        lines += ["## Time per eager decode step (B=1) against depth", "",
                  "| layers | ms per step |", "|---:|---:|"]
        lines += [f"| {s['layers']} | {s['step_ms']:.2f} |" for s in sweep]
        if len(sweep) >= 2:
            a, b = sweep[0], sweep[-1]
            slope = (b["step_ms"] - a["step_ms"]) / (b["layers"] - a["layers"])
            lines += ["", f"Slope: {slope:.3f} ms per layer per step; at 0 layers: "
                          f"{a['step_ms'] - slope * a['layers']:.2f} ms."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-graph", action="store_true", help="skip the compiled-graph decode runs (minutes of "
                                                                "compiling per bucket at 78 layers)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=64, help="new tokens of the decode rows")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=1000)
    ap.add_argument("--depth", type=int, default=78, help="layers of the deep random checkpoint")
    ap.add_argument("--sweep", type=int, nargs="*", default=[4, 20, 40, 78], help="depths of the step-time table")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 new tokens, 1 repeat, 128-token prefill")
    ap.add_argument("--markdown", help="write the results table here")
    args = ap.parse_args(argv)
    if args.quick:
        args.new, args.repeats, args.prefill, args.sweep = 8, 1, 128, [4, 8]
    rows = [("decode B=1", 1, args.prompt_len, args.new), ("decode B=8", 8, args.prompt_len, args.new),
            (f"prefill {args.prefill}", 1, args.prefill, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        results = compare(default_checkpoint(), "default (4 layers)", rows, args.repeats, args.backend,
                          not args.no_graph)
        results += compare(deep_checkpoint(tmp, args.depth), f"random ({args.depth} layers)", rows, args.repeats,
                           args.backend, not args.no_graph)
        sweep = layer_sweep(args.sweep, min(args.new, 16), args.repeats, args.backend)
    md = _markdown(results, sweep, args)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
