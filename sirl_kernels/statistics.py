"""Many per-token statistics of ``softmax(z)``, ``z = x / T``, in one pass: ``token_stats`` and ``linear_token_stats``.

One request names the statistics wanted (``STATISTICS``); the backends keep only the accumulators those need
(``backends/rows.py``: ``Extras``), and the backward of any weighted combination is the backends' one backward form
with coefficients formed here (:func:`coefficients`). Log-probs of K labels per row: the first label is read inside
the kernels; the others are ``(x_y - m) / T - log s`` from the row stats (a gather of K - 1 logits, or K - 1 dot
products on the fused-linear path), and their gradients add ``g_k / T`` at their columns after the kernels. A row
whose first label is ``ignore_index`` is ignored (every output 0, no gradient); a further label equal to
``ignore_index`` gets log-prob 0 and no gradient. docs/statistics.md derives every formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sirl_kernels import backends, ops
from sirl_kernels._checks import accumulation_dtype, check_label_tensor, check_label_values
from sirl_kernels.backends import fixed_order
from sirl_kernels.backends.rows import Extras, LinearRows, Rows

STATISTICS = ("logprobs", "entropy", "self_certainty", "varentropy", "lse")


@dataclass(frozen=True)
class TokenStats:
    """The statistics asked for, shaped like the labels' leading dims (``logprobs``: like the labels themselves);
    None for those not asked for. All differentiable."""

    logprobs: Tensor | None = None
    entropy: Tensor | None = None
    self_certainty: Tensor | None = None
    varentropy: Tensor | None = None
    lse: Tensor | None = None
    # DeepConf's token confidence, -mean of the k largest log-probs: not a kernel output (the kernels' requests are
    # STATISTICS); filled, detached, by sirl_kernels.hf.causal_lm_token_stats(confidence_k=k)
    top_k_confidence: Tensor | None = None


def wanted(want) -> frozenset[str]:
    want = (want,) if isinstance(want, str) else tuple(want)
    unknown = [w for w in want if w not in STATISTICS]
    if unknown or not want:
        raise ValueError(f"want must name statistics among {STATISTICS}, got {want!r}")
    return frozenset(want)


# --------------------------------------------------------------------------------------------------------------
# Shared by both ops: the extra labels, the outputs of a forward, the coefficients of a backward
# --------------------------------------------------------------------------------------------------------------
def _stats_scale(backend: str, temperature: float) -> float:
    """``stats[:, 0]`` times this is the row max in units of ``z`` (``Backend.stats_units``)."""
    return 1.0 if backends.get(backend).stats_units == "z" else 1.0 / temperature


def _row_outputs(label_logits: Tensor, labels: Tensor, first: Tensor, stats: Tensor, temperature: float,
                 ignore_index: int, backend: str, vocab: int) -> tuple[Tensor, Tensor]:
    """(logprobs [N, K], lse [N]): the first label's log-prob from the kernel, the others' from the row stats and
    their raw logits ``label_logits [N, K - 1]`` (accumulation dtype)."""
    inv_t = 1.0 / temperature
    scale = _stats_scale(backend, temperature)
    m, log_s = stats[:, :1], stats[:, 1:]
    if scale == 1.0:  # stats in z units: z_y - m - log s, z = x * (1/T) as the kernels form it
        rest = (label_logits * inv_t - m) - log_s
    else:
        rest = (label_logits - m) * inv_t - log_s
    extra = labels[:, 1:]
    row_ignored = labels[:, :1] == ignore_index
    skipped = (extra == ignore_index) | row_ignored
    readable = (extra >= 0) & (extra < vocab)
    rest = torch.where(skipped, torch.zeros_like(rest), torch.where(readable, rest, torch.full_like(rest, math.nan)))
    lse = (m * scale + log_s)[:, 0]
    lse = torch.where(torch.isneginf(m[:, 0]), torch.full_like(lse, math.nan), lse)  # all -inf: NaN, like the rest
    lse = torch.where(row_ignored[:, 0], torch.zeros_like(lse), lse)
    return torch.cat([first[:, None], rest], dim=1), lse


def _safe_extra(labels: Tensor, vocab: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(the extra labels clamped to a readable column, which of them count)."""
    extra = labels[:, 1:]
    ok = (extra != ignore_index) & (extra >= 0) & (extra < vocab) & (labels[:, :1] != ignore_index)
    return torch.where(ok, extra, torch.zeros_like(extra)), ok


