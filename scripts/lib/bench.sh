# Shared by the scripts/bench-*.sh benchmarks (sourced, not run). Each benchmark builds its one
# target in an already configured build directory and runs it with one thread per rank.
#
#   bench_build NAME TARGET   sets build_dir ($MOEFORGE_BUILD_DIR or build/) and builds TARGET
#                             there (-j $MOEFORGE_JOBS or 2); NAME prefixes the error messages
#   bench_mpirun RANKS CMD... runs CMD on RANKS MPI ranks (as root too; oversubscribed when
#                             RANKS exceeds the cores)

bench_build() {
  local name=$1 target=$2 log
  build_dir=${MOEFORGE_BUILD_DIR:-build}
  if [ ! -f "$build_dir/CMakeCache.txt" ]; then
    echo "$name: $build_dir is not a configured build directory; configure it first:" >&2
    echo "  cmake -S . -B $build_dir -DCMAKE_BUILD_TYPE=Release" >&2
    exit 1
  fi
  if ! log=$(cmake --build "$build_dir" --target "$target" -j "${MOEFORGE_JOBS:-2}" 2>&1); then
    echo "$log" >&2
    exit 1
  fi
}

bench_mpirun() {
  local ranks=$1; shift
  export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
  # Open MPI refuses to run as root without these (containers).
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  local oversubscribe=()
  [ "$ranks" -gt "$(nproc)" ] && oversubscribe=(--oversubscribe)
  mpirun -np "$ranks" "${oversubscribe[@]}" "$@"
}
