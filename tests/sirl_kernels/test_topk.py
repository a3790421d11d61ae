"""Top-k ids and log-probs, and the sampler's truncated support (top-k then top-p), against a float64 PyTorch
reference that materialises the logits and sorts the whole vocabulary; ties included (lower id first).

Tolerances (``log_softmax_tolerance``): the log-probs are the K-label log-probs of token_stats (64 ulp of
|log p| + log V + the row's spread, as in test_statistics); the restricted log-prob and entropy are a log_softmax
over k fp32 values: 64 ulp of |value| + log k + the spread of the row's z; the fused linear's adds the fp32 dot
products' bound.
"""

from __future__ import annotations

import math

import pytest
import torch

import sirl_kernels as sk
from sirl_kernels import backends

CPU_BACKENDS = [b for b, s in backends.available_backends().items() if s.available and b != "cuda"]


def reference_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """ids of the k largest of each row, ties to the lower id: a stable sort of -x over the whole row."""
    return torch.sort(-x.double(), dim=-1, stable=True).indices[..., :k]


def reference_sampler(x, labels, top_k, top_p, t):
    """float64: sort the whole row (ties to the lower id), cut top-k, renormalise, cut top-p, renormalise."""
    z = x.double() / t
    order = torch.sort(-z, dim=-1, stable=True).indices[:, :top_k]
    zs = z.gather(1, order)
    p = torch.softmax(zs, -1)
    keep = (p.cumsum(-1) - p) < top_p
    keep[:, 0] = True
    logp = torch.log_softmax(torch.where(keep, zs, -math.inf), -1)
    entropy = -torch.where(keep, logp.exp() * torch.where(keep, logp, 0.0), 0.0).sum(-1)
    hit = (order == labels[:, None]) & keep
    lp = torch.where(hit.any(-1), logp.gather(1, hit.int().argmax(-1, keepdim=True)).squeeze(1), -math.inf)
    return lp, entropy


def row_spread(z: torch.Tensor) -> torch.Tensor:
    """max - min of each row's finite values, ``[N, 1]``."""
    big = z.amax(-1, keepdim=True)
    return (big - torch.where(torch.isfinite(z), z, big)).amax(-1, keepdim=True)


def log_softmax_tolerance(z: torch.Tensor, ref: torch.Tensor, terms: int) -> torch.Tensor:
    """The fp32 error bound of a log-softmax value ``ref`` over ``terms`` values of the rows of ``z`` (float64, the
    exact scaled logits): 64 ulp of ``|ref| + log terms + spread`` (the sum of at most ``terms`` exps shifted by the
    max, its log, the subtraction; the same budget as test_statistics), plus 4 ulp of the row's largest ``|z|``
    (z = x / T rounded to fp32 before it is shifted)."""
    eps = torch.finfo(torch.float32).eps
    largest = z.abs().nan_to_num(0, 0, 0).amax(-1, True)
    return 64 * eps * (ref.abs() + math.log(max(terms, 1)) + row_spread(z)) + 4 * eps * largest


def _ties(v=41, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64).round(decimals=0)  # many exact ties
    x[1, :] = 0.5  # one row all equal: every rank is a tie
    x[2, 5] = -math.inf
    x[3] += 1e4
    return x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 41])
def test_top_k_ids_and_logprobs_with_ties(backend, k):
    x = _ties()
    ids, lp = sk.top_k_logprobs(x.float(), k, temperature=0.7, backend=backend)
    assert torch.equal(ids, reference_top_k(x.float(), k))
    ref = torch.log_softmax(x.float().double() / 0.7, -1).gather(1, ids)
    tol = log_softmax_tolerance(x.float().double() / 0.7, ref, 41)
    fin = torch.isfinite(ref)
    assert torch.equal(lp[~fin].double(), ref[~fin])
    assert bool(((lp.double() - ref).abs()[fin] <= tol.expand_as(ref)[fin]).all())


