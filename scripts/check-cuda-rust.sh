#!/usr/bin/env bash
# Compile-check the Rust side of the CUDA path without a GPU: builds the PTX
# of kernels/omnikv_decode.cu with nvcc from PyPI (through
# scripts/check-cuda-kernels.sh's private environment) and type-checks
# omnikv-backend, its tests and candle's CUDA backend with the
# `cuda-kernels` feature, in a separate target directory.
#
#   scripts/check-cuda-rust.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ARCHS=80 scripts/check-cuda-kernels.sh >/dev/null
site=$(ls -d "$root"/.venv-nvcc/lib/python*/site-packages | head -n1)
export CUDA_HOME="$site/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH"
export NVCC_APPEND_FLAGS="-I$CUDA_HOME/include/cccl"
# No GPU to ask: name the target and the toolkit version cudarc binds to.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-12080}"
cargo check -p omnikv-kernels -p omnikv-backend --features omnikv-backend/cuda-kernels --lib --tests --target-dir target/cuda-check
echo "ok   omnikv-kernels and omnikv-backend with cuda-kernels (libs and tests)"
