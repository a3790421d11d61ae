"""Resource table of every compiled Triton kernel: registers, spills, shared memory, tensor-core instructions,
occupancy and cold compile time, per GPU architecture, without a GPU; the logits kernels' main loops counted from
their SASS (instructions per element, load and store widths, barriers); the grids of the wave cases and their
wave efficiency.

Runs ``python -m tools.triton_aot`` through ``aot.run_subprocess`` (as the CI test does: the backend's own
launchers and tile tables, Triton's launch path, ptxas, cuobjdump) with a fresh Triton cache, so the compile times
are cold, and writes markdown tables.

    python benchmarks/triton_resources.py --out docs/triton-kernels.md [--json resources.json] [--arch 80 90 100]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

from sirl_kernels.backends.triton import utils  # noqa: E402
from tools import triton_aot as aot  # noqa: E402

FLAGS = ("SPLIT", "HAS_BIAS", "NEED_DB", "LABEL_FROM_ROWS", "UNIT", "OUT_UNIT", "HAS_SC", "HAS_VE", "HAS_GAMMA",
         "HAS_DELTA")
TILES = ("R", "T", "VEC", "BLOCK_N", "BLOCK_V", "BLOCK_D", "BLOCK_S")


PROSE = [
    "## Why the logits kernels look the way they do",
    "",
    "The logits-input kernels stream V values per row and do a few operations on each, so the question is whether "
    "the SM can *issue* them as fast as HBM delivers the bytes. An H100 SXM issues at most 132 SMs x 4 schedulers "
    "x 32 lanes x 1.98 GHz = 33 T thread-instructions per second against 3.35 TB/s: ~10 per byte, ~20 per bf16 "
    "logit read, ~40 per logit read and written (`tools/gpu_model.py`, `instructions_per_byte`). The previous "
    "kernels spent 16.5 (forward) and 33.6-43.6 (backward) per logit: issue-bound at 55-80% of the bandwidth. "
    "The main loops below spend 9-11, with room left for the accumulators issue 23 adds behind constexpr flags.",
    "",
    "- **Tile `[R, T, VEC]`** (`logits.tile_offsets`): T = 32 x num_warps threads, each owning R rows of VEC "
    "contiguous elements (16 bytes: one LDG.E.128). Every reduction in the loop (the tile's max, the sums) runs "
    "over axes 0 and 2, inside the thread: no shuffle, no barrier. The forward keeps a per-thread state (max, "
    "sum, weighted sum) rescaled once per R x VEC = 16 elements and reduces it across the block once per row "
    "(and split), after the loop.",
    "- **Per element** (forward): a max, a subtract, a multiply, an exp2, an add, and for the entropy sum a clamp "
    "and an FMA (`logits.update_state`: d = (x - max) log2(e) / T clamped at -FLT_MAX, so a -inf logit adds 0 "
    "rather than 0 x -inf, while a NaN still adds NaN through its exp2). One rescale (`logits.rescale_state`) and "
    "these terms serve every state of the backend: the per-thread states, their block reduction, the fused-linear "
    "forward's row states and the split-V merge. Backward (`logits.grad_row`, `grad_nonlabel`): "
    "`dz = 2^(u log2(e) + b) (c1 u + c0)`, `u = max((x - m) / T, u_min)`, with per-row `b = log2(1/T) - ln s "
    "log2(e)`, `c1 = beta`, `c0 = alpha - beta ln s` (the coefficient form of `backends/rows.py`, "
    "`dx = p (alpha + beta log p) / T` off the label): a subtract, a multiply, a clamp, two `tl.fma` (so the "
    "count does not move with Triton's fp-fusion default, which turns off in Triton 3.10; every launch also pins "
    "`enable_fp_fusion=True`), an exp2 and a multiply. The chain rule's 1/T sits in the exponent, so no constant "
    "grows with it: a previous `c1 = -g_h / T^2` overflowed once 1/T > 1.8e19, and p = 0 times inf gave NaN "
    "gradients at temperatures the API accepts; that form saved one multiply per logit. The label's "
    "`p (alpha + beta log p) + lam (1 - p)` (`logits.grad_label`, `1 - p = -expm1(log p)`, exact near p = 1) is "
    "written once per row as a scalar, after the loop; in place, one barrier after the label's early read and one "
    "before its store (both outside the loop) order that column's accesses across warps. The fused-linear "
    "backward's epilogue is the same three functions. Column indices are 32-bit; row offsets 64-bit.",
    '- **Self-certainty and varentropy (issue 23), behind constexprs.** With `HAS_SC` / `HAS_VE` (only when the op '
    "asks for `rows.Extras`) the forward keeps two more sums in the state's base-2 units, shifted by the running "
    'max like the others (`logits.rescale_extras`, `update_state_extras`): `u2 = sum d` (rescaled `u2 + n c`, n the '
    "columns covered; the masked tail's -inf fill kept out of it) and `q2 = sum 2^d d^2` (rescaled `2^c (q2 + 2 c "
    'w2 + c^2 s)`, every term of one sign), finalized as `SC = ln s - ln2 u2 / V - ln V` (+inf with a -inf logit) '
    'and `VE = ln2^2 (q2 / s - (w2 / s)^2)` clamped at 0; the split-V merge merges them with the same rules. Per '
    "element an add for `u2`, and for `q2` the product `2^d d` shared with the entropy's sum and one FMA: on sm_90 "
    'the bf16 forward goes from 10.4 to 14.1 instructions per logit with both (14.8 with fp-fusion off; 11.7 with '
    'SC alone, 12.8 with VE alone; fp32 13.0, fp16 13.6), 40 registers, held to `aot.EXTRAS_INSTRUCTION_BUDGET` = '
    "16 (a forward only reads: under the ~18-20 per bf16 logit at which issue meets HBM). The backward's `gamma "
    'L^2` and `delta` terms (`HAS_GAMMA` / `HAS_DELTA`: `logits.grad_row_x`, `grad_nonlabel_x`, `grad_label_x`) '
    'cost one FMA (`(c2 u + c1) u + c0`) and nothing for delta (folded into the last multiply as an FMA, so a p = 0 '
    'column is exactly delta / T): bf16 11.0 per logit (from 10.0), fp16 10.5, fp32 9.6, within the budget of 12. '
    "The fused-linear backward computes the label's term per row in that specialisation (the tile-wide form spilled "
    "under sm_90's 128-register cap): 96 registers, no spill. With every flag off each kernel compiles to the same "
    'SASS as before them (instruction counts and registers of all 51 sm_90 default binaries unchanged).',
    "- **16-byte loads for any V.** The loop body is unmasked and one masked tail tile follows it; each row's "
    "offset is `row x stride x UNIT` with the stride passed in units of 16 bytes (`utils.stride_unit`) when it is "
    "a multiple of them, so the compiler knows every row starts aligned: V = 151936, a V = 151665 view of a "
    "151936-wide buffer and V = 50257 rows of a 50264-stride buffer all get LDG.E.128 in the loop (the tail tile "
    "uses 2-byte loads). The out-of-place gradient (the launcher's, and on a GPU the op's for every backend: "
    "`ops._gradient_strides`, with the same strides in its fake implementation) has rows as far from alignment as "
    "the logits' rows (`_sizes.aligned_row_stride`), so the backward of the V = 151665 view writes rows padded to "
    "151672 with 16-byte stores and meets the budget like the in-place one (it wrote a contiguous [N, 151665] "
    "gradient before: 2-byte stores, 2 barriers in the loop, 12.8 per logit).",
    "- **Alignment: what a row stride that is not a multiple of 16 bytes costs.** A contiguous [N, 50257] bf16 "
    "tensor (GPT-2), or a view starting off alignment, has rows that cannot all start aligned: the kernels get "
    "UNIT = 1 and Triton proves only the element alignment, so every load is 2 bytes wide. Correct, compiled for "
    "every architecture without spills (`aot.CASES`, in place), and slow: on sm_90 the forward spends ~35 "
    "instructions per logit and the backward ~13 (table below), issue-bound at roughly half of the bandwidth. "
    "The remedy is on the caller's side: a vocabulary padded to a multiple of 8 (as Qwen's 151936-wide lm_head "
    "is, sliced to 151665) keeps every kernel on 16-byte loads. (A per-row scalar head that realigns each row "
    "before the loop would fix it in the kernels; not done.)",
    "- **Bytes in flight (Little's law).** At ~3.0 TB/s and ~800 ns of loaded latency an H100 SM needs "
    "3.0e12 / 132 x 800e-9 = ~18 KB in flight. A warp waiting on its R loads holds 32 lanes x 32 bytes (bf16) or "
    "64 bytes (fp32) = 1-2 KB; with the CTAs/SM below (5 x 8 warps forward, 8 x 8 backward bf16) the resident "
    "warps hold 40-64 KB when waiting, 2-3.5x what is needed, without a software prefetch (Triton's `num_stages` "
    "pipelining would stage through shared memory behind a barrier in the loop).",
    "- **Grids** come from the compiled kernel's resident CTAs per SM (registers, shared memory, warps: "
    "`utils.resident_ctas`, read from the binary on a GPU) times the SMs: the fewest split-V counts whose "
    "programs fill their waves to >= 90% (`utils.choose_num_splits`), not 2 x SMs.",
]


def arch_name(arch: int) -> str:
    gpu = utils.GPU_ARCHS.get(arch)
    return f"sm_{arch} ({gpu.gpu})" if gpu else f"sm_{arch}"


def _pointers(dtypes: str) -> str:
    """The pointer arguments' dtypes in order, runs folded: "bfloat16, int64, float32 x6"."""
    runs: list[list] = []
    for d in dtypes.split(","):
        if runs and runs[-1][0] == d:
            runs[-1][1] += 1
        else:
            runs.append([d, 1])
    return ", ".join(d if k == 1 else f"{d} x{k}" for d, k in runs)


