#!/usr/bin/env bash
# Compile-check the workspace with the CUDA + NCCL feature set (tensor
# parallelism across GPUs) without a GPU: `cargo check` in its own target
# directory (target/nccl-check), with nvcc 13.0 from PyPI
# (scripts/check-cuda-kernels.sh installs it) compiling the host's and
# candle's CUDA kernels. Not part of `make test` (a second host build:
# about 20 minutes on 2 cores when cold).
#
#   scripts/check-nccl.sh                  # sm_90
#   CUDA_COMPUTE_CAP=80 scripts/check-nccl.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cap=${CUDA_COMPUTE_CAP:-90}
. "$root/scripts/cuda-env.sh"
cargo check --workspace --features mistralrs-cli/nccl --target-dir target/nccl-check
echo "check-nccl: the workspace compiles with CUDA + NCCL (+ ring), sm_$cap"
