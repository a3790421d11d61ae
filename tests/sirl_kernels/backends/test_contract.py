"""The backend contract in code: every backend module implements it, ``backends.get`` enforces it."""

from __future__ import annotations

import types

import pytest

from sirl_kernels import backends
from sirl_kernels.backends.contract import ATTRIBUTES, FUNCTIONS, Backend, check_backend


@pytest.mark.parametrize("name", backends.BACKEND_NAMES)
def test_every_backend_module_implements_the_contract(name):
    """Imports the module even where the backend cannot run here (no CUDA, no interpreter): the contract holds
    regardless of the machine."""
    module = backends._module(name)
    assert check_backend(module) is module
    assert isinstance(module, Backend)
    assert module.name == name


def test_the_required_members_are_read_off_the_protocol():
    assert ATTRIBUTES == ("name", "stats_units")
    assert set(FUNCTIONS) == {"unavailable_reason", "logits_forward", "logits_backward", "linear_forward",
                              "linear_backward"}


def _complete_module() -> types.ModuleType:
    module = types.ModuleType("broken_backend")
    module.name = "broken"
    module.stats_units = "z"
    for attr in FUNCTIONS:
        setattr(module, attr, lambda *a, **k: None)
    return check_backend(module)


@pytest.mark.parametrize("attr", FUNCTIONS)
def test_a_module_missing_a_function_is_refused_by_name(attr):
    broken = _complete_module()
    delattr(broken, attr)
    with pytest.raises(TypeError, match=f"broken_backend breaks the backend contract: missing {attr}$"):
        check_backend(broken)
    setattr(broken, attr, 3)
    with pytest.raises(TypeError, match=f"not callable: {attr}$"):
        check_backend(broken)


def test_a_module_without_a_str_name_is_refused():
    broken = _complete_module()
    broken.name = 3
    with pytest.raises(TypeError, match="`name` is not a str"):
        check_backend(broken)
    del broken.name
    with pytest.raises(TypeError, match="missing name"):
        check_backend(broken)


def test_get_checks_the_contract(monkeypatch):
    broken = types.ModuleType("broken_backend")
    broken.name = "torch"
    monkeypatch.setitem(backends._MODULES, "torch", broken)
    monkeypatch.setattr(backends, "_CHECKED", set())
    with pytest.raises(TypeError, match="breaks the backend contract"):
        backends.get("torch")


def test_a_function_with_the_old_positional_chain_is_refused():
    """The contract's functions take named tuples (``rows.Rows``, ``rows.LinearRows``); a backend still taking
    logits, labels, temperature, ignore_index one by one is refused by name, as is a required extra parameter."""
    broken = _complete_module()

    def logits_forward(logits, labels, temperature, ignore_index, extras=None, batch_invariant=False):
        return None

    broken.logits_forward = logits_forward
    with pytest.raises(TypeError, match=r"logits_forward\(logits, labels, .*\) does not take the contract's "
                                        r"\(rows, extras, batch_invariant\)$"):
        check_backend(broken)

    def needs_more(rows, extras=None, batch_invariant=False, num_splits=0):  # like cuda's: extra with a default
        return None

    broken.logits_forward = needs_more
    assert check_backend(broken) is broken

    def requires_more(rows, extras, batch_invariant, launch):
        return None

    broken.logits_forward = requires_more
    with pytest.raises(TypeError, match="does not take the contract's"):
        check_backend(broken)
