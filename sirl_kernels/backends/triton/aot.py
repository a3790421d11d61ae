"""Compile every kernel of the Triton backend for a GPU target on a machine without a GPU, and read what ptxas
made of each binary.

    python -m sirl_kernels.backends.triton.aot --arch 80 90 100 --json resources.json

1. Record. The backend's own launchers run on ``meta`` tensors (shapes, strides and dtypes only) for the cases
   in :data:`CASES`, under ``utils.record_launches`` with the GPU tile table of the target: every launch the
   backend would issue on that GPU is recorded instead of run. Nothing here restates a tile or a signature.
2. Compile. Each launch goes through the kernel's own ``warmup`` (Triton's launch path: its argument
   specialisation, then ``triton.compile``), with a compile-only driver that reports the target and has no
   device, so Triton writes PTX and runs ptxas (ptxas-blackwell for sm_100) exactly as on the first call on a
   GPU. Launches that specialise identically compile once (Triton's in-memory cache).
3. Inspect. ``cuobjdump --dump-resource-usage`` gives registers, stack frame and local memory (spills live
   there) and static shared memory, to which Triton's dynamic shared memory is added; ``cuobjdump -sass`` tells
   whether the tensor cores are used (HMMA: mma.sync; HGMMA: sm_90 wgmma; UTC*MMA: sm_100 tcgen05).
   Occupancy follows from registers, shared memory and warps against each architecture's per-SM limits.

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
from sirl_kernels.backends.triton import linear, logits, utils

ARCHS = tuple(utils.GPU_ARCHS)  # sm_XX compiled by default
# the checkout (or site-packages) directory that holds the sirl_kernels package
ROOT = Path(__file__).resolve().parents[3]

# --- cases -----------------------------------------------------------------------------------------------------
# Each case calls the launchers the way the ops do. Together they reach every specialisation that compiles
# differently: dtype (fp32 / bf16 / fp16), split-V or not, bias or not, forward and backward, the in-place
# logits backward, one or several backward chunks (dW written directly, or accumulated in fp32 across chunks),
# and frozen-parameter backwards. Sizes are realistic (divisible by 16, as Triton specialises on it).
N_TOKENS, VOCAB, DIM = 4096, 151936, 4096
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _row_grads(n):
    return _meta(n), _meta(n)


def _logits_case(dtype, n, inplace=False):
    x, labels = _meta(n, VOCAB, dtype=dtype), _meta(n, dtype=torch.int64)
    lp, ent, stats = logits.logits_forward(x, labels, 1.0, -100)
    logits.logits_backward(*_row_grads(n), x, labels, stats, ent, 1.0, -100, out=x if inplace else None)


def _linear_case(dtype, n, bias, needs=(True, True, True), backward=True, chunk=None):
    """``chunk`` None: the op's default ``chunk_size`` for the Triton backend (``_sizes.default_linear_chunk_size``;
    at N_TOKENS = 4096 rows bf16/fp16 take 2 chunks of up to 3520 rows, fp32 3 of up to 1760)."""
    chunk = default_linear_chunk_size(VOCAB, "triton", dtype) if chunk is None else chunk
    hidden, weight = _meta(n, DIM, dtype=dtype), _meta(VOCAB, DIM, dtype=dtype)
    b = _meta(VOCAB, dtype=dtype) if bias else None
    labels = _meta(n, dtype=torch.int64)
    lp, ent, stats = linear.linear_forward(hidden, weight, b, labels, 1.0, -100)
    if backward:
        linear.linear_backward(*_row_grads(n), hidden, weight, b, labels, stats, ent, 1.0, -100, chunk, needs)


CASES = {}
for _name, _dt in DTYPES.items():
    CASES[f"logits {_name}"] = lambda dt=_dt: _logits_case(dt, N_TOKENS)
    CASES[f"logits {_name}, 8 rows (split-V)"] = lambda dt=_dt: _logits_case(dt, 8)
    CASES[f"logits {_name}, in-place backward"] = lambda dt=_dt: _logits_case(dt, N_TOKENS, inplace=True)
    # 4096 rows split V on these GPUs; the backward runs 2-3 chunks (default chunk_size): dW accumulated in fp32
    CASES[f"linear {_name} bias"] = lambda dt=_dt: _linear_case(dt, N_TOKENS, True)
    # 4 chunks: the middle ones add into the fp32 dW buffer (bf16/fp16: a GEMM whose output is fp32, which 2
    # chunks never launch)
    CASES[f"linear {_name} no bias, 4 chunks"] = lambda dt=_dt: _linear_case(dt, N_TOKENS, False, chunk=1024)
    # one chunk: dW written directly in the weight's dtype
    CASES[f"linear {_name} no bias, one chunk"] = lambda dt=_dt: _linear_case(dt, 256, False)
    CASES[f"linear {_name} frozen weight and bias"] = lambda dt=_dt: _linear_case(dt, N_TOKENS, True,
                                                                                   needs=(True, False, False))
    CASES[f"linear {_name} bias, 16 rows (split-V)"] = lambda dt=_dt: _linear_case(dt, 16, True, backward=False)
    # enough rows to fill the GPU without splitting V
    for _bias in (True, False):
        CASES[f"linear {_name} {'bias' if _bias else 'no bias'}, 32768 rows (no split)"] = \
            lambda dt=_dt, bias=_bias: _linear_case(dt, 8 * N_TOKENS, bias, backward=False)


def record(arch: int, cases: dict = CASES) -> list[tuple[str, utils.Launch]]:
    """(case, launch) of every launch the cases issue on a GPU of ``arch`` (sm_XX), in order."""
    out = []
    for name, run in cases.items():
        with utils.record_launches(utils.GPU_TARGETS[arch]) as launches:
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
# Per-SM limits: registers, shared memory (bytes usable by blocks; each block also reserves 1 KiB), warps, blocks;
# all but shared memory are the same on every target architecture.
SM_LIMITS = {arch: {"regs": 65536, "smem": g.smem_per_sm, "warps": 64, "blocks": 32}
             for arch, g in utils.GPU_ARCHS.items()}
TENSOR_CORE = re.compile(r"\b(HMMA|HGMMA|UTC\w*MMA)\b")


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
    error: str = ""


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


def inspect_cubin(cubin: bytes, name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _cuobjdump("--dump-resource-usage", f.name)
        sass = _cuobjdump("-sass", f.name)
    line = next((ln for ln in usage.split("Function ")[1:] if ln.startswith(name)), "")
    fields = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return {"registers": fields.get("REG", 0), "stack_bytes": fields.get("STACK", 0),
            "local_bytes": fields.get("LOCAL", 0), "static_shared": fields.get("SHARED", 0),
            "tensor_core_instrs": sorted(set(TENSOR_CORE.findall(sass)))}


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> tuple[int, int]:
    """(blocks, warps) resident per SM: registers are allocated per warp in units of 256, shared memory per
    block with a 1 KiB reservation."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * num_warps)
    by_smem = lim["smem"] // (shared_bytes + 1024)
    blocks = min(by_regs, by_smem, lim["warps"] // num_warps, lim["blocks"])
    return blocks, blocks * num_warps


def _dot_dtype(ttir: str) -> str:
    dots = re.findall(r"tt\.dot .*?: tensor<[\dx]+x(\w+)>", ttir)
    return dots[0] if dots else ""


def compile_launch(case: str, launch: utils.Launch, arch: int, seen: dict) -> Binary | None:
    """Compiles one recorded launch for sm_``arch``; None if an identical specialisation was compiled already."""
    from triton import knobs

    constexprs = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}
    dtypes = ",".join(str(a.dtype).replace("torch.", "") for a in launch.args if isinstance(a, torch.Tensor))
    # warps and stages as launched (Triton's defaults 4 and 3 when not given): what a compile error reports; a
    # successful compile overwrites them with the compiled metadata
    binary = Binary(arch, launch.name, case, constexprs, dtypes, launch.kwargs.get("num_warps", 4),
                    launch.kwargs.get("num_stages", 3))
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
        return binary
    binary.compile_s = time.perf_counter() - start
    if compiled.hash in seen:
        return None
    seen[compiled.hash] = binary
    res = inspect_cubin(compiled.asm["cubin"], compiled.name)
    binary.registers, binary.stack_bytes, binary.local_bytes = res["registers"], res["stack_bytes"], res["local_bytes"]
    binary.shared_bytes = res["static_shared"] + compiled.metadata.shared
    binary.tensor_core_instrs = res["tensor_core_instrs"]
    binary.spill_bytes = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
    binary.gemm_dtype = _dot_dtype(compiled.asm["ttir"])
    binary.num_warps, binary.num_stages = compiled.metadata.num_warps, compiled.metadata.num_stages
    binary.blocks_per_sm, binary.warps_per_sm = occupancy(arch, binary.registers, binary.shared_bytes,
                                                          binary.num_warps)
    return binary


