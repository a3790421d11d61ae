"""Compile every kernel of the Triton backend for a GPU target on a machine without a GPU, and read what ptxas
made of each binary.

    python -m tools.triton_aot --arch 80 90 100 --json resources.json

1. Record. The backend's own launchers run on ``meta`` tensors (shapes, strides and dtypes only) for the cases
   in :data:`CASES`, under ``utils.record_launches`` with the GPU tile table of the target: every launch the
   backend would issue on that GPU is recorded instead of run. Grids are sized from the compiled kernels' real
   occupancy: the launchers ask ``utils.resident_ctas``, answered here by an oracle that compiles the launch for
   the target (:func:`compile_launch`) and reads its registers and shared memory. Nothing here restates a tile
   or a signature.
2. Compile. Each launch goes through the kernel's own ``warmup`` (Triton's launch path: its argument
   specialisation, then ``triton.compile``), with a compile-only driver that reports the target and has no
   device, so Triton writes PTX and runs ptxas (ptxas-blackwell for sm_100) exactly as on the first call on a
   GPU. Identical launches (the launchers' chunk loops repeat them) go through Triton once (:func:`_launch_key`),
   and launches that specialise identically compile once (Triton's in-memory cache). For sm_90 the logits
   kernels are compiled a second time with ``enable_fp_fusion=False`` (Triton's default from 3.10 on), whose
   main loops must meet the same instruction budget (their launches are recorded too, ``fp_fusion`` False).
   The wave-efficiency shapes are compiled only for ``--wave-arch`` (default sm_80 and sm_90, where the tests
   assert them; they add launches and occupancy compiles, no specialisation of their own).
3. Inspect. One ``cuobjdump --dump-resource-usage -sass`` per binary: registers, stack frame and local memory
   (spills live there) and static shared memory, to which Triton's dynamic shared memory is added; the SASS tells
   whether the tensor cores are used (HMMA: mma.sync; HGMMA: sm_90 wgmma; UTC*MMA: sm_100 tcgen05) and what the
   main loop costs (``tools/sass.py``: instructions per element, load and store widths, barriers). Occupancy
   follows from registers, shared memory and warps against each architecture's per-SM limits.

It must run in a process where ``TRITON_INTERPRET`` is unset (kernels created under the interpreter cannot be
compiled): the test and ``benchmarks/triton_resources.py`` start it with :func:`run_subprocess`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
import triton.language as tl

from sirl_kernels._sizes import default_linear_chunk_size
from sirl_kernels.backends.rows import Coefficients, Extras, LinearRows, Rows
from sirl_kernels.backends.triton import linear, logits, utils
from tools import sass

ARCHS = tuple(utils.GPU_ARCHS)  # sm_XX compiled by default
# the checkout: the directory that holds sirl_kernels/ and tools/
ROOT = Path(__file__).resolve().parents[1]

# --- cases -----------------------------------------------------------------------------------------------------
# Each case calls the launchers the way the ops do. Together they reach every specialisation that compiles
# differently: dtype (fp32 / bf16 / fp16), split-V or not, bias or not, forward and backward, the in-place
# logits backward, a V % 8 != 0 view (Qwen's 151665 columns of a 151936-wide buffer), one or several backward
# vocabulary chunks (dX written directly, or summed in fp32 across them), row chunks (dW summed in fp32), and
# frozen-parameter backwards, and the one layout that cannot have 16-byte loads (a row stride that is not a
# multiple of 16 bytes). Sizes are realistic (divisible by 16, as Triton specialises on it). The WAVE_N cases are
# the shapes the wave-efficiency model is asserted on (they add launches, not binaries).
N_TOKENS, VOCAB, DIM = 4096, 151936, 4096
VIEW_VOCAB = 151665  # a [N, 151665] view of [N, 151936] logits
# GPT-2's vocabulary as a contiguous [N, 50257] tensor: a row stride that is not a multiple of 16 bytes, the one
# layout whose loads cannot be 16 bytes wide (docs/triton-kernels.md, "Alignment")
UNALIGNED_VOCAB = 50257
WAVE_N = (256, 1024, 4096, 16384)
WAVE_ARCHS = (80, 90)  # the architectures whose planned grids test_gpu_model.py holds to >= 90% wave efficiency
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _coefficients(n, extras=False):
    """The backward's per-row coefficients (``backends/rows.py``): three fp32 [n]; with ``extras`` also gamma and
    delta (the self-certainty and varentropy terms)."""
    return Coefficients(*(_meta(n) for _ in range(5 if extras else 3)))


def _extras(n, extras):
    """The forward's optional outputs (``rows.Extras``): None, or "sc", "ve", "both"."""
    if not extras:
        return None
    return Extras(_meta(n) if extras in ("sc", "both") else None, _meta(n) if extras in ("ve", "both") else None)


