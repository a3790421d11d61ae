"""Interpreter instrumentation of the Triton backend, for the tests and ``benchmarks/triton_memory_traffic.py``.

Both context managers patch ``triton.runtime.interpreter.InterpreterBuilder`` for the duration of the block, so
they work under ``TRITON_INTERPRET=1`` only. They live apart from ``utils.py`` (imported on every launch) because
nothing on the launch path needs them.

- :func:`count_dot_flops`: the flops of every ``tl.dot`` (2·M·N·K of the tile shapes as launched);
- :func:`watch_memory`: the byte addresses of the active lanes of every global load and store.
"""

from __future__ import annotations

import contextlib

from sirl_kernels.backends.triton import utils


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
