"""Launch path, tile tables, occupancy and interpreter switches of the Triton backend.

Every kernel of this backend is launched through :func:`launch`, with tiles from the tables below, which take a
:class:`TileTarget` (GPU or interpreter, the SM count and the per-SM limits) rather than a device. That makes the
GPU launch sequence reproducible without a GPU: under :func:`record_launches` the launchers run on ``meta``
tensors with a GPU target and every launch is recorded instead of run, which is what ``tools/triton_aot.py``
compiles for sm_80/90/100, what the traffic and wave models of ``tools/gpu_model.py`` read, and what the FLOP and
byte counts of ``benchmarks/triton_memory_traffic.py`` use (via :func:`tile_target`, with the interpreter
instrumentation of ``tools/triton_instrument.py``). Running on ``meta`` tensors also proves the launchers never
look at tensor values (no host synchronisation: a ``.item()`` or ``bool(tensor)`` raises there).

Grids are sized by occupancy (:func:`resident_ctas`): the CTAs of the kernel as compiled that fit on one SM (its
registers, shared memory and warps against the SM's limits) times the SMs are the "slots" of one wave, and
split-V counts are chosen so that the programs fill whole waves (:func:`choose_num_splits`,
:func:`wave_efficiency`). On a GPU the compiled kernel's own resources are read (one compile per specialisation
and device, cached); under ``record_launches`` the AOT tool installs an oracle that compiles for the target
architecture (:func:`occupancy_oracle`); only the interpreter planning for a GPU target without a compiler falls
back to :data:`ASSUMED_CTAS`.

``INTERPRET`` is read once, when this module is imported: ``triton.jit`` decides at decoration time whether a
kernel is compiled or interpreted, so the flag the kernels see must be the one in force when they were created.
Under the interpreter (CPU tensors, ``TRITON_INTERPRET=1``) two things differ from a GPU:

- bf16 arithmetic and bf16 ``tl.dot`` are emulated wrongly by the interpreter, so every kernel converts to fp32
  right after each load, and matmul operands are upcast to fp32 *only* under the interpreter (the
  ``DOT_F32`` constexpr); on a GPU bf16/fp16 operands go to the tensor cores with fp32 accumulation.
- each program costs milliseconds of Python, so tiles are as large as numpy handles comfortably.

fp32 matmul operands are always dotted with ``input_precision="ieee"``: exact under the interpreter and true
fp32 (not tf32) on a GPU, so fp32 inputs keep fp32 accuracy. Every launch pins ``enable_fp_fusion=True``
(Triton's default up to 3.9; 3.10 turns it off): the kernels write their FMAs as ``tl.fma`` where the budget
counts on them, and the pin keeps the rest of the arithmetic as counted in docs/triton-kernels.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources that bound how many CTAs of a kernel are resident at once."""

    regs: int = 65536  # 32-bit registers
    smem: int = 233472  # shared memory usable by blocks, bytes (each block also reserves 1 KiB)
    warps: int = 64
    blocks: int = 32


@dataclass(frozen=True)
class TileTarget:
    """What the tile tables and grid sizes need to know about where the kernels run."""

    gpu: bool  # False: the interpreter (CPU tensors)
    num_sms: int = 1  # streaming multiprocessors: how many programs of one CTA per SM fill the GPU
    arch: int = 0  # sm_XX (0: unknown / interpreter)
    sm: SmLimits = field(default_factory=SmLimits)
    l2_bytes: int = 0  # L2 cache (0: unknown / interpreter)


@dataclass(frozen=True)
class GpuArch:
    """A GPU architecture this project targets: what the tile tables, the AOT compile (``tools/triton_aot.py``),
    its resource table and the traffic/wave model (``tools/gpu_model.py``) need to know about it."""

    gpu: str  # the GPUs of that architecture, for tables
    num_sms: int  # streaming multiprocessors
    smem_per_sm: int  # shared memory per SM usable by blocks, in bytes (each block also reserves 1 KiB)
    l2_bytes: int  # L2 cache (the traffic model's capacity)
    hbm_bytes_per_s: float  # peak HBM bandwidth (datasheet), for the model's times
    bf16_flops: float  # dense bf16 tensor-core peak (datasheet), for the model's times
    clock_hz: float  # boost clock, for the issue-rate model

    @property
    def sm(self) -> SmLimits:
        return SmLimits(smem=self.smem_per_sm)


