"""Tests specific to the C++ CPU backend (csrc/cpu, libsirl_cpu.so): vector exp, dtype conversions, ISA builds,
strides, threads, int64 offsets, the C ABI's argument checks and the fused-linear chunking, against float64 PyTorch
references."""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess

import pytest
import torch
from reference_impl import grad_tolerance, reference_grads, reference_linear, reference_logprobs_entropy

import sirl_kernels
from cpu_isas import isa, supported_isas  # noqa: F401 (isa: a fixture)
from sirl_kernels import linear_token_logprobs_entropy, token_logprobs_entropy
from sirl_kernels.backends.rows import Coefficients, LinearRows, Rows, logprob_entropy_coefficients

_STATUS = sirl_kernels.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"backend cpu unavailable: {_STATUS.reason}")

if _STATUS.available:
    from sirl_kernels.backends import cpu

FWD_TOL = {"rtol": 1e-5, "atol": 2e-5}


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
    isas = supported_isas()
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
        assert out.stdout.strip() == (name if name in supported_isas() else "baseline")


def test_library_checks_its_inputs_with_typed_one_line_errors():
    x = torch.randn(3, 10)
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="unit stride"):
        cpu.logits_forward(Rows(torch.randn(10, 3).t(), labels, 1.0, -100))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        cpu.logits_forward(Rows(x.double(), labels, 1.0, -100))
    with pytest.raises(ValueError, match=r"labels must be int64 \[3\]"):
        cpu.logits_forward(Rows(x, torch.tensor([0, 1]), 1.0, -100))
    # Checked in C++, reported through sirl_last_error():
    with pytest.raises(ValueError, match=r"^libsirl_cpu: sirl_logits_forward: temperature must be finite and > 0"):
        cpu.logits_forward(Rows(x, labels, -1.0, -100))
    with pytest.raises(ValueError, match="rows would overlap"):
        cpu.logits_forward(Rows(torch.randn(40).as_strided((3, 10), (5, 1)), labels, 1.0, -100))
    # Finite and > 0, yet (float)(1 / T) overflows: rejected by every entry point, never an inf scale.
    for entry in (cpu.logits_forward, cpu.reference_forward):
        with pytest.raises(ValueError, match=r"temperature 1e-39 is too small: 1 / temperature overflows float32"):
            entry(Rows(x, labels, 1e-39, -100))
    lp, h, stats = cpu.logits_forward(Rows(x, labels, 1.0, -100))
    with pytest.raises(ValueError, match=r"sirl_logits_backward: temperature .* overflows float32"):
        cpu.logits_backward(Rows(x, labels, 1e-40, -100), stats, Coefficients(*torch.ones(3, 3)))
    wide = torch.randn(2, 20)  # in place, but the output rows 10 elements apart and the input rows 20
    with pytest.raises(ValueError, match="in-place backward .* needs grad_row_stride == row_stride"):
        cpu.logits_backward(Rows(wide[:, :10], labels[:2], 1.0, -100), stats[:2], Coefficients(*torch.ones(3, 2)),
                            out=wide.view(4, 10)[:2])


