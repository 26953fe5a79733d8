"""`glm52 bench`: the plan (no GPU needed), the roofline arithmetic, the no-GPU error, and a real
`--small` run on the CPU whose output checks must find what a wrong backend gets wrong."""

import json
import math

import pytest
import torch

from glm52_backends.backends.cpu_ref import CpuRefBackend
from glm52_backends.benchmarks.ops.common import E, K, SMALL, expected_experts
from glm52_backends.benchmarks.ops_bench import EventTimer, SyncTimer, Timer, bench_main, floor_s, plan
from glm52_backends.cli import main
from glm52_backends.registry import register_backend, unregister_backend


def test_plan_covers_every_target_of_the_issue():
    cases = plan()
    shapes = {(c.op, c.shape) for c in cases}
    for op, shape in [("indexer_topk", "decode B=32 L=32768"), ("indexer_topk", "decode B=8 L=131072"),
                      ("indexer_topk", "decode B=1 L=131072"), ("indexer_topk", "prefill S=8192"),
                      ("sparse_mla", "decode B=32 L=32768"), ("sparse_mla", "decode B=128 L=32768"),
                      ("sparse_mla", "decode B=1 L=131072"), ("mtp_verify", "greedy B=64 k=3 V=154880"),
                      ("mtp_verify", "greedy B=1 k=3 V=154880")]:
        assert (op, shape) in shapes
    assert [c.params["T"] for c in cases if c.op == "moe_experts"] == [1, 16, 128, 4096]
    assert [c.params["T"] for c in cases if c.op == "moe_experts_fp8"] == [1, 16, 128, 4096]
    # block-FP8 linears at GLM-5.2's q_b_proj [64 x 256, 2048] and o_proj [6144, 64 x 256] shapes
    assert [(c.params["N"], c.params["K"], c.params["M"]) for c in cases if c.op == "linear_fp8"] == \
        [(16384, 2048, 1), (16384, 2048, 64), (16384, 2048, 4096), (6144, 16384, 1), (6144, 16384, 64),
         (6144, 16384, 4096)]
    assert sum(c.op == "e2e" for c in cases) == 2
    # decode sizes under CUDA graphs, prefill-size cases not
    assert all(c.graph for c in cases if "decode" in c.shape)
    assert not any(c.graph for c in cases if "prefill" in c.shape or c.shape.startswith("T=4096")
                   or c.shape.endswith("M=4096"))


