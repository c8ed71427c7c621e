#!/usr/bin/env bash
# Build the GPU check on this (CPU-only) machine, as a bundle that is
# carried to a machine with an NVIDIA GPU and run there with one command:
#
#   target/gpu-bundle/bundle/
#     omnikv-kernels-cuda   the CUDA kernel and staging tests against the CPU
#                           passes (crates/omnikv-kernels/tests/cuda.rs)
#     synth                 the synthetic Llama-3.2-1B-shape decode benchmark
#                           (omnikv-backend/benches/synth.rs), `--device cuda`
#     run.sh                runs both and writes the results (see its header)
#
#   scripts/gpu-bundle.sh                  # both (first build: ~40 min here)
#   scripts/gpu-bundle.sh --kernels-only   # the kernel tests alone (minutes)
#   CUDA_COMPUTE_CAP=80 scripts/gpu-bundle.sh   # A100 instead of H100/H200
#
# How it is built without a GPU or a CUDA installation:
# - nvcc, the CUDA runtime and CCCL come from the registry's CUDA 13.0 wheels
#   (scripts/check-cuda-kernels.sh's private environment). 13.0 because a
#   driver only loads PTX of its own CUDA version or older, and the R580
#   drivers of the lent machines are CUDA 13.0.
# - candle links cuBLAS, cuBLASLt, cuRAND, NVRTC and the driver (cudarc's
#   `dynamic-linking`). Only their sonames matter at link time, so the linker
#   is given stub libraries (every function of cudarc's bindings, empty
#   bodies; the CUDA toolkit ships the same kind of stub for libcuda). The
#   real libraries are found on the GPU machine by run.sh.
# - One compute capability per build ($CUDA_COMPUTE_CAP, default 90): candle's
#   and our kernels are PTX for that capability (the driver compiles it on
#   load, so it also runs on newer GPUs), candle's MoE library is SASS for it.
# Binaries are stripped; the bundle must stay under the 64 MiB a device
# machine receives, and the script fails if it does not.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
kernels_only=0
for arg in "$@"; do
  case "$arg" in
    --kernels-only) kernels_only=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-bundle: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
cap=${CUDA_COMPUTE_CAP:-90}
target="$root/target/gpu-bundle"
bundle="$target/bundle"
mkdir -p "$target"

. "$root/scripts/cuda-env.sh"

# Link stubs: one shared library per CUDA library candle links, with the
# soname the real one has in CUDA 13, defining every function cudarc binds.
stubs="$target/link-stubs"
mkdir -p "$stubs"
cargo fetch --locked >/dev/null
mapfile -t cudarc_dirs < <(
  for v in $(grep -A1 '^name = "cudarc"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p'); do
    ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$v" 2>/dev/null | head -n1
  done)
if [ ${#cudarc_dirs[@]} -eq 0 ]; then
  echo "gpu-bundle: cudarc's sources not found in cargo's registry cache" >&2
  exit 1
fi
stub() { # module soname link-name
  local c="$stubs/$1.c"
  cat "${cudarc_dirs[@]/%//src/$1/sys/mod.rs}" 2>/dev/null \
    | sed -n 's/^ *pub \(unsafe \)\{0,1\}fn \([A-Za-z_][A-Za-z0-9_]*\)(.*/void \2(void) {}/p' | sort -u > "$c"
  if [ ! -s "$c" ]; then echo "gpu-bundle: no $1 functions in cudarc's bindings" >&2; exit 1; fi
  cc -shared -fPIC -Wl,-soname,"$2" -o "$stubs/$3" "$c"
}
stub driver libcuda.so.1 libcuda.so
stub nvrtc libnvrtc.so.13 libnvrtc.so
stub curand libcurand.so.10 libcurand.so
stub cublas libcublas.so.13 libcublas.so
stub cublaslt libcublasLt.so.13 libcublasLt.so
ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$stubs/libcudart.so"
export LIBRARY_PATH="$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

# cargo ... --message-format json: the path of the one executable it built.
executable() {
  python3 -c '
import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")]
if not exes:
    sys.exit("gpu-bundle: cargo built no executable")
print(exes[-1])'
}

rm -rf "$bundle"
mkdir -p "$bundle"
echo "gpu-bundle: building the CUDA kernel tests (sm_$cap)" >&2
exe=$(cargo test -p omnikv-kernels --features cuda --test cuda --no-run \
  --target-dir "$target" --message-format json-render-diagnostics | executable)
strip -o "$bundle/omnikv-kernels-cuda" "$exe"
if [ "$kernels_only" = 0 ]; then
  echo "gpu-bundle: building the synthetic decode benchmark (sm_$cap)" >&2
  exe=$(cargo bench -p omnikv-backend --features cuda-kernels --profile dev --bench synth --no-run \
    --target-dir "$target" --message-format json-render-diagnostics | executable)
  strip -o "$bundle/synth" "$exe"
fi
cp scripts/gpu-run.sh "$bundle/run.sh"
chmod +x "$bundle/run.sh"
printf 'compute_cap=%s\ncuda=13.0\ncommit=%s\n' "$cap" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$bundle/BUILD"

# The device tool sends the working tree (tracked files) with the carried
# bundle, 64 MiB in all.
size=$(du -sb "$bundle" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n1 | cut -f1)
limit=$((64 * 1024 * 1024 - ${tree:-0}))
du -ah "$bundle" | sort -k2 >&2
if [ "$size" -gt "$limit" ]; then
  echo "gpu-bundle: $bundle is $size bytes; with the $tree bytes of the working tree that is over the 64 MiB a device machine receives" >&2
  exit 1
fi
echo "gpu-bundle: $bundle ($((size / 1024 / 1024)) MiB; $(( (size + tree) / 1024 / 1024 )) MiB with the working tree, of 64) is ready; carry it and run run.sh (README, CUDA)"
