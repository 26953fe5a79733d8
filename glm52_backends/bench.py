"""`glm52 bench`: per-op benchmarks of a backend at GLM-5.2 shapes, against floors measured in the same run.

For every case: median time over many runs, achieved GB/s and TFLOP/s, the floor
`max(bytes / bandwidth, flops / peak)` where bandwidth (a 2 GiB device copy) and peak (a bf16
8192^3 matmul) are measured in this run, the ratio to the floor, and the torch baseline (the
reference algorithm from backends/cpu_ref on the same device; `torch._grouped_mm` alone for MoE),
with the backend's output checked against the baseline's. Decode-size cases are timed as CUDA-graph
replays with the L2 flushed (a 256 MiB write) before each replay; prefill-size cases with events
around plain launches, also after a flush. Bytes are the compulsory traffic of the op (caches and
weights read once, outputs written once) in the dtypes used here (bf16 caches and weights, fp32
logits); flops count multiply-adds as 2.

`glm52 bench --list` prints the planned cases and needs no GPU. Usage:
    glm52 bench --backend cuda [--json PATH] [--ops indexer,mla,moe,mtp,e2e] [--reps N] [--list]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

# GLM-5.2 dimensions (spec/glm52-model.md section 1)
HI, DI, TOPK = 32, 128, 2048           # indexer heads, head dim, top-k
H, DL, DR = 64, 512, 64                # attention heads, latent, rope
E, K, HD, I = 256, 8, 6144, 2048       # experts, per token, hidden, expert width
V = 154880
BLOCK_SIZE = 64                        # paged-cache block (tokens)
BF16, F32 = 2, 4


@dataclass
class Case:
    op: str            # indexer_topk | sparse_mla | moe | mtp_verify | e2e
    shape: str
    params: dict
    bytes: float
    flops: float
    graph: bool        # decode size: timed under a CUDA graph
    target: str        # from the issue; "" if none


def expected_experts(T: int, e: int = E, k: int = K) -> float:
    """Distinct experts touched by T tokens routed uniformly: e * (1 - (1 - k/e)^T)."""
    return e * (1.0 - (1.0 - k / e) ** T)


def floor_s(nbytes: float, flops: float, bandwidth: float, peak: float) -> float:
    """The roofline floor in seconds: max(bytes / bandwidth, flops / peak)."""
    if bandwidth <= 0 or peak <= 0:
        raise ValueError(f"bandwidth ({bandwidth}) and peak ({peak}) must be positive")
    return max(nbytes / bandwidth, flops / peak)


def plan(ops: set[str] | None = None) -> list[Case]:
    """Every case the benchmark runs, with its compulsory bytes and flops."""
    cases: list[Case] = []

    def add(op, shape, params, nbytes, flops, graph, target=""):
        if ops is None or op in ops:
            cases.append(Case(op, shape, params, float(nbytes), float(flops), graph, target))

    for B, L, tgt in ((32, 32768, "<= 2.0x floor"), (8, 131072, "<= 2.0x floor"), (1, 131072, "<= 30 us")):
        add("indexer_topk", f"decode B={B} L={L}", {"B": B, "L": L, "q": 1},
            B * L * DI * BF16 + B * HI * (DI * BF16 + F32) + B * TOPK * 4, 2 * B * L * HI * DI, True, tgt)
    S = 8192
    add("indexer_topk", f"prefill S={S}", {"B": 1, "L": S, "q": S},
        S * DI * BF16 + S * HI * (DI * BF16 + F32) + S * TOPK * 4, 2 * HI * DI * S * (S + 1) / 2, False, "<= 4x floor")
    for B, tgt in ((32, "<= 2.0x floor"), (128, "<= 2.0x floor"), (1, "<= 20 us")):
        L = 32768 if B > 1 else 131072
        add("sparse_mla", f"decode B={B} L={L}", {"B": B, "L": L},
            B * TOPK * (DL + DR) * BF16 + B * H * (DL + DR + DL) * BF16 + B * TOPK * 4,
            2 * B * H * TOPK * (DL + DR + DL), True, tgt)
    for T in (1, 16, 128, 4096):
        ea = expected_experts(T)
        add("moe", f"T={T} (routing included)", {"T": T}, ea * 3 * HD * I * BF16 + 2 * T * HD * BF16 + T * E * F32,
            2 * T * K * 3 * HD * I, T <= 128, "<= 1.0x torch._grouped_mm")
    for B, tgt in ((64, "<= 1.5x floor"), (1, "<= 15 us")):
        add("mtp_verify", f"greedy B={B} k=3 V={V}", {"B": B, "k": 3}, B * 4 * V * F32, 0.0, True, tgt)
    for L in (32768, 131072):
        add("e2e", f"decode B=8 L={L}, 1 full + 3 shared layers", {"B": 8, "L": L}, 0.0, 0.0, True,
            "report IndexShare vs indexer in every layer")
    return cases


# ---- timing (GPU only) ----------------------------------------------------------------------------
class Timer:
    """Median of event-timed runs, L2 flushed before each; decode sizes replay a CUDA graph."""

    def __init__(self, torch, reps: int):
        self.torch = torch
        self.reps = reps
        self.flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, graph: bool, reps: int | None = None) -> tuple[float, str]:
        torch = self.torch
        fn()                                                         # compile / warm up
        torch.cuda.synchronize()
        how = "events"
        run = fn
        if graph:
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    fn()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                run, how = g.replay, "cuda graph"
            except Exception as e:  # noqa: BLE001 - a baseline with host syncs cannot be captured
                torch.cuda.synchronize()
                how = f"events (not capturable: {type(e).__name__})"
        times = []
        for _ in range(reps or self.reps):
            self.flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        return statistics.median(times), how


def measure_ceilings(torch, timer: Timer) -> tuple[float, float]:
    """(bytes/s of a 2 GiB device copy counting read + write, bf16 matmul flop/s at 8192^3)."""
    src = torch.empty(2 ** 31 // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    t, _ = timer(lambda: dst.copy_(src), graph=False)
    bw = 2 * src.numel() * 4 / t
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t, _ = timer(lambda: a @ b, graph=False)
    return bw, 2 * 8192 ** 3 / t


def _paged(torch, B, L, D, dtype):
    nb = B * (-(-L // BLOCK_SIZE))
    cache = torch.randn(nb, BLOCK_SIZE, D, dtype=dtype, device="cuda")
    bt = torch.randperm(nb, device="cuda").view(B, -1).to(torch.int32)
    return cache, bt


def _inputs(torch, case: Case):
    """(backend call, baseline call, output comparison) for one case, on the GPU."""
    from glm52_backends.backends.cpu_ref import ops as ref
    p = case.params
    bf = torch.bfloat16
    if case.op in ("indexer_topk", "sparse_mla"):
        B, L = p["B"], p["L"]
        q_len = p.get("q", 1)
        cu = torch.arange(B + 1, dtype=torch.int32, device="cuda") * q_len
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        if case.op == "indexer_topk":
            kc, bt = _paged(torch, B, L, DI, bf)
            q = torch.randn(B * q_len, HI, DI, dtype=bf, device="cuda")
            w = torch.randn(B * q_len, HI, device="cuda") * (HI * DI) ** -0.5
            return ((lambda be: be.indexer_topk(q, w, kc, bt, lens, cu, TOPK)),
                    (lambda: ref.indexer_topk(q, w, kc, bt, lens, cu, TOPK)), "topk")
        kv, bt = _paged(torch, B, L, DL + DR, bf)
        q = torch.randn(B, H, DL + DR, dtype=bf, device="cuda")
        idx = torch.stack([torch.randperm(L, device="cuda")[:TOPK] for _ in range(B)]).to(torch.int32)
        scale = (192 + 64) ** -0.5
        return ((lambda be: be.sparse_mla(q, kv, idx, bt, lens, cu, scale, DL)),
                (lambda: ref.sparse_mla(q, kv, idx, bt, lens, cu, scale, DL)), "first")
    if case.op == "moe":
        T = p["T"]
        x = torch.randn(T, HD, dtype=bf, device="cuda")
        w13 = torch.randn(E, 2 * I, HD, dtype=bf, device="cuda") * HD ** -0.5
        w2 = torch.randn(E, HD, I, dtype=bf, device="cuda") * I ** -0.5
        logits = torch.randn(T, E, device="cuda")
        bias = torch.rand(E, device="cuda") * 0.1
        ids, wts = ref.moe_route(logits, bias, K, 1, 1, True, 2.5)
        order = ids.view(-1).argsort(stable=True)
        offs = torch.bincount(ids.view(-1), minlength=E).cumsum(0).to(torch.int32)
        xs = x[order // K]
        act = torch.randn(T * K, I, dtype=bf, device="cuda")

        def grouped_mm_alone():
            torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
            return torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)

        def ours(be):
            i, w_ = be.moe_route(logits, bias, K, 1, 1, True, 2.5)
            return be.moe_experts(x, w13, w2, i, w_)
        return ours, grouped_mm_alone, None
    if case.op == "mtp_verify":
        B, k = p["B"], p["k"]
        lg = torch.randn(B, k + 1, V, device="cuda")
        draft = lg[:, :k].argmax(-1)
        draft[::2, 1] = 0                                          # half the requests miss at 1
        return ((lambda be: be.mtp_verify(draft, lg)), (lambda: ref.mtp_verify(draft, lg)), "exact")
    raise ValueError(case.op)


def _compare(torch, kind, ours, base) -> str:
    if kind is None:
        return "-"
    if kind == "topk":   # ties may differ: compare the sets' overlap (rows hold distinct positions)
        a, b = ours.long().sort(-1).values, base.long().sort(-1).values.contiguous()
        j = torch.searchsorted(b, a).clamp(max=b.shape[1] - 1)
        same = float(((b.gather(1, j) == a) & (a >= 0)).sum()) / float((b >= 0).sum())
        return f"set overlap {same:.4f}"
    if kind == "first":
        o, r = ours[0].float(), base[0].float()
        return f"rel err {float((o - r).abs().max() / r.abs().max()):.1e}"
    ok = all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(ours, base))
    return "exact" if ok else "MISMATCH"


def run_e2e(torch, be, timer, B: int, L: int) -> dict:
    """A decode step of a 4-layer slice at real dimensions (one full + three shared layers, 256
    experts): projections, indexer, sparse MLA, routing + experts per layer; expert weights are one
    set shared by the four layers (19 GB per set; L2 holds none of it, so timing is unaffected).
    Times IndexShare (indexer in the full layer only) against the indexer in every layer."""
    bf = torch.bfloat16
    ql, dn = 2048, 192
    lin = lambda o, i: torch.randn(o, i, dtype=bf, device="cuda") * i ** -0.5  # noqa: E731
    layers = [dict(wq_a=lin(ql, HD), wq_b=lin(H * (dn + DR), ql), wkv_a=lin(DL + DR, HD), wo=lin(HD, H * 256),
                   iq=lin(HI * DI, ql), ik=lin(DI, HD), iw=lin(HI, HD), gate=lin(E, HD).float(),
                   w_uk=lin(H * dn, DL).view(H, dn, DL), w_uv=lin(H * 256, DL).view(H, 256, DL)) for _ in range(4)]
    w13, w2 = lin(E * 2 * I, HD).view(E, 2 * I, HD), lin(E * HD, I).view(E, HD, I)
    bias = torch.rand(E, device="cuda") * 0.1
    kv, bt = _paged(torch, B, L, DL + DR, bf)
    kc, _ = _paged(torch, B, L, DI, bf)
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    x0 = torch.randn(B, HD, dtype=bf, device="cuda")

    def step(every_layer: bool):
        x, idx = x0, None
        for j, lw in enumerate(layers):
            qr = be.linear(x, lw["wq_a"])
            q = be.linear(qr, lw["wq_b"]).view(B, H, dn + DR)
            be.linear(x, lw["wkv_a"])
            if j == 0 or every_layer:
                iq = be.linear(qr, lw["iq"]).view(B, HI, DI)
                be.linear(x, lw["ik"])
                w = be.linear(x, lw["iw"]).float()
                idx = be.indexer_topk(iq, w, kc, bt, lens, cu, TOPK)
            q_lat = torch.einsum("thd,hdc->thc", q[..., :dn], lw["w_uk"])              # absorb W_UK
            o, _ = be.sparse_mla(torch.cat([q_lat, q[..., dn:]], -1), kv, idx, bt, lens, cu, 256 ** -0.5, DL)
            o = torch.einsum("thc,hvc->thv", o, lw["w_uv"]).reshape(B, H * 256)         # absorb W_UV
            x = x + be.linear(o, lw["wo"])
            ids, wts = be.moe_route(be.linear(x.float(), lw["gate"]), bias, K, 1, 1, True, 2.5)
            x = x + be.moe_experts(x, w13, w2, ids, wts)
        return x

    t_share, how = timer(lambda: step(False), graph=True)
    t_every, _ = timer(lambda: step(True), graph=True)
    return {"indexshare_ms": t_share * 1e3, "every_layer_ms": t_every * 1e3, "ratio": t_every / t_share,
            "timing": how}


def run(backend: str, cases: list[Case], reps: int) -> dict:
    import torch
    from glm52_backends.registry import get_backend
    be = get_backend(backend)
    timer = Timer(torch, reps)
    bw, peak = measure_ceilings(torch, timer)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "backend": be.name,
           "bandwidth_Bps": bw, "peak_flops": peak, "reps": reps, "rows": []}
    print(f"device {out['device']}  backend {be.name}  measured: copy {bw / 1e12:.2f} TB/s, "
          f"bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    for c in cases:
        row = asdict(c)
        if c.op == "e2e":
            try:
                row.update(run_e2e(torch, be, timer, c.params["B"], c.params["L"]))
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                row.update(error=f"{type(e).__name__}: {e}")
                out["rows"].append(row)
                print(f"{c.op:13s} {c.shape:44s} ERROR {row['error']}", flush=True)
                continue
            out["rows"].append(row)
            print(f"{c.op:13s} {c.shape:44s} IndexShare {row['indexshare_ms']:.3f} ms, every layer "
                  f"{row['every_layer_ms']:.3f} ms, ratio {row['ratio']:.2f}", flush=True)
            continue
        try:
            ours, base, kind = _inputs(torch, c)
            t, how = timer(lambda: ours(be), c.graph)
            # the reference baselines synchronise with the host (no graph capture: a failed capture
            # can leave the stream unusable); torch._grouped_mm alone (MoE) is captured like ours
            tb, how_b = timer(base, c.graph and c.op == "moe", reps=max(5, timer.reps // 5))
            check = _compare(torch, kind, ours(be), base())
        except Exception as e:  # noqa: BLE001 - one broken case must not cost the rest of the run
            import traceback
            row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
            out["rows"].append(row)
            print(f"{c.op:13s} {c.shape:44s} ERROR {row['error']}\n{row['traceback']}", flush=True)
            del e
            torch.cuda.synchronize()
            continue
        fl = floor_s(c.bytes, c.flops, bw, peak)
        row.update(ms=t * 1e3, GBps=c.bytes / t / 1e9, TFLOPs=c.flops / t / 1e12, floor_ms=fl * 1e3,
                   ratio=t / fl, baseline_ms=tb * 1e3, baseline_ratio=tb / fl, vs_baseline=t / tb,
                   timing=how, baseline_timing=how_b, check=check)
        out["rows"].append(row)
        del ours, base
        print(f"{c.op:13s} {c.shape:44s} {t * 1e6:9.1f} us  {row['GBps']:7.0f} GB/s  {row['TFLOPs']:6.1f} TF/s  "
              f"floor {fl * 1e6:8.1f} us  ratio {row['ratio']:5.2f}  torch {tb * 1e6:9.1f} us "
              f"({row['baseline_ratio']:.2f}x; ours/torch {row['vs_baseline']:.2f})  {row['check']}", flush=True)
    return out


def bench_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="glm52 bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--json", metavar="PATH", help="write the results (or with --list, the plan) as JSON")
    ap.add_argument("--ops", default="indexer_topk,sparse_mla,moe,mtp_verify,e2e",
                    help="comma-separated subset of: indexer_topk, sparse_mla, moe, mtp_verify, e2e")
    ap.add_argument("--reps", type=int, default=50, help="timed runs per case (median reported)")
    ap.add_argument("--list", "--dry-run", dest="list", action="store_true",
                    help="print the planned cases (bytes, flops, targets) and exit; needs no GPU")
    args = ap.parse_args(argv)
    ops = {o.strip() for o in args.ops.split(",") if o.strip()}
    unknown = ops - {"indexer_topk", "sparse_mla", "moe", "mtp_verify", "e2e"}
    if unknown:
        print(f"glm52 bench: unknown --ops {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.reps < 1:
        print("glm52 bench: --reps must be >= 1", file=sys.stderr)
        return 2
    cases = plan(ops)
    if args.list:
        for c in cases:
            print(f"{c.op:13s} {c.shape:44s} bytes {c.bytes / 1e6:10.2f} MB  flops {c.flops / 1e9:10.2f} G  "
                  f"{'cuda graph' if c.graph else 'events    '}  target {c.target or '-'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"plan": [asdict(c) for c in cases]}, f, indent=1)
        return 0
    import torch
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        print(f"glm52 bench: needs a CUDA GPU ({why}); `glm52 bench --list` shows the planned cases",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    res = run(args.backend, cases, args.reps)
    res["wall_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