def _spec(b) -> str:
    flags = [f"{k}={int(v)}" for k, v in b["constexprs"].items() if k in FLAGS]
    tiles = "x".join(str(b["constexprs"][k]) for k in TILES if k in b["constexprs"])
    extra = [f"maxnreg {b['constexprs']['maxnreg']}"] if "maxnreg" in b["constexprs"] else []
    fusion = [] if b.get("fp_fusion", True) else ["fp-fusion off"]
    return " ".join(flags + [tiles, f"{b['num_warps']}w/{b['num_stages']}s"] + extra + fusion)


def _cell(b) -> str:
    if b is None:
        return "-"
    if b["error"]:
        return "**compile error**"
    spills = aot.spilled_bytes(b)
    tc = "/".join(b["tensor_core_instrs"]) or ("**none**" if aot.needs_tensor_cores(b) else "-")
    parts = [f"{b['registers']} r", f"{b['shared_bytes'] / 1024:.0f} KiB", tc,
             f"{b['blocks_per_sm']}x{b['num_warps']}w", f"{b['compile_s']:.1f} s"]
    if spills:
        parts.insert(1, f"**spills {spills} B**")
    return " · ".join(parts)


def render(results: dict, wall: float | None) -> str:
    import triton

    archs = sorted(int(a) for a in results["archs"])
    smem = ", ".join(f"{aot.SM_LIMITS[a].smem // 1024} KiB on sm_{a}" for a in archs if a in aot.SM_LIMITS)
    table: dict = {}
    for arch in archs:
        for b in results["archs"][str(arch)]["binaries"]:
            key = (b["kernel"], _pointers(b["dtypes"]), _spec(b))
            table.setdefault(key, {"case": b["case"]})[arch] = b
    lines = [
        "# Triton kernels: what ptxas made of them",
        "",
        "Generated by `python benchmarks/triton_resources.py --out docs/triton-kernels.md` on "
        f"{datetime.date.today().isoformat()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Triton {triton.__version__}); the CI test "
        "`tests/sirl_kernels/backends/test_triton_compile.py` compiles the same binaries and fails on a compile "
        "error, spills, a bf16/fp16 GEMM without tensor-core instructions or a cold compile over 60 s.",
        "",
        "**Nothing here ran on a GPU.** Every launch the backend's launchers issue on a GPU of each architecture "
        "(its tile tables, on `meta` tensors: `tools/triton_aot.py`, cases in `aot.CASES`) was "
        "compiled with Triton's own launch path (`JITFunction.warmup` under a compile-only driver) and ptxas "
        "(ptxas-blackwell for sm_100), then read with one `cuobjdump --dump-resource-usage -sass` each. "
        "Identical launches go through Triton once and identical specialisations compile once. The grids were "
        "sized from these binaries' own registers and shared memory (`utils.resident_ctas`, answered during the "
        "AOT run by compiling the launch). The wave-efficiency shapes are compiled here for every architecture; "
        "the CI test compiles them only for sm_80 and sm_90, where `test_gpu_model.py` asserts them.",
        "",
        *PROSE,
        "",
        "## Resources",
        "",
        "Each cell: registers per thread · shared memory per block (static + Triton's dynamic) · tensor-core "
        "instructions in the SASS (HMMA: mma.sync; HGMMA: sm_90 wgmma; UTCHMMA: sm_100 tcgen05; `-`: no "
        "`tl.dot` or fp32 operands, which run on the FMA units as true fp32) · occupancy, resident blocks x "
        "warps per block per SM from registers (64K per SM, allocated per warp in units of 256) and shared "
        f"memory ({smem}, 1 KiB reserved per block) · cold compile time "
        "(Triton front end + ptxas, one process per architecture, two architectures at a time on this machine).",
        "",
    ]
    summary = ["| architecture | binaries | max registers | spills | bf16/fp16 GEMMs on tensor cores | slowest "
               "compile | total |", "|---|---:|---:|---|---|---:|---:|"]
    for arch in archs:
        bins = results["archs"][str(arch)]["binaries"]
        ok = [b for b in bins if not b["error"]]
        spilled = [b for b in ok if aot.spilled_bytes(b)]
        gemms = [b for b in ok if aot.needs_tensor_cores(b)]
        tc = sum(1 for b in gemms if b["tensor_core_instrs"])
        instrs = sorted({i for b in gemms for i in b["tensor_core_instrs"]})
        slow = max(ok, key=lambda b: b["compile_s"])
        summary.append(
            f"| {arch_name(arch)} | {len(bins)} ({len(bins) - len(ok)} errors) | "
            f"{max(b['registers'] for b in ok)} | {'none' if not spilled else f'**{len(spilled)} binaries**'} | "
            f"{tc}/{len(gemms)} ({', '.join(instrs)}) | {slow['compile_s']:.1f} s (`{slow['kernel']}`) | "
            f"{results['archs'][str(arch)]['seconds']:.0f} s |")
    for arch, why in results["skipped"].items():
        summary.append(f"| sm_{arch} | skipped: {why[:200]} | | | | | |")
    lines += summary
    if wall is not None:
        lines += ["", f"Wall time of the whole compile: {wall:.0f} s."]
    lines += main_loop_table(results, archs) + grid_table(results, archs)
    lines += ["", "## Every binary", "",
              "| kernel | pointer dtypes (in argument order) | specialisation (constexprs, tiles, warps/stages) | "
              "first case | " + " | ".join(arch_name(a) for a in archs) + " |",
              "|---|---|---|---|" + "---|" * len(archs)]
    for (kernel, dtype, spec), row in table.items():
        lines.append(f"| `{kernel}` | {dtype} | {spec} | {row['case']} | "
                     + " | ".join(_cell(row.get(a)) for a in archs) + " |")
    return "\n".join(lines) + "\n"


