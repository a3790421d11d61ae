"""Triton kernels of token_logprobs_entropy on logits [N, V]: forward (online state, optional split-V merge)
and backward (one pass writing the gradient of both outputs), side by side.

State of a row in this file's units (x = raw logits, z = x / T):
  m  = max_i x_i                         (raw units: the max is the same for x and z since T > 0)
  s  = sum_i 2^{d_i},  d_i = (x_i - m) * log2(e) / T      (= sum exp(z_i - max z))
  w2 = sum_i 2^{d_i} d_i                 (base-2 units: the natural w = ln2 * w2)
log2(e)/T is folded into one scale applied to the *difference* x - m, so each element costs a subtract, a
multiply, an exp2 and an FMA; folding it into x before subtracting the max would cost ulp(max * log2e) of
absolute accuracy on large logits. Then H = ln2 (log2 s - w2 / s), logprob = (x_y - m)/T - ln s, and the row
stats saved for the backward are (m, ln s) in these raw units: log p_i = (x_i - m)/T - ln s there too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sirl_kernels.backends.triton import utils

# tl.constexpr globals: the compiler rejects any global a @triton.jit function reads that is not a tl.constexpr
# (only the interpreter accepts a plain Python float).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------------------------------
# state helpers (shared with linear.py)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def rescale_state(m_old, s, w2, m_new, scale2):
    """Rescale a state with max m_old to a max m_new >= m_old: w2 <- 2^d (w2 + d s), s <- 2^d s (d in base 2).

    NaN is poison, whatever the GPU's max does with it: a state is empty only while s == 0, never because its
    max is -inf (a tile of NaN leaves m = -inf under a NaN-dropping max but s = NaN, which must survive), and
    equal maxima (both -inf included) rescale by exactly 1 instead of 2^(-inf + inf).
    """
    d2 = tl.where(m_old == m_new, 0.0, (m_old - m_new) * scale2)
    a = tl.exp2(d2)
    return a * s, a * (w2 + tl.where(s == 0.0, 0.0, d2 * s))


@triton.jit
def update_state_1d(m, s, w2, x, scale2):
    """Adds a 1-D fp32 tile x of raw logits (-inf where masked) to a scalar state."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    s, w2 = rescale_state(m, s, w2, m_new, scale2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # NaN stays NaN
    d2 = (x - m_safe) * scale2
    e = tl.exp2(d2)
    s += tl.sum(e, axis=0)
    w2 += tl.sum(tl.where(e > 0.0, e * d2, 0.0), axis=0)
    return m_new, s, w2