def _logits_case(dtype, n, inplace=False, vocab=VOCAB, backward=True, stride=VOCAB, extras=None,
                 batch_invariant=False):
    """[n, vocab] logits with row stride ``stride`` (a view when vocab < stride); the out-of-place backward's
    gradient is the launcher's own (rows padded to 16 bytes on a GPU), the in-place one the logits. ``extras``
    ("sc", "ve", "both"): the forward also fills self-certainty / varentropy, and the backward has the gamma
    and delta terms. ``batch_invariant``: the forward's batch-invariant mode."""
    x = _meta(n, stride, dtype=dtype)[:, :vocab]
    labels = _meta(n, dtype=torch.int64)
    lp, ent, stats = logits.logits_forward(Rows(x, labels, 1.0, -100), _extras(n, extras),
                                           batch_invariant=batch_invariant)
    if backward:
        logits.logits_backward(Rows(x, labels, 1.0, -100), stats, _coefficients(n, bool(extras)),
                               out=x if inplace else None)


def _linear_case(dtype, n, bias, needs=(True, True, True), backward=True, chunk=None, extras=None,
                 batch_invariant=False):
    """``chunk`` None: the op's default ``chunk_size`` for the Triton backend (``_sizes.default_linear_chunk_size``:
    1 GiB of dz, at N_TOKENS = 4096 rows bf16/fp16 take 2 vocabulary chunks, fp32 3). ``batch_invariant``: the
    forward's batch-invariant mode."""
    chunk = default_linear_chunk_size(VOCAB, "triton", dtype) if chunk is None else chunk
    hidden, weight = _meta(n, DIM, dtype=dtype), _meta(VOCAB, DIM, dtype=dtype)
    b = _meta(VOCAB, dtype=dtype) if bias else None
    labels = _meta(n, dtype=torch.int64)
    lp, ent, stats = linear.linear_forward(LinearRows(hidden, weight, b, labels, 1.0, -100), _extras(n, extras),
                                           batch_invariant=batch_invariant)
    if backward:
        linear.linear_backward(LinearRows(hidden, weight, b, labels, 1.0, -100), stats, _coefficients(n, bool(extras)),
                               chunk, needs)


