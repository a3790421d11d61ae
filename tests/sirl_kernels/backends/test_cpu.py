"""Tests specific to the C++ CPU backend (csrc/cpu, libsirl_cpu.so): vector exp, dtype conversions, ISA builds,
strides, threads, int64 offsets, the C ABI's argument checks and the fused-linear chunking, against float64 PyTorch
references."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import pytest
import torch
from reference_impl import grad_tolerance, reference_grads, reference_linear, reference_logprobs_entropy

import sirl_kernels
from sirl_kernels import linear_token_logprobs_entropy, token_logprobs_entropy

_STATUS = sirl_kernels.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"backend cpu unavailable: {_STATUS.reason}")

if _STATUS.available:
    from sirl_kernels.backends import cpu

FWD_TOL = {"rtol": 1e-5, "atol": 2e-5}


def _supported_isas():
    """Every ISA build this CPU runs, best first (set_isa caps at what the CPU supports)."""
    found = []
    for name in ("avx512", "avx2", "baseline"):
        got = cpu.set_isa(name)
        if got == name:
            found.append(name)
    cpu.set_isa("auto")
    return found


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def isa(request):
    if request.param not in _supported_isas():
        pytest.skip(f"this CPU does not run the {request.param} build")
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa("auto")


def _case(n, v, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype), torch.randint(0, v, (n,), generator=g)


def _check_logits(logits, labels, temperature=1.0, ignore_index=-100, seed=1):
    x = logits.detach().clone().requires_grad_(True)
    lp, h = token_logprobs_entropy(x, labels, temperature=temperature, ignore_index=ignore_index, backend="cpu")
    ref_lp, ref_h = reference_logprobs_entropy(logits, labels, temperature, ignore_index)
    torch.testing.assert_close(lp.double(), ref_lp, **FWD_TOL)
    torch.testing.assert_close(h.double(), ref_h, **FWD_TOL)
    g = torch.Generator().manual_seed(seed)
    g_lp, g_h = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    (lp * g_lp + h * g_h).sum().backward()
    ref = reference_grads(logits, labels, g_lp, g_h, temperature, ignore_index)
    torch.testing.assert_close(x.grad.double(), ref, **grad_tolerance(logits.dtype, ref))
    return lp, h, x.grad


# --- the building blocks --------------------------------------------------------------------------------------


def test_dispatch_picks_the_best_build():
    isas = _supported_isas()
    assert cpu.isa() == isas[0]
    assert "baseline" in isas
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        cpu.set_isa("sse9")


def test_env_var_caps_the_build():
    import os
    import subprocess
    import sys

    code = "import sirl_kernels.backends.cpu as c; print(c.isa())"
    for name in ("baseline", "avx2"):
        env = dict(os.environ, SIRL_KERNELS_CPU_ISA=name)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == (name if name in _supported_isas() else "baseline")


def test_library_checks_its_inputs_with_typed_one_line_errors():
    x = torch.randn(3, 10)
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="unit stride"):
        cpu.logits_forward(torch.randn(10, 3).t(), labels, 1.0, -100)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        cpu.logits_forward(x.double(), labels, 1.0, -100)
    with pytest.raises(ValueError, match=r"labels must be int64 \[3\]"):
        cpu.logits_forward(x, torch.tensor([0, 1]), 1.0, -100)
    # Checked in C++, reported through sirl_last_error():
    with pytest.raises(ValueError, match=r"^libsirl_cpu: sirl_logits_forward: temperature must be finite and > 0"):
        cpu.logits_forward(x, labels, -1.0, -100)
    with pytest.raises(ValueError, match="rows would overlap"):
        cpu.logits_forward(torch.randn(40).as_strided((3, 10), (5, 1)), labels, 1.0, -100)
    # Finite and > 0, yet (float)(1 / T) overflows: rejected by every entry point, never an inf scale.
    for entry in (cpu.logits_forward, cpu.reference_forward):
        with pytest.raises(ValueError, match=r"temperature 1e-39 is too small: 1 / temperature overflows float32"):
            entry(x, labels, 1e-39, -100)
    lp, h, stats = cpu.logits_forward(x, labels, 1.0, -100)
    with pytest.raises(ValueError, match=r"sirl_logits_backward: temperature .* overflows float32"):
        cpu.logits_backward(torch.ones(3), torch.ones(3), x, labels, stats, h, 1e-40, -100)
    wide = torch.randn(2, 20)  # in place, but the output rows 10 elements apart and the input rows 20
    with pytest.raises(ValueError, match="in-place backward .* needs grad_row_stride == row_stride"):
        cpu.logits_backward(torch.ones(2), torch.ones(2), wide[:, :10], labels[:2], stats[:2], h[:2], 1.0, -100,
                            out=wide.view(4, 10)[:2])


def test_bad_labels_give_nan_rows_never_an_error_or_a_wild_read():
    """Labels are never rejected by the library: outside [0, V) and not ignore_index gives NaN outputs, NaN stats and
    a NaN gradient row; the row is never indexed by that label (V + 10**12 would fault if it were)."""
    x = torch.randn(4, 10)
    labels = torch.tensor([3, 10**12, -7, -100])
    lp, h, stats = cpu.logits_forward(x, labels, 1.0, -100)
    assert torch.isnan(lp[1:3]).all() and torch.isnan(h[1:3]).all() and torch.isnan(stats[1:3]).all()
    assert float(lp[3]) == 0.0 and float(h[3]) == 0.0 and bool((stats[3] == 0).all())
    grad = cpu.logits_backward(torch.ones(4), torch.ones(4), x, labels, stats, h, 1.0, -100)
    assert torch.isnan(grad[1:3]).all() and bool((grad[3] == 0).all()) and torch.isfinite(grad[0]).all()


def test_library_is_torch_free():
    """libsirl_cpu.so needs nothing but the C runtime: no torch, no Python, no libstdc++ (linked in), no OpenMP."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run([readelf, "-d", str(cpu.library().path)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    assert needed <= {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2"}, needed


