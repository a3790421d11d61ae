"""``backends.matmul``: every route of ``matmul_into`` against float64, with ``BLOCK_ELEMENTS`` small enough that the
blocked loops run several (ragged) blocks, and the CUDA routes' control flow with the fp32-output calls emulated."""

from __future__ import annotations

import pytest
import torch

from sirl_kernels.backends import matmul
from sirl_kernels.backends.rows import LinearRows

U32 = 2.0 ** -24  # unit roundoff of fp32


def _operands(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)


def _fp32_accumulation_bound(a, b, start=None):
    """float64 (exact, the initial value included) and the error bound of summing the k exact products (and the
    initial value) in fp32 in any order: (k + 1) u sum |terms|, plus the final rounding's u |exact|."""
    exact = a.double() @ b.double()
    size = a.abs().double() @ b.abs().double()
    if start is not None:
        exact, size = exact + start.double(), size + start.abs().double()
    k = a.shape[1]
    return exact, (k + 1) * U32 / (1 - (k + 1) * U32) * size + U32 * exact.abs()


def _assert_within(got, exact, err):
    bad = (got.double() - exact).abs() > err
    assert not bool(bad.any()), f"{int(bad.sum())} of {bad.numel()} values outside the fp32-accumulation bound"


def _assert_rounded_fp32_sum(got, a, b):
    """``got`` (16-bit) is an fp32-accumulated sum rounded once to its dtype: rounding is monotone, so it lies
    between the roundings of the ends of the interval the fp32 sum can be in."""
    exact, err = _fp32_accumulation_bound(a, b)
    lo, hi = (exact - err).to(got.dtype), (exact + err).to(got.dtype)
    bad = (got < lo) | (got > hi)
    assert not bool(bad.any()), f"{int(bad.sum())} of {bad.numel()} values are not a rounded fp32 sum"


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(matmul, "BLOCK_ELEMENTS", 64)
    calls = []
    upcast = matmul._upcast
    monkeypatch.setattr(matmul, "_upcast", lambda scratch, x: calls.append(x.shape) or upcast(scratch, x))
    return calls


# (m, k, n) -> the branch of _blocked_upcast_matmul and how many blocks it runs with BLOCK_ELEMENTS = 64
BRANCHES = {
    "reduction": ((5, 37, 7), 5),   # k >= max(m, n): step 64 // 7 = 9 -> 9, 9, 9, 9, 1
    "columns": ((5, 6, 41), 5),     # n >= m: step 64 // 6 = 10 -> 10 x 4, 1
    "rows": ((41, 6, 5), 5),        # m > n: step 10 -> 10 x 4, 1
}


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_blocked_upcast_every_branch_against_float64(small_blocks, branch, dtype, accumulate):
    (m, k, n), blocks = BRANCHES[branch]
    a, b = _operands(m, k, n, dtype)
    start = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    out = start.clone()
    assert matmul.matmul_into(out, a, b, accumulate=accumulate) is out
    exact, err = _fp32_accumulation_bound(a, b, start if accumulate else None)
    _assert_within(out, exact, err)
    per_block = 2 if branch == "reduction" else 1
    assert len(small_blocks) == blocks * per_block, small_blocks


@pytest.mark.parametrize("branch", BRANCHES)
def test_blocked_upcast_into_strided_views_and_float64(small_blocks, branch):
    (m, k, n), _ = BRANCHES[branch]
    a, b = _operands(m, k, n, torch.bfloat16, seed=2)
    big = torch.full((n, 2 * m), float("nan"))
    out = big.t()[::2]  # [m, n] with strides (2, 2m): a view of every other row of a transposed buffer
    matmul.matmul_into(out, a, b)
    exact, err = _fp32_accumulation_bound(a, b)
    _assert_within(out, exact, err)
    assert torch.isnan(big.t()[1::2]).all()  # the rows in between untouched
    wide = torch.zeros(m, n, dtype=torch.float64)
    matmul.matmul_into(wide, a, b, accumulate=True)
    torch.testing.assert_close(wide, a.double() @ b.double(), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["dX", "transposed"])
def test_same_dtype_output_is_one_rounding_of_an_fp32_sum(dtype, layout):
    """The CPU shortcut (``torch.mm`` for a 16-bit output): every value is an fp32-accumulated sum rounded once,
    as the blocked upcast path gives, at the fused-linear dX shape (gradient [rows, V] @ weight [V, D])."""
    a, b = _operands(33, 3001, 64, dtype, seed=3)
    if layout == "transposed":
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    out = torch.empty(33, 64, dtype=dtype)
    matmul.matmul_into(out, a, b)
    _assert_rounded_fp32_sum(out, a, b)


