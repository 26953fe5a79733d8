"""`glm52` command line: backends, generate, make-tiny, conformance, plan, bench.

Exit status: 0 success; 1 a check failed (conformance found a difference, a plan does not fit);
2 bad input or environment (an argument, a file, a checkpoint, a backend that cannot load or
fails). A user error prints one line `glm52 COMMAND: error: ...`, never a traceback;
GLM52_DEBUG=1 adds the traceback (and checks every op's output for NaN/inf). Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from . import engine_config
from .engine_config import int_at_least as _int_at_least


EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---- argument types: a bad value is an argparse error naming the option (exit 2) ---------------------
def _float_in(low: float, high: float, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < low or (low_open and v == low) or v > high:
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {'(' if low_open else '['}{low:g}, "
                                             f"{high:g}]")
        return v
    parse.__name__ = "number"
    return parse


def _text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{path}: {e.strerror if isinstance(e, OSError) else e}") from None


def _token_ids(text: str) -> list[int]:
    ids = []
    for part in text.split(","):
        try:
            ids.append(int(part.strip()))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} is not an integer token id") from None
        if ids[-1] < 0:
            raise argparse.ArgumentTypeError(f"token id {ids[-1]} is negative")
    return ids


# ---- errors ------------------------------------------------------------------------------------------
def _error_line(e: BaseException) -> str:
    notes = [n for n in getattr(e, "__notes__", []) if n]
    msg = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    if isinstance(e, (KeyError, TypeError, AttributeError, IndexError, AssertionError, NameError)):
        msg = f"internal error ({type(e).__name__}: {msg}); set GLM52_DEBUG=1 for the traceback"
    return msg + "".join(f" [{n}]" for n in notes)


def json_safe(v):
    """`v` with every non-finite float as null: JSON has no NaN/inf (a rate over no decode step is NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def _exit_origin(e: SystemExit) -> str | None:
    """Where a SystemExit came from when it was not argparse (a backend op or plugin calling sys.exit):
    'file:line (function)' of the raising frame; None for argparse's own exits (errors, --help)."""
    tb, last, op = e.__traceback__, None, ""
    while tb is not None:
        loc = tb.tb_frame.f_locals
        bound = loc.get("self")
        if type(bound).__name__ == "BoundBackend" and isinstance(loc.get("op"), str):
            op = f"{bound.where(loc['op'])}: "       # the registry's op call: name the backend and the op
        last, tb = tb, tb.tb_next
    if last is None:
        return None
    code = last.tb_frame.f_code
    if os.path.basename(code.co_filename) == "argparse.py":
        return None
    return f"{op}{code.co_filename}:{last.tb_lineno} ({code.co_name})"


def guarded(prog: str, fn, *args) -> int:
    """Run a command: its exit status, or 2 with one line for any error (130 on Ctrl-C)."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:
        where = _exit_origin(e)
        if where is None:
            raise  # argparse's own errors and --help
        # code that is not ours ended the run (a backend op, a plugin): say so instead of exiting silently
        notes = "".join(f" [{n}]" for n in getattr(e, "__notes__", []) if n)
        print(f"{prog}: error: sys.exit({e.code!r}) called at {where}{notes}; a backend or plugin must raise an "
              f"exception, not end the process", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - the one place a user error becomes a message
        if os.environ.get("GLM52_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
            raise
        print(f"{prog}: error: {_error_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT



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
    from .devtools.make_tiny import make_tiny_checkpoint
    kw = {}
    if args.index_topk is not None:
        kw["index_topk"] = args.index_topk
    if args.fp8 and args.quant not in (None, "fp8"):
        raise ValueError(f"--fp8 is an alias of --quant fp8; it contradicts --quant {args.quant}")
    quant = "fp8" if args.fp8 else args.quant
    path = make_tiny_checkpoint(args.dir, quant=quant, mtp=args.mtp, layers=args.layers, seed=args.seed,
                                shards=args.shards, vocab_size=args.vocab_size, **kw)
    what = {None: "GLM-5.2-format (BF16)", "fp8": "GLM-5.2-FP8-format (block FP8)",
            "w8a8": "msModelSlim AscendV1 W8A8 (GLM-5 mixed recipe, no QuaRot)",
            "w4a8": "msModelSlim AscendV1 W4A8 (routed experts int4, GLM-5 mixed recipe, no QuaRot)"}[quant]
    print(f"wrote a random {what} checkpoint to {path}")
    return 0


# ---- generate --------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and math.isfinite(a) and math.isfinite(b) and b > 0 else "n/a"


# Text prompts of `glm52 generate` without --prompt/--ids when the checkpoint has a tokenizer.
DEFAULT_PROMPTS = ("def __init__(self", "import ", "class ", "    def ")


def _graph_line(s: dict) -> str:
    """What ran as captured graphs in a generation's stats (engine/graph.py)."""
    mode = s.get("graph", "-")
    if not s.get("graphs_captured"):
        return f"{mode}; none captured" if mode in ("trace", "compile", "cuda", "npu") else str(mode)
    eager = f"; eager buckets {s['eager_buckets']}" if s.get("eager_buckets") else ""
    return (f"{mode}: {s['graphs_captured']} captured (decode buckets {s['graph_buckets']}{eager}) in "
            f"{s['graph_capture_s']:.1f} s")


def cmd_generate(args) -> int:
    import torch
    from .engine import GLM52
    from .loader import default_checkpoint
    if args.adaptive and not args.speculative:
        raise ValueError("--adaptive needs --speculative K > 0 (it adapts how many of the K drafts a round proposes)")
    if args.draft_threshold is not None and not args.adaptive:
        raise ValueError("--draft-threshold is used only with --adaptive (and --speculative K)")
    settings = {**engine_config.from_args(args), "progress": not args.quiet}
    if not args.deployment:   # under torchrun the layout must cover the launched ranks (else each runs it all)
        from .engine.distributed import check_world
        check_world(engine_config.EngineConfig.from_settings("glm52 generate", **settings).parallel)
    path = args.checkpoint or default_checkpoint()
    t0 = time.perf_counter()
    if args.deployment:
        model = GLM52.from_deployment(args.deployment, model=args.checkpoint or None, **settings)
        path = model.path or path
    else:
        model = GLM52(path, **settings)
    load_s = time.perf_counter() - t0
    if args.prompt_file is not None:
        prompts = [args.prompt_file] * args.batch
    elif args.prompt is not None:
        prompts = [args.prompt] * args.batch
    elif args.ids:
        prompts = [list(args.ids)] * args.batch
    elif model.tokenizer is not None:  # text starts, so a trained model shows what it learned
        prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(args.batch)]
    else:  # random prompts of different lengths, like a mixed batch
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, model.cfg.vocab_size, (int(n),), generator=g).tolist()
                   for n in (torch.arange(args.batch) * 7 % 23 + args.prompt_len)]
    chunk = args.prefill_chunk or (model.deployment.max_batched_tokens if model.deployment is not None else None)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              prefill_chunk=chunk, stop_at_eos=not args.ignore_eos)
    plain = model.generate(prompts, **kw) if args.speculative else None  # baseline for the speed-up
    res = model.generate(prompts, speculative=args.speculative, adaptive=args.adaptive,
                         draft_threshold=args.draft_threshold, **kw)
    if model.layout is not None and model.layout.rank != 0:
        return 0                          # many ranks: every one holds the result, rank 0 prints it
    s = res.stats
    if args.json:
        d = {"tokens": res.tokens, "finish_reasons": res.finish_reasons, "text": res.text, "stats": s,
             "load_s": load_s}
        if plain is not None:
            d["plain_stats"] = plain.stats
        print(json.dumps(json_safe(d), default=str, allow_nan=False))
        return 0
    native = [op for op, how in s["ops"].items() if how == "native"]
    fallback = [op for op, how in s["ops"].items() if how in ("fallback", "mixed")]
    print(f"checkpoint : {path}")
    print(f"backend    : {s['backend']}   dtype: {str(model.dtype).replace('torch.', '')}   device: {model.device}")
    fmts = model.load_stats.get("formats") or {}
    print(f"formats    : weights {', '.join(f'{k} x{v}' for k, v in fmts.items()) or '-'}; caches latent "
          f"{model.kv_cache_format}, index {model.index_cache_format}")
    print(f"native ops : {', '.join(native) or '-'}")
    print(f"fell back  : {', '.join(fallback) or '-'}")
    print(f"graphs     : {_graph_line(s)}")
    rows = []
    for i, (p, toks) in enumerate(zip(prompts, res.tokens)):
        row = [str(i), str(len(p) if not isinstance(p, str) else len(model.tokenizer.encode(p))),
               str(len(toks)), res.finish_reasons[i], _clip(" ".join(map(str, toks)), 64)]
        if res.text:  # escaped: a random checkpoint decodes to arbitrary bytes
            row.append(_clip(repr(res.text[i]), 40))
        rows.append(row)
    print(_table(rows, ["req", "prompt", "new", "stop", "generated token ids"] + (["text"] if res.text else [])))
    if res.text:   # the whole text of each request, when it reads as text
        for i, t in enumerate(res.text):
            whole = (prompts[i] if isinstance(prompts[i], str) else "") + t
            if whole.replace("\n", "").replace("\t", "").isprintable():
                print(f"--- request {i} " + "-" * 40 + "\n" + whole)

    def speed(st) -> str:
        rate = lambda v: f"{v:.1f} tok/s" if math.isfinite(v) else "n/a"  # noqa: E731
        return (f"{st['new_tokens']} new tokens in {st['prefill_s'] + st['decode_s']:.3f} s: "
                f"{rate(st['tokens_per_s'])} (prefill {st['prefill_s'] * 1e3:.1f} ms, "
                f"decode {rate(st['decode_tokens_per_s'])})")

    if plain is None:
        print(f"{speed(s)}; load {load_s:.2f} s")
        return 0
    how = f"k={args.speculative}" + (f", adaptive p>{s['draft_threshold']:g}" if args.adaptive else "")
    print(f"with speculation ({how}): {speed(s)}; {s['verify_steps']} verify steps")
    print(f"without speculation   : {speed(plain.stats)}")
    mal = s["mean_acceptance_length"]
    print(f"mean acceptance length: {f'{mal:.2f}' if math.isfinite(mal) else 'n/a (no verify step ran)'} tokens "
          f"per verify step (bonus token counted; 1.00 = no draft accepted, {args.speculative + 1} = all)")
    if math.isfinite(s["mean_drafted_tokens"]):
        print(f"drafts per verify step: {s['mean_drafted_tokens']:.2f} of {args.speculative}, "
              f"{s['draft_acceptance_rate']:.0%} of them accepted")
    print(f"speed-up              : {_ratio(s['tokens_per_s'], plain.stats['tokens_per_s'])} end to end, "
          f"{_ratio(s['decode_tokens_per_s'], plain.stats['decode_tokens_per_s'])} decode; load {load_s:.2f} s")
    if args.temperature == 0.0:
        print(f"same tokens as plain greedy: {'yes' if res.tokens == plain.tokens else 'NO'}")
    return 0


