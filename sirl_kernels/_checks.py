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


def check_label_tensor(labels, expected_shape, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the leading shape {tuple(expected_shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the inputs are on {device}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


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
