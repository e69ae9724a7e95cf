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
# Explicit AVX2/AVX-512 instead of -march=native: on these VMs the native build's AMX code paths died with
# "illegal instruction" after running fine earlier the same day (2026-11-26).
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF >/dev/null
cmake --build build -j"$(nproc)" --target llama-server llama-bench >/dev/null
echo "$PWD/build/bin/llama-server"