def coefficients(grads, saved, vocab: int, want_sc: bool, want_ve: bool):
    """``(alpha, beta, lam, gamma, delta, g_extra)`` of the gradient of ``sum_k g_lp[k] logprob_k + g_H H + g_lse
    lse + g_SC SC + g_VE VE`` (``backends/rows.py``); ``g_extra [N, K - 1]`` the further labels' ``g_lp``, added at
    their columns by the caller. ``grads``: the upstream gradients of the op's outputs (None where unused)."""
    g_lp, g_h, _g_stats, g_lse, g_sc, g_ve = grads
    entropy, sc, ve, extra_ok = saved
    zero = torch.zeros_like(entropy)
    g_lp = torch.zeros((entropy.shape[0], extra_ok.shape[1] + 1), dtype=entropy.dtype, device=entropy.device) \
        if g_lp is None else g_lp.to(entropy.dtype)
    g_extra = torch.where(extra_ok, g_lp[:, 1:], torch.zeros_like(g_lp[:, 1:]))
    g_h = zero if g_h is None else g_h.to(entropy.dtype)
    alpha = -g_lp[:, 0] - g_extra.sum(1) - g_h * entropy
    beta = -g_h
    if g_lse is not None:
        alpha = alpha + g_lse.to(entropy.dtype)
    gamma = delta = None
    if want_sc and g_sc is not None:
        g_sc = g_sc.to(entropy.dtype)
        alpha = alpha + g_sc
        delta = -g_sc / vocab
    if want_ve and g_ve is not None:
        g_ve = g_ve.to(entropy.dtype)
        alpha = alpha + g_ve * (2 * entropy + entropy * entropy - ve)
        beta = beta + 2 * g_ve * (1 + entropy)
        gamma = g_ve
    return alpha, beta, g_lp[:, 0], gamma, delta, g_extra


def _fake_stats(like: Tensor, n: int, k: int, want_sc: bool, want_ve: bool):
    acc = accumulation_dtype(like.dtype)
    row = like.new_empty(n, dtype=acc)
    return (like.new_empty((n, k), dtype=acc), row, like.new_empty((n, 2), dtype=acc), torch.empty_like(row),
            like.new_empty(n if want_sc else 0, dtype=acc), like.new_empty(n if want_ve else 0, dtype=acc))


def _extras(n: int, acc, device, want_sc: bool, want_ve: bool) -> tuple[Extras, Tensor, Tensor]:
    sc = torch.empty(n if want_sc else 0, dtype=acc, device=device)
    ve = torch.empty(n if want_ve else 0, dtype=acc, device=device)
    return Extras(sc if want_sc else None, ve if want_ve else None), sc, ve


