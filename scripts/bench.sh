#!/usr/bin/env bash
# make bench: every speed benchmark, ours beside the peer library, on the best device here.
# With a GPU (nvidia-smi sees one and torch can use it) this is benchmarks/bench_gpu.sh: issue 10's
# whole table at the tutorial's sizes, eager and compiled, with timeouts, into bench_out/gpu_<date>/
# (arguments pass through, e.g. make bench BENCH_ARGS="--diffusers_examples ~/diffusers/examples").
# Without one, the CPU-sized benchmarks below. Quality (benchmarks/bench_quality.py) needs trained
# exports: `make demo` runs it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
    && python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  exec bash benchmarks/bench_gpu.sh "$@"
fi
run() { echo; echo "== $* =="; python "$@"; }
run benchmarks/bench_lpips.py
run benchmarks/bench_stage1.py
run benchmarks/bench_unet.py
run benchmarks/bench_latent_cache.py
run benchmarks/bench_loader.py --quick --device cpu
echo
echo "The GPU table on this CPU at tiny sizes (compiles: slow on a CPU): bash benchmarks/bench_gpu.sh --device cpu --quick"
