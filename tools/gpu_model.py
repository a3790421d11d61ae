"""The performance model of the GPU kernels, without a GPU: issue rate and bytes in flight of the logits
kernels, waves of every grid, HBM traffic of the fused-linear program order through an L2, and the predicted
time of each op next to the anchors' published numbers.

    python -m tools.gpu_model [--json model.json] [--resources resources.json]

Everything here is a *model*: counts from the real compiler (instructions per element and CTAs per SM, from
``tools/triton_aot.py``; the defaults below are the sm_90 figures of docs/triton-kernels.md) combined with
datasheet figures (``utils.GPU_ARCHS``) and a few stated assumptions (``Assumptions``). No GPU ran any of it;
``scripts/gpu_check.sh`` measures the same ops and shapes the day one is lent, for the figures to sit side by side.

1. **Issue rate** (logits kernels). A GPU issues at most one warp-instruction per scheduler per clock: SMs x 4 x
   32 thread-instructions per clock. A kernel reading B bytes per element and issuing I thread-instructions per
   element is issue-bound when I / B > issue rate / bandwidth (about 9 per byte on an H100 SXM).
2. **Bytes in flight** (Little's law). Sustaining a bandwidth W at a memory latency L needs W x L bytes in flight:
   per SM, (W / SMs) x L. A warp waiting on its loads has (loads per lane x 16 B x 32) in flight, and the resident
   warps of a memory-bound kernel are nearly all waiting, so resident warps x bytes per warp must cover it.
3. **Waves.** P equal programs on S = CTAs/SM x SMs slots take ceil(P / S) waves; efficiency P / (waves x S).
4. **L2 traffic** of the fused-linear kernels: their own program order (``linear.grouped_tile``) simulated tile
   by tile with an LRU of the L2's size, ``slots`` programs advancing together one vocabulary tile at a time,
   every miss a read of the whole tile from HBM. A second variant splits the L2 into two halves, each caching
   only what its half of the SMs reads (if the hardware keeps one copy per partition, data read by all SMs
   costs twice its size). cuBLAS GEMMs are modelled by their waves: each wave of ``slots`` output tiles, laid
   out as the squarest block, reads its rows of A and columns of B once.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from dataclasses import asdict, dataclass

import triton

from sirl_kernels.backends.triton import linear, utils


@dataclass(frozen=True)
class Assumptions:
    """What the model takes as given (not counted): each is a stated guess, checked by gpu_check.sh's figures."""

    copy_fraction: float = 0.90  # device-to-device copy bandwidth / datasheet HBM bandwidth (QuACK: ~3.0 TB/s)
    issue_fraction: float = 0.80  # usable share of the issue slots in a streaming loop (stalls, tail)
    memory_latency_s: float = 800e-9  # loaded HBM latency for Little's law
    triton_mma_fraction: float = 0.60  # tensor-core peak reached by Triton's wgmma tiles with a softmax epilogue
    cublas_mma_fraction: float = 0.70  # cuBLAS bf16 GEMMs of these shapes (Liger's anchor: ~700 TF/s on H100)


ASSUME = Assumptions()
# CTAs per SM of the bf16 fused-linear tiles as compiled (docs/triton-kernels.md): forward and recompute.
FUSED_CTAS = {80: 1, 90: 2, 100: 1}
# Counted on sm_90 (docs/triton-kernels.md, tools/triton_aot.py): main-loop thread-instructions per element with
# fp-fusion on, and resident CTAs x warps of the launched specialisation. ``counts_from`` replaces them with the
# counts of a fresh AOT compile.
SM90_COUNTS = {
    ("fwd", "bf16"): {"instr": 10.38, "ctas": 5, "warps": 8, "lanes_bytes": 32},
    ("bwd", "bf16"): {"instr": 10.00, "ctas": 8, "warps": 8, "lanes_bytes": 32},
    ("fwd", "fp32"): {"instr": 9.12, "ctas": 5, "warps": 8, "lanes_bytes": 64},
    ("bwd", "fp32"): {"instr": 8.50, "ctas": 6, "warps": 8, "lanes_bytes": 64},
}
# The anchors (published, for the same hardware class; not measured here):
ANCHORS = {
    "quack": "QuACK memory-bound softmax / cross-entropy: ~3.0 TB/s on an H100 SXM (~90% of 3.35 TB/s HBM) for "
             "rows wider than 4k",
    "liger": "Liger-Kernel SM90 CuTe fused linear + entropy: 50.2 ms forward+backward at H = 4096, V = 131072, "
             "M = 8192 (8·M·H·V = 35.2 TFLOP: ~700 TFLOP/s)",
}
LIGER_TFLOPS = 8 * 8192 * 4096 * 131072 / 50.2e-3 / 1e12


