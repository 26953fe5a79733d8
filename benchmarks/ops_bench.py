"""`glm52 bench`: per-op benchmarks of a backend at GLM-5.2 shapes, against floors measured in the same run.

For every case: median time over many runs, achieved GB/s and TFLOP/s, the floor
`max(bytes / bandwidth, flops / peak)` where bandwidth (a device copy, 2 GiB on an accelerator)
and peak (an 8192^3 matmul in the benchmark dtype on an accelerator) are measured in this run on
the backend's device, the ratio to the floor, and the torch baseline (the contract's reference
from glm52_backends.ops on the same device; `torch._grouped_mm` alone for MoE), with the
backend's output checked against the reference's.

Block-FP8 rows (`linear_fp8`: GLM-5.2's q_b_proj and o_proj at M = 1, 64, 4096; `moe_experts_fp8`: the
routed experts at T = 1, 16, 128, 4096) count 1 byte a weight plus the f32 block scales; their
compute floor uses an FP8 peak measured in the same run (`torch._scaled_mm` 8192^3 with one scale
per tensor, where torch and the GPU have it; else the dtype's matmul peak). Baselines: the GEMM
alone, `torch._scaled_mm` on pre-quantized activations with 1x128 / 128x128 block scales where
available (else the dense GEMM in the benchmark dtype on the dequantized weight), and
`torch._grouped_mm` in the benchmark dtype on the dequantized experts; the reference they are
checked against is the format's exact arithmetic (glm52_backends/quant.py). Bytes are the compulsory traffic of the op
(caches and weights read once, outputs written once) in the dtypes used (bf16 caches and weights
by default, fp32 logits); flops count multiply-adds as 2.

Timing follows the backend's device: on CUDA, decode-size cases are CUDA-graph replays and
prefill-size cases events around plain launches, each run after a 256 MiB write that flushes the
L2; on another accelerator (npu, xpu, ...), its events when its torch module has them, else
synchronize + perf_counter, after the same flush; on the CPU, perf_counter after a 32 MiB flush.
The cache-reading ops get the step as the contract's loose device tensors (block_table, seq_lens,
cu_seqlens_q, built once before timing), as the model passes them: a backend derives each token's
request and position from them on the device, so its op can be captured in a graph.

Each op's benchmark (its planned cases and its calls) is `benchmarks/ops/<op>.py`, named after the op;
this module times them (the names `moe` and `moe_fp8` of `--ops` still select moe_experts' rows).

`--small` scales every shape down (tens of tokens, 4-16 heads, 16 experts) so the whole run takes
seconds on any device, the CPU included: a check that the benchmark and the backend run, not a
performance figure. `glm52 bench --list` prints the planned cases and needs no device. Usage:
    glm52 bench --backend cuda [--json PATH]
                [--ops indexer_topk,sparse_mla,moe_experts,linear_fp8,moe_experts_fp8,mtp_verify,e2e] [--reps N] [--small] [--dtype bfloat16|float32|float16] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict

from glm52_backends.config import FLOAT_DTYPES

from .ops import BENCHES, FP8_BENCHES, OLD_NAMES
from .ops.common import FULL, SMALL, Case, Env, decode_step, paged

OPS = (*BENCHES, "e2e")       # the per-op benchmarks (benchmarks/ops/<op>.py), then a model slice
FP8_OPS = FP8_BENCHES
DTYPES = {name: FLOAT_DTYPES[name].itemsize for name in ("bfloat16", "float16", "float32")}   # -> bytes


def floor_s(nbytes: float, flops: float, bandwidth: float, peak: float) -> float:
    """The roofline floor in seconds: max(bytes / bandwidth, flops / peak)."""
    if bandwidth <= 0 or peak <= 0:
        raise ValueError(f"bandwidth ({bandwidth}) and peak ({peak}) must be positive")
    return max(nbytes / bandwidth, flops / peak)


def plan(ops: set[str] | None = None, small: bool = False, elt: int = 2) -> list[Case]:
    """Every case the benchmark runs, with its compulsory bytes and flops (`elt`: bytes per element
    of activations, caches and weights; 2 for bf16). Each op's cases are planned by benchmarks/ops/<op>.py."""
    d = SMALL if small else FULL
    A = elt
    cases: list[Case] = []

    def add(op, shape, params, nbytes, flops, graph, target=""):
        if ops is None or op in ops:
            cases.append(Case(op, shape, params, float(nbytes), float(flops), graph, "" if small else target))

    for name, (plan_op, _) in BENCHES.items():
        if ops is None or name in ops:
            plan_op(add, d, small, A)
    B = 2 if small else 8
    for L in ((300, 600) if small else (32768, 131072)):
        add("e2e", f"decode B={B} L={L}, 1 full + 3 shared layers", {"B": B, "L": L}, 0.0, 0.0, True,
            "report IndexShare vs indexer in every layer")
    return cases


