#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, the CUDA toolkit (nvcc)
# and this repository prepared (`make prepare`):
#   1. the CUDA tests of the decode ops and the pinned-staging copy stream
#      against their CPU forward passes (crates/omnikv-kernels/tests/cuda.rs);
#   2. the synthetic Llama-3.2-1B-shape decode benchmark on the GPU.
# Builds with `cuda-kernels` (candle's CUDA backend + this project's
# kernels), not the host's full `cuda` feature, whose kernels take far
# longer to compile; the stock variant then runs candle's CUDA attention.
#
#   scripts/gpu-check.sh [OUT_DIR]      # default results/
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results}
mkdir -p "$out"
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d .)
  export CUDA_COMPUTE_CAP
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-device.txt"
cargo test -p omnikv-kernels --features cuda --test cuda 2>&1 | tee "$out/gpu-tests.log"
cargo bench -p omnikv-backend --features cuda-kernels --profile dev --bench synth -- \
  --device cuda --lengths 8192,32768,131072 --steps 5 \
  --filter-layers 2 --budget 0.05 --out "$out/synthetic-gpu.md"
