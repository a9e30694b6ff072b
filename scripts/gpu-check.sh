#!/usr/bin/env bash
# The GPU check of the CUDA backend, for a machine with a GPU: builds moeforge with the CUDA
# backend for the local GPU's architecture only (fast), runs every gpu-labelled test (each CUDA op
# against the CPU op on random inputs, fp32 to 1e-5 and bf16 to 1e-2, and a three-step training
# run on both devices), then the backend benchmark (tests/gpu/bench_cuda_ops.cpp: copy bandwidth,
# cuBLASLt GEMM TFLOP/s, per-op GB/s against the copy, fused attention TFLOP/s) and PyTorch's SDPA
# on the same attention sizes (scripts/bench_sdpa.py, when torch is installed), and prints a short
# table last. Designed to
# finish well within 8 minutes on one H200 from a clean build directory.
#
#   scripts/gpu-check.sh [--build-dir DIR] [--quick]
#
#   --build-dir DIR   build directory (default build-gpu)
#   --quick           smaller benchmark sizes and fewer repetitions
#
# Exit status: 0 when every gpu test passed (and none was skipped: a skip means no device), 1
# otherwise, 2 on a usage error.
set -euo pipefail
cd "$(dirname "$0")/.."

build=build-gpu
quick=
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build=$2; shift 2 ;;
    --quick) quick=--quick; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no GPU visible (nvidia-smi -L failed); nothing to check" >&2
  exit 1
fi
# The local GPU's compute capability, e.g. 9.0 -> 90, so nvcc builds one architecture.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')
jobs=$(nproc)
start=$(date +%s)

echo "== configure and build ($build, sm_$arch, -j$jobs)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" >/dev/null
targets=$(cd tests/gpu && ls test_*.cpp | sed 's/^test_/test_gpu_/; s/\.cpp$//' | tr '\n' ' ')
# shellcheck disable=SC2086
cmake --build "$build" -j"$jobs" --target $targets bench_cuda_ops >/dev/null
built=$(date +%s)

echo "== gpu tests"
log=$(mktemp)
status=0
(cd "$build" && ctest -L gpu --output-on-failure --timeout 300) | tee "$log" || status=1
if grep -q "(Skipped)" "$log"; then
  echo "gpu-check: some gpu tests were skipped (see above)" >&2
  status=1
fi
tested=$(date +%s)

echo "== benchmark"
bench=$(mktemp)
"$build/tests/bench_cuda_ops" $quick | tee "$bench" || status=1
# The fused attention's baseline: PyTorch's SDPA on the same sizes, where torch is installed.
sdpa=$(mktemp)
if python3 -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  python3 scripts/bench_sdpa.py $quick | tee "$sdpa" || status=1
else
  echo "gpu-check: python3 with CUDA torch not found; no SDPA baseline" | tee "$sdpa"
fi
done_at=$(date +%s)

echo
echo "== gpu-check summary"
grep -E "tests passed|tests failed" "$log" | tail -n1
printf "build %ds, tests %ds, benchmark %ds, total %ds\n" $((built - start)) $((tested - built)) \
  $((done_at - tested)) $((done_at - start))
sed -n '/^CUDA backend benchmark/,$p' "$bench"
cat "$sdpa"
rm -f "$log" "$bench" "$sdpa"
exit $status