def _check_stats_labels(labels: Tensor, rows: int, device) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.shape[1] < 1:
        raise ValueError(f"labels must be an [N, K] tensor with K >= 1, got {getattr(labels, 'shape', labels)}")
    check_label_tensor(labels, (rows, labels.shape[1]), device, exact_dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------------
# token_stats: logits [N, V], labels [N, K] -> logprobs [N, K], entropy, stats [N, 2], lse, sc [N|0], ve [N|0]
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sirl_kernels::token_stats", mutates_args=())
def token_stats_op(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, backend: str,
                   self_certainty: bool, varentropy: bool, check_labels: bool = True, batch_invariant: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_stats_labels(labels, logits.shape[0], logits.device)
    logits, backend = ops._logits_inputs(logits, labels[:, 0].contiguous(), temperature, ignore_index, backend)
    if check_labels:
        check_label_values(labels.reshape(-1), logits.shape[-1], ignore_index)
    acc = accumulation_dtype(logits.dtype)
    extras, sc, ve = _extras(logits.shape[0], acc, logits.device, self_certainty, varentropy)
    rows = Rows(logits, labels[:, 0].contiguous(), temperature, ignore_index)
    first, entropy, stats = backends.get(backend).logits_forward(rows, extras, batch_invariant=batch_invariant)
    safe, _ = _safe_extra(labels, logits.shape[-1], ignore_index)
    label_logits = logits.gather(1, safe).to(acc)
    logprobs, lse = _row_outputs(label_logits, labels, first, stats, temperature, ignore_index, backend,
                                 logits.shape[-1])
    return logprobs, entropy, stats, lse, sc, ve


@token_stats_op.register_fake
def _(logits, labels, temperature, ignore_index, backend, self_certainty, varentropy, check_labels=True,
      batch_invariant=False):
    return _fake_stats(logits, logits.shape[0], labels.shape[-1], self_certainty, varentropy)


def _stats_setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, backend, want_sc, want_ve = inputs[:7]
    _, entropy, stats, _, sc, ve = output
    ctx.mark_non_differentiable(stats)
    _, extra_ok = _safe_extra(labels, logits.shape[-1], ignore_index)
    ctx.save_for_backward(logits, labels, stats, entropy, sc, ve, extra_ok)
    ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
    ctx.want_sc, ctx.want_ve = want_sc, want_ve


# The further labels' weight rows are gathered a block of rows at a time: at most this many values ([rows, K - 1, D])
# at once (32 MiB in fp32), not [N, K - 1, D] (2.1 GB in bf16 at N = 4096, K = 64, D = 4096).
GATHER_ELEMENTS = 8 * 1024 * 1024


def gather_chunks(n: int, per_row: int):
    """Row slices of at most ``GATHER_ELEMENTS // per_row`` rows (at least one) covering ``range(n)``."""
    step = max(1, GATHER_ELEMENTS // max(1, per_row))
    return (slice(s, min(s + step, n)) for s in range(0, n, step))


def add_label_terms(grad: Tensor, labels: Tensor, extra_ok: Tensor, g_extra: Tensor, inv_t: float) -> None:
    """``grad[r, y_k] += g_k / T`` for the further labels, one rounding each, in label order (repeats add up)."""
    safe = torch.where(extra_ok, labels[:, 1:], torch.zeros_like(labels[:, 1:]))
    rows = torch.arange(grad.shape[0], device=grad.device)
    for k in range(safe.shape[1]):
        col = safe[:, k]
        add = torch.where(extra_ok[:, k], g_extra[:, k] * inv_t, torch.zeros_like(g_extra[:, k]))
        grad[rows, col] = (grad[rows, col].to(add.dtype) + add).to(grad.dtype)


def linear_label_terms(grads, hidden: Tensor, weight: Tensor, labels: Tensor, extra_ok: Tensor, g_extra: Tensor,
                       inv_t: float):
    """The further labels' ``g_k / T`` at their columns, through ``hidden @ weight.T + bias`` by hand: into
    ``(d_hidden, d_weight, d_bias)`` (None where not needed), accumulated in fp32, returned in their dtypes."""
    d_hidden, d_weight, d_bias = grads
    safe = torch.where(extra_ok, labels[:, 1:], torch.zeros_like(labels[:, 1:]))
    scaled = torch.where(extra_ok, g_extra * inv_t, torch.zeros_like(g_extra))  # [N, K - 1]
    acc = scaled.dtype
    chunks = list(gather_chunks(safe.shape[0], safe.shape[1] * hidden.shape[1]))
    if d_hidden is not None and d_hidden.numel():
        d_hidden = d_hidden.to(acc)
        for rows in chunks:
            d_hidden[rows] += torch.einsum("nk,nkd->nd", scaled[rows], weight[safe[rows]].to(acc))
        d_hidden = d_hidden.to(grads[0].dtype)
    if d_weight is not None and d_weight.numel():
        d_weight = d_weight.to(acc)
        for rows in chunks:
            part = (scaled[rows, :, None] * hidden[rows].to(acc)[:, None, :]).reshape(-1, hidden.shape[1])
            d_weight.index_add_(0, safe[rows].reshape(-1), part)
        d_weight = d_weight.to(grads[1].dtype)
    if d_bias is not None and d_bias.numel():
        d_bias = d_bias.to(acc).index_add_(0, safe.reshape(-1), scaled.reshape(-1)).to(d_bias.dtype)
    return d_hidden, d_weight, d_bias


def _stats_backward(ctx, *grads):
    logits, labels, stats, entropy, sc, ve, extra_ok = ctx.saved_tensors
    alpha, beta, lam, gamma, delta, g_extra = coefficients(grads, (entropy, sc, ve, extra_ok), logits.shape[-1],
                                                           ctx.want_sc, ctx.want_ve)
    grad = ops.token_stats_backward_op(alpha, beta, lam, logits, labels[:, 0].contiguous(), stats, ctx.temperature,
                                       ctx.ignore_index, ctx.backend, gamma, delta)
    if labels.shape[1] > 1:
        add_label_terms(grad, labels, extra_ok, g_extra, 1.0 / ctx.temperature)
    return grad, None, None, None, None, None, None, None, None


token_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)


# --------------------------------------------------------------------------------------------------------------
# linear_token_stats: hidden [N, D], weight [V, D], bias [V]?, labels [N, K] -> as token_stats
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sirl_kernels::linear_token_stats", mutates_args=())
def linear_token_stats_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                          ignore_index: int, backend: str, chunk_size: int, self_certainty: bool, varentropy: bool,
                          check_labels: bool = True, batch_invariant: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_stats_labels(labels, hidden.shape[0], hidden.device)
    first_label = labels[:, 0].contiguous()
    hidden, weight, bias, backend = ops._linear_inputs(hidden, weight, bias, first_label, temperature, ignore_index,
                                                       backend, chunk_size)
    if check_labels:
        check_label_values(labels.reshape(-1), weight.shape[0], ignore_index)
    acc = accumulation_dtype(hidden.dtype)
    extras, sc, ve = _extras(hidden.shape[0], acc, hidden.device, self_certainty, varentropy)
    rows = LinearRows(hidden, weight, bias, first_label, temperature, ignore_index)
    first, entropy, stats = backends.get(backend).linear_forward(rows, chunk_size, extras,
                                                                 batch_invariant=batch_invariant)
    safe, _ = _safe_extra(labels, weight.shape[0], ignore_index)
    # the further labels' logits, fp32-accumulated like the kernels' (in another order: within fp32 rounding)
    if batch_invariant:
        label_logits = fixed_order.gathered_logits(hidden, weight, safe)
    else:
        label_logits = torch.empty(safe.shape, dtype=acc, device=hidden.device)
        for rows in gather_chunks(safe.shape[0], safe.shape[1] * hidden.shape[1]):
            label_logits[rows] = torch.einsum("nd,nkd->nk", hidden[rows].to(acc), weight[safe[rows]].to(acc))
    if bias is not None:
        label_logits = label_logits + bias[safe].to(acc)
    logprobs, lse = _row_outputs(label_logits, labels, first, stats, temperature, ignore_index, backend,
                                 weight.shape[0])
    return logprobs, entropy, stats, lse, sc, ve


@linear_token_stats_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, backend, chunk_size, self_certainty, varentropy,
      check_labels=True, batch_invariant=False):
    return _fake_stats(hidden, hidden.shape[0], labels.shape[-1], self_certainty, varentropy)


def _linear_stats_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, backend, chunk_size, want_sc, want_ve = inputs[:10]
    _, entropy, stats, _, sc, ve = output
    ctx.mark_non_differentiable(stats)
    _, extra_ok = _safe_extra(labels, weight.shape[0], ignore_index)
    ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy, sc, ve, extra_ok)
    ctx.temperature, ctx.ignore_index, ctx.backend, ctx.chunk_size = temperature, ignore_index, backend, chunk_size
    ctx.want_sc, ctx.want_ve = want_sc, want_ve


