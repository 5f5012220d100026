#!/usr/bin/env bash
# The speed table of issue 10 in one command: ours beside diffusers / lpips (eager and compiled),
# the real trainers' images/s and MFU, diffusers' train_text_to_image.py, time to an image and the
# data loaders alone. Every benchmark runs under its own `timeout`, so one hang or failure does not
# lose the rest; each prints its table as it finishes, and everything lands in the results folder:
#   <out>/RESULTS.md        the summary table (issue 10's rows) + every benchmark's table + status
#   <out>/<name>.out/.err   each benchmark's output; <out>/<name>.json its numbers; <out>/status.tsv
#
# Usage (from anywhere; the Python that runs it: $PYTHON, else .venv/bin/python, else python):
#   benchmarks/bench_gpu.sh --diffusers_examples ~/diffusers/examples        # a GPU: tutorial sizes
#   benchmarks/bench_gpu.sh --device cpu --quick                             # tiny sizes (how it is tested)
# Options:
#   --device cuda|cpu        default: cuda when torch sees a GPU
#   --quick                  tiny sizes (configs/demo/*, micro UNets, few steps) for a CPU
#   --out DIR                results folder (default bench_out/gpu_<date>)
#   --diffusers_examples DIR diffusers' examples/ folder (or $DIFFUSERS_EXAMPLES): train_text_to_image.py
#                            (nothing of diffusers is copied into this project; without it that row is skipped)
#   --wheels DIR             pip install --no-index every wheel in DIR first (diffusers, lpips, datasets,
#                            ... on a machine without them)
#   --only a,b / --skip a,b  run only / skip these benchmarks (names: --list)
#   --timeout_scale X        multiply every timeout (slow machines, cold compile caches)
#   --peak_tflops X          the peak for MFU (default: the device's known dense bf16 rate; none on a CPU)
#   --list                   print the benchmarks and their commands, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE="" QUICK=0 OUT="" EXAMPLES="${DIFFUSERS_EXAMPLES:-}" WHEELS="" ONLY="" SKIP="" SCALE=1 LIST=0 PEAK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --diffusers_examples) EXAMPLES="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    --skip) SKIP=",$2,"; shift 2 ;;
    --timeout_scale) SCALE="$2"; shift 2 ;;
    --peak_tflops) PEAK="--peak_tflops $2"; shift 2 ;;
    --list) LIST=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "bench_gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
  NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -n "$WHEELS" ] && [ "$LIST" = 0 ]; then
  echo "== installing the wheels in $WHEELS"
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl || echo "(some wheels did not install)"
fi
if [ -z "$DEVICE" ]; then
  DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
fi
OUT=$(realpath -m "${OUT:-bench_out/gpu_$(date +%Y%m%d_%H%M%S)}")
WORK="$OUT/work"
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# -- the benchmarks: name, timeout (s), python modules they need, command -----------------------
NAMES=() TIMEOUTS=() NEEDS=() COMMANDS=()
add() { NAMES+=("$1"); TIMEOUTS+=("$2"); NEEDS+=("$3"); shift 3; COMMANDS+=("$*"); }
D="--device $DEVICE"
B="benchmarks"
if [ "$QUICK" = 1 ]; then
  U="$B/bench_unet.py $D $PEAK --iters 3 --warmup 1"
  add unet_b8_64             300 diffusers "$U --config tiny --batch_size 2 --latent_size 16"
  add unet_b32_32_mask       300 diffusers "$U --config tiny --batch_size 2 --latent_size 8 --context_mask --caption_tokens 20"
  add unet_b64_32_eager      300 diffusers "$U --config micro --batch_size 4 --latent_size 8 --tf32"
  add unet_b64_32_compiled   900 diffusers "$U --config micro --batch_size 4 --latent_size 8 --tf32 --compile"
  add unet_b64_32_channels_last 300 diffusers "$U --config micro --batch_size 4 --latent_size 8 --tf32 --channels_last"
  S="$B/bench_stage1.py $D $PEAK --config tiny --batch_size 2 --img_size 32 --iters 3 --warmup 1"
  add stage1_eager           300 "diffusers lpips" "$S"
  add stage1_compiled        900 "diffusers lpips" "$S --compile"
  add stage1_channels_last   300 "diffusers lpips" "$S --channels_last"
  add lpips                  300 lpips "$B/bench_lpips.py $D --batch_size 4 --img_size 32 --iters 3 --repeats 2"
  add trainer_stage2         1200 "" "$B/bench_trainer.py $D $PEAK --quick --stages 2 --work_dir $WORK"
  add trainer_stage1         1200 "" "$B/bench_trainer.py $D $PEAK --quick --stages 1 --work_dir $WORK"
  add diffusers_t2i          600 "diffusers datasets" "$B/bench_diffusers_t2i.py $D --quick --work_dir $WORK --examples '$EXAMPLES'"
  add sampling               300 "" "$B/bench_sampling.py $D --quick --repeats 2 --work_dir $WORK"
  add loader                 300 "" "$B/bench_loader.py $D --quick --work_dir $WORK"
