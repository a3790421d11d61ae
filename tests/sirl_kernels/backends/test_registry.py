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


def test_a_backend_is_asked_about_the_tensors_device_index_included(monkeypatch):
    """The CUDA backend probes (and caches) per device index: resolve must pass "cuda:1", not just "cuda"."""
    asked = []
    module = backends._module("torch")
    monkeypatch.setattr(module, "unavailable_reason", lambda device: asked.append(device))
    assert backends.resolve("torch", torch.device("cuda:1")) == "torch"
    assert asked == [torch.device("cuda:1")]


def test_a_bad_cpu_isa_setting_is_an_error_not_a_fallback():
    """$SIRL_KERNELS_CPU_ISA with a typo: "auto" must not quietly run another backend; the report names it."""
    import os
    import subprocess
    import sys

    if not sirl_kernels.available_backends()["cpu"].available:
        pytest.skip("the cpu backend is not usable here")
    code = ("import torch, sirl_kernels\n"
            "print(sirl_kernels.available_backends()['cpu'])\n"
            "sirl_kernels.token_logprobs_entropy(torch.randn(2, 5), torch.tensor([0, 1]))\n")
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    env["SIRL_KERNELS_CPU_ISA"] = "avx3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "cpu: no (cpu: $SIRL_KERNELS_CPU_ISA='avx3'" in out.stdout, out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: $SIRL_KERNELS_CPU_ISA='avx3': "), last
    assert "'avx512', 'avx2', 'baseline'" in last, last
