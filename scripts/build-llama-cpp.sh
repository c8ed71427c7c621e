#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` for the peer benchmark (omnikv-bench
# --peer), CPU only, tuned for this machine (GGML_NATIVE), from the sources
# that ship inside the registry's sdist of `llama-cpp-python` (pinned below),
# with CMake and Ninja from their wheels. Everything lives in
# target/llama.cpp/ (git-ignored); a second run only prints the binary.
#
#   scripts/build-llama-cpp.sh     # prints the path of llama-bench
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=0.3.36
dir="$root/target/llama.cpp"
bin="$dir/build/bin/llama-bench"
if [ -x "$bin" ] && [ "$(cat "$dir/version" 2>/dev/null)" = "$version" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$dir"
venv="$dir/venv"
if [ ! -x "$venv/bin/cmake" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check cmake==4.4.5 ninja==1.13.2 scikit-build-core==0.12.2 >&2
fi
rm -rf "$dir/src" "$dir/build"
mkdir -p "$dir/src"
# The sdist's metadata step needs scikit-build-core in this environment.
"$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
  --no-build-isolation "llama-cpp-python==$version" -d "$dir/src" >&2
tar -xzf "$dir/src/llama_cpp_python-$version.tar.gz" -C "$dir/src"
src="$dir/src/llama_cpp_python-$version/vendor/llama.cpp"
"$venv/bin/cmake" -S "$src" -B "$dir/build" -G Ninja -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" \
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
"$venv/bin/cmake" --build "$dir/build" --target llama-bench -j "$(nproc)" >&2
echo "$version" > "$dir/version"
echo "$bin"