CASES = {}
for _name, _dt in DTYPES.items():
    CASES[f"logits {_name}"] = lambda dt=_dt: _logits_case(dt, N_TOKENS)
    CASES[f"logits {_name}, 8 rows (split-V)"] = lambda dt=_dt: _logits_case(dt, 8)
    CASES[f"logits {_name}, in-place backward"] = lambda dt=_dt: _logits_case(dt, N_TOKENS, inplace=True)
    CASES[f"logits {_name}, V={VIEW_VOCAB} view"] = lambda dt=_dt: _logits_case(dt, N_TOKENS, vocab=VIEW_VOCAB)
    CASES[f"logits {_name}, V={VIEW_VOCAB} view, in-place backward"] = \
        lambda dt=_dt: _logits_case(dt, N_TOKENS, inplace=True, vocab=VIEW_VOCAB)
    # 4096 rows: the backward runs 2-3 vocabulary chunks (default chunk_size): dX summed in fp32 across them
    CASES[f"linear {_name} bias"] = lambda dt=_dt: _linear_case(dt, N_TOKENS, True)
    # chunk_size 16: not one 128-wide vocabulary tile of all rows fits, so rows are chunked too (dW in fp32)
    CASES[f"linear {_name} no bias, row chunks"] = lambda dt=_dt: _linear_case(dt, N_TOKENS, False, chunk=16)
    # one chunk: dX and dW written directly in the inputs' dtype
    CASES[f"linear {_name} no bias, one chunk"] = lambda dt=_dt: _linear_case(dt, 256, False)
    CASES[f"linear {_name} frozen weight and bias"] = lambda dt=_dt: _linear_case(dt, N_TOKENS, True,
                                                                                   needs=(True, False, False))
    CASES[f"linear {_name} bias, 16 rows (split-V)"] = lambda dt=_dt: _linear_case(dt, 16, True, backward=False)
    # self-certainty and varentropy (issue 23): the forward's HAS_SC / HAS_VE accumulators (unsplit and split-V,
    # the merge with them) and the backward's gamma / delta terms
    CASES[f"logits {_name}, self-certainty and varentropy"] = lambda dt=_dt: _logits_case(dt, N_TOKENS, extras="both")
    CASES[f"logits {_name}, self-certainty and varentropy, 8 rows (split-V)"] = \
        lambda dt=_dt: _logits_case(dt, 8, backward=False, extras="both")
    CASES[f"linear {_name} bias, self-certainty and varentropy"] = \
        lambda dt=_dt: _linear_case(dt, N_TOKENS, True, extras="both")
    CASES[f"linear {_name} bias, self-certainty and varentropy, 16 rows (split-V)"] = \
        lambda dt=_dt: _linear_case(dt, 16, True, backward=False, extras="both")
    CASES[f"linear {_name} no bias, self-certainty and varentropy"] = \
        lambda dt=_dt: _linear_case(dt, N_TOKENS, False, backward=False, extras="both")
    # batch-invariant forwards (``batch_invariant=True``): tiles of a large N and _sizes.batch_invariant_splits(V)
    # splits whatever N, so 16 rows take the 64-row tile split 10 ways (a GPU keeps tl.dot: no constexpr of its own)
    CASES[f"logits {_name}, batch-invariant, 8 rows"] = \
        lambda dt=_dt: _logits_case(dt, 8, backward=False, batch_invariant=True)
    CASES[f"linear {_name} bias, batch-invariant, 16 rows"] = \
        lambda dt=_dt: _linear_case(dt, 16, True, backward=False, batch_invariant=True)
    CASES[f"linear {_name} no bias, batch-invariant, self-certainty and varentropy, 16 rows"] = \
        lambda dt=_dt: _linear_case(dt, 16, False, backward=False, extras="both", batch_invariant=True)
# one of the two statistics alone (bf16): the forward compiles only its own accumulator
CASES["logits bf16, self-certainty only"] = lambda: _logits_case(torch.bfloat16, N_TOKENS, backward=False, extras="sc")
CASES["logits bf16, varentropy only"] = lambda: _logits_case(torch.bfloat16, N_TOKENS, backward=False, extras="ve")
# the fallback for a row stride that is not a multiple of 16 bytes (in place: both sides unaligned), bf16 only
CASES[f"logits bf16, V={UNALIGNED_VOCAB} contiguous, in-place backward"] = \
    lambda: _logits_case(torch.bfloat16, N_TOKENS, inplace=True, vocab=UNALIGNED_VOCAB, stride=UNALIGNED_VOCAB)
for _n in WAVE_N:
    CASES[f"waves: logits bf16, N={_n}"] = lambda n=_n: _logits_case(torch.bfloat16, n)
    CASES[f"waves: linear bf16, N={_n}"] = lambda n=_n: _linear_case(torch.bfloat16, n, False, backward=False)


def cases_for(arch: int, wave_archs=WAVE_ARCHS) -> dict:
    """The cases compiled for sm_``arch``: all of them, except the wave-efficiency shapes on architectures not in
    ``wave_archs`` (they add launches and occupancy compiles, no specialisation the other cases lack: the CI test
    compiles them where test_gpu_model.py asserts the waves, the resource table everywhere)."""
    return {name: run for name, run in CASES.items() if arch in wave_archs or not name.startswith("waves:")}


