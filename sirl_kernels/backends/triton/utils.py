"""Launch path, tile tables and interpreter switches of the Triton backend.

Every kernel of this backend is launched through :func:`launch`, with tiles from the tables below, which take a
:class:`TileTarget` (GPU or interpreter, and the SM count) rather than a device. That makes the GPU launch
sequence reproducible without a GPU: under :func:`record_launches` the launchers run on ``meta`` tensors with a
GPU target and every launch is recorded instead of run, which is what ``aot.py`` compiles for sm_80/90/100 and
what the FLOP and byte counts of ``benchmarks/triton_memory_traffic.py`` use (via :func:`tile_target`, with the
interpreter instrumentation of ``instrument.py``). Running
on ``meta`` tensors also proves the launchers never look at tensor values (no host synchronisation: a
``.item()`` or ``bool(tensor)`` raises there).

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
import functools
import os
from dataclasses import dataclass, field

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


@dataclass(frozen=True)
class TileTarget:
    """What the tile tables need to know about where the kernels run."""

    gpu: bool  # False: the interpreter (CPU tensors)
    num_sms: int = 1  # streaming multiprocessors: how many programs fill the GPU


@dataclass(frozen=True)
class GpuArch:
    """A GPU architecture this project targets: what the tile tables, the AOT compile (``aot.py``) and its
    resource table (``benchmarks/triton_resources.py``) need to know about it."""

    gpu: str  # the GPUs of that architecture, for tables
    num_sms: int  # streaming multiprocessors
    smem_per_sm: int  # shared memory per SM usable by blocks, in bytes (each block also reserves 1 KiB)


INTERPRETER = TileTarget(gpu=False)
# The one list of target architectures (sm_XX -> GPU): every other list (the tile targets below, the AOT
# compile's architectures and per-SM limits, the resource table's columns) is derived from it.
GPU_ARCHS = {
    80: GpuArch("A100", 108, 167936),
    90: GpuArch("H100/H200", 132, 233472),
    100: GpuArch("B200", 148, 233472),
}
GPU_TARGETS = {arch: TileTarget(True, g.num_sms) for arch, g in GPU_ARCHS.items()}

# Set by ``force_num_splits`` (tests, benchmarks): overrides the split-V heuristic when not None.
_FORCED_SPLITS: int | None = None
# Set by ``tile_target``: the target every launcher plans for, whatever its tensors' device.
_FORCED_TARGET: TileTarget | None = None
# Set by ``record_launches``: launches are appended here instead of run.
_RECORDING: list | None = None


@contextlib.contextmanager
def force_num_splits(splits: int | None):
    """Within the block every kernel that may split V across programs uses ``splits`` (capped by the tiles)."""
    global _FORCED_SPLITS
    old, _FORCED_SPLITS = _FORCED_SPLITS, splits
    try:
        yield
    finally:
        _FORCED_SPLITS = old


@contextlib.contextmanager
def tile_target(target: TileTarget | None):
    """Within the block the launchers choose tiles and splits for ``target`` (e.g. a GPU's tile table measured
    under the interpreter)."""
    global _FORCED_TARGET
    old, _FORCED_TARGET = _FORCED_TARGET, target
    try:
        yield
    finally:
        _FORCED_TARGET = old


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> TileTarget:
    """The target of CUDA device ``index``, queried once per device and process."""
    return TileTarget(True, torch.cuda.get_device_properties(index).multi_processor_count)


def target_of(device: torch.device) -> TileTarget:
    """Where tensors on ``device`` run: a launcher calls this once and passes the target on."""
    if _FORCED_TARGET is not None:
        return _FORCED_TARGET
    if device.type == "cuda":
        return _cuda_target(torch.cuda.current_device() if device.index is None else device.index)
    return INTERPRETER


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the launchers issue it: ``kernel[grid](*args, **kwargs)``."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__  # JITFunction and the interpreter's InterpretedFunction both wrap .fn


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """The one place this backend launches a kernel (recorded instead under :func:`record_launches`)."""
    if _RECORDING is not None:
        _RECORDING.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def record_launches(target: TileTarget):
    """Launches are recorded, not run, and planned for ``target``; yields the list they are appended to.

    Call the launchers with ``meta`` tensors (shapes, strides and dtypes only)."""
    global _RECORDING
    old, _RECORDING = _RECORDING, []
    try:
        with tile_target(target):
            yield _RECORDING
    finally:
        _RECORDING = old


def quiet():
    """Under the interpreter numpy warns about the -inf/NaN lanes the kernels deliberately mask with
    ``tl.where`` (0 * inf, log2(0) of ignored rows); silence that, and nothing on a GPU."""
    if INTERPRET:
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _clamp_pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(x)))


def choose_num_splits(row_programs: int, v_tiles: int, target: TileTarget) -> int:
    """How many programs share one row (block) along V.

    With enough row programs to fill the GPU (two waves over the SMs) each program walks the whole vocabulary;
    with fewer, V is split so that about ``2 x SMs`` programs run, and the partial states are merged by a second
    kernel in a fixed order (deterministic, no atomics). Never more splits than tiles. On the interpreter: 1.
    """
    if _FORCED_SPLITS is not None:
        return max(1, min(int(_FORCED_SPLITS), v_tiles))
    if not target.gpu:
        return 1
    wanted = 2 * target.num_sms
    if row_programs >= wanted:
        return 1
    return max(1, min(v_tiles, triton.cdiv(wanted, max(1, row_programs))))


def split_chunk(vocab: int, block_v: int, splits: int) -> tuple[int, int]:
    """(columns per split, a multiple of block_v; the actual number of splits)."""
    tiles = triton.cdiv(vocab, block_v)
    chunk = triton.cdiv(tiles, splits) * block_v
    return chunk, triton.cdiv(vocab, chunk)


# --- tiles ----------------------------------------------------------------------------------------------------
# GPU tiles are sized by the compiled kernels' resources (docs/triton-kernels.md, regenerated by
# benchmarks/triton_resources.py): no spills, registers and shared memory within sm_80's limits.


def logits_block_v(vocab: int, target: TileTarget) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the logits-input kernels (one row per program)."""
    block = min(next_pow2(vocab), 4096)
    if not target.gpu:
        return block, 4
    return max(block, 128), 8 if block >= 2048 else 4


