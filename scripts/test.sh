#!/usr/bin/env bash
# Installs the dependencies, builds moeforge (Release, CUDA when nvcc is found) and runs every
# test with ctest. GPU tests skip when no device is present.
#   scripts/test.sh [extra ctest args, e.g. -R Attention]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

build_dir=${MOEFORGE_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA="${MOEFORGE_CUDA:-AUTO}"
cmake --build "$build_dir" -j "${MOEFORGE_JOBS:-2}"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cd "$build_dir"
ctest --output-on-failure --timeout 900 "$@"