def test_plan_bytes_and_flops_follow_the_shapes():
    by = {(c.op, c.shape): c for c in plan()}
    c = by[("indexer_topk", "decode B=8 L=131072")]
    assert c.flops == 2 * 8 * 131072 * 32 * 128                     # 32 heads x 128 per cached key
    assert c.bytes >= 8 * 131072 * 128 * 2                          # bf16 keys read once
    m = by[("sparse_mla", "decode B=32 L=32768")]
    assert m.flops == 2 * 32 * 64 * 2048 * (576 + 512)
    assert 32 * 2048 * 576 * 2 <= m.bytes < 1.1 * 32 * 2048 * 576 * 2
    moe1 = next(c for c in plan({"moe_experts"}) if c.params["T"] == 1)
    assert moe1.bytes == pytest.approx(8 * 3 * 6144 * 2048 * 2, rel=0.01)   # 8 experts streamed
    assert [c.op for c in plan({"mtp_verify"})] == ["mtp_verify"] * 2
    # FP8: one byte a weight + an f32 scale per 128x128 block; half the bf16 expert bytes
    moe8 = next(c for c in plan({"moe_experts_fp8"}) if c.params["T"] == 1)
    scales = 4 * (2 * 2048 // 128 * 6144 // 128 + 6144 // 128 * 2048 // 128)
    assert moe8.bytes == pytest.approx(8 * (3 * 6144 * 2048 + scales), rel=1e-3)
    assert moe8.flops == moe1.flops and moe8.bytes < 0.51 * moe1.bytes
    q = next(c for c in plan({"linear_fp8"}) if c.params["M"] == 1)
    assert q.flops == 2 * 16384 * 2048 and q.bytes == 16384 * 2048 + 4 * 128 * 16 + 2048 * 2 + 16384 * 2


def test_expected_experts_and_floor():
    assert expected_experts(1) == pytest.approx(K)
    assert expected_experts(10 ** 5) == pytest.approx(E)
    assert expected_experts(16) < 16 * K
    assert floor_s(3e9, 1e12, 3e12, 1e15) == pytest.approx(1e-3)    # both equal: 1 ms
    assert floor_s(6e9, 1e12, 3e12, 1e15) == pytest.approx(2e-3)    # bandwidth-bound
    assert floor_s(1e9, 5e12, 3e12, 1e15) == pytest.approx(5e-3)    # compute-bound
    with pytest.raises(ValueError):
        floor_s(1, 1, 0, 1)


def test_list_prints_and_writes_the_plan(tmp_path, capsys):
    path = tmp_path / "plan.json"
    # `moe` (the name before the benchmarks were named after their ops) still selects moe_experts
    assert main(["bench", "--list", "--ops", "moe,mtp_verify", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "moe" in out and "T=4096" in out and "mtp_verify" in out and "indexer_topk" not in out
    data = json.loads(path.read_text())
    assert [r["op"] for r in data["plan"]] == ["moe_experts"] * 4 + ["mtp_verify"] * 2


def test_bad_arguments(capsys):
    assert bench_main(["--ops", "attention"]) == 2
    assert "unknown --ops attention" in capsys.readouterr().err
    assert bench_main(["--reps", "0"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_gpu_it_says_so(capsys):
    assert bench_main(["--backend", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--list" in err


def test_without_gpu_the_full_shapes_are_refused_on_the_cpu(capsys):
    assert bench_main(["--backend", "cpu_ref", "--reps", "1"]) == 2
    assert "use --small" in capsys.readouterr().err


def test_small_plan_has_the_same_cases_scaled_down():
    full, small = plan(), plan(small=True)
    assert [c.op for c in small] == [c.op for c in full]
    assert [c.graph for c in small] == [c.graph for c in full]
    assert all(s.bytes < f.bytes for s, f in zip(small, full) if f.bytes)
    assert not any(c.target for c in small)                   # the issue's targets are for the real shapes
    m = next(c for c in small if c.op == "sparse_mla")
    B = m.params["B"]
    assert m.flops == 2 * B * SMALL.H * SMALL.TOPK * (SMALL.DL + SMALL.DR + SMALL.DL)
    # float32 doubles the bytes of the bf16 cache rows
    assert plan({"sparse_mla"}, True, 4)[0].bytes > plan({"sparse_mla"}, True, 2)[0].bytes


class _FakeDevice:
    """A device module (torch.npu's API: synchronize, Event with record/synchronize/elapsed_time in ms)
    whose events read a clock the test advances: every run of the timed function takes 2 ms."""

    def __init__(self):
        self.now_ms, self.syncs = 0.0, 0
        dev = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.t = None

            def record(self):
                self.t = dev.now_ms

            def synchronize(self):
                dev.syncs += 1

            def elapsed_time(self, end):
                return end.t - self.t

        self.Event = Event

    def synchronize(self):
        self.syncs += 1


def test_timers_event_and_synchronize_paths():
    dev = _FakeDevice()

    def run():
        dev.now_ms += 2.0

    t, how = EventTimer(torch, torch.device("cpu"), 5, 1024, dev)(run, graph=True)
    assert (t, how) == (pytest.approx(2e-3), "events")       # graph=True means nothing off CUDA
    assert dev.syncs >= 6                                       # after the warm-up and each timed run
    dev.syncs = 0
    t, how = SyncTimer(torch, torch.device("cpu"), 4, 1024, dev)(run, graph=False, reps=2)
    assert how == "synchronize + perf_counter" and 0 <= t < 1.0
    assert dev.syncs == 1 + 2 * 2                               # warm-up, then before and after each run
    t, how = Timer(torch, torch.device("cpu"), 3, 1024)(lambda: sum(range(1000)), graph=True)
    assert how == "perf_counter" and 0 < t < 1.0


PER_OP = ("ms", "GBps", "TFLOPs", "floor_ms", "ratio", "baseline_ms", "baseline_ratio", "vs_baseline")


@pytest.fixture
def one_thread():
    """The run is a few hundred small ops: one thread keeps it fast on a busy CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _small_run(tmp_path, backend, ops=None):
    path = tmp_path / "bench.json"
    argv = ["bench", "--backend", backend, "--small", "--reps", "3", "--json", str(path)]
    assert main(argv + (["--ops", ops] if ops else [])) == 0
    return json.loads(path.read_text())


def test_small_run_on_cpu_ref_is_complete_and_agrees(tmp_path, capsys, one_thread):
    res = _small_run(tmp_path, "cpu_ref")
    assert res["backend"] == "cpu_ref" and res["device_type"] == "cpu" and res["small"] is True
    assert res["dtype"] == "float32" and res["dims"]["TOPK"] == SMALL.TOPK
    assert res["bandwidth_Bps"] > 0 and res["peak_flops"] > 0
    assert res["peak_fp8_flops"] is None                      # no FP8 GEMM on the CPU: FP8 rows use peak_flops
    rows = res["rows"]
    assert [(r["op"], r["shape"]) for r in rows] == [(c.op, c.shape) for c in plan(small=True)]
    for r in rows:
        assert "error" not in r, (r["op"], r["shape"], r.get("error"))
        if r["op"] == "e2e":
            assert r["indexshare_ms"] > 0 and r["every_layer_ms"] > 0 and r["timing"] == "perf_counter"
            assert r["ratio"] == pytest.approx(r["every_layer_ms"] / r["indexshare_ms"])
            continue
        for key in PER_OP:                     # mtp_verify counts no flops: 0 TFLOP/s
            ok = r[key] >= 0 if key == "TFLOPs" and r["flops"] == 0 else r[key] > 0
            assert math.isfinite(r[key]) and ok, (r["op"], r["shape"], key, r[key])
        assert r["ratio"] == pytest.approx(r["ms"] / r["floor_ms"])
        assert r["timing"] == r["baseline_timing"] == "perf_counter"
        # FP8 linear: no torch._scaled_mm on the CPU, the dense GEMM on the dequantized weight instead
        assert r["baseline"] == {"moe_experts": "torch._grouped_mm", "moe_experts_fp8": "torch._grouped_mm (float32)",
                                 "linear_fp8": "float32 GEMM"}.get(r["op"], "reference")
        # cpu_ref is the float32 reference: its outputs are the reference's, bit for bit
        want = {"indexer_topk": "set overlap 1.0000", "sparse_mla": "rel err 0.0e+00",
                "moe_experts": "rel err 0.0e+00", "moe_experts_fp8": "rel err 0.0e+00", "linear_fp8": "rel err 0.0e+00",
                "mtp_verify": "exact"}[r["op"]]
        assert r["check"] == want, (r["op"], r["shape"], r["check"])
    out = capsys.readouterr().out
    assert "(--small shapes)" in out and "IndexShare" in out


class _Wrong(CpuRefBackend):
    """The reference, but the last top-k entry of each row dropped, the MLA output negated, no draft accepted."""

    def __init__(self):
        super().__init__()
        self.name = "bench_wrong"
        ref_topk, ref_mla = self.indexer_topk, self.sparse_mla

        def indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
            idx = ref_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk)
            idx[:, -1] = -1
            return idx

        def sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *,
                       return_lse=False):
            out = ref_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale,
                          return_lse=return_lse)
            (out[0] if return_lse else out).neg_()
            return out

        def mtp_verify(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
            B, k = draft.shape
            tokens = torch.zeros(B, k + 1, dtype=torch.int64)
            tokens[:, 0] = target_logits[:, 0].argmax(-1)
            return torch.zeros(B, dtype=torch.int32), tokens

        self.indexer_topk, self.sparse_mla, self.mtp_verify = indexer_topk, sparse_mla, mtp_verify


def test_small_run_checks_catch_a_wrong_backend(tmp_path, one_thread):
    register_backend("bench_wrong", _Wrong)
    try:
        res = _small_run(tmp_path, "bench_wrong", "indexer_topk,sparse_mla,mtp_verify")
    finally:
        unregister_backend("bench_wrong")
    checks = {(r["op"], r["shape"]): r["check"] for r in res["rows"]}
    assert len(checks) == 3 + 1 + 3 + 2 and "error" not in str(res["rows"])
    for (op, shape), check in checks.items():
        if op == "indexer_topk" and shape.startswith("decode"):   # one of topk positions missing per row
            assert check == f"set overlap {1 - 1 / SMALL.TOPK:.4f}", (shape, check)
        elif op == "indexer_topk":      # prefill: rows shorter than topk lose no position
            assert check.startswith("set overlap ") and float(check.split()[-1]) < 1, (shape, check)
        elif op == "sparse_mla":        # -out against out: max|2 out| / max|out|
            assert check == "rel err 2.0e+00", (shape, check)
        else:
            assert check == "MISMATCH", (shape, check)
