"""Markdown tables from a `benchmarks/gpu_check.sh` results folder.

    python benchmarks/gpu_report.py RESULTS_DIR [--title TEXT]

Reads bench.json, conformance-*.json, graph.json, e2e.json, summary.txt, tests.log and model.log
where present and prints: the machine (device, torch, triton, date, the ceilings measured in the
run, the FP8 peak where measured), every bench row (bf16 ops and the block-FP8 linear_fp8 / moe_fp8
rows) with its ratio to the floor and whether the issue's target is met, the end-to-end IndexShare
rows, the conformance totals and failures per dtype, graph-mode decode against eager per depth and
bucket (the issue's "graph >= 5x eager at B=1" and host time flat in layers), the end-to-end
conformance totals and failed rows, and the GPU test and model-check outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def target_met(row: dict) -> str:
    """'yes' / 'no' / '-' for a bench row against its target text (e.g. '<= 2.0x floor', '<= 30 us',
    '<= 1.0x torch._grouped_mm')."""
    tgt = row.get("target") or ""
    if "error" in row or "ms" not in row:
        return "-"
    m = re.match(r"<=\s*([\d.]+)\s*(x floor|us|x torch)", tgt)
    if not m:
        return "-"
    lim, unit = float(m.group(1)), m.group(2)
    val = {"x floor": row["ratio"], "us": row["ms"] * 1e3, "x torch": row["vs_baseline"]}[unit]
    return "yes" if val <= lim else "no"


def bench_tables(b: dict) -> list[str]:
    # files from before the fields existed: bf16, an 8192^3 matmul, the GLM-5.2 shapes
    dtype, n = b.get("dtype", "bfloat16"), b.get("matmul_n", 8192)
    small = " Shapes scaled down (--small): not a performance figure." if b.get("small") else ""
    fp8 = b.get("peak_fp8_flops")
    fp8_rows = any(r.get("op") in ("linear_fp8", "moe_fp8") for r in b["rows"])
    fp8_note = (f", FP8 `torch._scaled_mm` {n}^3 {fp8 / 1e12:.0f} TFLOP/s (the FP8 rows' compute ceiling)" if fp8
                else ", no FP8 GEMM measured (the FP8 rows' compute ceiling is the matmul's)" if fp8_rows else "")
    out = [f"Ceilings measured in this run: device copy {b['bandwidth_Bps'] / 1e12:.2f} TB/s (read + write), "
           f"{dtype} matmul {n}^3 {b['peak_flops'] / 1e12:.0f} TFLOP/s{fp8_note}; median of {b['reps']} runs per case "
           f"(the reference baselines: a fifth of that, at least 5); caches flushed before each run.{small}", "",
           "| op | shape | ours (us) | GB/s | TFLOP/s | floor (us) | ratio to floor | target | met | "
           "torch baseline (us) | ours / torch | timing | check |",
           "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|"]
    e2e = []
    for r in b["rows"]:
        if r["op"] == "e2e":
            e2e.append(r)
            continue
        if "error" in r:
            out.append(f"| {r['op']} | {r['shape']} | error: {r['error'][:120]} | | | | | {r['target']} | - | | | | |")
            continue
        out.append(f"| {r['op']} | {r['shape']} | {r['ms'] * 1e3:.1f} | {r['GBps']:.0f} | {r['TFLOPs']:.1f} | "
                   f"{r['floor_ms'] * 1e3:.1f} | {r['ratio']:.2f} | {r['target']} | {target_met(r)} | "
                   f"{r['baseline_ms'] * 1e3:.1f} | {r['vs_baseline']:.2f} | {r['timing']} | {r['check']} |")
    if e2e:
        out += ["", "| end-to-end decode step | IndexShare (ms) | indexer in every layer (ms) | every / IndexShare | timing |",
                "|---|---:|---:|---:|---|"]
        for r in e2e:
            if "error" in r:
                out.append(f"| {r['shape']} | error: {r['error'][:120]} | | | |")
            else:
                out.append(f"| {r['shape']} | {r['indexshare_ms']:.3f} | {r['every_layer_ms']:.3f} | "
                           f"{r['ratio']:.2f} | {r['timing']} |")
    return out


def conformance_lines(reports: list[dict], dtype: str) -> list[str]:
    out = []
    for rep in reports:
        res = rep.get("results", [])
        n_ok = sum(1 for r in res if r.get("passed"))
        native = sum(1 for r in res if r.get("path") == "native")
        out.append(f"- {rep.get('backend')} {rep.get('scale')} {dtype} on {rep.get('device')}: "
                   f"{n_ok} passed, {len(res) - n_ok} failed of {len(res)} cases; {native} ran natively")
        for r in res:
            if not r.get("passed"):
                out.append(f"  - FAIL {r.get('op')} {r.get('case')} {r.get('dtype')}: {r.get('detail')}")
    return out


def graph_lines(gr: dict) -> list[str]:
    """benchmarks/graph_decode.py's rows: ms per decode step eager and as graphs, and the target
    (at batch 1 the graph at least 5x faster; its time per step flat in the layer count)."""
    out = [f"Graph-mode decode ({gr.get('device')}, torch {gr.get('torch')}; benchmarks/graph_decode.py):", "",
           "| layers | batch | eager ms/step | graph ms/step | eager / graph | target (B=1: >= 5x) | capture s | tokens |",
           "|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in gr.get("rows", []):
        tgt = ("yes" if r["ratio"] >= 5 else "no") if r["batch"] == 1 else "-"
        cap = r.get("capture_s")
        out.append(f"| {r['layers']} | {r['batch']} | {r['eager_ms']:.3f} | {r['graph_ms']:.3f} | {r['ratio']:.2f} | "
                   f"{tgt} | {'-' if cap is None else f'{cap:.1f}'} | {'equal' if r['tokens_equal'] else 'DIFFER'} |")
    by_batch: dict = {}
    for r in gr.get("rows", []):
        by_batch.setdefault(r["batch"], []).append(r)
    for b, rows in sorted(by_batch.items()):
        if len(rows) > 1:
            lo, hi = min(rows, key=lambda r: r["layers"]), max(rows, key=lambda r: r["layers"])
            out.append(f"- batch {b}: graph step {lo['graph_ms']:.3f} ms at {lo['layers']} layers, "
                       f"{hi['graph_ms']:.3f} ms at {hi['layers']} ({hi['graph_ms'] / lo['graph_ms']:.2f}x for "
                       f"{hi['layers'] / lo['layers']:.1f}x the layers)")
    return out


def e2e_lines(reports: list[dict]) -> list[str]:
    """End-to-end conformance: totals per report and each failed row (the whole table is e2e.md)."""
    out = []
    for rep in reports:
        res = rep.get("results", [])
        skipped = [r for r in res if r.get("skipped")]
        ran = [r for r in res if not r.get("skipped")]
        n_ok = sum(1 for r in ran if r.get("passed"))
        out.append(f"- e2e {rep.get('backend')} ({rep.get('scale')}) on {rep.get('device')}: {n_ok} passed, "
                   f"{len(ran) - n_ok} failed of {len(ran)} rows, {len(skipped)} skipped; "
                   f"{rep.get('seconds', 0):.0f} s (table: e2e.md)")
        for r in ran:
            if not r.get("passed"):
                out.append(f"  - FAIL {r.get('weights')}/{r.get('cache')}/{r.get('mode')}/{r.get('dtype')}: "
                           f"{r.get('detail')}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    d = args.results
    lines = [f"### {args.title}" if args.title else ""]
    summ = os.path.join(d, "summary.txt")
    if os.path.exists(summ):
        lines += ["", "```", open(summ).read().rstrip(), "```"]
    b = _load(os.path.join(d, "bench.json"))
    if b:
        lines += ["", f"Bench: {b['device']}, torch {b['torch']}, backend {b['backend']}, {b['wall_s']:.0f} s.", ""]
        lines += bench_tables(b)
    for name in ("bf16", "f32"):
        c = _load(os.path.join(d, f"conformance-{name}.json"))
        if c:
            lines += [""] + conformance_lines(c, name)
    gr = _load(os.path.join(d, "graph.json"))
    if gr:
        lines += [""] + graph_lines(gr)
    e2e = _load(os.path.join(d, "e2e.json"))
    if e2e:
        lines += ["", "End-to-end conformance (glm52 conformance --e2e):", ""] + e2e_lines(e2e)
    tl = os.path.join(d, "tests.log")
    if os.path.exists(tl):
        tail = [x for x in open(tl).read().splitlines() if re.search(r"\d+ (passed|failed)", x)]
        lines += ["", f"GPU tests: {tail[-1].strip('= ') if tail else 'no summary line'}"]
    ml = os.path.join(d, "model.log")
    if os.path.exists(ml):
        checks = [x for x in open(ml).read().splitlines() if x.startswith(("PASS", "FAIL", "INFO"))]
        lines += ["", "Model check (benchmarks/gpu_model_check.py):", ""] + [f"- {x}" for x in checks]
    print("\n".join(lines).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
