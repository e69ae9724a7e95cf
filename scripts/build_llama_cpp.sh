#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-bench from the source that PyPI's llama-cpp-python sdist carries,
# for side-by-side benchmarks (tokenmill bench offline --llama-server ..., tokenmill bench serve against it).
# Usage: scripts/build_llama_cpp.sh [DEST]   (default /opt/llamacpp); prints the llama-server path.
set -euo pipefail
dest=${1:-/opt/llamacpp}
version=0.3.36
mkdir -p "$dest" && cd "$dest"
[ -f "llama_cpp_python-$version.tar.gz" ] || pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d .
[ -d "llama_cpp_python-$version" ] || tar xzf "llama_cpp_python-$version.tar.gz"
cd "llama_cpp_python-$version/vendor/llama.cpp"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF >/dev/null
cmake --build build -j"$(nproc)" --target llama-server llama-bench >/dev/null
echo "$PWD/build/bin/llama-server"
