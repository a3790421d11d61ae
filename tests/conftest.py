"""Shared fixtures: every backend usable here runs the same parametrised suite."""

from __future__ import annotations

import os

import torch

# Triton kernels run on CPU tensors only under the interpreter, which must be switched on before any
# @triton.jit function is created, so before sirl_kernels imports its Triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sirl_kernels  # noqa: E402
from sirl_kernels.backends import BACKEND_NAMES  # noqa: E402


def backend_device(name: str) -> torch.device:
    """Where a backend's tests put their tensors: CUDA when present (except the C++ CPU backend)."""
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _backend_params():
    report = sirl_kernels.available_backends()
    params = []
    for name in BACKEND_NAMES:
        status = report[name]
        marks = [] if status.available else [pytest.mark.skip(reason=f"backend {name} unavailable: {status.reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


BACKEND_PARAMS = _backend_params()


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    return backend_device(backend)
