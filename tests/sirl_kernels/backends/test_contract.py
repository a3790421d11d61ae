"""The backend contract in code: every backend module implements it, ``backends.get`` enforces it."""

from __future__ import annotations

import types

import pytest

from sirl_kernels import backends
from sirl_kernels.backends.contract import REQUIRED, Backend, check_backend


@pytest.mark.parametrize("name", backends.BACKEND_NAMES)
def test_every_backend_module_implements_the_contract(name):
    """Imports the module even where the backend cannot run here (no CUDA, no interpreter): the contract holds
    regardless of the machine."""
    module = backends._module(name)
    assert check_backend(module) is module
    assert isinstance(module, Backend)
    assert module.name == name


def test_a_module_missing_a_function_is_refused_by_name():
    broken = types.ModuleType("broken_backend")
    broken.name = "broken"
    for attr in REQUIRED[1:]:
        setattr(broken, attr, lambda *a, **k: None)
    del broken.linear_backward
    with pytest.raises(TypeError, match="broken_backend breaks the backend contract: missing linear_backward"):
        check_backend(broken)
    broken.linear_backward = 3
    with pytest.raises(TypeError, match="not callable: linear_backward"):
        check_backend(broken)


def test_get_checks_the_contract(monkeypatch):
    broken = types.ModuleType("broken_backend")
    broken.name = "torch"
    monkeypatch.setitem(backends._MODULES, "torch", broken)
    monkeypatch.setattr(backends, "_CHECKED", set())
    with pytest.raises(TypeError, match="breaks the backend contract"):
        backends.get("torch")
