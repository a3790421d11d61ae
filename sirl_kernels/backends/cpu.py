"""Backend "cpu": the fused C++ kernels of csrc/cpu (the ``sirl_kernels._C_cpu`` extension).

Logits: one pass over each row's memory per direction (forward keeps the online-softmax state of
``csrc/include/sirl/online_state.h`` in fp32; backward recomputes p from the saved lse and entropy), rows in
parallel (``torch.set_num_threads`` applies), any row stride, fp32/bf16/fp16 inputs with fp32 math.

Fused linear: the shared chunked driver (``chunked_linear``) over these kernels, its fp32 chunk workspace
allocated on transparent huge pages where the kernel allows it.

Fresh gradients of the logits are also allocated on huge pages: first-touch page faults of a multi-GB tensor
otherwise cost more than the kernel (measured 1.2 s vs 0.2 s for 2.5 GB here).

The ISA build (AVX-512, AVX2 or baseline x86-64) is picked at load time from the CPU; ``$SIRL_KERNELS_CPU_ISA``
(``avx512`` | ``avx2`` | ``baseline``) caps it, and :func:`set_isa` changes it at run time (tests).
"""

from __future__ import annotations

import torch

from sirl_kernels.backends import chunked_linear

name = "cpu"

_IMPORT_ERROR: Exception | None = None
try:
    import sirl_kernels._C_cpu  # noqa: F401  (registers torch.ops.sirl_kernels_cpu)
except Exception as exc:  # noqa: BLE001 - any failure (not built, ABI mismatch) makes the backend unavailable
    _IMPORT_ERROR = exc


def unavailable_reason(device: torch.device | None) -> str | None:
    if _IMPORT_ERROR is not None:
        if isinstance(_IMPORT_ERROR, ModuleNotFoundError):
            return (
                "the C++ extension sirl_kernels._C_cpu is not built; install with "
                "`pip install --no-build-isolation .` after torch"
            )
        return f"the C++ extension sirl_kernels._C_cpu failed to load: {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
    if device is not None and torch.device(device).type != "cpu":
        return f"runs on CPU tensors only, got {torch.device(device).type}"
    return None


def _ops():
    return torch.ops.sirl_kernels_cpu


def isa() -> str:
    """The kernel build in use: "avx512", "avx2" or "baseline"."""
    return _ops().isa()


def set_isa(name: str) -> str:
    """Caps the kernel build ("avx512", "avx2", "baseline", or "auto" for the best); returns the one chosen."""
    return _ops().set_isa(name)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


# Transitional: the C++ kernels still return a single lse; it is carried as stats (lse, 0) until the torch-free
# library returns the (max, log-sum) pair.
def logits_forward(logits, labels, temperature, ignore_index):
    lp, h, lse = _ops().forward(logits, labels.long().contiguous(), float(temperature), int(ignore_index))
    return lp, h, torch.stack([lse, torch.zeros_like(lse)], dim=1)


def logits_backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index,
                    out=None):
    if out is None:
        out = _ops().empty_hugepage(list(logits.shape), logits.dtype)
    _ops().backward_out(
        _f32(grad_logprobs), _f32(grad_entropy), logits, labels.long().contiguous(), _f32(stats.sum(1)),
        _f32(entropy), float(temperature), int(ignore_index), out, None,
    )
    return out


def _hugepage_workspace(rows, vocab, dtype, device):
    return _ops().empty_hugepage([rows, vocab], dtype)


linear_forward, linear_backward = chunked_linear.bind(logits_forward, logits_backward, _hugepage_workspace)
