#!/usr/bin/env bash
# The test command (what .ci/run calls on a clean clone):
#   1. scripts/setup.sh test      the venv, this package editable (native libraries built by CMake), test dependencies
#   2. scripts/build_csrc.sh      the standalone CMake build: C++ unit tests, libsirl_cuda's host-only tests, ptxas check
#   3. scripts/build_wheel.sh     the release sdist and, from it, the manylinux wheel (CPU and CUDA libraries)
#   4. pytest                     the Python suite; tests/packaging installs that wheel into a fresh venv with another
#                                 torch and runs the kernel tests against it from outside the repository
# Extra arguments go to pytest (e.g. scripts/test.sh -k cpu -x). SIRL_SKIP_WHEEL=1 leaves out steps 3 and the wheel's
# tests (they skip with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
source .venv/bin/activate
bash scripts/build_csrc.sh
if [ "${SIRL_SKIP_WHEEL:-0}" != 1 ]; then
  SIRL_KERNELS_WHEEL=$(bash scripts/build_wheel.sh | tail -n 1)
  export SIRL_KERNELS_WHEEL
fi
python -m pytest -q -ra --durations=15 "$@"