def arch(sm: int) -> utils.GpuArch:
    return utils.GPU_ARCHS[sm]


def issue_rate(sm: int) -> float:
    """Thread-instructions per second the whole GPU can issue."""
    g = arch(sm)
    return g.num_sms * 4 * 32 * g.clock_hz


def instructions_per_byte(sm: int) -> float:
    """Issue slots per byte of HBM bandwidth (datasheet): ~9 on an H100 SXM, ~11 on an A100."""
    return issue_rate(sm) / arch(sm).hbm_bytes_per_s


# --- waves and bytes in flight ---------------------------------------------------------------------------------
def wave_efficiency(programs: int, ctas_per_sm: int, sm: int) -> float:
    return utils.wave_efficiency(programs, ctas_per_sm * arch(sm).num_sms)


def bytes_in_flight(sm: int, ctas_per_sm: int, warps: int, lane_bytes: int) -> dict:
    """Little's law for a streaming kernel: what an SM needs in flight at the copy bandwidth, and what its resident
    warps hold when waiting on their loads (32 lanes x ``lane_bytes`` each)."""
    g = arch(sm)
    need = g.hbm_bytes_per_s * ASSUME.copy_fraction / g.num_sms * ASSUME.memory_latency_s
    have = ctas_per_sm * warps * 32 * lane_bytes
    return {"needed_per_sm": need, "resident_per_sm": have, "ratio": have / need}


# --- logits ops ----------------------------------------------------------------------------------------------
@dataclass
class OpPrediction:
    op: str
    shape: str
    arch: int
    bytes: float
    flops: float = 0.0
    memory_s: float = 0.0
    issue_s: float = 0.0
    compute_s: float = 0.0
    wave_efficiency: float = 1.0
    time_s: float = 0.0
    pct_copy_bandwidth: float = 0.0  # logits ops: minimum bytes / copy bandwidth / time
    pct_tensor_peak: float = 0.0  # fused linear: flops / datasheet peak / time
    bound: str = ""
    notes: str = ""


def logits_op(direction: str, n: int, vocab: int, dtype: str = "bf16", sm: int = 90, counts=None,
              splits: int | None = None) -> OpPrediction:
    """Forward (read the logits) or backward (read them and write the gradient) of an [n, vocab] logits op:
    time = max(bytes / copy bandwidth, instructions / usable issue rate) / wave efficiency."""
    counts = (counts or SM90_COUNTS)[(direction, dtype)]
    g = arch(sm)
    elem = 2 if dtype in ("bf16", "fp16") else 4
    per_elem_bytes = elem * (2 if direction == "bwd" else 1)
    total = n * vocab * per_elem_bytes + n * 28
    tile = 4096
    tiles = triton.cdiv(vocab, tile)
    slots = counts["ctas"] * g.num_sms
    if splits is None:
        splits = utils.choose_num_splits(n, tiles, slots)
    eff = utils.wave_efficiency(n * splits, slots)
    # the main loop on every full tile, the masked tail tile at about twice its cost, once per row and split
    instructions = n * vocab * counts["instr"] * (1 + splits / max(1, tiles))
    memory_s = total / (g.hbm_bytes_per_s * ASSUME.copy_fraction)
    issue_s = instructions / (issue_rate(sm) * ASSUME.issue_fraction)
    time_s = max(memory_s, issue_s) / eff
    return OpPrediction(f"logits {direction}", f"N={n} V={vocab} {dtype}", sm, total, memory_s=memory_s,
                        issue_s=issue_s, wave_efficiency=eff, time_s=time_s,
                        pct_copy_bandwidth=100 * memory_s / time_s,
                        bound="memory" if memory_s >= issue_s else "issue",
                        notes=f"{counts['instr']:.2f} instr/elem, {splits} splits, {counts['ctas']} CTAs/SM")


