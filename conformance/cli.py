"""`glm52 conformance --backend NAME|all [--quick] [--json PATH] [--markdown PATH]`; exit 1 on any failure."""

from __future__ import annotations

import argparse
import os
import sys


def conformance_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="glm52 conformance",
        description="Check a backend against the reference (cpu_ref in float64) on identical seeded inputs: "
                    "every hot op at the real GLM-5.2 sizes (scaled down with --quick), odd sizes and edge "
                    "cases, plus logits and greedy tokens of a tiny checkpoint. Exit status 1 on any failure.")
    ap.add_argument("--backend", default="cpu_ref", help="a registered backend name, or 'all' (default cpu_ref)")
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes (interpreters, emulators, CI)")
    ap.add_argument("--dtype", action="append", help="dtype to test in (repeatable; default the backend's)")
    ap.add_argument("--op", action="append", help="only these ops (repeatable; 'model' for the model case)")
    ap.add_argument("--no-model", action="store_true", help="skip the model-level case")
    ap.add_argument("--json", metavar="PATH", help="write the report(s) as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the report(s) as a markdown table")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each case as it finishes")
    args = ap.parse_args(argv)

    from glm52_backends.registry import BackendUnavailable, list_backends

    from .runner import run
    from .tolerances import parse_dtype

    if args.backend == "all":
        names = [b.name for b in list_backends() if b.available]
        skipped = [(b.name, b.reason) for b in list_backends() if not b.available]
        for name, why in skipped:
            print(f"skipping {name}: {why}", file=sys.stderr)
    else:
        names = [args.backend]
    dtypes = [parse_dtype(d) for d in args.dtype] if args.dtype else None
    reports, ok = [], True
    for name in names:
        try:
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
    if args.json:
        import json
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([json.loads(r.to_json()) for r in reports], f, indent=2)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(r.to_markdown() for r in reports))
    return 0 if ok else 1
