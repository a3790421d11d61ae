# Where the scripts get nvcc: sourced by build_csrc.sh, build_wheel.sh and setup.sh (not run on its own).
# The CMake build looks the same way itself (csrc/cuda/find_nvcc.cmake: PATH or CUDACXX, /usr/local/cuda, then
# NVIDIA's compiler wheels in the build's Python); the scripts only need to know beforehand whether this machine
# has an nvcc, and which wheels to take when it has none. Those wheels and their versions are written once, in
# pyproject.toml (the SIRL_KERNELS_CUDA_FROM_PIP override's build.requires).
# shellcheck shell=bash

SIRL_ROOT=${SIRL_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

# The nvcc of this machine ($CUDACXX, PATH, /usr/local/cuda/bin), printed; status 1 when there is none.
sirl_system_nvcc() {
  if [ -n "${CUDACXX:-}" ] && [ -x "$CUDACXX" ]; then echo "$CUDACXX"; return 0; fi
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return 0; fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda/bin/nvcc; return 0; fi
  return 1
}

# NVIDIA's compiler wheels with their versions, one requirement a line, as pyproject.toml pins them.
sirl_cuda_wheel_specs() {
  local specs
  specs=$(grep -o '"nvidia-[A-Za-z0-9_.-]*==[^"]*"' "$SIRL_ROOT/pyproject.toml" | tr -d '"')
  if [ -z "$specs" ]; then
    echo "nvcc.sh: no nvidia-*==VERSION requirement found in $SIRL_ROOT/pyproject.toml" >&2
    return 1
  fi
  echo "$specs"
}

# The nvcc of those wheels installed into PREFIX (once; a failed install leaves nothing), printed; status 1 when they
# cannot be installed.
sirl_wheel_nvcc() {
  local prefix=$1 specs nvcc
  specs=$(sirl_cuda_wheel_specs) || return 1
  if [ ! -d "$prefix" ]; then
    echo "nvcc.sh: installing NVIDIA's compiler wheels into $prefix:" $specs >&2
    # shellcheck disable=SC2086  # one requirement a word
    "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --target "$prefix.tmp" $specs >&2 \
      && mv "$prefix.tmp" "$prefix" || { rm -rf "$prefix.tmp"; return 1; }
  fi
  nvcc=$(find "$prefix" -path '*/bin/nvcc' -type f 2>/dev/null | head -n 1)
  [ -n "$nvcc" ] && echo "$nvcc"
}
