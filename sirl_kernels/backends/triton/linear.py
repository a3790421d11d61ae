"""Triton kernels of linear_token_logprobs_entropy: logits = hidden @ weight.T (+ bias), forward and backward.

Work is counted in multiples of N·D·V (one logits matmul is 2·NDV flops); the minimum with a recompute is
forward 2 + backward 6 = 8·NDV.

Forward (2·NDV, no logits in memory): a program owns BLOCK_N rows and a group of the vocabulary (split-V); for
each BLOCK_V tile of its group it accumulates ``hidden_tile @ weight_tile.T`` over D with ``tl.dot`` (fp32
accumulator), adds the bias and feeds the tile to the same online state as the logits kernels; the label's
logit is picked out of the tile with a 32-bit column compare. Partial states of the groups are merged by
``merge_partials_kernel`` in a fixed order.

**Program order is L2-aware** (``grouped_tile``). Every program re-reads its [BLOCK_N, D] hidden block for each
vocabulary tile, so the row tiles resident together must fit in L2, or hidden is re-read from HBM once per
vocabulary tile (at N = 16384, D = 4096 a row-tile-major grid keeps 132 x 512 KiB = 66 MiB of hidden live on an
H100: ~159 GB of HBM reads instead of 1.4 GB). Programs are numbered in groups of ``ROW_GROUP`` row tiles (as
many as fit in ``utils.L2_FRACTION`` of the L2), vocabulary groups slowest within a group: the programs resident
at any time touch at most ROW_GROUP row tiles, each group of row tiles reads the weight once, and the weight is
read ceil(row tiles / ROW_GROUP) times in all. The split count is the smallest that keeps a wave inside one row
group and fills whole waves (``utils.choose_num_splits`` on the compiled kernel's resident CTAs). The model of
this order, its HBM bytes and its waves is ``tools/gpu_model.py`` (docs/triton-fused-linear.md).

Backward (6·NDV; 4·NDV with a frozen weight or input), chunked over the **vocabulary**: with ``Vc`` columns at a
time (``chunk_plan``: all N rows and as many columns as ``chunk_size x V`` values of workspace allow),
1. ``_dlogits_kernel`` recomputes each logits tile of the [N, Vc] chunk once (2·NDV in all, the same L2-aware
   order), turns it into dL/dlogits in fp32 from the saved row stats and the row coefficients (alpha, beta, lam
   of ``backends/rows.py``), stores it rounded to the input dtype (the matmul operand, per the numeric policy of
   ``chunked_linear.py``) into the workspace ``dz`` (row stride padded to a multiple of 16 bytes) and, for the
   bias gradient, the fp32 column sums of its tile, which ``_add_row_sums_kernel`` adds up in a fixed order;
2. ``dW[v0:v1] = dz.T @ X`` (2·NDV in all): each vocabulary slice of dW is complete after its chunk and written
   once in the weight's dtype, so **no fp32 dW is read and rewritten across chunks**;
3. ``dX (+)= dz @ W[v0:v1]`` (2·NDV in all) into an fp32 [N, D] accumulator (N·D·4 bytes: 268 MB at N = 16384,
   D = 4096, against the 2.5 GB fp32 dW a token-chunked backward re-reads per chunk), written in the input
   dtype after the last chunk; a single chunk writes dX directly.
Steps 2 and 3 are ``matmul_into`` (cuBLAS on a GPU: ``mm``/``addmm`` with fp32 output where torch has them,
fp32 operands at IEEE precision), fixed shapes and order, no atomics: dz and db are bitwise reproducible for fixed
shapes, dX and dW as cuBLAS is (the same GPU model and cuBLAS version; with several CUDA streams only under
``CUBLAS_WORKSPACE_CONFIG=:4096:8``). Only when ``chunk_size x V`` cannot hold even one vocabulary tile of all N
rows are the rows chunked as well, and then dW is summed in fp32 across those row chunks.

Offsets are int64 throughout (row and column indices are int64 before any stride or row length multiplies
them; the tests put offsets past 2**31 into the rows of hidden, weight and the bias-gradient partial sums).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from sirl_kernels._sizes import batch_invariant_splits, empty_aligned_rows
from sirl_kernels.backends.matmul import matmul_into
from sirl_kernels.backends.rows import LinearRows, RowOutputs
from sirl_kernels.backends.triton import utils
from sirl_kernels.backends.triton.logits import (
    LOG2E,
    coefficient_flags,
    coefficient_rows,
    extra_outputs,
    finalize_extras,
    finalize_state,
    grad_label,
    grad_label_x,
    grad_nonlabel,
    grad_nonlabel_x,
    grad_row,
    grad_row_x,
    launch_merge,
    load_labels,
    partial_states,
    store_extras,
    store_row_outputs,
    update_state,
    update_state_extras,
)


# --------------------------------------------------------------------------------------------------------------
# program order and logits tiles (forward and the backward's recompute)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def grouped_tile(pid, row_tiles, col_tiles, ROW_GROUP):
    """(row tile, column) of program ``pid``: programs come in groups of ROW_GROUP row tiles (the last group may
    be smaller), and within a group the column is the slow index, so consecutive programs share row tiles (in
    L2) and walk the columns (vocabulary groups or tiles) together."""
    per_group = ROW_GROUP * col_tiles
    group = pid // per_group
    first = group * ROW_GROUP
    rows_here = tl.minimum(row_tiles - first, ROW_GROUP)
    local = pid - group * per_group
    return first + local % rows_here, local // rows_here


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 FIXED_ORDER_DOT: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden @ weight.T + bias, -inf in out-of-range columns. ``rows`` and
    ``cols`` are int64.

    ``FIXED_ORDER_DOT`` (the interpreter's batch-invariant forward only, ``_fixed_order_dot``): the product is
    summed over k = 0, 1, ..., D - 1 in sequence, one fp32 multiply and one fp32 add per element and k, instead
    of ``tl.dot``, which the interpreter runs as numpy's matmul, whose BLAS kernels may sum a row's products in
    an order that depends on the row's position in the tile."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if FIXED_ORDER_DOT:
        h_row = h_ptr + rows * stride_h
        w_row = w_ptr + cols * stride_w
        for k in range(0, D):
            a = tl.load(h_row + k, mask=row_ok, other=0.0).to(tl.float32)
            b = tl.load(w_row + k, mask=col_ok, other=0.0).to(tl.float32)
            acc = acc + a[:, None] * b[None, :]
    else:
        h_rows = h_ptr + rows[:, None] * stride_h
        w_rows = w_ptr + cols[:, None] * stride_w
        ks0 = tl.arange(0, BLOCK_D)
        for k in range(0, D, BLOCK_D):
            ks = k + ks0
            k_ok = ks < D
            a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def _label_columns(labels, start, BLOCK_V: tl.constexpr):
    """[rows, BLOCK_V] mask of each row's label column in the tile of columns ``start + arange(BLOCK_V)``,
    compared in 32 bits (a 64-bit compare per tile element costs registers the tile needs)."""
    local = labels - start
    local = tl.where((local >= 0) & (local < BLOCK_V), local, -1).to(tl.int32)
    return tl.arange(0, BLOCK_V)[None, :] == local[:, None]


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _linear_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, out_lp, out_h, out_stats, out_sc, out_ve, part_m, part_s, part_w, part_u,
    part_q, xy_ptr, N, V, D, stride_h, stride_w, inv_t, scale2, ignore_index, chunk, NUM_SPLITS, ROW_GROUP,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_VE: tl.constexpr, FIXED_ORDER_DOT: tl.constexpr = False,
):
    """BLOCK_N rows, the columns [split * chunk, +chunk): per-row online states of the logits tiles (with HAS_SC /
    HAS_VE the self-certainty / varentropy sums, ``logits.update_state_extras``)."""
    row_tile, split = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), NUM_SPLITS, ROW_GROUP)
    rows = row_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels, valid, bad = load_labels(labels_ptr, rows, row_ok, V, ignore_index)
    v_begin = split * chunk
    v_stop = tl.minimum(v_begin + chunk, V)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w2 = tl.zeros([BLOCK_N], tl.float32)
    x_y = tl.zeros([BLOCK_N], tl.float32)
    u2 = tl.zeros([BLOCK_N], tl.float32)
    q2 = tl.zeros([BLOCK_N], tl.float32)
    offs = tl.arange(0, BLOCK_V).to(tl.int64)
    for start in range(v_begin, v_stop, BLOCK_V):
        cols = start + offs
        col_ok = cols < v_stop
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, valid, cols, col_ok, D, stride_h, stride_w,
                         HAS_BIAS, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D, FIXED_ORDER_DOT)
        x_y += tl.sum(tl.where(_label_columns(labels, start, BLOCK_V), x, 0.0), axis=1)
        if HAS_SC or HAS_VE:
            m, s, w2, u2, q2 = update_state_extras(m, s, w2, u2, q2, x, (start - v_begin).to(tl.float32),
                                                   col_ok[None, :], scale2, False, True, HAS_SC, HAS_VE)
        else:
            m, s, w2 = update_state(m, s, w2, x, scale2, False)
    if SPLIT:
        idx = rows * NUM_SPLITS + split
        tl.store(part_m + idx, m, mask=row_ok)
        tl.store(part_s + idx, s, mask=row_ok)
        tl.store(part_w + idx, w2, mask=row_ok)
        if HAS_SC:
            tl.store(part_u + idx, u2, mask=row_ok)
        if HAS_VE:
            tl.store(part_q + idx, q2, mask=row_ok)
        owns = valid & (labels >= v_begin) & (labels < v_stop)
        tl.store(xy_ptr + rows, x_y, mask=owns)
    else:
        lp, h, log_s = finalize_state(m, s, w2, x_y, inv_t, bad)
        store_row_outputs(out_lp, out_h, out_stats, rows, row_ok, valid, lp, h, m, log_s)
        if HAS_SC or HAS_VE:
            sc, ve = finalize_extras(s, w2, u2, q2, tl.zeros([BLOCK_N], tl.float32) + (v_stop - v_begin), bad)
            store_extras(out_sc, out_ve, rows, row_ok, valid, sc, ve, HAS_SC, HAS_VE)


# A program of the fused forward walks at most MAX_PROGRAM_TILES vocabulary tiles: programs that share a weight
# tile drift apart the longer they run (CTAs do not advance in lockstep), and the further apart, the more weight
# tiles must stay in L2 at once. With several row groups, a group's hidden blocks fill at most MULTI_GROUP_SHARE of
# the L2 budget, the rest holding the weight tiles in flight while a wave moves from one group to the next. Both
# constants and utils.L2_FRACTION were chosen with the L2 model of tools/gpu_model.py.
MAX_PROGRAM_TILES = 40
MULTI_GROUP_SHARE = 5 / 7


def rows_in_l2(block_n: int, dim: int, itemsize: int, target: utils.TileTarget, share: float = 1.0) -> int:
    """How many [block_n, dim] hidden blocks fit in ``share`` x ``utils.L2_FRACTION`` of the target's L2."""
    return max(1, int(share * utils.L2_FRACTION * target.l2_bytes) // (block_n * dim * itemsize))


def fused_plan(row_tiles: int, v_tiles: int, fit: int, slots: int, least: int = 1) -> tuple[int, int]:
    """(row group, splits) of the fused forward, from the model (tools/gpu_model.py, docs/triton-fused-linear.md):

    - the fewest weight passes: when every row tile's hidden block fits (``fit`` blocks), one group, which reads
      the weight once; else groups of at most MULTI_GROUP_SHARE x fit row tiles, each reading the weight once;
    - with several groups, group x splits a multiple of ``slots``, so the programs resident at once belong to one
      group (a wave straddling two groups holds both groups' hidden blocks and thrashes the L2);
    - programs of at most MAX_PROGRAM_TILES vocabulary tiles, waves at least ``utils.TARGET_WAVE_EFFICIENCY``
      full; then the fewest splits.
    The interpreter (``slots <= 1``): one group, one split (unless forced). A pure function of its integers, so
    cached: the launcher pays for the search once per shape and device (microseconds after that)."""
    if slots <= 1 or utils._FORCED_SPLITS is not None:
        return max(1, row_tiles), utils.choose_num_splits(row_tiles, v_tiles, slots, least)
    return _fused_plan(int(row_tiles), int(v_tiles), int(fit), int(slots), int(least))


@functools.lru_cache(maxsize=4096)
def _fused_plan(row_tiles: int, v_tiles: int, fit: int, slots: int, least: int) -> tuple[int, int]:
    least = min(v_tiles, max(least, utils.cdiv(v_tiles, MAX_PROGRAM_TILES)))
    multi_fit = max(1, int(MULTI_GROUP_SHARE * fit))
    # no plan reads the weight fewer times than this: stop at the first (fewest) splits that reach it
    fewest_groups = 1 if row_tiles <= fit else utils.cdiv(row_tiles, multi_fit)
    best = None
    for splits in utils.distinct_splits(v_tiles, least):
        if splits < least or utils.wave_efficiency(row_tiles * splits, slots) < utils.TARGET_WAVE_EFFICIENCY:
            continue
        if row_tiles <= fit:
            group = row_tiles
        else:
            unit = slots // math.gcd(slots, splits)
            group = multi_fit // unit * unit
            if group == 0:
                continue
        key = (utils.cdiv(row_tiles, group), splits)
        if best is None or key < best[0]:
            best = (key, group, splits)
            if key[0] == fewest_groups:
                break
    if best is None:  # no split count fills its waves: the best-filled one, groups as large as allowed
        splits = utils.choose_num_splits(row_tiles, v_tiles, slots, least)
        return min(row_tiles, fit if row_tiles <= fit else multi_fit), splits
    return best[1], best[2]


def linear_forward(rows: LinearRows, extras=None, num_splits=None, batch_invariant=False) -> RowOutputs:
    """(logprobs, entropy [N], stats [N, 2]) fp32 of ``hidden @ weight.T (+ bias)``; ``extras`` (``rows.Extras``)
    filled in the same pass; ``num_splits`` forces the split-V path (tests).

    ``batch_invariant``: every output of a row is bitwise the same whatever N, the other rows and the row's
    position. By default two things depend on N: the row tile BLOCK_N (``utils.linear_logits_blocks``: smaller for
    small batches) and the split count (planned from the row tiles and the occupancy). Here the tiles are those of a
    large N (``batch_invariant=True`` there: BLOCK_N, BLOCK_V, BLOCK_D, warps and stages from V, D, the dtype and
    the target alone) and the splits ``_sizes.batch_invariant_splits(V)`` (capped by the tiles; ``num_splits``
    and ``utils.force_num_splits`` are ignored), so a row's logits and states are formed from the same tiles over
    the same column ranges and merged in the same order. What still depends on N does not touch a row's
    arithmetic: the row group (``ROW_GROUP``, ``grouped_tile``) only renumbers the programs (which program runs
    when), the row tile a row falls in only moves it within a tile, masked rows (past N, ignored) load zeros,
    and every reduction of ``_linear_fwd_kernel`` and of the merge is along a row (over its columns or splits),
    never across rows.

    That a row's results do not depend on its position within the tile is the remaining assumption:

    - On a GPU the batch-invariant forward keeps ``tl.dot``: it is a default specialisation (for N >= 64 the
      same tiles and constexprs as the default launch; only the split count differs). With the tile config and the K order fixed, a tensor-core MMA (mma.sync, wgmma, tcgen05)
      computes each output element from its row and column of the operands with the same instruction sequence,
      whichever row of the tile it is (the basis of the batch-invariant matmuls of vLLM and Thinking Machines);
      the row reductions (``tl.max`` / ``tl.sum`` over axis 1) combine a row's columns in a tree fixed by the
      layout, the same for every row. Triton's integer specialisations (N == 1, N % 16 == 0, NUM_SPLITS and
      ROW_GROUP == 1) change only index arithmetic and masks. This is argued, not measured on a GPU here.
    - Under the interpreter ``tl.dot`` is numpy's matmul of the fp32-upcast tiles, and OpenBLAS's kernels (e.g.
      its Haswell / Zen kernels) give results that depend on a row's position in the tile. So the interpreter's
      batch-invariant forward forms the tile with ``FIXED_ORDER_DOT`` (``_logits_tile``): a sequential sum over
      k of elementwise fp32 products, one rounding each, the same for every element; the row reductions are
      numpy reductions over axis 1 of a [BLOCK_N, BLOCK_V] array of fixed shape, each row reduced by the same
      loop."""
    hidden, weight, bias, labels, temperature, ignore_index = rows
    n, dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(2)]
    out.append(torch.empty((n, 2), dtype=torch.float32, device=dev))
    if n == 0:
        return RowOutputs(*out)
    labels = labels.contiguous()
    target = utils.target_of(dev)
    cfg = utils.linear_logits_blocks(n, v, dim, hidden.dtype, target, batch_invariant=batch_invariant)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    row_tiles = utils.cdiv(n, bn)
    tiles = utils.cdiv(v, bv)
    fit = rows_in_l2(bn, dim, hidden.itemsize, target)
    inv_t = 1.0 / temperature
    scalars = (inv_t, inv_t * LOG2E, ignore_index)
    b = bias if bias is not None else weight  # dummy pointer when HAS_BIAS is False
    extra_ptrs, flags = extra_outputs(extras, out[0])
    if any(flags.values()):
        # The self-certainty / varentropy sums are two more per-row fp32 states through the tile loop: under
        # sm_90's 128-register cap the 64-row split specialisation without bias spilled 32-48 B; without the cap
        # it compiles to more registers and no spill (fewer CTAs per SM, on a path that is asked for explicitly).
        cfg.pop("maxnreg", None)
    kwargs = dict(HAS_BIAS=bias is not None, **_dot_constexprs(hidden.dtype), **cfg, **flags)
    if _fixed_order_dot(batch_invariant, target):
        kwargs["FIXED_ORDER_DOT"] = True  # the default specialisations do not pass it (False)
    plan = {"group": row_tiles}

    def args_of(chunk, splits, parts=(out[0],) * 6):
        return (hidden, weight, b, labels, *out, *extra_ptrs, *parts, n, v, dim, hidden.stride(0), weight.stride(0),
                *scalars, chunk, splits, plan["group"])

    def choose(slots, least):
        plan["group"], splits = fused_plan(row_tiles, tiles, fit, slots, least)
        return splits

    def launch_of(splits):
        chunk, splits = utils.split_chunk(v, bv, splits)
        return (row_tiles * splits,), args_of(chunk, splits), dict(kwargs, SPLIT=splits > 1)

    if batch_invariant:
        num_splits = batch_invariant_splits(v)
        # the row group only orders the programs (one group under the interpreter, as by default)
        if target.gpu:
            plan["group"] = _batch_invariant_group(row_tiles, fit, utils.actual_splits(tiles, num_splits), launch_of,
                                                   target)
    elif num_splits is None:
        num_splits = utils.plan_splits(_linear_fwd_kernel, launch_of, choose, target)
    else:
        choose(1, 1)
    chunk, splits = utils.split_chunk(v, bv, max(1, min(num_splits, tiles)))
    if splits == 1:
        utils.launch(_linear_fwd_kernel, (row_tiles,), *args_of(chunk, 1), SPLIT=False, **kwargs)
        return RowOutputs(*out)
    parts = partial_states(n, splits, dev, flags)
    # written by the split that owns the label, for every row with a label in [0, V); the merge reads no other row
    x_y = torch.empty(n, dtype=torch.float32, device=dev)
    utils.launch(_linear_fwd_kernel, (row_tiles * splits,), *args_of(chunk, splits, (*parts, x_y)), SPLIT=True,
                 **kwargs)
    launch_merge(parts, x_y, labels, out, n, v, 0, scalars, target, label_from_rows=False, extra_ptrs=extra_ptrs,
                 flags=flags, chunk=chunk, batch_invariant=batch_invariant)
    return RowOutputs(*out)


