"""Correctness hazards only a GPU shows (skipped without CUDA), for the "triton" and "cuda" backends:

- special values at realistic widths: NaN, +inf, -inf entries and rows of only -inf behave as torch.log_softmax
  (a GPU's max drops NaN, unlike the interpreter's), forward and backward, the fused-linear op included;
- fp16 inputs; temperature != 1 on the fused path; V % 8 != 0 (a 151665-column view of 151936-wide logits, and
  GPT-2's contiguous 50257), and the layout of the gradient the op allocates for them; N·V > 2^31; the unsplit
  forward at N >= 16896 (where the grid needs no split-V);
- tensors on a second device while the current device is the first (every launch must follow its tensors);
- bf16 fused-linear results against float64 on bf16-exact inputs at ~1e-5 (what fp32 accumulation allows), so
  that a bias added to the wrong columns fails.

Rows are checked against float64 on subsets (a float64 [N, V] reference would not fit at these sizes).
"""

from __future__ import annotations

import math

import pytest
import torch
from sirl_kernels.backends.rows import Rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

if torch.cuda.is_available():
    import sirl_kernels
    from reference_impl import grad_tolerance, reference_grads, reference_linear, reference_logprobs_entropy

DEV = "cuda"
V_QWEN, V_VIEW, V_GPT2 = 151936, 151665, 50257
FWD_TOL = {"rtol": 1e-5, "atol": 5e-5}


def _backends():
    out = []
    for name in ("triton", "cuda"):
        status = sirl_kernels.available_backends()[name] if torch.cuda.is_available() else None
        ok = status is not None and status.available and "cuda" in status.reason
        out.append(pytest.param(name, id=name, marks=[] if ok else [pytest.mark.skip(
            reason=f"backend {name} does not run on CUDA here: {status.reason if status else 'no CUDA'}")]))
    return out


BACKENDS = _backends()


