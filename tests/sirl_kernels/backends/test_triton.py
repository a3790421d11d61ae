"""Triton-specific tests: split-V merge path, tile tails, in-place backward, fused-linear gradients, bitwise
determinism, low-precision inputs, temperature and ignore_index, against float64 PyTorch.

Run on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no CUDA) with small shapes and
large tiles; on a GPU the same tests run on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from reference_impl import grad_tolerance, reference_grads, reference_linear, reference_logprobs_entropy

import sirl_kernels
from sirl_kernels.backends import triton as tb

pytestmark = pytest.mark.skipif(
    not sirl_kernels.available_backends()["triton"].available,
    reason=f"triton backend unavailable: {sirl_kernels.available_backends()['triton'].reason}",
)

if tb._IMPORT_ERROR is None:
    from sirl_kernels.backends.triton import linear as tlin
    from sirl_kernels.backends.triton import logits as tlog
    from sirl_kernels.backends.triton import utils

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FWD_TOL = {"rtol": 1e-5, "atol": 2e-5}


def _case(n, v, dtype=torch.float32, seed=0, scale=3.0, ignore_frac=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        labels[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return logits.to(DEV), labels.to(DEV), g_lp.to(DEV), g_h.to(DEV)


def _check_fwd(lp, h, logits, labels, temperature=1.0, ignore_index=-100):
    ref_lp, ref_h = reference_logprobs_entropy(logits.cpu(), labels.cpu(), temperature, ignore_index)
    torch.testing.assert_close(lp.double().cpu(), ref_lp, **FWD_TOL)
    torch.testing.assert_close(h.double().cpu(), ref_h, **FWD_TOL)


def _run(logits, labels, g_lp, g_h, temperature=1.0, ignore_index=-100, splits=None, bwd_splits=None):
    lp, h, lse = tb.logits_forward(logits, labels, temperature, ignore_index) if splits is None else \
        tlog.logits_forward(logits, labels, temperature, ignore_index, num_splits=splits)
    with utils.quiet():
        grad = tlog.logits_backward(g_lp, g_h, logits, labels, lse, h, temperature, ignore_index,
                                    num_splits=bwd_splits)
    return lp, h, lse, grad


# --- split-V merge and tiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_forced_split_v_matches_float64(splits):
    """Split V across programs and merge the partial states; V = 3 * 4096 + 5 leaves a 5-wide tail tile."""
    logits, labels, g_lp, g_h = _case(3, 3 * 4096 + 5, seed=splits, ignore_frac=0.3)
    logits[0, 4096:] -= 40.0  # later splits much smaller than the first: the merge must rescale them
    logits[1, :4096] = float("-inf")  # a split made only of -inf entries is an empty state
    with utils.quiet():
        lp, h, lse, grad = _run(logits, labels, g_lp, g_h, temperature=0.8, splits=splits, bwd_splits=splits)
    _check_fwd(lp, h, logits, labels, 0.8)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 0.8)
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


def test_split_count_choice():
    assert utils.choose_num_splits(10_000, 40, torch.device("cpu")) == 1
    with utils.force_num_splits(5):
        assert utils.choose_num_splits(10_000, 40, torch.device("cpu")) == 5
        assert utils.choose_num_splits(1, 3, torch.device("cpu")) == 3  # never more splits than tiles
    chunk, splits = utils.split_chunk(3 * 4096 + 5, 4096, 3)
    assert chunk % 4096 == 0 and splits * chunk >= 3 * 4096 + 5 and (splits - 1) * chunk < 3 * 4096 + 5


def test_public_api_with_forced_splits():
    logits, labels, g_lp, g_h = _case(4, 9000, seed=3)
    x = logits.clone().requires_grad_(True)
    with utils.force_num_splits(3):
        lp, h = sirl_kernels.token_logprobs_entropy(x, labels, backend="triton")
        (lp * g_lp + h * g_h).sum().backward()
    _check_fwd(lp, h, logits, labels)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu())
    torch.testing.assert_close(x.grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


@pytest.mark.parametrize("v", [1, 15, 4095, 4096, 4097])
def test_tile_tails(v):
    logits, labels, g_lp, g_h = _case(3, v, seed=v)
    with utils.quiet():
        lp, h, _, grad = _run(logits, labels, g_lp, g_h)
    _check_fwd(lp, h, logits, labels)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu())
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


def test_row_stride_and_dtypes():
    base, labels, g_lp, g_h = _case(5, 1300, torch.bfloat16, seed=4)
    logits = base[:, :1000]  # row stride 1300
    labels = labels % 1000
    with utils.quiet():
        lp, h, _, grad = _run(logits, labels, g_lp, g_h)
    assert grad.dtype == torch.bfloat16
    _check_fwd(lp, h, logits, labels)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu())
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(torch.bfloat16, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_split(dtype):
    logits, labels, g_lp, g_h = _case(4, 5000, dtype, seed=5, ignore_frac=0.25)
    with utils.quiet():
        lp, h, _, grad = _run(logits, labels, g_lp, g_h, temperature=1.7, splits=2, bwd_splits=2)
    _check_fwd(lp, h, logits, labels, 1.7)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 1.7)
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(dtype, ref))


def test_label_gradient_exact_when_p_near_one():
    """1 - p_y is computed as -expm1(log p_y): with log p_y = -1e-9 (given the row stats), 1 - exp(log p_y)
    rounds to 0 in fp32 while the exact value is 1e-9."""
    logits = torch.full((2, 300), -40.0, device=DEV)
    logits[:, 7] = 0.0
    labels = torch.tensor([7, 7], device=DEV)
    stats = torch.tensor([[0.0, 1e-9], [0.0, 1e-9]], device=DEV)  # (max, log-sum): log p_y = 0 - 0 - 1e-9
    ent = torch.zeros(2, device=DEV)
    g = torch.ones(2, device=DEV)
    with utils.quiet():
        grad = tlog.logits_backward(g, torch.zeros(2, device=DEV), logits, labels, stats, ent, 1.0, -100)
    torch.testing.assert_close(grad[:, 7].double().cpu(), -torch.expm1(torch.tensor([-1e-9, -1e-9],
                               dtype=torch.float64)), rtol=1e-6, atol=0)


# --- in-place backward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_kernel(dtype):
    logits, labels, g_lp, g_h = _case(4, 6000, dtype, seed=6, ignore_frac=0.3)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 0.9)
    lp, h, lse = tb.logits_forward(logits, labels, 0.9, -100)
    buf = logits.clone()
    ptr = buf.data_ptr()
    with utils.quiet():
        out = tlog.logits_backward(g_lp, g_h, buf, labels, lse, h, 0.9, -100, num_splits=2, out=buf)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(buf.double().cpu(), ref, **grad_tolerance(dtype, ref))


def test_inplace_backward_public_api():
    logits, labels, g_lp, g_h = _case(6, 2000, seed=7, ignore_frac=0.3)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 1.3)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf whose storage backward may overwrite
    x.retain_grad()
    ptr = x.data_ptr()
    lp, h = sirl_kernels.token_logprobs_entropy(x, labels, temperature=1.3, backend="triton", inplace_backward=True)
    _check_fwd(lp, h, logits, labels, 1.3)
    (lp * g_lp + h * g_h).sum().backward()
    torch.testing.assert_close(leaf.grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))
    # the gradient was written into the logits' storage: their values are gone
    torch.testing.assert_close(x.detach().double().cpu(), ref, **grad_tolerance(torch.float32, ref))
    assert x.data_ptr() == ptr
    # the default path leaves the logits alone
    y = logits.clone().requires_grad_(True)
    lp, h = sirl_kernels.token_logprobs_entropy(y, labels, temperature=1.3, backend="triton")
    (lp * g_lp + h * g_h).sum().backward()
    assert torch.equal(y.detach(), logits)
    torch.testing.assert_close(y.grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


# --- determinism ----------------------------------------------------------------------------------------------


def test_bitwise_deterministic_split_paths():
    logits, labels, g_lp, g_h = _case(3, 9000, torch.bfloat16, seed=8)
    runs = []
    for _ in range(2):
        with utils.quiet():
            runs.append(_run(logits, labels, g_lp, g_h, splits=3, bwd_splits=3))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- fused linear ----------------------------------------------------------------------------------------------

LIN_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 5e-2), torch.float16: (5e-3, 1e-2)}


def _lin_case(n, d, v, dtype, seed=0, bias=True, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    to = (lambda t: None if t is None else t.to(DEV))
    return to(hidden), to(weight), to(b), to(labels), to(g_lp), to(g_h)


def _lin_reference_grads(hidden, weight, bias, labels, g_lp, g_h, temperature):
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (hidden, weight)]
    b = None if bias is None else bias.detach().cpu().double().requires_grad_(True)
    lp, h = reference_linear(leaves[0], leaves[1], labels.cpu(), b, temperature)
    (lp * g_lp.cpu().double() + h * g_h.cpu().double()).sum().backward()
    return lp, h, leaves[0].grad, leaves[1].grad, None if b is None else b.grad


@pytest.mark.parametrize("dtype,bias,splits,temperature", [
    (torch.float32, True, 1, 1.0),
    (torch.float32, False, 3, 0.7),
    (torch.bfloat16, True, 2, 1.0),
    (torch.float16, True, 1, 1.5),
])
def test_linear_forward_backward(dtype, bias, splits, temperature):
    n, d, v = 40, 48, 2100  # tails in every dimension of the tiles (BLOCK_N 64, BLOCK_V 1024, BLOCK_D 64)
    hidden, weight, b, labels, g_lp, g_h = _lin_case(n, d, v, dtype, seed=splits, bias=bias)
    with utils.quiet():
        lp, h, lse = tlin.linear_forward(hidden, weight, b, labels, temperature, -100, num_splits=splits)
        gh, gw, gb = tb.linear_backward(g_lp, g_h, hidden, weight, b, labels, lse, h, temperature, -100, 0,
                                        (True, True, True))
    ref_lp, ref_h, r_gh, r_gw, r_gb = _lin_reference_grads(hidden, weight, b, labels, g_lp, g_h, temperature)
    rtol, atol = LIN_TOL[dtype]
    torch.testing.assert_close(lp.double().cpu(), ref_lp.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(h.double().cpu(), ref_h.detach(), rtol=rtol, atol=atol)
    for got, ref in ((gh, r_gh), (gw, r_gw), (gb, r_gb)):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == dtype
        scale = max(float(ref.abs().max()), 1.0)
        torch.testing.assert_close(got.double().cpu(), ref, rtol=rtol, atol=atol * scale)
    assert bool((gh[labels == -100] == 0).all())


def test_linear_deterministic_and_public_api():
    hidden, weight, b, labels, g_lp, g_h = _lin_case(20, 32, 700, torch.float32, seed=9)
    outs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
        lp, h = sirl_kernels.linear_token_logprobs_entropy(leaves[0], leaves[1], labels, bias=leaves[2],
                                                           backend="triton", chunk_size=3)
        (lp * g_lp + h * g_h).sum().backward()
        outs.append([lp, h] + [t.grad for t in leaves])
    for a, c in zip(*outs):
        assert torch.equal(a, c)
    ref = _lin_reference_grads(hidden, weight, b, labels, g_lp, g_h, 1.0)
    torch.testing.assert_close(outs[0][3].double().cpu(), ref[3], rtol=1e-4, atol=1e-4)


def test_fused_never_materialises_logits():
    """The fused forward allocates O(N) outputs only (under the interpreter: no [N, V] tensor is created)."""
    hidden, weight, b, labels, _, _ = _lin_case(8, 16, 3000, torch.float32, seed=10)
    created = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        created.append(t.numel())
        return t

    torch.empty = spy
    try:
        with utils.quiet():
            tlin.linear_forward(hidden, weight, b, labels, 1.0, -100)
    finally:
        torch.empty = real_empty
    assert created and max(created) < 3000


def test_opcheck_inplace_ops():
    from sirl_kernels import ops

    logits = torch.randn(5, 300, device=DEV, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 299, 7], device=DEV)
    torch.library.opcheck(ops.token_logprobs_entropy_op, (logits, labels, 0.9, -100, "triton", True))
    _, ent, stats = ops.token_logprobs_entropy_op(logits.detach(), labels, 0.9, -100, "triton")
    torch.library.opcheck(
        ops.token_logprobs_entropy_backward_inplace_op,
        (torch.randn(5, device=DEV), torch.randn(5, device=DEV), logits.detach().clone(), labels, stats, ent, 0.9,
         -100, "triton"),
    )