def _fixed_order_dot(batch_invariant: bool, target: utils.TileTarget) -> bool:
    """Whether the fused forward forms its tiles with the sequential sum instead of ``tl.dot``: under the
    interpreter in batch-invariant mode only (``linear_forward``); a GPU target planned under the interpreter
    (the instrumentation's counts) keeps ``tl.dot``, as that GPU would."""
    return batch_invariant and utils.INTERPRET and not target.gpu


def _batch_invariant_group(row_tiles, fit, splits, launch_of, target):
    """Row group of the batch-invariant fused forward on a GPU, whose split count is fixed (``splits``), by
    ``fused_plan``'s rule for a given split count: one group when every hidden block fits the L2, else as many
    row tiles as fit in MULTI_GROUP_SHARE of it, a multiple of the CTAs a wave holds over ``splits`` when
    possible (a wave inside one group). Only the program order depends on it (``linear_forward``)."""
    if row_tiles <= fit:
        return row_tiles
    grid, args, kwargs = launch_of(splits)
    slots = utils.resident_ctas(_linear_fwd_kernel, grid, args, kwargs, target) * target.num_sms
    multi_fit = max(1, int(MULTI_GROUP_SHARE * fit))
    unit = slots // math.gcd(slots, splits)
    return max(1, min(row_tiles, multi_fit // unit * unit or multi_fit))


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, stats_ptr, alpha_ptr, beta_ptr, lam_ptr, gamma_ptr, delta_ptr, dz_ptr,
    db_part_ptr, N, V, col0, V_total, D, stride_h, stride_w, stride_dz, stride_db, inv_t, log2_inv_t, ignore_index,
    ROW_GROUP,
    HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_DELTA: tl.constexpr,
):
    """dz[N, V] = dL/dlogits of one chunk: N rows, the V vocabulary columns from ``col0`` on (``w_ptr`` and
    ``b_ptr`` point at the chunk's first vocabulary row; labels are full-vocabulary indices, checked against
    ``V_total``), rounded to dz's dtype, one logits tile per program in the L2-aware order of ``grouped_tile``.
    With NEED_DB the tile's fp32 column sums go to row ``row tile`` of ``db_part`` [row tiles, V]. The gradient is
    the logits kernels' (``grad_row``, ``grad_nonlabel``, the label's column by ``grad_label``; with HAS_GAMMA /
    HAS_DELTA their ``_x`` forms with the ``gamma L^2`` and ``delta`` terms)."""
    row_tile, col_tile = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), ROW_GROUP)
    rows = row_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    first_col = col_tile.to(tl.int64) * BLOCK_V
    cols = first_col + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    labels, valid, bad = load_labels(labels_ptr, rows, row_ok, V_total, ignore_index)
    m = tl.load(stats_ptr + 2 * rows, mask=valid, other=0.0)
    log_s = tl.load(stats_ptr + 2 * rows + 1, mask=valid, other=0.0)
    alpha = tl.load(alpha_ptr + rows, mask=valid, other=0.0)
    beta = tl.load(beta_ptr + rows, mask=valid, other=0.0)
    lam = tl.load(lam_ptr + rows, mask=valid, other=0.0)
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, valid, cols, col_ok, D, stride_h, stride_w,
                     HAS_BIAS, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D, False)
    if HAS_GAMMA or HAS_DELTA:
        gamma = tl.load(gamma_ptr + rows, mask=valid, other=0.0) if HAS_GAMMA else tl.zeros([BLOCK_N], tl.float32)
        delta = tl.load(delta_ptr + rows, mask=valid, other=0.0) if HAS_DELTA else tl.zeros([BLOCK_N], tl.float32)
        u_min, b, c2, c1, c0 = grad_row_x(m, log_s, alpha, beta, gamma, log2_inv_t)
        dz = grad_nonlabel_x(x, m[:, None], inv_t, u_min[:, None], b[:, None], c2[:, None], c1[:, None],
                             c0[:, None], (delta * inv_t)[:, None], HAS_GAMMA, HAS_DELTA)
        # the label's gradient per row, from its logit picked out of the tile (one row reduction), not over the
        # whole tile: the tile-wide form of the longer label term spilled under sm_90's 128-register cap
        is_label = _label_columns(labels, col0 + first_col, BLOCK_V)
        x_y = tl.sum(tl.where(is_label, x, 0.0), axis=1)
        g_y = grad_label_x((x_y - m) * inv_t - log_s, alpha, beta, gamma, lam, delta, inv_t, HAS_GAMMA, HAS_DELTA)
        dz = tl.where(is_label, g_y[:, None], dz)
    else:
        u_min, b, c1, c0 = grad_row(m, log_s, alpha, beta, log2_inv_t)
        dz = grad_nonlabel(x, m[:, None], inv_t, u_min[:, None], b[:, None], c1[:, None], c0[:, None])
        g_y = grad_label((x - m[:, None]) * inv_t - log_s[:, None], alpha[:, None], beta[:, None], lam[:, None],
                         inv_t)
        dz = tl.where(_label_columns(labels, col0 + first_col, BLOCK_V), g_y, dz)
    dz = tl.where(bad[:, None], float("nan"), tl.where(valid[:, None], dz, 0.0))
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DB:
        tl.store(db_part_ptr + row_tile.to(tl.int64) * stride_db + cols, tl.sum(dz, axis=0), mask=col_ok)