# ---- timing -----------------------------------------------------------------------------------------
def device_of(be, torch):
    """The torch device a bound backend runs on: its `device`, else its first declared device type."""
    dev = getattr(be.backend, "device", None)
    if dev is not None:
        return torch.device(dev)
    devices = be.capabilities.devices or ("cpu",)
    return torch.device(devices[0])


class Timer:
    """Median of timed runs of `fn`, the caches flushed before each.

    Subclasses set how a run is timed (`_timed`) and how the host waits for the device (`sync`).
    """
    how = "perf_counter"

    def __init__(self, torch, device, reps: int, flush_bytes: int):
        self.torch = torch
        self.device = device
        self.reps = reps
        self.flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device)

    def sync(self) -> None:
        pass

    def _timed(self, run) -> float:
        self.sync()
        t0 = time.perf_counter()
        run()
        self.sync()
        return time.perf_counter() - t0

    def _prepare(self, fn, graph: bool):
        """(what to run, how it is timed); CUDA captures decode sizes in a graph."""
        return fn, self.how

    def __call__(self, fn, graph: bool, reps: int | None = None) -> tuple[float, str]:
        fn()                                                         # compile / warm up
        self.sync()
        run, how = self._prepare(fn, graph)
        times = []
        for _ in range(reps or self.reps):
            self.flush.zero_()
            times.append(self._timed(run))
        return statistics.median(times), how


class SyncTimer(Timer):
    """An accelerator without timing events: synchronize + perf_counter."""
    how = "synchronize + perf_counter"

    def __init__(self, torch, device, reps, flush_bytes, module):
        super().__init__(torch, device, reps, flush_bytes)
        self.module = module

    def sync(self) -> None:
        self.module.synchronize()


class EventTimer(SyncTimer):
    """Device events around each run (torch.cuda, torch.npu, torch.xpu, ...)."""
    how = "events"

    def _timed(self, run) -> float:
        a, b = self.module.Event(enable_timing=True), self.module.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e-3


class CudaTimer(EventTimer):
    """Events; decode sizes replay a CUDA graph of the call."""

    def _prepare(self, fn, graph: bool):
        torch = self.torch
        if not graph:
            return fn, "events"
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            return g.replay, "cuda graph"
        except Exception as e:  # noqa: BLE001 - a baseline with host syncs cannot be captured
            torch.cuda.synchronize()
            return fn, f"events (not capturable: {type(e).__name__})"


def make_timer(torch, device, reps: int) -> Timer:
    """The timer for `device`: CUDA events (+ graphs), another accelerator's events or synchronize +
    perf_counter, or perf_counter on the CPU."""
    if device.type == "cpu":
        return Timer(torch, device, reps, 32 * 2 ** 20)
    if device.type == "cuda":
        return CudaTimer(torch, device, reps, 256 * 2 ** 20, torch.cuda)
    mod = getattr(torch, device.type, None)
    if mod is None or not callable(getattr(mod, "synchronize", None)):
        raise RuntimeError(f"glm52 bench: torch has no `torch.{device.type}` module to synchronize the "
                           f"{device.type} device (is its adapter, e.g. torch_npu, imported?)")
    try:
        e = mod.Event(enable_timing=True)
        e.record()
        mod.synchronize()
        return EventTimer(torch, device, reps, 256 * 2 ** 20, mod)
    except Exception:  # noqa: BLE001 - no usable events on this device: wall clock around a sync
        return SyncTimer(torch, device, reps, 256 * 2 ** 20, mod)


def ceiling_sizes(device, small: bool) -> tuple[int, int]:
    """(bytes copied, matmul n) for the ceilings: 2 GiB / 8192 on an accelerator, less with --small
    or on the CPU."""
    if device.type == "cpu":
        return (64 if small else 512) * 2 ** 20, 1024 if small else 2048
    return (256 * 2 ** 20, 2048) if small else (2 ** 31, 8192)


