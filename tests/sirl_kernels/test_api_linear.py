"""The parity suite of linear_token_logprobs_entropy: every usable backend against float64 PyTorch."""

from __future__ import annotations

import pytest
import torch
from reference_impl import reference_linear, reference_logprobs_entropy
from torch.overrides import TorchFunctionMode

from sirl_kernels import backends, linear_token_logprobs_entropy, ops
from sirl_kernels._sizes import default_linear_chunk_size
from sirl_kernels.backends.rows import LinearRows, logprob_entropy_coefficients

# Logits are formed with fp32 accumulation and never rounded to the input dtype, so the forward of every dtype
# matches float64 (of the same low-precision inputs) to fp32 accuracy: a bf16/fp16 round trip of the logits, the
# drift the numeric policy rules out, fails this tolerance (test_forward_tolerance_rejects_rounded_logits).
FWD_TOL = {"rtol": 2e-5, "atol": 2e-5}
# Gradients come back in the input dtype (and the logits gradient enters the matmuls rounded to it).
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _case(n, d, v, dtype, device, seed=0, bias=True, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype).to(device)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).to(device) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, b, labels.to(device)


def _grads_reference(hidden, weight, bias, labels, g_lp, g_h, temperature):
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    lp, h = reference_linear(leaves[0], leaves[1], labels, b, temperature)
    (lp * g_lp.double() + h * g_h.double()).sum().backward()
    return leaves[0].grad, leaves[1].grad, None if b is None else b.grad


def _check(hidden, weight, bias, labels, backend, temperature=1.0, chunk_size=None):
    dtype = hidden.dtype
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    lp, h = linear_token_logprobs_entropy(
        leaves[0], leaves[1], labels, bias=b, temperature=temperature, backend=backend, chunk_size=chunk_size
    )
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    ref_lp, ref_h = reference_linear(hidden, weight, labels, bias, temperature)
    torch.testing.assert_close(lp.double().cpu(), ref_lp.cpu(), **FWD_TOL)
    torch.testing.assert_close(h.double().cpu(), ref_h.cpu(), **FWD_TOL)
    g = torch.Generator().manual_seed(11)
    g_lp = torch.randn(labels.shape, generator=g).to(hidden.device)
    g_h = torch.randn(labels.shape, generator=g).to(hidden.device)
    (lp * g_lp + h * g_h).sum().backward()
    refs = _grads_reference(hidden, weight, bias, labels, g_lp, g_h, temperature)
    got = (leaves[0].grad, leaves[1].grad, None if b is None else b.grad)
    for name, r, x in zip(("hidden", "weight", "bias"), refs, got):
        if r is None:
            assert x is None
            continue
        assert x.dtype == dtype, f"grad of {name} must have the input dtype"
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(x.double().cpu(), r.cpu(), rtol=rtol, atol=atol * max(float(r.abs().max()), 1.0))
    ignored = labels == -100
    if bool(ignored.any()):
        assert bool((leaves[0].grad.reshape(-1, hidden.shape[-1])[ignored.reshape(-1)] == 0).all())


@pytest.mark.parametrize("n,d,v,chunk", [(1, 8, 1, None), (10, 16, 37, 3), (33, 32, 1000, 16), (9, 24, 513, None)])
def test_shapes_fp32(backend, device, n, d, v, chunk):
    hidden, weight, bias, labels = _case(n, d, v, torch.float32, device)
    _check(hidden, weight, bias, labels, backend, chunk_size=chunk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, device, dtype):
    hidden, weight, bias, labels = _case(24, 64, 700, dtype, device, seed=2)
    _check(hidden, weight, bias, labels, backend, chunk_size=8)


def test_no_bias_temperature_three_dim(backend, device):
    hidden, weight, _, labels = _case(2 * 7, 16, 300, torch.float32, device, seed=3, bias=False)
    _check(hidden.view(2, 7, 16), weight, None, labels.view(2, 7), backend, temperature=0.6, chunk_size=5)


def test_deterministic(backend, device):
    hidden, weight, bias, labels = _case(20, 32, 500, torch.float32, device, seed=4)
    outs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        lp, h = linear_token_logprobs_entropy(leaves[0], leaves[1], labels, bias=leaves[2], backend=backend,
                                              chunk_size=6)
        (lp.sum() + h.sum()).backward()
        outs.append([lp, h] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_empty(backend, device):
    hidden = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    lp, h = linear_token_logprobs_entropy(hidden, weight, torch.zeros(0, dtype=torch.long, device=device),
                                          backend=backend)
    assert lp.shape == (0,)
    (lp.sum() + h.sum()).backward()
    assert bool((weight.grad == 0).all())


def test_gradcheck_float64_reference_backend():
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 6, 1])
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_token_logprobs_entropy(h, w, y, bias=b, chunk_size=2, temperature=1.3), (h, w, b)
    )


def test_default_chunk_bounds_workspace():
    v = 151936
    chunk = default_linear_chunk_size(v)
    assert chunk % 16 == 0 and 256 <= chunk
    assert chunk * v * 4 <= 256 * 1024 * 1024
    assert default_linear_chunk_size(1) >= 1
    triton_rows = default_linear_chunk_size(v, "triton", torch.bfloat16)
    assert triton_rows % 16 == 0 and triton_rows * v * 2 <= 1024**3 and triton_rows > 8 * chunk