def _ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.float().abs()
    return (torch.nextafter(x, torch.full_like(x, math.inf)) - x).double()


@pytest.mark.parametrize("variant", [0, 1])
def test_vector_exp_accuracy(isa, variant):
    """<= 2 ulp wherever exp is a normal float; exactly 0 below the flush point and at -inf; inf above."""
    hi = 0.0 if variant else 88.72
    x = torch.cat(
        [
            torch.linspace(-104.0, hi, 300_001),
            torch.empty(200_000).uniform_(-20.0, min(hi, 20.0)),
            torch.tensor([0.0, -0.0, -1e-30, -math.inf, -1e30, -86.0, -87.0, -87.3]),
        ]
    ).float()
    if not variant:
        x = torch.cat([x, torch.tensor([1e-30, 88.0, 88.72, 88.73, 1e30, math.inf])])
    y = cpu.exp_hook(x, variant)
    want = x.double().exp()
    normal = want >= torch.finfo(torch.float32).tiny
    finite = want <= torch.finfo(torch.float32).max
    flush = -87.3 if variant else -86.6
    ok = normal & finite & (x >= flush)
    err = ((y.double() - want).abs() / _ulp(want))[ok]
    assert float(err.max()) <= 2.0, f"max error {float(err.max()):.3f} ulp"
    assert bool((y[x < flush] == 0).all()) and bool((y[x == -math.inf] == 0).all())
    if not variant:
        assert bool((y[x > 88.7229] == math.inf).all())
        assert torch.isnan(cpu.exp_hook(torch.tensor([math.nan]), 0)).all()


