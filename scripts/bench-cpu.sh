#!/usr/bin/env bash
# CPU training throughput of moeforge against the PyTorch reference model
# (tests/reference/moe_reference.py, trained by tests/reference/bench_torch_train.py): the same
# run configuration, batch, data, thread count and per-step work (forward + backward over the
# micro-batches, global grad-norm clipping, an AdamW step at the constant optim.lr). Prints
# tokens/s of each and their ratio moeforge/pytorch as a table. A benchmark, not a test: nothing
# is asserted.
#
#   scripts/bench-cpu.sh [--steps N] [--skip N] [--threads N] [--config FILE] [--repeat R]
#                        [--presets base,wide] [--set field=value ...]
#
#   --steps N      optimizer steps per run (default 30)
#   --skip N       warm-up steps left out of the rate (default 2: the rate covers steps 3..N)
#   --threads N    OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and torch.set_num_threads (default nproc;
#                  PyTorch also runs with OPENBLAS_NUM_THREADS=1 and keeps its better rate)
#   --config FILE  run configuration whose model/train/optim sections both sides use
#                  (default configs/tiny.pbtxt: 16 sequences x 128 tokens, one micro-batch)
#   --repeat R     runs per side and preset; the table shows the best (default 1)
#   --presets L    comma-separated: base = the config as given, wide = base with twice the width
#                  (dim 256, 8 heads / 4 kv heads of 32, expert_hidden 512) (default base,wide)
#   --set F=V      extra override for both sides (model./train./optim. fields), repeatable
#
# Data: the license texts every Debian/Ubuntu system ships (/usr/share/common-licenses, as
# scripts/quickstart.sh uses), prepared into byte-level token shards once under
# <build>/bench-cpu/. Both sides train on those shards. Needs a Release build of the moeforge
# binary (<build>/launch/moeforge, build dir $MOEFORGE_BUILD_DIR or build/) and Debian's
# python3-torch. Tokens/s is tokens / wall time of the timed steps on each side; the machine
# should be otherwise idle, since with several threads a busy core stalls every OpenMP barrier.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=30
skip=2
threads=$(nproc)
config=configs/tiny.pbtxt
repeat=1
presets=base,wide
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --skip) skip=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --presets) presets=$2; shift 2 ;;
    --set) extra+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-cpu: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$steps" "$skip" "$threads" "$repeat"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "bench-cpu: expected a number, got '$n'" >&2; exit 2; }
done
if [ "$steps" -le "$skip" ] || [ "$threads" -lt 1 ] || [ "$repeat" -lt 1 ]; then
  echo "bench-cpu: need --steps > --skip, --threads >= 1 and --repeat >= 1" >&2
  exit 2
fi

IFS=, read -r -a preset_list <<< "$presets"
for preset in "${preset_list[@]}"; do
  [[ "$preset" =~ ^(base|wide)$ ]] || { echo "bench-cpu: unknown preset '$preset' (base, wide)" >&2; exit 2; }
done

build_dir=${MOEFORGE_BUILD_DIR:-build}
moeforge="$build_dir/launch/moeforge"
python=/usr/bin/python3
if [ ! -x "$moeforge" ]; then
  echo "bench-cpu: $moeforge not found; build it first:" >&2
  echo "  cmake -S . -B $build_dir -DCMAKE_BUILD_TYPE=Release && cmake --build $build_dir --target moeforge" >&2
  exit 1
fi

work="$build_dir/bench-cpu"
corpus=$(find /usr/share/common-licenses -maxdepth 1 -type f | sort)
if [ -z "$corpus" ]; then
  echo "bench-cpu: /usr/share/common-licenses has no files (package base-files)" >&2
  exit 1
fi
if [ ! -f "$work/data/manifest.json" ]; then
  # shellcheck disable=SC2086
  "$moeforge" data prepare --input $corpus --output "$work/data" --val-fraction 0.1 > /dev/null
