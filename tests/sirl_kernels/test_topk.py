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

from cpu_backends import cpu_backends
import sirl_kernels as sk
from sirl_kernels import backends

CPU_BACKENDS = cpu_backends()  # the backends these tests run: their tensors are on the CPU


def reference_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """ids of the k largest of each row, ties to the lower id: a stable sort of -x over the whole row."""
    return torch.sort(-x.double(), dim=-1, stable=True).indices[..., :k]


def reference_sampler(x, labels, top_k, top_p, t):
    """float64, vLLM's ``apply_top_k_top_p`` over the whole row: sort ascending (equal logits: the higher id first,
    so the lower id counts as more probable), mask every logit ``<`` the k-th largest (ties at it stay), then, with
    the probabilities of what is left, mask the prefix whose cumulative mass is ``<= 1 - top_p`` (the last token
    always stays); log-prob of the label and entropy of the softmax of what is left."""
    z = x.double() / t
    vocab = z.shape[-1]
    by_id_desc = torch.arange(vocab - 1, -1, -1)
    values, pos = torch.sort(z[:, by_id_desc], dim=-1, stable=True)
    order = by_id_desc[pos]
    kth = values[:, vocab - top_k: vocab - top_k + 1]
    values = values.masked_fill(values < kth, -math.inf)
    cum = torch.softmax(values, -1).cumsum(-1)
    drop = cum <= 1 - top_p
    drop[:, -1] = False
    values = values.masked_fill(drop, -math.inf)
    masked = torch.full_like(z, -math.inf).scatter(1, order, values)
    logp = torch.log_softmax(masked, -1)
    kept = torch.isfinite(masked)
    entropy = -torch.where(kept, logp.exp() * torch.where(kept, logp, 0.0), 0.0).sum(-1)
    lp = logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    return lp, entropy


def row_spread(z: torch.Tensor) -> torch.Tensor:
    """max - min of each row's finite values, ``[N, 1]``."""
    big = z.amax(-1, keepdim=True)
    return (big - torch.where(torch.isfinite(z), z, big)).amax(-1, keepdim=True)


def log_softmax_tolerance(z: torch.Tensor, ref: torch.Tensor, terms: int,
                          eps: float = torch.finfo(torch.float32).eps) -> torch.Tensor:
    """The fp32 error bound of a log-softmax value ``ref`` over ``terms`` values of the rows of ``z`` (float64, the
    exact scaled logits): 64 ulp of ``|ref| + log terms + spread`` (the sum of at most ``terms`` exps shifted by the
    max, its log, the subtraction; the same budget as test_statistics), plus 4 ulp of the row's largest ``|z|``
    (z = x / T rounded to fp32 before it is shifted). ``eps``: the precision the value was computed in."""
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


def _boundary_ties() -> tuple[torch.Tensor, torch.Tensor]:
    """float64 rows whose k-th largest logit (k = 3) ties with further tokens, as bf16 logits often do, and labels
    that are among those further ties: the ties straddle k, fill the row, sit above the k-th value, next to -inf,
    and inside the top-p cut."""
    inf = math.inf
    x = torch.tensor([
        [3.0, 1.0, 1.0, 1.0, 0.0, 1.0, -2.0],
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        [2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0],
        [5.0, 1.0, 1.0, -inf, 1.0, 1.0, 1.0],
        [4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, -inf, -inf, -inf, -inf, -inf, -inf],
    ], dtype=torch.float64)
    return x, torch.tensor([5, 6, 3, 6, 6, 0])


@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.8, 0.45, 0.2])  # no mass boundary of these rows lands on them
def test_sampler_keeps_every_tie_at_the_kth_value_like_vllm(top_p):
    """vLLM and HF mask only the logits below the k-th value: every tie at it is in the support, and its gradient
    is the softmax gradient over that support (float64 against the float64 transcription of vLLM's cut)."""
    x, labels = _boundary_ties()
    x.requires_grad_(True)
    lp, h = sk.sampler_logprobs_entropy(x, labels, top_k=3, top_p=top_p, temperature=0.8)
    ref_lp, ref_h = reference_sampler(x, labels, 3, top_p, 0.8)
    assert torch.equal(torch.isinf(lp), torch.isinf(ref_lp))
    z = x.detach() / 0.8
    eps = torch.finfo(torch.float64).eps  # both sides compute in float64
    tol = log_softmax_tolerance(z, row_spread(z) + math.log(7), 7, eps).squeeze(1)
    fin = torch.isfinite(ref_lp)
    assert bool(((lp - ref_lp).abs()[fin] <= tol[fin]).all())
    assert bool(((h - ref_h).abs() <= tol * (1 + ref_h.abs())).all())
    w = torch.tensor([1.0, -0.5, 2.0, 0.25, -1.5, 0.75], dtype=torch.float64)
    got = torch.autograd.grad((torch.where(fin, lp, 0.0) * w).sum() + (h * w.flip(0)).sum(), x)[0]
    want = torch.autograd.grad((torch.where(fin, ref_lp, 0.0) * w).sum() + (ref_h * w.flip(0)).sum(), x)[0]
    # a gradient entry is p_i (a + b log p_i) for per-row weights of magnitude <= 2 (1 + spread + log V)
    grad_tol = 4 * tol[:, None] * (1 + row_spread(z) + math.log(7))
    assert bool(((got - want).abs() <= grad_tol).all()), (got - want).abs().max()