def record(arch: int, cases: dict = CASES, oracle=None) -> list[tuple[str, utils.Launch]]:
    """(case, launch) of every launch the cases issue on a GPU of ``arch`` (sm_XX), in order. ``oracle``
    (``utils.occupancy_oracle``) answers the launchers' occupancy questions; without one (a process that cannot
    compile, e.g. under the interpreter) they plan with ``utils.ASSUMED_CTAS``."""
    out = []
    for name, run in cases.items():
        with utils.record_launches(utils.GPU_TARGETS[arch]) as launches, \
                (utils.occupancy_oracle(oracle) if oracle else contextlib.nullcontext()):
            run()
        out += [(name, launch) for launch in launches]
    return out


# --- compile ---------------------------------------------------------------------------------------------------
def _compile_only_driver(arch: int):
    """A Triton driver with no device: it reports the target, so ``warmup`` compiles without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("compile-only driver")

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise NotImplementedError("compile-only driver")

        def get_current_device(self):
            return arch  # one JIT cache per architecture

        def get_current_stream(self, device=None):
            return 0

    return CompileOnlyDriver()


@contextlib.contextmanager
def compile_only(arch: int):
    """Within the block Triton compiles for sm_``arch`` and launches nothing. On a machine with a GPU driver the
    real driver is restored afterwards; without one there is nothing to restore."""
    from triton.runtime.driver import driver

    driver.set_active(_compile_only_driver(arch))
    try:
        yield
    finally:
        if _has_gpu_driver():
            driver.reset_active()


def _has_gpu_driver() -> bool:
    from triton.backends import backends

    return any(b.driver.is_active() for b in backends.values())


# --- inspect ---------------------------------------------------------------------------------------------------
# Per-SM limits: registers, shared memory (bytes usable by blocks; each block also reserves 1 KiB), warps, blocks.
SM_LIMITS = {arch: utils.GPU_TARGETS[arch].sm for arch in utils.GPU_ARCHS}
TENSOR_CORE = re.compile(r"\b(HMMA|HGMMA|UTC\w*MMA)\b")
# Kernels whose main loop streams logits: their SASS is counted per element (docs/triton-kernels.md) and, on
# sm_90, held to INSTRUCTION_BUDGET per element with 16-byte loads (tests/sirl_kernels/backends/test_triton_sass.py).
STREAMING_KERNELS = ("_logits_fwd_kernel", "_logits_bwd_kernel")
INSTRUCTION_BUDGET = 12.0
# The forward with the self-certainty / varentropy accumulators (HAS_SC / HAS_VE, issue 23) costs about 3 more per
# logit (an add for sum d; a multiply and an FMA for sum 2^d d^2, the multiply shared with the entropy's sum): it
# only reads, so it is held to this budget instead, under the 18 per bf16 logit read at which an H100's issue rate
# meets its HBM bandwidth (docs/triton-kernels.md, "Main loops"). The backward's gamma / delta terms (an FMA, and
# delta folded into the last multiply) stay within INSTRUCTION_BUDGET.
EXTRAS_INSTRUCTION_BUDGET = 16.0


def instruction_budget(binary: dict) -> float:
    """The per-logit budget a streaming kernel's main loop is held to on sm_90."""
    c = binary["constexprs"]
    return EXTRAS_INSTRUCTION_BUDGET if c.get("HAS_SC") or c.get("HAS_VE") else INSTRUCTION_BUDGET
FUSION_OFF_ARCH = 90  # the architecture whose budget is also held with enable_fp_fusion=False


@dataclass
class Binary:
    """One compiled specialisation and ptxas' verdict on it."""

    arch: int
    kernel: str
    case: str  # the first case that launched it
    constexprs: dict
    dtypes: str  # pointer argument types, in order
    num_warps: int = 0
    num_stages: int = 0
    fp_fusion: bool = True  # enable_fp_fusion as compiled
    compile_s: float = 0.0
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    spill_bytes: int = 0  # from the ptxas log, when this process ran ptxas (not a cache hit)
    shared_bytes: int = 0
    gemm_dtype: str = ""  # operand dtype of the kernel's tl.dot as compiled ("" if it has none)
    tensor_core_instrs: list = field(default_factory=list)
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    main_loop: dict | None = None  # tools.sass main-loop report (per element for the streaming kernels)
    hash: str = ""
    error: str = ""


