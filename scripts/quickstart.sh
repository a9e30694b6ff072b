#!/usr/bin/env bash
# From a fresh clone to a trained Mixture-of-Experts model in a few minutes on a laptop-class
# CPU, with no download: installs the dependencies, builds the `moeforge` binary, turns the
# license texts every Debian/Ubuntu system ships (/usr/share/common-licenses) into byte-level
# token shards, trains configs/tiny.pbtxt on them, and prints the falling validation loss and a
# sample of generated text. Everything it writes goes under build/quickstart/.
#   scripts/quickstart.sh [--set field=value ...]   (extra overrides for `moeforge train`)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --runtime

build_dir=${MOEFORGE_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA="${MOEFORGE_CUDA:-AUTO}" > /dev/null
cmake --build "$build_dir" --target moeforge -j "${MOEFORGE_JOBS:-2}"
moeforge="$build_dir/launch/moeforge"

work="$build_dir/quickstart"
corpus=$(find /usr/share/common-licenses -maxdepth 1 -type f | sort)
if [ -z "$corpus" ]; then
  echo "quickstart: /usr/share/common-licenses has no files (package base-files)" >&2
  exit 1
fi
echo "== preparing data from $(echo "$corpus" | wc -l) license texts in /usr/share/common-licenses"
# shellcheck disable=SC2086
"$moeforge" data prepare --input $corpus --output "$work/data" --val-fraction 0.1

echo "== training configs/tiny.pbtxt"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
"$moeforge" train --config configs/tiny.pbtxt \
  --set data.train="$work/data/train" --set data.val="$work/data/val" \
  --set logging.dir="$work/run" "$@"

echo "== done: metrics in $work/run (metrics.jsonl, TensorBoard events: tensorboard --logdir $work/run)"
