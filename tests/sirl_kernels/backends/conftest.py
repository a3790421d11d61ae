"""The Triton AOT compile shared by test_triton_compile.py and test_triton_sass.py: one subprocess compiles every
kernel for sm_80/90/100 once per pytest run (``tools/triton_aot.py``), into one Triton cache that is cold at its
start (the compile times are cold times)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """The AOT tool's results for every architecture, compiled once per pytest run; prints its wall time."""
    from sirl_kernels.backends import triton as tb

    if tb._IMPORT_ERROR is not None:
        pytest.skip(f"triton not importable: {tb._IMPORT_ERROR}")
    try:
        from tools import triton_aot as aot
    except ImportError:
        pytest.skip("needs the checkout's tools/ (not installed)")
    try:
        results, wall = aot.run_subprocess(aot.ARCHS, jobs=2, workdir=tmp_path_factory.mktemp("triton_aot"),
                                           timeout=1200)
    except RuntimeError as exc:  # the subprocess failed or left an architecture out: its stderr is in exc
        pytest.fail(str(exc), pytrace=False)
    results["wall_s"] = wall
    print(f"\nTriton AOT compile of {sum(len(a['binaries']) for a in results['archs'].values())} binaries for "
          f"sm_{', sm_'.join(results['archs'])}: {wall:.0f} s wall")
    return results


@pytest.fixture
def binaries_of(compiled):
    """``binaries_of(arch)``: the binaries of sm_``arch``; fails for sm_80/90 and skips sm_100 when the bundled
    ptxas refused it."""

    def of(arch):
        if str(arch) in compiled["skipped"]:
            if arch < 100:
                pytest.fail(f"sm_{arch} must compile: {compiled['skipped'][str(arch)]}")
            pytest.skip(f"the bundled ptxas does not accept sm_{arch}: {compiled['skipped'][str(arch)][:500]}")
        return compiled["archs"][str(arch)]["binaries"]

    return of