def measure_fp8_peak(torch, timer: Timer, n: int) -> float | None:
    """FP8 matmul flop/s: `torch._scaled_mm` at n^3 with one scale per tensor, bfloat16 out (CUDA
    only); None where torch or the device has no FP8 GEMM."""
    dev = timer.device
    if dev.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    try:
        a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        t, _ = timer(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16), graph=False)
    except Exception:  # noqa: BLE001 - e.g. a GPU without FP8 tensor cores
        return None
    return 2 * n ** 3 / t


def measure_ceilings(torch, timer: Timer, dtype, copy_bytes: int, n: int) -> tuple[float, float]:
    """(bytes/s of a device copy counting read + write, matmul flop/s at n^3 in `dtype`)."""
    dev = timer.device
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=dev).normal_()
    dst = torch.empty_like(src)
    t, _ = timer(lambda: dst.copy_(src), graph=False)
    bw = 2 * src.numel() * 4 / t
    del src, dst
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    t, _ = timer(lambda: a @ b, graph=False)
    return bw, 2 * n ** 3 / t



# ---- cases --------------------------------------------------------------------------------------------
def _inputs(env: Env, be, case: Case):
    """(backend call, baseline call, reference call or None, comparison kind, baseline name) for one case:
    the op's own builder (benchmarks/ops/<op>.py)."""
    from glm52_backends import ops as ref
    if case.op not in BENCHES:
        raise ValueError(case.op)
    return BENCHES[case.op][1](env, be, case, ref)


def _compare(torch, kind, ours, want) -> str:
    """The backend's output against the reference's, as the report prints it."""
    if kind is None:
        return "-"
    if kind == "topk":   # ties may differ: compare the sets' overlap (rows hold distinct positions)
        a, b = ours.long().sort(-1).values, want.long().sort(-1).values.contiguous()
        j = torch.searchsorted(b, a).clamp(max=b.shape[1] - 1)
        same = float(((b.gather(1, j) == a) & (a >= 0)).sum()) / float((b >= 0).sum())
        return f"set overlap {same:.4f}"
    if kind == "close":
        o, r = ours.float(), want.float()
        return f"rel err {float((o - r).abs().max() / r.abs().max()):.1e}"
    ours, want = (ours,) if torch.is_tensor(ours) else ours, (want,) if torch.is_tensor(want) else want
    ok = len(ours) == len(want) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(ours, want))
    return "exact" if ok else "MISMATCH"


def run_e2e(env: Env, be, timer: Timer, B: int, L: int) -> dict:
    """A decode step of a 4-layer slice (one full + three shared layers, all experts): projections,
    indexer, sparse MLA, routing + experts per layer; expert weights are one set shared by the four
    layers (19 GB per set at GLM-5.2 size; L2 holds none of it, so timing is unaffected).
    Times IndexShare (indexer in the full layer only) against the indexer in every layer."""
    torch, dev, dt, d = env.torch, env.device, env.dtype, env.d
    dn, H = d.DN, d.H
    lin = lambda o, i: torch.randn(o, i, dtype=dt, device=dev) * i ** -0.5  # noqa: E731
    layers = [dict(wq_a=lin(d.QL, d.HD), wq_b=lin(H * (dn + d.DR), d.QL), wkv_a=lin(d.DL + d.DR, d.HD),
                   wo=lin(d.HD, H * d.DV), iq=lin(d.HI * d.DI, d.QL), ik=lin(d.DI, d.HD), iw=lin(d.HI, d.HD),
                   gate=lin(d.E, d.HD).float(), w_uk=lin(H * dn, d.DL).view(H, dn, d.DL),
                   w_uv=lin(H * d.DV, d.DL).view(H, d.DV, d.DL)) for _ in range(4)]
    w13, w2 = lin(d.E * 2 * d.I, d.HD).view(d.E, 2 * d.I, d.HD), lin(d.E * d.HD, d.I).view(d.E, d.HD, d.I)
    bias = torch.rand(d.E, device=dev) * 0.1
    bt, (c, kpe, kc) = paged(env, B, L, (d.DL, d.DR, d.DI))
    cu, lens = decode_step(env, B, L)
    x0 = torch.randn(B, d.HD, dtype=dt, device=dev)
    scale = (dn + d.DR) ** -0.5

    def step(every_layer: bool):
        x, idx = x0, None
        for j, lw in enumerate(layers):
            qr = be.linear(x, lw["wq_a"])
            q = be.linear(qr, lw["wq_b"]).view(B, H, dn + d.DR)
            be.linear(x, lw["wkv_a"])
            if j == 0 or every_layer:
                iq = be.linear(qr, lw["iq"]).view(B, d.HI, d.DI)
                be.linear(x, lw["ik"])
                w = be.linear(x, lw["iw"]).float()
                idx = be.indexer_topk(iq, w, kc, bt, lens, cu, d.TOPK)
            q_lat = torch.einsum("thd,hdc->thc", q[..., :dn], lw["w_uk"])              # absorb W_UK
            o = be.sparse_mla(torch.cat([q_lat, q[..., dn:]], -1), c, kpe, idx, bt, lens, cu, scale)
            o = torch.einsum("thc,hvc->thv", o, lw["w_uv"]).reshape(B, H * d.DV)       # absorb W_UV
            x = x + be.linear(o, lw["wo"])
            ids, wts = be.moe_route(be.linear(x.float(), lw["gate"]), bias, d.K, 1, 1, True, 2.5)
            x = x + be.moe_experts(x, w13, w2, ids, wts)
        return x

    t_share, how = timer(lambda: step(False), graph=True)
    t_every, _ = timer(lambda: step(True), graph=True)
    return {"indexshare_ms": t_share * 1e3, "every_layer_ms": t_every * 1e3, "ratio": t_every / t_share,
            "timing": how}


