#!/usr/bin/env bash
# The cuda backend on a GPU machine, in one prepared run: install, GPU tests, the benchmark table,
# conformance at the real GLM-5.2 sizes (bfloat16 and float32), graph-mode decode, end-to-end
# conformance of the whole trained default model, a tiny-checkpoint model check.
#
#   benchmarks/gpu_check.sh OUTDIR [STAGE ...]      stages: env install tests bench conformance graph e2e model
#
# Each stage runs under its own time limit, clamped to what is left of the run's budget
# (GPU_CHECK_BUDGET seconds, default 470 on a GPU: under 8 minutes, so that a second run fits in
# a short GPU window; 3600 for the interpreter's rehearsal), and writes its files to OUTDIR as it
# goes, so a stage that hangs or dies costs only itself; a stage the budget cannot fit any more is
# skipped and says so. The default order puts first what the GPU issue needs most (the bench rows
# and full conformance). OUTDIR holds:
#   summary.txt              one line per stage (exit status, seconds) + machine facts + install log tail
#   tests.log                pytest of tests/test_cuda_gpu.py (the interpreter's checks on the GPU + graph replay)
#   bench.log, bench.json    glm52 bench --backend cuda (bf16 ops + block-FP8 linear_fp8 / moe_fp8 rows)
#   conformance.log          both conformance runs' output
#   conformance-bf16.json    glm52 conformance --backend cuda --dtype bfloat16 --json
#   conformance-f32.json     glm52 conformance --backend cuda --dtype float32 --json
#   graph.log, graph.json    benchmarks/graph_decode.py: decode steps as CUDA graphs vs eager, per bucket and depth
#   e2e.log, e2e.json, e2e.md  glm52 conformance --backend cuda --e2e: every weight/cache format and mode
#   model.log                benchmarks/gpu_model_check.py (greedy/MTP vs cpu_ref; its JSON last)
# Without a GPU (a rehearsal here) the same stages run on Triton's interpreter at small sizes
# (conformance --quick; the interpreter test file; bench --small, one run per case, no e2e bench
# row), graph and e2e on the torch backend (the interpreter needs ~2 min per e2e row).
# Environment: GPU_CHECK_REPS (bench repetitions, default 50), GPU_CHECK_OPS (bench --ops subset),
# GPU_CHECK_BUDGET (seconds for the whole run).
set -u
OUTDIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR [STAGE ...]}
shift
STAGES=${*:-env install tests bench conformance graph e2e model}
BUDGET=${GPU_CHECK_BUDGET:-}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SUMMARY=$OUTDIR/summary.txt

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
    unset TRITON_INTERPRET
else
    GPU=0
    export TRITON_INTERPRET=1
    echo "no CUDA GPU here: rehearsal on Triton's interpreter (small sizes; bench --small)" | tee -a "$SUMMARY"
fi

# bench: 240 s for the bf16 ops + ~90 s for the FP8 rows (linear_fp8, moe_fp8: 10 cases, fp64 reference checks)
[ -n "$BUDGET" ] || { [ $GPU = 1 ] && BUDGET=470 || BUDGET=3600; }    # the interpreter's rehearsal is slower
if [ $GPU = 1 ]; then L_TESTS=180 L_CONF=120 L_BENCH=330 L_MODEL=90 L_GRAPH=150 L_E2E=150; else L_TESTS=500 L_CONF=240 L_BENCH=420 L_MODEL=400 L_GRAPH=300 L_E2E=300; fi

# stage NAME LIMIT_S LOG CMD...: run CMD under `timeout` (LIMIT_S, or less: what is left of BUDGET),
# append its output to LOG, one line to SUMMARY; skipped when under 20 s of the budget are left
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((BUDGET - SECONDS))
    if [ $left -lt 20 ]; then
        printf '%-18s %-26s %4ds  (%s)\n' "$name" "SKIPPED: budget spent" 0 "$(basename "$log")" | tee -a "$SUMMARY"
        return 124
    fi
    [ $limit -gt $left ] && limit=$left
    local t0=$SECONDS rc
    echo "== $name: $*" >> "$log"
    timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    local what="rc=$rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT after ${limit}s"
    printf '%-18s %-26s %4ds  (%s)\n' "$name" "$what" $((SECONDS - t0)) "$(basename "$log")" | tee -a "$SUMMARY"
    return $rc
}

