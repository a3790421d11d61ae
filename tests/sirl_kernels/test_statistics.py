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

from cpu_backends import cpu_backends
import sirl_kernels as sk
from sirl_kernels import backends
from statistics_reference import reference, tolerance

CPU_BACKENDS = cpu_backends()  # the backends these tests run: their tensors are on the CPU
CASES = [("torch", torch.float64)] + [(b, dt) for b in CPU_BACKENDS for dt in (torch.float32, torch.bfloat16)]


def _rows(v: int, dtype, seed=0):
    """Adversarial rows: plain, a 1e4 offset, one -inf, a NaN, all -inf, an ignored row, a peaked row; then a +inf
    logit off the label and one at the label (rows 8 and 9, drawn after the others so that rows 0-7 stay put)."""
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
    plus = torch.randn(2, v, generator=g, dtype=torch.float64) * 3
    plus_labels = torch.randint(0, v, (2,), generator=g)
    plus[0, (plus_labels[0] + 1) % v] = math.inf  # at the label too when v = 1
    plus[1, plus_labels[1]] = math.inf
    return torch.cat([x, plus]).to(dtype), torch.cat([labels, plus_labels])


def _log_softmax_lse(ref, x, temperature):
    """The reference's lse with rows holding +inf set to what float64 ``log_softmax`` makes of them: NaN.
    torch.logsumexp says +inf there, but the library's special values follow log_softmax (docs/statistics.md,
    backends/contract.py), which is NaN on the whole row (inf - inf when shifting by the max), so every statistic
    of the row is NaN, lse included, as for the all -inf row (the reference's lse is NaN there too). lse is read
    back as z_y - log p_y, the log_softmax identity, on those rows."""
    z = x.double() / temperature
    via_log_softmax = (z - torch.log_softmax(z, -1))[..., 0]
    return torch.where(torch.isposinf(z).any(-1), via_log_softmax, ref)


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
    ref["lse"] = _log_softmax_lse(ref["lse"], x, temperature)
    plus_inf = torch.isposinf(x.double()).any(-1)
    assert plus_inf.sum() == 2 and all(torch.isnan(ref[k][plus_inf]).all() for k in sk.STATISTICS)
    keep = labels != -100
    for name in sk.STATISTICS:
        _close(name, getattr(got, name), ref[name], x, temperature, dtype, v, keep)


