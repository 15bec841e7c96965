#!/usr/bin/env bash
# The CUDA figures (issue: benchmarks on a GPU when one is lent). One prepared run:
# the loop stall with 8 GiB of state on the GPU (pinned-memory snapshots, background
# writes) against torch.save + fsync, and the machine's name, written under $OUT.
#   On a GPU machine, from the repository root:  OUT=/tmp/out bash bench/cuda.sh
# It needs only torch on that machine: bench, trainer and daemon.layout import no boto3.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/cuda}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
  | tee "$out/torch.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SPOT_BENCH_DEVICE=cuda SPOT_BENCH_STALL_GIB="${SPOT_BENCH_STALL_GIB:-8}" \
  python3 -m bench stall --out "$out"