for s in $STAGES; do
    case $s in
    env)
        {
            echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
            echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
            $PY -c "import torch, triton, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
            if [ $GPU = 1 ]; then
                nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
                $PY -c "import torch; p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, 'SMs', round(p.total_memory / 2**30), 'GiB')"
            fi
        } >> "$SUMMARY" 2>&1
        ;;
    install)
        # no dependencies: the machine's own torch/triton stay; no index is reachable there
        stage install 120 "$OUTDIR/install.tmp" $PY -m pip install --no-deps --no-build-isolation -e . ||
            stage install-plain 120 "$OUTDIR/install.tmp" $PY -m pip install --no-deps --no-build-isolation .
        grep -vi "warning: running pip" "$OUTDIR/install.tmp" | tail -n 2 >> "$SUMMARY"
        rm -f "$OUTDIR/install.tmp"
        ;;
    tests)
        if [ $GPU = 1 ]; then
            stage tests $L_TESTS "$OUTDIR/tests.log" $PY -m pytest -q -rA tests/test_cuda_gpu.py tests/test_cuda_host_sync.py
        else
            stage tests $L_TESTS "$OUTDIR/tests.log" $PY -m pytest -q -rA tests/test_cuda_interpreter.py
        fi
        ;;
    conformance)
        q=""
        [ $GPU = 1 ] || q="--quick"
        stage conformance-bf16 $L_CONF "$OUTDIR/conformance.log" $PY -m glm52_backends.cli conformance --backend cuda $q --dtype bfloat16 \
            --no-model --json "$OUTDIR/conformance-bf16.json"
        # float32 (exact-IEEE dots) with the model-level case: logits + greedy tokens of a tiny checkpoint
        stage conformance-f32 $L_CONF "$OUTDIR/conformance.log" $PY -m glm52_backends.cli conformance --backend cuda $q --dtype float32 \
            --json "$OUTDIR/conformance-f32.json"
        ;;
    bench)
        if [ $GPU = 1 ]; then
            stage bench $L_BENCH "$OUTDIR/bench.log" $PY -m glm52_backends.cli bench --backend cuda --reps "${GPU_CHECK_REPS:-50}" \
                --ops "${GPU_CHECK_OPS:-indexer_topk,sparse_mla,moe,linear_fp8,moe_fp8,mtp_verify,e2e}" --json "$OUTDIR/bench.json"
        else
            # the kernels on the interpreter at --small shapes: the run works, the timings mean nothing
            stage bench $L_BENCH "$OUTDIR/bench.log" $PY -m glm52_backends.cli bench --backend cuda --small --reps 1 \
                --ops "${GPU_CHECK_OPS:-indexer_topk,sparse_mla,moe,linear_fp8,moe_fp8,mtp_verify}" --json "$OUTDIR/bench.json"
        fi
        ;;
    model)
        stage model $L_MODEL "$OUTDIR/model.log" $PY benchmarks/gpu_model_check.py
        ;;
    e2e)
        # the whole trained default model per weight format, cache format and mode against float64 cpu_ref
        if [ $GPU = 1 ]; then
            stage e2e $L_E2E "$OUTDIR/e2e.log" $PY -m glm52_backends.cli conformance --backend cuda --e2e \
                --json "$OUTDIR/e2e.json" --markdown "$OUTDIR/e2e.md"
        else
            stage e2e $L_E2E "$OUTDIR/e2e.log" $PY -m glm52_backends.cli conformance --backend torch --e2e --quick \
                --json "$OUTDIR/e2e.json" --markdown "$OUTDIR/e2e.md"
        fi
        ;;
    graph)
        # decode as CUDA graphs vs eager (tokens must be equal), 4 and 78 layers, buckets 1 and 8, bf16
        if [ $GPU = 1 ]; then
            stage graph $L_GRAPH "$OUTDIR/graph.log" $PY benchmarks/graph_decode.py --backend cuda --device cuda \
                --dtype bfloat16 --layers 4 78 --buckets 1 8 --steps 16 --repeats 2 --json "$OUTDIR/graph.json"
        else
            stage graph $L_GRAPH "$OUTDIR/graph.log" $PY benchmarks/graph_decode.py --backend torch --graph trace --small \
                --json "$OUTDIR/graph.json"
        fi
        ;;
    *)
        echo "unknown stage $s (stages: env install tests bench conformance graph e2e model)" | tee -a "$SUMMARY"
        exit 2
        ;;
    esac
done
echo "done; files in $OUTDIR:" $(ls "$OUTDIR") | tee -a "$SUMMARY"