def main_loop_table(results: dict, archs: list) -> list[str]:
    """The logits kernels' main loops per element (tools/sass.py), every architecture, fusion on and off."""
    lines = ["", "## Main loops (SASS per element)", "",
             f"Thread-instructions per logit in the main loop (static count of the loop body / elements each thread "
             f"loads per iteration; `tools/sass.py`), load and store widths and barriers in the loop. Budget: "
             f"{aot.INSTRUCTION_BUDGET:g} on sm_90 with 16-byte loads and no barrier, fp-fusion on and off "
             f"(`tests/sirl_kernels/backends/test_triton_sass.py`). An H100 SXM issues ~10 thread-instructions per "
             f"byte of HBM bandwidth: ~20 per bf16 logit read, ~40 per logit read and written.", "",
             "| kernel | dtype | specialisation | first case | arch | instructions / elements | per element | loads | "
             "stores | barriers | registers | CTAs/SM |", "|---|---|---|---|---|---:|---:|---|---|---:|---:|---:|"]
    for arch in archs:
        rows = [b for b in results["archs"][str(arch)]["binaries"]
                if b["kernel"] in aot.STREAMING_KERNELS and not b["error"] and b["main_loop"]]
        for b in sorted(rows, key=lambda b: (b["kernel"], b["dtypes"], b["case"], not b["fp_fusion"])):
            loop = b["main_loop"]
            lines.append(
                f"| `{b['kernel']}` | {b['dtypes'].split(',')[0]} | {_spec(b)} | {b['case']} | sm_{arch} | "
                f"{loop['instructions']} / {loop['elements_per_iteration']:g} | "
                f"**{loop['instructions_per_element']:.2f}** | {', '.join(sorted(set(loop['loads'])))} | "
                f"{', '.join(sorted(set(loop['stores']))) or '-'} | {loop['barriers']} | {b['registers']} | "
                f"{b['blocks_per_sm']} |")
    return lines


