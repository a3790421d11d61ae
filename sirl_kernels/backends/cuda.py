"""Backend "cuda": hand-written CUDA kernels (csrc/cuda) through the ``sirl_kernels._C_cuda`` extension.

Logits ops call ``torch.ops.sirl_kernels_cuda.*`` directly. The fused-linear ops are the shared chunked driver
(``chunked_linear``) over these kernels: fp32 chunk logits from cuBLAS, the gradient in place, GEMMs for d hidden
and d weight.
"""

from __future__ import annotations

import importlib

import torch

from sirl_kernels.backends import chunked_linear

name = "cuda"

_EXT = None
_EXT_ERROR: str | None = None


def _load_extension():
    """Imports sirl_kernels._C_cuda once (it registers torch.ops.sirl_kernels_cuda); None and a reason if not."""
    global _EXT, _EXT_ERROR
    if _EXT is None and _EXT_ERROR is None:
        try:
            _EXT = importlib.import_module("sirl_kernels._C_cuda")
        except ImportError as exc:
            if getattr(exc, "name", None) == "sirl_kernels._C_cuda":
                _EXT_ERROR = (
                    "the CUDA extension sirl_kernels._C_cuda was not built (install with a CUDA toolkit and CUDA "
                    "torch: `pip install --no-build-isolation .`, see docs/cuda.md)"
                )
            else:
                _EXT_ERROR = f"the CUDA extension sirl_kernels._C_cuda failed to load: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. an undefined symbol from a torch mismatch
            _EXT_ERROR = f"the CUDA extension sirl_kernels._C_cuda failed to load: {type(exc).__name__}: {exc}"
    return _EXT


def unavailable_reason(device: torch.device | None) -> str | None:
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    if device is not None and device.type != "cuda":
        return f"runs on CUDA tensors only, not {device.type}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    if _load_extension() is None:
        return _EXT_ERROR
    return None


def _ops():
    if _load_extension() is None:
        raise RuntimeError(f"backend 'cuda' is unusable: {_EXT_ERROR}")
    return torch.ops.sirl_kernels_cuda


# ----------------------------------------------------------------------------------------------------------------
# logits [N, V]. Transitional: the kernels still return a single lse, carried as stats (lse, 0).
# ----------------------------------------------------------------------------------------------------------------
def logits_forward(logits, labels, temperature, ignore_index, num_splits: int = 0):
    lp, h, lse = _ops().logits_forward(logits, labels, float(temperature), int(ignore_index), int(num_splits))
    return lp, h, torch.stack([lse, torch.zeros_like(lse)], dim=1)


def logits_backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index,
                    out=None):
    lse = stats.sum(1)
    if out is None:
        return _ops().logits_backward(
            grad_logprobs, grad_entropy, logits, labels, lse, entropy, float(temperature), int(ignore_index)
        )
    if out is not logits:
        out.copy_(logits)
    _ops().logits_backward_inplace(
        grad_logprobs, grad_entropy, out, labels, lse, entropy, float(temperature), int(ignore_index)
    )
    return out


linear_forward, linear_backward = chunked_linear.bind(logits_forward, logits_backward)
