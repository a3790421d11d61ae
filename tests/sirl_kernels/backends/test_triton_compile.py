"""Every Triton kernel compiles with the real compiler for sm_80, sm_90 and sm_100, without a GPU.

One subprocess (``aot.run_subprocess``: ``python -m sirl_kernels.backends.triton.aot`` without TRITON_INTERPRET)
records every launch
the backend's own launchers issue on a GPU of each architecture (``aot.CASES``: every dtype, split-V or not,
bias or not, forward and backward, in-place, one or several backward chunks, frozen parameters), compiles each
distinct specialisation with Triton's own launch path and ptxas, and reads the binaries with cuobjdump. The
architectures compile in two parallel processes, into one Triton cache directory for the whole pytest run
(cold at its start: the compile times are cold times). The tests then assert, per architecture, ptxas'
verdict: no compile error, no local memory (spills), tensor-core instructions in every bf16/fp16 GEMM tile and
no cold compile over 60 s. sm_100 is compiled when the bundled ptxas-blackwell accepts it, else skipped with
its error.

The resource table in docs/triton-kernels.md comes from the same module:
``python benchmarks/triton_resources.py --out docs/triton-kernels.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sirl_kernels.backends import triton as tb

if tb._IMPORT_ERROR is None:
    from sirl_kernels.backends.triton import aot

ROOT = Path(__file__).resolve().parents[3]
ARCHS = aot.ARCHS if tb._IMPORT_ERROR is None else ()  # utils.GPU_ARCHS: sm_80, sm_90, sm_100
MAX_COMPILE_S = 60.0
# specialisations each architecture must have compiled: (kernel, dtype of its first pointer or, with commas, of
# all its pointers, constexprs)
EXPECTED = [
    (kernel, dtype, flags)
    for dtype in ("float32", "bfloat16", "float16")
    for kernel, flags in [
        ("_logits_fwd_kernel", {"SPLIT": False}), ("_logits_fwd_kernel", {"SPLIT": True}),
        ("_logits_bwd_kernel", {}),
        ("_linear_fwd_kernel", {"SPLIT": False, "HAS_BIAS": True}),
        ("_linear_fwd_kernel", {"SPLIT": False, "HAS_BIAS": False}),
        ("_linear_fwd_kernel", {"SPLIT": True, "HAS_BIAS": True}),
        ("_linear_fwd_kernel", {"SPLIT": True, "HAS_BIAS": False}),
        ("_dlogits_kernel", {"HAS_BIAS": True, "NEED_DB": True}),
        ("_dlogits_kernel", {"HAS_BIAS": True, "NEED_DB": False}),
        ("_dlogits_kernel", {"HAS_BIAS": False, "NEED_DB": False}),
        ("_matmul_kernel", {"ACCUMULATE": False}), ("_matmul_kernel", {"ACCUMULATE": True}),
    ]
] + [
    # the dW GEMM of a bf16/fp16 weight over several chunks (A = dz.T, B = X, C, ACC): the first chunk writes the
    # fp32 buffer, the middle ones add into it, the last adds and writes dW in the weight's dtype
    ("_matmul_kernel", f"{dtype},{dtype},{c},float32", {"ACCUMULATE": acc})
    for dtype in ("bfloat16", "float16")
    for c, acc in (("float32", False), ("float32", True), (dtype, True))
] + [("merge_partials_kernel", "float32", {"LABEL_FROM_ROWS": True}),
     ("merge_partials_kernel", "float32", {"LABEL_FROM_ROWS": False}),
     ("_add_row_sums_kernel", "float32", {})]

pytestmark = pytest.mark.skipif(tb._IMPORT_ERROR is not None, reason=f"triton not importable: {tb._IMPORT_ERROR}")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """The aot module's results for every architecture, compiled once per pytest run; prints its wall time."""
    # one Triton cache for the session, cold at its start
    try:
        results, wall = aot.run_subprocess(ARCHS, jobs=2, workdir=tmp_path_factory.mktemp("triton_aot"),
                                           timeout=1200)
    except RuntimeError as exc:  # the subprocess failed or left an architecture out: its stderr is in exc
        pytest.fail(str(exc), pytrace=False)
    results["wall_s"] = wall
    print(f"\nTriton AOT compile of {sum(len(a['binaries']) for a in results['archs'].values())} binaries for "
          f"sm_{', sm_'.join(results['archs'])}: {wall:.0f} s wall")
    return results


def _binaries(compiled, arch):
    assert str(arch) in compiled["archs"] or str(arch) in compiled["skipped"]  # run_subprocess checked it
    if str(arch) in compiled["skipped"]:
        if arch < 100:
            pytest.fail(f"sm_{arch} must compile: {compiled['skipped'][str(arch)]}")
        pytest.skip(f"the bundled ptxas does not accept sm_{arch}: {compiled['skipped'][str(arch)][:500]}")
    return compiled["archs"][str(arch)]["binaries"]


def _describe(b):
    return f"{b['kernel']} ({b['case']}; {b['constexprs']})"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(compiled, arch):
    binaries = _binaries(compiled, arch)
    errors = [f"{_describe(b)}: {b['error'][-1500:]}" for b in binaries if b["error"]]
    assert not errors, "\n\n".join(errors)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_specialisation_is_covered(compiled, arch):
    binaries = [b for b in _binaries(compiled, arch) if not b["error"]]

    def found(kernel, dtype, flags):
        return any(b["kernel"] == kernel and (b["dtypes"] if "," in dtype else b["dtypes"].split(",")[0]) == dtype
                   and all(b["constexprs"].get(k) == v for k, v in flags.items()) for b in binaries)

    missing = [e for e in EXPECTED if not found(*e)]
    assert not missing, missing


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_or_local_memory(compiled, arch):
    spilled = [f"{_describe(b)}: {b['registers']} registers, stack {b['stack_bytes']} B, local "
               f"{b['local_bytes']} B, spills {b['spill_bytes']} B" for b in _binaries(compiled, arch)
               if aot.spilled_bytes(b)]
    assert not spilled, "\n".join(spilled)
    assert all(0 < b["registers"] <= 255 for b in _binaries(compiled, arch) if not b["error"])


@pytest.mark.parametrize("arch", ARCHS)
def test_low_precision_gemm_tiles_use_tensor_cores(compiled, arch):
    gemms = [b for b in _binaries(compiled, arch) if aot.needs_tensor_cores(b)]
    assert gemms, "no bf16/fp16 tl.dot kernel was compiled"
    scalar = [_describe(b) for b in gemms if not b["tensor_core_instrs"]]
    assert not scalar, scalar


@pytest.mark.parametrize("arch", ARCHS)
def test_cold_compile_within_budget(compiled, arch):
    slow = [f"{_describe(b)}: {b['compile_s']:.0f} s" for b in _binaries(compiled, arch)
            if b["compile_s"] > MAX_COMPILE_S]
    assert not slow, slow


def test_aot_subprocess_failure_reports_its_stderr(tmp_path):
    """A failing compile process fails the caller with the process' own error, not a missing key later."""
    with pytest.raises(RuntimeError, match=r"(?s)rc 2.*--- stderr.*invalid int value: 'sm_80'"):
        aot.run_subprocess(("sm_80",), workdir=tmp_path, timeout=300)


def test_resource_table_names_every_kernel():
    """docs/triton-kernels.md (regenerated by benchmarks/triton_resources.py) lists every kernel."""
    doc = (ROOT / "docs" / "triton-kernels.md").read_text()
    assert "benchmarks/triton_resources.py" in doc
    for kernel in {e[0] for e in EXPECTED}:
        assert f"`{kernel}`" in doc, kernel
