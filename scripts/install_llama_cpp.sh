#!/usr/bin/env bash
# Builds llama-cpp-python (the benchmark peer) into .venv: about 15 minutes on 2 cores.
# AMX is switched off: with -march=native, ggml's AMX kernels crash (SIGSEGV) on batched decode on
# VMs whose kernel does not grant AMX tile state, while AVX-512 is what these CPUs run llama.cpp with.
set -euo pipefail
cd "$(dirname "$0")/.."
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
  -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
  -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF ${CMAKE_ARGS:-}" \
  .venv/bin/pip install --no-deps --no-cache-dir "llama-cpp-python==0.3.36"
