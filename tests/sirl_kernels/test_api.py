"""The parity suite of token_logprobs_entropy: every usable backend against float64 PyTorch."""

from __future__ import annotations

import pytest
import torch
from reference_impl import grad_tolerance, reference_grads, reference_logprobs_entropy

from sirl_kernels import token_logprobs_entropy

FWD_TOL = {"rtol": 1e-5, "atol": 2e-5}  # outputs are fp32 whatever the input dtype


def _random_case(n, v, dtype, device, seed=0, scale=3.0, ignore_frac=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        labels[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return logits, labels.to(device)


def _check(logits, labels, backend, temperature=1.0, ignore_index=-100, grads=True, seed=1):
    x = logits.detach().clone().requires_grad_(True)
    lp, h = token_logprobs_entropy(x, labels, temperature=temperature, ignore_index=ignore_index, backend=backend)
    assert lp.dtype == torch.float32 and h.dtype == torch.float32
    assert lp.shape == labels.shape and h.shape == labels.shape
    ref_lp, ref_h = reference_logprobs_entropy(logits, labels, temperature, ignore_index)
    torch.testing.assert_close(lp.double().cpu(), ref_lp.cpu(), **FWD_TOL)
    torch.testing.assert_close(h.double().cpu(), ref_h.cpu(), **FWD_TOL)
    if not grads:
        return x
    g = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(labels.shape, generator=g).to(logits.device)
    g_h = torch.randn(labels.shape, generator=g).to(logits.device)
    (lp * g_lp + h * g_h).sum().backward()
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    ref = reference_grads(logits, labels, g_lp, g_h, temperature, ignore_index)
    torch.testing.assert_close(x.grad.double().cpu(), ref.cpu(), **grad_tolerance(logits.dtype, ref))
    return x


@pytest.mark.parametrize("n,v", [(1, 1), (7, 1), (5, 17), (33, 1000), (3, 4099), (2, 40000)])
def test_shapes_fp32(backend, device, n, v):
    logits, labels = _random_case(n, v, torch.float32, device)
    _check(logits, labels, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(backend, device, dtype):
    logits, labels = _random_case(16, 3001, dtype, device, seed=3)
    _check(logits, labels, backend)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 2.5])
def test_temperature(backend, device, temperature):
    logits, labels = _random_case(8, 1537, torch.float32, device, seed=4)
    _check(logits, labels, backend, temperature=temperature)


@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_ignore_index(backend, device, ignore_index):
    logits, labels = _random_case(12, 700, torch.float32, device, seed=5, ignore_frac=0.4, ignore_index=ignore_index)
    labels[0] = ignore_index
    x = _check(logits, labels, backend, ignore_index=ignore_index)
    ignored = labels == ignore_index
    assert bool((x.grad[ignored] == 0).all()), "ignored rows must get exactly zero gradient"
    lp, h = token_logprobs_entropy(logits, labels, ignore_index=ignore_index, backend=backend)
    assert bool((lp[ignored] == 0).all()) and bool((h[ignored] == 0).all())


def test_all_rows_ignored(backend, device):
    logits, _ = _random_case(4, 300, torch.float32, device)
    labels = torch.full((4,), -100, device=device)
    x = _check(logits, labels, backend)
    assert bool((x.grad == 0).all())


def test_three_dim_and_label_dtypes(backend, device):
    logits, labels = _random_case(2 * 3 * 4, 515, torch.bfloat16, device, seed=6)
    logits = logits.view(2, 3, 4, 515)
    for label_dtype in (torch.int64, torch.int32, torch.int16):
        _check(logits, labels.view(2, 3, 4).to(label_dtype), backend)


def test_non_contiguous_inputs(backend, device):
    base, _ = _random_case(10, 2 * 600, torch.float32, device, seed=7)
    labels = torch.randint(0, 600, (10, 2)).to(device)
    # Rows with a stride larger than V (a slice of a wider buffer).
    _check(base[:, :600], labels[:, 0], backend)
    # Last dim not unit-stride (a transposed buffer), and non-contiguous labels.
    transposed = base.t()[:600].t()  # [10, 600] with stride (1, 10)... of the transposed storage
    transposed = base.t().contiguous().t()[:, :600]
    assert transposed.stride(-1) != 1
    _check(transposed, labels[:, 1], backend)
    # A 3-D input whose leading dims cannot be flattened into a view.
    cube, cube_labels = _random_case(24, 300, torch.float32, device, seed=8)
    cube = cube.view(4, 6, 300).transpose(0, 1)
    _check(cube, cube_labels.view(4, 6).t(), backend)


def test_special_rows(backend, device):
    v = 1000
    rows = torch.randn(6, v, dtype=torch.float64)
    rows[0] = 0.0  # uniform: entropy log V
    rows[1, ::3] = float("-inf")  # masked vocabulary entries
    rows[2] = rows[2] * 1e4  # huge logits
    rows[3] = 0.0
    rows[3, 11] = 30.0  # p(label) -> 1: entropy ~ 0
    rows[4, :] = -1e4
    rows[4, 5] = 1e4
    rows[5, 1:] = float("-inf")  # one finite entry
    logits = rows.float().to(device)
    labels = torch.tensor([3, 1, int(rows[2].argmax()), 11, 7, 0], device=device)
    x = _check(logits, labels, backend)
    lp, h = token_logprobs_entropy(logits, labels, backend=backend)
    assert abs(float(h[0]) - torch.log(torch.tensor(float(v))).item()) < 1e-5
    assert float(h[3]) < 1e-5 and float(h[5]) == 0.0 and float(lp[5]) == 0.0
    assert bool(torch.isfinite(x.grad).all()), "-inf logits must give zero gradient, not NaN"
    assert bool((x.grad[1, ::3] == 0).all())
    # Softmax gradients of each row sum to zero: the 1[i = y] term must be exact.
    torch.testing.assert_close(x.grad.double().sum(-1).cpu(), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)


def test_label_at_negative_infinity(backend, device):
    logits = torch.zeros(2, 50, device=device)
    logits[0, 4] = float("-inf")
    lp, h = token_logprobs_entropy(logits, torch.tensor([4, 4], device=device), backend=backend)
    assert float(lp[0]) == float("-inf")
    assert abs(float(lp[1]) + torch.log(torch.tensor(50.0)).item()) < 1e-5


@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_gradient_of_one_output(backend, device, which):
    logits, labels = _random_case(9, 800, torch.float32, device, seed=9)
    x = logits.clone().requires_grad_(True)
    lp, h = token_logprobs_entropy(x, labels, backend=backend, temperature=0.9)
    (lp if which == "logprobs" else h).sum().backward()
    ones, zeros = torch.ones(9), torch.zeros(9)
    g_lp, g_h = (ones, zeros) if which == "logprobs" else (zeros, ones)
    ref = reference_grads(logits, labels, g_lp.to(device), g_h.to(device), 0.9)
    torch.testing.assert_close(x.grad.double().cpu(), ref.cpu(), **grad_tolerance(torch.float32, ref))


def test_empty_inputs(backend, device):
    for shape in [(0, 100), (2, 0, 100)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
        lp, h = token_logprobs_entropy(x, labels, backend=backend)
        assert lp.shape == shape[:-1] and h.shape == shape[:-1]
        (lp.sum() + h.sum()).backward()
        assert x.grad.shape == shape


def test_deterministic(backend, device):
    logits, labels = _random_case(16, 5000, torch.bfloat16, device, seed=10)
    outs = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        lp, h = token_logprobs_entropy(x, labels, backend=backend)
        (lp.sum() + 0.5 * h.sum()).backward()
        outs.append((lp, h, x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b), "two calls must be bitwise equal"


def test_int64_offsets(backend, device):
    """Row offsets beyond 2**31 elements: a strided view whose second row starts at element 2**31 + 64.

    The 4 GiB storage is only reserved (torch.empty does not touch it); two rows are written.
    """
    v, stride = 64, 2**31 + 64
    storage = torch.empty(stride + v, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((2, v), (stride, 1))
    logits.copy_(torch.randn(2, v).to(torch.bfloat16))
    labels = torch.tensor([3, 60], device=device)
    dense = logits.clone()
    x = logits.detach()
    lp, h = token_logprobs_entropy(x, labels, backend=backend)
    ref_lp, ref_h = reference_logprobs_entropy(dense, labels)
    torch.testing.assert_close(lp.double().cpu(), ref_lp.cpu(), **FWD_TOL)
    torch.testing.assert_close(h.double().cpu(), ref_h.cpu(), **FWD_TOL)
    del storage


def test_gradcheck_float64_reference_backend():
    """gradcheck the analytic backward (shared by every backend) in float64 on the torch backend."""
    x = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 12, 5, 5])
    assert torch.autograd.gradcheck(lambda t: token_logprobs_entropy(t, labels, temperature=0.8), (x,))
    assert torch.autograd.gradgradcheck is not None  # double backward is not supported by design


# --- bad input ------------------------------------------------------------------------------------------------


def test_label_out_of_range_names_value_and_position(backend, device):
    logits = torch.randn(4, 10, device=device)
    with pytest.raises(ValueError, match=r"label 10 at flattened position 2"):
        token_logprobs_entropy(logits, torch.tensor([0, 1, 10, 2], device=device), backend=backend)
    with pytest.raises(ValueError, match=r"label -3 at flattened position 0"):
        token_logprobs_entropy(logits, torch.tensor([-3, 1, 1, 2], device=device), backend=backend)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_entropy(torch.randn(2, 5), torch.tensor([0, 1]), temperature=temperature)


def test_bad_types_and_shapes():
    with pytest.raises(TypeError, match="logits must be float32"):
        token_logprobs_entropy(torch.randint(0, 5, (2, 5)), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        token_logprobs_entropy(torch.randn(2, 5), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        token_logprobs_entropy(torch.randn(2, 5), [0, 1])
    with pytest.raises(ValueError, match="labels shape"):
        token_logprobs_entropy(torch.randn(2, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="empty vocabulary"):
        token_logprobs_entropy(torch.randn(2, 0), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels are on"):
        token_logprobs_entropy(torch.randn(2, 5), torch.tensor([0, 1], device="meta"))
    with pytest.raises(TypeError, match="temperature must be a real number"):
        token_logprobs_entropy(torch.randn(2, 5), torch.tensor([0, 1]), temperature="1")
    with pytest.raises(TypeError, match="ignore_index"):
        token_logprobs_entropy(torch.randn(2, 5), torch.tensor([0, 1]), ignore_index=1.5)


def test_backend_selection_errors(monkeypatch):
    logits, labels = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        token_logprobs_entropy(logits, labels, backend="nope")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        token_logprobs_entropy(logits, labels, backend="cuda")
    monkeypatch.setenv("SIRL_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"unknown backend 'bogus' \(from \$SIRL_KERNELS_BACKEND\)"):
        token_logprobs_entropy(logits, labels)
    with pytest.raises(TypeError, match="float64 runs on 'torch'"):
        token_logprobs_entropy(logits.double(), labels, backend="cpu")


# --- one contract, every backend: in-place backward, NaN, large offsets, unchecked labels -------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_every_backend(backend, device, dtype):
    logits, labels = _random_case(6, 2001, dtype, device, seed=21, ignore_frac=0.3)
    g = torch.Generator().manual_seed(22)
    g_lp, g_h = torch.randn(6, generator=g).to(device), torch.randn(6, generator=g).to(device)
    ref = reference_grads(logits, labels, g_lp, g_h, 1.3)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf whose storage backward may overwrite
    lp, h = token_logprobs_entropy(x, labels, temperature=1.3, backend=backend, inplace_backward=True)
    (lp * g_lp + h * g_h).sum().backward()
    torch.testing.assert_close(leaf.grad.double().cpu(), ref.cpu(), **grad_tolerance(dtype, ref))
    # the gradient now sits in the logits' own storage
    torch.testing.assert_close(x.detach().double().cpu(), ref.cpu(), **grad_tolerance(dtype, ref))


@pytest.mark.parametrize("position", ["label", "first", "last", "middle"])
def test_nan_anywhere_in_a_row_poisons_that_row_only(backend, device, position):
    v = 3001  # not a multiple of any block: the last element sits in a tail
    logits, labels = _random_case(4, v, torch.float32, device, seed=23)
    col = {"label": int(labels[1]), "first": 0, "last": v - 1, "middle": 1537}[position]
    logits[1, col] = float("nan")
    x = logits.clone().requires_grad_(True)
    lp, h = token_logprobs_entropy(x, labels, backend=backend)
    assert bool(torch.isnan(lp[1])) and bool(torch.isnan(h[1])), (float(lp[1]), float(h[1]))
    keep = torch.tensor([0, 2, 3], device=device)
    ref_lp, ref_h = reference_logprobs_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(lp[keep].double().cpu(), ref_lp.cpu(), **FWD_TOL)
    torch.testing.assert_close(h[keep].double().cpu(), ref_h.cpu(), **FWD_TOL)
    (lp + h).sum().backward()
    assert bool(torch.isnan(x.grad[1]).any())
    assert bool(torch.isfinite(x.grad[keep]).all())


def test_all_negative_infinity_row_is_nan_like_log_softmax(backend, device):
    logits = torch.randn(2, 300, device=device)
    logits[0] = float("-inf")
    lp, h = token_logprobs_entropy(logits, torch.tensor([3, 3], device=device), backend=backend)
    assert bool(torch.isnan(lp[0])) and bool(torch.isnan(h[0]))
    assert bool(torch.isfinite(lp[1])) and bool(torch.isfinite(h[1]))


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_large_common_offset_keeps_fp32_accuracy(backend, device, offset, temperature):
    """[2 + c, -1 + c] is exact in fp32; log_softmax loses nothing, and neither may we (1e-6): the logprob is
    (x_y - max) / T - log s, never x_y / T - lse. The gradient too is formed from the saved (max, log s)."""
    logits = torch.tensor([[2.0 + offset, -1.0 + offset], [-1.0 + offset, 2.0 + offset]], device=device)
    labels = torch.tensor([0, 0], device=device)
    x = logits.clone().requires_grad_(True)
    lp, h = token_logprobs_entropy(x, labels, temperature=temperature, backend=backend)
    exact_lp, exact_h = reference_logprobs_entropy(torch.tensor([[2.0, -1.0], [-1.0, 2.0]], dtype=torch.float64),
                                                   labels.cpu(), temperature)
    torch.testing.assert_close(lp.double().cpu(), exact_lp, rtol=0, atol=1e-6)
    torch.testing.assert_close(h.double().cpu(), exact_h, rtol=0, atol=1e-6)
    (lp + h).sum().backward()
    ref = reference_grads(torch.tensor([[2.0, -1.0], [-1.0, 2.0]]), labels.cpu(), torch.ones(2), torch.ones(2),
                          temperature)
    torch.testing.assert_close(x.grad.double().cpu(), ref, rtol=0, atol=1e-6)


def test_unchecked_bad_label_gives_nan_never_a_wild_read(backend, device):
    logits, _ = _random_case(4, 100, torch.float32, device, seed=24)
    labels = torch.tensor([3, 100, -7, -100], device=device)  # in range, past V, negative, ignored
    x = logits.clone().requires_grad_(True)
    lp, h = token_logprobs_entropy(x, labels, backend=backend, check_labels=False)
    assert bool(torch.isfinite(lp[0])) and bool(torch.isfinite(h[0]))
    assert bool(torch.isnan(lp[1])) and bool(torch.isnan(lp[2])), lp
    assert bool(torch.isnan(h[1])) and bool(torch.isnan(h[2])), h
    assert float(lp[3]) == 0.0 and float(h[3]) == 0.0
    (lp + h).sum().backward()
    assert bool(torch.isnan(x.grad[1]).all()) and bool(torch.isnan(x.grad[2]).all())
    assert bool((x.grad[3] == 0).all()) and bool(torch.isfinite(x.grad[0]).all())
    with pytest.raises(ValueError, match=r"label 100 at flattened position 1"):
        token_logprobs_entropy(logits, labels, backend=backend)  # the default still checks


def test_validate_labels_is_the_same_check():
    from sirl_kernels import validate_labels

    validate_labels(torch.tensor([[0, 4], [-100, 2]]), 5)
    with pytest.raises(ValueError, match=r"label 5 at flattened position 1"):
        validate_labels(torch.tensor([[0, 5], [-100, 2]]), 5)
    with pytest.raises(TypeError, match="check_labels must be a bool"):
        token_logprobs_entropy(torch.randn(2, 5), torch.tensor([0, 1]), check_labels=1)
