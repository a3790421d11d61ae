"""Log-prob and entropy of a vocabulary sharded over a process group (tensor-parallel ``lm_head``, Megatron style).

Rank r holds a contiguous range of the vocabulary, in rank order: its logits columns (or ``weight`` rows) are global
ids ``[start_r, start_r + V_r)``. Each rank runs the ordinary op on its columns with the label moved into its range
(any column where another rank owns it) and keeps its row stats ``(m_r, log s_r)`` and entropy ``H_r``. One
``all_gather`` of 5 + K floats per row (m, log s, H, SC, VE, the K labels' local log-probs; one more of the ranks'
vocabulary sizes per call) gives every rank every rank's state, merged **in rank order** on every rank, so
all ranks hold the same bits whatever the collective's own order. With ``k = 1`` (stats in units of ``z = x / T``)
or ``1 / T`` (raw units), ``M = max_r m_r``, ``a_r = log s_r + k (m_r - M)``, ``log S = log sum_r e^{a_r}`` and
``pi_r = e^{a_r - log S}`` (rank r's share of the probability):

    log p_y = lp_owner + a_owner - log S              (lp_owner = the owner's local log-prob, exact)
    H       = sum_r pi_r (H_r + log S - a_r)           (the mixture's entropy: within plus between ranks)

and the global row stats ``(M, log S)`` in the backend's units. A rank whose columns are all ``-inf`` in a row (vocab
padding) has ``a_r = -inf`` and contributes nothing. The backward is the backends' one backward form on each rank's
columns with the merged stats and entropy (``backends/rows.py``), ``lam = 0`` on the ranks that do not own the label;
on the fused-linear path the hidden states are replicated over the group, so their gradient is summed over it (as
Megatron's ``copy_to_tensor_model_parallel_region`` does) and every rank gets the same.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from sirl_kernels import backends, ops, statistics
from sirl_kernels._checks import (
    check_label_tensor,
    check_label_values,
    check_linear_args,
    check_logits_args,
    dense_rows,
)
from sirl_kernels._sizes import default_linear_chunk_size

class Shard:
    """Where this rank's columns sit in the global vocabulary, and which rank owns each label."""

    def __init__(self, group, local_vocab: int, device: torch.device):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        sizes = _gather(torch.tensor([float(local_vocab)], dtype=torch.float64, device=device), group)
        self.sizes = [int(v) for v in sizes.view(-1).tolist()]
        if min(self.sizes) < 1:
            raise ValueError(f"every rank of the vocabulary-parallel group must hold >= 1 column, got {self.sizes}")
        self.starts = [sum(self.sizes[:r]) for r in range(self.world)]
        self.start = self.starts[self.rank]
        self.vocab = sum(self.sizes)

    def split_labels(self, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For ``labels [N, K]`` (global ids): (local labels, owner rank, mine, counted). A label this rank does not
        own becomes local column 0 (its ``lam`` is 0 here); an ignored row's first label stays ``ignore_index``.
        ``counted``: the labels that get a log-prob and a gradient (not ignored, in range, their row not ignored)."""
        row_kept = labels[:, :1] != ignore_index
        counted = row_kept & (labels != ignore_index) & (labels >= 0) & (labels < self.vocab)
        starts = torch.tensor(self.starts[1:], dtype=labels.dtype, device=labels.device)
        owner = torch.where(counted, torch.bucketize(labels, starts, right=True), torch.zeros_like(labels))
        mine = counted & (owner == self.rank)
        local = torch.where(mine, labels - self.start, torch.zeros_like(labels))
        local[:, 0] = torch.where(row_kept[:, 0], local[:, 0], labels[:, 0])
        return local, owner, mine, counted


def _gather(t: Tensor, group) -> Tensor:
    """``[world, *t.shape]``: every rank's ``t``, in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _in_rank_order(values: Tensor) -> Tensor:
    """``sum`` over the leading (rank) axis, added in rank order: the same bits on every rank."""
    total = torch.zeros_like(values[0])
    for r in range(values.shape[0]):
        total = total + values[r]
    return total


def _merge(state: Tensor, sizes: list[int], owner: Tensor, units_scale: float, want: frozenset[str]) -> dict:
    """Every rank's ``state [world, N, 5 + K]`` (m, log s, H, SC, VE, log p of the K labels, local) -> the global
    statistics and row stats, the same bits on every rank (module docstring)."""
    m, log_s, h = state[..., 0], state[..., 1], state[..., 2]
    empty = m == float("-inf")  # a rank whose columns are all -inf in this row: nothing to add
    big = m.amax(0)
    a = torch.where(empty, torch.full_like(m, float("-inf")), log_s + units_scale * (m - big))
    top = a.amax(0)
    log_big_s = top + torch.log(_in_rank_order(torch.exp(a - top)))
    share = torch.exp(a - log_big_s)

    def weighted(values):  # sum_r pi_r values_r, ranks with pi_r = 0 left out (their values may be NaN)
        return _in_rank_order(torch.where(share == 0, torch.zeros_like(share), share * values))

    out = {"stats": torch.stack([big, log_big_s], dim=1), "lse": big * units_scale + log_big_s}
    entropy = weighted(h + log_big_s - a).clamp_min(0.0)
    out["entropy"] = entropy
    if "self_certainty" in want:  # mean(z - M) from each rank's mean(z - m_r) = log s_r - SC_r - log V_r
        v = torch.tensor(sizes, dtype=state.dtype, device=state.device)[:, None]
        local_mean = log_s - state[..., 3] - torch.log(v)  # an all -inf rank: mean -inf, so SC = +inf
        local_mean = torch.where(empty, torch.full_like(local_mean, float("-inf")), local_mean)
        mean = _in_rank_order((v / v.sum()) * (local_mean + units_scale * (m - big)))
        out["self_certainty"] = log_big_s - mean - math.log(sum(sizes))
    if "varentropy" in want:  # the law of total variance over ranks: within, plus between (log pi_r - H_r + H)
        out["varentropy"] = weighted(state[..., 4] + (a - log_big_s - h + entropy) ** 2).clamp_min(0.0)
    lp = state[..., 5:]  # [world, N, K]
    lp_owner = lp.gather(0, owner[None]).squeeze(0)
    a_owner = a[..., None].expand_as(lp).gather(0, owner[None]).squeeze(0)
    # a label on a rank whose columns are all -inf in the row has p = 0 (that rank's own state is NaN: empty)
    out["logprobs"] = torch.where(a_owner == float("-inf"), torch.full_like(lp_owner, float("-inf")),
                                  lp_owner + a_owner - log_big_s[:, None])
    return out


def _finish(out: dict, labels: Tensor, counted: Tensor, ignore_index: int) -> dict:
    """0 on ignored rows (and on ignored further labels), NaN for labels no rank holds (unchecked labels)."""
    row_ignored = labels[:, 0] == ignore_index
    bad = ~counted & (labels != ignore_index) & ~row_ignored[:, None]
    lp = torch.where(bad, torch.full_like(out["logprobs"], math.nan), out["logprobs"])
    out["logprobs"] = torch.where(counted | bad, lp, torch.zeros_like(lp))
    row_bad = bad[:, 0]
    for name in ("entropy", "lse", "self_certainty", "varentropy"):
        if name in out:
            value = torch.where(row_bad, torch.full_like(out[name], math.nan), out[name])
            out[name] = torch.where(row_ignored, torch.zeros_like(value), value)
    return out


class _VocabParallelStats(torch.autograd.Function):
    """Forward: the local statistics op, one all_gather, the merge. Backward: the backends' backward form on this
    rank's columns with the merged statistics (``lam`` and the further labels' terms only where this rank owns
    the label)."""

    @staticmethod
    def forward(ctx, local_input, weight, bias, labels, shard, temperature, ignore_index, backend, chunk_size, want,
                batch_invariant=False):
        local, owner, mine, counted = shard.split_labels(labels, ignore_index)
        want_sc, want_ve = "self_certainty" in want, "varentropy" in want
        if weight is None:
            lp, h, stats, _, sc, ve = statistics.token_stats_op(local_input, local, temperature, ignore_index, backend,
                                                                want_sc, want_ve, False, batch_invariant)
        else:
            lp, h, stats, _, sc, ve = statistics.linear_token_stats_op(
                local_input, weight, bias, local, temperature, ignore_index, backend, chunk_size, want_sc, want_ve,
                False, batch_invariant)
        fill = torch.zeros_like(h)
        state = torch.cat([torch.stack([stats[:, 0], stats[:, 1], h, sc if want_sc else fill,
                                        ve if want_ve else fill], dim=1), lp], dim=1)
        units_scale = 1.0 if backends.get(backend).stats_units == "z" else 1.0 / temperature
        out = _finish(_merge(_gather(state, shard.group), shard.sizes, owner, units_scale, want), labels, counted,
                      ignore_index)
        ctx.save_for_backward(local_input, weight, bias, local, out["stats"], out["entropy"],
                              out.get("varentropy", fill), mine, counted)
        ctx.shard, ctx.temperature, ctx.ignore_index, ctx.backend, ctx.chunk_size = (
            shard, temperature, ignore_index, backend, chunk_size)
        ctx.want_sc, ctx.want_ve = want_sc, want_ve
        ctx.mark_non_differentiable(out["stats"])
        return (out["logprobs"], out["entropy"], out["lse"], out.get("self_certainty", fill),
                out.get("varentropy", fill))

    @staticmethod
    def backward(ctx, g_lp, g_h, g_lse, g_sc, g_ve):
        local_input, weight, bias, local, stats, entropy, ve, mine, counted = ctx.saved_tensors
        # the global coefficients (statistics.coefficients with every rank's labels counted), then this rank's part:
        # lam and the further labels' columns only where it owns the label, delta over the global vocabulary
        grads = (None if g_lp is None else torch.where(counted, g_lp, torch.zeros_like(g_lp)), g_h, None, g_lse,
                 g_sc, g_ve)
        alpha, beta, lam, gamma, delta, g_extra = statistics.coefficients(
            grads, (entropy, None, ve, counted[:, 1:]), ctx.shard.vocab, ctx.want_sc, ctx.want_ve)
        lam = torch.where(mine[:, 0], lam, torch.zeros_like(lam))
        first = local[:, 0].contiguous()
        args = (ctx.temperature, ctx.ignore_index, ctx.backend)
        if weight is None:
            grad = ops.token_stats_backward_op(alpha, beta, lam, local_input, first, stats, *args, gamma, delta)
            if local.shape[1] > 1:
                statistics.add_label_terms(grad, local, mine[:, 1:], g_extra, 1.0 / ctx.temperature)
            return grad, None, None, None, None, None, None, None, None, None, None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = ops.linear_token_stats_backward_op(alpha, beta, lam, local_input, weight, bias, first, stats, *args,
                                                   ctx.chunk_size, need_hidden, need_weight, need_bias, gamma, delta)
        if local.shape[1] > 1:
            grads = statistics.linear_label_terms(grads, local_input, weight, local, mine[:, 1:], g_extra,
                                                  1.0 / ctx.temperature)
        grad_hidden, grad_weight, grad_bias = grads
        if need_hidden:  # the hidden states are replicated over the group: their gradient is the sum over it, in fp32
            summed = grad_hidden.to(stats.dtype)
            dist.all_reduce(summed, group=ctx.shard.group)
            grad_hidden = summed.to(grad_hidden.dtype)
        return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
                grad_bias if need_bias else None, None, None, None, None, None, None, None, None)


