"""The CPU backend's ISA builds this machine runs, and a fixture that runs a test once per build (shared by the
CPU kernel tests; CI may run on AVX-512 or AVX2 machines, so no test assumes one)."""

from __future__ import annotations

import pytest


def supported_isas() -> list[str]:
    """Every ISA build this CPU runs, best first (``set_isa`` caps at what the CPU supports)."""
    from sirl_kernels.backends import cpu

    found = [name for name in ("avx512", "avx2", "baseline") if cpu.set_isa(name) == name]
    cpu.set_isa("auto")
    return found


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def isa(request):
    from sirl_kernels.backends import cpu

    if request.param not in supported_isas():
        pytest.skip(f"this CPU does not run the {request.param} build")
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa("auto")
