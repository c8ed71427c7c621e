#!/usr/bin/env bash
# Run the GPU check that scripts/gpu-bundle.sh built, on a machine with an
# NVIDIA GPU (driver R580 or newer: CUDA 13.0), from the bundle's folder:
#
#   run.sh OUT_DIR [--lengths LIST]
#
# 1. omnikv-kernels-cuda: every CUDA kernel and the pinned-staging copy
#    stream against its CPU pass          -> OUT_DIR/gpu-tests.log
# 2. synth --device cuda: the synthetic Llama-3.2-1B-shape decode step,
#    stock KV cache vs OmniKV, at 32K and 128K tokens (or --lengths)
#                                          -> OUT_DIR/synthetic-gpu.md (+ .svg)
# plus OUT_DIR/gpu-device.txt (nvidia-smi) and OUT_DIR/gpu-check.log.
#
# The binaries need the driver (libcuda.so.1) and CUDA 13's cuBLAS, cuBLASLt,
# cuRAND, NVRTC and runtime. Those are looked up on the library path, then
# in $GPU_CHECK_LIBS (colon-separated folders), then in the NVIDIA wheels
# of any Python installation (PyTorch's cu130 wheels bring them).
#
# Exit status: 0 all passed; 1 a test or the benchmark failed; 3 no CUDA
# device (nothing ran); 4 CUDA libraries missing (nothing ran); 2 bad usage.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=
lengths=32768,131072
while [ $# -gt 0 ]; do
  case "$1" in
    --lengths) lengths=${2:?--lengths needs a list}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu-check: unknown option '$1' (try --help)" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
if [ -z "$out" ]; then echo "gpu-check: usage: run.sh OUT_DIR [--lengths LIST]" >&2; exit 2; fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu-check.log"
: > "$log"
say() { echo "gpu-check: $*" | tee -a "$log" >&2; }

# 1. A device. nvidia-smi is the driver's own tool; without it or without a
# GPU it lists, nothing here can run.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  say "no CUDA device: nvidia-smi is not installed (no NVIDIA driver on this machine); run this bundle where a GPU is"
  exit 3
fi
if ! gpus=$(nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1) \
    || [ -z "$gpus" ]; then
  say "no CUDA device: nvidia-smi found none ($gpus)"
  exit 3
fi
echo "$gpus" | tee "$out/gpu-device.txt" | sed 's/^/gpu-check: device /' >&2
GPU_NAME=$(echo "$gpus" | head -n1 | awk -F', ' '{print $2 " (" $3 ", driver " $4 ", compute capability " $5 ")"}')
export GPU_NAME
built_cap=$(sed -n 's/^compute_cap=//p' "$here/BUILD" 2>/dev/null)
cap=$(echo "$gpus" | head -n1 | awk -F', ' '{print $NF}' | tr -d .)
if [ -n "$built_cap" ] && [ -n "$cap" ] && [ "$cap" -lt "$built_cap" ]; then
  say "the bundle was built for compute capability $built_cap, this GPU has $cap: rebuild with CUDA_COMPUTE_CAP=$cap scripts/gpu-bundle.sh"
  exit 4
fi

# 2. The libraries the binaries were linked against.
dirs=()
[ -n "${GPU_CHECK_LIBS:-}" ] && IFS=: read -r -a dirs <<< "$GPU_CHECK_LIBS"
for py in python3 /opt/*/.venv/bin/python3 /usr/bin/python3; do
  command -v "$py" >/dev/null 2>&1 || continue
  while IFS= read -r d; do dirs+=("$d"); done < <("$py" - 2>/dev/null <<'PY'
import glob, os, site, sys
roots = [p for p in sys.path if p.endswith("-packages")]
try:
    roots += site.getsitepackages()
except Exception:
    pass
for r in dict.fromkeys(roots):
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        print(d)
PY
)
done
extra=$(printf '%s:' "${dirs[@]}")
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}${extra%:}"
missing=$(for b in "$here/omnikv-kernels-cuda" "$here/synth"; do
  [ -x "$b" ] && ldd "$b" 2>/dev/null | awk '/not found/ {print $1}'
done | sort -u | tr '\n' ' ')
if [ -n "$missing" ]; then
  say "CUDA libraries not found: $missing(need the CUDA 13 driver and the cuBLAS/cuRAND/NVRTC/runtime 13 libraries: pip install nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-cuda-runtime, or set GPU_CHECK_LIBS to their folders)"
  exit 4
fi

status=0
# 3. The kernels against the CPU passes.
say "CUDA kernel tests"
if ! "$here/omnikv-kernels-cuda" --test-threads=1 2>&1 | tee "$out/gpu-tests.log"; then
  say "CUDA kernel tests FAILED (gpu-tests.log)"
  status=1
fi
# 4. The synthetic decode benchmark.
if [ -x "$here/synth" ]; then
  say "synthetic decode benchmark at $lengths tokens"
  if ! "$here/synth" --device cuda --lengths "$lengths" --steps 5 --filter-layers 2 \
      --budget 0.05 --out "$out/synthetic-gpu.md" 2>&1 | tee -a "$log"; then
    say "synthetic benchmark FAILED (gpu-check.log)"
    status=1
  fi
else
  say "this bundle has no synth benchmark (built with --kernels-only)"
fi
[ "$status" = 0 ] && say "all passed"
exit "$status"