def token_stats(logits: Tensor, labels: Tensor, *, process_group, want=("logprobs", "entropy"),
                temperature: float = 1.0, ignore_index: int = -100, backend: str = "auto", check_labels: bool = True,
                batch_invariant: bool = False) -> statistics.TokenStats:
    """:func:`sirl_kernels.token_stats` with the vocabulary sharded over ``process_group``: this rank's
    ``logits [..., V_r]`` are the global columns after those of the lower ranks; ``labels`` (``[...]`` or
    ``[..., K]``) are global ids, the same on every rank. The global statistics, the same bits on every rank."""
    names = statistics.wanted(want)
    temperature, ignore_index = check_logits_args(logits, temperature, ignore_index)
    k_labels = labels.dim() == logits.dim()
    check_label_tensor(labels, logits.shape[:-1] + ((labels.shape[-1],) if k_labels else ()), logits.device)
    name = backends.resolve(backend, logits.device, logits.dtype)
    shard = Shard(process_group, logits.shape[-1], logits.device)
    flat = labels.reshape(-1, labels.shape[-1] if k_labels else 1).long()
    if check_labels:
        check_label_values(flat.reshape(-1), shard.vocab, ignore_index)
    outputs = _VocabParallelStats.apply(dense_rows(logits), None, None, flat, shard, temperature, ignore_index, name,
                                        0, names, batch_invariant)
    return statistics.result(dict(zip(("logprobs", "entropy", "lse", "self_certainty", "varentropy"), outputs)),
                             names, labels, k_labels)


