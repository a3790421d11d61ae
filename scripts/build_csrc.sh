#!/usr/bin/env bash
# Standalone CMake build of the native libraries (the same CMakeLists.txt pip runs) with their C++ unit tests (no GPU
# needed), into build/cmake:
#   - libsirl_cpu.so and csrc/tests: the shared online-softmax header and the CPU row kernels against long double
#     and against the header;
#   - libsirl_cuda.so for sm_80 / sm_90a (+ compute_90 PTX), warnings as errors, ptxas' resources parsed (the build
#     fails on any spill; table in build/cmake/csrc/cuda/cuda-resources.md), and the host-only tests of its C ABI.
# nvcc comes from $CUDACXX, PATH or /usr/local/cuda, else from NVIDIA's compiler wheels (the versions pyproject.toml
# pins) installed into build/cuda-toolkit (scripts/nvcc.sh). Only when no nvcc can be had is the CUDA part skipped,
# with a message saying why; the C++ part always builds, and any compile or test failure fails the script.
# Env: JOBS (default 2), SIRL_CUDA_NO_PIP=1 (no wheel fallback), PYTHON (the pip of the fallback; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
BUILD=build/cmake
mkdir -p build
# shellcheck source=scripts/nvcc.sh
source scripts/nvcc.sh

NVCC=$(sirl_system_nvcc || true)
if [ -z "$NVCC" ] && [ "${SIRL_CUDA_NO_PIP:-0}" != 1 ]; then
  NVCC=$(sirl_wheel_nvcc "$PWD/build/cuda-toolkit" || true)
fi
CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release)
if [ -n "$NVCC" ]; then
  echo "build_csrc: nvcc $NVCC ($("$NVCC" --version | tail -n 1))"
  CMAKE_ARGS+=(-DCMAKE_CUDA_COMPILER="$NVCC" -DSIRL_REQUIRE_CUDA=ON)
else
  echo "build_csrc: SKIPPING the CUDA compile: no nvcc in CUDACXX, on PATH or in /usr/local/cuda, and NVIDIA's" \
    "compiler wheels could not be installed (or SIRL_CUDA_NO_PIP=1). The C++ part is still built and tested."
  CMAKE_ARGS+=(-DSIRL_ENABLE_CUDA=OFF)
fi

cmake -S . -B "$BUILD" -DSIRL_BUILD_TESTS=ON "${CMAKE_ARGS[@]}"
cmake --build "$BUILD" -j "$JOBS"
ctest --test-dir "$BUILD" --output-on-failure
if [ -n "$NVCC" ]; then
  echo "build_csrc: ptxas resources of libsirl_cuda: $BUILD/csrc/cuda/cuda-resources.md"
fi
