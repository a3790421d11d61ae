"""The batch-invariant logits matmul of the CPU backend (``cpu.fixed_order_logits``, csrc/cpu/fixed_order_logits.inc):
accuracy against float64 PyTorch, bit-exact agreement with a scalar model of the documented order, and bitwise
invariance to the batch (rows around a row, its position), the thread count and the ISA build's blocking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sirl_kernels
from cpu_isas import isa, supported_isas  # noqa: F401 (isa: a fixture)

_STATUS = sirl_kernels.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"backend cpu unavailable: {_STATUS.reason}")

if _STATUS.available:
    from sirl_kernels.backends import cpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def threads():
    """torch.set_num_threads(n) inside the test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _logits(hidden, weight):
    out = torch.empty(hidden.shape[0], weight.shape[0])
    return cpu.fixed_order_logits(out, hidden, weight)


def _check_accuracy(out, hidden, weight):
    """Against float64: a sequential fp32 sum of D products (one rounding each for the FMA, or two for multiply +
    add on the baseline build) has |error| <= gamma_{D+1} * sum_d |h_d w_d| with gamma_k = k u / (1 - k u),
    u = 2^-24 (Higham, Accuracy and Stability, eq. 3.5); the inputs are converted to fp32 exactly, so that is the
    whole error. We allow (D + 2) u sum |h_d w_d| (and 1e-30 for all-zero rows)."""
    h, w = hidden.double(), weight.double()
    ref = h @ w.T
    bound = (h.abs() @ w.abs().T) * ((hidden.shape[1] + 2) * 2.0**-24) + 1e-30
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, max err / bound {(err / bound).max():.3g}"