@pytest.mark.parametrize("k", [1, 5, 64])
def test_sampler_on_coarse_logits_matches_vllms_cut(k):
    """Logits on a grid of 0.5 (bf16 near 8 has steps of 0.0625; coarser still makes ties at every rank) over a
    vocabulary of 300, labels drawn from the support and outside it: log-prob, entropy and their gradients
    against the float64 transcription of vLLM's cut."""
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(40, 300, generator=g, dtype=torch.float64) * 3).mul(2).round().div(2)
    order = torch.sort(-x, dim=-1, stable=True).indices
    labels = torch.where(torch.rand(40, generator=g) < 0.7, order[:, min(k + 3, 299)], order[:, 0])
    labels[::7] = torch.randint(0, 300, (6,), generator=g)
    for top_p in (1.0, 0.9, 0.55):
        xs = x.clone().requires_grad_(True)
        lp, h = sk.sampler_logprobs_entropy(xs, labels, top_k=k, top_p=top_p, temperature=1.3)
        ref_lp, ref_h = reference_sampler(xs, labels, k, top_p, 1.3)
        assert torch.equal(torch.isinf(lp), torch.isinf(ref_lp)), (top_p, lp, ref_lp)
        z = x / 1.3
        eps = torch.finfo(torch.float64).eps
        tol = log_softmax_tolerance(z, row_spread(z) + math.log(300), 300, eps).squeeze(1)
        fin = torch.isfinite(ref_lp)
        assert bool(((lp - ref_lp).abs()[fin] <= tol[fin]).all())
        assert bool(((h - ref_h).abs() <= tol * (1 + ref_h.abs())).all())
        got = torch.autograd.grad(torch.where(fin, lp, 0.0).sum() + h.sum(), xs)[0]
        want = torch.autograd.grad(torch.where(fin, ref_lp, 0.0).sum() + ref_h.sum(), xs)[0]
        assert bool(((got - want).abs() <= 4 * tol[:, None] * (1 + row_spread(z) + math.log(300))).all())


def test_the_sampled_tie_beyond_k_has_its_log_prob():
    """The audit's row: logits [3, 1, 1, 1, 0], top_k = 2, label 3 (a tie at the 2nd value, above k by id): vLLM
    keeps 4 tokens, so log p = 1 - log(e^3 + 3 e), not -inf."""
    x = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    lp, _ = sk.sampler_logprobs_entropy(x, torch.tensor([3]), top_k=2)
    expected = 1.0 - math.log(math.exp(3.0) + 3 * math.exp(1.0))
    assert abs(float(lp) - expected) <= 8 * torch.finfo(torch.float64).eps * (abs(expected) + 3)


