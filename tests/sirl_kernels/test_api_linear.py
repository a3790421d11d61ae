"""The parity suite of linear_token_logprobs_entropy: every usable backend against float64 PyTorch."""

from __future__ import annotations

import pytest
import torch
from reference_impl import reference_linear

from sirl_kernels import linear_token_logprobs_entropy
from sirl_kernels._sizes import default_linear_chunk_size

# Logits are a matmul away from the inputs: low-precision inputs round them (or the dot products) at the
# input's precision, so the tolerance follows the dtype.
TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.bfloat16: {"rtol": 3e-2, "atol": 5e-2},
    torch.float16: {"rtol": 5e-3, "atol": 1e-2},
}


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
    torch.testing.assert_close(lp.double().cpu(), ref_lp.cpu(), **TOL[dtype])
    torch.testing.assert_close(h.double().cpu(), ref_h.cpu(), **TOL[dtype])
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
        scale = float(r.abs().max())
        torch.testing.assert_close(
            x.double().cpu(), r.cpu(), rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * max(scale, 1.0)
        )
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
