"""`glm52` command line: backends, generate, make-tiny, conformance, plan, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .tiny import tiny_default_dir



def _table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header] + rows
    w = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * x for x in w])] + [line(r) for r in rows])


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ---- backends ------------------------------------------------------------------------------------
def cmd_backends(args) -> int:
    from .ops import HOT_OPS, OP_NAMES
    from .registry import list_backends
    rows, notes = [], []
    for b in list_backends():
        if b.available:
            hot = [op for op in HOT_OPS if op in b.native_ops]
            fb = [op for op in OP_NAMES if op not in b.native_ops]
            rows.append([b.name, "yes", str(b.priority), b.label, f"{len(b.native_ops)}/{len(OP_NAMES)}",
                         ", ".join(hot) or "-", ", ".join(fb) or "-"])
        else:
            rows.append([b.name, "no", "", "", "", "", f"see note {len(notes) + 1}"])
            notes.append(f"  {len(notes) + 1}. {b.name}: {b.reason}")
    print(_table(rows, ["backend", "loads", "priority", "reports as", "native", "native hot ops",
                        "falls back to reference"]))
    if notes:
        print("\nnot available here:")
        print("\n".join(notes))
    print("\n`--backend auto` picks the available backend with the highest priority.")
    return 0


# ---- make-tiny -------------------------------------------------------------------------------------
def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint
    kw = {}
    if args.index_topk is not None:
        kw["index_topk"] = args.index_topk
    path = make_tiny_checkpoint(args.dir, fp8=args.fp8, mtp=args.mtp, layers=args.layers, seed=args.seed,
                                shards=args.shards, vocab_size=args.vocab_size, **kw)
    print(f"wrote a random GLM-5.2-format checkpoint to {path}")
    return 0


# ---- generate --------------------------------------------------------------------------------------
def _parse_dtype(name: str | None):
    import torch
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if name not in table:
        raise SystemExit(f"glm52: unknown --dtype {name!r}; choose from {', '.join(table)}")
    return table[name]


def cmd_generate(args) -> int:
    import torch
    from .engine import GLM52
    from .tiny import ensure_default_checkpoint
    path = args.checkpoint or ensure_default_checkpoint()
    t0 = time.perf_counter()
    model = GLM52(path, backend=args.backend, dtype=_parse_dtype(args.dtype), progress=not args.quiet)
    load_s = time.perf_counter() - t0
    if args.prompt is not None:
        prompts = [args.prompt] * args.batch
    elif args.ids:
        ids = [int(t) for t in args.ids.split(",")]
        prompts = [ids] * args.batch
    else:  # random prompts of different lengths, like a mixed batch
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, model.cfg.vocab_size, (int(n),), generator=g).tolist()
                   for n in (torch.arange(args.batch) * 7 % 23 + args.prompt_len)]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              prefill_chunk=args.prefill_chunk, stop_at_eos=not args.ignore_eos)
    plain = model.generate(prompts, **kw) if args.speculative else None  # baseline for the speed-up
    res = model.generate(prompts, speculative=args.speculative, **kw)
    s = res.stats
    if args.json:
        d = {"tokens": res.tokens, "text": res.text, "stats": s, "load_s": load_s}
        if plain is not None:
            d["plain_stats"] = plain.stats
        print(json.dumps(d, default=str))
        return 0
    native = [op for op, how in s["ops"].items() if how == "native"]
    fallback = [op for op, how in s["ops"].items() if how in ("fallback", "mixed")]
    print(f"checkpoint : {path}")
    print(f"backend    : {s['backend']}   dtype: {str(model.dtype).replace('torch.', '')}   device: {model.device}")
    print(f"native ops : {', '.join(native) or '-'}")
    print(f"fell back  : {', '.join(fallback) or '-'}")
    rows = []
    for i, (p, toks) in enumerate(zip(prompts, res.tokens)):
        row = [str(i), str(len(p) if not isinstance(p, str) else len(model.tokenizer.encode(p))),
               str(len(toks)), _clip(" ".join(map(str, toks)), 64)]
        if res.text:  # escaped: a random checkpoint decodes to arbitrary bytes
            row.append(_clip(repr(res.text[i]), 40))
        rows.append(row)
    print(_table(rows, ["req", "prompt", "new", "generated token ids"] + (["text"] if res.text else [])))
    def speed(st) -> str:
        return (f"{st['new_tokens']} new tokens in {st['prefill_s'] + st['decode_s']:.3f} s: "
                f"{st['tokens_per_s']:.1f} tok/s (prefill {st['prefill_s'] * 1e3:.1f} ms, "
                f"decode {st['decode_tokens_per_s']:.1f} tok/s)")

    if plain is None:
        print(f"{speed(s)}; load {load_s:.2f} s")
        return 0
    print(f"with speculation (k={args.speculative}): {speed(s)}; {s['verify_steps']} verify steps")
    print(f"without speculation   : {speed(plain.stats)}")
    print(f"mean acceptance length: {s['mean_acceptance_length']:.2f} tokens per verify step (bonus token "
          f"counted; 1.00 = no draft accepted, {args.speculative + 1} = all)")
    print(f"speed-up              : {s['tokens_per_s'] / plain.stats['tokens_per_s']:.2f}x end to end, "
          f"{s['decode_tokens_per_s'] / plain.stats['decode_tokens_per_s']:.2f}x decode; load {load_s:.2f} s")
    if args.temperature == 0.0:
        print(f"same tokens as plain greedy: {'yes' if res.tokens == plain.tokens else 'NO'}")
    return 0


# ---- delegates -------------------------------------------------------------------------------------
def _delegate(module: str, func: str, argv: list[str]) -> int:
    import importlib
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        print(f"glm52: this command is not available in this build ({e})", file=sys.stderr)
        return 2
    return getattr(mod, func)(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegates = {"conformance": ("glm52_backends.conformance.cli", "conformance_main"),
                 "plan": ("glm52_backends.planner", "plan_main"),
                 "bench": ("glm52_backends.benchmarks.ops_bench", "bench_main")}
    if argv and argv[0] in delegates:
        return _delegate(*delegates[argv[0]], argv[1:])

    ap = argparse.ArgumentParser(prog="glm52", description="GLM-5.2 inference core with pluggable hardware backends.",
                                 epilog="more: glm52 conformance --help | glm52 plan --help | glm52 bench --help")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("backends", help="list backends: available here, native ops, why not").set_defaults(fn=cmd_backends)

    g = sub.add_parser("generate", help="generate from a checkpoint (default: the embedded tiny one)")
    g.add_argument("checkpoint", nargs="?", help=f"HF-format GLM-5.x folder (default: a tiny random one at {tiny_default_dir()})")
    g.add_argument("--backend", default="auto", help="auto | cpu_ref | cuda | ascend | torch | <plugin> (default auto)")
    g.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: the backend's)")
    g.add_argument("--prompt", help="text prompt (needs tokenizer.json in the checkpoint)")
    g.add_argument("--ids", help="comma-separated prompt token ids")
    g.add_argument("--batch", type=int, default=4, help="number of requests (default 4)")
    g.add_argument("--prompt-len", type=int, default=9, help="random prompt base length (default 9)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="MTP draft tokens per verify step (GLM-5.2 recipes: 1..5); also runs plain decoding "
                        "and prints both speeds and the mean acceptance length")
    g.add_argument("--prefill-chunk", type=int, help="chunked prefill size in tokens")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    g.add_argument("--json", action="store_true", help="print a JSON object instead of tables")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("make-tiny", help="write a small random checkpoint in the real GLM-5.2 format")
    m.add_argument("dir")
    m.add_argument("--fp8", action="store_true", help="block-FP8 weights (F8_E4M3 + weight_scale_inv)")
    m.add_argument("--mtp", action="store_true", help="include the MTP (nextn) layer")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shards", type=int, default=1, help="safetensors shards (>1 writes an index.json)")
    m.add_argument("--vocab-size", type=int, default=256)
    m.add_argument("--index-topk", type=int)
    m.set_defaults(fn=cmd_make_tiny)

    for name, help_ in (("conformance", "check a backend against the reference"),
                        ("plan", "memory plan of a deployment YAML"), ("bench", "per-op benchmarks")):
        sub.add_parser(name, help=help_, add_help=False)

    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 1
    try:
        return args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"glm52: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
