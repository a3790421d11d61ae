"""Interpreter switches and tile choices of the Triton backend.

``INTERPRET`` is read once, when this module is imported: ``triton.jit`` decides at decoration time whether a
kernel is compiled or interpreted, so the flag the kernels see must be the one in force when they were created.
Under the interpreter (CPU tensors, ``TRITON_INTERPRET=1``) two things differ from a GPU:

- bf16 arithmetic and bf16 ``tl.dot`` are emulated wrongly by the interpreter, so every kernel converts to fp32
  right after each load, and matmul operands are upcast to fp32 *only* under the interpreter (the
  ``DOT_F32`` constexpr); on a GPU bf16/fp16 operands go to the tensor cores with fp32 accumulation.
- each program costs milliseconds of Python, so tiles are as large as numpy handles comfortably.

fp32 matmul operands are always dotted with ``input_precision="ieee"``: exact under the interpreter and true
fp32 (not tf32) on a GPU, so fp32 inputs keep fp32 accuracy.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

# Set by ``force_num_splits`` (tests, benchmarks): overrides the split-V heuristic when not None.
_FORCED_SPLITS: int | None = None


@contextlib.contextmanager
def force_num_splits(splits: int | None):
    """Within the block every kernel that may split V across programs uses ``splits`` (capped by the tiles)."""
    global _FORCED_SPLITS
    old, _FORCED_SPLITS = _FORCED_SPLITS, splits
    try:
        yield
    finally:
        _FORCED_SPLITS = old


def quiet():
    """Under the interpreter numpy warns about the -inf/NaN lanes the kernels deliberately mask with
    ``tl.where`` (0 * inf, log2(0) of ignored rows); silence that, and nothing on a GPU."""
    if INTERPRET:
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def choose_num_splits(row_programs: int, v_tiles: int, device: torch.device) -> int:
    """How many programs share one row (block) along V.

    With enough row programs to fill the GPU (two waves over the SMs) each program walks the whole vocabulary;
    with fewer, V is split so that about ``2 x SMs`` programs run, and the partial states are merged by a second
    kernel in a fixed order (deterministic, no atomics). Never more splits than tiles. On the interpreter: 1.
    """
    if _FORCED_SPLITS is not None:
        return max(1, min(int(_FORCED_SPLITS), v_tiles))
    if device.type != "cuda":
        return 1
    target = 2 * num_sms(device)
    if row_programs >= target:
        return 1
    return max(1, min(v_tiles, triton.cdiv(target, max(1, row_programs))))


def split_chunk(vocab: int, block_v: int, splits: int) -> tuple[int, int]:
    """(columns per split, a multiple of block_v; the actual number of splits)."""
    tiles = triton.cdiv(vocab, block_v)
    chunk = triton.cdiv(tiles, splits) * block_v
    return chunk, triton.cdiv(vocab, chunk)


# --- tiles ----------------------------------------------------------------------------------------------------


def logits_block_v(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the logits-input kernels (one row per program)."""
    if device.type != "cuda":
        return min(next_pow2(vocab), 4096), 4
    block = min(next_pow2(vocab), 4096)
    return max(block, 128), 8 if block >= 2048 else 4


def linear_blocks(n: int, vocab: int, dim: int, device: torch.device) -> dict:
    """Tiles of the fused-linear kernels: rows BLOCK_N, vocabulary BLOCK_V, reduction BLOCK_D, and BLOCK_DO,
    the slice of D one backward program owns (its accumulator is BLOCK_N x BLOCK_DO or BLOCK_V x BLOCK_DO).

    ``tl.dot`` needs every dimension >= 16; tails are masked.
    """
    if device.type != "cuda":
        return {
            "BLOCK_N": max(16, min(64, next_pow2(n))),
            "BLOCK_V": max(16, min(1024, next_pow2(vocab))),
            "BLOCK_D": max(16, min(256, next_pow2(dim))),
            "BLOCK_DO": max(16, min(256, next_pow2(dim))),
            "num_warps": 4,
            "num_stages": 1,
        }
    return {
        "BLOCK_N": max(16, min(64, next_pow2(n))),
        "BLOCK_V": max(16, min(128, next_pow2(vocab))),
        "BLOCK_D": max(16, min(64, next_pow2(dim))),
        "BLOCK_DO": max(16, min(256, next_pow2(dim))),
        "num_warps": 8,
        "num_stages": 3,
    }


def dot_flags(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(DOT_F32, input precision): upcast matmul operands only under the interpreter; "ieee" for fp32 operands."""
    upcast = INTERPRET or dtype == torch.float32
    return INTERPRET, ("ieee" if upcast else None)
