"""Workspace sizing shared by every backend: how many rows of vocabulary-wide values to hold at once, and the
row layout of the vocabulary-wide buffers GPU kernels write."""

from __future__ import annotations

import torch

# Bound on the vocabulary-sized fp32 workspace of one chunk (logits or their gradient) of the chunked driver
# ("torch", "cpu", "cuda") and of the "torch" backend's logits kernels.
WORKSPACE_BYTES = 256 * 1024 * 1024
# The Triton fused-linear backward holds one chunk of the logits gradient in the input dtype: all N rows and as
# many vocabulary columns as ``chunk_size x V`` values allow (docs/triton-fused-linear.md). Every chunk after the
# first reads and writes the fp32 [N, D] dX accumulator (268 MB at N = 16384, D = 4096: 4.5% of the backward's
# modelled bytes at this bound), so it gets a larger bound than the chunked driver (3,520 bf16 rows' worth at
# V = 151,936: 5 vocabulary chunks at N = 16384).
TRITON_WORKSPACE_BYTES = 1024 * 1024 * 1024


def logits_chunk_rows(vocab_size: int, workspace_bytes: int = WORKSPACE_BYTES, element_bytes: int = 4) -> int:
    """Rows per chunk so that ``rows x V`` values of ``element_bytes`` fit the workspace (at least 1)."""
    return max(1, workspace_bytes // (element_bytes * max(1, vocab_size)))


def default_linear_chunk_size(vocab_size: int, backend: str = "torch", dtype: torch.dtype = torch.float32) -> int:
    """Default token chunk of the fused-linear op, a multiple of 16 rows when possible.

    Chunked driver: 256 MiB of fp32 logits (432 tokens at V = 151,936). Triton: 1 GiB of the logits gradient in
    the input dtype (held as all rows x a vocabulary chunk: ``triton.linear.chunk_plan``).
    """
    if backend == "triton":
        rows = logits_chunk_rows(vocab_size, TRITON_WORKSPACE_BYTES, dtype.itemsize)
    else:
        rows = logits_chunk_rows(vocab_size)
    return rows if rows < 16 else rows - rows % 16


def aligned_row_stride(cols: int, dtype: torch.dtype, like: int = 0) -> int:
    """The smallest row stride (elements) >= ``cols`` that is congruent to ``like`` modulo 16 bytes.

    ``like = 0``: every row starts 16-byte aligned (``cols`` rounded up to 16 bytes). GPU kernels move a row 16 bytes
    per lane and instruction (LDG/STG.128), which needs aligned rows: a contiguous bf16 gradient of a 151,665-wide
    view (Qwen's vocabulary in a 151,936-wide buffer) has rows 2 bytes off, and its stores fall to 2 bytes wide.
    ``like`` = another buffer's row stride (the logits' that a gradient is computed from): row r then starts as far
    from alignment as row r of that buffer (both bases aligned, as allocations are), aligned where it is aligned,
    and sharing its misalignment where it is not (a contiguous [N, 50257] tensor), which is what a kernel needs to
    move both with the same vector loop after a scalar head."""
    unit = max(1, 16 // dtype.itemsize)
    return cols + (like - cols) % unit


def empty_aligned_rows(rows: int, cols: int, dtype: torch.dtype, device, like: int = 0) -> torch.Tensor:
    """An uninitialised ``[rows, cols]`` tensor with row stride ``aligned_row_stride(cols, dtype, like)`` (the
    ``[:, :cols]`` view of a padded buffer; contiguous when no padding is needed)."""
    return torch.empty_strided((rows, cols), (aligned_row_stride(cols, dtype, like), 1), dtype=dtype, device=device)


# Batch-invariant mode (``batch_invariant=True``): the split-V kernels (Triton, CUDA) split every row into the
# same number of vocabulary segments whatever N is, so a row's reduction order depends on V alone. One segment per
# this many columns: at V = 151,936 ten segments, enough to spread a few rows over an H100's SMs, while at large N
# the merge adds 10 x 12-20 bytes of partial state per row against the row's 304 KB of bf16 logits.
BATCH_INVARIANT_SPLIT_COLUMNS = 16384


def batch_invariant_splits(vocab_size: int) -> int:
    """Vocabulary segments per row in batch-invariant mode: a function of V alone (at least 1, at most 256, the
    CUDA kernels' limit)."""
    return max(1, min(256, -(-int(vocab_size) // BATCH_INVARIANT_SPLIT_COLUMNS)))