# --- L2 traffic of the fused-linear program order -------------------------------------------------------------
class Lru:
    """An LRU cache of ``capacity`` bytes over named blocks of known size."""

    def __init__(self, capacity: float):
        self.capacity = capacity
        self.used = 0
        self.blocks: collections.OrderedDict = collections.OrderedDict()

    def hit(self, key) -> bool:
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return True
        return False

    def insert(self, key, size: int):
        self.blocks[key] = size
        self.used += size
        while self.used > self.capacity and len(self.blocks) > 1:
            _, old = self.blocks.popitem(last=False)
            self.used -= old


class L2:
    """The L2 as an LRU of its capacity (``partitions`` = 1), or as two halves (2): each address has a home half
    (by a hash of the block), an SM reads through its own half, a miss there is served by the home half, and a
    miss in the home half is an HBM read that fills the home half and a copy in the reader's half. So HBM is
    read once per home miss, and data read by SMs of both halves can take twice its size (NVIDIA documents the
    A100/H100 L2 as two partitions, each caching data for the SMs attached to it)."""

    def __init__(self, capacity: float, partitions: int = 1):
        self.parts = [Lru(capacity / partitions) for _ in range(partitions)]
        self.hbm = 0

    def read(self, key, size: int, sm: int):
        near = self.parts[sm % len(self.parts)]
        if near.hit(key):
            return
        home = self.parts[hash(key) % len(self.parts)]
        if home is not near and home.hit(key):
            near.insert(key, size)
            return
        self.hbm += size
        home.insert(key, size)
        if home is not near:
            near.insert(key, size)


@dataclass
class FusedPlan:
    """The grid of one fused-linear kernel as the launcher plans it."""

    n: int
    vocab: int
    dim: int
    block_n: int
    block_v: int
    row_tiles: int
    v_tiles: int
    group: int
    splits: int
    ctas_per_sm: int
    slots: int
    elem: int = 2

    @property
    def programs(self) -> int:
        return self.row_tiles * self.splits


def fused_forward_plan(n: int, vocab: int, dim: int, sm: int = 90, ctas_per_sm: int | None = None,
                       dtype=None) -> FusedPlan:
    """The launcher's own plan (``linear.rows_in_l2``, ``linear.fused_plan``) for a bf16 forward, with the
    CTAs per SM of the compiled kernel (``FUSED_CTAS``, counted by the AOT compile)."""
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    target = utils.GPU_TARGETS[sm]
    cfg = utils.linear_logits_blocks(n, vocab, dim, dtype, target)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    row_tiles, v_tiles = triton.cdiv(n, bn), triton.cdiv(vocab, bv)
    ctas = FUSED_CTAS[sm] if ctas_per_sm is None else ctas_per_sm
    slots = ctas * target.num_sms
    group, splits = linear.fused_plan(row_tiles, v_tiles, linear.rows_in_l2(bn, dim, dtype.itemsize, target),
                                      slots)
    _, splits = utils.split_chunk(vocab, bv, splits)
    return FusedPlan(n, vocab, dim, bn, bv, row_tiles, v_tiles, group, splits, ctas, slots, dtype.itemsize)


def _grouped(pid: int, row_tiles: int, cols: int, group: int) -> tuple[int, int]:
    """``linear.grouped_tile`` in Python (tested equal to the kernel's)."""
    per_group = group * cols
    g = pid // per_group
    first = g * group
    here = min(row_tiles - first, group)
    local = pid - g * per_group
    return first + local % here, local // here