@triton.jit
def _add_row_sums_kernel(part_ptr, out_ptr, R, V, stride_part, BLOCK: tl.constexpr):
    """out[V] += sum over r of part[r, V] (rows ``stride_part`` elements apart), r in increasing order (fp32; a
    fixed order, so reproducible). The row offset is an int64 product, like every offset of this backend (at
    V = 151936, r x V passes 2**31 from row tile r = 14134 on)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < V
    acc = tl.load(out_ptr + cols, mask=col_ok, other=0.0)
    stride = tl.cast(stride_part, tl.int64)  # r * stride in 64 bits
    for r in range(0, R):
        acc += tl.load(part_ptr + r * stride + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + cols, acc, mask=col_ok)


def _dot_constexprs(dtype: torch.dtype) -> dict:
    dot_f32, precision = utils.dot_flags(dtype)
    return {"DOT_F32": dot_f32, "PRECISION": precision}


def add_row_sums(part, out, rows=None):
    """``out += part[:rows].sum(0)`` in fp32, rows added in increasing order: part [R, V] (unit stride along V),
    out [V] contiguous fp32."""
    rows = part.shape[0] if rows is None else rows
    v = part.shape[1]
    block = 1024
    utils.launch(_add_row_sums_kernel, (utils.cdiv(v, block),), part, out, rows, v, part.stride(0), BLOCK=block)


def chunk_plan(n: int, vocab: int, chunk_size: int, block_n: int, block_v: int) -> tuple[int, int]:
    """(rows, columns) of one backward chunk, holding at most ``chunk_size x vocab`` values of dz: all ``n`` rows
    and as many whole ``block_v`` tiles of columns as fit, balanced over the chunks; only when not even one tile
    of columns fits for all rows, one tile of columns and as many whole row tiles as fit."""
    budget = max(1, int(chunk_size)) * vocab
    if budget >= n * vocab:
        return n, vocab
    tile = min(vocab, block_v)
    if budget >= n * tile:
        cols = budget // n // block_v * block_v
        chunks = utils.cdiv(vocab, cols)
        return n, min(vocab, utils.cdiv(utils.cdiv(vocab, chunks), block_v) * block_v)
    rows = max(1, budget // tile)
    return (rows - rows % block_n if rows >= block_n else rows), tile


def _rows(t, start: int, stop: int):
    """``t[start:stop]``, or ``t`` itself when that is all of it (no view op for a single chunk)."""
    return t if start == 0 and stop == t.shape[0] else t[start:stop]


def linear_backward(rows: LinearRows, stats, coef, chunk_size, needs_grad=(True, True, True)):
    """The backward form of ``backends/rows.py`` for the coefficients ``coef`` (``rows.Coefficients``: alpha, beta,
    lam, [N] each) through ``hidden @ weight.T (+ bias)``: (grad_hidden, grad_weight, grad_bias)."""
    hidden, weight, bias, labels, temperature, ignore_index = rows
    need_hidden, need_weight, need_bias = needs_grad
    need_bias = need_bias and bias is not None
    n, dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    if n == 0 or not (need_hidden or need_weight or need_bias):
        if grad_weight is not None:
            grad_weight.zero_()
        return grad_hidden, grad_weight, torch.zeros_like(bias) if need_bias else None
    target = utils.target_of(dev)
    cfg = utils.linear_logits_blocks(n, v, dim, hidden.dtype, target)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    rows, cols = chunk_plan(n, v, chunk_size, bn, bv)
    # the workspace: the matmul operand, rows 16-byte aligned
    dz = empty_aligned_rows(rows, cols, hidden.dtype, dev)
    row_tiles = utils.cdiv(rows, bn)
    grad_bias_acc = torch.zeros(v, dtype=f32, device=dev) if need_bias else None
    grad_bias_part = torch.empty((row_tiles, cols), dtype=f32, device=dev) if need_bias else None
    # dX: summed in fp32 over the vocabulary chunks (in grad_hidden itself when that is fp32), written in the
    # input dtype after the last; a single vocabulary chunk writes it directly.
    grad_hidden_acc = grad_hidden
    if need_hidden and cols < v and hidden.dtype != f32:
        grad_hidden_acc = torch.empty((n, dim), dtype=f32, device=dev)
    # dW: each vocabulary slice complete after its chunk; only several row chunks sum it in fp32 (in
    # grad_weight itself when that is fp32), written in the weight's dtype at the end.
    grad_weight_acc = grad_weight
    if need_weight and rows < n and weight.dtype != f32:
        grad_weight_acc = torch.empty(weight.shape, dtype=f32, device=dev)
    labels = labels.contiguous()
    row_stats = (stats.to(f32).contiguous(), *coefficient_rows(coef))
    inv_t = 1.0 / temperature
    kwargs = dict(HAS_BIAS=bias is not None, NEED_DB=need_bias, **_dot_constexprs(hidden.dtype), **cfg,
                  **coefficient_flags(coef))
    # one program per tile: its row groups hold half of what the forward's do, so the two groups a wave straddles
    # at a group boundary both fit
    group = min(row_tiles, rows_in_l2(bn, dim, hidden.itemsize, target, share=0.5)) if target.gpu else row_tiles
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        h_chunk = _rows(hidden, r0, r1)
        tiles = utils.cdiv(r1 - r0, bn)
        for v0 in range(0, v, cols):
            v1 = min(v0 + cols, v)
            dz_chunk = dz[:r1 - r0, :v1 - v0]
            w_chunk = _rows(weight, v0, v1)
            utils.launch(_dlogits_kernel, (tiles * utils.cdiv(v1 - v0, bv),),
                         h_chunk, w_chunk, _rows(bias, v0, v1) if bias is not None else w_chunk, labels[r0:r1],
                         *(t[r0:r1] for t in row_stats), dz, grad_bias_part if need_bias else dz,
                         r1 - r0, v1 - v0, v0, v, dim, hidden.stride(0), weight.stride(0), dz.stride(0), cols,
                         inv_t, -math.log2(temperature), ignore_index, group, **kwargs)
            if need_bias:
                add_row_sums(grad_bias_part[:, :v1 - v0], grad_bias_acc[v0:v1], tiles)
            if need_hidden:
                matmul_into(_rows(grad_hidden_acc, r0, r1), dz_chunk, w_chunk, accumulate=v0 > 0)
            if need_weight:
                matmul_into(_rows(grad_weight_acc, v0, v1), dz_chunk.t(), h_chunk, accumulate=r0 > 0)
    if grad_hidden_acc is not grad_hidden:
        grad_hidden.copy_(grad_hidden_acc)
    if grad_weight_acc is not grad_weight:
        grad_weight.copy_(grad_weight_acc)
    return grad_hidden, grad_weight, None if grad_bias_acc is None else grad_bias_acc.to(bias.dtype)
