"""Triton kernels of linear_token_logprobs_entropy: logits = hidden @ weight.T (+ bias), never materialised.

Forward: a program owns BLOCK_N rows (and, when split, a range of V); for each BLOCK_V tile of the vocabulary
it accumulates ``hidden_tile @ weight_tile.T`` over D with ``tl.dot`` (fp32 accumulator), adds the bias and
feeds the tile to the same online state as the logits kernels. The label's logit is picked out of the tile.

Backward (deterministic, no atomics): the logits tiles are recomputed and turned into dL/dlogits tiles from the
saved lse and entropy;
- ``_dhidden_kernel``: a program owns rows x a BLOCK_DO slice of D and reduces dz @ weight over all of V;
- ``_dweight_kernel``: a program owns a BLOCK_V tile x a BLOCK_DO slice of D and reduces dz.T @ hidden over
  all tokens (and dz summed over tokens for the bias, by the programs of the first D slice).
Each backward program recomputes its logits tiles over the full D, so the recompute costs ceil(D / BLOCK_DO)
forward matmuls per kernel: the price of keeping both reductions in registers without atomics.
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
    merge_partials_kernel,
    store_row_outputs,
    update_state_2d,
)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden @ weight.T + bias, -inf in out-of-range columns."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    ks0 = tl.arange(0, BLOCK_D)
    for k in range(0, D, BLOCK_D):
        ks = k + ks0
        k_ok = ks < D
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc, float("-inf"))


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
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    v_begin = split * chunk
    v_stop = tl.minimum(v_begin + chunk, V)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w2 = tl.zeros([BLOCK_N], tl.float32)
    x_y = tl.zeros([BLOCK_N], tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for start in range(v_begin, v_stop, BLOCK_V):
        cols = start + offs
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, valid, cols, cols < v_stop, D, stride_h, stride_w,
                         HAS_BIAS, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        x_y += tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), axis=1)
        m, s, w2 = update_state_2d(m, s, w2, x, scale2)
    if SPLIT:
        idx = rows * NUM_SPLITS + split
        tl.store(part_m + idx, m, mask=row_ok)
        tl.store(part_s + idx, s, mask=row_ok)
        tl.store(part_w + idx, w2, mask=row_ok)
        owns = valid & (labels >= v_begin) & (labels < v_stop)
        tl.store(xy_ptr + rows, x_y, mask=owns)
    else:
        lp, h, log_s = finalize_state(m, s, w2, x_y, inv_t)
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
    cfg = utils.linear_blocks(n, v, dim, dev)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    row_programs = triton.cdiv(n, bn)
    tiles = triton.cdiv(v, bv)
    splits = num_splits if num_splits is not None else utils.choose_num_splits(row_programs, tiles, dev)
    chunk, splits = utils.split_chunk(v, bv, max(1, min(splits, tiles)))
    dot_f32, precision = utils.dot_flags(hidden.dtype)
    inv_t = 1.0 / temperature
    b = bias if bias is not None else weight  # dummy pointer when HAS_BIAS is False
    common = dict(HAS_BIAS=bias is not None, DOT_F32=dot_f32, PRECISION=precision, BLOCK_N=bn, BLOCK_V=bv,
                  BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits == 1:
        _linear_fwd_kernel[(row_programs, 1)](
            hidden, weight, b, labels, *out, out[0], out[0], out[0], out[0],
            n, v, dim, hidden.stride(0), weight.stride(0), inv_t, inv_t * LOG2E, ignore_index, chunk, 1,
            SPLIT=False, **common,
        )
        return tuple(out)
    parts = [torch.empty(n, splits, dtype=torch.float32, device=dev) for _ in range(3)]
    x_y = torch.zeros(n, dtype=torch.float32, device=dev)
    _linear_fwd_kernel[(row_programs, splits)](
        hidden, weight, b, labels, *out, *parts, x_y,
        n, v, dim, hidden.stride(0), weight.stride(0), inv_t, inv_t * LOG2E, ignore_index, chunk, splits,
        SPLIT=True, **common,
    )
    block_n = 64 if dev.type == "cuda" else min(1024, utils.next_pow2(n))
    merge_partials_kernel[(triton.cdiv(n, block_n),)](
        *parts, x_y, labels, *out, n, splits, 0, inv_t, inv_t * LOG2E, ignore_index,
        LABEL_FROM_ROWS=False, BLOCK_N=block_n, BLOCK_S=utils.next_pow2(splits),
    )
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats(labels_ptr, stats_ptr, h_ptr, glp_ptr, gh_ptr, rows, N, ignore_index):
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    m = tl.load(stats_ptr + 2 * rows, mask=valid, other=0.0)
    log_s = tl.load(stats_ptr + 2 * rows + 1, mask=valid, other=0.0)
    ent = tl.load(h_ptr + rows, mask=valid, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=valid, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=valid, other=0.0)
    return labels, valid, m, log_s, ent, g_lp, g_h


@triton.jit
def _dz_tile(x, cols, labels, valid, m, log_s, ent, g_lp, g_h, inv_t):
    dz = grad_tile((x - m[:, None]) * inv_t - log_s[:, None], cols[None, :] == labels[:, None], ent[:, None],
                   g_lp[:, None], g_h[:, None], inv_t)
    return tl.where(valid[:, None], dz, 0.0)


@triton.jit
def _dhidden_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, stats_ptr, hent_ptr, glp_ptr, gh_ptr, dh_ptr,
    N, V, D, stride_h, stride_w, stride_dh, inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dcol_ok = dcols < D
    labels, valid, m, log_s, ent, g_lp, g_h = _row_stats(labels_ptr, stats_ptr, hent_ptr, glp_ptr, gh_ptr, rows,
                                                         N, ignore_index)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        col_ok = cols < V
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, valid, cols, col_ok, D, stride_h, stride_w,
                         HAS_BIAS, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        dz = _dz_tile(x, cols, labels, valid, m, log_s, ent, g_lp, g_h, inv_t)
        wt = tl.load(w_ptr + cols[:, None] * stride_w + dcols[None, :], mask=col_ok[:, None] & dcol_ok[None, :],
                     other=0.0)
        if DOT_F32:
            wt = wt.to(tl.float32)
        else:
            dz = dz.to(wt.dtype)
        acc = tl.dot(dz, wt, acc, input_precision=PRECISION)
    mask = (rows < N)[:, None] & dcol_ok[None, :]
    tl.store(dh_ptr + rows[:, None] * stride_dh + dcols[None, :], acc.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dweight_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, stats_ptr, hent_ptr, glp_ptr, gh_ptr, dw_ptr, db_ptr,
    N, V, D, stride_h, stride_w, stride_dw, inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    pid_d = tl.program_id(1)
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dcol_ok = dcols < D
    acc = tl.zeros([BLOCK_V, BLOCK_DO], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_V], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs.to(tl.int64)
        labels, valid, m, log_s, ent, g_lp, g_h = _row_stats(labels_ptr, stats_ptr, hent_ptr, glp_ptr, gh_ptr,
                                                             rows, N, ignore_index)
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, valid, cols, col_ok, D, stride_h, stride_w,
                         HAS_BIAS, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        dz = _dz_tile(x, cols, labels, valid, m, log_s, ent, g_lp, g_h, inv_t)
        acc_b += tl.sum(dz, axis=0)
        ht = tl.load(h_ptr + rows[:, None] * stride_h + dcols[None, :], mask=valid[:, None] & dcol_ok[None, :],
                     other=0.0)
        if DOT_F32:
            ht = ht.to(tl.float32)
        else:
            dz = dz.to(ht.dtype)
        acc = tl.dot(tl.trans(dz), ht, acc, input_precision=PRECISION)
    mask = col_ok[:, None] & dcol_ok[None, :]
    tl.store(dw_ptr + cols[:, None] * stride_dw + dcols[None, :], acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + cols, acc_b.to(db_ptr.dtype.element_ty), mask=cols < tl.where(pid_d == 0, V, 0))  # the first D slice writes it


def linear_backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature,
                    ignore_index, needs_grad=(True, True, True)):
    need_hidden, need_weight, need_bias = needs_grad
    need_bias = need_bias and bias is not None
    n, dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # The weight-gradient kernel writes the bias gradient too: it runs when either is needed.
    run_dweight = need_weight or need_bias
    grad_weight = torch.empty_like(weight) if run_dweight else None
    grad_bias = torch.empty_like(bias) if run_dweight and bias is not None else None
    if n == 0:
        for g in (grad_weight, grad_bias):
            if g is not None:
                g.zero_()
        return grad_hidden, grad_weight if need_weight else None, grad_bias if need_bias else None
    f32 = torch.float32
    row_stats = (labels.contiguous(), stats.to(f32).contiguous(), entropy.to(f32).contiguous(),
                 grad_logprobs.to(f32).contiguous(), grad_entropy.to(f32).contiguous())
    cfg = utils.linear_blocks(n, v, dim, dev)
    bn, bv, bdo = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_DO"]
    dot_f32, precision = utils.dot_flags(hidden.dtype)
    b = bias if bias is not None else weight
    common = dict(HAS_BIAS=bias is not None, DOT_F32=dot_f32, PRECISION=precision, BLOCK_N=bn, BLOCK_V=bv,
                  BLOCK_D=cfg["BLOCK_D"], BLOCK_DO=bdo, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    inv_t = 1.0 / temperature
    if need_hidden:
        _dhidden_kernel[(triton.cdiv(n, bn), triton.cdiv(dim, bdo))](
            hidden, weight, b, *row_stats, grad_hidden,
            n, v, dim, hidden.stride(0), weight.stride(0), grad_hidden.stride(0), inv_t, ignore_index, **common,
        )
    if run_dweight:
        _dweight_kernel[(triton.cdiv(v, bv), triton.cdiv(dim, bdo))](
            hidden, weight, b, *row_stats, grad_weight, grad_bias if grad_bias is not None else grad_weight,
            n, v, dim, hidden.stride(0), weight.stride(0), grad_weight.stride(0), inv_t, ignore_index, **common,
        )
    return grad_hidden, grad_weight if need_weight else None, grad_bias if need_bias else None