@dataclass
class LaunchRecord:
    """One recorded launch: its case, kernel, grid and the binary it runs (by hash); for the streaming kernels on
    FUSION_OFF_ARCH a second record with ``fp_fusion`` False names the binary of its fusion-off twin."""

    case: str
    kernel: str
    grid: list
    hash: str
    fp_fusion: bool = True


def needs_tensor_cores(binary: dict) -> bool:
    """A GEMM tile (the kernel has a tl.dot) whose inputs are bf16/fp16 (its first pointer argument): its
    matmuls must run on the tensor cores, whatever its dot operands were converted to."""
    return bool(binary["gemm_dtype"]) and binary["dtypes"].split(",")[0] in ("bfloat16", "float16")


def spilled_bytes(binary: dict) -> int:
    """Stack frame + local memory + ptxas' spill stores and loads of a binary: 0 when nothing spilled."""
    return binary["stack_bytes"] + binary["local_bytes"] + binary["spill_bytes"]


def _cuobjdump(*args: str) -> str:
    from triton import knobs

    return subprocess.run([knobs.nvidia.cuobjdump.path, *args], check=True, capture_output=True, text=True).stdout


def inspect_cubin(cubin: bytes, name: str, elem_bytes: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = _cuobjdump("--dump-resource-usage", "-sass", f.name)  # one process: ~0.2-0.5 s each
    # the resource section's " Function name:" line (the SASS listing's are "Function : name")
    line = next((ln for ln in text.split("Function ")[1:] if ln.startswith(name)), "")
    fields = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    instrs = sass.parse(text)
    loop = sass.main_loop(instrs)
    main = None if loop is None else loop.as_dict(elem_bytes)
    if main is not None:  # block barriers before the main loop (the in-place backward orders its label read there)
        main["barriers_before"] = sum(1 for i in instrs if i.base == "BAR" and i.addr < loop.start)
    return {"registers": fields.get("REG", 0), "stack_bytes": fields.get("STACK", 0),
            "local_bytes": fields.get("LOCAL", 0), "static_shared": fields.get("SHARED", 0),
            "tensor_core_instrs": sorted(set(TENSOR_CORE.findall(text))),
            "main_loop": main}


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> tuple[int, int]:
    """(blocks, warps) resident per SM (``utils.ctas_per_sm``, the runtime's own rule)."""
    blocks = utils.ctas_per_sm(SM_LIMITS[arch], registers, shared_bytes, num_warps)
    return blocks, blocks * num_warps


def _dot_dtype(ttir: str) -> str:
    dots = re.findall(r"tt\.dot .*?: tensor<[\dx]+x(\w+)>", ttir)
    return dots[0] if dots else ""


def _streamed_bytes(launch: utils.Launch) -> int:
    """Element size of the first tensor argument (the logits, or hidden): the unit of the per-element count."""
    first = next(a for a in launch.args if isinstance(a, torch.Tensor))
    return first.element_size()


def compile_launch(case: str, launch: utils.Launch, arch: int, seen: dict) -> tuple[Binary, bool]:
    """Compiles one recorded launch for sm_``arch``: (its Binary, whether it is new). An identical
    specialisation compiled before returns that Binary (Triton's cache and ``seen``, keyed by the hash)."""
    from triton import knobs

    constexprs = {k: v for k, v in launch.kwargs.items()
                  if k not in ("num_warps", "num_stages", "enable_fp_fusion")}
    dtypes = ",".join(str(a.dtype).replace("torch.", "") for a in launch.args if isinstance(a, torch.Tensor))
    # warps and stages as launched (Triton's defaults 4 and 3 when not given): what a compile error reports; a
    # successful compile overwrites them with the compiled metadata
    binary = Binary(arch, launch.name, case, constexprs, dtypes, launch.kwargs.get("num_warps", 4),
                    launch.kwargs.get("num_stages", 3), launch.kwargs.get("enable_fp_fusion", True))
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with compile_only(arch), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed when ptxas runs
            try:
                compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
            finally:
                knobs.nvidia.dump_ptxas_log = False
    except Exception as exc:  # noqa: BLE001 - a compile error is a result, reported and asserted on
        binary.compile_s = time.perf_counter() - start
        binary.error = f"{type(exc).__name__}: {exc}"[-4000:]
        return binary, True
    binary.compile_s = time.perf_counter() - start
    if compiled.hash in seen:
        return seen[compiled.hash], False
    seen[compiled.hash] = binary
    binary.hash = compiled.hash
    res = inspect_cubin(compiled.asm["cubin"], compiled.name, _streamed_bytes(launch))
    binary.registers, binary.stack_bytes, binary.local_bytes = res["registers"], res["stack_bytes"], res["local_bytes"]
    binary.shared_bytes = res["static_shared"] + compiled.metadata.shared
    binary.tensor_core_instrs = res["tensor_core_instrs"]
    binary.main_loop = res["main_loop"]
    binary.spill_bytes = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
    binary.gemm_dtype = _dot_dtype(compiled.asm["ttir"])
    binary.num_warps, binary.num_stages = compiled.metadata.num_warps, compiled.metadata.num_stages
    binary.blocks_per_sm, binary.warps_per_sm = occupancy(arch, binary.registers, binary.shared_bytes,
                                                          binary.num_warps)
    return binary, True


def _launch_key(launch: utils.Launch) -> tuple:
    """What a launch hands Triton, exactly: its kernel, every argument (tensors by dtype and address, which is
    all Triton specialises them on; numbers by value) and every keyword. Two launches with the same key are the
    same specialisation, so only the first goes through Triton's launch path (the launchers' chunk loops repeat
    launches that differ only in their grid or in tensor objects of the same layout)."""
    args = tuple((str(a.dtype), a.data_ptr()) if isinstance(a, torch.Tensor) else (type(a).__name__, a)
                 for a in launch.args)
    return id(launch.kernel), args, tuple(sorted(launch.kwargs.items()))


def compile_all(arch: int, cases: dict | None = None, wave_archs=WAVE_ARCHS) -> tuple[list[Binary], list[LaunchRecord]]:
    """(every distinct binary, every recorded launch) of the cases (``cases_for(arch, wave_archs)`` by default) on
    sm_``arch``.
    The binaries include the specialisations the launchers compiled only to read their occupancy, and, for the
    streaming kernels on FUSION_OFF_ARCH, their ``enable_fp_fusion=False`` twins. Each specialisation is compiled
    and inspected once (``_launch_key``, then Triton's own cache and ``seen`` by hash)."""
    if utils.INTERPRET:
        raise RuntimeError("aot: TRITON_INTERPRET=1 is set; kernels created under the interpreter cannot be "
                           "compiled (run `python -m tools.triton_aot` without it)")
    cases = cases_for(arch, wave_archs) if cases is None else cases
    seen: dict = {}
    by_launch: dict = {}
    out: list[Binary] = []
    current = {"case": ""}

    def compiled(case: str, launch: utils.Launch) -> Binary:
        key = _launch_key(launch)
        if key not in by_launch:
            binary, new = compile_launch(case, launch, arch, seen)
            if new:
                out.append(binary)
            by_launch[key] = binary
        return by_launch[key]

    def oracle(kernel, grid, args, kwargs, target):
        binary = compiled(f"{current['case']} (occupancy)",
                          utils.Launch(kernel, grid, args, dict(kwargs, enable_fp_fusion=True)))
        return binary.blocks_per_sm or utils.ASSUMED_CTAS

    launches = []
    for case, run in cases.items():
        current["case"] = case
        for _, launch in record(arch, {case: run}, oracle):
            binary = compiled(case, launch)
            launches.append(LaunchRecord(case, launch.name, list(launch.grid), binary.hash))
            if launch.name in STREAMING_KERNELS and arch == FUSION_OFF_ARCH:
                twin = compiled(case, utils.Launch(launch.kernel, launch.grid, launch.args,
                                                   dict(launch.kwargs, enable_fp_fusion=False)))
                launches.append(LaunchRecord(case, launch.name, list(launch.grid), twin.hash, fp_fusion=False))
    return out, launches


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, 1.0)


