#!/usr/bin/env bash
# Checkpoint I/O: save and load MB/s of `moeforge train` against `dd` on the same disk, and the
# training-step stall of an async save. A benchmark, not a test: nothing is asserted; the goals
# are save and load >= 80% of dd and an async stall under one step.
#
#   scripts/bench-ckpt.sh [--config configs/small.pbtxt] [--dir DIR] [--rounds N]
#
#   --config C  the model to checkpoint (default configs/small.pbtxt, ~107M parameters: a 1.3 GB
#               checkpoint with both AdamW moments); batches are shrunk so steps are short
#   --dir DIR   where checkpoints and the dd file go (default /tmp/moeforge-bench-ckpt; removed)
#   --rounds N  save/load rounds, each next to its own dd runs (default 3); medians are reported
#
# Save MB/s = checkpoint bytes / the time from the snapshot to the commit (HDF5 write, fsync,
# SHA-256, manifest, renames). Load MB/s = bytes / the resume time (the hyperslab reads with their
# Fletcher-32 checks). dd writes the same number of bytes with conv=fsync and reads them back,
# through the page cache (bs=1M: the goal's baseline); moeforge moves chunk data with O_DIRECT
# (checkpoint.direct_io), so dd with oflag/iflag=direct (bs=8M) is timed too and printed beside.
# Before each read, dd's and the resume's, the page cache is dropped when the script may (root),
# so both read the disk as a job resumed on a fresh node does; otherwise both read from the page
# cache and the report says so. Each read follows its own write with nothing written in between
# (save -> resume, dd write -> dd read): below a VM the host may cache what was written last (on
# the machine this was tuned on, a 1.3 GB file read back right after its write ran at 2.2 GB/s with
# the guest's cache dropped, the same file once 2.6 GB had been written after it at 1.3 GB/s), so
# a read placed after another program's writes would be measured against a colder disk. Builds `moeforge` in $MOEFORGE_BUILD_DIR or
# build/ (configured already), or runs the binary $MOEFORGE_BIN as it is (to compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/small.pbtxt
dir=/tmp/moeforge-bench-ckpt
rounds=3
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
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

