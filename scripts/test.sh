#!/usr/bin/env bash
# Installs the dependencies, builds moeforge (Release, CUDA when nvcc is found) and runs every
# test with ctest. GPU tests skip when no device is present.
#   scripts/test.sh [extra ctest args, e.g. -R Attention]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

build_dir=${MOEFORGE_BUILD_DIR:-build}

# Python readers the interop tests compare against, from PyPI, in a venv that also sees Debian's
# torch and numpy: TensorBoard's (metrics), and safetensors, gguf and tokenizers (open-weight
# export, tests/export/). Tests find it at <build>/pyenv.
if [ ! -x "$build_dir/pyenv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$build_dir/pyenv"
fi
"$build_dir/pyenv/bin/python" -m pip install --quiet --disable-pip-version-check tensorboard crc32c safetensors gguf tokenizers

cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA="${MOEFORGE_CUDA:-AUTO}"
cmake --build "$build_dir" -j "${MOEFORGE_JOBS:-2}"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cd "$build_dir"
ctest --output-on-failure --timeout 900 "$@"
