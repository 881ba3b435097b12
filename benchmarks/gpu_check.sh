#!/usr/bin/env bash
# One GPU check: build _C with CUDA, run tests/gpu, benchmark the kernels (the predicated GEMV among them),
# one layer, the 8B model and its CUDA-graph decode on CUDA, print one summary. Sized for < 9 minutes on one
# H100/H200: the step limits add up to 9.2 min, a normal run takes ~5 (the build, one arch with 16 jobs, is
# the longest step).
#
#   bash benchmarks/gpu_check.sh            # results (CSV, PNG, logs) in $OUT or benchmarks/results/gpu
#
# Needs python with the CUDA build of torch, nvcc (CUDA_HOME), pytest, and this checkout. Every step has a
# time limit and a failure does not stop later steps: the summary says which passed.
set -uo pipefail
cd "$(dirname "$0")/.."

results="${OUT:-benchmarks/results/gpu}"
mkdir -p "$results"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
arch="$(python -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo 9.0)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
summary=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $results/NAME.log, record the status
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s) =="
  timeout "$limit" "$@" 2>&1 | tee "$results/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-14s %-8s %4ds' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "FAIL($rc)")" $((SECONDS - start)))")
  return 0
}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: python here has no CUDA torch or sees no GPU (need the CUDA build of torch)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/gpu.txt"
step build 130 env MAX_JOBS="${MAX_JOBS:-16}" MINDSKIP_FORCE_CUDA=1 \
  pip install -q --no-deps --no-build-isolation -e .
step info 20 python -m mindskip_kernels info
step tests_gpu 150 env MINDSKIP_TRITON_AUTOTUNE=0 python -m pytest tests/gpu -q -p no:cacheprovider --maxfail=25
step bench_kernels 60 python benchmarks/bench_kernels.py --device cuda --dtypes bfloat16,float16 \
  --csv "$results/kernels.csv" --plot "$results/kernels.png"
step bench_layer 50 python benchmarks/bench_layer.py --device cuda --dtype bfloat16 --seq-len 4096 --batch 4 \
  --csv "$results/layer.csv" --plot "$results/layer.png"
step bench_e2e 80 python benchmarks/bench_e2e.py --model llama3-8b --seq-len 2048 --skip 0.5 --decode-steps 16 --repeats 2 --kv kept all \
  --csv "$results/e2e.csv" --plot "$results/e2e.png"
# decode tokens/s with whole-step CUDA graphs: dense (HF StaticCache) vs MindSkip (fixed pool), batch 1 and 8
step bench_decode 60 python benchmarks/bench_graph_decode.py --model llama3-8b --shapes 1x512 8x512 \
  --skip 0.5 --decode-steps 16 --repeats 2 --csv "$results/decode_graphs.csv"

echo
echo "== summary ($(cat "$results/gpu.txt")) =="
printf '%s\n' "${summary[@]}"
echo "tests: $(grep -E '(passed|failed)' "$results/tests_gpu.log" | tail -1)"
echo "decode with CUDA graphs (tokens/s):"
grep -E '^\|' "$results/bench_decode.log" | sed 's/^/  /'
echo "predicated projection of a decode row (Triton, all rows kept / skipped) vs cuBLAS (p50):"
grep -E '^\| +predicated_linear .*\| +triton \|' "$results/bench_kernels.log" \
  | awk -F'|' '{for (i = 2; i <= 10; i++) gsub(/^ +| +$/, "", $i);
                printf "  %-26s %-9s %-22s %9s ms  x%s\n", $2, $3, $4, $6, $10}'
echo "kernel speedups over the reference (p50):"
grep -E '^\|.*\| +(compiled|triton) \|' "$results/bench_kernels.log" | grep -v predicated_linear \
  | awk -F'|' '{for (i = 2; i <= 10; i++) gsub(/^ +| +$/, "", $i);
                printf "  %-20s %-9s %-9s %9s ms %8s GB/s  x%s\n", $2, $3, $5, $6, $9, $10}'