INTERPRETER = TileTarget(gpu=False)
# The one list of target architectures (sm_XX -> GPU): every other list (the tile targets below, the AOT
# compile's architectures and per-SM limits, the resource table's columns, the model's machines) is derived
# from it. A100 SXM 80 GB, H100 SXM, B200: datasheet figures.
GPU_ARCHS = {
    80: GpuArch("A100", 108, 167936, 40 * 2**20, 2.039e12, 312e12, 1.41e9),
    90: GpuArch("H100/H200", 132, 233472, 50 * 2**20, 3.35e12, 989e12, 1.98e9),
    100: GpuArch("B200", 148, 233472, 126 * 2**20, 8.0e12, 2250e12, 1.965e9),
}
GPU_TARGETS = {arch: TileTarget(True, g.num_sms, arch, g.sm, g.l2_bytes) for arch, g in GPU_ARCHS.items()}
# Share of the L2 one row group of the fused-linear forward may fill with the hidden blocks its programs keep
# re-reading (linear.rows_in_l2, linear.fused_plan); the rest holds the weight tiles those programs stream. Chosen
# with the L2 model of tools/gpu_model.py (an LRU of the L2's size, CTAs advancing with 10% jitter): 0.7 keeps a
# 4096 x 4096 bf16 hidden (32 MiB) in one group on an H100 (1.2x the minimum HBM bytes) and no plan thrashes;
# whether the hardware's two L2 partitions hold a second copy of data read by both halves of the SMs (halving
# the capacity) is not documented, so SIRL_TRITON_L2_FRACTION overrides it (gpu_check.sh's N sweep shows a cliff).
L2_FRACTION = float(os.environ.get("SIRL_TRITON_L2_FRACTION", "0.7"))
# CTAs per SM assumed when a GPU target is planned with no compiler at hand (the interpreter's FLOP and byte
# counts with GPU tiles): the plan's split counts then differ from a GPU's, its tiles do not.
ASSUMED_CTAS = 2

# Set by ``force_num_splits`` (tests, benchmarks): overrides the split-V heuristic when not None.
_FORCED_SPLITS: int | None = None
# Set by ``tile_target``: the target every launcher plans for, whatever its tensors' device.
_FORCED_TARGET: TileTarget | None = None
# Set by ``record_launches``: launches are appended here instead of run.
_RECORDING: list | None = None
# Set by ``occupancy_oracle``: (kernel, grid, args, kwargs, target) -> CTAs per SM, for planning without a GPU.
_ORACLE = None


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


@contextlib.contextmanager
def occupancy_oracle(oracle):
    """Within the block :func:`resident_ctas` asks ``oracle(kernel, grid, args, kwargs, target)`` (the AOT tool
    compiles the launch for the target architecture and reads its registers and shared memory)."""
    global _ORACLE
    old, _ORACLE = _ORACLE, oracle
    try:
        yield
    finally:
        _ORACLE = old


