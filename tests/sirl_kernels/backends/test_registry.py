"""The backend registry: reporting, resolution of "auto", the environment override."""

from __future__ import annotations

import pytest
import torch

import sirl_kernels
from sirl_kernels import backends


def test_report_lists_every_backend_with_a_reason():
    report = sirl_kernels.available_backends()
    assert set(report) == set(backends.BACKEND_NAMES)
    assert report["torch"].available
    for status in report.values():
        assert status.reason, f"{status.name} must say what it runs on or why not"
    if not torch.cuda.is_available():
        assert not report["cuda"].available


def test_auto_picks_the_best_usable_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    report = sirl_kernels.available_backends()
    expected = "cpu" if report["cpu"].available else "torch"
    assert backends.resolve("auto", torch.device("cpu")) == expected


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("auto", torch.device("cpu")) == "torch"
    report = sirl_kernels.available_backends()
    if report["cpu"].available:
        assert backends.resolve("cpu", torch.device("cpu")) == "cpu"


def test_unusable_backend_raises_with_reason():
    report = sirl_kernels.available_backends()
    for name, status in report.items():
        if not status.available:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not usable"):
                backends.resolve(name, torch.device("cpu"))