fi

export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads

# Prints moeforge's tokens/s over steps skip+1..steps from its metrics.jsonl (one record per step):
# tokens / total time = count / sum(1 / rate), the same measure the PyTorch side prints.
moeforge_rate() {
  "$python" - "$1" "$skip" <<'EOF'
import json, sys
rates = [r["train/tokens_per_s"] for r in map(json.loads, open(sys.argv[1]))
         if "train/tokens_per_s" in r and r["step"] > int(sys.argv[2])]
print(f"{len(rates) / sum(1.0 / r for r in rates):.1f}")
EOF
}

# Runs one side once, appending its log under $work/logs; prints the rate.
run_moeforge() {  # preset, run, overrides...
  local name=$1 run=$2; shift 2
  local dir="$work/runs/$name-$run" sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  rm -rf "$dir"
  "$moeforge" train --config "$config" "${sets[@]}" \
    --set data.train="$work/data/train" --set data.val="$work/data/val" --set logging.dir="$dir" \
    --set train.steps="$steps" --set optim.schedule=CONSTANT --set optim.warmup_steps=0 --set train.log_every=1 \
    --set train.eval_every=0 --set train.sample_tokens=0 --set train.threads="$threads" \
    >> "$work/logs/moeforge-$name.log" 2>&1 || { tail -5 "$work/logs/moeforge-$name.log" >&2; return 1; }
  moeforge_rate "$dir/metrics.jsonl"
}

# Debian's torch calls the pthread build of OpenBLAS, whose own thread pool competes with torch's
# OpenMP pool for the same cores; PyTorch gets the better of OPENBLAS_NUM_THREADS = threads or 1.
run_torch() {  # preset, OPENBLAS_NUM_THREADS, overrides...
  local name=$1 blas=$2; shift 2
  local sets=() log="$work/logs/pytorch-$name.log"
  for s in "$@"; do sets+=(--set "$s"); done
  echo "== OPENBLAS_NUM_THREADS=$blas" >> "$log"
  OPENBLAS_NUM_THREADS=$blas "$python" tests/reference/bench_torch_train.py --config "$config" "${sets[@]}" \
    --data "$work/data/train" --steps "$steps" --skip "$skip" --threads "$threads" >> "$log" 2>&1 ||
    { tail -5 "$log" >&2; return 1; }
  tail -1 "$log" | sed -E 's/.* ([0-9.]+) tok\/s.*/\1/'
}

best() { printf '%s\n' "$@" | sort -g | tail -1; }

rm -rf "$work/logs" && mkdir -p "$work/logs"
echo "bench-cpu: $config, $threads thread(s), $steps steps (rate over steps $((skip + 1))..$steps), best of $repeat," \
  "data /usr/share/common-licenses; logs in $work/logs"
printf '%-6s %15s %15s %9s  %s\n' preset "moeforge tok/s" "pytorch tok/s" ratio "overrides of $config"
for preset in "${preset_list[@]}"; do
  case "$preset" in
    base) sets=() ;;
    wide) sets=(model.dim=256 model.n_heads=8 model.n_kv_heads=4 model.head_dim=32 model.expert_hidden=512) ;;
  esac
  sets+=("${extra[@]}")
  ours=() theirs=()
  for ((r = 1; r <= repeat; r++)); do
    # Alternate the sides so a change in machine load does not favour one of them.
    rate=$(run_moeforge "$preset" "$r" "${sets[@]}")
    ours+=("$rate")
    for blas in $(printf '%s\n' "$threads" 1 | sort -u); do
      rate=$(run_torch "$preset" "$blas" "${sets[@]}")
      theirs+=("$rate")
    done
  done
  a=$(best "${ours[@]}") b=$(best "${theirs[@]}")
  printf '%-6s %15.0f %15.0f %8.2fx  %s\n' "$preset" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')" "${sets[*]:-none}"
done
