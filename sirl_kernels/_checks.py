"""Input validation at the API boundary: cheap checks with typed errors that name the problem."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 is accepted by the "torch" backend only, for gradcheck and references.
REFERENCE_DTYPES = (torch.float64,)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES + REFERENCE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64 on the 'torch' backend), got {t.dtype}")


def check_label_tensor(labels, expected_shape, device: torch.device, exact_dtype: torch.dtype | None = None) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES or (exact_dtype is not None and labels.dtype != exact_dtype):
        raise TypeError(f"labels must have {exact_dtype or 'an integer dtype'}, got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the leading shape {tuple(expected_shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the inputs are on {device}")


def check_logits_args(logits, temperature, ignore_index) -> tuple[float, int]:
    """The checks of a logits call that need no labels: ``(temperature, ignore_index)`` as float and int."""
    check_float_tensor("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    return check_temperature(temperature), check_ignore_index(ignore_index)


def check_linear_args(hidden, weight, bias, temperature, ignore_index) -> tuple[float, int]:
    """The checks of a fused-linear call that need no labels: ``(temperature, ignore_index)``."""
    check_float_tensor("hidden", hidden)
    check_float_tensor("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the model dimension)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden's last dim {hidden.shape[-1]} does not match weight's D = {dim}")
    if vocab == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if dim == 0:
        raise ValueError("hidden and weight have an empty model dimension (D = 0)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    return check_temperature(temperature), check_ignore_index(ignore_index)


def has_dense_rows(flat: torch.Tensor) -> bool:
    """Whether a 2-D ``[N, W]`` tensor has unit stride along W and rows that do not overlap (reads only strides,
    so it also answers for fake tensors while tracing)."""
    n, width = flat.shape
    if n == 0 or width == 0:
        return True
    return (flat.stride(1) == 1 or width == 1) and (n == 1 or flat.stride(0) >= width)


def dense_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., W]`` -> ``[N, W]`` with unit stride along W and rows that do not overlap (what every kernel reads);
    a copy only when no such view exists (a strided last dim, an ``expand``-ed or otherwise overlapping view)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if has_dense_rows(flat) else flat.contiguous()


def check_inplace_target(logits: torch.Tensor) -> None:
    """``inplace_backward`` writes the gradient into the logits' storage: refused where torch refuses an in-place
    write (a leaf that requires grad, or a view of one: its ``.grad`` would share its storage)."""
    t = logits
    while t is not None:
        if t.is_leaf and t.requires_grad:
            raise RuntimeError("inplace_backward=True on logits that are (a view of) a leaf tensor requiring grad: "
                               "backward would overwrite it with its own gradient (torch refuses in-place writes to "
                               "such leaves); pass logits computed from it, or inplace_backward=False")
        t = t._base  # the tensor a view was taken of (None for a tensor with its own storage)


# Every backend computes with T and 1/T as float32 (the Triton and native kernels take them as fp32 scalars, the
# torch backend scales fp32 logits): both must be normal float32 numbers, or 1/T rounds to 0 or inf there
# (T = 1e46: NaN outputs; T = 1e-40: NaN) and backends would disagree.
FP32_MIN_NORMAL = 1.1754943508222875e-38
FP32_MAX = 3.4028234663852886e38
TEMPERATURE_RANGE = (FP32_MIN_NORMAL, 1.0 / FP32_MIN_NORMAL)  # [1.18e-38, 8.51e37]


def temperature_problem(temperature) -> str | None:
    """Why ``temperature`` cannot be used (None when it can): it must be a real number with T and 1/T both
    normal float32 values, i.e. within ``TEMPERATURE_RANGE``."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        return f"must be a real number, got {type(temperature).__name__}"
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        return f"must be finite and > 0, got {temperature!r}"
    low, high = TEMPERATURE_RANGE
    if not low <= t <= high:
        return (f"{temperature!r} is outside [{low:.3g}, {high:.3g}]: T and 1/T must both be normal float32 "
                "numbers, which every backend computes with")
    return None


def check_temperature(temperature) -> float:
    """``temperature`` as a float; TypeError for a non-number, ValueError outside ``TEMPERATURE_RANGE``.

    While ``torch.compile`` traces (``dynamic=True`` makes a temperature argument a symbolic float, whose value
    is unknown then) it is returned unchecked: the custom op checks the real value each time it runs."""
    if torch.compiler.is_compiling():
        return temperature
    problem = temperature_problem(temperature)
    if problem is not None:
        raise (TypeError if problem.startswith("must be a real") else ValueError)(f"temperature {problem}")
    return float(temperature)


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_label_values(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must lie in [0, V) unless they equal ignore_index.

    Runs inside the custom op (on real tensors, also under torch.compile) so the data-dependent check never
    breaks a graph. On CUDA it costs one synchronisation, which ``check_labels=False`` avoids.
    """
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"label {int(labels[pos])} at flattened position {pos} is outside [0, {vocab_size}) "
            f"and is not ignore_index ({ignore_index})"
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs and accumulators: fp32 for fp32/bf16/fp16 inputs; float64 inputs stay float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_row_tensors(n: int, device: torch.device, dtype: torch.dtype, **tensors: torch.Tensor) -> None:
    """Per-row tensors of a backward (``stats`` ``[n, 2]``, every other one ``[n]``) have ``dtype`` and sit on
    ``device``: a kernel reads ``n`` rows of each through a raw pointer."""
    for name, t in tensors.items():
        shape = (n, 2) if name == "stats" else (n,)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (one row per logits row), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the logits are on {device}")
