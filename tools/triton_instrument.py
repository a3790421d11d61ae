"""Interpreter instrumentation of the Triton backend, for the tests and ``benchmarks/triton_memory_traffic.py``.

Both context managers patch ``triton.runtime.interpreter.InterpreterBuilder`` for the duration of the block, so
they work under ``TRITON_INTERPRET=1`` only. They live in the checkout's ``tools/``, apart from the installed
package, because nothing on the launch path needs them.

- :func:`count_dot_flops`: the flops of every ``tl.dot`` (2·M·N·K of the tile shapes as launched);
- :func:`torch_matmul_flops`: the flops of the torch matmuls a call runs (the fused-linear backward's dX and dW
  products, cuBLAS on a GPU), by ``torch.utils.flop_counter``;
- :func:`watch_memory`: the byte addresses of the active lanes of every global load and store.
"""

from __future__ import annotations

import contextlib

from sirl_kernels.backends.triton import utils


def torch_matmul_flops(fn) -> int:
    """Runs ``fn()`` and returns the flops of the torch matrix products it ran: mm, addmm, bmm and baddbmm, in
    place or not, any overload (2·M·N·K each). A dispatch mode of its own: ``torch.utils.flop_counter`` leaves
    out the in-place ``addmm_`` that accumulates into an fp32 buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {"mm": 0, "bmm": 0, "addmm": 1, "addmm_": 1, "baddbmm": 1, "baddbmm_": 1}
    total = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = products.get(func.overloadpacket.__name__)
            if first is not None:
                a, b = args[first], args[first + 1]
                total[0] += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return total[0]


def _interpreter_builder():
    if not utils.INTERPRET:
        raise RuntimeError("this instrumentation works under the Triton interpreter (TRITON_INTERPRET=1) only")
    import triton.runtime.interpreter as interpreter

    return interpreter.InterpreterBuilder


@contextlib.contextmanager
def count_dot_flops():
    """Counts the flops of every ``tl.dot`` run within the block (2·M·N·K per call, tile shapes as launched,
    masked lanes included); yields a dict whose ``"flops"`` and ``"calls"`` hold the running totals."""
    builder = _interpreter_builder()
    real_dot = builder.create_dot
    counter = {"flops": 0, "calls": 0}

    def counting_dot(self, a, b, d, *args, **kwargs):
        m, k = a.data.shape[-2:]
        counter["flops"] += 2 * m * k * b.data.shape[-1]
        counter["calls"] += 1
        return real_dot(self, a, b, d, *args, **kwargs)

    builder.create_dot = counting_dot
    try:
        yield counter
    finally:
        builder.create_dot = real_dot


@contextlib.contextmanager
def watch_memory(on_access):
    """Calls ``on_access(kind, addresses, elem_bytes)`` for every global load (kind "load") and store ("store")
    run within the block, with the byte addresses (a numpy array) of the lanes whose mask is true. Unmasked
    ``tl.load``/``tl.store`` go through the interpreter's masked handlers too."""
    import numpy as np

    builder = _interpreter_builder()
    real_load, real_store = builder.create_masked_load, builder.create_masked_store

    def active(ptrs, mask):
        addr = np.asarray(ptrs.data)
        if mask is None:
            return addr.reshape(-1)
        return addr[np.broadcast_to(np.asarray(mask.data), addr.shape).astype(bool)]

    def load(self, ptrs, mask, *args, **kwargs):
        on_access("load", active(ptrs, mask), ptrs.get_element_ty().primitive_bitwidth // 8)
        return real_load(self, ptrs, mask, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        on_access("store", active(ptrs, mask), ptrs.get_element_ty().primitive_bitwidth // 8)
        return real_store(self, ptrs, value, mask, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = real_load, real_store