def _device_name(torch, device) -> str:
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and callable(getattr(mod, "get_device_name", None)):
        try:
            return str(mod.get_device_name())
        except Exception:  # noqa: BLE001 - a name is only for the report
            pass
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


def run(be, cases: list[Case], reps: int, *, small: bool = False, dtype: str | None = None) -> dict:
    """Time every case on `be` (a BoundBackend) on its device; rows as in the module docstring."""
    import torch
    device = device_of(be, torch)
    dtype = dtype or ("float32" if device.type == "cpu" else "bfloat16")
    env = Env(torch, device, getattr(torch, dtype), SMALL if small else FULL)
    torch.manual_seed(0)
    timer = make_timer(torch, device, reps)
    copy_bytes, n = ceiling_sizes(device, small)
    bw, peak = measure_ceilings(torch, timer, env.dtype, copy_bytes, n)
    fp8_peak = measure_fp8_peak(torch, timer, n) if any(c.op in FP8_OPS for c in cases) else None
    peak8 = fp8_peak or peak                     # FP8 rows' compute ceiling: the dtype's where none
    out = {"device": _device_name(torch, device), "device_type": device.type, "torch": torch.__version__,
           "backend": be.name, "dtype": dtype, "small": small, "dims": asdict(env.d),
           "bandwidth_Bps": bw, "peak_flops": peak, "peak_fp8_flops": fp8_peak, "copy_bytes": copy_bytes,
           "matmul_n": n, "reps": reps, "rows": []}
    fp8_note = f", FP8 _scaled_mm {n}^3 {fp8_peak / 1e12:.2f} TFLOP/s" if fp8_peak else ""
    print(f"device {out['device']}  backend {be.name}  {dtype}{'  (--small shapes)' if small else ''}  measured: "
          f"copy {bw / 1e9:.1f} GB/s, {dtype} matmul {n}^3 {peak / 1e12:.2f} TFLOP/s{fp8_note}", flush=True)
    for c in cases:
        row = asdict(c)
        if c.op == "e2e":
            try:
                row.update(run_e2e(env, be, timer, c.params["B"], c.params["L"]))
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                row.update(error=f"{type(e).__name__}: {e}")
                out["rows"].append(row)
                print(f"{c.op:15s} {c.shape:44s} ERROR {row['error']}", flush=True)
                timer.sync()
                continue
            out["rows"].append(row)
            print(f"{c.op:15s} {c.shape:44s} IndexShare {row['indexshare_ms']:.3f} ms, every layer "
                  f"{row['every_layer_ms']:.3f} ms, ratio {row['ratio']:.2f}", flush=True)
            continue
        try:
            ours, base, reference, kind, base_name = _inputs(env, be, c)
            t, how = timer(ours, c.graph)
            # the reference baselines synchronise with the host (no graph capture: a failed capture
            # can leave the stream unusable); torch._grouped_mm alone (MoE) is captured like ours
            tb, how_b = timer(base, c.graph and base_name.startswith(("torch._grouped_mm", "torch._scaled_mm")),
                              reps=max(5, timer.reps // 5))
            check = _compare(torch, kind, ours(), reference())
        except Exception as e:  # noqa: BLE001 - one broken case must not cost the rest of the run
            import traceback
            row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
            out["rows"].append(row)
            print(f"{c.op:15s} {c.shape:44s} ERROR {row['error']}\n{row['traceback']}", flush=True)
            del e
            timer.sync()
            continue
        fl = floor_s(c.bytes, c.flops, bw, peak8 if c.op in FP8_OPS else peak)
        row.update(ms=t * 1e3, GBps=c.bytes / t / 1e9, TFLOPs=c.flops / t / 1e12, floor_ms=fl * 1e3,
                   ratio=t / fl, baseline_ms=tb * 1e3, baseline_ratio=tb / fl, vs_baseline=t / tb,
                   baseline=base_name, timing=how, baseline_timing=how_b, check=check)
        out["rows"].append(row)
        del ours, base, reference
        print(f"{c.op:15s} {c.shape:44s} {t * 1e6:9.1f} us  {row['GBps']:7.1f} GB/s  {row['TFLOPs']:7.3f} TF/s  "
              f"floor {fl * 1e6:8.1f} us  ratio {row['ratio']:5.2f}  {base_name} {tb * 1e6:9.1f} us "
              f"({row['baseline_ratio']:.2f}x; ours/baseline {row['vs_baseline']:.2f})  {row['check']}", flush=True)
    return out


def bench_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="glm52 bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--json", metavar="PATH", help="write the results (or with --list, the plan) as JSON")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of: " + ", ".join(OPS))
    ap.add_argument("--reps", type=int, default=50, help="timed runs per case (median reported)")
    ap.add_argument("--small", action="store_true",
                    help="scaled-down shapes: runs in seconds on any device, the CPU included (not a performance figure)")
    ap.add_argument("--dtype", choices=sorted(DTYPES),
                    help="activations, caches and weights (default: bfloat16, float32 on the CPU)")
    ap.add_argument("--list", "--dry-run", dest="list", action="store_true",
                    help="print the planned cases (bytes, flops, targets) and exit; needs no device")
    args = ap.parse_args(argv)
    ops = {OLD_NAMES.get(o.strip(), o.strip()) for o in args.ops.split(",") if o.strip()}
    unknown = ops - set(OPS)
    if unknown:
        print(f"glm52 bench: unknown --ops {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.reps < 1:
        print("glm52 bench: --reps must be >= 1", file=sys.stderr)
        return 2
    if args.list:
        cases = plan(ops, args.small, DTYPES[args.dtype or "bfloat16"])
        for c in cases:
            print(f"{c.op:15s} {c.shape:44s} bytes {c.bytes / 1e6:10.2f} MB  flops {c.flops / 1e9:10.2f} G  "
                  f"{'cuda graph' if c.graph else 'events    '}  target {c.target or '-'}")
        if args.json:                       # a temporary file renamed into place (glm52_backends/files.py)
            from glm52_backends.files import write_text
            write_text(args.json, json.dumps({"plan": [asdict(c) for c in cases]}, indent=1))
        return 0
    import torch
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.backend == "cuda" and not torch.cuda.is_available() and not (args.small and interpreting):
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        print(f"glm52 bench: needs a CUDA GPU ({why}); `glm52 bench --list` shows the planned cases "
              f"(`--small` with TRITON_INTERPRET=1 runs the kernels on Triton's interpreter)", file=sys.stderr)
        return 2
    from glm52_backends.registry import BackendUnavailable, get_backend
    try:
        be = get_backend(args.backend)
    except BackendUnavailable as e:
        print(f"glm52 bench: backend {args.backend!r} is not available here: {e}", file=sys.stderr)
        return 2
    device = device_of(be, torch)
    if device.type == "cpu" and not args.small:
        print(f"glm52 bench: backend {be.name!r} runs on the CPU; the GLM-5.2 shapes need an accelerator "
              f"(tens of GB of weights and caches): use --small", file=sys.stderr)
        return 2
    dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    cases = plan(ops, args.small, DTYPES[dtype])
    t0 = time.perf_counter()
    res = run(be, cases, args.reps, small=args.small, dtype=dtype)
    res["wall_s"] = time.perf_counter() - t0
    if args.json:
        from glm52_backends.files import write_text
        write_text(args.json, json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
