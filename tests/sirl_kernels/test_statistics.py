"""token_stats / linear_token_stats: every statistic on every backend that runs here, against float64 PyTorch over the
full logits; gradcheck in float64; K labels per row; the two-output functions unchanged.

Tolerances. Each statistic is a handful of fp32 roundings of quantities bounded by |result| + log V + the row's
spread (the largest |z - max z| among finite entries): 64 ulp of that bound. Varentropy is E[d^2] - E[d]^2 in the
kernels, so its rounding scales with the square of that bound. Dividing by T (x * (1/T) in some kernels, x / T in the
reference) rounds at the scale of the row's largest |logit|: 4 ulp of it more. float64 runs get the float64 ulp.
"""

from __future__ import annotations

import math

import pytest
import torch

import sirl_kernels as sk
from sirl_kernels import backends
from statistics_reference import reference, tolerance

CPU_BACKENDS = [b for b, s in backends.available_backends().items() if s.available and b != "cuda"]
CASES = [("torch", torch.float64)] + [(b, dt) for b in CPU_BACKENDS for dt in (torch.float32, torch.bfloat16)]


def _rows(v: int, dtype, seed=0):
    """Adversarial rows: plain, a 1e4 offset, one -inf, a NaN, all -inf, an ignored row, a peaked row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (8,), generator=g)
    x[1] += 1e4
    if v > 1:
        x[2, (labels[2] + 1) % v] = -math.inf
    x[3, 0] = math.nan
    x[4] = -math.inf
    labels[5] = -100
    x[6, labels[6]] += 40  # p_y -> 1
    return x.to(dtype), labels


def _close(name, got, ref, x, temperature, dtype, v, keep):
    ref = torch.where(keep, ref, torch.zeros_like(ref)) if ref.dim() == keep.dim() else torch.where(
        keep[..., None], ref, torch.zeros_like(ref))
    got = got.double()
    same_special = (torch.isnan(got) == torch.isnan(ref)) & (torch.isinf(got) == torch.isinf(ref))
    assert bool(same_special.all()), f"{name}: specials differ:\n{got}\n{ref}"
    finite = torch.isfinite(ref)
    assert torch.equal(got[torch.isinf(ref)], ref[torch.isinf(ref)]), f"{name}: infinities differ"
    err = (got - ref).abs()[finite]
    tol = tolerance(name, ref, x, temperature, dtype, v)[finite]
    assert bool((err <= tol).all()), f"{name}: error {err.max().item()} > tol {tol[err.argmax()].item()}"


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("v, temperature", [(37, 0.5), (64, 2.0), (1, 1.0)])
def test_every_statistic_against_float64(backend, dtype, v, temperature):
    x, labels = _rows(v, dtype)
    got = sk.token_stats(x, labels, want=sk.STATISTICS, temperature=temperature, backend=backend)
    ref = reference(x, labels, temperature, v)
    keep = labels != -100
    for name in sk.STATISTICS:
        _close(name, getattr(got, name), ref[name], x, temperature, dtype, v, keep)


@pytest.mark.parametrize("backend, dtype", CASES)
def test_fused_linear_statistics_against_float64(backend, dtype):
    g = torch.Generator().manual_seed(3)
    n, d, v = 9, 16, 37
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / 2).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, v, (n, 3), generator=g)
    labels[2, 1] = -100
    labels[4, 0] = -100
    got = sk.linear_token_stats(hidden, weight, labels, bias=bias, want=sk.STATISTICS, temperature=0.7,
                                backend=backend, chunk_size=4)
    x = hidden.double() @ weight.double().T + bias.double()
    ref = reference(x, labels, 0.7, v)
    ref["logprobs"] = torch.where(labels == -100, 0.0, ref["logprobs"])
    for name in sk.STATISTICS:
        _close(name, getattr(got, name), ref[name], x, 0.7, dtype, v, labels[:, 0] != -100)


def _outputs(result):
    return tuple(getattr(result, name) for name in sk.STATISTICS)


def test_gradcheck_every_output_float64():
    """Any weighted combination of every output: K = 3 labels with a repeat and an ignored one, an ignored row."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 3, 1], [2, -100, 4], [-100, 1, 2], [10, 0, 10], [0, 0, 0]])
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: _outputs(sk.token_stats(t, labels, want=sk.STATISTICS, temperature=0.7, backend="torch")), (x,))
    assert torch.autograd.gradcheck(
        lambda h, w, b: _outputs(sk.linear_token_stats(h, w, labels, bias=b, want=sk.STATISTICS, temperature=0.7,
                                                       backend="torch", chunk_size=2)), (hidden, weight, bias))


