"""The vocabulary sharded over 2 and 4 gloo ranks (tensor-parallel heads): every rank's merged log-prob, entropy and
gradients against float64 PyTorch over the full vocabulary, for the logits op and the fused-linear op, on every
backend that runs on CPU here; the same bits on every rank.

Tolerances: each output is a handful of fp32 roundings (the local kernel, then the merge's few adds and exps) of
quantities bounded by |result| + log V + |the row's largest shifted logit|; 64 ulp of that bound covers them
(float64 runs get the float64 ulp). Dividing by T (x * (1/T) on some backends, x / T in the reference) rounds at
the scale of the row's largest |logit|: 4 ulp of it more.

One process. The same public function, backend and dtype without process_group on the full vocabulary
(``_against_one_process``): the merge adds the same terms e^(z_i - M) grouped by rank, through a few more exps, logs
and adds (a_r, log S, the shares), and every elementwise step is the same operation on the same column (M, a max, is
the same number; no x / T rounding differs), so the two differ by a few fp32 ulp of the row's magnitudes: 16 ulp of
|result| + B, B = log V + the row's spread + 1 (B^2 for varentropy, whose rounding scales with its square), with no
term in the largest |logit| (the 1e4 row is held to that too). On the fused-linear path each logit's dot product
over D may be blocked differently by the two GEMMs: 2 (D + 1) ulp of |h| . |w| + |b| per logit, times how far a
statistic moves per unit logit (2 for log-probs, lse and self-certainty; B, B^2 for entropy, varentropy). The
gradients' bounds follow from those (``per_element``) and from regrouped sums over V or N (2n ulp of the magnitudes).
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from statistics_reference import reference, tolerance

from cpu_backends import cpu_backends
from sirl_kernels import (
    STATISTICS,
    backends,
    linear_token_logprobs_entropy,
    linear_token_stats,
    token_logprobs_entropy,
    token_stats,
)

N, V, D = 8, 37, 12
SIZES = {2: [15, 22], 4: [5, 10, 11, 11]}  # unequal shards, none a multiple of 8
CPU_BACKENDS = cpu_backends()  # the backends these tests run: their tensors are on the CPU


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    logits[1] += 1e4  # a common offset: costs nothing when sums are shifted by the max
    logits[2, :15] = float("-inf")  # rank 0's columns all -inf (vocabulary padding)
    labels[2] = 30
    labels[3] = -100  # ignored
    labels[4] = V - 1  # the last rank's last column
    logits[5, 20] = float("nan")  # NaN poisons the row on every rank
    logits[6, 3] = float("-inf")  # one -inf column, the label elsewhere
    labels[7] = 0
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D) * 4
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    g_lp, g_h = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    return logits.to(dtype), labels, hidden.to(dtype), weight.to(dtype), bias.to(dtype), g_lp, g_h


def _reference(z, labels, temperature):
    """float64 log-prob and entropy of softmax(z / T) over the full vocabulary, ignored rows 0."""
    z = z.double() / temperature
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    # H = lse - E_p[z], with -inf logits (p = 0) left out so that their gradient is 0, not 0 * inf
    ent = torch.logsumexp(z, -1) - (logp.exp() * torch.where(torch.isfinite(z), z, 0.0)).sum(-1)
    keep = labels != -100
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def _tol(ref, z, dtype):
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    finite = torch.where(torch.isfinite(z), z.double(), torch.nan)
    spread = (finite - finite.nan_to_num(nan=-math.inf).amax(-1, keepdim=True)).abs().nan_to_num(nan=0.0).amax(-1)
    # plus x / T itself, rounded at the scale of the largest logit (x * (1/T) and x / T differ by an ulp of it)
    top = finite.nan_to_num(nan=0.0).abs().amax(-1)
    return 64 * eps * (ref.abs() + math.log(V) + spread.clamp_max(1e3) + 1) + 4 * eps * top


def _check(got, ref, z, dtype, what):
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN rows {torch.isnan(got)} vs {nan}"
    err = (got.double() - ref).abs()[~nan]
    tol = _tol(ref, z, dtype)[~nan]
    assert bool((err <= tol).all()), f"{what}: error {err.tolist()} > {tol.tolist()}"


def _same_on_every_rank(t, what):
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    for other in gathered:
        assert torch.equal(torch.nan_to_num(other, nan=7.0), torch.nan_to_num(t, nan=7.0)), f"{what} differs"


def _grad_check(got, ref, dtype, what, rows, top=0.0):
    """Gradients on the rows whose reference is finite, relative to the row's largest gradient; ``top`` the largest
    |z| of the rows (the rounding of x / T and of the reference's own entropy at that scale)."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    ref, got = ref[rows], got.double()[rows]
    scale = ref.abs().amax(-1, keepdim=True) + 1 + top
    assert bool(((got - ref).abs() <= 256 * eps * scale).all()), f"{what}: {(got - ref).abs().max()}"


def _worker(rank, world, init_file, cases, temperature):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for backend, dtype in cases:
            _one_case(rank, world, backend, dtype, temperature)
            _every_statistic(rank, world, backend, dtype, temperature)
            _against_one_process(rank, world, backend, dtype, temperature)
    finally:
        dist.destroy_process_group()


def _row_bound(z):
    """B = log V + the row's spread (largest |z - max z| among finite entries) + 1: what every statistic's roundings
    scale with (varentropy's with B^2)."""
    finite = torch.where(torch.isfinite(z), z.double(), torch.nan)
    top = finite.nan_to_num(nan=-math.inf).amax(-1, keepdim=True)
    return math.log(z.shape[-1]) + (top - finite).nan_to_num(nan=0.0).amax(-1).clamp_max(1e3) + 1


def _same_as_one_process(got, want, bound, eps, what, dz=None):
    """Sharded against the same backend without process_group on the full vocabulary (module docstring, "One
    process"): the same specials bit for bit, finite values within 16 ulp of the row's bound (``dz``: how far the
    fused-linear logits themselves may differ, times how much a statistic moves per unit of them)."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN {torch.isnan(got)} vs {torch.isnan(want)}"
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    fin = torch.isfinite(want)
    tol = 16 * eps * (want.abs() + bound) + (0.0 if dz is None else dz)
    err = (got - want).abs()
    assert bool((err[fin] <= tol[fin]).all()), f"{what}: error {err[fin].max()}, tolerance {tol[fin].min()}"


def _one_case(rank, world, backend, dtype, temperature):
    sizes = SIZES[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    logits, labels, hidden, weight, bias, g_lp, g_h = _case(dtype)
    finite_rows = torch.tensor([r != 5 for r in range(N)])  # row 5 holds a NaN

    # the logits op
    full = logits.double().clone().requires_grad_()
    ref_lp, ref_h = _reference(full, labels, temperature)
    (ref_lp[finite_rows] * g_lp[finite_rows] + ref_h[finite_rows] * g_h[finite_rows]).sum().backward()
    local = logits[:, lo:hi].clone().requires_grad_()
    lp, h = token_logprobs_entropy(local, labels, temperature=temperature, backend=backend,
                                   process_group=dist.group.WORLD, check_labels=True)
    _check(lp, ref_lp.detach(), logits / temperature, dtype, "logprob")
    _check(h, ref_h.detach(), logits / temperature, dtype, "entropy")
    _same_on_every_rank(lp, "logprob")
    _same_on_every_rank(h, "entropy")
    (lp[finite_rows] * g_lp[finite_rows].to(lp.dtype) + h[finite_rows] * g_h[finite_rows].to(h.dtype)).sum(
    ).backward()
    top = (logits.double() / temperature).nan_to_num(nan=0.0, neginf=0.0).abs().amax(-1, keepdim=True)
    _grad_check(local.grad, full.grad[:, lo:hi], dtype, "dlogits", finite_rows, top[finite_rows])
    assert bool((local.grad[3] == 0).all())  # the ignored row
    if rank == 0:
        assert bool((local.grad[2] == 0).all())  # all -inf columns: exactly 0

    # the fused-linear op: weight rows and bias sharded, hidden replicated
    h64, w64, b64 = (t.double().clone().requires_grad_() for t in (hidden, weight, bias))
    z = h64 @ w64.T + b64
    ref_lp, ref_h = _reference(z, labels, temperature)
    (ref_lp * g_lp + ref_h * g_h).sum().backward()
    hid = hidden.clone().requires_grad_()
    w_local = weight[lo:hi].clone().requires_grad_()
    b_local = bias[lo:hi].clone().requires_grad_()
    lp, h = linear_token_logprobs_entropy(hid, w_local, labels, bias=b_local, temperature=temperature,
                                          backend=backend, chunk_size=3, process_group=dist.group.WORLD)
    _check(lp, ref_lp.detach(), z.detach() / temperature, dtype, "linear logprob")
    _check(h, ref_h.detach(), z.detach() / temperature, dtype, "linear entropy")
    _same_on_every_rank(h, "linear entropy")
    (lp * g_lp.to(lp.dtype) + h * g_h.to(h.dtype)).sum().backward()
    every = torch.ones(N, dtype=torch.bool)
    _grad_check(hid.grad, h64.grad, dtype, "dhidden", every)
    _same_on_every_rank(hid.grad, "dhidden")
    _grad_check(w_local.grad.T, w64.grad[lo:hi].T, dtype, "dweight", slice(None))
    _grad_check(b_local.grad[None], b64.grad[lo:hi][None], dtype, "dbias", slice(None))


def _every_statistic(rank, world, backend, dtype, temperature):
    """token_stats / linear_token_stats sharded: every statistic and K = 2 labels (the second often on another
    rank, one ignored), forward against float64 over the full vocabulary and the gradient of a weighted sum of
    everything on the rows where every statistic is finite."""
    sizes = SIZES[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    logits, labels, hidden, weight, bias, *_ = _case(dtype)
    labels2 = torch.stack([labels, (labels.clamp_min(0) + 17) % V], dim=1)
    labels2[0, 1] = -100
    keep = labels2[:, 0] != -100
    g = torch.Generator().manual_seed(9)
    weights = {k: torch.randn(N, *((2,) if k == "logprobs" else ()), generator=g, dtype=torch.float64)
               for k in STATISTICS}
    rows = torch.tensor([r in (0, 1, 4, 7) for r in range(N)])  # every statistic finite (no -inf, no NaN)

    def loss(values):
        return sum((values[k].double()[rows] * weights[k][rows]).sum() for k in STATISTICS)

    def reference_of(z):  # an ignored further label: log-prob 0, no gradient
        ref = reference(z, labels2, temperature, V)
        ref["logprobs"] = torch.where(labels2 == -100, 0.0, ref["logprobs"])
        return ref

    def check(got, ref, z):
        for name in STATISTICS:
            want = torch.where(keep if ref[name].dim() == 1 else keep[:, None], ref[name].detach(), 0.0)
            value = getattr(got, name).double()
            assert torch.equal(torch.isnan(value), torch.isnan(want)), name
            assert torch.equal(value[torch.isinf(want)], want[torch.isinf(want)]), name
            fin = torch.isfinite(want)
            tol = tolerance(name, want, z, temperature, dtype, V)
            assert bool(((value - want).abs()[fin] <= tol[fin]).all()), f"{name}: {(value - want).abs()[fin].max()}"
            _same_on_every_rank(getattr(got, name), name)

    full = logits.double().clone().requires_grad_()
    ref = reference_of(full)
    loss(ref).backward()
    local = logits[:, lo:hi].clone().requires_grad_()
    got = token_stats(local, labels2, want=STATISTICS, temperature=temperature, backend=backend,
                      process_group=dist.group.WORLD)
    check(got, ref, logits)
    loss({k: getattr(got, k) for k in STATISTICS}).backward()
    top = (logits.double() / temperature).nan_to_num(nan=0.0, neginf=0.0).abs().amax(-1, keepdim=True)
    _grad_check(local.grad, full.grad[:, lo:hi], dtype, "stats dlogits", rows, top[rows])

    h64, w64, b64 = (t.double().clone().requires_grad_() for t in (hidden, weight, bias))
    z = h64 @ w64.T + b64
    ref = reference_of(z)
    loss(ref).backward()
    hid = hidden.clone().requires_grad_()
    w_local, b_local = weight[lo:hi].clone().requires_grad_(), bias[lo:hi].clone().requires_grad_()
    got = linear_token_stats(hid, w_local, labels2, want=STATISTICS, bias=b_local, temperature=temperature,
                             backend=backend, chunk_size=3, process_group=dist.group.WORLD)
    check(got, ref, z.detach())
    loss({k: getattr(got, k) for k in STATISTICS}).backward()
    _grad_check(hid.grad, h64.grad, dtype, "stats dhidden", torch.ones(N, dtype=torch.bool))
    _same_on_every_rank(hid.grad, "stats dhidden")
    _grad_check(w_local.grad.T, w64.grad[lo:hi].T, dtype, "stats dweight", slice(None))
    _grad_check(b_local.grad[None], b64.grad[lo:hi][None], dtype, "stats dbias", slice(None))

    # batch_invariant=True: a row alone gives the bits it gets among all the rows, sharded too
    with torch.no_grad():
        for r in (1, 4):
            kw = dict(want=STATISTICS, temperature=temperature, backend=backend, process_group=dist.group.WORLD,
                      batch_invariant=True)
            pairs = [(token_stats(logits[:, lo:hi], labels2, **kw), token_stats(logits[r:r + 1, lo:hi],
                                                                                labels2[r:r + 1], **kw)),
                     (linear_token_stats(hidden, weight[lo:hi], labels2, bias=bias[lo:hi], chunk_size=3, **kw),
                      linear_token_stats(hidden[r:r + 1], weight[lo:hi], labels2[r:r + 1], bias=bias[lo:hi],
                                         **kw))]
            for batch, alone in pairs:
                for name in STATISTICS:
                    assert torch.equal(getattr(batch, name)[r], getattr(alone, name)[0]), (name, r)


def _against_one_process(rank, world, backend, dtype, temperature):
    """token_stats / linear_token_stats sharded against the same public function, backend and dtype called without
    process_group on the full vocabulary: every statistic (K = 2 labels), the logits gradient and the fused-linear
    hidden, weight and bias gradients of a weighted sum of every finite output (the gradient of a row whose
    statistics are NaN is NaN on both sides: compared as such)."""
    sizes = SIZES[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    logits, labels, hidden, weight, bias, *_ = _case(dtype)
    labels2 = torch.stack([labels, (labels.clamp_min(0) + 17) % V], dim=1)
    labels2[0, 1] = -100
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    g = torch.Generator().manual_seed(11)
    weights = {k: torch.randn(N, *((2,) if k == "logprobs" else ()), generator=g, dtype=torch.float64)
               for k in STATISTICS}

    def loss(out):
        return sum((torch.where(torch.isfinite(v), v, 0.0) * weights[k].to(v.dtype)).sum()
                   for k, v in ((k, getattr(out, k)) for k in STATISTICS))

    def compare(sharded, one, z, what, dz=None):
        bound = _row_bound(z / temperature)
        for name in STATISTICS:
            b = bound[:, None] if name == "logprobs" else bound
            b = b ** 2 if name == "varentropy" else b
            d = None if dz is None else (dz[:, None] if name == "logprobs" else dz)
            _same_as_one_process(getattr(sharded, name), getattr(one, name), b, eps, f"{what} {name}",
                                 None if d is None else d * (b if name in ("entropy", "varentropy") else 2))
            _same_on_every_rank(getattr(sharded, name), name)
        return bound

    def grads_close(got, want, tol, what):
        got, want = got.double(), want.double()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern"
        fin = torch.isfinite(want)
        err = (got - want).abs()
        assert bool((err[fin] <= tol.expand_as(err)[fin]).all()), f"{what}: error {err[fin].max()}"

    def logits_gradient(z):
        """|d loss / dz| in float64 ("torch" backend, the float64 autograd of the same loss): the scale of the
        gradients, [N, V]."""
        z = z.detach().double().clone().requires_grad_()
        loss(token_stats(z, labels2, want=STATISTICS, temperature=temperature, backend="torch")).backward()
        return z.grad.nan_to_num(nan=0.0).abs()

    def per_element(bound, gz, dz=0.0):
        """How far one logit's gradient may move, [N, 1]: the backward reads the merged (M, log S, H, VE); M is
        the same number (a max is exact), log S, H and VE are within 16 ulp of B (of B^2 for VE) of the one-process
        ones (the forward's bound), and every other operation is the same on the same column. So log p_i = z_i - M
        - log S moves by that much, p_i by that relative amount, and each coefficient (products of H, VE and the
        unit-scale upstream weights) by that much per unit weight: 16 ulp of B^2 times (the row's largest logit
        gradient + 1); ``dz`` moves every L_i by up to 2 dz more. Plus one ulp of the gradient: it is rounded to
        the inputs' dtype on both sides."""
        rel = 16 * eps * bound[:, None] ** 2 + (2 * dz * bound)[:, None] if torch.is_tensor(dz) else \
            16 * eps * bound[:, None] ** 2
        return rel * (gz.amax(-1, keepdim=True) + 1) + eps * gz.amax(-1, keepdim=True)

    kw = dict(want=STATISTICS, temperature=temperature, backend=backend)
    local, full = logits[:, lo:hi].clone().requires_grad_(), logits.clone().requires_grad_()
    sharded = token_stats(local, labels2, process_group=dist.group.WORLD, **kw)
    one = token_stats(full, labels2, **kw)
    bound = compare(sharded, one, logits.double(), "logits")
    loss(sharded).backward()
    loss(one).backward()
    grads_close(local.grad, full.grad[:, lo:hi], per_element(bound, logits_gradient(logits)), "dlogits")

    hid, w_local, b_local = (t.clone().requires_grad_() for t in (hidden, weight[lo:hi], bias[lo:hi]))
    hid1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    sharded = linear_token_stats(hid, w_local, labels2, bias=b_local, chunk_size=3,
                                 process_group=dist.group.WORLD, **kw)
    one = linear_token_stats(hid1, w1, labels2, bias=b1, chunk_size=3, **kw)
    h64, w64, b64 = hidden.double(), weight.double(), bias.double()
    z = h64 @ w64.T + b64
    # each logit is a dot product over D that two GEMMs may block differently: D + 1 roundings of |h| . |w| + |b|
    # on either side
    dz = 2 * (D + 1) * eps * (h64.abs() @ w64.abs().T + b64.abs()).amax(-1) / temperature
    bound = compare(sharded, one, z, "linear", dz)
    loss(sharded).backward()
    loss(one).backward()
    gz = logits_gradient(z)
    move = per_element(bound, gz, dz)  # [N, 1]
    # Through the matmuls: each logit gradient's move times the other operand's magnitudes, plus the sums
    # themselves, over V (split by rank, then all-reduced) or over N, grouped differently on the two sides: any
    # order of n terms is within (n - 1) ulp of the sum of their magnitudes, so 2n ulp between two orders.
    grads_close(hid.grad, hid1.grad, move * w64.abs().sum(0) + 2 * V * eps * (gz @ w64.abs()), "dhidden")
    grads_close(w_local.grad, w1.grad[lo:hi],
                (move * h64.abs()).sum(0) + 2 * N * eps * (gz[:, lo:hi].T @ h64.abs()), "dweight")
    grads_close(b_local.grad, b1.grad[lo:hi], move.sum() + 2 * N * eps * gz[:, lo:hi].sum(0), "dbias")


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_the_full_vocabulary(world):
    """Every CPU backend (float64 on "torch", float32 on all) in one set of spawned ranks per world size."""
    cases = [("torch", torch.float64)] + [(b, torch.float32) for b in CPU_BACKENDS]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), cases, 0.7), nprocs=world, join=True)


def test_a_label_no_rank_holds_is_refused_or_nan():
    """Labels are global ids: one past the last rank's columns is refused by the default check (single rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            logits, labels = torch.randn(2, 5), torch.tensor([1, 5])
            with pytest.raises(ValueError, match="5"):
                token_logprobs_entropy(logits, labels, process_group=dist.group.WORLD, backend="torch")
            lp, h = token_logprobs_entropy(logits, labels, process_group=dist.group.WORLD, backend="torch",
                                           check_labels=False)
            assert torch.isnan(lp[1]) and torch.isnan(h[1]) and torch.isfinite(lp[0])
        finally:
            dist.destroy_process_group()
