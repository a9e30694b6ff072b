#!/usr/bin/env bash
# Installs every system package moeforge builds, tests and runs with (Debian/Ubuntu).
# Idempotent: packages already present are skipped, and apt's lists are refreshed only when
# something is missing. `--runtime` installs only what building and running moeforge needs
# (not the Python packages the tests compare against). CUDA is not installed here: it comes with the CUDA toolkit under
# /usr/local/cuda, and the build uses it when nvcc is found (MOEFORGE_CUDA=AUTO).
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin
  libhdf5-dev
  libprotobuf-dev protobuf-compiler
  libopenblas-openmp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libcli11-dev libfmt-dev libssl-dev
)
test_packages=(python3-torch python3-numpy python3-h5py python3-venv)
if [ "${1:-}" != "--runtime" ]; then
  packages+=("${test_packages[@]}")
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
"${sudo_cmd[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
