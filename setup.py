"""Builds the optional C++ extensions of sirl-kernels.

- ``sirl_kernels._C_cpu``: the fused CPU kernels (csrc/cpu), built whenever torch is importable at build time.
- ``sirl_kernels._C_cuda``: the CUDA kernels (csrc/cuda), built only where a CUDA toolkit and a CUDA-enabled
  torch are both present.

torch must be installed first and the build run without isolation so the extension matches the torch it will
run with:  ``pip install torch && pip install --no-build-isolation .``. Without torch at build time the
package installs as pure Python and ``sirl_kernels.available_backends()`` says why the "cpu" backend is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _cpu_extensions(cpp_extension):
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    if not sources:
        return []
    return [
        cpp_extension.CppExtension(
            "sirl_kernels._C_cpu",
            sources,
            include_dirs=[str(ROOT / "csrc" / "include")],
            # No -march/-ffast-math: the baseline build runs on any x86-64; csrc/cpu/isa_{avx2,avx512}.cpp select
            # their own instruction sets with `#pragma GCC target` and sirl_cpu.cpp dispatches at run time.
            # C++20 because torch's own headers use C++20 features.
            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++20", "-Wno-psabi"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]


def _cuda_extensions(cpp_extension):
    """``sirl_kernels._C_cuda`` from csrc/cuda; empty where there is no CUDA toolkit or CUDA-enabled torch.

    Never fails a CPU install: anything missing prints why and returns []. ``SIRL_KERNELS_NO_CUDA=1`` skips it.
    Architectures: ``$TORCH_CUDA_ARCH_LIST`` when set, else sm_80 + sm_90a machine code and compute_90 PTX.
    """
    if os.environ.get("SIRL_KERNELS_NO_CUDA") == "1":
        return []
    try:
        import torch

        cuda_version = torch.version.cuda
    except Exception:  # noqa: BLE001 - a broken torch import is a CPU-only build, not a failed install
        cuda_version = None
    cuda_home = getattr(cpp_extension, "CUDA_HOME", None)
    if not cuda_version or not cuda_home:
        why = "torch has no CUDA" if not cuda_version else "no CUDA toolkit (CUDA_HOME) was found"
        print(f"sirl-kernels: {why}, so the CUDA backend (sirl_kernels._C_cuda) is not built.", file=sys.stderr)
        return []
    cuda_dir = ROOT / "csrc" / "cuda"
    sources = sorted(str(p.relative_to(ROOT)) for p in cuda_dir.glob("*.cu"))
    if not sources or not (cuda_dir / "binding.cpp").exists():
        return []
    sources.append(str((cuda_dir / "binding.cpp").relative_to(ROOT)))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;9.0+PTX")
    return [
        cpp_extension.CUDAExtension(
            "sirl_kernels._C_cuda",
            sources,
            include_dirs=[str(ROOT / "csrc" / "include"), str(cuda_dir)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            py_limited_api=False,
        )
    ]


def _extensions():
    if os.environ.get("SIRL_KERNELS_NO_EXTENSIONS") == "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "sirl-kernels: torch is not importable at build time, so the C++ CPU backend is not built. "
            "Install torch first and use `pip install --no-build-isolation .` to build it.",
            file=sys.stderr,
        )
        return [], {}
    exts = _cpu_extensions(cpp_extension) + _cuda_extensions(cpp_extension)
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