def grid_table(results: dict, archs: list) -> list[str]:
    """The grids of the wave cases (N = 256 .. 16384, V = 151936, bf16) with their wave efficiency."""
    lines = ["", "## Grids (waves)", "",
             "Programs of each launch at V = 151936 bf16 as the launchers planned them from the compiled kernels' "
             "resident CTAs per SM (`utils.resident_ctas`), and the wave efficiency programs / (waves x CTAs/SM x "
             "SMs) (`tests/sirl_kernels/backends/test_gpu_model.py` requires >= 90%).", "",
             "| case | arch | kernel | grid | CTAs/SM | waves | efficiency |", "|---|---|---|---|---:|---:|---:|"]
    for arch in archs:
        res = results["archs"][str(arch)]
        by_hash = {b["hash"]: b for b in res["binaries"] if b.get("hash")}
        sms = utils.GPU_ARCHS[arch].num_sms
        for launch in res.get("launches", []):
            if (not launch["case"].startswith("waves:") or launch["kernel"] == "merge_partials_kernel"
                    or not launch.get("fp_fusion", True)):
                continue
            b = by_hash.get(launch["hash"])
            if b is None:
                continue
            programs = 1
            for g in launch["grid"]:
                programs *= g
            slots = b["blocks_per_sm"] * sms
            waves = -(-programs // slots)
            lines.append(f"| {launch['case'][7:]} | sm_{arch} | `{launch['kernel']}` | {launch['grid']} | "
                         f"{b['blocks_per_sm']} | {waves} | {utils.wave_efficiency(programs, slots):.1%} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--json", help="also keep the raw results here")
    ap.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--from-json", help="render these results instead of compiling")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results, wall = json.load(f), None
    else:
        results, wall = aot.run_subprocess(args.arch, args.jobs, wave_archs=args.arch)  # waves everywhere
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(render(results, wall))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
