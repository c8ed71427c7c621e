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
ARCHS="$cap" scripts/check-cuda-kernels.sh >/dev/null
site=$(ls -d "$root"/.venv-nvcc/lib/python*/site-packages | head -n1)
export CUDA_HOME="$site/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH"
export NVCC_APPEND_FLAGS="-I$CUDA_HOME/include/cccl"
export CUDA_COMPUTE_CAP="$cap"
unset NVCC
cargo check --workspace --features mistralrs-cli/nccl --target-dir target/nccl-check
echo "check-nccl: the workspace compiles with CUDA + NCCL (+ ring), sm_$cap"
