"""`glm52 conformance --backend NAME|all [--quick] [--e2e] [--json PATH] [--markdown PATH]`.

`--e2e` runs the end-to-end rows (conformance/e2e.py: the whole trained default model against the
float64 reference per weight format, cache format, mode and dtype) instead of the op cases.

Exit status: 0 every case passed; 1 a case failed, or a backend ran none of its cases natively
(everything fell back to the reference, so nothing of it was checked); 2 bad input (an unknown
op, dtype or backend, an unwritable report path), checked before any case runs.
"""

from __future__ import annotations

import argparse
import os
import sys


def _writable(path: str) -> str:
    """A report path whose folder exists (or can be made) and is writable; refused up front."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    probe = os.path.dirname(full)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK) or \
            (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {probe if not os.path.exists(full) else full} "
                                         f"is not writable")
    return path


def _op_name(text: str) -> str:
    from glm52_backends.ops import OP_NAMES
    if text not in (*OP_NAMES, "model"):
        raise argparse.ArgumentTypeError(f"unknown op {text!r}; the ops are {', '.join(OP_NAMES)}, and 'model' "
                                         f"for the model case")
    return text


def _dtype(text: str):
    from .tolerances import parse_dtype
    try:
        return parse_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def conformance_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="glm52 conformance",
        description="Check a backend against the reference (cpu_ref in float64) on identical seeded inputs: "
                    "every hot op at the real GLM-5.2 sizes (scaled down with --quick), odd sizes and edge "
                    "cases, plus logits and greedy tokens of a tiny checkpoint. Exit status 1 on any failure.")
    ap.add_argument("--backend", default="cpu_ref", help="a registered backend name, or 'all' (default cpu_ref)")
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes (interpreters, emulators, CI)")
    ap.add_argument("--dtype", action="append", type=_dtype,
                    help="dtype to test in (repeatable; default the backend's)")
    ap.add_argument("--op", action="append", type=_op_name,
                    help="only these ops (repeatable; 'model' for the model case)")
    ap.add_argument("--no-model", action="store_true", help="skip the model-level case")
    ap.add_argument("--json", metavar="PATH", type=_writable, help="write the report(s) as JSON")
    ap.add_argument("--markdown", metavar="PATH", type=_writable, help="write the report(s) as a markdown table")
    ap.add_argument("--e2e", action="store_true",
                    help="end to end instead: the whole trained default model per weight format, cache format, "
                         "mode (greedy, chunked, speculative, adaptive, sampled, graph) and dtype against the float64 "
                         "reference: logits, top-1, greedy divergence, MTP acceptance, degenerate output")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each case as it finishes")
    args = ap.parse_args(argv)

    from glm52_backends.registry import BackendUnavailable, list_backends

    from .runner import run

    if args.backend == "all":
        names = [b.name for b in list_backends() if b.available]
        skipped = [(b.name, b.reason) for b in list_backends() if not b.available]
        for name, why in skipped:
            print(f"skipping {name}: {why}", file=sys.stderr)
    else:
        names = [args.backend]
    dtypes = args.dtype or None
    if args.no_model and args.op == ["model"]:
        ap.error("--op model with --no-model selects no case")
    if args.e2e and (args.op or args.dtype or args.no_model):
        ap.error("--e2e runs the whole model: --op, --dtype and --no-model do not apply")
    reports, ok = [], True
    for name in names:
        try:
            if args.e2e:
                from .e2e import run_e2e
                rep = run_e2e(name, quick=args.quick, progress=args.verbose)
            else:
                rep = run(name, quick=args.quick, dtypes=dtypes, ops=args.op, model=not args.no_model,
                          progress=args.verbose)
        except BackendUnavailable as e:
            print(f"glm52 conformance: {e}", file=sys.stderr)
            return 2
        reports.append(rep)
        if not args.verbose:
            for r in rep.failures:
                print(r.line())
        print(rep.summary())
        ok = ok and rep.passed
        if args.e2e:
            continue
        ran = [r for r in rep.results if r.path != "-"]
        native = {r.op for r in ran if r.path in ("native", "mixed")}
        if ran and not native:
            # a backend whose every op fell back was never tested: that is not a pass
            print(f"FAILED: backend {rep.backend!r} ran none of its {len(rep.results)} cases natively (every op "
                  f"fell back to the reference), so nothing of the backend was checked")
            ok = False
        elif ran and {r.op for r in ran} - native:
            print(f"note: these ops ran only on the reference, not on {rep.backend!r}: "
                  f"{', '.join(sorted({r.op for r in ran} - native))}")
    from glm52_backends.files import write_text
    try:   # a temporary file renamed into place: a full disk leaves the previous report as it was
        if args.json:
            import json
            write_text(args.json, json.dumps([json.loads(r.to_json()) for r in reports], indent=2))
        if args.markdown:
            write_text(args.markdown, "\n".join(r.to_markdown() for r in reports))
    except OSError as e:
        print(f"glm52 conformance: cannot write the report: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1
