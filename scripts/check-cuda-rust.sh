#!/usr/bin/env bash
# Compile-check the Rust side of the CUDA path without a GPU: builds the PTX
# of kernels/omnikv_decode.cu with nvcc from PyPI (through
# scripts/check-cuda-kernels.sh's private environment) and type-checks
# omnikv-kernels (launches, GPU staging), its CUDA tests and candle's CUDA
# backend with the `cuda` feature, in a separate target directory. Every
# CUDA call of the project lives in omnikv-kernels, so this needs candle
# only, not a second check of the host crates (omnikv-backend's
# `cuda-kernels` feature adds only the calls into it, which the GPU check
# compiles).
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
# A type-check needs candle's own kernels to exist, not to be compiled
# (include_str! of empty PTX; no link step): nvcc is wrapped so that their
# files (candle-kernels) come out empty, which saves most of this check's
# time. Ours (omnikv-kernels' build.rs) are compiled for real.
real_nvcc="$CUDA_HOME/bin/nvcc"
wrap="$root/target/cuda-check/nvcc-wrap"
mkdir -p "$wrap"
cat > "$wrap/nvcc" <<WRAP
#!/usr/bin/env bash
case " \$* " in
  *candle-kernels*|*" --lib "*)
    out= dir= src=
    while [ \$# -gt 0 ]; do
      case "\$1" in
        -o) out=\$2 ;;
        --output-directory) dir=\$2 ;;
        *.cu) src=\$1 ;;
      esac
      shift
    done
    if [ -n "\$out" ]; then : > "\$out"; fi
    if [ -n "\$dir" ] && [ -n "\$src" ]; then : > "\$dir/\$(basename "\$src" .cu).ptx"; fi
    exit 0 ;;
esac
exec "$real_nvcc" "\$@"
WRAP
chmod +x "$wrap/nvcc"
export NVCC="$wrap/nvcc"
# No GPU to ask: name the target and the toolkit version cudarc binds to.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-12080}"
cargo check -p omnikv-kernels --features cuda --lib --tests --target-dir target/cuda-check
echo "ok   omnikv-kernels with cuda (library and CUDA tests)"