@pytest.mark.parametrize("backend, dtype", CASES)
def test_a_plus_inf_logit_gives_nan_gradients_like_float64(backend, dtype):
    """The +inf rows of ``_rows`` (one off the label, one at it) backward: the gradient of each statistic alone is
    NaN on the whole row, as float64 autograd through log_softmax gives (the softmax there is NaN), and the other
    rows, given no upstream gradient, get none from them."""
    x, labels = _rows(37, dtype)
    plus_inf = torch.isposinf(x.double()).any(-1)
    for name in sk.STATISTICS:
        ours = x.clone().requires_grad_()
        got = getattr(sk.token_stats(ours, labels, want=sk.STATISTICS, temperature=0.5, backend=backend), name)
        got[plus_inf].sum().backward()
        ref_x = x.double().clone().requires_grad_()  # a copy: x.double() is x itself on float64
        ref = reference(ref_x, labels, 0.5, 37)
        # lse, and self-certainty made of it, through log_softmax as the contract has it: torch.logsumexp's own
        # backward is NaN only at the +inf column (exp(inf - inf)), which is not what the forward's NaN implies
        z = ref_x / 0.5
        lse = (z - torch.log_softmax(z, -1))[:, 0]
        ref.update(lse=lse, self_certainty=lse - z.mean(-1) - math.log(37))
        ref[name][plus_inf].sum().backward()
        assert bool(torch.isnan(ref_x.grad[plus_inf]).all()), name  # what float64 says, so that the test can fail
        assert bool(torch.isnan(ours.grad[plus_inf]).all()), f"{name}: {ours.grad[plus_inf]}"
        # only those rows had an upstream gradient; rows whose softmax is itself NaN (a NaN, all -inf) are left
        # out: the backward form scales p_i, so they get 0 * NaN whatever the upstream gradient
        defined = ~plus_inf & ~torch.isnan(x).any(-1) & ~torch.isneginf(x).all(-1)
        assert bool((ours.grad[defined] == 0).all()), name


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
    """token_logprobs_entropy / linear_token_logprobs_entropy keep their own custom ops, yet must be token_stats /
    linear_token_stats asking for (logprobs, entropy), bit for bit: forward and every gradient, logits and fused
    linear, on every backend that runs here. Bitwise, not within a tolerance: both ops call the same backend's
    logits_forward / linear_forward on the same rows (no extra accumulators requested, so the same kernels), and the
    same backward form with the same coefficients (alpha = -g_lp - g_H H, beta = -g_H, lam = g_lp: token_stats'
    ``- g_extra.sum(1)`` over K - 1 = 0 further labels subtracts an exact 0), so nothing may round differently."""
    def same(a, b, what):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        # NaN compared as a marker, infinities as themselves (nan_to_num would map them to the largest float)
        marked = [t.nan_to_num(7.0, posinf=math.inf, neginf=-math.inf) for t in (a, b)]
        assert torch.equal(*marked) and torch.equal(a.isnan(), b.isnan()), what

    x, labels = _rows(37, torch.float32)
    g = torch.Generator().manual_seed(5)
    g_lp, g_h = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    pair, stats = x.clone().requires_grad_(), x.clone().requires_grad_()
    lp, h = sk.token_logprobs_entropy(pair, labels, temperature=0.5, backend=backend)
    got = sk.token_stats(stats, labels, temperature=0.5, backend=backend)
    same(got.logprobs, lp, "logprobs")
    same(got.entropy, h, "entropy")
    assert got.self_certainty is None and got.varentropy is None and got.lse is None
    ((lp * g_lp).nansum() + (h * g_h).nansum()).backward()
    ((got.logprobs * g_lp).nansum() + (got.entropy * g_h).nansum()).backward()
    same(stats.grad, pair.grad, "dlogits")
    assert not torch.isnan(pair.grad).all()  # the comparison saw real gradients, not only NaN rows

    n, d, v = 9, 16, 37
    hidden = torch.randn(n, d, generator=g)
    weight, bias = torch.randn(v, d, generator=g) / 2, torch.randn(v, generator=g)
    lin_labels = torch.randint(0, v, (n,), generator=g)
    lin_labels[3] = -100
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    leaves = [[t.clone().requires_grad_() for t in (hidden, weight, bias)] for _ in range(2)]
    lp, h = sk.linear_token_logprobs_entropy(*leaves[0][:2], lin_labels, bias=leaves[0][2], temperature=0.7,
                                             backend=backend, chunk_size=4)
    got = sk.linear_token_stats(*leaves[1][:2], lin_labels, bias=leaves[1][2], temperature=0.7, backend=backend,
                                chunk_size=4)
    same(got.logprobs, lp, "linear logprobs")
    same(got.entropy, h, "linear entropy")
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    ((got.logprobs * g_lp).sum() + (got.entropy * g_h).sum()).backward()
    for name, a, b in zip(("dhidden", "dweight", "dbias"), leaves[1], leaves[0]):
        same(a.grad, b.grad, name)


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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_plus_inf_logit_on_the_fused_linear_path_gives_nan(backend):
    """A bias of +inf makes that column's logit +inf in every row: as ``log_softmax`` (float64) gives, every
    statistic of a counted row is NaN, and so are the gradients that row sends to hidden; ignored rows stay 0."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g)
    bias = torch.zeros(20)
    bias[5] = math.inf
    labels = torch.tensor([1, 5, -100])
    ref = torch.log_softmax((hidden.detach() @ weight.T + bias).double(), -1)
    assert bool(torch.isnan(ref[:2]).all())  # what float64 says of a row with a +inf logit
    out = sk.linear_token_stats(hidden, weight, labels, bias=bias, want=sk.STATISTICS, backend=backend)
    for name in sk.STATISTICS:
        value = getattr(out, name)
        assert bool(torch.isnan(value[:2]).all()), name
        assert float(value[2].detach()) == 0.0, name
    (out.logprobs[:2].sum() + out.entropy[:2].sum()).backward()
    assert bool(torch.isnan(hidden.grad[:2]).all()) and bool((hidden.grad[2] == 0).all())
