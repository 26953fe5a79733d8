"""`glm52 bench`: per-op benchmarks of a backend at GLM-5.2 shapes, against floors measured in the same run.

For every case: median time over many runs, achieved GB/s and TFLOP/s, the floor
`max(bytes / bandwidth, flops / peak)` where bandwidth (a device copy, 2 GiB on an accelerator)
and peak (an 8192^3 matmul in the benchmark dtype on an accelerator) are measured in this run on
the backend's device, the ratio to the floor, and the torch baseline (the contract's reference
from glm52_backends.ops on the same device; `torch._grouped_mm` alone for MoE), with the
backend's output checked against the reference's.

Block-FP8 rows (`linear_fp8`: GLM-5.2's q_b_proj and o_proj at M = 1, 64, 4096; `moe_fp8`: the
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

`--small` scales every shape down (tens of tokens, 4-16 heads, 16 experts) so the whole run takes
seconds on any device, the CPU included: a check that the benchmark and the backend run, not a
performance figure. `glm52 bench --list` prints the planned cases and needs no device. Usage:
    glm52 bench --backend cuda [--json PATH] [--ops indexer_topk,sparse_mla,moe,linear_fp8,moe_fp8,mtp_verify,e2e]
                [--reps N] [--small] [--dtype bfloat16|float32|float16] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from glm52_backends.config import FLOAT_DTYPES, GLM52_CONFIG

OPS = ("indexer_topk", "sparse_mla", "moe", "linear_fp8", "moe_fp8", "mtp_verify", "e2e")
FP8_OPS = ("linear_fp8", "moe_fp8")   # block-FP8 weights (1 byte a weight + f32 scales per 128x128 block)
F32 = 4
DTYPES = {name: FLOAT_DTYPES[name].itemsize for name in ("bfloat16", "float16", "float32")}   # -> bytes


@dataclass(frozen=True)
class Dims:
    """Model dimensions the cases use: GLM-5.2's (spec/glm52-model.md section 1) or scaled down."""
    HI: int      # indexer heads
    DI: int      # indexer head dim
    TOPK: int    # indexer top-k
    H: int       # attention heads
    DL: int      # latent (kv_lora_rank)
    DR: int      # rope dims
    DN: int      # qk nope head dim
    DV: int      # v head dim
    QL: int      # q_lora_rank
    E: int       # routed experts
    K: int       # experts per token
    HD: int      # hidden
    I: int       # expert width  # noqa: E741
    V: int       # vocabulary
    BS: int      # paged-cache block (tokens)


    @classmethod
    def of(cls, cfg, block_size: int) -> "Dims":
        """The dimensions of a `ModelConfig`, with a paged-cache block of `block_size` tokens."""
        return cls(HI=cfg.index_n_heads, DI=cfg.index_head_dim, TOPK=cfg.index_topk, H=cfg.num_attention_heads,
                   DL=cfg.kv_lora_rank, DR=cfg.qk_rope_head_dim, DN=cfg.qk_nope_head_dim, DV=cfg.v_head_dim,
                   QL=cfg.q_lora_rank, E=cfg.n_routed_experts, K=cfg.num_experts_per_tok, HD=cfg.hidden_size,
                   I=cfg.moe_intermediate_size, V=cfg.vocab_size, BS=block_size)


FULL = Dims.of(GLM52_CONFIG, block_size=64)
# odd where the kernels must not care (vocabulary, lengths below): a run in seconds on a CPU
SMALL = Dims(HI=4, DI=32, TOPK=64, H=8, DL=64, DR=16, DN=24, DV=32, QL=64, E=16, K=4, HD=128, I=64, V=1001,
             BS=16)

# the GLM-5.2 dimensions by their old names (tests and readers use them)
HI, DI, TOPK, H, DL, DR = FULL.HI, FULL.DI, FULL.TOPK, FULL.H, FULL.DL, FULL.DR
E, K, HD, I, V, BLOCK_SIZE = FULL.E, FULL.K, FULL.HD, FULL.I, FULL.V, FULL.BS  # noqa: E741