def _device_limits(props) -> SmLimits:
    """Per-SM limits of a device from torch's properties (fields missing in older torch fall back to the
    documented values of its compute capability)."""
    arch = props.major * 10 + props.minor
    known = GPU_ARCHS.get(arch)
    # consumer parts (sm_86/89/120) have 48 warps and 100 KiB of shared memory per SM
    small = arch in (86, 87, 89, 120, 121)
    threads = getattr(props, "max_threads_per_multi_processor", 1536 if small else 2048)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or (known.smem_per_sm + 1024 if known else 0)
    return SmLimits(regs=getattr(props, "regs_per_multiprocessor", 65536) or 65536,
                    smem=max(0, smem - 1024) if smem else (101376 if small else 167936),
                    warps=threads // 32, blocks=16 if small else 32)


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> TileTarget:
    """The target of CUDA device ``index``, queried once per device and process."""
    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    l2 = getattr(props, "L2_cache_size", 0) or (GPU_ARCHS[arch].l2_bytes if arch in GPU_ARCHS else 0)
    return TileTarget(True, props.multi_processor_count, arch, _device_limits(props), l2)


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


def _device_of(args) -> torch.device | None:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """The one place this backend launches a kernel (recorded instead under :func:`record_launches`).

    A CUDA launch runs under its tensors' device, so Triton takes that device's current stream: with tensors on
    cuda:1 and the current device 0 it would otherwise launch on device 0's stream (a race, or a fault)."""
    if not INTERPRET:
        kwargs.setdefault("enable_fp_fusion", True)
    if _RECORDING is not None:
        _RECORDING.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    device = _device_of(args)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
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


# --- occupancy and waves ---------------------------------------------------------------------------------------
def ctas_per_sm(sm: SmLimits, registers: int, shared_bytes: int, num_warps: int) -> int:
    """CTAs of one kernel resident per SM: registers are allocated per warp in units of 256, shared memory per
    block with a 1 KiB reservation, and warps and blocks are capped."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = sm.regs // (regs_per_warp * num_warps)
    by_smem = sm.smem // (shared_bytes + 1024)
    return max(0, min(by_regs, by_smem, sm.warps // num_warps, sm.blocks))


def _spec_key(kernel, args, kwargs, target) -> tuple:
    """What decides a kernel's registers: the kernel, its pointer dtypes, its constexprs and the target."""
    dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    return (kernel.fn.__name__, dtypes, tuple(sorted(kwargs.items())), target)


_CTAS_CACHE: dict = {}


def resident_ctas(kernel, grid: tuple, args: tuple, kwargs: dict, target: TileTarget) -> int:
    """CTAs per SM of ``kernel[grid](*args, **kwargs)`` as compiled for ``target`` (at least 1).

    On a GPU: the compiled binary's registers and shared memory (Triton compiles it here, once per
    specialisation; the launch that follows reuses it). Under ``occupancy_oracle``: the oracle's answer. The
    interpreter planning for a GPU target with no compiler: :data:`ASSUMED_CTAS`."""
    if not target.gpu:
        return 1
    if not INTERPRET:
        kwargs = dict(kwargs, enable_fp_fusion=True)  # the specialisation ``launch`` runs
    key = _spec_key(kernel, args, kwargs, target)
    if key in _CTAS_CACHE:
        return _CTAS_CACHE[key]
    if _ORACLE is not None:
        ctas = _ORACLE(kernel, grid, args, kwargs, target)
    elif INTERPRET or _RECORDING is not None or _device_of(args).type != "cuda":
        return ASSUMED_CTAS
    else:
        with torch.cuda.device(_device_of(args)):
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            registers = _registers_of(compiled)
        ctas = ASSUMED_CTAS if registers is None else \
            ctas_per_sm(target.sm, registers, compiled.metadata.shared, compiled.metadata.num_warps)
    _CTAS_CACHE[key] = ctas = max(1, int(ctas))
    return ctas


def _registers_of(compiled) -> int | None:
    """Registers per thread of a compiled kernel, or None when this Triton does not say (then the planner falls
    back to :data:`ASSUMED_CTAS`, with a warning, once per process).

    Triton has no public field for them: ptxas' count becomes ``CompiledKernel.n_regs`` only when the binary is
    loaded, which its launch path does lazily on the first call (``_init_handles``, a private method, here called
    early so the grid can be sized before that first launch; the launch that follows finds it loaded). A Triton
    that renames or drops either must not break the launch, only the occupancy-sized grid, hence the fallback."""
    global _REGISTERS_WARNED
    try:
        compiled._init_handles()
        return int(compiled.n_regs)
    except Exception as exc:  # noqa: BLE001 - any failure only costs the occupancy plan
        if not _REGISTERS_WARNED:
            _REGISTERS_WARNED = True
            warnings.warn(f"sirl_kernels: cannot read the registers of a compiled Triton kernel ({type(exc).__name__}: "
                          f"{exc}); split-V grids assume {ASSUMED_CTAS} CTAs per SM", RuntimeWarning, stacklevel=3)
        return None


_REGISTERS_WARNED = False


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of non-negative ints (host-side planning: plain integer arithmetic, no Triton call)."""
    return -(-a // b)


def wave_efficiency(programs: int, slots: int) -> float:
    """Fraction of the SM slots doing work, over the waves ``programs`` equal programs take on ``slots``
    concurrent CTAs (slots = CTAs per SM x SMs): programs / (waves x slots)."""
    if programs <= 0 or slots <= 0:
        return 0.0
    return programs / (cdiv(programs, slots) * slots)


# The wave efficiency the split counts aim for (docs/triton-kernels.md, "Grids").
TARGET_WAVE_EFFICIENCY = 0.9


def distinct_splits(v_tiles: int, least: int = 1):
    """Every split count ``split_chunk`` can make of ``v_tiles`` tiles with at least ``least`` wanted, ascending,
    each once: ``actual_splits(v_tiles, wanted)`` for wanted = least .. v_tiles takes only ~2 sqrt(v_tiles) values
    (each a count of whole tiles per split), so the planners look at those instead of every wanted count (1187
    tiles of the fused forward at V = 151936: 68 instead of 1187)."""
    wanted = max(1, least)
    while wanted <= v_tiles:
        per = cdiv(v_tiles, wanted)  # tiles per split
        yield cdiv(v_tiles, per)
        if per == 1:
            return
        wanted = cdiv(v_tiles, per - 1)  # the fewest wanted splits with fewer tiles per split


def choose_num_splits(row_programs: int, v_tiles: int, slots: int, least: int = 1) -> int:
    """How many programs share one row (block) along V: the fewest splits (``least`` <= splits <= v_tiles) whose
    ``row_programs x splits`` equal programs fill their waves to :data:`TARGET_WAVE_EFFICIENCY` on ``slots``
    concurrent CTAs, else the splits with the best efficiency. Partial states are merged by a second kernel
    in a fixed order (deterministic, no atomics). ``slots <= 1`` (the interpreter): 1."""
    if _FORCED_SPLITS is not None:
        return max(1, min(int(_FORCED_SPLITS), v_tiles))
    if slots <= 1:
        return 1
    return _choose_num_splits(int(row_programs), int(v_tiles), int(slots), int(least))


@functools.lru_cache(maxsize=4096)
def _choose_num_splits(row_programs: int, v_tiles: int, slots: int, least: int) -> int:
    least = max(1, min(least, v_tiles))
    best, best_eff = least, -1.0
    for splits in distinct_splits(v_tiles, least):
        if splits < least:
            continue
        eff = wave_efficiency(row_programs * splits, slots)
        if eff >= TARGET_WAVE_EFFICIENCY:
            return splits
        if eff > best_eff + 1e-12:
            best, best_eff = splits, eff
    return best


def plan_splits(kernel, launch_of, choose, target: TileTarget) -> int:
    """Split count of a kernel whose grid is sized by its occupancy. ``launch_of(splits)`` gives the launch
    ``(grid, args, kwargs)`` with that many splits, ``choose(slots, least)`` the splits for ``slots`` concurrent
    CTAs. The unsplit launch is planned first; when splitting pays, again with the split launch, whose
    specialisation (e.g. a SPLIT constexpr) may hold more registers and so fewer CTAs per SM."""
    if _FORCED_SPLITS is not None or not target.gpu:
        return choose(1, 1)

    def slots(splits):
        grid, args, kwargs = launch_of(splits)
        return resident_ctas(kernel, grid, args, kwargs, target) * target.num_sms

    splits = choose(slots(1), 1)
    return choose(slots(splits), 2) if splits > 1 else splits


def actual_splits(v_tiles: int, splits: int) -> int:
    """The splits ``split_chunk`` makes of ``splits`` wanted: whole tiles per split, so possibly fewer."""
    return cdiv(v_tiles, cdiv(v_tiles, max(1, splits)))


def split_chunk(vocab: int, block_v: int, splits: int) -> tuple[int, int]:
    """(columns per split, a multiple of block_v; the actual number of splits)."""
    tiles = cdiv(vocab, block_v)
    chunk = cdiv(tiles, splits) * block_v
    return chunk, cdiv(vocab, chunk)


# --- tiles ----------------------------------------------------------------------------------------------------
# GPU tiles are sized by the compiled kernels' resources and SASS (docs/triton-kernels.md, regenerated by
# benchmarks/triton_resources.py): no spills, registers and shared memory within sm_80's limits, main loops
# within their instruction budget (tests/sirl_kernels/backends/test_triton_sass.py).


def vector_elems(dtype: torch.dtype) -> int:
    """Elements in 16 bytes: one LDG.E.128 / STG.E.128 per lane."""
    return 16 // dtype.itemsize


def stride_unit(dtype: torch.dtype, *strides: int) -> int:
    """The unit, in elements, the row strides are passed in: 16 bytes when every stride is a multiple of it (the
    kernels multiply by it as a constexpr, so the compiler knows each row starts 16-byte aligned and emits
    16-byte loads and stores for any V), else 1 (then only the base pointer's alignment is known: loads are
    as wide as Triton can prove, 2 bytes in the worst case)."""
    unit = vector_elems(dtype)
    return unit if all(int(s) % unit == 0 for s in strides) else 1


def logits_tiles(vocab: int, dtype: torch.dtype, target: TileTarget) -> dict:
    """Tile of the logits-input kernels: ``[R, T, VEC]`` elements per iteration, T = 32 x num_warps threads, VEC
    elements (16 bytes) per thread and row of the tile, R rows: each thread owns R x VEC elements per iteration
    (in-thread reductions only; one block reduction per row and split)."""
    vec = vector_elems(dtype)
    if not target.gpu:  # the interpreter: one numpy operation per tile, ~4096 wide
        tile = min(next_pow2(vocab), 4096)
        vec = min(vec, tile)
        return {"R": 1, "T": tile // vec, "VEC": vec, "num_warps": 4}
    rows, warps = (2 if dtype.itemsize == 2 else 4), 8  # 16 elements per thread per iteration
    while rows * 32 * warps * vec > next_pow2(vocab) and (rows > 1 or warps > 1):
        if rows > 1:
            rows //= 2
        else:
            warps //= 2
    return {"R": rows, "T": 32 * warps, "VEC": vec, "num_warps": warps}


def tile_width(cfg: dict) -> int:
    return cfg["R"] * cfg["T"] * cfg["VEC"]


# BLOCK_N of the fused-linear tiles for many rows, and in batch-invariant mode for any number of rows.
LINEAR_MAX_BLOCK_N = 64


def linear_logits_blocks(n: int, vocab: int, dim: int, dtype: torch.dtype, target: TileTarget,
                         batch_invariant: bool = False) -> dict:
    """Tiles of the kernels that form logits tiles ``hidden @ weight.T`` in registers (the fused forward and the
    backward's recompute): rows BLOCK_N, vocabulary BLOCK_V, reduction BLOCK_D. ``tl.dot`` needs every
    dimension >= 16; tails are masked. Only BLOCK_N depends on ``n`` (small batches get smaller row tiles);
    ``batch_invariant`` gives every ``n`` the tiles of a large ``n`` (a function of V, D, the dtype and the
    target alone)."""
    if batch_invariant:
        n = LINEAR_MAX_BLOCK_N
    if not target.gpu:
        return {"BLOCK_N": _clamp_pow2(n, 16, LINEAR_MAX_BLOCK_N), "BLOCK_V": _clamp_pow2(vocab, 16, 1024),
                "BLOCK_D": _clamp_pow2(dim, 16, 256), "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        # true fp32 (ieee) dots run on the FMA units with both operand tiles in registers: 64 x 128 x 64 took
        # 255 registers and spilled on sm_80, and so did 64 x 64 x 32 and 32 x 64 x 32 in some
        # specialisations; 16 x 64 x 32 compiles without spills for sm_80, sm_90 and sm_100.
        return {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": _clamp_pow2(dim, 16, 32), "num_warps": 4,
                "num_stages": 3}
    # 64 x 128 x 64 bf16/fp16 on the tensor cores (wgmma on sm_90): 131 registers as compiled; on sm_90 capped at
    # 128 so that two CTAs share an SM (no spill there: docs/triton-kernels.md) and one's softmax epilogue
    # overlaps the other's matmul (sm_80 spills under the cap); 128-row tiles took 249 registers (one CTA) and
    # 128 x 256 spilled.
    cfg = {"BLOCK_N": _clamp_pow2(n, 16, LINEAR_MAX_BLOCK_N), "BLOCK_V": 128, "BLOCK_D": _clamp_pow2(dim, 16, 64),
           "num_warps": 8, "num_stages": 3}
    if target.arch == 90:
        cfg["maxnreg"] = 128
    return cfg


def dot_flags(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(DOT_F32, input precision): upcast matmul operands only under the interpreter; "ieee" for fp32 operands."""
    upcast = INTERPRET or dtype == torch.float32
    return INTERPRET, ("ieee" if upcast else None)
