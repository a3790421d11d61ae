"""Triton kernels of linear_token_logprobs_entropy: logits = hidden @ weight.T (+ bias), forward and backward.

Work is counted in multiples of N·D·V (one logits matmul is 2·NDV flops); the minimum with a recompute is
forward 2 + backward 6 = 8·NDV.

Forward (2·NDV, no logits in memory): a program owns BLOCK_N rows (and, when split, a range of V); for each
BLOCK_V tile of the vocabulary it accumulates ``hidden_tile @ weight_tile.T`` over D with ``tl.dot`` (fp32
accumulator), adds the bias and feeds the tile to the same online state as the logits kernels. The label's
logit is picked out of the tile.

Backward (6·NDV; 4·NDV with a frozen weight, 4·NDV with a frozen input), tokens in chunks of ``chunk_size``
rows through one workspace ``dz`` of ``chunk_rows x V`` elements in the input dtype:
1. ``_dlogits_kernel`` recomputes each logits tile once per (row tile, vocabulary tile) (2·NDV), turns it into
   dL/dlogits in fp32 from the saved row stats and entropy, stores it rounded to the input dtype (the matmul
   operand, per the numeric policy of ``chunked_linear.py``) and, for the bias gradient, the fp32 column sums
   of its tile, which ``_add_row_sums_kernel`` (``add_row_sums``) adds up in a fixed order (row tiles, then
   chunks);
2. ``_matmul_kernel`` (one GEMM kernel, fp32 accumulation over K in a fixed order, one program per output tile)
   forms ``dX[chunk] = dz @ W`` (2·NDV in total) and ``dW (+)= dz.T @ X[chunk]`` (2·NDV): the first chunk
   writes dW, later chunks add the fp32 dW accumulated so far, and the last writes it in the weight's dtype.
No atomics anywhere: dX, dW and db are bitwise reproducible.

Why this design and not one fused backward kernel (numbers in docs/triton-fused-linear.md). A kernel that keeps
dz tiles in registers must reduce dX over V and dW over N across programs. Holding a whole [BLOCK_N, D] or
[BLOCK_V, D] fp32 accumulator is impossible at D = 4096 (1-2 MiB), so it either slices D and recomputes the
logits once per slice (the previous design: 20·NDV at D = 1024, 68·NDV at D = 4096), or reduces through memory:
atomics (not reproducible) or a deterministic two-stage reduction with one fp32 [V, D] partial per group of row
tiles (2.5 GB per group at V = 151936, D = 4096). The workspace design does the minimum 8·NDV. Its extra bytes:
dz written once and read by the two GEMMs (3·N·V·2 bytes in bf16: 3.7 GB at N = 4096, V = 151936, under 1 ms
of H200 bandwidth against ~16 ms of 6·NDV bf16 matmul), the weight read twice per chunk (recompute and dX), and
the read-modify-write of the fp32 dW accumulator by every chunk after the first (8·V·D bytes each: 5 GB at
V = 151936, D = 4096), the price of bounding the workspace that the cuBLAS path of the "cuda" backend and
Liger's chunked loss pay too; a larger ``chunk_size`` divides it. The workspace holds at most
``chunk_size x V`` values in the input dtype, the bound the op promises.

Offsets are int64 throughout (row and column indices are int64 before any stride or row length multiplies
them; the tests put offsets past 2**31 into the rows of hidden, weight and the bias-gradient partial sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sirl_kernels.backends.triton import utils
from sirl_kernels.backends.triton.logits import (
    LOG2E,
    finalize_state,
    grad_tile,
    launch_merge,
    load_labels,
    store_row_outputs,
    update_state_2d,
)


# --------------------------------------------------------------------------------------------------------------
# logits tiles (forward and the backward's recompute)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden @ weight.T + bias, -inf in out-of-range columns. ``rows`` and
    ``cols`` are int64."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
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
    h_ptr, w_ptr, b_ptr, labels_ptr, out_lp, out_h, out_stats, part_m, part_s, part_w, xy_ptr,
    N, V, D, stride_h, stride_w, inv_t, scale2, ignore_index, chunk, NUM_SPLITS,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok = rows < N
    labels, valid, bad = load_labels(labels_ptr, rows, row_ok, V, ignore_index)
    v_begin = split * chunk
    v_stop = tl.minimum(v_begin + chunk, V)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w2 = tl.zeros([BLOCK_N], tl.float32)
    x_y = tl.zeros([BLOCK_N], tl.float32)
    offs = tl.arange(0, BLOCK_V).to(tl.int64)
    for start in range(v_begin, v_stop, BLOCK_V):
        cols = start + offs
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, valid, cols, cols < v_stop, D, stride_h, stride_w,
                         HAS_BIAS, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        x_y += tl.sum(tl.where(_label_columns(labels, start, BLOCK_V), x, 0.0), axis=1)
        m, s, w2 = update_state_2d(m, s, w2, x, scale2)
    if SPLIT:
        idx = rows * NUM_SPLITS + split
        tl.store(part_m + idx, m, mask=row_ok)
        tl.store(part_s + idx, s, mask=row_ok)
        tl.store(part_w + idx, w2, mask=row_ok)
        owns = valid & (labels >= v_begin) & (labels < v_stop)
        tl.store(xy_ptr + rows, x_y, mask=owns)
    else:
        lp, h, log_s = finalize_state(m, s, w2, x_y, inv_t, bad)
        store_row_outputs(out_lp, out_h, out_stats, rows, row_ok, valid, lp, h, m, log_s)


def linear_forward(hidden, weight, bias, labels, temperature, ignore_index, num_splits=None):
    n, dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(2)]
    out.append(torch.empty((n, 2), dtype=torch.float32, device=dev))
    if n == 0:
        return tuple(out)
    labels = labels.contiguous()
    target = utils.target_of(dev)
    cfg = utils.linear_logits_blocks(n, v, dim, hidden.dtype, target)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    row_programs = triton.cdiv(n, bn)
    tiles = triton.cdiv(v, bv)
    splits = num_splits if num_splits is not None else utils.choose_num_splits(row_programs, tiles, target)
    chunk, splits = utils.split_chunk(v, bv, max(1, min(splits, tiles)))
    inv_t = 1.0 / temperature
    args = (inv_t, inv_t * LOG2E, ignore_index)
    b = bias if bias is not None else weight  # dummy pointer when HAS_BIAS is False
    common = dict(HAS_BIAS=bias is not None, **_dot_constexprs(hidden.dtype), **cfg)
    if splits == 1:
        utils.launch(_linear_fwd_kernel, (row_programs, 1),
                     hidden, weight, b, labels, *out, out[0], out[0], out[0], out[0],
                     n, v, dim, hidden.stride(0), weight.stride(0), *args, chunk, 1, SPLIT=False, **common)
        return tuple(out)
    parts = [torch.empty(n, splits, dtype=torch.float32, device=dev) for _ in range(3)]
    # written by the split that owns the label, for every row with a label in [0, V); the merge reads no other row
    x_y = torch.empty(n, dtype=torch.float32, device=dev)
    utils.launch(_linear_fwd_kernel, (row_programs, splits),
                 hidden, weight, b, labels, *out, *parts, x_y,
                 n, v, dim, hidden.stride(0), weight.stride(0), *args, chunk, splits, SPLIT=True, **common)
    launch_merge(parts, x_y, labels, out, n, v, 0, args, target, label_from_rows=False)
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, stats_ptr, ent_ptr, glp_ptr, gh_ptr, dz_ptr, db_part_ptr,
    N, V, D, stride_h, stride_w, stride_dz, inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dz[N, V] = dL/dlogits of one chunk of N rows, rounded to dz's dtype, one logits tile per program; with
    NEED_DB the tile's fp32 column sums go to row ``program_id(0)`` of ``db_part`` [row tiles, V].

    Row tiles are the fastest grid axis: the programs that run together share a weight tile in L2."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    first_col = tl.program_id(1).to(tl.int64) * BLOCK_V
    cols = first_col + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    labels, valid, bad = load_labels(labels_ptr, rows, row_ok, V, ignore_index)
    m = tl.load(stats_ptr + 2 * rows, mask=valid, other=0.0)
    log_s = tl.load(stats_ptr + 2 * rows + 1, mask=valid, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=valid, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=valid, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=valid, other=0.0)
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, valid, cols, col_ok, D, stride_h, stride_w,
                     HAS_BIAS, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    dz = grad_tile((x - m[:, None]) * inv_t - log_s[:, None], _label_columns(labels, first_col, BLOCK_V),
                   ent[:, None], g_lp[:, None], g_h[:, None], inv_t)
    dz = tl.where(bad[:, None], float("nan"), tl.where(valid[:, None], dz, 0.0))
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DB:
        tl.store(db_part_ptr + tl.program_id(0).to(tl.int64) * V + cols, tl.sum(dz, axis=0), mask=col_ok)


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


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, acc_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_accm,
    ACCUMULATE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A @ B (+ ACC when ACCUMULATE): fp32 accumulation over K in increasing order, one program per C tile
    (so the sum of every element has a fixed order). C and ACC have unit stride along N; ACC is fp32."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # programs of GROUP_M consecutive row tiles share their B columns in L2
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm[:, None] * stride_am
    b_cols = b_ptr + rn[None, :] * stride_bn
    rk0 = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        rk = k + rk0
        k_ok = rk < K
        a = tl.load(a_rows + rk[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + rk[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(acc_ptr + rm[:, None] * stride_accm + rn[None, :], mask=mask, other=0.0)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def _dot_constexprs(dtype: torch.dtype) -> dict:
    dot_f32, precision = utils.dot_flags(dtype)
    return {"DOT_F32": dot_f32, "PRECISION": precision}


def add_row_sums(part, out, rows=None):
    """``out += part[:rows].sum(0)`` in fp32, rows added in increasing order: part [R, V] (unit stride along V),
    out [V] contiguous fp32."""
    rows = part.shape[0] if rows is None else rows
    v = part.shape[1]
    block = 1024
    utils.launch(_add_row_sums_kernel, (triton.cdiv(v, block),), part, out, rows, v, part.stride(0), BLOCK=block)


def matmul(a, b, out, accumulate=None, target=None):
    """``out = a @ b (+ accumulate)`` with fp32 accumulation in a fixed order: a [M, K], b [K, N] (any strides),
    out and the fp32 ``accumulate`` [M, N] with unit stride along N (``accumulate`` may be ``out``). ``target``:
    the caller's ``utils.target_of`` (looked up when not given)."""
    m, k = a.shape
    n = b.shape[1]
    target = utils.target_of(a.device) if target is None else target
    cfg = utils.matmul_blocks(m, n, k, a.dtype, target)
    acc = out if accumulate is None else accumulate
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    utils.launch(_matmul_kernel, grid, a, b, out, acc, m, n, k,
                 a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), acc.stride(0),
                 ACCUMULATE=accumulate is not None, **_dot_constexprs(a.dtype), **cfg)


