"""Ahead-of-time compile of every cuda-backend Triton kernel for sm_90 (H100), without a GPU.

The interpreter test (test_cuda_interpreter.py) checks the kernels' values but hides what only the
real compiler sees: tl.dot tile minimums, power-of-two aranges, shared-memory overruns, register
spills. Here each op's host wrapper runs on CPU tensors at GLM-5.2's real shapes (bfloat16; decode,
MTP and prefill variants), and every kernel launch it makes is turned into a compile for an sm_90
target with exactly the arguments, constexprs, num_warps and num_stages the wrapper chose (through
JITFunction.run(..., warmup=True) and a stand-in driver that names the target). Triton's bundled
ptxas (`-v`) reports registers, stack and spills; the compiled metadata reports shared memory.

Asserted per launch: it compiles; shared memory <= 227 KB (H100 per-block opt-in limit); no
register spills in the hot kernels (listed in HOT) for bfloat16 (float32: see test_compiles_for_sm90). The compiles run in worker processes without
TRITON_INTERPRET (the kernels must be real JITFunctions) and with a private Triton cache, so ptxas
runs every time. `python tests/test_cuda_compile.py` prints the table.

Shapes that enter no constexpr and no integer argument's type are shrunk to keep host memory low
(e.g. 8 experts instead of 256 for the expert GEMMs: the per-expert strides, Hd and I are real).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.abspath(__file__)
SMEM_LIMIT = 227 * 1024          # H100: max dynamic shared memory per block (opt-in)
MAX_REGS = 255                   # per thread
# kernels on the decode/prefill critical path: spills there are not accepted
HOT = {"_scores_kernel", "_select_kernel", "_partial_kernel", "_combine_kernel@sparse_mla",
       "_gemm1_kernel", "_gemm2_kernel", "_stats_kernel",
       "_act_quant_kernel", "_fp8_gemm_kernel", "_fp8_gemm1_kernel", "_fp8_gemm2_kernel"}

# scenario -> kernels its wrapper must launch (names as "<kernel>@<module>" where ambiguous)
SCENARIOS = {
    "indexer_decode_b1": ["_scores_kernel", "_select_kernel"],
    "indexer_decode_b2": ["_scores_kernel", "_select_kernel"],
    "indexer_prefill": ["_scores_kernel", "_select_kernel"],
    "indexer_prefill_h64": ["_scores_kernel", "_select_kernel"],
    "indexer_prefill_f32": ["_scores_kernel", "_select_kernel"],
    "sparse_mla_decode": ["_partial_kernel", "_combine_kernel@sparse_mla"],
    "sparse_mla_prefill": ["_partial_kernel"],
    "sparse_mla_decode_f32": ["_partial_kernel", "_combine_kernel@sparse_mla"],
    "sparse_mla_decode_lse": ["_partial_kernel", "_combine_kernel@sparse_mla"],   # the lse variant
    "moe_route": ["_route_kernel"],
    "moe_experts_grouped_mm": ["_silu_mul_kernel", "_combine_kernel@moe_experts"],
    "moe_experts_triton_bf16": ["_gemm1_kernel", "_gemm2_kernel", "_combine_kernel@moe_experts"],
    "moe_experts_triton_f32": ["_gemm1_kernel", "_gemm2_kernel", "_combine_kernel@moe_experts"],
    # block-FP8 linear: q_b_proj [16384, 2048] at decode, o_proj [6144, 16384] at M = 64 and 512
    "linear_fp8_decode": ["_act_quant_kernel", "_fp8_gemm_kernel"],
    "linear_fp8_m64": ["_act_quant_kernel", "_fp8_gemm_kernel"],
    "linear_fp8_prefill": ["_act_quant_kernel", "_fp8_gemm_kernel"],
    "linear_fp8_rowblock1_f32": ["_act_quant_kernel", "_fp8_gemm_kernel"],     # float32 dots, B0 = 1
    "moe_experts_fp8_decode": ["_act_quant_kernel", "_fp8_gemm1_kernel", "_fp8_gemm2_kernel",
                               "_combine_kernel@moe_experts"],
    "moe_experts_fp8_prefill": ["_act_quant_kernel", "_fp8_gemm1_kernel", "_fp8_gemm2_kernel",
                                "_combine_kernel@moe_experts"],
    "moe_experts_fp8_f32": ["_act_quant_kernel", "_fp8_gemm1_kernel", "_fp8_gemm2_kernel",
                            "_combine_kernel@moe_experts"],
    "mtp_verify_greedy": ["_stats_kernel", "_verify_kernel"],
    "mtp_verify_sample": ["_stats_kernel", "_verify_kernel"],
    "mtp_verify_sample_q": ["_stats_kernel", "_verify_kernel"],
}
N_WORKERS = 2     # scenarios are dealt alternately; the two slow float32 compiles land on different workers


# ---- worker side (no TRITON_INTERPRET, stand-in driver) -------------------------------------------
def _scenario_inputs(name):
    """Build and run one op's wrapper at GLM-5.2 shapes (kernels are intercepted by the caller)."""
    import torch
    from glm52_backends.backends.cuda import indexer_topk, linear, moe_experts, moe_route, mtp_verify, sparse_mla
    from glm52_backends.weights import Weight
    bf16 = torch.bfloat16
    dt = torch.float32 if name.endswith("f32") else bf16     # float32: the exact-dot (ieee) variants
    BS, LONG = 64, 131072                                # 64-token pages, 128K-token contexts

    def batch(reqs):
        cu, lens = [0], []
        for q_len, L in reqs:
            cu.append(cu[-1] + q_len)
            lens.append(L)
        n_pages = max(-(-L // BS) for L in lens)
        # every request maps onto the same physical pages: real block-table values, small cache
        bt = torch.arange(n_pages, dtype=torch.int32)[None].repeat(len(reqs), 1)
        # the step as the model hands it over: the contract's loose tensors only
        return (torch.tensor(cu, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), bt, n_pages)

    if name.startswith("indexer"):
        reqs = {"indexer_decode_b1": [(1, LONG)], "indexer_decode_b2": [(1, LONG), (1, LONG // 2)],
                "indexer_prefill": [(2048, LONG)], "indexer_prefill_f32": [(2048, LONG)],
                "indexer_prefill_h64": [(2048, LONG)]}[name]
        cu, lens, bt, n_pages = batch(reqs)
        T = int(cu[-1])
        Hi = 64 if name.endswith("h64") else 32            # h64: DeepSeek-V3.2's indexer width
        q = torch.randn(T, Hi, 128).to(dt)
        w = torch.randn(T, Hi)
        kc = torch.empty(n_pages, BS, 128, dtype=dt)
        indexer_topk.indexer_topk(q, w, kc, bt, lens, cu, 2048)
    elif name.startswith("sparse_mla"):
        reqs = {"sparse_mla_decode": [(1, LONG)] * 4, "sparse_mla_decode_lse": [(1, LONG)] * 4,
                "sparse_mla_prefill": [(512, LONG)], "sparse_mla_decode_f32": [(1, LONG)] * 4}[name]
        cu, lens, bt, n_pages = batch(reqs)
        T = int(cu[-1])
        q = torch.randn(T, 64, 512 + 64).to(dt)
        c = torch.empty(n_pages, BS, 512, dtype=dt)
        kpe = torch.empty(n_pages, BS, 64, dtype=dt)
        idx = torch.randint(0, LONG - 1024, (T, 2048), dtype=torch.int32)
        sparse_mla.sparse_mla(q, c, kpe, idx, bt, lens, cu, 192 ** -0.5, return_lse=name.endswith("_lse"))
    elif name == "moe_route":
        moe_route.moe_route(torch.randn(16, 256), torch.randn(256), 8, 1, 1, True, 2.5)
    elif name.startswith("linear_fp8"):
        def fp8(*shape, block=(128, 128)):
            *lead, N, K = shape
            return Weight(torch.empty(*shape, dtype=torch.float8_e4m3fn),
                          torch.empty(*lead, -(-N // block[0]), -(-K // block[1])), "fp8_block", block)
        M, N, K = {"linear_fp8_decode": (1, 64 * 256, 2048), "linear_fp8_m64": (64, 6144, 64 * 256),
                   "linear_fp8_prefill": (512, 6144, 64 * 256), "linear_fp8_rowblock1_f32": (16, 4096, 6144)}[name]
        w = fp8(N, K, block=(1, 128) if name.endswith("rowblock1_f32") else (128, 128))
        linear.linear(torch.empty(M, K, dtype=dt), w, gemm="triton")
    elif name.startswith("moe_experts_fp8"):
        E, K, Hd, I = 8, 8, 6144, 2048
        T = 512 if name.endswith("prefill") else 16                   # 64-row M-blocks from 64 rows an expert
        w13 = Weight(torch.empty(E, 2 * I, Hd, dtype=torch.float8_e4m3fn), torch.empty(E, 2 * I // 128, Hd // 128),
                     "fp8_block")
        w2 = Weight(torch.empty(E, Hd, I, dtype=torch.float8_e4m3fn), torch.empty(E, Hd // 128, I // 128), "fp8_block")
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        moe_experts.moe_experts(torch.randn(T, Hd).to(dt), w13, w2, ids, torch.rand(T, K))
    elif name.startswith("moe_experts"):
        E, T, K, Hd, I = 8, 16, 8, 6144, 2048
        x = torch.randn(T, Hd).to(dt)
        w13 = torch.empty(E, 2 * I, Hd, dtype=dt)
        w2 = torch.empty(E, Hd, I, dtype=dt)
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        wts = torch.rand(T, K)
        gemm = "grouped_mm" if name.endswith("grouped_mm") else "triton"
        moe_experts.moe_experts(x, w13, w2, ids, wts, gemm=gemm)
    elif name.startswith("mtp_verify"):
        B, k, V = 8, 3, 154880
        draft = torch.randint(0, V, (B, k))
        logits = torch.randn(B, k + 1, V).to(bf16)
        if name == "mtp_verify_greedy":
            mtp_verify.mtp_verify(draft, logits)
        else:
            probs = torch.rand(B, k, V) if name == "mtp_verify_sample_q" else None
            mtp_verify.mtp_verify(draft, logits, probs, temperature=0.7, uniforms=torch.rand(B, k + 1))
    else:
        raise KeyError(name)


def _ptxas_info(log):
    import re
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and frame):
        return None
    return {"regs": int(regs.group(1)), "stack": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}


def _install_target():
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    class CompileOnlyDriver:
        """Names the compile target; never launches (JITFunction.run is called with warmup=True)."""
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(CompileOnlyDriver())
    knobs.nvidia.dump_ptxas_log = True       # ptxas -v output is printed; captured per compile


def _toolchain_error():
    """None if a trivial kernel compiles for sm_90 here, else why not (the only reason to skip)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    try:
        src = triton.compiler.ASTSource(fn=_probe, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                                        constexprs={"BLOCK": 128})
        ck = triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", 90, 32))
        assert ck.asm.get("cubin"), "no cubin produced"
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        return f"{type(e).__name__}: {e}"
    return None


def _run_scenario(name):
    import contextlib
    import io
    import time

    from glm52_backends.backends.cuda import fp8, indexer_topk, linear, moe_experts, moe_route, mtp_verify, sparse_mla
    modules = {"indexer_topk": indexer_topk, "sparse_mla": sparse_mla, "moe_route": moe_route,
               "moe_experts": moe_experts, "mtp_verify": mtp_verify, "fp8": fp8, "linear": linear}
    records, saved = [], []

    class Intercept:
        def __init__(self, fn, label):
            self.fn, self.label = fn, label

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                buf = io.StringIO()
                t0 = time.time()
                rec = {"kernel": self.label, "grid": [int(g) for g in grid]}
                try:
                    with contextlib.redirect_stdout(buf):
                        ck = self.fn.run(*args, grid=grid, warmup=True, **kwargs)
                except Exception as e:  # noqa: BLE001 - a compile failure is the finding
                    rec["error"] = f"{type(e).__name__}: {e}"[-3000:]
                    records.append(rec)
                    return
                md = ck.metadata
                rec.update(shared=int(md.shared), num_warps=int(md.num_warps), num_stages=int(md.num_stages),
                           hash=ck.hash, seconds=round(time.time() - t0, 2),
                           constexprs={str(k): repr(v) for k, v in getattr(ck.src, "constants", {}).items()})
                info = _ptxas_info(buf.getvalue())
                if info is None and ck.hash in _PTXAS_SEEN:      # same specialisation compiled earlier
                    info = _PTXAS_SEEN[ck.hash]
                if info is not None:
                    _PTXAS_SEEN[ck.hash] = info
                    rec.update(info)
                records.append(rec)
            return launch

    from triton.runtime.jit import JITFunction
    for mod_name, mod in modules.items():
        for attr, val in list(vars(mod).items()):
            if isinstance(val, JITFunction) and attr.endswith("_kernel"):
                label = attr if attr != "_combine_kernel" else f"{attr}@{mod_name}"
                saved.append((mod, attr, val))
                setattr(mod, attr, Intercept(val, label))
        if hasattr(mod, "wrap_triton"):           # launches go through torch.library.wrap_triton: let the
            saved.append((mod, "wrap_triton", mod.wrap_triton))       # stand-in kernels through unwrapped
            mod.wrap_triton = lambda k: k
    sm = sparse_mla._num_sms
    sparse_mla._num_sms = lambda device: 132        # H100 SXM: the split count the GPU run would pick
    try:
        _scenario_inputs(name)
    finally:
        sparse_mla._num_sms = sm
        for mod, attr, val in saved:
            setattr(mod, attr, val)
    return records


_PTXAS_SEEN: dict = {}


def _worker(names):
    os.environ.pop("TRITON_INTERPRET", None)
    import warnings
    warnings.filterwarnings("ignore")
    _install_target()
    why = _toolchain_error()
    if why is not None:
        print(json.dumps({"toolchain_error": why}), flush=True)
        return
    for name in names:
        try:
            res = {"scenario": name, "records": _run_scenario(name)}
        except Exception as e:  # noqa: BLE001 - a wrapper failure is reported, not hidden
            import traceback
            res = {"scenario": name, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        print(json.dumps(res), flush=True)


# ---- pytest side ----------------------------------------------------------------------------------
def _run_workers():
    names = list(SCENARIOS)
    shares = [names[i::N_WORKERS] for i in range(N_WORKERS)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the current default, named to silence its warning
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, share in enumerate(shares):
            wenv = dict(env, TRITON_CACHE_DIR=os.path.join(tmp, f"cache{i}"))
            procs.append(subprocess.Popen([sys.executable, HERE, "--worker", *share], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=wenv))
        results, errors = {}, []
        for p in procs:
            out, err = p.communicate(timeout=600)
            for line in out.splitlines():
                if not line.startswith("{"):
                    continue
                res = json.loads(line)
                if "toolchain_error" in res:
                    return {"toolchain_error": res["toolchain_error"]}
                results[res["scenario"]] = res
            if p.returncode != 0:
                errors.append(f"worker exited {p.returncode}: {err[-3000:]}")
    results["_errors"] = errors
    return results


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    res = _run_workers()
    if "toolchain_error" in res:
        pytest.skip(f"Triton's NVIDIA compiler toolchain is unusable here: {res['toolchain_error']}")
    return res


def test_workers_ran_every_scenario(compiled):
    assert not compiled["_errors"], compiled["_errors"]
    missing = [n for n in SCENARIOS if n not in compiled]
    assert not missing, f"no result for {missing}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_compiles_for_sm90(compiled, name):
    res = compiled.get(name)
    assert res is not None, f"{name}: no result from the compile worker"
    assert "error" not in res, res.get("error")
    recs = res["records"]
    launched = sorted({r["kernel"] for r in recs})
    assert launched == sorted(set(SCENARIOS[name])), f"{name}: wrapper launched {launched}"
    for r in recs:
        k = r["kernel"]
        assert "error" not in r, f"{name}/{k} does not compile for sm_90: {r['error']}"
        assert r["shared"] <= SMEM_LIMIT, f"{name}/{k}: {r['shared']} B shared memory > {SMEM_LIMIT}"
        assert "regs" in r, f"{name}/{k}: no ptxas -v report captured"
        assert r["regs"] <= MAX_REGS
        # float32 inputs take tl.dot(..., input_precision="ieee"): no tensor cores, the FMA lowering
        # holds whole K=128/512 operands per thread and spills at GLM-5.2 tile sizes. float32 is the
        # exactness dtype (CI, conformance's small float32 model case), not the GPU default
        # (bfloat16), so spills there are reported by `python tests/test_cuda_compile.py`, not failed.
        if k in HOT and not name.endswith("_f32"):
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
                f"{name}/{k} spills registers: {r['spill_stores']} B stores, {r['spill_loads']} B loads "
                f"({r['regs']} registers, {r['num_warps']} warps)")


def _table(results):
    rows = []
    for name in SCENARIOS:
        res = results.get(name, {})
        if "error" in res:
            rows.append(f"{name:26s} ERROR {res['error'].splitlines()[0]}")
        for r in res.get("records", []):
            if "error" in r:
                rows.append(f"{name:26s} {r['kernel']:26s} COMPILE ERROR {r['error'].splitlines()[0][:200]}")
                continue
            rows.append(f"{name:26s} {r['kernel']:26s} warps {r['num_warps']} stages {r['num_stages']} "
                        f"smem {r['shared']:6d} B regs {r.get('regs', '?'):>3} stack {r.get('stack', '?'):>4} "
                        f"spill st/ld {r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} "
                        f"({r['seconds']} s)")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker(sys.argv[sys.argv.index("--worker") + 1:])
    else:
        out = _run_workers()
        print(out.get("toolchain_error") or _table(out))
        for e in out.get("_errors", []):
            print(e)