def linear_logits_blocks(n: int, vocab: int, dim: int, dtype: torch.dtype, target: TileTarget) -> dict:
    """Tiles of the kernels that form logits tiles ``hidden @ weight.T`` in registers (the fused forward and the
    backward's recompute): rows BLOCK_N, vocabulary BLOCK_V, reduction BLOCK_D. ``tl.dot`` needs every
    dimension >= 16; tails are masked."""
    if not target.gpu:
        return {"BLOCK_N": _clamp_pow2(n, 16, 64), "BLOCK_V": _clamp_pow2(vocab, 16, 1024),
                "BLOCK_D": _clamp_pow2(dim, 16, 256), "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        # true fp32 (ieee) dots run on the FMA units with both operand tiles in registers: 64 x 128 x 64 took
        # 255 registers and spilled on sm_80, and so did 64 x 64 x 32 and 32 x 64 x 32 in some
        # specialisations; 16 x 64 x 32 compiles without spills for sm_80, sm_90 and sm_100.
        return {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": _clamp_pow2(dim, 16, 32), "num_warps": 4,
                "num_stages": 3}
    return {"BLOCK_N": _clamp_pow2(n, 16, 64), "BLOCK_V": 128, "BLOCK_D": _clamp_pow2(dim, 16, 64),
            "num_warps": 8, "num_stages": 3}


def matmul_blocks(m: int, n: int, k: int, dtype: torch.dtype, target: TileTarget) -> dict:
    """Tiles of the plain GEMM ``C (+)= A @ B`` ([m, k] @ [k, n]) of the fused-linear backward."""
    if not target.gpu:
        return {"BLOCK_M": _clamp_pow2(m, 16, 64), "BLOCK_N": _clamp_pow2(n, 16, 256),
                "BLOCK_K": _clamp_pow2(k, 16, 256), "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:  # FMA units; 4 warps left a stack frame on sm_80
        return {"BLOCK_M": _clamp_pow2(m, 16, 64), "BLOCK_N": _clamp_pow2(n, 16, 64),
                "BLOCK_K": _clamp_pow2(k, 16, 32), "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": _clamp_pow2(m, 16, 128), "BLOCK_N": _clamp_pow2(n, 16, 128),
            "BLOCK_K": _clamp_pow2(k, 16, 64), "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def dot_flags(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(DOT_F32, input precision): upcast matmul operands only under the interpreter; "ieee" for fp32 operands."""
    upcast = INTERPRET or dtype == torch.float32
    return INTERPRET, ("ieee" if upcast else None)
