"""The backends that run on CPU tensors in this process, for the tests that put their tensors on the CPU.

On a machine without a GPU that is torch, cpu and triton (conftest.py sets TRITON_INTERPRET=1); on a GPU machine
Triton runs on CUDA tensors only, and the cuda backend never on CPU ones, whatever ``available_backends()`` says
about the machine as a whole."""

from __future__ import annotations

import torch

from sirl_kernels import backends


def cpu_backends() -> list[str]:
    names = []
    for name in backends.BACKEND_NAMES:
        try:
            if backends.resolve(name, torch.device("cpu")) == name:
                names.append(name)
        except (RuntimeError, ValueError):  # unusable here on CPU tensors: resolve says why
            continue
    return names