# ---- a scalar model of the documented order, in numpy (exact) ----------------------------------------------------
def _fma_f32(a, b, c):
    """fma(a, b, c) of float32 arrays, correctly rounded to float32. a * b is exact in float64 (24 + 24 bits); the
    float64 sum s = a b + c and its error e (TwoSum, exact) give a b + c = s + e exactly. Rounding s to float32 is
    then correct unless s is exactly the midpoint between two float32 values and e != 0 (any other double is at
    least one double ulp from a float32 midpoint and |e| <= half an ulp): there the result is the neighbour on e's
    side. (Normal-range values only: the test data never produce float32 subnormals.)"""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    toward = np.nextafter(r, np.where(e > 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    mid = (r.astype(np.float64) + toward.astype(np.float64)) / 2  # exact
    return np.where((e != 0) & (s == mid), toward, r)


def _scalar_model(hidden, weight, isa_name):
    """out[n, v] in the documented order: acc = +0, then for d = 0..D-1 acc = fma(h[n, d], w[v, d], acc) (AVX2,
    AVX-512), or acc = acc + fp32(h[n, d] w[v, d]) (baseline: no FMA instruction)."""
    h = hidden.float().numpy()[:, None, :]
    w = weight.float().numpy()[None, :, :]
    h, w = np.broadcast_arrays(h, w)
    acc = np.zeros(h.shape[:2], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for d in range(h.shape[2]):
            if isa_name == "baseline":
                acc = acc + h[:, :, d] * w[:, :, d]  # float32 multiply, then float32 add: each rounded
            else:
                acc = _fma_f32(h[:, :, d], w[:, :, d], acc)
    return torch.from_numpy(acc)


def _round_f32_exact(q):
    """The float32 nearest to the rational q (ties to even), by comparing exact distances."""
    from fractions import Fraction

    r0 = np.float32(float(q))
    cands = [np.nextafter(r0, np.float32(-np.inf)), r0, np.nextafter(r0, np.float32(np.inf))]
    key = [(abs(Fraction(float(c)) - q), int(np.array(c).view(np.int32)) & 1) for c in cands]
    return cands[min(range(3), key=lambda k: key[k])]


def test_fma_model_is_exact():
    """The numpy fma against an exact rational oracle: random triples, and products landing a hair off an fp32
    rounding midpoint, where float64 double rounding (s = fl64(a b + c), then fl32(s)) goes wrong."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    a = rng.standard_normal(300).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    c = rng.standard_normal(300).astype(np.float32)
    # a b = 1 + 2^-11 + 2^-24 exactly; with c = -2^-11 the sum is exactly the midpoint 1 + 2^-24 (ties to even: 1)
    one = np.float32(1 + 2**-12)
    extra = [(one, one, np.float32(-2**-11)), (one, one, np.float32(-2**-11 + 2**-36)),
             (one, one, np.float32(-2**-11 - 2**-36)),
             # a b = 32 - 2^-41, c = 2^29 + 64 (odd): a b + c = 2^29 + 96 - 2^-41, just below the fp32 midpoint
             # 2^29 + 96, so fma gives 2^29 + 64; float64 rounds the sum onto the midpoint, which then ties to the
             # even 2^29 + 128: double rounding is wrong here
             (np.float32(32 * (1 + 2**-23)), np.float32(1 - 2**-23), np.float32(2.0**29 + 64)),
             (np.float32(-32 * (1 + 2**-23)), np.float32(1 - 2**-23), np.float32(-(2.0**29 + 64)))]
    a = np.concatenate([a, np.array([t[0] for t in extra], np.float32)])
    b = np.concatenate([b, np.array([t[1] for t in extra], np.float32)])
    c = np.concatenate([c, np.array([t[2] for t in extra], np.float32)])
    got = _fma_f32(a, b, c)
    for i in range(len(a)):
        q = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        assert got[i] == _round_f32_exact(q), (a[i], b[i], c[i])
    # and at least one case where plain double rounding is wrong, so the midpoint fix is exercised
    naive = (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)
    assert (naive != got).any()


# ---- accuracy ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim,vocab", [(0, 8, 5), (1, 1, 1), (1, 17, 37), (3, 1, 37), (7, 17, 1), (13, 17, 37),
                                            (25, 300, 200), (5, 1100, 70), (64, 576, 1000)])
def test_matches_float64(isa, dtype, rows, dim, vocab):
    hidden, weight = _randn(rows, dim, dtype=dtype, seed=1), _randn(vocab, dim, dtype=dtype, seed=2)
    out = _logits(hidden, weight)
    assert out.dtype == torch.float32 and out.shape == (rows, vocab)
    _check_accuracy(out, hidden, weight)


def test_dim_zero_is_zero():
    out = torch.full((3, 4), float("nan"))
    cpu.fixed_order_logits(out, torch.empty(3, 0), torch.empty(4, 0))
    assert torch.equal(out, torch.zeros(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_strides(isa, dtype):
    """Strided rows of hidden, weight and out (unit stride along the last dim); out's padding is never written."""
    rows, dim, vocab = 11, 37, 45
    hb = _randn(rows, dim + 5, dtype=dtype, seed=3)
    wb = _randn(vocab, dim + 3, dtype=dtype, seed=4)
    hidden, weight = hb[:, 2:2 + dim], wb[:, :dim]
    big = torch.full((rows, vocab + 7), -7.0)
    out = big[:, 3:3 + vocab]
    cpu.fixed_order_logits(out, hidden, weight)
    assert torch.equal(out, _logits(hidden.contiguous(), weight.contiguous()))
    assert bool((big[:, :3] == -7).all()) and bool((big[:, 3 + vocab:] == -7).all())
    _check_accuracy(out, hidden, weight)


# ---- the documented order, bit for bit ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim,vocab", [(1, 1, 1), (7, 17, 37), (13, 130, 70), (5, 1100, 19)])
def test_bitwise_scalar_model(isa, dtype, rows, dim, vocab):
    """Every output equals the scalar model of the documented order exactly, on every build: tails, K blocks
    (dim 1100 crosses the kernel's d blocks of 128 / 512 / 1024), partial register tiles included. So the AVX2 and
    AVX-512 builds give the same bits."""
    hidden, weight = _randn(rows, dim, dtype=dtype, seed=5), _randn(vocab, dim, dtype=dtype, seed=6)
    got = _logits(hidden, weight)
    want = _scalar_model(hidden, weight, isa)
    mismatch = (got.view(torch.int32) != want.view(torch.int32)).sum().item()
    assert mismatch == 0, f"{mismatch} of {got.numel()} outputs differ from the scalar model"


# ---- batch invariance ------------------------------------------------------------------------------------------
# (dim, vocab): one vocabulary panel (rows split over threads), several panels (panels split over threads), and a
# dim whose hidden-row blocks (the kernel's mc) are shorter than 300 rows.
INVARIANCE_SHAPES = [(64, 500), (64, 3001), (1100, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,vocab", INVARIANCE_SHAPES)
def test_batch_invariance(isa, threads, dtype, dim, vocab):
    """A row computed alone (one thread) equals the same row inside batches of 1..300 other random rows, at the
    start, middle and end, with 1 and 2 threads, bit for bit."""
    weight = _randn(vocab, dim, dtype=dtype, seed=7)
    target = _randn(1, dim, dtype=dtype, seed=8)
    threads(1)
    alone = _logits(target, weight)
    for n_threads in (1, 2):
        threads(n_threads)
        for batch in (1, 2, 5, 6, 7, 13, 64, 127, 300):
            others = _randn(batch, dim, dtype=dtype, seed=100 + batch)
            for pos in sorted({0, batch // 2, batch - 1}):
                hidden = others.clone()
                hidden[pos] = target[0]
                out = _logits(hidden, weight)
                assert torch.equal(out[pos].view(torch.int32), alone[0].view(torch.int32)), (
                    f"row at {pos} of {batch} with {n_threads} threads differs from the row alone")


def test_threads_bitwise(threads):
    """A call large enough to use several threads (and panel and row splits) equals the one-thread result."""
    hidden, weight = _randn(50, 96, seed=9), _randn(4000, 96, seed=10)
    threads(1)
    one = _logits(hidden, weight)
    threads(2)
    assert torch.equal(_logits(hidden, weight), one)
    threads(4)  # more threads than cores: still the same bits
    assert torch.equal(_logits(hidden, weight), one)


def test_same_bits_across_fma_builds():
    """The AVX2 and AVX-512 builds run the same FMA chain: identical outputs, whatever their register tiles."""
    builds = [b for b in supported_isas() if b != "baseline"]
    if len(builds) < 2:
        pytest.skip(f"needs both FMA builds, this CPU runs {builds}")
    hidden, weight = _randn(29, 333, seed=11), _randn(301, 333, seed=12)
    outs = []
    try:
        for b in builds:
            cpu.set_isa(b)
            outs.append(_logits(hidden, weight))
    finally:
        cpu.set_isa("auto")
    assert torch.equal(outs[0], outs[1])


# ---- argument checks ---------------------------------------------------------------------------------------------
def test_argument_errors():
    h, w, out = torch.randn(3, 8), torch.randn(5, 8), torch.empty(3, 5)
    with pytest.raises(TypeError, match="hidden is torch.float32 but weight is torch.bfloat16"):
        cpu.fixed_order_logits(out, h, w.bfloat16())
    with pytest.raises(TypeError, match="out must be float32"):
        cpu.fixed_order_logits(out.double(), h, w)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        cpu.fixed_order_logits(out, h.double(), w.double())
    with pytest.raises(ValueError, match="shapes do not match"):
        cpu.fixed_order_logits(out, h, torch.randn(5, 7))
    with pytest.raises(ValueError, match="shapes do not match"):
        cpu.fixed_order_logits(torch.empty(3, 4), h, w)
    with pytest.raises(ValueError, match="unit stride"):
        cpu.fixed_order_logits(torch.empty(5, 3).T, h, w)
    with pytest.raises(ValueError, match="unit stride"):
        cpu.fixed_order_logits(out, torch.randn(8, 3).T, w)
    with pytest.raises(ValueError, match="2-D"):
        cpu.fixed_order_logits(out, h[0], w)
    # the C ABI's own checks
    lib = cpu.library()
    with pytest.raises(ValueError, match="out rows overlap"):
        lib.call("sirl_cpu_fixed_order_logits", h.data_ptr(), 0, 3, 8, 8, w.data_ptr(), 5, 8, out.data_ptr(), 4, 1)
    with pytest.raises(TypeError, match="dtype code 7"):
        lib.call("sirl_cpu_fixed_order_logits", h.data_ptr(), 7, 3, 8, 8, w.data_ptr(), 5, 8, out.data_ptr(), 5, 1)
    with pytest.raises(ValueError, match="null pointer"):
        lib.call("sirl_cpu_fixed_order_logits", None, 0, 3, 8, 8, w.data_ptr(), 5, 8, out.data_ptr(), 5, 1)