def chunk_rows(n: int, chunk_size: int, block_n: int) -> int:
    """Rows per backward chunk: at most ``chunk_size`` (the op's bound on vocabulary-wide rows held at once),
    rounded down to whole row tiles when there is room for one."""
    rows = max(1, min(int(chunk_size), n))
    return rows - rows % block_n if rows >= block_n else rows


def linear_backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature,
                    ignore_index, chunk_size, needs_grad=(True, True, True)):
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
    rows = chunk_rows(n, chunk_size, cfg["BLOCK_N"])
    dz = torch.empty((rows, v), dtype=hidden.dtype, device=dev)  # the workspace: the matmul operand
    row_tiles = triton.cdiv(rows, cfg["BLOCK_N"])
    grad_bias_acc = torch.zeros(v, dtype=f32, device=dev) if need_bias else None
    grad_bias_part = torch.empty((row_tiles, v), dtype=f32, device=dev) if need_bias else None
    # dW: written straight into grad_weight by a single chunk; over several chunks summed in fp32 (in
    # grad_weight itself when that is fp32) and written in the weight's dtype by the last one.
    grad_weight_acc = None
    if need_weight and rows < n:
        grad_weight_acc = grad_weight if weight.dtype == f32 else torch.empty(weight.shape, dtype=f32, device=dev)
    labels = labels.contiguous()
    row_stats = (stats.to(f32).contiguous(), entropy.to(f32).contiguous(), grad_logprobs.to(f32).contiguous(),
                 grad_entropy.to(f32).contiguous())
    b = bias if bias is not None else weight  # dummy pointer when HAS_BIAS is False
    inv_t = 1.0 / temperature
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        h_chunk = hidden[start:stop]
        dz_chunk = dz[:stop - start]
        tiles = triton.cdiv(stop - start, cfg["BLOCK_N"])
        utils.launch(_dlogits_kernel, (tiles, triton.cdiv(v, cfg["BLOCK_V"])),
                     h_chunk, weight, b, labels[start:stop], *(t[start:stop] for t in row_stats), dz,
                     grad_bias_part if need_bias else dz,
                     stop - start, v, dim, hidden.stride(0), weight.stride(0), dz.stride(0), inv_t, ignore_index,
                     HAS_BIAS=bias is not None, NEED_DB=need_bias, **_dot_constexprs(hidden.dtype), **cfg)
        if need_bias:
            add_row_sums(grad_bias_part, grad_bias_acc, tiles)
        if need_hidden:
            matmul(dz_chunk, weight, grad_hidden[start:stop], target=target)
        if need_weight:
            first, last = start == 0, stop == n
            matmul(dz_chunk.t(), h_chunk, grad_weight if last else grad_weight_acc,
                   accumulate=None if first else grad_weight_acc, target=target)
    return grad_hidden, grad_weight, None if grad_bias_acc is None else grad_bias_acc.to(bias.dtype)