@triton.jit
def update_state_2d(m, s, w2, x, scale2):
    """Adds a [rows, cols] fp32 tile x of raw logits (-inf where masked) to per-row states."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    s, w2 = rescale_state(m, s, w2, m_new, scale2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # NaN stays NaN
    d2 = (x - m_safe[:, None]) * scale2
    e = tl.exp2(d2)
    s += tl.sum(e, axis=1)
    w2 += tl.sum(tl.where(e > 0.0, e * d2, 0.0), axis=1)
    return m_new, s, w2


@triton.jit
def finalize_state(m, s, w2, x_y, inv_t, bad_label):
    """(logprob, entropy, ln s) of a state; x_y is the label's raw logit. All -inf rows give NaN like PyTorch,
    and so do rows whose label lies outside [0, V) (``bad_label``; possible with ``check_labels=False``)."""
    s = tl.where(bad_label, float("nan"), s)
    log2s = tl.log2(s)
    log_s = LN2 * log2s
    h = LN2 * (log2s - w2 / s)
    h = tl.where(h < 0.0, 0.0, h)  # rounding can leave it a few ulp below 0; NaN stays NaN
    lp = (x_y - m) * inv_t - log_s
    return lp, h, log_s


@triton.jit
def load_labels(labels_ptr, rows, row_ok, V, ignore_index):
    """(labels, valid, bad) of rows: valid = in the batch and not ignored; bad = valid with a label outside
    [0, V), which must never be used as an offset (its row becomes NaN)."""
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    bad = valid & ((labels < 0) | (labels >= V))
    return labels, valid, bad


@triton.jit
def store_row_outputs(out_lp, out_h, out_stats, rows, row_ok, valid, lp, h, m, log_s):
    """Writes logprob, entropy and the (m, ln s) stats of rows; ignored rows get zeros."""
    tl.store(out_lp + rows, tl.where(valid, lp, 0.0), mask=row_ok)
    tl.store(out_h + rows, tl.where(valid, h, 0.0), mask=row_ok)
    tl.store(out_stats + 2 * rows, tl.where(valid, m, 0.0), mask=row_ok)
    tl.store(out_stats + 2 * rows + 1, tl.where(valid, log_s, 0.0), mask=row_ok)


@triton.jit
def expm1_from(logp, p):
    """expm1(logp) given p = exp(logp): a degree-9 Taylor polynomial for |logp| < 0.35 (relative error < 1e-9),
    p - 1 otherwise (no cancellation there)."""
    t = logp
    poly = t * (1.0 + t * (0.5 + t * (1.0 / 6 + t * (1.0 / 24 + t * (1.0 / 120 + t * (
        1.0 / 720 + t * (1.0 / 5040 + t * (1.0 / 40320 + t * (1.0 / 362880)))))))))
    return tl.where(tl.abs(t) < 0.35, poly, p - 1.0)


@triton.jit
def grad_tile(logp, is_label, lse_h, g_lp, g_h, inv_t):
    """dL/dx for one tile: [g_lp (1[i=y] - p) - g_h p (logp + H)] / T with p = exp(logp) = 0 giving exactly 0
    and the label's 1 - p computed as -expm1(logp). Broadcasts: logp/is_label tiles, lse_h/g_* per row.

    ``lse_h`` is the row entropy H.
    """
    p = tl.exp2(logp * LOG2E)
    one_minus = tl.where(is_label, -expm1_from(logp, p), -p)
    ent = tl.where(p > 0.0, p * (logp + lse_h), 0.0)
    return (g_lp * one_minus - g_h * ent) * inv_t


@triton.jit
def merge_partials_kernel(
    part_m, part_s, part_w, xy_ptr, labels_ptr, out_lp, out_h, out_stats,
    N, V, NUM_SPLITS, xy_stride, inv_t, scale2, ignore_index,
    LABEL_FROM_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merges the per-split partial states [N, NUM_SPLITS] of each row (a fixed-shape reduction: deterministic).

    The label's raw logit is read at ``xy_ptr + row * xy_stride + label`` (logits input, LABEL_FROM_ROWS) or
    at ``xy_ptr + row`` (fused-linear, where the split that owned the label wrote it; no other row of it is read,
    so it may be left uninitialised).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_S)
    idx = rows[:, None] * NUM_SPLITS + ks[None, :]
    mask = row_ok[:, None] & (ks < NUM_SPLITS)[None, :]
    pm = tl.load(part_m + idx, mask=mask, other=float("-inf"))
    ps = tl.load(part_s + idx, mask=mask, other=0.0)
    pw = tl.load(part_w + idx, mask=mask, other=0.0)
    m = tl.max(pm, axis=1)
    s, w2 = rescale_state(pm, ps, pw, m[:, None], scale2)
    s = tl.sum(s, axis=1)
    w2 = tl.sum(w2, axis=1)
    labels, valid, bad = load_labels(labels_ptr, rows, row_ok, V, ignore_index)
    if LABEL_FROM_ROWS:
        x_y = tl.load(xy_ptr + rows * xy_stride + labels, mask=valid & ~bad, other=0.0).to(tl.float32)
    else:
        x_y = tl.load(xy_ptr + rows, mask=valid & ~bad, other=0.0)
    lp, h, log_s = finalize_state(m, s, w2, x_y, inv_t, bad)
    store_row_outputs(out_lp, out_h, out_stats, rows, row_ok, valid, lp, h, m, log_s)


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_fwd_kernel(
    x_ptr, labels_ptr, out_lp, out_h, out_stats, part_m, part_s, part_w,
    stride_row, V, inv_t, scale2, ignore_index, chunk, NUM_SPLITS,
    SPLIT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride_row can exceed 2**31
    split = tl.program_id(1)
    label, valid, bad = load_labels(labels_ptr, row, True, V, ignore_index)
    v_begin = split * chunk
    v_stop = tl.minimum(v_begin + chunk, V)
    v_stop = tl.where(valid, v_stop, v_begin)  # ignored rows load nothing
    base = x_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    w2 = 0.0
    for start in range(v_begin, v_stop, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < v_stop, other=float("-inf")).to(tl.float32)
        m, s, w2 = update_state_1d(m, s, w2, x, scale2)
    if SPLIT:
        tl.store(part_m + row * NUM_SPLITS + split, m)
        tl.store(part_s + row * NUM_SPLITS + split, s)
        tl.store(part_w + row * NUM_SPLITS + split, w2)
    else:
        x_y = tl.load(base + label, mask=valid & ~bad, other=0.0).to(tl.float32)
        lp, h, log_s = finalize_state(m, s, w2, x_y, inv_t, bad)
        store_row_outputs(out_lp, out_h, out_stats, row, True, valid, lp, h, m, log_s)


def logits_forward(logits, labels, temperature, ignore_index, num_splits=None):
    """(logprobs, entropy [N], stats [N, 2]) fp32; ``num_splits`` forces the split-V path (tests)."""
    n, v = logits.shape
    dev = logits.device
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(2)]
    out.append(torch.empty((n, 2), dtype=torch.float32, device=dev))
    if n == 0:
        return tuple(out)
    assert logits.stride(1) == 1 or v == 1
    labels = labels.contiguous()
    inv_t = 1.0 / temperature
    target = utils.target_of(dev)
    block_v, warps = utils.logits_block_v(v, target)
    tiles = triton.cdiv(v, block_v)
    splits = num_splits if num_splits is not None else utils.choose_num_splits(n, tiles, target)
    chunk, splits = utils.split_chunk(v, block_v, max(1, min(splits, tiles)))
    args = (inv_t, inv_t * LOG2E, ignore_index)
    if splits == 1:
        utils.launch(_logits_fwd_kernel, (n, 1),
                     logits, labels, *out, out[0], out[0], out[0], logits.stride(0), v, *args, chunk, 1,
                     SPLIT=False, BLOCK_V=block_v, num_warps=warps)
        return tuple(out)
    parts = [torch.empty(n, splits, dtype=torch.float32, device=dev) for _ in range(3)]
    utils.launch(_logits_fwd_kernel, (n, splits),
                 logits, labels, *out, *parts, logits.stride(0), v, *args, chunk, splits,
                 SPLIT=True, BLOCK_V=block_v, num_warps=warps)
    launch_merge(parts, logits, labels, out, n, v, logits.stride(0), args, target, label_from_rows=True)
    return tuple(out)


def launch_merge(parts, xy, labels, out, n, v, xy_stride, args, target, label_from_rows):
    """Merges the split-V partial states ``parts`` (``merge_partials_kernel``) into the row outputs ``out``."""
    splits = parts[0].shape[1]
    block_s = utils.next_pow2(splits)
    # on a GPU about 2048 partial states per program (three fp32 [BLOCK_N, BLOCK_S] tiles stay in registers)
    block_n = max(2, min(64, 2048 // block_s)) if target.gpu else min(1024, utils.next_pow2(n))
    utils.launch(merge_partials_kernel, (triton.cdiv(n, block_n),),
                 *parts, xy, labels, *out, n, v, splits, xy_stride, *args,
                 LABEL_FROM_ROWS=label_from_rows, BLOCK_N=block_n, BLOCK_S=block_s)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_bwd_kernel(
    x_ptr, labels_ptr, stats_ptr, h_ptr, glp_ptr, gh_ptr, out_ptr,
    stride_row, out_stride_row, V, inv_t, ignore_index, chunk,
    BLOCK_V: tl.constexpr,
):
    """One pass: read a tile of logits, write the same tile of gradient (possibly into the logits' storage:
    every program reads each of its tiles before writing it, and programs own disjoint tiles)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    label, valid, bad = load_labels(labels_ptr, row, True, V, ignore_index)
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    ent = tl.load(h_ptr + row)
    g_lp = tl.where(valid, tl.load(glp_ptr + row), 0.0)
    g_h = tl.where(valid, tl.load(gh_ptr + row), 0.0)
    v_begin = split * chunk
    v_stop = tl.minimum(v_begin + chunk, V)
    base = x_ptr + row * stride_row
    out_base = out_ptr + row * out_stride_row
    # Ignored rows load nothing (and get zeros). The validity is folded into the load bound rather than
    # and-ed with a scalar mask, which the interpreter mishandles.
    load_stop = tl.where(valid, v_stop, 0)
    offs = tl.arange(0, BLOCK_V)
    for start in range(v_begin, v_stop, BLOCK_V):
        cols = start + offs
        inb = cols < v_stop
        x = tl.load(base + cols, mask=cols < load_stop, other=float("-inf")).to(tl.float32)
        dz = grad_tile((x - m) * inv_t - log_s, cols == label, ent, g_lp, g_h, inv_t)
        dz = tl.where(bad, float("nan"), tl.where(valid, dz, 0.0))
        tl.store(out_base + cols, dz.to(out_ptr.dtype.element_ty), mask=inb)


def logits_backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index,
                    num_splits=None, out=None):
    """Gradient w.r.t. the logits in their dtype. ``out`` may be ``logits`` itself (in-place backward)."""
    n, v = logits.shape
    dev = logits.device
    if out is None:
        out = torch.empty((n, v), dtype=logits.dtype, device=dev)
    if n == 0:
        return out
    target = utils.target_of(dev)
    block_v, warps = utils.logits_block_v(v, target)
    tiles = triton.cdiv(v, block_v)
    splits = num_splits if num_splits is not None else utils.choose_num_splits(n, tiles, target)
    chunk, splits = utils.split_chunk(v, block_v, max(1, min(splits, tiles)))
    f32 = torch.float32
    utils.launch(_logits_bwd_kernel, (n, splits),
                 logits, labels.contiguous(), stats.to(f32).contiguous(), entropy.to(f32).contiguous(),
                 grad_logprobs.to(f32).contiguous(), grad_entropy.to(f32).contiguous(), out,
                 logits.stride(0), out.stride(0), v, 1.0 / temperature, ignore_index, chunk,
                 BLOCK_V=block_v, num_warps=warps)
    return out
