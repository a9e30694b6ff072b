#!/usr/bin/env bash
# Checkpoint I/O: save and load MB/s of `moeforge train` against `dd` on the same disk, and the
# training-step stall of an async save. A benchmark, not a test: nothing is asserted; the goals
# are save and load >= 80% of dd and an async stall under one step.
#
#   scripts/bench-ckpt.sh [--config configs/small.pbtxt] [--dir DIR]
#
#   --config C  the model to checkpoint (default configs/small.pbtxt, ~107M parameters: a 1.3 GB
#               checkpoint with both AdamW moments); batches are shrunk so steps are short
#   --dir DIR   where checkpoints and the dd file go (default /tmp/moeforge-bench-ckpt; removed)
#
# Save MB/s = checkpoint bytes / the time from the snapshot to the commit (HDF5 write, fsync,
# SHA-256, manifest, renames). Load MB/s = bytes / the resume time (SHA-256 of every file, then
# the hyperslab reads). dd writes the same number of bytes with conv=fsync and reads them back;
# both sides read from the page cache when it holds the file, as it usually does right after a
# write (we do not drop caches on a shared machine). Builds `moeforge` in $MOEFORGE_BUILD_DIR or
# build/ (configured already), or runs the binary $MOEFORGE_BIN as it is (to compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/small.pbtxt
dir=/tmp/moeforge-bench-ckpt
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-ckpt: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
source scripts/lib/bench.sh
if [ -n "${MOEFORGE_BIN:-}" ]; then
  bin=$MOEFORGE_BIN
else
  bench_build bench-ckpt moeforge
  bin=$build_dir/launch/moeforge
fi

rm -rf "$dir" && mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
corpus=../shared/data/tinyshakespeare.txt
[ -f "$corpus" ] || { yes 'the king speaks to the fool and the queen.' | head -c 2000000 > "$dir/corpus.txt"; corpus=$dir/corpus.txt; }
"$bin" data prepare --input "$corpus" --output "$dir/data" --val-fraction 0.05 >/dev/null

run() {  # run <steps> <extra --set ...>
  local steps=$1; shift
  "$bin" train --config "$config" --set data.train="$dir/data/train" --set data.val="$dir/data/val" \
    --set train.steps="$steps" --set train.seq_len=64 --set train.global_batch=1 --set train.micro_batch=1 \
    --set train.log_every=1 --set train.eval_every=0 --set train.eval_batches=1 --set train.sample_tokens=0 \
    --set optim.warmup_steps=0 --set logging.dir="$dir/run" --set logging.tensorboard=false "$@" 2>&1
}
field() { sed -n "s/$1/\\1/p" | head -1; }

# Synchronous save at step 2, then a resume of it.
save_log=$(run 2 --set checkpoint.dir="$dir/ckpt" --set checkpoint.every=2)
save_s=$(echo "$save_log" | field '.*checkpoint: saved step 2 .* (\([0-9.]*\) s).*')
bytes=$(du -sb "$dir/ckpt/step_00000002" | cut -f1)
load_log=$(run 2 --set checkpoint.dir="$dir/ckpt" --resume auto)
load_s=$(echo "$load_log" | field '.*resumed from .* in \([0-9.]*\) s.*')

# dd on the same disk, the same bytes.
mb=$(( (bytes + 1048575) / 1048576 ))
dd_w=$(dd if=/dev/zero of="$dir/dd.bin" bs=1M count="$mb" conv=fsync 2>&1 | tail -1)
dd_r=$(dd if="$dir/dd.bin" of=/dev/null bs=1M 2>&1 | tail -1)
rm -f "$dir/dd.bin"
dd_rate() { echo "$1" | sed -n 's/.*, \([0-9.]* [MGk]B\/s\)$/\1/p'; }

# Async saves every 2 steps: the stall is the snapshot (copy to host buffers) on the training
# thread; compare it with the mean step time.
async_log=$(run 8 --set checkpoint.dir="$dir/ckpt_async" --set checkpoint.every=2 --set checkpoint.async_save=true)
stall=$(echo "$async_log" | sed -n 's/.*copied in \([0-9.]*\) s.*/\1/p' | awk '{s+=$1; n++} END {if (n) printf "%.3f", s/n}')
step_s=$(python3 - "$dir/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tok = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][-8:][1:]
print(f"{sum(64 / t for t in tok) / len(tok):.3f}")
PY
)

awk -v b="$bytes" -v s="$save_s" -v l="$load_s" -v dw="$(dd_rate "$dd_w")" -v dr="$(dd_rate "$dd_r")" \
    -v stall="$stall" -v step="$step_s" 'BEGIN {
  printf "checkpoint %.1f MB (%s)\n", b / 1e6, "'"$config"'"
  printf "save  %7.1f MB/s  (%.2f s)   dd write (conv=fsync) %s\n", b / 1e6 / s, s, dw
  printf "load  %7.1f MB/s  (%.2f s)   dd read %s\n", b / 1e6 / l, l, dr
  printf "async save: %.3f s stall per save (snapshot), mean step %.3f s\n", stall, step
}'