def compile_all(arch: int, cases: dict = CASES) -> list[Binary]:
    if utils.INTERPRET:
        raise RuntimeError("aot: TRITON_INTERPRET=1 is set; kernels created under the interpreter cannot be "
                           "compiled (run `python -m sirl_kernels.backends.triton.aot` without it)")
    seen: dict = {}
    out = []
    for case, launch in record(arch, cases):
        binary = compile_launch(case, launch, arch, seen)
        if binary is not None:
            out.append(binary)
    return out


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
    args = ap.parse_args(argv)
    if len(args.arch) > 1 and args.jobs > 1:
        return _parallel(args.arch, args.jobs, args.json)
    results = {"archs": {}, "skipped": {}}
    for arch in args.arch:
        why = ptxas_accepts(arch)
        if why is not None:
            results["skipped"][str(arch)] = why
            continue
        start = time.perf_counter()
        binaries = compile_all(arch)
        results["archs"][str(arch)] = {"seconds": time.perf_counter() - start,
                                       "binaries": [asdict(b) for b in binaries]}
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


def _parallel(archs, jobs, path) -> int:
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
                cmd = [sys.executable, "-m", "sirl_kernels.backends.triton.aot", "--arch", str(arch), "--json", out]
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
                   timeout: float | None = None) -> tuple[dict, float]:
    """(results, wall seconds) of ``python -m sirl_kernels.backends.triton.aot`` run in a subprocess without
    TRITON_INTERPRET (callable from an interpreter process: the tests, the resource benchmark), with a fresh
    Triton cache in ``workdir`` (a temporary directory when None), so compile times are cold times.

    Raises RuntimeError, with the end of the subprocess' stderr, when it fails or any of ``archs`` is in neither
    ``results["archs"]`` nor ``results["skipped"]``."""
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_subprocess(archs, jobs, tmp, timeout)
    workdir = Path(workdir)
    out = workdir / "resources.json"
    cmd = [sys.executable, "-m", "sirl_kernels.backends.triton.aot", "--arch", *map(str, archs),
           "--jobs", str(jobs), "--json", str(out)]
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