def test_linear_sampler_with_ties_matches_the_logits_path():
    """Duplicated weight rows make exactly tied logits on the fused-linear path; its log-probs, entropies and the
    gradients of hidden, weight and bias match the logits path over the same (float64) logits."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(4, 5, generator=g, dtype=torch.float64)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    weight = torch.cat([base, base[2:3].expand(5, 5), base[:1]]).requires_grad_(True)  # 12 rows, row 2 x 6
    bias = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    hidden.requires_grad_(True)
    x = hidden @ weight.T + bias
    top = x.detach().argsort(-1, descending=True)
    labels = torch.tensor([int(top[0, 3]), 8, 9, int(top[3, 0])])
    # Both sides float64, the logits summed in other orders: each within (D + 1) u sum|h w| (Higham), a log-prob
    # within twice that plus the log-softmax's own budget; a logit's gradient within 4 of those budgets times the
    # row's (1 + spread + log V) (as in test_sampler_keeps_every_tie_at_the_kth_value_like_vllm), carried into the
    # parameters' gradients by the other operand's magnitudes.
    u = torch.finfo(torch.float64).eps / 2
    z = x.detach()
    logit_err = (6 * u * (hidden.detach().abs() @ weight.detach().abs().T)).amax(-1)
    budget = row_spread(z)[:, 0] + math.log(12)
    tol = 2 * logit_err + log_softmax_tolerance(z, budget[:, None], 12, 2 * u).squeeze(1)
    per_logit = float((4 * tol * (1 + budget)).max())
    grad_tols = (per_logit * float(weight.detach().abs().sum(0).max()),
                 per_logit * float(hidden.detach().abs().sum(0).max()),
                 per_logit * hidden.shape[0])
    for top_p in (1.0, 0.7):
        lp, h = sk.linear_sampler_logprobs_entropy(hidden, weight, labels, top_k=3, top_p=top_p, bias=bias,
                                                   chunk_size=3)
        ref_lp, ref_h = sk.sampler_logprobs_entropy(x, labels, top_k=3, top_p=top_p)
        assert torch.equal(torch.isinf(lp), torch.isinf(ref_lp))
        fin = torch.isfinite(ref_lp)
        assert bool(((lp - ref_lp).abs()[fin] <= tol[fin]).all())
        assert bool(((h - ref_h).abs() <= tol * (1 + ref_h.abs())).all())
        got = torch.autograd.grad(lp[fin].sum() + h.sum(), (hidden, weight, bias))
        want = torch.autograd.grad(ref_lp[fin].sum() + ref_h.sum(), (hidden, weight, bias), retain_graph=True)
        for a, b, bound in zip(got, want, grad_tols):
            assert float((a - b).abs().max()) <= bound, (float((a - b).abs().max()), bound)


def test_ties_not_formed_again_in_the_backward_raise(monkeypatch):
    """The ties' gradient is spread over the logits found equal to the k-th value again in the backward; if the
    logits came back different (not bit for bit), the backward raises instead of spreading it elsewhere."""
    from sirl_kernels import topk

    x, labels = _boundary_ties()
    x.requires_grad_(True)
    lp, h = sk.sampler_logprobs_entropy(x, labels, top_k=3)
    original = topk.LogitChunks.chunks

    def perturbed(self, need=None):
        for s, e, z in original(self, need):
            yield s, e, z + torch.arange(z.shape[1], dtype=z.dtype) * 1e-9

    monkeypatch.setattr(topk.LogitChunks, "chunks", perturbed)
    with pytest.raises(RuntimeError, match="not formed again bit for bit"):
        h.sum().backward()


def test_sampler_arguments_are_checked():
    x, y = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="top_k=0"):
        sk.sampler_logprobs_entropy(x, y, top_k=0, top_p=0.9)
    with pytest.raises(ValueError, match="top_p must be in"):
        sk.sampler_logprobs_entropy(x, y, top_k=2, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, min\(1024, V = 5\)\]"):
        sk.sampler_logprobs_entropy(x, y, top_k=6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_top_k_is_batch_invariant(backend):
    """``batch_invariant=True``: a row's top-k ids and log-probs are bitwise the same alone and inside batches (at
    the first, a middle and the last position), on the logits and the fused-linear path, whatever the chunk."""
    g = torch.Generator().manual_seed(11)
    d, v, k = 24, 300, 7
    weight = torch.randn(v, d, generator=g) / d**0.5
    bias = torch.randn(v, generator=g)
    target = torch.randn(d, generator=g) * 2
    kw = dict(temperature=0.8, backend=backend, batch_invariant=True)
    ids_alone, lp_alone = sk.linear_top_k_logprobs(target[None], weight, k, bias=bias, **kw)
    logits_alone = target[None] @ weight.T + bias
    x_ids_alone, x_lp_alone = sk.top_k_logprobs(logits_alone, k, **kw)
    for n in (2, 7, 64):
        for pos in sorted({0, n // 2, n - 1}):
            hidden = torch.randn(n, d, generator=g) * 2
            hidden[pos] = target
            for chunk in sorted({1, 3, n}):
                ids, lp = sk.linear_top_k_logprobs(hidden, weight, k, bias=bias, chunk_size=chunk, **kw)
                assert torch.equal(ids[pos], ids_alone[0]) and torch.equal(lp[pos], lp_alone[0]), (n, pos, chunk)
            logits = torch.randn(n, v, generator=g)
            logits[pos] = logits_alone[0]
            ids, lp = sk.top_k_logprobs(logits, k, **kw)
            assert torch.equal(ids[pos], x_ids_alone[0]) and torch.equal(lp[pos], x_lp_alone[0]), (n, pos)


def test_a_nan_above_ties_at_the_kth_value_stays_in_the_top_k():
    """NaN ranks above everything: in a row where ties straddle the k-th place, the NaN keeps its place among the
    k (so the row's results are NaN, as log_softmax gives), and the lowest tied ids fill the rest."""
    x = torch.tensor([[1.0, math.nan, 2.0, 2.0, 2.0, 0.0]])
    ids = sk.top_k_logprobs(x, 3, backend="torch")[0]
    assert ids.tolist() == [[1, 2, 3]]
    lp, h = sk.sampler_logprobs_entropy(x, torch.tensor([0]), top_k=3)
    assert bool(torch.isnan(lp).all()) and bool(torch.isnan(h).all())