# ---- delegates: commands that parse their own arguments -----------------------------------------------
DELEGATES = ("conformance", "plan", "bench", "serve")


def _delegate_main(name: str):
    """The entry of a delegated command. Conformance and the benchmarks are packages beside the core:
    this is the one place the core reaches them (the seam tests/test_structure.py declares)."""
    if name == "conformance":
        from .conformance.cli import conformance_main as entry
    elif name == "bench":
        from .benchmarks.ops_bench import bench_main as entry
    elif name == "plan":
        from .planner import plan_main as entry
    else:
        from .serve import serve_main as entry
    return entry


def _delegate(name: str, argv: list[str]) -> int:
    try:
        entry = _delegate_main(name)
    except ModuleNotFoundError as e:
        print(f"glm52 {name}: this command is not available in this build ({e})", file=sys.stderr)
        return EXIT_BAD_INPUT
    return guarded(f"glm52 {name}", entry, argv)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__
    try:
        return version("glm52_backends")
    except PackageNotFoundError:
        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATES:
        return _delegate(argv[0], argv[1:])

    ap = argparse.ArgumentParser(prog="glm52", description="GLM-5.2 inference core with pluggable hardware backends.",
                                 epilog="exit status: 0 success, 1 a check failed (conformance, plan), 2 bad input "
                                        "or environment. more: glm52 conformance --help | glm52 plan --help | "
                                        "glm52 bench --help")
    ap.add_argument("--version", action="version", version=f"glm52 {_version()}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("backends", help="list backends: available here, native ops, why not").set_defaults(fn=cmd_backends)

    g = sub.add_parser("generate", help="generate from a checkpoint (default: the embedded tiny one)")
    g.add_argument("checkpoint", nargs="?", help="HF-format GLM-5.x folder (default: the embedded tiny model trained on Python source, "
                   "glm52_backends/default_model)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--prompt", help="text prompt (needs tokenizer.json in the checkpoint)")
    one.add_argument("--prompt-file", metavar="PATH", type=_text_file,
                     help="text prompt read from a UTF-8 file (a long context; needs tokenizer.json)")
    g.add_argument("--ids", type=_token_ids, help="comma-separated prompt token ids")
    g.add_argument("--batch", type=_int_at_least(1), default=4, help="number of requests (default 4)")
    g.add_argument("--prompt-len", type=_int_at_least(1), default=9, help="random prompt base length (default 9)")
    g.add_argument("--max-new-tokens", type=_int_at_least(0), default=16,
                   help="new tokens per request (default 16); a request stops earlier at EOS or at the end of "
                        "the context (the 'stop' column says which)")
    g.add_argument("--temperature", type=_float_in(0.0, math.inf), default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=1.0, help="nucleus, in (0, 1]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--speculative", type=_int_at_least(0), default=0, metavar="K",
                   help="MTP draft tokens per verify step (GLM-5.2 recipes: 1..5); also runs plain decoding "
                        "and prints both speeds and the mean acceptance length")
    g.add_argument("--adaptive", action="store_true",
                   help="with --speculative K: draft up to K tokens per round, stopping a request's drafting once "
                        "the MTP layer's probability of its last draft is at most --draft-threshold")
    g.add_argument("--draft-threshold", type=_float_in(0.0, 1.0), metavar="P",
                   help="with --adaptive: the probability in [0, 1] below which drafting stops (default 0.5; "
                        "0 = never stop early, 1 = one draft per round)")
    g.add_argument("--prefill-chunk", type=_int_at_least(1),
                   help="chunked prefill size in tokens (default: the deployment's max_batched_tokens with "
                        "--deployment, else whole prompts)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    g.add_argument("--json", action="store_true", help="print a JSON object instead of tables")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--deployment", metavar="YAML", help="a deployment config (configs/*.yaml or a bundled name): "
                   "backend, device, dtype and, under torchrun, the parallel layout")
    engine_config.add_arguments(g)            # the engine's settings (engine_config.py): --backend, --tp, ...
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("make-tiny", help="write a small random checkpoint in the real GLM-5.2 format")
    m.add_argument("dir")
    m.add_argument("--quant", choices=("fp8", "w8a8", "w4a8"),
                   help="fp8: block-FP8 weights (F8_E4M3 + weight_scale_inv, the GLM-5.2-FP8 format); w8a8: an "
                        "msModelSlim AscendV1 folder, GLM-5 mixed recipe (attention W8A8 static, calibrated on the "
                        "float model; MLP/experts W8A8 dynamic; kv_b, indexer wk/weights_proj, router float); w4a8: "
                        "the same with routed experts W4A8 dynamic (QuaRot rotation is not applied)")
    m.add_argument("--fp8", action="store_true", help="alias of --quant fp8")
    m.add_argument("--mtp", action="store_true", help="include the MTP (nextn) layer")
    m.add_argument("--layers", type=_int_at_least(1), default=4)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shards", type=_int_at_least(1), default=1, help="safetensors shards (>1 writes an index.json)")
    m.add_argument("--vocab-size", type=_int_at_least(2), default=256)
    m.add_argument("--index-topk", type=_int_at_least(1))
    m.set_defaults(fn=cmd_make_tiny)

    for name, help_ in (("conformance", "check a backend against the reference"),
                        ("plan", "memory plan of a deployment YAML"), ("bench", "per-op benchmarks"),
                        ("serve", "OpenAI-compatible server over the continuous-batching engine")):
        sub.add_parser(name, help=help_, add_help=False)

    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return EXIT_BAD_INPUT
    return guarded(f"glm52 {args.cmd}", args.fn, args)


def entry() -> None:
    """The `glm52` command: `main`, then the process ends. After a run over several ranks (torchrun) the
    process group is destroyed and the process leaves without the interpreter's teardown, where torch's
    collective threads sometimes abort a run that has finished (exit -6, "terminate called without an
    active exception", seen after graph-mode steps): a finished rank exits with its own status."""
    rc = main()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