def ptxas_accepts(arch: int) -> str | None:
    """None if the bundled ptxas compiles a trivial kernel for sm_``arch``, else its error (sm_100 needs the
    ptxas-blackwell that ships with Triton)."""
    try:
        with compile_only(arch), contextlib.redirect_stdout(io.StringIO()):
            _probe_kernel.warmup(_meta(1), grid=(1,))
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"[:2000]


# --- command line ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--jobs", type=int, default=1, help="architectures compiled in parallel processes")
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--wave-arch", type=int, nargs="*", default=list(WAVE_ARCHS),
                    help="architectures that also compile the wave-efficiency shapes")
    args = ap.parse_args(argv)
    if len(args.arch) > 1 and args.jobs > 1:
        return _parallel(args.arch, args.jobs, args.json, args.wave_arch)
    results = {"archs": {}, "skipped": {}}
    for arch in args.arch:
        why = ptxas_accepts(arch)
        if why is not None:
            results["skipped"][str(arch)] = why
            continue
        start = time.perf_counter()
        binaries, launches = compile_all(arch, wave_archs=args.wave_arch)
        results["archs"][str(arch)] = {"seconds": time.perf_counter() - start,
                                       "binaries": [asdict(b) for b in binaries],
                                       "launches": [asdict(launch) for launch in launches]}
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


