#!/usr/bin/env bash
# Everything almak measures on a GPU, in one command that fits in ten minutes (`make gpu-check` runs it):
#   1. kernel microbenchmarks, every kernel (benchmarks/results/<gpu>.json, written after each kernel);
#   2. almak bench on a random-weight ALMA-7B: float, int8, int4, 2:4, 2:4-int4 in almak's loop with CUDA graphs
#      (benchmarks/results/bench-alma-7b-<gpu>/), float and int4 in the same loop without them
#      (bench-alma-7b-eager-<gpu>/), and float in transformers' forward (bench-alma-7b-hf-<gpu>/);
#   3. the kernel, quantizer, pruner, layer and decoder tests on the GPU (no interpreter), in parallel; the
#      decoder tests check CUDA-graph steps against eager ones and translate against transformers' generate.
# Each step has its own time limit inside an overall budget (GPU_CHECK_BUDGET seconds, default 540), so a slow
# step cannot starve the rest; logs and a summary go to LOG_DIR (default benchmarks/results/gpu-logs-<gpu>).
# Needs torch, triton, transformers, click, tqdm, sacrebleu, safetensors, pytest (+ pytest-xdist, matplotlib if
# present); works offline: almak is imported from this checkout, not installed.
set -u
cd "$(dirname "$0")/.."
# Every Python below starts with -P (3.11+): this script runs from the repository root, and without -P `python -m`
# and `python -c` put the root first on sys.path, where almak's kernels/ shadows Hugging Face's `kernels` package.
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
if ! "$PY" -P -c 'import almak.kernels' 2>/dev/null; then
    # The package is the repository root (setup.py's package_dir): expose it under its name.
    mkdir -p /tmp/almak-import && ln -sfn "$PWD" /tmp/almak-import/almak
    export PYTHONPATH=/tmp/almak-import${PYTHONPATH:+:$PYTHONPATH}
fi
GPU=$("$PY" -P -c 'from almak.eval.bench import device_name; print(device_name("cuda"))') || exit 1
LOG=${1:-benchmarks/results/gpu-logs-$GPU}
mkdir -p "$LOG"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))

step() {  # step NAME LIMIT_S COMMAND...: run with min(LIMIT_S, time left), log to $LOG/NAME.log
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) start=$SECONDS rc
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "$name: skipped, budget spent" | tee -a "$LOG/summary.txt"
        return 1
    fi
    timeout -k 5 "$limit" "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOG/summary.txt"
    return $rc
}

{
    date -u +"%F %T UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    "$PY" -P -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
} > "$LOG/summary.txt" 2>&1
cat "$LOG/summary.txt"

step kernels 180 "$PY" benchmarks/run_kernels.py
BENCH=(--batch-sizes 1,4,16 --prompt-len 128 --gen-len 64 --device cuda --overwrite)
step bench 150 "$PY" -P -m almak.cli.main bench --shape alma-7b float int8 int4 2:4 2:4-int4 "${BENCH[@]}" \
    --out "benchmarks/results/bench-alma-7b-$GPU"
BENCH_RC=$?
if ((BENCH_RC == 0)); then  # the same loop with eager steps, for the gain of the graphs
    step bench-eager 45 "$PY" -P -m almak.cli.main bench --shape alma-7b float int4 --no-cuda-graphs "${BENCH[@]}" \
        --no-plot --out "benchmarks/results/bench-alma-7b-eager-$GPU"
else  # graphs failed (see bench.log): the five variants with eager steps instead
    step bench-eager 150 "$PY" -P -m almak.cli.main bench --shape alma-7b float int8 int4 2:4 2:4-int4 \
        --no-cuda-graphs "${BENCH[@]}" --out "benchmarks/results/bench-alma-7b-eager-$GPU"
fi
step bench-hf 50 "$PY" -P -m almak.cli.main bench --shape alma-7b float --engine hf "${BENCH[@]}" --no-plot \
    --out "benchmarks/results/bench-alma-7b-hf-$GPU"
XDIST=$("$PY" -P -c 'import xdist' 2>/dev/null && echo "-n 12")
# shellcheck disable=SC2086
# One config per kernel path where the autotuner would run (ALMAK_AUTOTUNE=0); tests/kernels/test_configs.py
# forces every autotune config once, and step 1 exits 1 on a timed result that is off.
step tests 600 env ALMAK_AUTOTUNE=0 "$PY" -P -m pytest -p no:cacheprovider $XDIST -q --tb=short -m "not static_report" tests/kernels \
    tests/quant tests/sparse \
    tests/modeling/nn/test_quant_linear.py tests/modeling/nn/test_sparse_linear.py \
    tests/modeling/engines/test_decoder.py::test_cuda_graph_steps_equal_eager_steps \
    tests/modeling/engines/test_generate.py::test_cuda_graphs_translate_like_eager_steps_and_generate
tail -n 3 "$LOG/tests.log" 2>/dev/null | tee -a "$LOG/summary.txt"
