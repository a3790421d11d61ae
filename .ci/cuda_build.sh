#!/usr/bin/env bash
# CI step: compile the torch-free CUDA library (csrc/cuda) for sm_80 / sm_90a (+ compute_90 PTX) with warnings
# as errors and run its host-only tests (no GPU needed). Needs nvcc: the one on PATH (or /usr/local/cuda),
# else the NVIDIA PyPI toolkit wheels installed into build/cuda-toolkit; without either it says why and exits 0.
#   .ci/cuda_build.sh            # build dir: build/cmake (whole tree) or build/cuda (csrc/cuda alone)
# Env: SIRL_CUDA_PIP_VERSION (default 13.0.88), JOBS (default 2), SIRL_CUDA_NO_PIP=1 to skip the pip fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JOBS=${JOBS:-2}
PIP_VERSION=${SIRL_CUDA_PIP_VERSION:-13.0.88}

skip() {
  echo "skipping CUDA compile: $*"
  exit 0
}

NVCC=""
FROM_PIP=0
if command -v nvcc >/dev/null 2>&1; then
  NVCC=$(command -v nvcc)
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  NVCC=/usr/local/cuda/bin/nvcc
elif [ "${SIRL_CUDA_NO_PIP:-0}" != "1" ]; then
  PREFIX=$ROOT/build/cuda-toolkit
  if [ ! -d "$PREFIX" ]; then
    echo "nvcc not found: installing the CUDA ${PIP_VERSION} compiler wheels into $PREFIX"
    # nvcc + its front end (crt, nvvm), the runtime (cudart_static) and the CCCL headers cuda_fp16/bf16 need.
    if ! python -m pip install --quiet --disable-pip-version-check --target "$PREFIX" \
      "nvidia-cuda-nvcc==${PIP_VERSION}" "nvidia-cuda-runtime==${PIP_VERSION}" "nvidia-cuda-crt==${PIP_VERSION}" \
      "nvidia-nvvm==${PIP_VERSION}" "nvidia-cuda-cccl"; then
      rm -rf "$PREFIX"
      skip "nvcc is not on PATH and the NVIDIA CUDA ${PIP_VERSION} wheels could not be installed"
    fi
  fi
  NVCC=$(find "$PREFIX" -path '*/bin/nvcc' -type f 2>/dev/null | head -n 1)
  [ -n "$NVCC" ] || skip "the NVIDIA wheels in $PREFIX contain no bin/nvcc"
  FROM_PIP=1
else
  skip "nvcc is not on PATH (and SIRL_CUDA_NO_PIP=1)"
fi
TOOLKIT=$(cd "$(dirname "$NVCC")/.." && pwd)
mkdir -p build
echo "nvcc: $NVCC ($("$NVCC" --version | tail -n 1))"

configure_and_build() {  # $1 source dir, $2 build dir
  cmake -S "$1" -B "$2" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$NVCC" -DCUDAToolkit_ROOT="$TOOLKIT" &&
    cmake --build "$2" -j "$JOBS"
}

# The whole tree when it configures (its ctest then includes csrc/tests); otherwise this step's own part,
# csrc/cuda alone, so a broken CPU test tree (checked by its own CI step) does not hide the CUDA result.
SRC=.
BUILD=build/cmake
if [ ! -f csrc/tests/CMakeLists.txt ] || ! cmake -S . -B build/cmake -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DCUDAToolkit_ROOT="$TOOLKIT" >build/cmake-configure.log 2>&1; then
  echo "warning: the whole tree does not configure (see build/cmake-configure.log): building csrc/cuda alone"
  SRC=csrc/cuda
  BUILD=build/cuda
fi

if ! configure_and_build "$SRC" "$BUILD"; then
  # A toolkit assembled from wheels may lack pieces CMake wants; that is an environment problem, not ours.
  [ "$FROM_PIP" = 1 ] && skip "the pip-installed CUDA toolkit in $TOOLKIT could not configure/build the project"
  echo "CUDA build failed" >&2
  exit 1
fi
if [ "$SRC" = . ]; then
  ctest --test-dir "$BUILD" --output-on-failure
else
  ctest --test-dir "$BUILD" --output-on-failure -R cuda
fi