def test_bad_input():
    h, w, y = torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="does not match weight's D"):
        linear_token_logprobs_entropy(torch.randn(3, 5), w, y)
    with pytest.raises(TypeError, match="weight dtype"):
        linear_token_logprobs_entropy(h, w.half(), y)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_token_logprobs_entropy(h, w, y, bias=torch.randn(5))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_token_logprobs_entropy(h, w[None], y)
    with pytest.raises(ValueError, match=r"label 6 at flattened position 1"):
        linear_token_logprobs_entropy(h, w, torch.tensor([0, 6, 2]))


def test_forward_tolerance_rejects_rounded_logits():
    """The parity tolerance is tight enough to catch the bf16 drift: logits rounded to bf16 before the softmax
    (what the torch, cpu and cuda backends used to do) fail it."""
    hidden, weight, bias, labels = _case(24, 64, 700, torch.bfloat16, torch.device("cpu"), seed=2)
    ref_lp, _ = reference_linear(hidden, weight, labels, bias)
    rounded = (hidden.double() @ weight.double().t() + bias.double()).to(torch.bfloat16)
    drift_lp, _ = reference_logprobs_entropy(rounded, labels)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(drift_lp, ref_lp, **FWD_TOL)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_common_offset(backend, device, offset):
    """Logits [2 + c, -1 + c] (exact in fp32) through the fused op: a bias carries the common offset."""
    hidden = torch.tensor([[1.0], [-1.0]], device=device)
    weight = torch.tensor([[2.0], [-1.0]], device=device)
    bias = torch.full((2,), offset, device=device)
    labels = torch.tensor([0, 1], device=device)
    lp, h = linear_token_logprobs_entropy(hidden, weight, labels, bias=bias, backend=backend)
    exact_lp, exact_h = reference_logprobs_entropy(torch.tensor([[2.0, -1.0], [-2.0, 1.0]], dtype=torch.float64),
                                                   labels.cpu())
    torch.testing.assert_close(lp.double().cpu(), exact_lp, rtol=0, atol=1e-6)
    torch.testing.assert_close(h.double().cpu(), exact_h, rtol=0, atol=1e-6)


class _OpLog(TorchFunctionMode):
    """Records every torch function and tensor method run while active, with its output shapes. A function
    mode (not a dispatch mode) so it also sees inside the custom ops' Python implementations."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.calls.append((getattr(func, "__name__", str(func)), shapes))
        return out

    def count(self, *names):
        return sum(1 for name, _ in self.calls if name in names)

    def made(self, shape):
        return [name for name, shapes in self.calls if shape in shapes]


MATMULS = ("mm", "addmm", "addmm_", "matmul", "bmm")


NEEDS = {"hidden": (True, False, False), "weight": (False, True, False), "both": (True, True, True),
         "bias-only": (False, False, True)}


@pytest.mark.parametrize("grads", list(NEEDS))
def test_autograd_asks_only_for_the_gradients_it_needs(backend, device, grads, monkeypatch):
    hidden, weight, bias, labels = _case(10, 24, 37, torch.float32, device, seed=5)
    need_h, need_w, need_b = NEEDS[grads]
    for t, need in ((hidden, need_h), (weight, need_w), (bias, need_b)):
        t.requires_grad_(need)
    seen = []
    real = ops.linear_token_logprobs_entropy_backward_op

    def spy(*args):
        seen.append(args[-3:])
        return real(*args)

    monkeypatch.setattr(ops, "linear_token_logprobs_entropy_backward_op", spy)
    lp, h = linear_token_logprobs_entropy(hidden, weight, labels, bias=bias, backend=backend, chunk_size=4)
    (lp.sum() + h.sum()).backward()
    assert seen == [NEEDS[grads]]
    assert (hidden.grad is not None, weight.grad is not None, bias.grad is not None) == NEEDS[grads]


@pytest.mark.parametrize("grads", list(NEEDS))
def test_backward_computes_only_the_gradients_asked_for(backend, device, grads):
    """A frozen lm_head (LoRA) gets no [V, D] gradient buffer and no weight-gradient matmul; a frozen input
    gets no dX. Counted by recording the torch calls of the backend's backward, not by timing."""
    n, d, v, chunk = 10, 24, 37, 4
    hidden, weight, bias, labels = _case(n, d, v, torch.float32, device, seed=5)
    impl = backends.get(backend)
    _, entropy, stats = impl.linear_forward(LinearRows(hidden, weight, bias, labels, 1.0, -100), chunk)
    g = torch.ones(n, device=device)
    with _OpLog() as log:
        grad_h, grad_w, grad_b = impl.linear_backward(LinearRows(hidden, weight, bias, labels, 1.0, -100), stats,
                                                      logprob_entropy_coefficients(g, g, entropy), chunk, NEEDS[grads])
    assert (grad_h is not None, grad_w is not None, grad_b is not None) == NEEDS[grads]
    need_h, need_w, _ = NEEDS[grads]
    if not need_w:
        assert not log.made((v, d)), f"a [V, D] tensor was made for a frozen weight: {log.made((v, d))}"
    if not need_h:
        assert not log.made((n, d)), f"an [N, D] tensor was made for a frozen input: {log.made((n, d))}"
    if backend in ("torch", "cpu", "cuda"):  # the chunked driver: one logits matmul per chunk plus one per gradient
        chunks = -(-n // chunk)
        assert log.count(*MATMULS) == chunks * (1 + need_h + need_w), log.calls
