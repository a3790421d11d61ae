"""The one backward form every backend implements, and the per-row coefficients that select what it differentiates.

For a row with label y, row stats (the raw logits' max m, log s) and ``L_i = log p_i = (x_i - m) / T - log s``, a
backward writes, for per-row coefficients ``alpha``, ``beta``, ``lam``,

    dx_i = ( p_i (alpha + beta L_i + gamma L_i^2) + delta + lam [i = y] ) / T

the label's column as ``( p_y (alpha + lam + beta L_y + gamma L_y^2) - lam expm1(L_y) + delta ) / T`` (so
``lam (1 - p_y)`` stays exact when ``p_y -> 1``), columns with ``p_i = 0`` (a ``-inf`` logit) exactly ``delta / T``,
ignored rows 0 and rows whose label is outside ``[0, V)`` NaN. With ``lam = 0`` the label is only a column like the
others; ``gamma`` and ``delta`` are None (absent terms) unless varentropy or self-certainty is differentiated.

Upstream gradients map onto it (docs/statistics.md derives each; ``L``'s mean is ``-H``, ``VE`` the varentropy):

- ``g_lp * log p_y``: ``alpha = -g_lp``, ``lam = g_lp``;
- ``g_H * H``: ``alpha = -g_H H``, ``beta = -g_H``;
- ``g * lse`` (of ``z = x / T``): ``alpha = g``;
- ``g_SC * SC`` (self-certainty): ``alpha = g_SC``, ``delta = -g_SC / V``;
- ``g_VE * VE``: ``alpha = g_VE (2 H + H^2 - VE)``, ``beta = 2 g_VE (1 + H)``, ``gamma = g_VE``;

and they add. The vocabulary-parallel op uses the same kernels on each rank's columns, with ``lam = 0`` on the ranks
that do not own the label.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Rows(NamedTuple):
    """The rows a logits kernel reads: the Python side of the C ABI's ``sirl_rows`` (``csrc/include/sirl/c_api.h``).

    ``logits`` ``[N, V]`` with unit stride along V (any row stride); ``labels`` ``[N]`` int64, the label each row's
    kernel reads (the first of K); ``temperature`` > 0 (``z = x / T``); ``ignore_index`` the label of an ignored
    row (zero outputs, zero stats, zero gradient). A label outside ``[0, V)`` that is not ``ignore_index`` gives
    NaN outputs and a NaN gradient row, never a read outside the row."""

    logits: Tensor
    labels: Tensor
    temperature: float
    ignore_index: int

    def rows(self, start: int, end: int) -> "Rows":
        """Rows ``start:end`` (a chunk)."""
        return self._replace(logits=self.logits[start:end], labels=self.labels[start:end])


class LinearRows(NamedTuple):
    """The rows of the fused linear: logits ``hidden @ weight.T (+ bias)`` never held whole. ``hidden`` ``[N, D]``
    and ``weight`` ``[V, D]`` with unit stride along D, ``bias`` ``[V]`` or None; the rest as in :class:`Rows`."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    temperature: float
    ignore_index: int

    def rows(self, start: int, end: int) -> "LinearRows":
        """Rows ``start:end`` (a chunk): the same weight and bias."""
        return self._replace(hidden=self.hidden[start:end], labels=self.labels[start:end])

    def of_logits(self, logits: Tensor) -> Rows:
        """The :class:`Rows` of these rows' logits, once formed (``logits`` ``[N, V]``)."""
        return Rows(logits, self.labels, self.temperature, self.ignore_index)


class RowOutputs(NamedTuple):
    """What a forward returns, ``[N]`` each in the accumulation dtype (fp32; float64 for float64 inputs on
    "torch"): the first label's log-prob, the entropy, and the row stats ``[N, 2]`` that only the same backend's
    backward reads back (``contract.py``). Self-certainty and varentropy go to the caller's ``Extras``."""

    logprobs: Tensor
    entropy: Tensor
    stats: Tensor


class Coefficients(NamedTuple):
    """Per-row coefficients of the backward form, ``[N]`` each, contiguous, in the accumulation dtype (fp32; float64
    for float64 inputs). ``gamma`` (varentropy) and ``delta`` (self-certainty) are None when their term is absent:
    backends then run the code without it."""

    alpha: Tensor
    beta: Tensor
    lam: Tensor
    gamma: Tensor | None = None
    delta: Tensor | None = None

    def rows(self, start: int, end: int) -> "Coefficients":
        """The coefficients of rows ``start:end`` (a chunk)."""
        return Coefficients(*(None if c is None else c[start:end] for c in self))


class Extras(NamedTuple):
    """Optional per-row outputs of a forward, ``[N]`` fp32 (float64 on "torch" for float64 inputs) tensors the
    backend fills, or None when not wanted (the backend then keeps no accumulator for them). With ``z = x / T``:

    - ``self_certainty = KL(U || p) = lse(z) - mean(z) - log V`` (``+inf`` when the row has a ``-inf`` logit);
    - ``varentropy = Var_p[log p] = sum_i p_i (log p_i)^2 - H^2`` (clamped at 0).

    Ignored rows get 0, rows with a label outside ``[0, V)`` NaN, NaN rows and all ``-inf`` rows NaN."""

    self_certainty: Tensor | None = None
    varentropy: Tensor | None = None

    def rows(self, start: int, end: int) -> "Extras":
        return Extras(*(None if c is None else c[start:end] for c in self))


def logprob_entropy_coefficients(grad_logprobs: Tensor, grad_entropy: Tensor, entropy: Tensor,
                                 grad_lse: Tensor | None = None) -> Coefficients:
    """The coefficients of ``g_lp * log p_y + g_H * H (+ g_lse * lse)``, from the upstream gradients and the forward's
    entropy (``[N]`` each, the accumulation dtype)."""
    alpha = -grad_logprobs - grad_entropy * entropy
    if grad_lse is not None:
        alpha = alpha + grad_lse
    return Coefficients(alpha.contiguous(), (-grad_entropy).contiguous(), grad_logprobs.contiguous())
