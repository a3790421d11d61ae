"""Backend "cpu": the fused C++ kernels of csrc/cpu (the ``sirl_kernels._C_cpu`` extension).

Logits: one pass over each row's memory per direction (forward keeps the online-softmax state of
``csrc/include/sirl/online_state.h`` in fp32; backward recomputes p from the saved lse and entropy), rows in
parallel (``torch.set_num_threads`` applies), any row stride, fp32/bf16/fp16 inputs with fp32 math.

Fused linear: tokens in chunks of ``chunk_size`` rows. Each chunk's logits are ``hidden @ weight.T (+ bias)``
computed exactly like the "torch" backend, i.e. by a matmul in the inputs' dtype, into ONE reusable
``chunk_size x V`` buffer of that dtype (allocated on transparent huge pages where the kernel allows it); the C++ kernels read bf16/fp16 directly, so no fp32 copy of the logits
is made. (A fp32 matmul would need an fp32 copy of the ``V x D`` weight, which at V = 151,936 costs more memory
than the chunk itself.) Backward writes the logits' gradient in place into the same buffer (rounded to the input
dtype, which feeds ``grad_hidden = dz @ W`` exactly as in the "torch" backend) and, for bf16/fp16, an fp32 copy
into a second reusable buffer that feeds the fp32 ``grad_weight`` accumulation (``addmm_``) and ``grad_bias``.

Fresh gradients of the logits are also allocated on huge pages: first-touch page faults of a multi-GB tensor
otherwise cost more than the kernel (measured 1.2 s vs 0.2 s for 2.5 GB here).

The ISA build (AVX-512, AVX2 or baseline x86-64) is picked at load time from the CPU; ``$SIRL_KERNELS_CPU_ISA``
(``avx512`` | ``avx2`` | ``baseline``) caps it, and :func:`set_isa` changes it at run time (tests).
"""

from __future__ import annotations

import torch

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


def logits_forward(logits, labels, temperature, ignore_index):
    return tuple(_ops().forward(logits, labels.long().contiguous(), float(temperature), int(ignore_index)))


def logits_backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return _ops().backward(
        _f32(grad_logprobs),
        _f32(grad_entropy),
        logits,
        labels.long().contiguous(),
        _f32(lse),
        _f32(entropy),
        float(temperature),
        int(ignore_index),
    )


def _chunk_logits(buf, hidden, weight, bias, s, e):
    """buf[: e - s] = hidden[s:e] @ weight.T (+ bias), in the inputs' dtype like the "torch" backend."""
    z = buf[: e - s]
    torch.mm(hidden[s:e], weight.t(), out=z)
    if bias is not None:
        z += bias
    return z


def linear_forward(hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
    n = hidden.shape[0]
    v = weight.shape[0]
    labels = labels.long().contiguous()
    out = [torch.empty(n, dtype=torch.float32) for _ in range(3)]
    if n == 0:
        return tuple(out)
    buf = _ops().empty_hugepage([min(chunk_size, n), v], hidden.dtype)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        z = _chunk_logits(buf, hidden, weight, bias, s, e)
        lp, h, lse = _ops().forward(z, labels[s:e], float(temperature), int(ignore_index))
        out[0][s:e], out[1][s:e], out[2][s:e] = lp, h, lse
    return tuple(out)


def linear_backward(
    grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, chunk_size
):
    n, d = hidden.shape
    v = weight.shape[0]
    labels = labels.long().contiguous()
    g_lp, g_h, lse, entropy = _f32(grad_logprobs), _f32(grad_entropy), _f32(lse), _f32(entropy)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros((v, d), dtype=torch.float32)
    grad_bias = None if bias is None else torch.zeros(v, dtype=torch.float32)
    if n > 0:
        rows = min(chunk_size, n)
        buf = _ops().empty_hugepage([rows, v], hidden.dtype)
        low_precision = hidden.dtype != torch.float32
        buf32 = _ops().empty_hugepage([rows, v], torch.float32) if low_precision else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(buf, hidden, weight, bias, s, e)
            dz32 = buf32[: e - s] if low_precision else None
            # dz (times 1/T) replaces the logits in place; the fp32 copy goes to dz32 for bf16/fp16.
            _ops().backward_out(
                g_lp[s:e], g_h[s:e], z, labels[s:e], lse[s:e], entropy[s:e], float(temperature), int(ignore_index),
                z, dz32,
            )
            dz_acc = dz32 if low_precision else z
            torch.mm(z, weight, out=grad_hidden[s:e])
            h32 = hidden[s:e].to(torch.float32)
            grad_weight.addmm_(dz_acc.t(), h32)
            if grad_bias is not None:
                grad_bias += dz_acc.sum(0)
    return (
        grad_hidden,
        grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