@pytest.mark.parametrize("backend, dtype", CASES)
def test_gradients_of_every_statistic_against_float64(backend, dtype):
    """The gradient of a random weighted sum of all outputs (K = 2 labels) against float64 autograd of the
    reference, logits and fused linear, relative to each row's largest gradient."""
    g = torch.Generator().manual_seed(2)
    n, d, v, t = 6, 8, 37, 0.8
    x64 = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    x64[1] += 1e3
    labels = torch.randint(0, v, (n, 2), generator=g)
    labels[3, 0] = -100
    weights = {name: torch.randn(n, 2 if name == "logprobs" else 1, generator=g, dtype=torch.float64).squeeze(-1)
               for name in sk.STATISTICS}
    keep = labels[:, 0] != -100

    def loss(values):
        return sum((torch.where(keep[:, None] if v_.dim() == 2 else keep, v_.double(), 0.0) * weights[k]).sum()
                   for k, v_ in values.items())

    x = x64.to(dtype).requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    got = sk.token_stats(x, labels, want=sk.STATISTICS, temperature=t, backend=backend)  # one call, one rounding
    loss({k: getattr(got, k) for k in sk.STATISTICS}).backward()
    loss(reference(ref_x, labels, t, v)).backward()
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    out_eps = max(eps, torch.finfo(dtype).eps)  # the gradient is rounded to the logits' dtype
    scale = ref_x.grad.abs().amax(-1, keepdim=True) + 1
    top = (x64 / t).abs().amax(-1, keepdim=True)
    err = (x.grad.double() - ref_x.grad).abs()
    assert bool((err <= 512 * eps * (scale + top) + 2 * out_eps * ref_x.grad.abs()).all()), err.max()

    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    refs = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    got = sk.linear_token_stats(hidden, weight, labels, want=sk.STATISTICS, temperature=t, backend=backend,
                                chunk_size=4)
    loss({k: getattr(got, k) for k in sk.STATISTICS}).backward()
    z = refs[0] @ refs[1].T
    z.retain_grad()
    loss(reference(z, labels, t, v)).backward()
    # the logits' gradient enters both matmuls rounded to the inputs' dtype (the numeric policy): an error of
    # out_eps |dz| per term, summed with the other operand's magnitudes
    dz = z.grad.abs()
    bounds = (dz @ refs[1].detach().abs(), dz.T @ refs[0].detach().abs())
    for got, ref, terms in ((hidden.grad, refs[0].grad, bounds[0]), (weight.grad, refs[1].grad, bounds[1])):
        bound = 512 * eps * (ref.abs().amax() + 1) + 4 * out_eps * (terms + ref.abs())
        assert bool(((got.double() - ref).abs() <= bound).all()), (got.double() - ref).abs().max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_two_output_functions_are_the_same_computation(backend):
    x, labels = _rows(37, torch.float32)
    lp, h = sk.token_logprobs_entropy(x, labels, temperature=0.5, backend=backend)
    got = sk.token_stats(x, labels, temperature=0.5, backend=backend)
    assert torch.equal(got.logprobs.nan_to_num(7.0), lp.nan_to_num(7.0))
    assert torch.equal(got.entropy.nan_to_num(7.0), h.nan_to_num(7.0))
    assert got.self_certainty is None and got.varentropy is None and got.lse is None


def test_requests_are_checked():
    x, labels = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="want must name statistics"):
        sk.token_stats(x, labels, want=("entropy", "perplexity"))
    with pytest.raises(ValueError, match="label 9"):
        sk.token_stats(x, torch.tensor([[1, 9], [0, 0]]))
    got = sk.token_stats(x, torch.tensor([[1, 9], [0, 0]]), check_labels=False, backend="torch")
    assert torch.isnan(got.logprobs[0, 1]) and torch.isfinite(got.logprobs[1]).all()


def test_further_labels_gathered_in_row_blocks(monkeypatch):
    """The further labels' weight rows are gathered a few rows at a time (``statistics.GATHER_ELEMENTS``), never
    as one [N, K - 1, D] tensor: blocks of one row give the same outputs and gradients as one block (float64)."""
    from sirl_kernels import statistics

    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(19, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 19, (7, 4), generator=g)
    labels[3, 2] = -100

    def run():
        out = sk.linear_token_stats(hidden, weight, labels, want=("logprobs", "entropy"), backend="torch")
        grads = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), (hidden, weight))
        return (out.logprobs, *grads)

    whole = run()
    monkeypatch.setattr(statistics, "GATHER_ELEMENTS", 1)  # one row per block
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