def simulate_forward(plan: FusedPlan, l2_bytes: float, partitions: int = 1, jitter: float = 0.1,
                     seed: int = 0) -> dict:
    """HBM bytes of the fused forward's hidden and weight reads in its program order, through the L2 model
    (:class:`L2`). ``slots`` programs run at once; each step of a program (one vocabulary tile: its hidden block
    and one weight tile) takes its own time (CTAs do not run in lockstep), and a finished program's slot takes
    the next program id, as the block scheduler does. Time is drawn per step from [1 - jitter, 1 + jitter]
    (independent stalls; a fixed speed difference per SM would spread a group's programs over the vocabulary
    and defeat the sharing of weight tiles, as it would defeat any swizzled GEMM's L2 reuse)."""
    import heapq
    import random

    rng = random.Random(seed)
    tiles_per_split = triton.cdiv(plan.v_tiles, plan.splits)
    h_tile = plan.block_n * plan.dim * plan.elem
    w_tile = plan.block_v * plan.dim * plan.elem
    cache = L2(l2_bytes, partitions)

    def step():
        return 1 + jitter * (2 * rng.random() - 1)

    next_pid = 0
    active: list = [None] * plan.slots  # per slot: [row tile, next vocabulary tile, stop]
    events: list = []

    def start(slot, now):
        nonlocal next_pid
        if next_pid < plan.programs:
            r, g = _grouped(next_pid, plan.row_tiles, plan.splits, plan.group)
            next_pid += 1
            lo = g * tiles_per_split
            active[slot] = [r, lo, min(lo + tiles_per_split, plan.v_tiles)]
            heapq.heappush(events, (now + step(), slot))

    for slot in range(plan.slots):
        start(slot, 0.0)
    while events:
        now, slot = heapq.heappop(events)
        a = active[slot]
        cache.read(("h", a[0]), h_tile, slot)
        cache.read(("w", a[1]), w_tile, slot)
        a[1] += 1
        if a[1] < a[2]:
            heapq.heappush(events, (now + step(), slot))
        else:
            start(slot, now)
    hidden = plan.n * plan.dim * plan.elem
    weight = plan.vocab * plan.dim * plan.elem
    minimum = hidden + weight + plan.n * 24
    partial = plan.n * plan.splits * 12 * 2 if plan.splits > 1 else 0  # partial states written and read back
    moved = cache.hbm + plan.n * 24 + partial
    return {"hbm_bytes": moved, "minimum": minimum, "ratio": moved / minimum,
            "weight_passes": triton.cdiv(plan.row_tiles, plan.group), "l2_bytes": l2_bytes,
            "partitions": partitions, "jitter": jitter}


def l2_lower_bound(n: int, vocab: int, dim: int, elem: int, l2_bytes: float) -> float:
    """A lower bound of the HBM bytes any order of the logits GEMM needs with ``l2_bytes`` of cache, when the
    logits are consumed as they are formed: every (row, column) pair must have both its hidden and weight row on
    chip at once; a segment of the computation that reads S = l2_bytes bytes has at most 2 S bytes of rows on
    chip, so it covers at most (2 S / row)^2 / 4 pairs; hence at least ceil(pairs / that) segments of S bytes,
    and never less than both matrices once."""
    row = dim * elem
    pairs_per_segment = (2 * l2_bytes / row) ** 2 / 4
    segments = math.ceil(n * vocab / pairs_per_segment)
    return max((n + vocab) * row, (segments - 1) * l2_bytes)