def linear_token_stats(hidden: Tensor, weight: Tensor, labels: Tensor, *, process_group,
                       want=("logprobs", "entropy"), bias: Tensor | None = None, temperature: float = 1.0,
                       ignore_index: int = -100, backend: str = "auto", chunk_size: int | None = None,
                       check_labels: bool = True, batch_invariant: bool = False) -> statistics.TokenStats:
    """:func:`sirl_kernels.linear_token_stats` with ``weight [V_r, D]`` (and ``bias [V_r]``) this rank's rows of a
    vocabulary sharded over ``process_group`` in rank order; ``hidden`` and ``labels`` (global ids) are the same on
    every rank. The gradient of ``hidden`` is summed over the group; ``weight`` and ``bias`` get their own rows'."""
    names = statistics.wanted(want)
    temperature, ignore_index = check_linear_args(hidden, weight, bias, temperature, ignore_index)
    k_labels = labels.dim() == hidden.dim()
    check_label_tensor(labels, hidden.shape[:-1] + ((labels.shape[-1],) if k_labels else ()), hidden.device)
    name = backends.resolve(backend, hidden.device, hidden.dtype)
    shard = Shard(process_group, weight.shape[0], hidden.device)
    flat = labels.reshape(-1, labels.shape[-1] if k_labels else 1).long()
    if check_labels:
        check_label_values(flat.reshape(-1), shard.vocab, ignore_index)
    if chunk_size is None:
        chunk_size = default_linear_chunk_size(weight.shape[0], name, hidden.dtype)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    outputs = _VocabParallelStats.apply(dense_rows(hidden), dense_rows(weight), bias, flat, shard, temperature,
                                        ignore_index, name, int(chunk_size), names, batch_invariant)
    return statistics.result(dict(zip(("logprobs", "entropy", "lse", "self_certainty", "varentropy"), outputs)),
                             names, labels, k_labels)


def token_logprobs_entropy(logits: Tensor, labels: Tensor, *, process_group, temperature: float = 1.0,
                           ignore_index: int = -100, backend: str = "auto", check_labels: bool = True,
                           batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`sirl_kernels.token_logprobs_entropy` with the vocabulary sharded over ``process_group`` (see
    :func:`token_stats`)."""
    out = token_stats(logits, labels, process_group=process_group, temperature=temperature,
                      ignore_index=ignore_index, backend=backend, check_labels=check_labels,
                      batch_invariant=batch_invariant)
    return out.logprobs, out.entropy


def linear_token_logprobs_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, process_group,
                                  bias: Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                                  backend: str = "auto", chunk_size: int | None = None, check_labels: bool = True,
                                  batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`sirl_kernels.linear_token_logprobs_entropy` with the vocabulary sharded over ``process_group`` (see
    :func:`linear_token_stats`)."""
    out = linear_token_stats(hidden, weight, labels, process_group=process_group, bias=bias,
                             temperature=temperature, ignore_index=ignore_index, backend=backend,
                             chunk_size=chunk_size, check_labels=check_labels, batch_invariant=batch_invariant)
    return out.logprobs, out.entropy
