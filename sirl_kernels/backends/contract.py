"""The backend contract: what every kernel backend implements, checked by ``backends.get``.

A backend is a module (``torch_ref``, ``cpu``, ``cuda``, the ``triton`` package) with the attributes of
:class:`Backend`. Tensors are already validated and flattened by the public API and arrive as one named tuple
(``rows.Rows``: logits ``[N, V]`` with unit stride along V, any row stride, labels ``[N]`` int64, temperature,
ignore_index, the C ABI's ``sirl_rows``; ``rows.LinearRows``: hidden ``[N, D]`` with unit stride along D, weight
``[V, D]``, bias ``[V]`` or None, labels, temperature, ignore_index); forwards return ``rows.RowOutputs``.

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

import inspect
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from sirl_kernels.backends.rows import Coefficients, Extras, LinearRows, RowOutputs, Rows

# (grad_hidden, grad_weight, grad_bias): which gradients the caller needs (autograd's needs_input_grad).
NeedsGrad = tuple[bool, bool, bool]


@runtime_checkable
class Backend(Protocol):
    """The functions every backend module defines (module-level functions; ``name`` a string)."""

    name: str
    stats_units: str  # "z": stats[:, 0] is the max of z = x / T; "x": the max of the raw logits x

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        """None if the backend can run on ``device`` (or on some device of this machine when None), else why not."""

    def logits_forward(self, rows: Rows, extras: Extras | None = None, batch_invariant: bool = False) -> RowOutputs:
        """``RowOutputs(logprobs [N], entropy [N], stats [N, 2])``, all fp32 (float64 in, float64 out on "torch");
        the outputs ``extras`` holds (self-certainty, varentropy: ``rows.Extras``) filled in the same pass when not
        None, their accumulators compiled in only then. ``batch_invariant``: every output of a row is bitwise the
        same whatever N, the other rows and the row's position (no split, tile or reduction strategy chosen from
        N: split-V kernels use ``_sizes.batch_invariant_splits(V)``)."""

    def logits_backward(self, rows: Rows, stats: Tensor, coef: Coefficients, out: Tensor | None = None) -> Tensor:
        """The backward form of ``rows.py``,
        ``dx_i = (p_i (alpha + beta L_i + gamma L_i^2) + delta + lam [i = y]) / T`` (``gamma`` and ``delta`` None
        when absent), w.r.t. the logits, in ``out`` (a new tensor in the logits' dtype when None), from the
        ``stats`` of the same backend's forward of ``rows``. ``out`` may be ``rows.logits`` itself: the in-place
        backward every backend supports (each element is read before it is overwritten). ``coef`` holds ``[N]``
        contiguous tensors in the accumulation dtype (fp32; float64 for float64 logits), formed and checked by the
        backward ops."""

    def linear_forward(self, rows: LinearRows, chunk_size: int, extras: Extras | None = None,
                       batch_invariant: bool = False) -> RowOutputs:
        """The logits forward of ``hidden @ weight.T (+ bias)`` without holding more than ``chunk_size x V``
        logits (backends that keep logits tiles in registers hold none). ``batch_invariant``: as in
        ``logits_forward``, and whatever ``chunk_size``: each logit is summed over D in an order fixed per row
        (never a GEMM whose blocking depends on the number of rows)."""

    def linear_backward(self, rows: LinearRows, stats: Tensor, coef: Coefficients, chunk_size: int,
                        needs_grad: NeedsGrad) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(grad_hidden, grad_weight, grad_bias)`` of the backward form through ``hidden @ weight.T (+ bias)``, in
        the inputs' dtypes; None (and no buffer, no matmul) for each gradient ``needs_grad`` does not ask for.
        ``needs_grad[2]`` is False when ``rows.bias`` is None."""


def _members(protocol: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(attributes, functions) that ``protocol`` declares, in declaration order."""
    attributes = tuple(protocol.__annotations__)
    functions = tuple(k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_"))
    return attributes, functions


# What check_backend requires: read off the Protocol, so the two never disagree.
ATTRIBUTES, FUNCTIONS = _members(Backend)


def _parameters(fn) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
        return None


def _signature_problem(name: str, fn) -> str | None:
    """Why ``fn`` does not take the Protocol's parameters of ``name`` (same names, same order; more after them
    only with defaults), or None. A function taking ``*args`` accepts anything."""
    want = _parameters(getattr(Backend, name))[1:]  # without self
    have = _parameters(fn)
    if have is None or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in have):
        return None
    names = [p.name for p in have[: len(want)]]
    extra = [p.name for p in have[len(want):] if p.default is inspect.Parameter.empty
             and p.kind not in (inspect.Parameter.VAR_KEYWORD,)]
    if names != [p.name for p in want] or extra:
        return (f"{name}({', '.join(p.name for p in have)}) does not take the contract's "
                f"({', '.join(p.name for p in want)})")
    return None


def check_backend(module: ModuleType) -> ModuleType:
    """Raises TypeError naming what a backend module lacks, or the function whose parameters are not the
    contract's (``rows``, ``stats``, ``coef``, ... in the Protocol's order); returns it unchanged otherwise."""
    missing = [attr for attr in ATTRIBUTES + FUNCTIONS if not hasattr(module, attr)]
    not_callable = [attr for attr in FUNCTIONS if attr not in missing and not callable(getattr(module, attr))]
    not_str = [attr for attr in ATTRIBUTES if attr not in missing and not isinstance(getattr(module, attr), str)]
    mismatched = [problem for attr in FUNCTIONS if attr not in missing and attr not in not_callable
                  for problem in [_signature_problem(attr, getattr(module, attr))] if problem]
    if missing or not_callable or not_str or mismatched:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"not callable: {', '.join(not_callable)}"] if not_callable else []
        problems += [f"`{attr}` is not a str" for attr in not_str]
        problems += mismatched
        raise TypeError(f"backend module {module.__name__} breaks the backend contract: {'; '.join(problems)}")
    return module
