#!/usr/bin/env bash
# Expert-parallel token dispatch time per step: moeforge's all-to-all dispatcher
# (models/token_dispatcher.h) against an all-gather dispatcher measured in the same run on the
# same random routing (tests/parallel/bench_ep.cpp), on 4 CPU ranks by default. One step = one MoE
# layer's forward dispatch + combine and backward's transposed pair, identity experts, so only
# token movement is timed. A benchmark, not a test: it prints a table and the speedup; it checks
# only that both dispatchers combine to the same output.
#
#   scripts/bench-ep.sh [--ranks N] [--tokens T] [--dim C] [--experts E] [--top-k K] [--steps S]
#
# Defaults: 4 ranks, 4096 tokens per rank, dim 1024, 8 experts, top-2, 20 steps. Builds the
# bench_ep target in the build directory ($MOEFORGE_BUILD_DIR or build/, configured already).
# Each rank runs one thread; the machine should be otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."

ranks=4 tokens=4096 dim=1024 experts=8 top_k=2 steps=20
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --dim) dim=$2; shift 2 ;;
    --experts) experts=$2; shift 2 ;;
    --top-k) top_k=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-ep: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$ranks" "$tokens" "$dim" "$experts" "$top_k" "$steps"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench-ep: expected a positive number, got '$n'" >&2; exit 2; }
done
if [ $((experts % ranks)) -ne 0 ] || [ "$top_k" -gt "$experts" ]; then
  echo "bench-ep: --experts $experts must be a multiple of --ranks $ranks and >= --top-k $top_k" >&2
  exit 2
fi

source scripts/lib/bench.sh
bench_build bench-ep bench_ep
bench_mpirun "$ranks" "$build_dir/tests/bench_ep" "$tokens" "$dim" "$experts" "$top_k" "$steps"
