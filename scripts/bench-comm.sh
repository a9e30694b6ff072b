#!/usr/bin/env bash
# All-reduce bus bandwidth of moeforge's Comm (MpiComm::all_reduce: argument checks, call record,
# watchdog deadline) against raw MPI_Allreduce on the same communicator, f32 sum in place, from
# 1 KiB to 64 MiB in powers of 4, on 2 ranks (tests/parallel/bench_comm.cpp). The two sides
# alternate call by call; the table shows each side's median microseconds per call and GB/s of bus
# bandwidth (2(n-1)/n * bytes / time), and the overhead of Comm in percent. A benchmark, not a
# test: nothing is asserted; the goal is <= 5% overhead from 1 MiB up.
#
#   scripts/bench-comm.sh [--ranks N] [--calls C]
#
#   --ranks N   MPI ranks (default 2)
#   --calls C   at least C timed calls per side and size (default 30; small sizes get more)
#
# Builds the bench_comm target in the build directory ($MOEFORGE_BUILD_DIR or build/, configured
# already: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release). Each rank runs one thread; the machine
# should be otherwise idle, since a busy core delays every message.
set -euo pipefail
cd "$(dirname "$0")/.."

ranks=2
calls=30
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks=$2; shift 2 ;;
    --calls) calls=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-comm: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$ranks" "$calls"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench-comm: expected a positive number, got '$n'" >&2; exit 2; }
done

source scripts/lib/bench.sh
bench_build bench-comm bench_comm
bench_mpirun "$ranks" "$build_dir/tests/bench_comm" "$calls"
