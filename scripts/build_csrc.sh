#!/usr/bin/env bash
# Standalone CMake build of the native libraries (the same CMakeLists.txt pip runs) with their C++ unit tests (no GPU
# needed), into build/cmake:
#   - libsirl_cpu.so and csrc/tests: the shared online-softmax header and the CPU row kernels against long double
#     and against the header;
#   - libsirl_cuda.so for sm_80 / sm_90a (+ compute_90 PTX), warnings as errors, ptxas' resources parsed (the build
#     fails on any spill; table in build/cmake/csrc/cuda/cuda-resources.md), and the host-only tests of its C ABI.
# nvcc comes from PATH or /usr/local/cuda, else from NVIDIA's compiler wheels installed into build/cuda-toolkit.
# Only when no nvcc can be had is the CUDA part skipped, with a message saying why; the C++ part always builds,
# and any compile or test failure fails the script.
# Env: SIRL_CUDA_PIP_VERSION (default 13.0.88), JOBS (default 2), SIRL_CUDA_NO_PIP=1 (no wheel fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JOBS=${JOBS:-2}
PIP_VERSION=${SIRL_CUDA_PIP_VERSION:-13.0.88}
BUILD=build/cmake
mkdir -p build

find_nvcc() {
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda/bin/nvcc; return; fi
  [ "${SIRL_CUDA_NO_PIP:-0}" = 1 ] && return
  local prefix=$ROOT/build/cuda-toolkit
  if [ ! -d "$prefix" ]; then
    echo "build_csrc: nvcc not found, installing the CUDA ${PIP_VERSION} compiler wheels into $prefix" >&2
    # nvcc + its front end (crt, nvvm), the runtime (cudart_static) and the CCCL headers cuda_fp16/bf16 need.
    python -m pip install --quiet --disable-pip-version-check --target "$prefix" \
      "nvidia-cuda-nvcc==${PIP_VERSION}" "nvidia-cuda-runtime==${PIP_VERSION}" "nvidia-cuda-crt==${PIP_VERSION}" \
      "nvidia-nvvm==${PIP_VERSION}" "nvidia-cuda-cccl==${PIP_VERSION%.*}.*" >&2 || { rm -rf "$prefix"; return; }
  fi
  find "$prefix" -path '*/bin/nvcc' -type f 2>/dev/null | head -n 1
}

NVCC=$(find_nvcc || true)
CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release)
if [ -n "$NVCC" ]; then
  echo "build_csrc: nvcc $NVCC ($("$NVCC" --version | tail -n 1))"
  CMAKE_ARGS+=(-DCMAKE_CUDA_COMPILER="$NVCC" -DCUDAToolkit_ROOT="$(cd "$(dirname "$NVCC")/.." && pwd)"
    -DSIRL_REQUIRE_CUDA=ON)
else
  echo "build_csrc: SKIPPING the CUDA compile: no nvcc on PATH or in /usr/local/cuda, and NVIDIA's compiler" \
    "wheels could not be installed (or SIRL_CUDA_NO_PIP=1). The C++ part is still built and tested."
  CMAKE_ARGS+=(-DSIRL_ENABLE_CUDA=OFF)
fi

cmake -S . -B "$BUILD" -DSIRL_BUILD_TESTS=ON "${CMAKE_ARGS[@]}"
cmake --build "$BUILD" -j "$JOBS"
ctest --test-dir "$BUILD" --output-on-failure
if [ -n "$NVCC" ]; then
  echo "build_csrc: ptxas resources of libsirl_cuda: $BUILD/csrc/cuda/cuda-resources.md"
fi
