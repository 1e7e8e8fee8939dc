#!/usr/bin/env bash
# Does the GPU path work? One command, offline, under 8 minutes on one H200 (issue #14); see gpu_check.py.
#   benchmarks/gpu_check.sh                 # every check; writes metrics/bench_train_throughput_cuda.csv
#   benchmarks/gpu_check.sh --quick         # a small Gemma instead of gemma-2b-it's shape: tries the script
# Exit status: 0 passed, 1 a check failed, 2 no CUDA GPU (or ../shared missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