def test_bad_labels_give_nan_rows_never_an_error_or_a_wild_read():
    """Labels are never rejected by the library: outside [0, V) and not ignore_index gives NaN outputs, NaN stats and
    a NaN gradient row; the row is never indexed by that label (V + 10**12 would fault if it were)."""
    x = torch.randn(4, 10)
    labels = torch.tensor([3, 10**12, -7, -100])
    lp, h, stats = cpu.logits_forward(Rows(x, labels, 1.0, -100))
    assert torch.isnan(lp[1:3]).all() and torch.isnan(h[1:3]).all() and torch.isnan(stats[1:3]).all()
    assert float(lp[3]) == 0.0 and float(h[3]) == 0.0 and bool((stats[3] == 0).all())
    grad = cpu.logits_backward(Rows(x, labels, 1.0, -100), stats, Coefficients(*torch.ones(3, 4)))
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
    for name in supported_isas():
        cpu.set_isa(name)
        outs[name] = cpu.logits_forward(Rows(logits, labels, 1.0, -100))
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
        return cpu.logits_forward(Rows(logits, labels, temperature, -100))

    def isa_backward(name, stats, h):
        cpu.set_isa(name)
        return cpu.logits_backward(Rows(logits, labels, temperature, -100), stats,
                                   logprob_entropy_coefficients(g_lp, g_h, h))

    forwards = {"reference": cpu.reference_forward(Rows(logits, labels, temperature, -100))}
    forwards.update((name, isa_forward(name)) for name in supported_isas())
    try:
        for fwd, (lp, h, stats) in forwards.items():
            torch.testing.assert_close(lp.double(), ref_lp, **FWD_TOL, msg=lambda m, fwd=fwd: f"{fwd}: {m}")
            torch.testing.assert_close(h.double(), ref_h, **FWD_TOL, msg=lambda m, fwd=fwd: f"{fwd}: {m}")
            coef = logprob_entropy_coefficients(g_lp, g_h, h)
            grads = {"reference": cpu.reference_backward(Rows(logits, labels, temperature, -100), stats, coef)}
            grads.update((name, isa_backward(name, stats, h)) for name in supported_isas())
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
    lp, h, stats = cpu.logits_forward(Rows(row, labels[:5] % 4000, 1.0, -100))
    assert bool((stats == stats[0]).all()) and bool((h == h[0]).all())
    ref_lp, ref_h = reference_logprobs_entropy(row, labels[:5] % 4000)
    torch.testing.assert_close(lp.double(), ref_lp, **FWD_TOL)


def test_in_place_backward_equals_out_of_place(isa):
    logits, labels = _case(4, 3001, torch.bfloat16, seed=6)
    labels[2] = -100
    lp, h, stats = cpu.logits_forward(Rows(logits, labels, 1.3, -100))
    g_lp, g_h = torch.randn(4), torch.randn(4)
    coef = logprob_entropy_coefficients(g_lp, g_h, h)
    expected = cpu.logits_backward(Rows(logits, labels, 1.3, -100), stats, coef)
    buf = logits.clone()
    assert cpu.logits_backward(Rows(buf, labels, 1.3, -100), stats, coef, out=buf) is buf
    assert torch.equal(buf.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["random", "lam0", "alpha_only"])
