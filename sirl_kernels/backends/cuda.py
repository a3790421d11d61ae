"""Backend "cuda": hand-written CUDA kernels (csrc/cuda) through the ``sirl_kernels._C_cuda`` extension.

Logits ops call ``torch.ops.sirl_kernels_cuda.*`` directly. The fused-linear ops run tokens in chunks: each
chunk's logits are formed by ``torch.matmul`` (cuBLAS) into ONE reusable buffer, the forward kernel reads that
buffer; the backward recomputes the chunk into the buffer, overwrites it in place with the logits gradient,
then forms d hidden and d weight by GEMM, accumulating d weight (and d bias) in fp32 across chunks.
"""

from __future__ import annotations

import importlib

import torch

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
# logits [N, V]
# ----------------------------------------------------------------------------------------------------------------
def logits_forward(logits, labels, temperature, ignore_index, num_splits: int = 0):
    return tuple(_ops().logits_forward(logits, labels, float(temperature), int(ignore_index), int(num_splits)))


def logits_backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return _ops().logits_backward(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, float(temperature), int(ignore_index)
    )


def logits_backward_(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    """In place: overwrites ``logits`` with the gradient and returns it."""
    _ops().logits_backward_inplace(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, float(temperature), int(ignore_index)
    )
    return logits


# ----------------------------------------------------------------------------------------------------------------
# fused linear: hidden [N, D], weight [V, D], bias [V]?
# ----------------------------------------------------------------------------------------------------------------
def _chunk_logits(buf, h, weight, bias):
    """buf[:rows] = h @ weight.T (+ bias) in the input dtype (cuBLAS, fp32 accumulation), no new allocation."""
    out = buf[: h.shape[0]]
    torch.matmul(h, weight.t(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


def linear_forward(hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
    n = hidden.shape[0]
    vocab = weight.shape[0]
    out = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    if n == 0:
        return tuple(out)
    step = max(1, min(int(chunk_size), n))
    buf = torch.empty((step, vocab), dtype=hidden.dtype, device=hidden.device)
    ops = _ops()
    for s in range(0, n, step):
        e = min(s + step, n)
        z = _chunk_logits(buf, hidden[s:e], weight, bias)
        lp, h, lse = ops.logits_forward(z, labels[s:e], float(temperature), int(ignore_index), 0)
        out[0][s:e], out[1][s:e], out[2][s:e] = lp, h, lse
    return tuple(out)


_ADDMM_OUT_DTYPE: bool | None = None  # whether torch.addmm(..., out_dtype=float32) works for 16-bit inputs


def _accumulate_weight_grad(grad_weight32, dz, h):
    """grad_weight32 += dz.T @ h with fp32 accumulation and output, without an fp32 copy of the chunk if possible."""
    global _ADDMM_OUT_DTYPE
    if dz.dtype == torch.float32:
        grad_weight32.addmm_(dz.t(), h)
        return
    if _ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(grad_weight32, dz.t(), h, out_dtype=torch.float32, out=grad_weight32)
            _ADDMM_OUT_DTYPE = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            if _ADDMM_OUT_DTYPE:  # it worked before: this is a real error
                raise
            _ADDMM_OUT_DTYPE = False
    grad_weight32.addmm_(dz.t().float(), h.float())


def linear_backward(
    grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, chunk_size
):
    n, _ = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    if n > 0:
        step = max(1, min(int(chunk_size), n))
        buf = torch.empty((step, vocab), dtype=hidden.dtype, device=hidden.device)
        g_lp = grad_logprobs.float().contiguous()
        g_h = grad_entropy.float().contiguous()
        ops = _ops()
        for s in range(0, n, step):
            e = min(s + step, n)
            h = hidden[s:e]
            dz = _chunk_logits(buf, h, weight, bias)
            ops.logits_backward_inplace(
                g_lp[s:e], g_h[s:e], dz, labels[s:e], lse[s:e], entropy[s:e], float(temperature), int(ignore_index)
            )
            torch.matmul(dz, weight, out=grad_hidden[s:e])
            _accumulate_weight_grad(grad_weight, dz, h)
            if grad_bias is not None:
                grad_bias += dz.sum(0, dtype=torch.float32)
    return (
        grad_hidden,
        grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