def test_linear_top_k_matches_the_logits_path():
    g = torch.Generator().manual_seed(1)
    hidden, weight, bias = torch.randn(7, 8, generator=g), torch.randn(30, 8, generator=g), torch.randn(30, generator=g)
    ids, lp = sk.linear_top_k_logprobs(hidden, weight, 4, bias=bias, backend="torch", chunk_size=3)
    x = hidden.double() @ weight.double().T + bias.double()
    assert torch.equal(ids, reference_top_k(x, 4))
    ref = torch.log_softmax(x, -1).gather(1, ids)
    # fp32 logits: each an fp32 dot of D terms plus the bias, off by at most (D + 1) u sum |h_d w_d| + |b| (Higham);
    # a log-prob moves by at most twice the largest logit error of its row (its own and the lse's).
    u = torch.finfo(torch.float32).eps / 2
    logit_err = (9 * u * ((hidden.double().abs() @ weight.double().abs().T) + bias.double().abs())).amax(-1, True)
    tol = 2 * logit_err + log_softmax_tolerance(x, ref, 30)
    assert bool(((lp.double() - ref).abs() <= tol).all())


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (5, 1.0), (10, 0.8), (41, 0.5), (41, 1e-6)])
def test_sampler_support_against_float64(top_k, top_p):
    x = _ties(seed=3) * 0.7
    x[4] = torch.randn(41, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    labels = torch.tensor([3, 0, 7, 40, 2, -100])
    got_lp, got_h = sk.sampler_logprobs_entropy(x.float(), labels, top_k=top_k, top_p=top_p, temperature=0.9)
    ref_lp, ref_h = reference_sampler(x.float(), labels, top_k, top_p, 0.9)
    keep = labels != -100
    ref_lp, ref_h = torch.where(keep, ref_lp, 0.0), torch.where(keep, ref_h, 0.0)
    z = x.float().double() / 0.9
    assert torch.equal(torch.isinf(got_lp), torch.isinf(ref_lp))
    fin = torch.isfinite(ref_lp)
    lp_tol = log_softmax_tolerance(z, ref_lp[:, None], top_k).squeeze(1)
    assert bool(((got_lp.double() - ref_lp).abs()[fin] <= lp_tol[fin]).all())
    # the entropy: dH = -sum_i p_i dlog p_i (1 + log p_i), so |dH| <= max_i |dlog p_i| (1 + H), and every
    # |log p_i| of the support is at most the spread + log k
    worst = log_softmax_tolerance(z, row_spread(z) + math.log(top_k), top_k).squeeze(1)
    h_tol = worst * (1 + ref_h.abs())
    assert bool(((got_h.double() - ref_h).abs() <= h_tol).all())


def test_sampler_gradient_is_the_softmax_gradient_over_the_support():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 23, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 2, 3, 4])
    top_k, top_p = 8, 0.7
    assert torch.autograd.gradcheck(
        lambda t: tuple(v.masked_fill(torch.isinf(v), 0.0) for v in sk.sampler_logprobs_entropy(
            t, labels, top_k=top_k, top_p=top_p, temperature=0.8)), (x,))
    lp, h = sk.sampler_logprobs_entropy(x, labels, top_k=top_k, top_p=top_p, temperature=0.8)
    (lp.masked_fill(torch.isinf(lp), 0.0).sum() + h.sum()).backward()
    ids = reference_top_k(x.detach(), top_k)
    outside = torch.ones_like(x, dtype=torch.bool).scatter_(1, ids, False)
    assert bool((x.grad[outside] == 0).all())  # nothing outside the top-k


def test_linear_sampler_gradients_match_the_logits_path():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(19, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(19, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 5, 18, -100])
    lp, h = sk.linear_sampler_logprobs_entropy(hidden, weight, labels, top_k=6, top_p=0.9, bias=bias, chunk_size=2)
    x = hidden @ weight.T + bias
    ref_lp, ref_h = sk.sampler_logprobs_entropy(x, labels, top_k=6, top_p=0.9)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(h, ref_h)
    fin = torch.isfinite(lp)
    (lp[fin].sum() + h.sum()).backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    (ref_lp[fin].sum() + ref_h.sum()).backward()
    for got, t in zip(grads, (hidden, weight, bias)):
        torch.testing.assert_close(got, t.grad)


def test_sampler_arguments_are_checked():
    x, y = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="top_k=0"):
        sk.sampler_logprobs_entropy(x, y, top_k=0, top_p=0.9)
    with pytest.raises(ValueError, match="top_p must be in"):
        sk.sampler_logprobs_entropy(x, y, top_k=2, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, min\(1024, V = 5\)\]"):
        sk.sampler_logprobs_entropy(x, y, top_k=6)