def test_backward_form_with_arbitrary_coefficients(isa, dtype, kind):
    """The backward form of backends/rows.py with arbitrary per-row (alpha, beta, lam), not only those of an upstream
    (g_lp, g_H): every ISA build and the header's reference against float64 from log_softmax, within a bound derived
    from fp32 rounding; -inf columns exactly 0 (a label there gets exactly lam / T), ignored rows exactly 0."""
    n, v, temperature = 9, 3001, 0.7
    logits, labels = _case(n, v, dtype, seed=21)
    logits[1, ::7] = -math.inf
    logits[2, ::5] = -math.inf
    labels[2] = 10  # the label on a -inf column: p_y = 0
    labels[4] = -100
    logits[6] = logits[6] * 12  # a wide row: p underflows (and is flushed) for most columns
    g = torch.Generator().manual_seed(22)
    alpha, beta, lam = (torch.randn(n, generator=g) * 3 for _ in range(3))
    if kind != "random":
        lam.zero_()
    if kind == "alpha_only":
        beta.zero_()
    coef = Coefficients(alpha, beta, lam)
    _, _, stats = cpu.logits_forward(Rows(logits, labels, temperature, -100))

    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = logp.exp()
    finite_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    a, b, lm = (c.double()[:, None] for c in coef[:3])
    is_label = torch.zeros(n, v, dtype=torch.bool)
    valid = labels != -100
    is_label[valid.nonzero()[:, 0], labels[valid]] = True
    ref = (torch.where(p > 0, p * (a + b * finite_logp), torch.zeros_like(p)) + lm * is_label) / temperature
    ref[~valid] = 0.0
    # The bound: log p in fp32 is (x - max) / T - log_sum, off by a few ulp of |log p| + |log_sum| and by the
    # forward's sum (log_sum to ~32 ulp of 1); p = exp(log p) inherits that absolute error as a relative one and adds
    # ~2 ulp of its own; the coefficient arithmetic rounds a few times relative to p (|alpha| + |beta log p|) and
    # lam; probabilities below 2^-120 may be flushed to 0 entirely. The output's own rounding is relative (rtol).
    eps = torch.finfo(torch.float32).eps
    log_sum = stats[:, 1].double().abs()[:, None]
    d_logp = eps * (finite_logp.abs() + 2 * log_sum + 32)
    term = p * (a.abs() + b.abs() * finite_logp.abs() + lm.abs() * is_label)
    bound = (term * (d_logp + 4 * eps) + p * b.abs() * d_logp + 4 * eps * (term + lm.abs() * is_label)) / temperature
    bound = 2 * bound + torch.where(p < 2.0**-120, term / temperature, torch.zeros_like(p))
    rtol = torch.finfo(dtype).eps
    for entry in (cpu.logits_backward, cpu.reference_backward):
        grad = entry(Rows(logits, labels, temperature, -100), stats, coef)
        err = (grad.double() - ref).abs()
        ratio = err / (bound + rtol * ref.abs()).clamp_min(torch.finfo(torch.float64).tiny)
        assert bool((ratio <= 1).all()), f"{entry.__name__}: error {float(ratio.max()):.3g} x the bound"
        assert bool((grad[~valid] == 0).all()), "ignored rows get exactly 0 whatever the coefficients"
        ninf = torch.isinf(logits) & ~is_label
        assert bool((grad[ninf] == 0).all()), "-inf columns get exactly 0"
        exact = (lam[2] * torch.tensor(1.0 / temperature, dtype=torch.float32)).to(dtype)  # lam (1/T), in fp32
        assert float(grad[2, 10]) == float(exact), "a label with p_y = 0 gets exactly lam / T"


def test_threads_do_not_change_results():
    logits, labels = _case(37, 20_011, torch.float32, seed=7)
    g_lp, g_h = torch.randn(37), torch.randn(37)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            lp, h, stats = cpu.logits_forward(Rows(logits, labels, 1.0, -100))
            grad = cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats,
                                       logprob_entropy_coefficients(g_lp, g_h, h))
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
    lp, h, _ = cpu.logits_forward(Rows(logits, labels, 1.0, -100))
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
    lp, h, stats = cpu.logits_forward(Rows(logits, labels, 1.0, -100))
    ref = cpu.logits_forward(Rows(dense, labels, 1.0, -100))
    for a, b in zip((lp, h, stats), ref):
        assert torch.equal(a, b)
    g = torch.ones(2)
    grad = cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats, logprob_entropy_coefficients(g, g, h))
    dense_grad = cpu.logits_backward(Rows(dense, labels, 1.0, -100), stats, logprob_entropy_coefficients(g, g, h))
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


