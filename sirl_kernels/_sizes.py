"""Workspace sizing shared by every backend: how many rows of vocabulary-wide fp32 values to hold at once."""

from __future__ import annotations

# Bound on the vocabulary-sized fp32 workspace of one chunk (logits or their gradient).
WORKSPACE_BYTES = 256 * 1024 * 1024


def logits_chunk_rows(vocab_size: int, workspace_bytes: int = WORKSPACE_BYTES) -> int:
    """Rows per chunk so that ``rows x V`` fp32 values fit the workspace (at least 1)."""
    return max(1, workspace_bytes // (4 * max(1, vocab_size)))


def default_linear_chunk_size(vocab_size: int) -> int:
    """Default token chunk of the fused-linear op: 256 MiB of fp32 logits, a multiple of 16 rows when possible.

    At V = 151,936 this is 432 tokens (about 263 MB of logits).
    """
    rows = logits_chunk_rows(vocab_size)
    return rows if rows < 16 else rows - rows % 16
