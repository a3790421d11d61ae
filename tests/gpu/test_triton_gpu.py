"""Realistic-shape GPU parity of the Triton backend (skipped without CUDA).

Checks against float64 PyTorch on row subsets (a float64 reference of the full [N, V] would not fit), the
split-V path at few rows, bitwise determinism, in-place backward, and bf16 fused-linear gradients.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton GPU kernels)"),
]

if torch.cuda.is_available():
    import sirl_kernels
    from reference_impl import grad_tolerance, reference_grads, reference_linear, reference_logprobs_entropy

DEV = "cuda"


def _logits_case(n, v, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits = (torch.randn(n, v, device=DEV, generator=g) * 4).to(dtype)
    labels = torch.randint(0, v, (n,), device=DEV, generator=g)
    labels[::7] = -100
    g_lp = torch.randn(n, device=DEV, generator=g)
    g_h = torch.randn(n, device=DEV, generator=g)
    return logits, labels, g_lp, g_h


@pytest.mark.parametrize("n,v", [(4096, 128256), (8, 151936), (1, 151936)])
@pytest.mark.parametrize("inplace", [False, True])
def test_logits_realistic(n, v, inplace):
    logits, labels, g_lp, g_h = _logits_case(n, v, torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    y = x * 1 if inplace else x
    if inplace:
        y.retain_grad()
    lp, h = sirl_kernels.token_logprobs_entropy(y, labels, temperature=0.9, backend="triton",
                                                inplace_backward=inplace)
    (lp * g_lp + h * g_h).sum().backward()
    rows = torch.arange(0, n, max(1, n // 64), device=DEV)
    ref_lp, ref_h = reference_logprobs_entropy(logits[rows], labels[rows], 0.9)
    torch.testing.assert_close(lp[rows].double(), ref_lp, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(h[rows].double(), ref_h, rtol=1e-5, atol=5e-5)
    ref = reference_grads(logits[rows], labels[rows], g_lp[rows], g_h[rows], 0.9)
    torch.testing.assert_close(x.grad[rows].double(), ref, **grad_tolerance(torch.bfloat16, ref))


def test_logits_deterministic_bitwise():
    logits, labels, g_lp, g_h = _logits_case(16, 151936, torch.bfloat16, seed=1)
    outs = []
    for _ in range(3):
        x = logits.clone().requires_grad_(True)
        lp, h = sirl_kernels.token_logprobs_entropy(x, labels, backend="triton")
        (lp * g_lp + h * g_h).sum().backward()
        outs.append((lp, h, x.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_realistic(dtype):
    n, d, v = 512, 1024, 32000
    g = torch.Generator(device=DEV).manual_seed(2)
    hidden = torch.randn(n, d, device=DEV, generator=g).to(dtype)
    weight = (torch.randn(v, d, device=DEV, generator=g) / d**0.5 * 2).to(dtype)
    bias = (torch.randn(v, device=DEV, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, v, (n,), device=DEV, generator=g)
    labels[::5] = -100
    g_lp, g_h = torch.randn(n, device=DEV, generator=g), torch.randn(n, device=DEV, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    lp, h = sirl_kernels.linear_token_logprobs_entropy(leaves[0], leaves[1], labels, bias=leaves[2],
                                                       backend="triton")
    (lp * g_lp + h * g_h).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref_lp, ref_h = reference_linear(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2])
    (ref_lp * g_lp.double() + ref_h * g_h.double()).sum().backward()
    # logprob and entropy: the inputs are exact in their dtype and the logits accumulate in fp32, so float64 on the
    # same values is ~1e-6 away whatever the dtype (a bias on the wrong columns is ~1e-1 away); the gradients come
    # back rounded to the input dtype
    torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), ref_h.detach(), rtol=1e-5, atol=1e-5)
    rtol, atol = (3e-2, 5e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
    for got, ref in zip((t.grad for t in leaves), (t.grad for t in ref_leaves)):
        assert got.dtype == dtype
        scale = max(float(ref.abs().max()), 1.0)
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * scale)


def test_linear_deterministic_bitwise_several_chunks():
    """The fused-linear backward in 4 chunks (dW accumulated in fp32 across them), twice: identical bits."""
    n, d, v = 1024, 1024, 32000
    g = torch.Generator(device=DEV).manual_seed(3)
    hidden = torch.randn(n, d, device=DEV, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, d, device=DEV, generator=g) / d**0.5).to(torch.bfloat16)
    bias = (torch.randn(v, device=DEV, generator=g) * 0.1).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=DEV, generator=g)
    outs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        lp, h = sirl_kernels.linear_token_logprobs_entropy(leaves[0], leaves[1], labels, bias=leaves[2],
                                                           backend="triton", chunk_size=256)
        (lp.sum() - 0.1 * h.sum()).backward()
        outs.append([lp, h] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