def _linear_stats_backward(ctx, *grads):
    hidden, weight, bias, labels, stats, entropy, sc, ve, extra_ok = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    alpha, beta, lam, gamma, delta, g_extra = coefficients(grads, (entropy, sc, ve, extra_ok), weight.shape[0],
                                                           ctx.want_sc, ctx.want_ve)
    d_hidden, d_weight, d_bias = ops.linear_token_stats_backward_op(
        alpha, beta, lam, hidden, weight, bias, labels[:, 0].contiguous(), stats, ctx.temperature, ctx.ignore_index,
        ctx.backend, ctx.chunk_size, need_hidden, need_weight, need_bias, gamma, delta)
    if labels.shape[1] > 1:
        d_hidden, d_weight, d_bias = linear_label_terms((d_hidden, d_weight, d_bias), hidden, weight, labels, extra_ok,
                                                        g_extra, 1.0 / ctx.temperature)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None,
            None, None, None, None, None, None, None, None, None)


linear_token_stats_op.register_autograd(_linear_stats_backward, setup_context=_linear_stats_setup_context)


def result(values: dict, want: frozenset[str], labels: Tensor, k_labels: bool) -> TokenStats:
    """The :class:`TokenStats` of flat ``values`` (``[N, K]`` log-probs, ``[N]`` the others), shaped like the
    caller's labels, with the statistics ``want`` names."""
    lead = labels.shape[:-1] if k_labels else labels.shape
    logprobs = values["logprobs"]
    shaped = {**values, "logprobs": logprobs.view(labels.shape) if k_labels else logprobs[:, 0].view(lead)}
    return TokenStats(**{name: (shaped[name] if name == "logprobs" else shaped[name].view(lead))
                         for name in STATISTICS if name in want})