else
  U="$B/bench_unet.py $D $PEAK --config sd --dtype bfloat16 --iters 20 --warmup 5"
  add unet_b8_64             600 diffusers "$U --batch_size 8 --latent_size 64"
  add unet_b8_64_compiled    1200 diffusers "$U --batch_size 8 --latent_size 64 --compile"
  add unet_b32_32_mask       600 diffusers "$U --batch_size 32 --latent_size 32 --context_mask --caption_tokens 20"
  add unet_b32_32_mask_compiled 1200 diffusers "$U --batch_size 32 --latent_size 32 --context_mask --caption_tokens 20 --compile"
  add unet_b64_32_eager      600 diffusers "$U --batch_size 64 --latent_size 32 --tf32"
  add unet_b64_32_compiled   1200 diffusers "$U --batch_size 64 --latent_size 32 --tf32 --compile"
  add unet_b64_32_channels_last 600 diffusers "$U --batch_size 64 --latent_size 32 --tf32 --channels_last"
  S="$B/bench_stage1.py $D $PEAK --config tutorial --batch_size 4 --autocast bf16 --tf32 --iters 20 --warmup 3"
  add stage1_eager           600 "diffusers lpips" "$S"
  add stage1_compiled        1200 "diffusers lpips" "$S --compile"
  add stage1_channels_last   600 "diffusers lpips" "$S --channels_last"
  add lpips                  600 lpips "$B/bench_lpips.py $D --batch_size 64 --img_size 64"
  add trainer_stage2         2400 "" "$B/bench_trainer.py $D $PEAK --stages 2 --work_dir $WORK"
  add trainer_stage1         2400 "" "$B/bench_trainer.py $D $PEAK --stages 1 --work_dir $WORK"
  add diffusers_t2i          2400 "diffusers datasets" "$B/bench_diffusers_t2i.py $D --work_dir $WORK --examples '$EXAMPLES'"
  add sampling               900 "" "$B/bench_sampling.py $D --work_dir $WORK"
  add loader                 900 "" "$B/bench_loader.py $D --work_dir $WORK"
fi

if [ "$LIST" = 1 ]; then
  for i in "${!NAMES[@]}"; do printf '%-28s %5ss  %s\n' "${NAMES[$i]}" "${TIMEOUTS[$i]}" "${COMMANDS[$i]}"; done
  exit 0
fi

# -- run ----------------------------------------------------------------------------------------
mkdir -p "$OUT"
DESC=$("$PY" -c 'import torch, platform; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"; print(f"{d}, torch {torch.__version__}")' 2>/dev/null)
echo "bench_gpu.sh: device $DEVICE ($DESC), $([ "$QUICK" = 1 ] && echo quick || echo full) sizes, results in $OUT"
printf 'name\tstatus\tseconds\tcommand\n' > "$OUT/status.tsv"
for i in "${!NAMES[@]}"; do
  name="${NAMES[$i]}" cmd="${COMMANDS[$i]}"
  if { [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; } || [[ "$SKIP" == *",$name,"* ]]; then continue; fi
  status=""
  for module in ${NEEDS[$i]}; do
    has "$module" || status="skipped (no $module: pip install it, or --wheels DIR)"
  done
  if [ -z "$status" ] && [ "$name" = diffusers_t2i ] && [ -z "$EXAMPLES" ]; then
    status="skipped (no --diffusers_examples / \$DIFFUSERS_EXAMPLES)"
  fi
  limit=$(awk -v t="${TIMEOUTS[$i]}" -v s="$SCALE" 'BEGIN { printf "%d", t * s }')
  echo; echo "== $name (timeout ${limit}s): $cmd"
  start=$(date +%s)
  if [ -z "$status" ]; then
    eval "timeout --kill-after=30 $limit \"$PY\" $cmd --json \"$OUT/$name.json\"" > "$OUT/$name.out" 2> "$OUT/$name.err"
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timeout after ${limit}s" ;;
      *) status="failed (exit $rc)" ;;
    esac
    cat "$OUT/$name.out"
    [ "$status" = ok ] || { echo "-- $status; last lines of $OUT/$name.err:"; tail -n 15 "$OUT/$name.err"; }
  else
    echo "-- $status"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" "$cmd" >> "$OUT/status.tsv"
done

"$PY" benchmarks/report.py "$OUT" --device_description "$DESC" && echo && cat "$OUT/RESULTS.md" | sed -n '1,/^## Every benchmark/p'
echo; echo "results: $OUT/RESULTS.md"