def _special_rows(v, dtype, seed=0):
    """One special case per row, at realistic width: the same kinds as tests/sirl_kernels/test_state_vs_header.py."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    rows, labels = [], []

    def row(x, label):
        rows.append(x)
        labels.append(label)

    base = lambda: torch.randn(v, device=DEV, generator=g) * 3  # noqa: E731
    row(base(), 7)                                               # plain
    for pos in (0, v // 2, v - 1):
        for special in (math.nan, math.inf):
            x = base()
            x[pos] = special
            row(x, (pos + 1) % v)                                # special elsewhere
            row(x.clone(), pos)                                  # special at the label
    x = base()
    x[::3] = -math.inf
    row(x, 1)                                                    # -inf entries
    x = base()
    x[1::2] = -math.inf
    row(x, 1)                                                    # label at -inf
    row(torch.full((v,), -math.inf, device=DEV), 0)              # all -inf
    x = torch.full((v,), -math.inf, device=DEV)
    x[v // 2] = math.nan
    row(x, 0)                                                    # NaN among -inf only
    x = torch.full((v,), -math.inf, device=DEV)
    x[v - 1] = 1.5
    row(x, v - 1)                                                # one finite entry at the end
    row(base() + 1e4, v - 2)                                     # common offset
    return torch.stack(rows).to(dtype), torch.tensor(labels, device=DEV)


def _assert_nan_pattern_and_values(got, want, tol):
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (torch.isnan(got), torch.isnan(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_special_values_follow_log_softmax(backend, dtype, temperature):
    logits, labels = _special_rows(V_QWEN, dtype)
    x = logits.clone().requires_grad_(True)
    lp, h = sirl_kernels.token_logprobs_entropy(x, labels, temperature=temperature, backend=backend)
    g_lp = torch.linspace(-1, 1, labels.numel(), device=DEV)
    (lp * g_lp + h).sum().backward()
    ref_lp, ref_h = reference_logprobs_entropy(logits, labels, temperature)
    _assert_nan_pattern_and_values(lp, ref_lp, FWD_TOL)
    _assert_nan_pattern_and_values(h, ref_h, FWD_TOL)
    ref_grad = reference_grads(logits, labels, g_lp, torch.ones_like(g_lp), temperature)
    nan_rows = torch.isnan(ref_lp) | torch.isnan(ref_h)
    assert bool(torch.isnan(x.grad[nan_rows]).all(dim=1).all()), "a NaN row's gradient must be NaN everywhere"
    ok = ~nan_rows
    torch.testing.assert_close(x.grad[ok].double(), ref_grad[ok], **grad_tolerance(dtype, ref_grad[ok]))
    neg_inf = torch.isinf(logits) & (logits < 0)
    neg_inf[torch.arange(labels.numel(), device=DEV), labels] = False  # d logprob / d x_label = 1 - p, even at -inf
    assert bool((x.grad[ok][neg_inf[ok]] == 0).all()), "-inf entries other than the label: gradient 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("inplace", [False, True])
def test_vocabulary_not_a_multiple_of_8(backend, dtype, inplace):
    """A [N, 151665] view of [N, 151936] logits (16-byte-aligned rows, masked tail) and GPT-2's contiguous
    [N, 50257] (rows off alignment), forward and backward, in place too."""
    g = torch.Generator(device=DEV).manual_seed(1)
    for width, stride in ((V_VIEW, V_QWEN), (V_GPT2, V_GPT2)):
        n = 300
        full = (torch.randn(n, stride, device=DEV, generator=g) * 4).to(dtype)
        logits = full[:, :width]
        labels = torch.randint(0, width, (n,), device=DEV, generator=g)
        labels[::9] = -100
        leaf = full.clone().requires_grad_(True)
        x = leaf[:, :width] * 1 if inplace else leaf[:, :width]
        lp, h = sirl_kernels.token_logprobs_entropy(x, labels, temperature=1.3, backend=backend,
                                                    inplace_backward=inplace)
        g_lp = torch.randn(n, device=DEV, generator=g)
        (lp * g_lp - 0.3 * h).sum().backward()
        rows = torch.arange(0, n, 7, device=DEV)
        ref_lp, ref_h = reference_logprobs_entropy(logits[rows], labels[rows], 1.3)
        torch.testing.assert_close(lp[rows].double(), ref_lp, **FWD_TOL)
        torch.testing.assert_close(h[rows].double(), ref_h, **FWD_TOL)
        ref = reference_grads(logits[rows], labels[rows], g_lp[rows], torch.full_like(g_lp[rows], -0.3), 1.3)
        torch.testing.assert_close(leaf.grad[rows, :width].double(), ref, **grad_tolerance(dtype, ref))
        assert bool((leaf.grad[:, width:] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_place_gradient_rows_align_like_the_logits(backend):
    """The op allocates the out-of-place gradient on a GPU, for every backend, with rows as far from 16-byte
    alignment as the logits' rows: a 151665-wide bf16 view of 151936-wide rows gets rows padded to 151672 (16-byte
    stores), a contiguous 50257-wide tensor a contiguous gradient (the same misalignment); the fake implementation
    returns the same strides (opcheck, on a small case of each layout)."""
    ops = sirl_kernels.ops
    for width, stride, want in ((V_VIEW, V_QWEN, 151672), (V_GPT2, V_GPT2, V_GPT2), (1037, 1064, 1040)):
        n = 8 if width < 2000 else 64
        x = torch.randn(n, stride, device=DEV).to(torch.bfloat16)[:, :width]
        labels = torch.randint(0, width, (n,), device=DEV)
        _, h, stats = ops.token_logprobs_entropy_op(x, labels, 1.0, -100, backend)
        grads = (torch.randn(n, device=DEV), torch.randn(n, device=DEV))
        args = (*grads, x, labels, stats, h, 1.0, -100, backend)
        grad = ops.token_logprobs_entropy_backward_op(*args)
        assert grad.shape == (n, width) and grad.stride() == (want, 1), grad.stride()
        if n == 8:
            torch.library.opcheck(ops.token_logprobs_entropy_backward_op, args)


def _linear_case(n, d, v, dtype, seed, bias=True):
    """bf16/fp16-exact inputs (the float64 reference then sees the very values the kernel reads)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(n, d, device=DEV, generator=g).to(dtype)
    weight = (torch.randn(v, d, device=DEV, generator=g) / d**0.5 * 2).to(dtype)
    b = (torch.randn(v, device=DEV, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), device=DEV, generator=g)
    labels[::11] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_linear_tight_against_float64(backend, dtype, temperature):
    """Logits with fp32 accumulation of exact products: logprob and entropy within ~1e-5 of float64 on the same
    16-bit values (a bias added to the wrong columns, or logits rounded to 16 bits, is off by far more)."""
    n, d, v = 512, 1024, V_GPT2
    hidden, weight, b, labels = _linear_case(n, d, v, dtype, seed=2)
    lp, h = sirl_kernels.linear_token_logprobs_entropy(hidden, weight, labels, bias=b, temperature=temperature,
                                                       backend=backend)
    ref_lp, ref_h = reference_linear(hidden, weight, labels, b, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=1e-5)
    wrong = torch.roll(b, 1)  # the same bias, one column off: must not pass the same check
    lp_wrong, _ = reference_linear(hidden, weight, labels, wrong, temperature)
    assert float((lp_wrong - ref_lp).abs().max()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_special_values(backend):
    """A NaN in one hidden row poisons that row only; a NaN weight column poisons every row; -inf bias entries are
    probability 0 and gradient 0."""
    hidden, weight, b, labels = _linear_case(64, 256, 3001, torch.bfloat16, seed=3)
    labels[(labels == -100) | ((labels >= 10) & (labels < 20))] = 5  # no label on a -inf column
    hidden[3, 7] = float("nan")
    b[10:20] = float("-inf")
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    lp, h = sirl_kernels.linear_token_logprobs_entropy(*leaves[:2], labels, bias=leaves[2], backend=backend)
    (lp.sum() + h.sum()).backward()
    others = torch.tensor([r for r in range(64) if r != 3], device=DEV)
    assert bool(torch.isnan(lp[3])) and bool(torch.isfinite(lp[others]).all())
    assert bool(torch.isnan(leaves[0].grad[3]).all()) and bool(torch.isfinite(leaves[0].grad[others]).all())
    ref_lp, ref_h = reference_linear(hidden[others], weight, labels[others], b)
    torch.testing.assert_close(lp[others].double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[others].double(), ref_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_past_2_31(backend):
    """N·V > 2^31 (14200 x 151936 bf16: 4.3 GB): the last rows, whose offsets pass 2^31 elements, forward and
    in-place backward against float64."""
    n = 14200
    assert n * V_QWEN > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 20 * 2**30:
        pytest.skip("needs ~10 GB of device memory")
    g = torch.Generator(device=DEV).manual_seed(4)
    logits = torch.randn(n, V_QWEN, device=DEV, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, V_QWEN, (n,), device=DEV, generator=g)
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device=DEV)
    keep = logits[rows].clone()
    x = logits.requires_grad_(True) * 1
    lp, h = sirl_kernels.token_logprobs_entropy(x, labels, backend=backend, inplace_backward=True,
                                                check_labels=False)
    ref_lp, ref_h = reference_logprobs_entropy(keep, labels[rows])
    torch.testing.assert_close(lp[rows].double(), ref_lp, **FWD_TOL)
    torch.testing.assert_close(h[rows].double(), ref_h, **FWD_TOL)
    (lp.sum() + h.sum()).backward()
    ref = reference_grads(keep, labels[rows], torch.ones(4, device=DEV), torch.ones(4, device=DEV))
    torch.testing.assert_close(logits.grad[rows].double(), ref, **grad_tolerance(torch.bfloat16, ref))


def test_unsplit_forward_at_16896_rows():
    """At N >= 16896 bf16 rows of 151936 the Triton forward fills its waves without splitting V: one program per
    row, checked on the grid it launches and on row subsets against float64."""
    from sirl_kernels.backends.triton import logits as tlog
    from sirl_kernels.backends.triton import utils

    if not sirl_kernels.available_backends()["triton"].available:
        pytest.skip("triton backend unavailable")
    n = 16896
    g = torch.Generator(device=DEV).manual_seed(5)
    logits = torch.randn(n, V_QWEN, device=DEV, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, V_QWEN, (n,), device=DEV, generator=g)
    grids = []
    real = utils.launch

    def spy(kernel, grid, *args, **kwargs):
        grids.append((kernel.fn.__name__, tuple(grid)))
        return real(kernel, grid, *args, **kwargs)

    utils.launch = spy
    try:
        lp, h, _ = tlog.logits_forward(Rows(logits, labels, 1.0, -100))
    finally:
        utils.launch = real
    assert grids == [("_logits_fwd_kernel", (n, 1))], grids
    rows = torch.arange(0, n, 997, device=DEV)
    ref_lp, ref_h = reference_logprobs_entropy(logits[rows], labels[rows])
    torch.testing.assert_close(lp[rows].double(), ref_lp, **FWD_TOL)
    torch.testing.assert_close(h[rows].double(), ref_h, **FWD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_a_second_device(backend):
    """Tensors on cuda:1 while the current device is cuda:0: every launch follows its tensors (device and stream),
    and the results equal the same call on cuda:0 bitwise."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    outs = []
    for dev in ("cuda:0", "cuda:1"):
        g = torch.Generator(device=dev).manual_seed(6)
        logits = torch.randn(64, V_QWEN, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_(True)
        labels = torch.randint(0, V_QWEN, (64,), device=dev, generator=g)
        hidden = torch.randn(64, 512, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_(True)
        weight = (torch.randn(4096, 512, device=dev, generator=g) / 16).to(torch.bfloat16).requires_grad_(True)
        with torch.cuda.device(0):
            lp, h = sirl_kernels.token_logprobs_entropy(logits, labels, backend=backend)
            (lp.sum() + h.sum()).backward()
            lp2, h2 = sirl_kernels.linear_token_logprobs_entropy(hidden, weight, labels % 4096, backend=backend)
            (lp2.sum() + h2.sum()).backward()
        torch.cuda.synchronize(dev)
        outs.append([t.detach().cpu() for t in (lp, h, logits.grad, lp2, h2, hidden.grad, weight.grad)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
