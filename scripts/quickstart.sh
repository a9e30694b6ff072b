#!/usr/bin/env bash
# From a fresh clone to a trained Mixture-of-Experts model in a few minutes on a laptop-class
# CPU, with no download: installs the dependencies, builds the `moeforge` binary, turns the
# license texts every Debian/Ubuntu system ships (/usr/share/common-licenses) into byte-level
# token shards, trains configs/tiny.pbtxt on them with data parallelism over several MPI ranks
# (one per core, at most 4), and prints the falling validation loss and a sample of generated
# text; then it releases the model: a Hugging Face folder (safetensors) and a GGUF file, and
# measures it with `moeforge eval`. Everything it writes goes under build/quickstart/.
#   scripts/quickstart.sh [--set field=value ...]   (extra overrides for `moeforge train`)
#   MOEFORGE_RANKS=1 scripts/quickstart.sh           (a single process instead)
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

ranks=${MOEFORGE_RANKS:-$(( $(nproc) < 2 ? 1 : ($(nproc) > 4 ? 4 : ($(nproc) == 3 ? 2 : $(nproc))) ))}
threads=$(( $(nproc) / ranks ))
echo "== training configs/tiny.pbtxt on $ranks rank(s) x $threads thread(s)"
export OMP_NUM_THREADS=$threads
launcher=()
if [ "$ranks" -gt 1 ]; then
  # mpirun refuses root unless told; the quickstart often runs in a root container.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  launcher=(mpirun -np "$ranks" --bind-to none -x OMP_NUM_THREADS)
fi
"${launcher[@]}" "$moeforge" train --config configs/tiny.pbtxt \
  --set data.train="$work/data/train" --set data.val="$work/data/val" \
  --set logging.dir="$work/run" --set checkpoint.dir="$work/checkpoints" "$@"

echo "== exporting the trained model as open weights"
rm -rf "$work/release"
"$moeforge" export "$work/checkpoints" --format hf --out "$work/release/hf" --dtype bf16
"$moeforge" export "$work/checkpoints" --format gguf --out "$work/release/model-q8_0.gguf" --type q8_0
"$moeforge" eval "$work/checkpoints" --data "$work/data/val"

echo "== done: metrics in $work/run (metrics.jsonl, TensorBoard events: tensorboard --logdir $work/run)"
echo "   checkpoints in $work/checkpoints; open weights in $work/release (hf/: transformers, model-q8_0.gguf: llama.cpp)"
echo "   try: $moeforge generate $work/checkpoints --prompt 'The ' --max-new-tokens 200"