def _parallel(archs, jobs, path, wave_archs=WAVE_ARCHS) -> int:
    """One process per architecture, ``jobs`` at a time; their JSON merged into ``path``."""
    env = _compile_env()
    pending = list(archs)
    running: list[tuple[subprocess.Popen, str]] = []
    merged = {"archs": {}, "skipped": {}}
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and len(running) < jobs:
                arch = pending.pop(0)
                out = os.path.join(tmp, f"{arch}.json")
                cmd = [sys.executable, "-m", "tools.triton_aot", "--arch", str(arch), "--json", out,
                       "--wave-arch", *map(str, wave_archs)]
                running.append((subprocess.Popen(cmd, env=env), out))
            proc, out = running.pop(0)
            rc |= proc.wait()
            if os.path.exists(out):
                with open(out) as f:
                    part = json.load(f)
                merged["archs"].update(part["archs"])
                merged["skipped"].update(part["skipped"])
    with open(path, "w") as f:
        json.dump(merged, f, indent=1, default=str)
    return rc


def _compile_env(cache_dir: str | os.PathLike | None = None) -> dict:
    """This process' environment without TRITON_INTERPRET, with this package importable and, if given, its own
    Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    return env


def run_subprocess(archs=ARCHS, jobs: int = 1, workdir: str | os.PathLike | None = None,
                   timeout: float | None = None, wave_archs=WAVE_ARCHS) -> tuple[dict, float]:
    """(results, wall seconds) of ``python -m tools.triton_aot`` run in a subprocess without
    TRITON_INTERPRET (callable from an interpreter process: the tests, the resource benchmark), with a fresh
    Triton cache in ``workdir`` (a temporary directory when None), so compile times are cold times.

    Raises RuntimeError, with the end of the subprocess' stderr, when it fails or any of ``archs`` is in neither
    ``results["archs"]`` nor ``results["skipped"]``."""
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_subprocess(archs, jobs, tmp, timeout, wave_archs)
    workdir = Path(workdir)
    out = workdir / "resources.json"
    cmd = [sys.executable, "-m", "tools.triton_aot", "--arch", *map(str, archs),
           "--jobs", str(jobs), "--json", str(out), "--wave-arch", *map(str, wave_archs)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_compile_env(workdir / "triton-cache"), capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - start

    def failure(what: str) -> RuntimeError:
        return RuntimeError(f"aot subprocess {what} (rc {proc.returncode}): {' '.join(cmd)}\n"
                            f"--- stderr (end) ---\n{proc.stderr[-6000:]}\n"
                            f"--- stdout (end) ---\n{proc.stdout[-2000:]}")

    if proc.returncode != 0:
        raise failure("failed")
    if not out.exists():
        raise failure("wrote no results")
    results = json.loads(out.read_text())
    missing = [a for a in archs if str(a) not in results["archs"] and str(a) not in results["skipped"]]
    if missing:
        raise failure(f"has no result for sm_{', sm_'.join(map(str, missing))}")
    return results, wall


if __name__ == "__main__":
    sys.exit(main())
