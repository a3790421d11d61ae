"""The backend contract: what every kernel backend implements, checked by ``backends.get``.

A backend is a module (``torch_ref``, ``cpu``, ``cuda``, the ``triton`` package) with the attributes of
:class:`Backend`. Tensors are already validated and flattened by the public API: logits ``[N, V]`` with unit
stride along V (any row stride), hidden ``[N, D]`` with unit stride along D, labels ``[N]`` int64, weight
``[V, D]``, bias ``[V]`` or None.

Row statistics. The forward returns, besides the two fp32 outputs, ``stats``: fp32 ``[N, 2]`` holding per row
``(shift, log_sum)`` with ``log_sum = log sum_i exp(z_i - shift')`` where ``z = x / T`` and ``shift'`` is the
row max in the backend's own units (``stats[:, 0]``: the max of the scaled logits, or of the raw logits for
backends that scale differences, see each backend). The backward of the SAME backend reads them back to form
``log p_i = (z_i - shift) - log_sum`` without ever subtracting two large numbers: a single ``lse`` would lose
``ulp(lse)`` of absolute accuracy (0.06 at logits near 1e6), which ``log_softmax`` itself does not. Ignored rows
get ``stats = 0`` and are never read back. The stats are internal: they never leave the custom ops.

Numbers. Labels outside ``[0, V)`` that are not ``ignore_index`` give NaN outputs and NaN gradients for their
row (the ops check labels on the host first unless told not to, see ``check_labels``); a NaN anywhere in a row
gives NaN logprob, entropy and stats for that row; a row of all ``-inf`` gives NaN like ``torch.log_softmax``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from sirl_kernels.backends.rows import Coefficients, Extras

# (grad_hidden, grad_weight, grad_bias): which gradients the caller needs (autograd's needs_input_grad).
NeedsGrad = tuple[bool, bool, bool]


@runtime_checkable
class Backend(Protocol):
    """The functions every backend module defines (module-level functions; ``name`` a string)."""

    name: str
    stats_units: str  # "z": stats[:, 0] is the max of z = x / T; "x": the max of the raw logits x

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        """None if the backend can run on ``device`` (or on some device of this machine when None), else why not."""

    def logits_forward(self, logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
                       extras: Extras | None = None, batch_invariant: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(logprobs [N], entropy [N], stats [N, 2])``, all fp32 (float64 in, float64 out on "torch"); the
        outputs ``extras`` holds (self-certainty, varentropy: ``rows.Extras``) filled in the same pass when not
        None, their accumulators compiled in only then. ``batch_invariant``: every output of a row is bitwise the
        same whatever N, the other rows and the row's position (no split, tile or reduction strategy chosen from
        N: split-V kernels use ``_sizes.batch_invariant_splits(V)``)."""

    def logits_backward(self, coef: Coefficients, logits: Tensor, labels: Tensor, stats: Tensor, temperature: float,
                        ignore_index: int, out: Tensor | None = None) -> Tensor:
        """The backward form of ``rows.py``,
        ``dx_i = (p_i (alpha + beta L_i + gamma L_i^2) + delta + lam [i = y]) / T`` (``gamma`` and ``delta`` None
        when absent), w.r.t. the logits, in ``out`` (a new tensor in the logits' dtype when None). ``out`` may be
        ``logits`` itself: the in-place backward every backend supports (each element is read before it is
        overwritten). ``coef`` holds ``[N]`` contiguous tensors in the accumulation dtype (fp32; float64 for float64
        logits), formed and checked by the backward ops."""

    def linear_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                       temperature: float, ignore_index: int, chunk_size: int, extras: Extras | None = None,
                       batch_invariant: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The logits forward of ``hidden @ weight.T (+ bias)`` without holding more than ``chunk_size x V``
        logits (backends that keep logits tiles in registers hold none). ``batch_invariant``: as in
        ``logits_forward``, and whatever ``chunk_size``: each logit is summed over D in an order fixed per row
        (never a GEMM whose blocking depends on the number of rows)."""

    def linear_backward(self, coef: Coefficients, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                        labels: Tensor, stats: Tensor, temperature: float, ignore_index: int, chunk_size: int,
                        needs_grad: NeedsGrad) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(grad_hidden, grad_weight, grad_bias)`` of the backward form through ``hidden @ weight.T (+ bias)``, in
        the inputs' dtypes; None (and no buffer, no matmul) for each gradient ``needs_grad`` does not ask for.
        ``needs_grad[2]`` is False when ``bias`` is None."""


def _members(protocol: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(attributes, functions) that ``protocol`` declares, in declaration order."""
    attributes = tuple(protocol.__annotations__)
    functions = tuple(k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_"))
    return attributes, functions


# What check_backend requires: read off the Protocol, so the two never disagree.
ATTRIBUTES, FUNCTIONS = _members(Backend)


def check_backend(module: ModuleType) -> ModuleType:
    """Raises TypeError naming what a backend module lacks; returns it unchanged otherwise."""
    missing = [attr for attr in ATTRIBUTES + FUNCTIONS if not hasattr(module, attr)]
    not_callable = [attr for attr in FUNCTIONS if attr not in missing and not callable(getattr(module, attr))]
    not_str = [attr for attr in ATTRIBUTES if attr not in missing and not isinstance(getattr(module, attr), str)]
    if missing or not_callable or not_str:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"not callable: {', '.join(not_callable)}"] if not_callable else []
        problems += [f"`{attr}` is not a str" for attr in not_str]
        raise TypeError(f"backend module {module.__name__} breaks the backend contract: {'; '.join(problems)}")
    return module