@dataclass
class Case:
    op: str            # indexer_topk | sparse_mla | moe | mtp_verify | e2e
    shape: str
    params: dict
    bytes: float
    flops: float
    graph: bool        # decode size: timed under a CUDA graph (on CUDA)
    target: str        # from the issue; "" if none (always "" with --small)


def expected_experts(T: int, e: int = E, k: int = K) -> float:
    """Distinct experts touched by T tokens routed uniformly: e * (1 - (1 - k/e)^T)."""
    return e * (1.0 - (1.0 - k / e) ** T)


def fp8_weight_bytes(N: int, K: int, block: tuple[int, int] = (128, 128)) -> int:
    """Bytes of one block-FP8 weight [N, K]: the e4m3 codes and the f32 scale of each block."""
    return N * K + 4 * (-(-N // block[0])) * (-(-K // block[1]))


def floor_s(nbytes: float, flops: float, bandwidth: float, peak: float) -> float:
    """The roofline floor in seconds: max(bytes / bandwidth, flops / peak)."""
    if bandwidth <= 0 or peak <= 0:
        raise ValueError(f"bandwidth ({bandwidth}) and peak ({peak}) must be positive")
    return max(nbytes / bandwidth, flops / peak)


def plan(ops: set[str] | None = None, small: bool = False, elt: int = 2) -> list[Case]:
    """Every case the benchmark runs, with its compulsory bytes and flops (`elt`: bytes per element
    of activations, caches and weights; 2 for bf16)."""
    d = SMALL if small else FULL
    A = elt
    cases: list[Case] = []

    def add(op, shape, params, nbytes, flops, graph, target=""):
        if ops is None or op in ops:
            cases.append(Case(op, shape, params, float(nbytes), float(flops), graph, "" if small else target))

    idx_decode = ((4, 500), (2, 1000), (1, 1000)) if small else ((32, 32768), (8, 131072), (1, 131072))
    for (B, L), tgt in zip(idx_decode, ("<= 2.0x floor", "<= 2.0x floor", "<= 30 us")):
        add("indexer_topk", f"decode B={B} L={L}", {"B": B, "L": L, "q": 1},
            B * L * d.DI * A + B * d.HI * (d.DI * A + F32) + B * d.TOPK * 4, 2 * B * L * d.HI * d.DI, True, tgt)
    S = 200 if small else 8192
    add("indexer_topk", f"prefill S={S}", {"B": 1, "L": S, "q": S},
        S * d.DI * A + S * d.HI * (d.DI * A + F32) + S * d.TOPK * 4, 2 * d.HI * d.DI * S * (S + 1) / 2, False,
        "<= 4x floor")
    mla_decode = ((4, 500), (16, 500), (1, 1000)) if small else ((32, 32768), (128, 32768), (1, 131072))
    for (B, L), tgt in zip(mla_decode, ("<= 2.0x floor", "<= 2.0x floor", "<= 20 us")):
        # c and k_pe rows read once, q read and out written once, the indices read once
        add("sparse_mla", f"decode B={B} L={L}", {"B": B, "L": L},
            B * d.TOPK * (d.DL + d.DR) * A + B * d.H * (d.DL + d.DR + d.DL) * A + B * d.TOPK * 4,
            2 * B * d.H * d.TOPK * (d.DL + d.DR + d.DL), True, tgt)
    Ts = (1, 4, 16, 64) if small else (1, 16, 128, 4096)
    for T in Ts:
        ea = expected_experts(T, d.E, d.K)
        add("moe", f"T={T} (routing included)", {"T": T},
            ea * 3 * d.HD * d.I * A + 2 * T * d.HD * A + T * d.E * F32,
            2 * T * d.K * 3 * d.HD * d.I, T < Ts[-1], "<= 1.0x torch._grouped_mm")
    # block-FP8 linears: q_b_proj [H*(dn+dr), q_lora] and o_proj [Hd, H*dv]
    Ms = (1, 16, 64) if small else (1, 64, 4096)
    for name, N, Kd in (("q_b_proj", d.H * (d.DN + d.DR), d.QL), ("o_proj", d.HD, d.H * d.DV)):
        for M in Ms:
            add("linear_fp8", f"{name} {N}x{Kd} M={M}", {"M": M, "N": N, "K": Kd},
                fp8_weight_bytes(N, Kd) + M * Kd * A + M * N * A, 2 * M * N * Kd, M < Ms[-1])
    for T in Ts:
        ea = expected_experts(T, d.E, d.K)
        add("moe_fp8", f"T={T} (routing included)", {"T": T},
            ea * (fp8_weight_bytes(2 * d.I, d.HD) + fp8_weight_bytes(d.HD, d.I)) + 2 * T * d.HD * A + T * d.E * F32,
            2 * T * d.K * 3 * d.HD * d.I, T < Ts[-1])
    for B, tgt in ((8 if small else 64, "<= 1.5x floor"), (1, "<= 15 us")):
        add("mtp_verify", f"greedy B={B} k=3 V={d.V}", {"B": B, "k": 3}, B * 4 * d.V * F32, 0.0, True, tgt)
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
@dataclass
class Env:
    """What the cases build their inputs with."""
    torch: object
    device: object
    dtype: object
    d: Dims


def _paged(env: Env, B: int, L: int, widths: tuple[int, ...]):
    """One block table [B, nb] over a shuffled pool, and a paged cache [NB, BS, w] per width."""
    torch = env.torch
    nb = B * (-(-L // env.d.BS))
    bt = torch.randperm(nb, device=env.device).view(B, -1).to(torch.int32)
    caches = [torch.randn(nb, env.d.BS, w, dtype=env.dtype, device=env.device) for w in widths]
    return bt, caches


def _decode_step(env: Env, B: int, L: int, q_len: int = 1):
    """cu_seqlens_q and seq_lens of B requests of length L with q_len new tokens each, on the device."""
    torch = env.torch
    cu = torch.arange(B + 1, dtype=torch.int32, device=env.device) * q_len
    lens = torch.full((B,), L, dtype=torch.int32, device=env.device)
    return cu, lens


def _fp8_weight(env: Env, *shape: int):
    """A random block-FP8 `Weight` [*lead, N, K] on the device (codes ~ N(0, 1) in e4m3, scales
    around K^-0.5 per 128x128 block: values of a K^-0.5-scaled weight), without a host round trip."""
    from glm52_backends.weights import Weight
    torch = env.torch
    *lead, N, K = shape
    codes = torch.randn(*shape, device=env.device).to(torch.float8_e4m3fn)
    scales = (torch.rand(*lead, -(-N // 128), -(-K // 128), device=env.device) + 0.5) * K ** -0.5
    return Weight(codes, scales, "fp8_block")


def _dequantized(env: Env, w):
    """An FP8 `Weight` as a dense tensor in the benchmark dtype (experts one at a time: no
    float32 copy of all of them)."""
    from glm52_backends.weights import select
    if w.data.dim() == 2:
        return w.dense(env.dtype)
    out = env.torch.empty(w.data.shape, dtype=env.dtype, device=env.device)
    for e in range(w.data.shape[0]):
        out[e] = select(w, e).dense(env.dtype)
    return out


def _scaled_mm_alone(env: Env, x, w):
    """torch._scaled_mm on x quantized beforehand (1x128 scales, outer-dim-major) and the weight's
    128x128 scales; None where it cannot run here."""
    torch = env.torch
    if env.device.type != "cuda" or not hasattr(torch, "_scaled_mm") or env.dtype != torch.bfloat16:
        return None
    from glm52_backends.quant import quantize_fp8_groups
    q, s = quantize_fp8_groups(x, 128)
    s = s.t().contiguous().t()

    def run():
        return torch._scaled_mm(q, w.data.t(), s, w.scales.t(), out_dtype=torch.bfloat16)
    try:
        run()
    except Exception:  # noqa: BLE001 - torch < 2.10, not sm_90, CUDA < 12.9: the dense GEMM instead
        return None
    return run



def _routed_moe(be, ref, logits, bias, K, x, w13, w2):
    """(ours, reference): routing (GLM-5.2's: one group, renormalised, scale 2.5) + the routed experts."""
    def run(ops):
        def call():
            i, w_ = ops.moe_route(logits, bias, K, 1, 1, True, 2.5)
            return ops.moe_experts(x, w13, w2, i, w_)
        return call
    return run(be), run(ref)

def _inputs(env: Env, be, case: Case):
    """(backend call, baseline call, reference call or None, comparison kind, baseline name) for one case."""
    from glm52_backends import ops as ref
    torch, dev, dt, d = env.torch, env.device, env.dtype, env.d
    p = case.params
    if case.op == "linear_fp8":
        x = torch.randn(p["M"], p["K"], dtype=dt, device=dev)
        w = _fp8_weight(env, p["N"], p["K"])
        base = _scaled_mm_alone(env, x, w)
        name = "torch._scaled_mm"
        if base is None:
            wd = _dequantized(env, w)
            base, name = (lambda: torch.nn.functional.linear(x, wd)), f"{str(dt)[6:]} GEMM"
        return (lambda: be.linear(x, w)), base, (lambda: ref.linear(x, w)), "close", name
    if case.op == "moe_fp8":
        T = p["T"]
        x = torch.randn(T, d.HD, dtype=dt, device=dev)
        w13, w2 = _fp8_weight(env, d.E, 2 * d.I, d.HD), _fp8_weight(env, d.E, d.HD, d.I)
        logits = torch.randn(T, d.E, device=dev)
        bias = torch.rand(d.E, device=dev) * 0.1

        ours, reference = _routed_moe(be, ref, logits, bias, d.K, x, w13, w2)

        ids, _ = ref.moe_route(logits, bias, d.K, 1, 1, True, 2.5)
        order = ids.view(-1).argsort(stable=True)
        offs = torch.bincount(ids.view(-1), minlength=d.E).cumsum(0).to(torch.int32)
        xs = x[order // d.K]
        act = torch.randn(T * d.K, d.I, dtype=dt, device=dev)
        try:
            d13, d2 = _dequantized(env, w13), _dequantized(env, w2)

            def grouped_mm_alone():
                torch._grouped_mm(xs, d13.transpose(1, 2), offs=offs)
                return torch._grouped_mm(act, d2.transpose(1, 2), offs=offs)
            grouped_mm_alone()
            base, name = grouped_mm_alone, f"torch._grouped_mm ({str(dt)[6:]})"
        except Exception:  # noqa: BLE001 - no _grouped_mm for this device/dtype: the reference instead
            base, name = reference, "reference"
        return ours, base, reference, "close", name
    if case.op == "indexer_topk":
        B, L, q_len = p["B"], p["L"], p.get("q", 1)
        bt, (kc,) = _paged(env, B, L, (d.DI,))
        cu, lens = _decode_step(env, B, L, q_len)
        q = torch.randn(B * q_len, d.HI, d.DI, dtype=dt, device=dev)
        w = torch.randn(B * q_len, d.HI, device=dev) * (d.HI * d.DI) ** -0.5
        base = lambda: ref.indexer_topk(q, w, kc, bt, lens, cu, d.TOPK)  # noqa: E731
        return ((lambda: be.indexer_topk(q, w, kc, bt, lens, cu, d.TOPK)), base, base, "topk",
                "reference")
    if case.op == "sparse_mla":
        B, L = p["B"], p["L"]
        bt, (c, kpe) = _paged(env, B, L, (d.DL, d.DR))
        cu, lens = _decode_step(env, B, L)
        q = torch.randn(B, d.H, d.DL + d.DR, dtype=dt, device=dev)
        idx = torch.stack([torch.randperm(L, device=dev)[:d.TOPK] for _ in range(B)]).to(torch.int32)
        scale = (d.DN + d.DR) ** -0.5
        base = lambda: ref.sparse_mla(q, c, kpe, idx, bt, lens, cu, scale)  # noqa: E731
        return ((lambda: be.sparse_mla(q, c, kpe, idx, bt, lens, cu, scale)), base, base, "close",
                "reference")
    if case.op == "moe":
        T = p["T"]
        x = torch.randn(T, d.HD, dtype=dt, device=dev)
        w13 = torch.randn(d.E, 2 * d.I, d.HD, dtype=dt, device=dev) * d.HD ** -0.5
        w2 = torch.randn(d.E, d.HD, d.I, dtype=dt, device=dev) * d.I ** -0.5
        logits = torch.randn(T, d.E, device=dev)
        bias = torch.rand(d.E, device=dev) * 0.1
        ids, wts = ref.moe_route(logits, bias, d.K, 1, 1, True, 2.5)
        order = ids.view(-1).argsort(stable=True)
        offs = torch.bincount(ids.view(-1), minlength=d.E).cumsum(0).to(torch.int32)
        xs = x[order // d.K]
        act = torch.randn(T * d.K, d.I, dtype=dt, device=dev)

        def grouped_mm_alone():
            torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
            return torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)

        ours, reference = _routed_moe(be, ref, logits, bias, d.K, x, w13, w2)

        try:    # the baseline where torch has it for this device and dtype
            grouped_mm_alone()
            base, name = grouped_mm_alone, "torch._grouped_mm"
        except Exception:  # noqa: BLE001 - e.g. an accelerator without it: the reference instead
            base, name = reference, "reference"
        return ours, base, reference, "close", name
    if case.op == "mtp_verify":
        B, k = p["B"], p["k"]
        lg = torch.randn(B, k + 1, d.V, device=dev)
        draft = lg[:, :k].argmax(-1)
        draft[::2, 1] = 0                                          # half the requests miss at 1
        base = lambda: ref.mtp_verify(draft, lg)  # noqa: E731
        return (lambda: be.mtp_verify(draft, lg)), base, base, "exact", "reference"
    raise ValueError(case.op)


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
    bt, (c, kpe, kc) = _paged(env, B, L, (d.DL, d.DR, d.DI))
    cu, lens = _decode_step(env, B, L)
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
                print(f"{c.op:13s} {c.shape:44s} ERROR {row['error']}", flush=True)
                timer.sync()
                continue
            out["rows"].append(row)
            print(f"{c.op:13s} {c.shape:44s} IndexShare {row['indexshare_ms']:.3f} ms, every layer "
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
            print(f"{c.op:13s} {c.shape:44s} ERROR {row['error']}\n{row['traceback']}", flush=True)
            del e
            timer.sync()
            continue
        fl = floor_s(c.bytes, c.flops, bw, peak8 if c.op in FP8_OPS else peak)
        row.update(ms=t * 1e3, GBps=c.bytes / t / 1e9, TFLOPs=c.flops / t / 1e12, floor_ms=fl * 1e3,
                   ratio=t / fl, baseline_ms=tb * 1e3, baseline_ratio=tb / fl, vs_baseline=t / tb,
                   baseline=base_name, timing=how, baseline_timing=how_b, check=check)
        out["rows"].append(row)
        del ours, base, reference
        print(f"{c.op:13s} {c.shape:44s} {t * 1e6:9.1f} us  {row['GBps']:7.1f} GB/s  {row['TFLOPs']:7.3f} TF/s  "
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
    ops = {o.strip() for o in args.ops.split(",") if o.strip()}
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
            print(f"{c.op:13s} {c.shape:44s} bytes {c.bytes / 1e6:10.2f} MB  flops {c.flops / 1e9:10.2f} G  "
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