def test_the_rounding_check_catches_16_bit_accumulation():
    a, b = _operands(8, 4096, 8, torch.bfloat16, seed=4)
    running = torch.zeros(8, 8, dtype=torch.bfloat16)
    for k0 in range(0, 4096, 64):  # partial sums rounded to bf16
        running += (a[:, k0:k0 + 64].float() @ b[k0:k0 + 64].float()).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="not a rounded fp32 sum"):
        _assert_rounded_fp32_sum(running, a, b)


def test_accumulate_into_a_16_bit_output_is_refused():
    a, b = _operands(2, 3, 4, torch.bfloat16)
    with pytest.raises(TypeError, match=r"accumulate=True\) needs an fp32/float64 output, got torch.bfloat16"):
        matmul.matmul_into(torch.zeros(2, 4, dtype=torch.bfloat16), a, b, accumulate=True)


# ---- the CUDA routes (fp32 output from 16-bit operands), their calls emulated on the CPU ----------------------


class Emulated:
    """Stands in for ``torch.mm(out_dtype=)`` / ``torch.addmm(out_dtype=)``: ``addmm`` is "ok", "refused" (torch 2.8
    and 2.9 reject an fp32 ``self``) or "wrong" (ignores ``self``); ``mm`` is "ok" or "refused"."""

    def __init__(self, monkeypatch, mm="ok", addmm="ok"):
        self.mm_calls = self.addmm_calls = 0
        self.mm, self.addmm = mm, addmm
        monkeypatch.setattr(matmul, "_FP32_OUT_SUPPORT", {})
        monkeypatch.setattr(matmul, "_mm_fp32", self._mm_fp32)
        monkeypatch.setattr(matmul, "_addmm_fp32", self._addmm_fp32)
        monkeypatch.setattr(matmul, "BLOCK_ELEMENTS", 64)

    def _mm_fp32(self, out, a, b):
        self.mm_calls += 1
        if self.mm == "refused":
            raise NotImplementedError("Could not run 'aten::mm.dtype_out'")
        out.copy_(a.float() @ b.float())

    def _addmm_fp32(self, out, a, b):
        self.addmm_calls += 1
        if self.addmm == "refused":
            raise RuntimeError("self dtype must match the output dtype")
        out.copy_(a.float() @ b.float() + (out if self.addmm == "ok" else 0))


def _check_fp32_route(accumulate, seed=5):
    a, b = _operands(41, 6, 7, torch.bfloat16, seed=seed)
    start = torch.randn(41, 7, generator=torch.Generator().manual_seed(seed))
    out = start.clone()
    matmul.matmul_into(out, a, b, accumulate=accumulate)
    exact, err = _fp32_accumulation_bound(a, b, start if accumulate else None)
    _assert_within(out, exact, err)


@pytest.mark.parametrize("accumulate", [False, True])
def test_fp32_output_calls_used_where_they_run(monkeypatch, accumulate):
    emu = Emulated(monkeypatch)
    _check_fp32_route(accumulate)
    # one probe call, then the call itself, of the one kind needed
    assert (emu.mm_calls, emu.addmm_calls) == ((0, 2) if accumulate else (2, 0))
    _check_fp32_route(accumulate, seed=6)
    assert (emu.mm_calls, emu.addmm_calls) == ((0, 3) if accumulate else (3, 0))  # probed once
    assert list(matmul._FP32_OUT_SUPPORT.values()) == [True]


@pytest.mark.parametrize("addmm", ["refused", "wrong"])
def test_accumulation_without_addmm_goes_through_mm_in_row_blocks(monkeypatch, addmm):
    emu = Emulated(monkeypatch, addmm=addmm)
    _check_fp32_route(True)
    assert emu.addmm_calls == 1  # the probe only
    assert emu.mm_calls == 1 + 5  # the probe, then rows of 64 // 7 = 9: 9 x 4, 5
    assert matmul._FP32_OUT_SUPPORT == {("cpu", None, torch.bfloat16, True): False,
                                        ("cpu", None, torch.bfloat16, False): True}


@pytest.mark.parametrize("accumulate", [False, True])
def test_without_either_call_the_operands_are_upcast(monkeypatch, accumulate, small_blocks):
    emu = Emulated(monkeypatch, mm="refused", addmm="refused")
    _check_fp32_route(accumulate)
    assert len(small_blocks) == 5  # rows branch: 64 // 6 = 10 rows per block
    assert emu.addmm_calls == (1 if accumulate else 0) and emu.mm_calls == 1


