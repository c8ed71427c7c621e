#!/usr/bin/env bash
# Compile-check the CUDA kernels in kernels/ without a GPU: installs nvcc, the
# CUDA runtime headers and CCCL from PyPI into a private virtual environment
# (.venv-nvcc, git-ignored) and compiles every .cu file for the listed
# architectures. Catches syntax and type errors on CPU-only machines.
# (The `-cu12` nvcc wheels ship ptxas but no nvcc driver; the CUDA 13 wheels
# ship the whole tool chain.)
#
#   scripts/check-cuda-kernels.sh            # sm_80 and sm_90
#   ARCHS="80" scripts/check-cuda-kernels.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-nvcc"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# CUDA 13.0: PTX from a newer nvcc does not load on a CUDA 13.0 driver (R580),
# which the GPU bundle (scripts/gpu-bundle.sh) must run on.
toolkit=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
if [ "$(cat "$venv/toolkit" 2>/dev/null)" != "${toolkit[*]}" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check "${toolkit[@]}"
  echo "${toolkit[*]}" > "$venv/toolkit"
fi
site=$(ls -d "$venv"/lib/python*/site-packages | head -n1)
nvcc="$site/nvidia/cu13/bin/nvcc"
inc=("-I$site/nvidia/cu13/include")
archs=${ARCHS:-"80 90"}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for cu in "$root"/crates/omnikv-kernels/kernels/*.cu; do
  for a in $archs; do
    if "$nvcc" -std=c++17 -O3 -Xptxas -v -c "${inc[@]}" \
        -gencode "arch=compute_$a,code=sm_$a" "$cu" -o "$out/$(basename "$cu" .cu)-$a.o" \
        2> "$out/log"; then
      regs=$(grep -c "registers" "$out/log" || true)
      echo "ok   $(basename "$cu") sm_$a ($regs kernels)"
    else
      cat "$out/log" >&2
      echo "FAIL $(basename "$cu") sm_$a" >&2
      status=1
    fi
  done
done
exit $status