# --- self-certainty and varentropy (the forward's optional outputs) and the backward's gamma / delta terms --------
from sirl_kernels.backends.rows import Extras  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _extras_case(v, dtype, seed=31):
    """Adversarial rows: random, NaN, +inf, some -inf (self-certainty +inf), all -inf, a common offset of 1e4, an
    ignored row, a wide row (p flushed for most columns), a label outside [0, V) (the unchecked path), and, for long
    rows, a whole first block (2048 columns) of -inf."""
    n = 10
    logits, labels = _case(n, v, torch.float32, seed=seed)
    if v > 1:
        logits[1, v // 2] = math.nan
        logits[2, v // 3] = math.inf
        logits[3, ::3] = -math.inf
        logits[3, 1] = 0.5  # a finite column at least
    else:
        logits[1, 0], logits[2, 0] = math.nan, math.inf
    logits[4] = -math.inf
    logits[5] += 1e4
    labels[6] = -100
    logits[7] *= 12
    labels[8] = v + 5
    if v > 2048:
        logits[9, :2048] = -math.inf
    logits = logits.to(dtype)
    labels[3] = 1 if v > 1 else 0  # a finite column
    return logits, labels


def _extras_reference(logits, labels, temperature, ignore_index=-100):
    """float64 self-certainty and varentropy from log_softmax: SC = logsumexp(z) - mean(z) - log V,
    VE = sum p L^2 - H^2; and the scales their fp32 error bounds use (mean |d|, E_p[d^2], E_p[d]^2, d = z - max)."""
    z = logits.double() / temperature
    v = z.shape[-1]
    lse = torch.logsumexp(z, dim=-1)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    pos = p > 0
    L = torch.where(pos, logp, torch.zeros_like(logp))
    h = -(p * L).sum(-1)
    ve = (p * L * L).sum(-1) - h * h
    sc = lse - z.mean(-1) - math.log(v)
    bad = ~torch.isfinite(lse)  # NaN, +inf, all -inf rows
    ve[bad] = math.nan
    sc[bad] = math.nan
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    sc = torch.where(valid, torch.where(in_range, sc, math.nan), 0.0)
    ve = torch.where(valid, torch.where(in_range, ve, math.nan), 0.0)
    m = z.max(-1, keepdim=True).values
    d = torch.where(torch.isfinite(z), z - m, torch.zeros_like(z))
    mean_abs_d = d.abs().mean(-1)
    ed = (p * d).sum(-1)
    ed2 = (p * d * d).sum(-1)
    return sc, ve, dict(mean_abs_d=mean_abs_d, lse_shift=(lse - m[:, 0]).abs(), ed=ed, ed2=ed2, vocab=v)


def _assert_extras_close(sc, ve, ref_sc, ref_ve, scales, what):
    """Bounds from fp32 rounding. The kernels sum lane-wise: chains of up to 2048 / lanes = 512 terms per block,
    merged pairwise, and each term d = (x - max) / T carries one rounding (eps |d|). A chain of k same-sign terms
    rounds to within k eps of its sum in the worst case (512 eps), ~sqrt(k) eps (about 16-22 eps) with random-sign
    roundings; quantized rows (fp16 at an offset of 1e4: a few distinct values of d) round systematically, so the
    factor used is 64: mean(d) = dsum / V within 64 eps mean|d|, log sumexp within 16 eps plus a few ulp of the
    shift lse - max, log V a few ulp. Varentropy = q/s - (w/s)^2 cancels: q/s and (w/s)^2 each carry the same chain
    factor relative (plus the exp polynomial's ~2 ulp), so the error is ~64 eps (E_p[d^2] + E_p[d]^2 + 1). Measured:
    at most ~1/4 of these bounds over the ISA builds and dtypes."""
    v = math.log(scales["vocab"])
    sc_tol = EPS32 * (16 + 2 * v + 64 * scales["mean_abs_d"] + 4 * scales["lse_shift"])
    ve_tol = 64 * EPS32 * (scales["ed2"] + scales["ed"] ** 2 + 1)
    for got, want, tol, name in ((sc, ref_sc, sc_tol, "self_certainty"), (ve, ref_ve, ve_tol, "varentropy")):
        got = got.double()
        same_nan = torch.isnan(got) == torch.isnan(want)
        assert bool(same_nan.all()), f"{what} {name}: NaN rows differ: {got} vs {want}"
        inf = torch.isinf(want)
        assert bool((got[inf] == want[inf]).all()), f"{what} {name}: inf rows differ: {got} vs {want}"
        fin = torch.isfinite(want)
        err = (got[fin] - want[fin]).abs()
        bound = tol[fin].nan_to_num(0.0) + 4 * EPS32 * want[fin].abs()
        assert bool((err <= bound).all()), f"{what} {name}: error {err} > bound {bound}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("v", [1, 7, 3001, 4099])
def test_forward_self_certainty_and_varentropy(isa, dtype, temperature, v):
    logits, labels = _extras_case(v, dtype)
    ref_sc, ref_ve, scales = _extras_reference(logits, labels, temperature)
    n = logits.shape[0]
    plain = cpu.logits_forward(Rows(logits, labels, temperature, -100))
    for entry in (cpu.logits_forward, cpu.reference_forward):
        sc, ve = torch.full((n,), 123.0), torch.full((n,), 123.0)
        out = entry(Rows(logits, labels, temperature, -100), extras=Extras(sc, ve))
        _assert_extras_close(sc, ve, ref_sc, ref_ve, scales, f"{entry.__name__} {isa}")
        if entry is cpu.logits_forward:
            # the plain outputs of the specialised instantiation: the plain kernel's, up to rounding
            for a, b in zip(out, plain):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    # one of the two alone
    sc = torch.empty(n)
    cpu.logits_forward(Rows(logits, labels, temperature, -100), extras=Extras(sc, None))
    _assert_extras_close(sc, ref_ve.clone(), ref_sc, ref_ve, scales, "self_certainty alone")
    ve = torch.empty(n)
    cpu.logits_forward(Rows(logits, labels, temperature, -100), extras=Extras(None, ve))
    _assert_extras_close(ref_sc.clone(), ve, ref_sc, ref_ve, scales, "varentropy alone")


def test_extras_rows_and_threads_and_strided_outputs():
    """Ignored rows exactly 0, out-of-range labels NaN; the thread count changes nothing; a strided output view is
    filled through a dense buffer."""
    logits, labels = _case(64, 5003, torch.float32, seed=41)
    labels[3] = -100
    labels[4] = -7
    out = torch.empty(64, 2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Extras(torch.empty(64), torch.empty(64))
        cpu.logits_forward(Rows(logits, labels, 0.8, -100), extras=one)
        torch.set_num_threads(max(2, old))
        cpu.logits_forward(Rows(logits, labels, 0.8, -100), extras=Extras(out[:, 0], out[:, 1]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[:, 0], one.self_certainty) or torch.allclose(out[:, 0], one.self_certainty, equal_nan=True)
    assert torch.equal(out[:, 1].nan_to_num(7.0), one.varentropy.nan_to_num(7.0))
    assert float(one.self_certainty[3]) == 0.0 and float(one.varentropy[3]) == 0.0
    assert math.isnan(float(one.self_certainty[4])) and math.isnan(float(one.varentropy[4]))


def _terms_reference(logits, labels, coef, temperature, ignore_index=-100):
    """float64 dx of the backward form with gamma and delta, and its fp32 error bound (test_backward_form_with_
    arbitrary_coefficients' bound, with gamma L^2 in the terms and its derivative 2 gamma L in the log p error's
    propagation; delta adds a relative rounding)."""
    n, v = logits.shape
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = logp.exp()
    L = torch.where(p > 0, logp, torch.zeros_like(logp))
    a, b, lm, gm, dl = (c.double()[:, None] for c in coef)
    is_label = torch.zeros(n, v, dtype=torch.bool)
    valid = labels != ignore_index
    is_label[valid.nonzero()[:, 0], labels[valid]] = True
    poly = torch.where(p > 0, p * (a + b * L + gm * L * L), torch.zeros_like(p))
    ref = (poly + dl + lm * is_label) / temperature
    ref[~valid] = 0.0
    return ref, p, L, is_label, valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["both", "gamma", "delta"])
def test_backward_with_gamma_and_delta(isa, dtype, which):
    n, v, temperature = 9, 3001, 0.5
    logits, labels = _case(n, v, dtype, seed=51)
    logits[1, ::7] = -math.inf
    logits[2, ::5] = -math.inf
    labels[2] = 10  # the label on a -inf column
    labels[4] = -100
    logits[6] = logits[6] * 12
    g = torch.Generator().manual_seed(52)
    alpha, beta, lam, gamma, delta = (torch.randn(n, generator=g) * 3 for _ in range(5))
    coef = Coefficients(alpha, beta, lam, gamma if which != "delta" else None, delta if which != "gamma" else None)
    _, _, stats = cpu.logits_forward(Rows(logits, labels, temperature, -100))
    full = Coefficients(alpha, beta, lam, gamma if coef.gamma is not None else torch.zeros(n),
                        delta if coef.delta is not None else torch.zeros(n))
    ref, p, L, is_label, valid = _terms_reference(logits, labels, full, temperature)
    a, b, lm, gm, dl = (c.double()[:, None].abs() for c in full)
    log_sum = stats[:, 1].double().abs()[:, None]
    d_logp = EPS32 * (L.abs() + 2 * log_sum + 32)
    term = p * (a + b * L.abs() + gm * L * L + lm * is_label)
    slope = p * (b + 2 * gm * L.abs())
    bound = (term * (d_logp + 4 * EPS32) + slope * d_logp + 4 * EPS32 * (term + dl + lm * is_label)) / temperature
    bound = 2 * bound + torch.where(p < 2.0**-120, term / temperature, torch.zeros_like(p))
    rtol = torch.finfo(dtype).eps
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    for entry in (cpu.logits_backward, cpu.reference_backward):
        grad = entry(Rows(logits, labels, temperature, -100), stats, coef)
        err = (grad.double() - ref).abs()
        ratio = err / (bound + rtol * ref.abs()).clamp_min(torch.finfo(torch.float64).tiny)
        assert bool((ratio <= 1).all()), f"{entry.__name__}: error {float(ratio.max()):.3g} x the bound"
        assert bool((grad[~valid] == 0).all()), "ignored rows get exactly 0"
        ninf = torch.isinf(logits) & ~is_label
        want = (full.delta[:, None] * inv_t).expand(n, v).to(dtype)
        assert torch.equal(grad[ninf], want[ninf]), "-inf columns get exactly delta / T"
        exact = ((lam[2] + full.delta[2]) * inv_t).to(dtype)
        assert float(grad[2, 10]) == float(exact), "a label with p_y = 0 gets (lam + delta) / T"
    # in place equals out of place
    expected = cpu.logits_backward(Rows(logits, labels, temperature, -100), stats, coef)
    buf = logits.clone()
    cpu.logits_backward(Rows(buf, labels, temperature, -100), stats, coef, out=buf)
    assert torch.equal(buf.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_backward_with_bad_labels_and_absent_terms():
    """Out-of-range labels: NaN rows with the terms too; zero gamma / delta tensors give the plain kernel's result."""
    logits, labels = _case(5, 1001, torch.float32, seed=61)
    labels[1] = 5000
    _, h, stats = cpu.logits_forward(Rows(logits, labels, 1.0, -100))
    coef = logprob_entropy_coefficients(torch.randn(5), torch.randn(5), h)
    plain = cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef)
    zeros = Coefficients(*coef[:3], torch.zeros(5), torch.zeros(5))
    with_terms = cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats, zeros)
    assert bool(torch.isnan(with_terms[1]).all()) and bool(torch.isnan(plain[1]).all())
    ok = torch.ones(5, dtype=torch.bool)
    ok[1] = False
    torch.testing.assert_close(with_terms[ok], plain[ok], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_self_certainty_varentropy_gradient_matches_autograd(isa, temperature):
    """The coefficients of g_SC * SC + g_VE * VE (rows.py: alpha = g_SC + g_VE (2H + H^2 - VE),
    beta = 2 g_VE (1 + H), gamma = g_VE, delta = -g_SC / V, lam = 0), with H and VE from the kernel's forward, give
    the gradient torch autograd takes of the float64 reference."""
    n, v = 6, 777
    logits, labels = _case(n, v, torch.float32, seed=71, scale=2.0)
    g = torch.Generator().manual_seed(72)
    g_sc, g_ve = torch.randn(n, generator=g), torch.randn(n, generator=g)
    sc, ve = torch.empty(n), torch.empty(n)
    _, h, stats = cpu.logits_forward(Rows(logits, labels, temperature, -100), extras=Extras(sc, ve))
    coef = Coefficients(g_sc + g_ve * (2 * h + h * h - ve), 2 * g_ve * (1 + h), torch.zeros(n), g_ve.clone(),
                        -g_sc / v)
    grad = cpu.logits_backward(Rows(logits, labels, temperature, -100), stats, coef)

    x = logits.double().requires_grad_(True)
    z = x / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    ref_h = -(p * logp).sum(-1)
    ref_ve = (p * logp * logp).sum(-1) - ref_h**2
    ref_sc = torch.logsumexp(z, -1) - z.mean(-1) - math.log(v)
    (g_sc.double() * ref_sc + g_ve.double() * ref_ve).sum().backward()
    scale = x.grad.abs().max(dim=-1, keepdim=True).values
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-4, atol=float(1e-5 * scale.max()))
    torch.testing.assert_close(sc.double(), ref_sc.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ve.double(), ref_ve.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_linear_forward_fills_extras_chunk_by_chunk(chunk_size):
    """The chunked fused-linear forward hands each chunk's rows of the extras to the kernel: the same values as the
    logits forward over the whole logits."""
    g = torch.Generator().manual_seed(81)
    hidden, weight = torch.randn(13, 32, generator=g), torch.randn(501, 32, generator=g)
    labels = torch.randint(0, 501, (13,), generator=g)
    labels[2] = -100
    sc, ve = torch.empty(13), torch.empty(13)
    cpu.linear_forward(LinearRows(hidden, weight, None, labels, 0.9, -100), chunk_size, extras=Extras(sc, ve))
    want = Extras(torch.empty(13), torch.empty(13))
    cpu.logits_forward(Rows(hidden @ weight.t(), labels, 0.9, -100), extras=want)
    torch.testing.assert_close(sc, want.self_certainty, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ve, want.varentropy, rtol=1e-5, atol=1e-5)


def test_misaligned_extras_and_terms_are_rejected():
    """The C ABI checks the new optional pointers like the others (4-byte aligned fp32; null means absent)."""
    logits, labels = _case(3, 17, torch.float32, seed=91)
    lib = cpu.library()
    buf = torch.empty(8, dtype=torch.uint8)
    bad = buf.data_ptr() + (1 if buf.data_ptr() % 4 == 0 else 0)
    from sirl_kernels import _native

    outs = [torch.empty(3), torch.empty(3), torch.empty(3, 2)]
    rows = _native._rows(Rows(logits, labels, 1.0, -100))
    args = _native.ForwardArgs(rows, *(t.data_ptr() for t in outs), bad, None)
    with pytest.raises(ValueError, match="self_certainty or varentropy is not 4-byte aligned"):
        lib.call("sirl_logits_forward", ctypes.byref(args), ctypes.byref(_native.Launch()))
    coefs = [torch.zeros(3) for _ in range(3)]
    grad = torch.empty_like(logits)
    bargs = _native.BackwardArgs(rows, outs[2].data_ptr(), *(c.data_ptr() for c in coefs), grad.data_ptr(), 17,
                                 None, bad)
    with pytest.raises(ValueError, match="gamma or delta is not 4-byte aligned"):
        lib.call("sirl_logits_backward", ctypes.byref(bargs), ctypes.byref(_native.Launch()))