def test_forward_exp2_accuracy(isa):
    """The forward pass's base-2 exp (variant 2), for x = z - max <= 0.

    Rounding u = x log2(e) costs |x| 2^-24 of relative error on top of the polynomial's 2 ulp; every term is
    scaled so the row max contributes 1, so what matters is the absolute error, below 1 ulp of 1. Below 2^-126.5
    (x < -87.68), -inf included, a term is exactly 0; NaN propagates; exp(0) is exactly 1.
    """
    x = torch.cat(
        [
            torch.linspace(-100.0, 0.0, 300_001),
            torch.empty(200_000).uniform_(-20.0, 0.0),
            torch.tensor([0.0, -0.0, -1e-30, -math.inf, -1e30, -87.0, -87.6, -87.7, -88.0]),
        ]
    ).float()
    y = cpu.exp_hook(x, 2)
    want = x.double().exp()
    normal = want >= torch.finfo(torch.float32).tiny
    rel = (y.double() - want).abs() / want
    bound = 2.0 * _ulp(want) / want + x.double().abs() * 2.0**-22
    assert bool((rel[normal] <= bound[normal]).all()), f"worst excess {float((rel - bound)[normal].max()):.3g}"
    assert float((y.double() - want).abs().max()) < 2.0**-23
    assert bool((y[x < -87.69] == 0).all()) and bool((y[x == -math.inf] == 0).all())
    assert bool((y[x == 0] == 1).all())
    assert torch.isnan(cpu.exp_hook(torch.tensor([math.nan]), 2)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conversions_match_torch(isa, dtype):
    """Load (low precision -> fp32) and store (fp32 -> low precision, round to nearest even) are bit-exact with torch."""
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    up = cpu.convert_hook(every, torch.float32)
    ref_up = every.float()
    both_nan = up.isnan() & ref_up.isnan()
    assert bool(((up.view(torch.int32) == ref_up.view(torch.int32)) | both_nan).all())
    x = torch.cat([torch.randn(100_000) * 1000, torch.randn(100_000) * 1e-6, ref_up[~ref_up.isnan()]])
    x = torch.cat([x, (x.view(torch.int32) | 0x8000).view(torch.float32)])  # bf16 ties
    x = torch.cat([x, torch.tensor([65519.0, 65520.0, 1e10, -1e10, math.inf, -math.inf, 1e-8, -0.0])])
    down = cpu.convert_hook(x, dtype)
    nan = x.isnan()  # NaN stays NaN (the payload may differ from torch's vectorised cast)
    assert bool(down[nan].isnan().all())
    assert torch.equal(down[~nan].view(torch.int16), x[~nan].to(dtype).view(torch.int16))


# --- logits kernels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_build_matches_reference(isa, dtype):
    # V not a multiple of the vector width, nor of the 2048-element block; masked entries too.
    logits, labels = _case(7, 2048 * 3 + 5, dtype, seed=2)
    logits[2, ::7] = -math.inf
    labels[2] = 1
    labels[5] = -100
    _check_logits(logits, labels, temperature=0.8)


@pytest.mark.parametrize("v", [1, 15, 16, 17, 2047, 2049, 100_003])
def test_vocab_sizes(v):
    logits, labels = _case(3, v, seed=v)
    _check_logits(logits, labels)


def test_builds_agree_closely():
    logits, labels = _case(9, 30_001, torch.bfloat16, seed=4)
    outs = {}
    for name in _supported_isas():
        cpu.set_isa(name)
        outs[name] = cpu.logits_forward(logits, labels, 1.0, -100)
    cpu.set_isa("auto")
    first = next(iter(outs.values()))
    for out in outs.values():
        for a, b in zip(first, out):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_forward_pairs_with_any_backward_of_the_library(dtype):
    """Every forward and backward entry point of libsirl_cpu keeps the row stats in ONE unit (c_api.h: the max of the
    raw logits, then log sumexp): the stats of any ISA build's forward or of the scalar reference, fed to any other
    one's backward, give the float64 reference's gradient. At T = 0.7 with logits near 20, a forward storing the
    max of z = x / T where its backward reads the raw max (or the reverse) shifts every log p by max (1/T - 1)."""
    temperature = 0.7
    logits, labels = _case(6, 3001, dtype, seed=12)
    logits = logits + 20.0
    logits[1, ::5] = -math.inf
    labels[4] = -100
    g = torch.Generator().manual_seed(13)
    g_lp, g_h = torch.randn(6, generator=g), torch.randn(6, generator=g)
    ref = reference_grads(logits, labels, g_lp, g_h, temperature, -100)
    ref_lp, ref_h = reference_logprobs_entropy(logits, labels, temperature, -100)
    tol = grad_tolerance(dtype, ref)

    def isa_forward(name):
        cpu.set_isa(name)
        return cpu.logits_forward(logits, labels, temperature, -100)

    def isa_backward(name, stats, h):
        cpu.set_isa(name)
        return cpu.logits_backward(g_lp, g_h, logits, labels, stats, h, temperature, -100)

    forwards = {"reference": cpu.reference_forward(logits, labels, temperature, -100)}
    forwards.update((name, isa_forward(name)) for name in _supported_isas())
    try:
        for fwd, (lp, h, stats) in forwards.items():
            torch.testing.assert_close(lp.double(), ref_lp, **FWD_TOL, msg=lambda m, fwd=fwd: f"{fwd}: {m}")
            torch.testing.assert_close(h.double(), ref_h, **FWD_TOL, msg=lambda m, fwd=fwd: f"{fwd}: {m}")
            grads = {"reference": cpu.reference_backward(g_lp, g_h, logits, labels, stats, h, temperature, -100)}
            grads.update((name, isa_backward(name, stats, h)) for name in _supported_isas())
            for bwd, grad in grads.items():
                torch.testing.assert_close(grad.double(), ref, **tol,
                                           msg=lambda m, fwd=fwd, bwd=bwd: f"forward {fwd}, backward {bwd}: {m}")
    finally:
        cpu.set_isa("auto")


def test_row_stride_larger_than_v_and_zero():
    wide, labels = _case(6, 5000, seed=5)
    _check_logits(wide[:, 1000:4001], labels % 3001)  # stride(0) = 5000 > V = 3001, offset storage
    row = wide[:1, :4000].expand(5, 4000)  # stride(0) = 0: every row is the same memory
    assert row.stride(0) == 0
    lp, h, stats = cpu.logits_forward(row, labels[:5] % 4000, 1.0, -100)
    assert bool((stats == stats[0]).all()) and bool((h == h[0]).all())
    ref_lp, ref_h = reference_logprobs_entropy(row, labels[:5] % 4000)
    torch.testing.assert_close(lp.double(), ref_lp, **FWD_TOL)


def test_in_place_backward_equals_out_of_place(isa):
    logits, labels = _case(4, 3001, torch.bfloat16, seed=6)
    labels[2] = -100
    lp, h, stats = cpu.logits_forward(logits, labels, 1.3, -100)
    g_lp, g_h = torch.randn(4), torch.randn(4)
    expected = cpu.logits_backward(g_lp, g_h, logits, labels, stats, h, 1.3, -100)
    buf = logits.clone()
    assert cpu.logits_backward(g_lp, g_h, buf, labels, stats, h, 1.3, -100, out=buf) is buf
    assert torch.equal(buf.view(torch.int16), expected.view(torch.int16))


def test_threads_do_not_change_results():
    logits, labels = _case(37, 20_011, torch.float32, seed=7)
    g_lp, g_h = torch.randn(37), torch.randn(37)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            lp, h, stats = cpu.logits_forward(logits, labels, 1.0, -100)
            grad = cpu.logits_backward(g_lp, g_h, logits, labels, stats, h, 1.0, -100)
            outs.append((lp, h, stats, grad))
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        for a, b in zip(outs[0], out):
            assert torch.equal(a, b)


def test_special_values():
    v = 3000
    logits = torch.randn(6, v)
    logits[0, 1:] = -math.inf  # one finite entry
    logits[1, :] = -math.inf  # all -inf: NaN like PyTorch
    logits[2, 5] = math.nan
    logits[3] = logits[3] * 1e30  # huge
    logits[4, :2048] = -math.inf  # an all -inf block followed by finite ones
    logits[5] = 0.0
    labels = torch.tensor([0, 3, 2, int(logits[3].argmax()), 2100, 7])
    lp, h, _ = cpu.logits_forward(logits, labels, 1.0, -100)
    assert float(lp[0]) == 0.0 and float(h[0]) == 0.0
    assert math.isnan(float(h[1])) and math.isnan(float(lp[1]))
    assert math.isnan(float(lp[2])) and math.isnan(float(h[2]))
    ref_lp, ref_h = reference_logprobs_entropy(logits[3:], labels[3:])
    torch.testing.assert_close(lp[3:].double(), ref_lp, **FWD_TOL)
    torch.testing.assert_close(h[3:].double(), ref_h, **FWD_TOL)
    _check_logits(logits[[0, 3, 4, 5]], labels[[0, 3, 4, 5]])


def test_int64_row_offsets():
    """Row 1 starts 2**31 + 64 elements after row 0 (int32 offsets would wrap); the storage is only reserved."""
    v, stride = 64, 2**31 + 64
    storage = torch.empty(stride + v, dtype=torch.bfloat16)
    logits = storage.as_strided((2, v), (stride, 1))
    logits.copy_(torch.randn(2, v).to(torch.bfloat16))
    labels = torch.tensor([3, 60])
    dense = logits.clone()
    lp, h, stats = cpu.logits_forward(logits, labels, 1.0, -100)
    ref = cpu.logits_forward(dense, labels, 1.0, -100)
    for a, b in zip((lp, h, stats), ref):
        assert torch.equal(a, b)
    g = torch.ones(2)
    grad = cpu.logits_backward(g, g, logits, labels, stats, h, 1.0, -100)
    dense_grad = cpu.logits_backward(g, g, dense, labels, stats, h, 1.0, -100)
    assert torch.equal(grad.view(torch.int16), dense_grad.view(torch.int16))
    del storage, logits


# --- fused linear ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_chunking(dtype, chunk_size, with_bias):
    g = torch.Generator().manual_seed(8)
    n, d, v = 23, 32, 1037
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    params = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    lp, h = linear_token_logprobs_entropy(
        params[0], params[1], labels, bias=params[2] if with_bias else None, temperature=0.9, backend="cpu",
        chunk_size=chunk_size,
    )
    ref_lp, ref_h = reference_linear(hidden, weight, labels, bias, temperature=0.9)
    tol = FWD_TOL if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(lp.double(), ref_lp, **tol)
    torch.testing.assert_close(h.double(), ref_h, **tol)
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (lp * g_lp + h * g_h).sum().backward()
    # Against the "torch" backend: the same chunked math, so agreement is to rounding.
    refs = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    lp_t, h_t = linear_token_logprobs_entropy(
        refs[0], refs[1], labels, bias=refs[2] if with_bias else None, temperature=0.9, backend="torch",
        chunk_size=chunk_size,
    )
    (lp_t * g_lp + h_t * g_h).sum().backward()
    for mine, theirs in zip(params, refs):
        assert mine.grad.dtype == dtype
        scale = float(theirs.grad.double().abs().max())
        if dtype == torch.float32:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
        else:
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(
                mine.grad.double(), theirs.grad.double(), rtol=4 * eps, atol=4 * eps * max(scale, 1e-3)
            )