# dd on the same disk, the same bytes: written with conv=fsync, read back after the page cache
# is dropped (when we may: root), as a resumed job on a fresh node reads its checkpoint.
cold=no
drop_caches() { sync; if [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cold=yes; fi; }
dd_seconds() { sed -n 's/.* copied, \([0-9.]*\) s, .*/\1/p' | tail -1; }

# Rounds of: a synchronous save at step 2 and its resume, then dd's write and read (buffered, then
# O_DIRECT). The disk's speed drifts (other tenants, the host's cache), so each save and load is
# compared with the dd runs next to it and the median of the rounds' ratios is reported.
save_ratios=() load_ratios=() save_direct_ratios=() load_direct_ratios=() save_rates=() load_rates=() dd_w_rates=() dd_r_rates=()
for round in $(seq "$rounds"); do
  rm -rf "$dir/ckpt"
  save_log=$(run 2 --set checkpoint.dir="$dir/ckpt" --set checkpoint.every=2)
  save_s=$(echo "$save_log" | field '.*checkpoint: saved step 2 .* (\([0-9.]*\) s).*')
  [ -n "$save_s" ] || { echo "bench-ckpt: the save run failed:" >&2; echo "$save_log" >&2; exit 1; }
  bytes=$(du -sb "$dir/ckpt/step_00000002" | cut -f1)
  mb=$(( (bytes + 1048575) / 1048576 ))
  drop_caches
  load_log=$(run 2 --set checkpoint.dir="$dir/ckpt" --resume auto)
  load_s=$(echo "$load_log" | field '.*resumed from .* in \([0-9.]*\) s.*')
  [ -n "$load_s" ] || { echo "bench-ckpt: the resume run failed:" >&2; echo "$load_log" >&2; exit 1; }
  dd_w_s=$(dd if=/dev/zero of="$dir/dd.bin" bs=1M count="$mb" conv=fsync 2>&1 | dd_seconds)
  drop_caches
  dd_r_s=$(dd if="$dir/dd.bin" of=/dev/null bs=1M 2>&1 | dd_seconds)
  rm -f "$dir/dd.bin"
  dd_wd_s=$(dd if=/dev/zero of="$dir/dd.bin" bs=8M count="$(( (mb + 7) / 8 ))" oflag=direct conv=fsync 2>&1 | dd_seconds)
  drop_caches
  dd_rd_s=$(dd if="$dir/dd.bin" of=/dev/null bs=8M iflag=direct 2>&1 | dd_seconds)
  rm -f "$dir/dd.bin"
  dd_bytes=$((mb * 1048576)) ddd_bytes=$(( (mb + 7) / 8 * 8 * 1048576 ))
  read -r sr lr dwr drr srat lrat dwdr drdr < <(awk -v b="$bytes" -v db="$dd_bytes" -v s="$save_s" -v l="$load_s" \
      -v w="$dd_w_s" -v r="$dd_r_s" -v dd="$ddd_bytes" -v wd="$dd_wd_s" -v rd="$dd_rd_s" \
      'BEGIN { printf "%.1f %.1f %.1f %.1f %.3f %.3f %.1f %.1f\n", b/1e6/s, b/1e6/l, db/1e6/w, db/1e6/r, (b/s)/(db/w), (b/l)/(db/r), dd/1e6/wd, dd/1e6/rd }')
  printf "round %d: save %7.1f MB/s vs dd write %7.1f MB/s (%3.0f%%; dd O_DIRECT %7.1f)   load %7.1f MB/s vs dd read %7.1f MB/s (%3.0f%%; dd O_DIRECT %7.1f)\n" \
    "$round" "$sr" "$dwr" "$(awk -v x="$srat" 'BEGIN{print x*100}')" "$dwdr" "$lr" "$drr" "$(awk -v x="$lrat" 'BEGIN{print x*100}')" "$drdr"
  save_ratios+=("$srat"); load_ratios+=("$lrat"); save_direct_ratios+=("$(awk -v a="$sr" -v b="$dwdr" 'BEGIN{print a/b}')")
  load_direct_ratios+=("$(awk -v a="$lr" -v b="$drdr" 'BEGIN{print a/b}')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# Async saves every 4 steps of 12: the stall is the snapshot (copy to host buffers) on the
# training thread, compared with the mean step time; a save that finds the previous one still
# writing first waits for it, reported apart.
async_log=$(run 12 --set checkpoint.dir="$dir/ckpt_async" --set checkpoint.every=4 --set checkpoint.async_save=true)
stall=$(echo "$async_log" | sed -n 's/.*copied in \([0-9.]*\) s.*/\1/p' | awk '{s+=$1; n++} END {if (n) printf "%.3f", s/n}')
waited=$(echo "$async_log" | grep "copied in" | sed -n 's/.*waited \([0-9.]*\) s.*/\1/p' | awk '{s+=$1} END {printf "%.3f", s}')
step_s=$(python3 - "$dir/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tok = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][-12:][1:]
print(f"{sum(64 / t for t in tok) / len(tok):.3f}")
PY
)

awk -v b="$bytes" -v sm="$(median "${save_ratios[@]}")" -v lm="$(median "${load_ratios[@]}")" -v cold="$cold" \
    -v smd="$(median "${save_direct_ratios[@]}")" -v lmd="$(median "${load_direct_ratios[@]}")" \
    -v n="$rounds" -v stall="$stall" -v step="$step_s" -v waited="$waited" 'BEGIN {
  printf "checkpoint %.1f MB (%s), %d rounds, reads %s\n", b / 1e6, "'"$config"'", n, cold == "yes" ? "after dropping the page cache" : "from the page cache (not root: caches kept)"
  printf "save: median %.0f%% of dd write (conv=fsync)   [%.0f%% of dd oflag=direct]\n", sm * 100, smd * 100
  printf "load: median %.0f%% of dd read                  [%.0f%% of dd iflag=direct]\n", lm * 100, lmd * 100
  printf "async save: %.3f s stall per save (snapshot), mean step %.3f s; %.3f s in all waiting for a previous save\n", stall, step, waited
}'
