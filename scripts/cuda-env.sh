# Sourced by the scripts that build CUDA code with cargo (gpu-bundle.sh,
# check-nccl.sh): nvcc 13.0 from PyPI (installed by check-cuda-kernels.sh,
# which also compile-checks this project's kernels) on PATH, for compute
# capability $cap. Needs $root (the repository) and $cap.
ARCHS="$cap" "$root"/scripts/check-cuda-kernels.sh >/dev/null
site=$(ls -d "$root"/.venv-nvcc/lib/python*/site-packages | head -n1)
export CUDA_HOME="$site/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH"
export NVCC_APPEND_FLAGS="-I$CUDA_HOME/include/cccl"
export CUDA_COMPUTE_CAP="$cap"
unset NVCC
