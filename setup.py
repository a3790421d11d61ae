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
            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]


def _cuda_extensions(cpp_extension):
    """Filled in by the CUDA backend (csrc/cuda); empty where there is no CUDA toolkit or CUDA torch."""
    return []


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
