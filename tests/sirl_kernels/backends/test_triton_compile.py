"""Every Triton kernel compiles with the real compiler for sm_80, sm_90 and sm_100, without a GPU.

One subprocess (``aot.run_subprocess``: ``python -m tools.triton_aot`` without TRITON_INTERPRET) records every
launch the backend's own launchers issue on a GPU of each architecture (``aot.CASES``: every dtype, split-V or
not, bias or not, forward and backward, in-place, V % 8 != 0 views, a row stride that is not a multiple of 16
bytes, one or several backward chunks, frozen parameters; the wave-efficiency shapes only where test_gpu_model.py
asserts them), compiles each distinct specialisation once with Triton's own launch path and ptxas, and reads the
binaries with cuobjdump (the ``compiled`` fixture of this folder's conftest.py, shared with
test_triton_sass.py). The tests then assert, per architecture, ptxas' verdict: no compile error, no local
memory (spills), tensor-core instructions in every bf16/fp16 GEMM tile (wgmma on sm_90) and no cold compile
over 60 s. sm_100 is compiled when the bundled ptxas-blackwell accepts it, else skipped with its error.

The resource table in docs/triton-kernels.md comes from the same module:
``python benchmarks/triton_resources.py --out docs/triton-kernels.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sirl_kernels.backends import triton as tb

try:
    from tools import triton_aot as aot
except ImportError:  # the installed-wheel run, outside the checkout (this file is left out there anyway)
    aot = None

ROOT = Path(__file__).resolve().parents[3]
ARCHS = aot.ARCHS if aot is not None and tb._IMPORT_ERROR is None else ()  # utils.GPU_ARCHS: sm_80/90/100
MAX_COMPILE_S = 60.0
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# specialisations each architecture must have compiled: (kernel, dtype of its first pointer or, with commas, of
# all its pointers, constexprs)
EXPECTED = [
    (kernel, dtype, flags)
    for dtype in ("float32", "bfloat16", "float16")
    for kernel, flags in [
        ("_logits_fwd_kernel", {"SPLIT": False}), ("_logits_fwd_kernel", {"SPLIT": True}),
        ("_logits_bwd_kernel", {"UNIT": 16 // _BYTES[dtype], "OUT_UNIT": 16 // _BYTES[dtype]}),
        ("_linear_fwd_kernel", {"SPLIT": False, "HAS_BIAS": True}),
        ("_linear_fwd_kernel", {"SPLIT": False, "HAS_BIAS": False}),
        ("_linear_fwd_kernel", {"SPLIT": True, "HAS_BIAS": True}),
        ("_linear_fwd_kernel", {"SPLIT": True, "HAS_BIAS": False}),
        ("_dlogits_kernel", {"HAS_BIAS": True, "NEED_DB": True}),
        ("_dlogits_kernel", {"HAS_BIAS": True, "NEED_DB": False}),
        ("_dlogits_kernel", {"HAS_BIAS": False, "NEED_DB": False}),
        # self-certainty and varentropy (both on; the backward's gamma and delta terms)
        ("_logits_fwd_kernel", {"SPLIT": False, "HAS_SC": True, "HAS_VE": True}),
        ("_logits_fwd_kernel", {"SPLIT": True, "HAS_SC": True, "HAS_VE": True}),
        ("_logits_bwd_kernel", {"HAS_GAMMA": True, "HAS_DELTA": True}),
        ("_linear_fwd_kernel", {"SPLIT": False, "HAS_SC": True, "HAS_VE": True}),
        ("_linear_fwd_kernel", {"SPLIT": True, "HAS_SC": True, "HAS_VE": True}),
        ("_dlogits_kernel", {"HAS_BIAS": True, "NEED_DB": True, "HAS_GAMMA": True, "HAS_DELTA": True}),
    ]
] + [("_logits_fwd_kernel", "bfloat16", {"UNIT": 1}),  # a row stride that is not a multiple of 16 bytes
     ("_logits_bwd_kernel", "bfloat16", {"UNIT": 1, "OUT_UNIT": 1}),
     ("merge_partials_kernel", "float32", {"LABEL_FROM_ROWS": True}),
     ("merge_partials_kernel", "float32", {"LABEL_FROM_ROWS": False}),
     ("merge_partials_kernel", "float32", {"LABEL_FROM_ROWS": True, "HAS_SC": True, "HAS_VE": True}),
     ("merge_partials_kernel", "float32", {"LABEL_FROM_ROWS": False, "HAS_SC": True, "HAS_VE": True}),
     ("_logits_fwd_kernel", "bfloat16", {"HAS_SC": True, "HAS_VE": False}),  # one statistic alone
     ("_logits_fwd_kernel", "bfloat16", {"HAS_SC": False, "HAS_VE": True}),
     ("_add_row_sums_kernel", "float32", {})]

pytestmark = pytest.mark.skipif(tb._IMPORT_ERROR is not None, reason=f"triton not importable: {tb._IMPORT_ERROR}")


def _describe(b):
    return f"{b['kernel']} ({b['case']}; {b['constexprs']})"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(binaries_of, arch):
    binaries = binaries_of(arch)
    errors = [f"{_describe(b)}: {b['error'][-1500:]}" for b in binaries if b["error"]]
    assert not errors, "\n\n".join(errors)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_specialisation_is_covered(binaries_of, arch):
    binaries = [b for b in binaries_of(arch) if not b["error"]]

    def found(kernel, dtype, flags):
        return any(b["kernel"] == kernel and (b["dtypes"] if "," in dtype else b["dtypes"].split(",")[0]) == dtype
                   and all(b["constexprs"].get(k) == v for k, v in flags.items()) for b in binaries)

    missing = [e for e in EXPECTED if not found(*e)]
    assert not missing, missing


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_or_local_memory(binaries_of, arch):
    spilled = [f"{_describe(b)}: {b['registers']} registers, stack {b['stack_bytes']} B, local "
               f"{b['local_bytes']} B, spills {b['spill_bytes']} B" for b in binaries_of(arch)
               if aot.spilled_bytes(b)]
    assert not spilled, "\n".join(spilled)
    assert all(0 < b["registers"] <= 255 for b in binaries_of(arch) if not b["error"])


@pytest.mark.parametrize("arch", ARCHS)
def test_low_precision_gemm_tiles_use_tensor_cores(binaries_of, arch):
    """Every bf16/fp16 GEMM tile on the tensor cores; on sm_90 the fused-linear tiles of 64 rows or more (forward
    and the backward's recompute: every GEMM the backend itself runs; dX and dW are cuBLAS) on wgmma."""
    gemms = [b for b in binaries_of(arch) if aot.needs_tensor_cores(b)]
    assert gemms, "no bf16/fp16 tl.dot kernel was compiled"
    scalar = [_describe(b) for b in gemms if not b["tensor_core_instrs"]]
    assert not scalar, scalar
    if arch == 90:  # wgmma needs 64-row tiles: the 16-row tile of a 16-token call stays on mma.sync
        no_wgmma = [_describe(b) for b in gemms if "HGMMA" not in b["tensor_core_instrs"]
                    and b["constexprs"].get("BLOCK_N", 64) >= 64]
        assert not no_wgmma, no_wgmma
        assert any(b["constexprs"].get("BLOCK_N", 0) >= 64 for b in gemms)


@pytest.mark.parametrize("arch", ARCHS)
def test_cold_compile_within_budget(binaries_of, arch):
    slow = [f"{_describe(b)}: {b['compile_s']:.0f} s" for b in binaries_of(arch)
            if b["compile_s"] > MAX_COMPILE_S]
    assert not slow, slow


def test_aot_subprocess_failure_reports_its_stderr(tmp_path):
    """A failing compile process fails the caller with the process' own error, not a missing key later."""
    if aot is None:
        pytest.skip("needs the checkout's tools/")
    with pytest.raises(RuntimeError, match=r"(?s)rc 2.*--- stderr.*invalid int value: 'sm_80'"):
        aot.run_subprocess(("sm_80",), workdir=tmp_path, timeout=300)


def test_resource_table_names_every_kernel():
    """docs/triton-kernels.md (regenerated by benchmarks/triton_resources.py) lists every kernel."""
    doc = (ROOT / "docs" / "triton-kernels.md").read_text()
    assert "benchmarks/triton_resources.py" in doc
    for kernel in {e[0] for e in EXPECTED}:
        assert f"`{kernel}`" in doc, kernel
