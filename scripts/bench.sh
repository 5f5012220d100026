#!/usr/bin/env bash
# make bench: every speed benchmark, ours beside the peer library, on the best device here.
# Quality (benchmarks/bench_quality.py) needs trained exports: `make demo` runs it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo; echo "== $* =="; python "$@"; }
run benchmarks/bench_lpips.py
run benchmarks/bench_stage1.py
run benchmarks/bench_unet.py
run benchmarks/bench_latent_cache.py
