"""Workspace sizing shared by every backend: how many rows of vocabulary-wide values to hold at once."""

from __future__ import annotations

import torch

# Bound on the vocabulary-sized fp32 workspace of one chunk (logits or their gradient) of the chunked driver
# ("torch", "cpu", "cuda") and of the "torch" backend's logits kernels.
WORKSPACE_BYTES = 256 * 1024 * 1024
# The Triton fused-linear backward holds one chunk of the logits gradient in the input dtype, and every chunk
# after the first re-reads the weight twice and reads and writes the fp32 weight-gradient accumulator
# (docs/triton-fused-linear.md): at V = 151,936 and D = 4096 that per-chunk traffic costs about as much as the
# chunk's matmuls at 432 rows, so it gets a larger bound (3,520 bf16 rows at V = 151,936).
TRITON_WORKSPACE_BYTES = 1024 * 1024 * 1024


def logits_chunk_rows(vocab_size: int, workspace_bytes: int = WORKSPACE_BYTES, element_bytes: int = 4) -> int:
    """Rows per chunk so that ``rows x V`` values of ``element_bytes`` fit the workspace (at least 1)."""
    return max(1, workspace_bytes // (element_bytes * max(1, vocab_size)))


def default_linear_chunk_size(vocab_size: int, backend: str = "torch", dtype: torch.dtype = torch.float32) -> int:
    """Default token chunk of the fused-linear op, a multiple of 16 rows when possible.

    Chunked driver: 256 MiB of fp32 logits (432 tokens at V = 151,936). Triton: 1 GiB of the logits gradient in
    the input dtype.
    """
    if backend == "triton":
        rows = logits_chunk_rows(vocab_size, TRITON_WORKSPACE_BYTES, dtype.itemsize)
    else:
        rows = logits_chunk_rows(vocab_size)
    return rows if rows < 16 else rows - rows % 16