def test_the_real_probe_on_this_cpu_answers_and_caches(monkeypatch):
    monkeypatch.setattr(matmul, "_FP32_OUT_SUPPORT", {})
    for accumulate in (False, True):
        assert isinstance(matmul._fp32_out_supported(torch.device("cpu"), torch.bfloat16, accumulate), bool)
    assert set(matmul._FP32_OUT_SUPPORT) == {("cpu", None, torch.bfloat16, False), ("cpu", None, torch.bfloat16, True)}


# --- fp32 precision policy ----------------------------------------------------------------------------------------


def _precision_seen_by_mm(monkeypatch):
    """Records, at each torch.mm / Tensor.addmm_ call, the fp32 matmul precision then in force."""
    seen = []
    real_mm, real_addmm = torch.mm, torch.Tensor.addmm_

    def current():
        """"ieee" when neither API asks for reduced precision, else what asks for it."""
        try:
            legacy = torch.get_float32_matmul_precision()
        except RuntimeError:  # the per-backend API is in use
            legacy = "highest"
        reduced = [m.fp32_precision for m in matmul._precision_backends() if m.fp32_precision in ("tf32", "bf16")]
        return "ieee" if legacy == "highest" and not reduced else (legacy, *reduced)

    def mm(*args, **kwargs):
        seen.append(current())
        return real_mm(*args, **kwargs)

    def addmm_(self, *args, **kwargs):
        seen.append(current())
        return real_addmm(self, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch.Tensor, "addmm_", addmm_)
    return seen


@pytest.mark.parametrize("accumulate", [False, True])
def test_fp32_matmuls_run_at_ieee_precision_whatever_the_global_setting(monkeypatch, accumulate):
    """torch.set_float32_matmul_precision("high") makes CUDA fp32 matmuls TF32 (and "medium" CPU ones bf16): every
    fp32 product of matmul_into (the fused-linear chunk logits of the torch/cpu/cuda backends, the Triton
    backward's dX and dW for fp32 inputs) runs at "highest", and the caller's setting is restored after."""
    old = torch.get_float32_matmul_precision()
    seen = _precision_seen_by_mm(monkeypatch)
    a, b = _operands(6, 5, 4, torch.float32)
    out = torch.zeros(6, 4)
    try:
        for setting in ("high", "medium"):
            torch.set_float32_matmul_precision(setting)
            matmul.matmul_into(out, a, b, accumulate=accumulate)
            assert torch.get_float32_matmul_precision() == setting  # restored
    finally:
        torch.set_float32_matmul_precision(old)
    assert seen == ["ieee", "ieee"]


def test_fp32_policy_through_the_per_backend_api(monkeypatch):
    """A caller who set the per-backend API (torch >= 2.9: backends.cuda.matmul.fp32_precision = "tf32") gets
    "ieee" inside, its own value back after, and no 'mix of legacy and new APIs' error."""
    modules = matmul._precision_backends()
    if not modules:
        pytest.skip(f"torch {torch.__version__} has no per-backend fp32_precision")
    old = [m.fp32_precision for m in modules]
    seen = _precision_seen_by_mm(monkeypatch)
    a, b = _operands(3, 4, 5, torch.float32)
    try:
        modules[0].fp32_precision = "tf32"
        matmul.matmul_into(torch.empty(3, 5), a, b)
        assert modules[0].fp32_precision == "tf32"
    finally:
        for m, value in zip(modules, old):
            m.fp32_precision = value
    assert seen == ["ieee"]


def test_fp32_policy_holds_for_the_chunked_fused_linear(monkeypatch):
    """The chunked driver of the torch/cpu/cuda backends forms its fp32 chunk logits through matmul_into: under
    "high", the torch backend's fp32 fused-linear forward matches float64 to fp32 accuracy (TF32 would be ~1e-3
    off on a GPU; on this CPU the setting changes nothing, so this checks the policy's code path end to end)."""
    from reference_impl import reference_linear

    from sirl_kernels.backends import torch_ref

    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(7, 64, generator=g), torch.randn(300, 64, generator=g) / 8
    labels = torch.randint(0, 300, (7,), generator=g)
    seen = _precision_seen_by_mm(monkeypatch)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        lp, h, _ = torch_ref.linear_forward(LinearRows(hidden, weight, None, labels, 1.0, -100), 3)
    finally:
        torch.set_float32_matmul_precision(old)
    assert seen and set(seen) == {"ieee"}
    ref_lp, ref_h = reference_linear(hidden, weight, labels)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=2e-5)