def gemm_waves_bytes(m: int, n: int, k: int, elem: int, slots: int, bm: int = 128, bn: int = 256,
                     c_bytes: float = 0.0) -> float:
    """HBM bytes of a cuBLAS-class GEMM [m, k] x [k, n]: each wave of ``slots`` output tiles (bm x bn), laid out
    as the squarest block the grid allows, reads its rows of A and columns of B once; plus the output."""
    mt, nt = triton.cdiv(m, bm), triton.cdiv(n, bn)
    gm = max(1, min(mt, round(math.sqrt(slots * bn / bm))))
    gn = max(1, min(nt, slots // gm))
    total = 0.0
    for i in range(0, mt, gm):
        for j in range(0, nt, gn):
            rows = min(gm, mt - i) * bm
            cols = min(gn, nt - j) * bn
            total += (min(rows, m) + min(cols, n)) * k * elem
    return total + c_bytes


def fused_backward_bytes(n: int, vocab: int, dim: int, chunk_size: int, sm: int = 90, elem: int = 2) -> dict:
    """HBM bytes of the vocabulary-chunked backward (linear.linear_backward) with ``chunk_size``: per chunk the
    recompute kernel (its own order, simulated like the forward, one program per tile), dz written once and read
    by the two cuBLAS GEMMs (their waves: ``gemm_waves_bytes``), dX summed in an fp32 [N, D] buffer across
    chunks (read and written by every chunk after the first), each dW slice written once (no fp32 dW is read or
    rewritten: ``dw_rmw`` 0, where a token-chunked backward reads and writes V·D·4 bytes twice per extra chunk)."""
    import torch

    target = utils.GPU_TARGETS[sm]
    cfg = utils.linear_logits_blocks(n, vocab, dim, torch.bfloat16, target)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    rows, cols = linear.chunk_plan(n, vocab, chunk_size, bn, bv)
    assert rows == n, "the model covers the vocabulary-chunked plan"
    chunks = triton.cdiv(vocab, cols)
    widths = [min(cols, vocab - c * cols) for c in range(chunks)]
    slots = FUSED_CTAS[sm] * target.num_sms
    row_tiles = triton.cdiv(n, bn)
    group = min(row_tiles, linear.rows_in_l2(bn, dim, elem, target, share=0.5))
    recompute = 0.0
    for width in widths:
        tiles = triton.cdiv(width, bv)
        # one program per tile: a "split" per vocabulary tile, in groups of `group` row tiles
        plan = FusedPlan(n, width, dim, bn, bv, row_tiles, tiles, group, tiles, FUSED_CTAS[sm], slots, elem)
        recompute += simulate_forward(plan, arch(sm).l2_bytes)["hbm_bytes"] - n * 24 - 2 * 12 * n * tiles
    gemm_slots = target.num_sms  # cuBLAS: one 128 x 256 CTA per SM
    dz = 3 * n * vocab * elem  # written once, read by the dX and the dW GEMM
    dx = sum(gemm_waves_bytes(n, dim, w, elem, gemm_slots) for w in widths)
    dw = sum(gemm_waves_bytes(w, dim, n, elem, gemm_slots) for w in widths)
    dx_out = ((2 * chunks - 1) * n * dim * 4 if chunks > 1 else 0) + n * dim * elem
    dw_out = vocab * dim * elem
    moved = recompute + dz + dx + dw + dx_out + dw_out + n * 28
    compulsory = 2 * (n + vocab) * dim * elem + dz + n * dim * elem + dw_out + n * 28
    return {"chunks": chunks, "chunk_columns": cols, "hbm_bytes": moved, "compulsory": compulsory,
            "recompute": recompute, "dz": dz, "dx_gemm": dx, "dw_gemm": dw, "dx_out": dx_out, "dw_out": dw_out,
            "dw_rmw": 0.0, "token_chunked_dw_rmw": 2 * (triton.cdiv(n, max(1, chunk_size)) - 1) * vocab * dim * 4}


def backward_overhead(n: int, vocab: int, dim: int, chunk_size: int, sm: int = 90) -> dict:
    """The bytes chunking adds: the backward with ``chunk_size`` against the same design with one chunk (a dz
    workspace of all N x V values: the design's minimum), both through the same models."""
    chunked = fused_backward_bytes(n, vocab, dim, chunk_size, sm)
    whole = fused_backward_bytes(n, vocab, dim, n, sm)
    return {**chunked, "minimum": whole["hbm_bytes"], "ratio": chunked["hbm_bytes"] / whole["hbm_bytes"]}


def fused_linear_op(n: int, vocab: int, dim: int, sm: int = 90, chunk_size: int | None = None) -> list:
    """Predicted forward and forward+backward of the bf16 fused-linear op: time = max(matmul at the assumed
    tensor-core fraction, bytes at the copy bandwidth)."""
    from sirl_kernels._sizes import default_linear_chunk_size

    import torch

    g = arch(sm)
    chunk_size = default_linear_chunk_size(vocab, "triton", torch.bfloat16) if chunk_size is None else chunk_size
    plan = fused_forward_plan(n, vocab, dim, sm)
    fwd_bytes = simulate_forward(plan, g.l2_bytes)["hbm_bytes"]
    ndv = n * dim * vocab
    bw = g.hbm_bytes_per_s * ASSUME.copy_fraction
    fwd_compute = 2 * ndv / (g.bf16_flops * ASSUME.triton_mma_fraction)
    eff = utils.wave_efficiency(plan.programs, plan.slots)
    fwd = max(fwd_compute, fwd_bytes / bw) / eff
    bwd_bytes = fused_backward_bytes(n, vocab, dim, chunk_size, sm)["hbm_bytes"]
    bwd_compute = 2 * ndv / (g.bf16_flops * ASSUME.triton_mma_fraction) \
        + 4 * ndv / (g.bf16_flops * ASSUME.cublas_mma_fraction)
    total = fwd + max(bwd_compute, bwd_bytes / bw)
    shape = f"N={n} D={dim} V={vocab} bf16"
    return [
        OpPrediction("linear fwd", shape, sm, fwd_bytes, 2 * ndv, fwd_bytes / bw, compute_s=fwd_compute,
                     wave_efficiency=eff, time_s=fwd, pct_tensor_peak=100 * 2 * ndv / g.bf16_flops / fwd,
                     bound="compute" if fwd_compute >= fwd_bytes / bw else "memory",
                     notes=f"{plan.splits} splits x {plan.row_tiles} row tiles, groups of {plan.group}"),
        OpPrediction("linear fwd+bwd", shape, sm, fwd_bytes + bwd_bytes, 8 * ndv, (fwd_bytes + bwd_bytes) / bw,
                     compute_s=fwd_compute + bwd_compute, time_s=total,
                     pct_tensor_peak=100 * 8 * ndv / g.bf16_flops / total, bound="compute",
                     notes=f"Liger's anchor rate ({LIGER_TFLOPS:.0f} TF/s) would take "
                           f"{8 * ndv / LIGER_TFLOPS / 1e12 * 1e3:.1f} ms"),
    ]


# --- the tables -------------------------------------------------------------------------------------------------
WAVE_N = (256, 1024, 4096, 16384)
VOCAB, DIM = 151936, 4096


def predictions(sm: int = 90) -> list[OpPrediction]:
    out = []
    for n in WAVE_N:
        out.append(logits_op("fwd", n, VOCAB, sm=sm))
        out.append(logits_op("bwd", n, VOCAB, sm=sm))
    for n in (1024, 4096, 16384):
        out += fused_linear_op(n, VOCAB, DIM, sm)
    return out


def traffic_table(sms=(90, 80)) -> list[dict]:
    rows = []
    for sm in sms:
        g = arch(sm)
        for n in (1024, 4096, 16384):
            plan = fused_forward_plan(n, VOCAB, DIM, sm)
            for partitions in (1, 2):
                sim = simulate_forward(plan, g.l2_bytes, partitions)
                rows.append({"arch": sm, "N": n, "splits": plan.splits, "group": plan.group,
                             "programs": plan.programs, "slots": plan.slots, **sim,
                             "lower_bound": l2_lower_bound(n, VOCAB, DIM, 2, g.l2_bytes),
                             "wave_efficiency": utils.wave_efficiency(plan.programs, plan.slots)})
    return rows


def markdown(sm: int = 90) -> str:
    lines = ["| op | shape | bytes (GB) | memory (ms) | issue/compute (ms) | waves | predicted (ms) | % copy BW | "
             "% tensor peak | bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in predictions(sm):
        lines.append(f"| {p.op} | {p.shape} | {p.bytes / 1e9:.2f} | {p.memory_s * 1e3:.2f} | "
                     f"{max(p.issue_s, p.compute_s) * 1e3:.2f} | {p.wave_efficiency:.0%} | {p.time_s * 1e3:.2f} | "
                     f"{p.pct_copy_bandwidth:.0f} | {p.pct_tensor_peak:.0f} | {p.bound} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every table here")
    args = ap.parse_args(argv)
    print(f"H100 SXM: {instructions_per_byte(90):.1f} issue slots per HBM byte; A100: {instructions_per_byte(80):.1f}")
    print(markdown(90))
    for row in traffic_table():
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"predictions": [asdict(p) for p in predictions(90)], "traffic": traffic_table(),
                       "assumptions": asdict(ASSUME), "anchors": ANCHORS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
