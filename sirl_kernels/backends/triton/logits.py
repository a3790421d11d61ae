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

The logits kernels are issue-bound unless written for it (docs/triton-kernels.md, "Main loops"): an H100 issues
about 9 thread-instructions per byte of HBM bandwidth, 18 per bf16 logit read, 37 per logit read and written.
So their main loops are laid out for the instruction count, checked per element on the real compiler's SASS
in CI (tests/sirl_kernels/backends/test_triton_sass.py):

- a tile is ``[R, T, VEC]``: T = 32 x num_warps threads, each owning R rows of VEC contiguous elements (16 bytes:
  one LDG.E.128 per row), so every reduction in the loop is in-thread (no shuffle, no barrier) and the forward
  keeps a per-thread state; a row is reduced across the block once, after its loop;
- rows start 16-byte aligned whatever V is when the row stride is a multiple of 16 bytes (it is then passed in
  units of 16 bytes, ``utils.stride_unit``), the loop body is unmasked and only one masked tail tile follows, so
  V = 151936, a 151665 view of it or 50257 in a 50264-wide buffer all get 16-byte loads and stores in the loop;
  the out-of-place gradient is allocated with rows as far from alignment as the logits' (aligned where they
  are); a row stride that is not a multiple of 16 bytes (a contiguous [N, 50257] tensor) gets element-wide
  loads (docs/triton-kernels.md, "Alignment");
- optional outputs (``rows.Extras``: self-certainty, varentropy) are more sums of the same state, compiled in by
  the HAS_SC / HAS_VE constexprs only where asked for (the default specialisation is the plain kernel, instruction
  for instruction): ``u2 = sum d`` and ``q2 = sum 2^d d^2`` in the same base-2 units, shifted by the running max
  like s and w2 (:func:`rescale_extras`: ``u2 + n c`` and ``2^c (q2 + 2 c w2 + c^2 s)``; n the columns covered),
  merged by the split-V merge with the same rules and finalized as ``SC = ln s - ln2 u2 / V - ln V`` and
  ``VE = ln2^2 (q2 / s - (w2 / s)^2)`` (:func:`finalize_extras`);
- the backward is the coefficient form of ``backends/rows.py``, ``dx_i = (p_i (alpha + beta L_i) + lam [i = y])
  / T`` (with HAS_GAMMA / HAS_DELTA also ``gamma L_i^2`` in the bracket and ``+ delta``: :func:`grad_nonlabel_x`),
  written as ``dz = 2^(u log2(e) + b) * (c1 u + c0)`` with ``u = max((x - m) / T, u_min)`` (per-row scalars
  b, c1, c0, u_min from the stats and (alpha, beta): ``grad_row``), two FMAs per element written as ``tl.fma`` so
  the count does not depend on Triton's fp-fusion default; the factor 1/T of the chain rule sits in the exponent
  (``b`` holds log2(1/T)), so no per-row constant grows with 1/T and nothing overflows for any temperature the API
  accepts (a product of finite factors is inf only where the gradient itself is out of fp32 range); the label's
  column, with its ``lam (1 - p_y)`` as ``-lam expm1(L_y)``, is patched once per row as a scalar;
- column indices are 32-bit (a row has fewer than 2^31 columns); row offsets are 64-bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sirl_kernels._sizes import batch_invariant_splits, empty_aligned_rows
from sirl_kernels.backends.rows import RowOutputs, Rows
from sirl_kernels.backends.triton import utils

# tl.constexpr globals: the compiler rejects any global a @triton.jit function reads that is not a tl.constexpr
# (only the interpreter accepts a plain Python float).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LN2_SQ = tl.constexpr(0.4804530139182014)  # ln(2)^2: base-2 squared units to natural ones
NEG_MAX = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: finite, so 0 * NEG_MAX is 0, not NaN
# p = exp2(t) is 0 in fp32 for t <= -200 (2^-200 is below the smallest denormal); the backward clamps x - m to
# the d whose exponent is -200, so the elements that p rounds to 0 (x = -inf included) give exactly 0.
EXP2_ZERO = tl.constexpr(-200.0)


# --------------------------------------------------------------------------------------------------------------
# state helpers (shared with linear.py)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def rescale_state(m_old, s, w2, m_new, scale2):
    """Rescale a state with max m_old to a max m_new >= m_old: w2 <- 2^d (w2 + d s), s <- 2^d s (d in base 2).

    The one rescale of every state of this backend (the logits kernels' per-thread states and their block
    reduction, the fused-linear forward's per-row states, the split-V merge). NaN is poison, whatever the GPU's max
    does with it: a state is empty only while s == 0, never because its max is -inf (a tile of NaN leaves m = -inf
    under a NaN-dropping max but s = NaN, which must survive), and equal maxima (both -inf included) rescale by
    exactly 1 instead of 2^(-inf + inf). The weighted sum is a w2 + (a d) s with a d taken as 0 where a underflows
    to 0: d s alone overflows for maxima ~1e38 apart (and is -inf x 0 for an empty state), while a NaN in s or w2
    still comes through.
    """
    d2 = tl.where(m_old == m_new, 0.0, (m_old - m_new) * scale2)
    a = tl.exp2(d2)
    return a * s, a * w2 + tl.where(a == 0.0, 0.0, a * d2) * s


@triton.jit
def state_shift(m_new):
    """The shift the per-element terms of a state with max ``m_new`` subtract (:func:`update_state`): m_new, or
    0 for a max of -inf (all -inf so far: shifting by -inf would turn those -inf into NaN); NaN stays NaN."""
    return tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def tile_max(m, x, PER_THREAD: tl.constexpr):
    """The states' new max after tile ``x`` (per thread, or per row)."""
    if PER_THREAD:
        m_new = tl.maximum(m, thread_max(x))
    else:
        m_new = tl.maximum(m, tl.max(x, axis=1))
    return m_new


@triton.jit
def scaled_differences(x, m_new, scale2, PER_THREAD: tl.constexpr):
    """``d = (x - max) log2(e) / T`` of tile ``x`` against its states' max (the difference before any scaling)."""
    shift = state_shift(m_new)
    if PER_THREAD:
        d2 = (x - shift[None, :, None]) * scale2
    else:
        d2 = (x - shift[:, None]) * scale2
    return d2


@triton.jit
def update_state(m, s, w2, x, scale2, PER_THREAD: tl.constexpr):
    """Adds an fp32 tile ``x`` of raw logits (-inf where masked) to online states (m, s, w2): one per row of a
    [rows, cols] tile (the fused linear), or with ``PER_THREAD`` one per thread of a [R, T, VEC] tile (the logits
    kernels: every reduction runs over axes 0 and 2, inside the thread, no shuffle and no barrier).

    The states are rescaled to the new max (:func:`rescale_state`), then ``s += sum 2^d`` and
    ``w2 += sum 2^d max(d, -FLT_MAX)`` with ``d = (x - max) log2(e) / T``: per element a subtract, a multiply, an
    exp2, an add and, for the entropy sum, a clamp and an FMA. The difference x - max is taken before any scaling
    (exact under a common offset). d is clamped at -FLT_MAX so a -inf logit adds 0 (not 0 x -inf), while a NaN one
    still adds NaN through its 2^d. The optional statistics (issue 23: self-certainty, varentropy) are more sums of
    the same terms, in :func:`update_state_extras`, which the kernels call instead only under their constexpr
    flags. (The sum of 2^d is formed before the products: the other order cost
    the fused-linear GEMM tile on sm_100 registers it then spilled.)"""
    m_new = tile_max(m, x, PER_THREAD)
    s, w2 = rescale_state(m, s, w2, m_new, scale2)
    d2 = scaled_differences(x, m_new, scale2, PER_THREAD)
    e = tl.exp2(d2)
    if PER_THREAD:
        s = s + thread_sum(e)
        w2 = w2 + thread_sum(e * tl.maximum(d2, NEG_MAX))
    else:
        s = s + tl.sum(e, axis=1)
        w2 = w2 + tl.sum(e * tl.maximum(d2, NEG_MAX), axis=1)
    return m_new, s, w2


@triton.jit
def rescale_extras(m_old, s, w2, u2, q2, n, m_new, scale2, HAS_SC: tl.constexpr, HAS_VE: tl.constexpr):
    """Rescales the optional sums of a state (``rows.Extras``) to a max m_new >= m_old, from the state's sums s, w2
    BEFORE their own rescale (:func:`rescale_state`), ``n`` the columns the state covers (float; 0 for an empty
    one). In base-2 units d = (x - max) log2(e) / T and with c = (m_old - m_new) log2(e) / T <= 0 (0 for equal
    maxima):

    - self-certainty: ``u2 = sum d``, rescaled ``u2 + n c`` (n c taken as 0 for an empty state, where c may be -inf);
    - varentropy: ``q2 = sum 2^d d^2``, rescaled ``2^c (q2 + 2 c w2 + c^2 s)``, written as
      ``a q2 + (a c)(2 w2 + c s)`` with c taken as 0 where a = 2^c underflows to 0 (as in :func:`rescale_state`:
      c may be -inf or huge there) so a NaN in q2, w2 or s still comes through; every term is >= 0 (c, w2 <= 0):
      no cancellation."""
    d2 = tl.where(m_old == m_new, 0.0, (m_old - m_new) * scale2)
    if HAS_SC:
        u2 = u2 + tl.where(n > 0.0, n * d2, 0.0)
    if HAS_VE:
        a = tl.exp2(d2)
        c = tl.where(a == 0.0, 0.0, d2)
        q2 = a * q2 + (a * c) * (2.0 * w2 + c * s)
    return u2, q2


@triton.jit
def update_state_extras(m, s, w2, u2, q2, x, n, mask, scale2, PER_THREAD: tl.constexpr, MASKED: tl.constexpr,
                        HAS_SC: tl.constexpr, HAS_VE: tl.constexpr):
    """:func:`update_state` with the optional sums of :func:`rescale_extras` (``n``: the columns the states cover
    before this tile; ``mask`` (with MASKED) the tile's real columns, whose -inf fill must not reach ``u2``):
    per element one more add for ``u2 += d``, and for ``q2 += 2^d d^2`` the product ``2^d d`` (d clamped at
    -FLT_MAX as for w2, so a -inf logit adds (0 x -FLT_MAX) x -FLT_MAX = 0) shared by w2 and an FMA. A -inf logit
    makes ``u2`` -inf (self-certainty +inf, like the definition's mean of z)."""
    m_new = tile_max(m, x, PER_THREAD)
    u2, q2 = rescale_extras(m, s, w2, u2, q2, n, m_new, scale2, HAS_SC, HAS_VE)
    s, w2 = rescale_state(m, s, w2, m_new, scale2)
    d2 = scaled_differences(x, m_new, scale2, PER_THREAD)
    e = tl.exp2(d2)
    dc = tl.maximum(d2, NEG_MAX)
    ed = e * dc
    if MASKED:
        du = tl.where(mask, d2, 0.0)
    else:
        du = d2
    if PER_THREAD:
        s = s + thread_sum(e)
        w2 = w2 + thread_sum(ed)
        if HAS_SC:
            u2 = u2 + thread_sum(du)
        if HAS_VE:
            q2 = q2 + thread_sum(ed * dc)
    else:
        s = s + tl.sum(e, axis=1)
        w2 = w2 + tl.sum(ed, axis=1)
        if HAS_SC:
            u2 = u2 + tl.sum(du, axis=1)
        if HAS_VE:
            q2 = q2 + tl.sum(ed * dc, axis=1)
    return m_new, s, w2, u2, q2


@triton.jit
def finalize_extras(s, w2, u2, q2, n, bad_label):
    """(self-certainty, varentropy) of a state covering all ``n`` columns of its row (float), in natural units:
    ``SC = ln s - ln2 u2 / n - ln n`` (= lse(z) - mean(z) - ln V; +inf with a -inf logit) and
    ``VE = ln2^2 (q2 / s - (w2 / s)^2)`` clamped at 0 (its cancellation is a few ulps of E[d^2] + E[d]^2).
    NaN for bad labels, NaN rows and all -inf rows (s = 0: 0/0), like :func:`finalize_state`."""
    s = tl.where(bad_label, float("nan"), s)
    sc = LN2 * tl.log2(s) - LN2 * (u2 / n) - tl.log(n)
    r = w2 / s
    ve = LN2_SQ * (q2 / s - r * r)
    ve = tl.where(ve < 0.0, 0.0, ve)
    return sc, ve


@triton.jit
def store_extras(out_sc, out_ve, rows, row_ok, valid, sc, ve, HAS_SC: tl.constexpr, HAS_VE: tl.constexpr):
    """Writes the optional outputs of rows; ignored rows get zeros."""
    if HAS_SC:
        tl.store(out_sc + rows, tl.where(valid, sc, 0.0), mask=row_ok)
    if HAS_VE:
        tl.store(out_ve + rows, tl.where(valid, ve, 0.0), mask=row_ok)


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
def grad_row(m, log_s, alpha, beta, log2_inv_t):
    """Per-row constants ``(u_min, b, c1, c0)`` of :func:`grad_nonlabel`, from the forward's stats (m, ln s), the
    row's coefficients alpha, beta (``backends/rows.py``) and log2(1/T) (every argument a row scalar or a column of
    them).

    With u = (x - m) / T and L = log p = u - ln s, the non-label gradient is
    ``p (alpha + beta L) / T = (p / T) (c1 u + c0)``, ``c1 = beta``, ``c0 = alpha - beta ln s``,
    and ``p / T = 2^(u log2(e) + b)``, ``b = log2(1/T) - ln s log2(e)``. Keeping 1/T in the exponent keeps every
    constant free of 1/T (``beta / T^2`` overflows once 1/T > 1.8e19, and then p = 0 times inf is NaN), and
    ``2^(...) <= 2^126`` since u <= 0, ln s >= 0 and 1/T <= 2^126. Where the exponent is below -200, p / T is 0 in
    fp32: u is clamped at that point, ``u_min``, so ``c1 u`` stays finite (|u_min| <= 226) and a -inf logit gives
    exactly 0. A NaN row has NaN stats, so NaN everywhere."""
    b = log2_inv_t - log_s * LOG2E
    return (b - EXP2_ZERO) * -LN2, b, beta, alpha - beta * log_s  # tensor - constexpr: a tensor


@triton.jit
def grad_nonlabel(x, m, inv_t, u_min, b, c1, c0):
    """dL/dx of non-label elements (x: fp32 raw logits; the rest row constants of :func:`grad_row`, broadcast):
    ``2^(u log2(e) + b) (c1 u + c0)`` with ``u = max((x - m) / T, u_min)``: a subtract, a multiply, a clamp, two
    FMAs (``tl.fma``, whatever Triton's fp-fusion default), an exp2 and a multiply per element."""
    u = tl.maximum((x - m) * inv_t, u_min)
    return tl.exp2(tl.fma(u, LOG2E, b)) * tl.fma(u, c1, c0)


@triton.jit
def grad_label(logp, alpha, beta, lam, inv_t):
    """dL/dx of the label element from its log p: ``[p (alpha + lam + beta log p) - lam expm1(log p)] / T``, i.e.
    ``[p (alpha + beta log p) + lam (1 - p)] / T`` with 1 - p computed as -expm1(log p) (exact near p = 1) and the p
    term exactly 0 where p is (a -inf label logit: ``beta log p`` is -inf there). Every factor is bounded before
    the final 1/T, so it overflows only where the gradient itself is out of fp32 range. (The grouping
    ``alpha + (beta log p + lam)`` is the one that compiled to the fewest registers in the fused-linear backward's
    epilogue, where this runs on a whole tile: sm_90, tests/sirl_kernels/backends/test_triton_compile.py.)"""
    p = tl.exp2(logp * LOG2E)
    p_term = tl.where(p > 0.0, p * (alpha + (beta * logp + lam)), 0.0)
    return (lam * -expm1_from(logp, p) + p_term) * inv_t


@triton.jit
def grad_row_x(m, log_s, alpha, beta, gamma, log2_inv_t):
    """:func:`grad_row` with the varentropy term ``gamma L^2``: ``(u_min, b, c2, c1, c0)`` with
    ``alpha + beta L + gamma L^2 = c2 u^2 + c1 u + c0`` for L = u + L0, L0 = -ln s: ``c2 = gamma``,
    ``c1 = beta + 2 gamma L0``, ``c0 = alpha + L0 (beta + gamma L0)`` (u <= 0 and L0 <= 0: the gamma terms
    u^2, -2 u L0... add up with one sign, no cancellation)."""
    b = log2_inv_t - log_s * LOG2E
    l0 = -log_s
    return (b - EXP2_ZERO) * -LN2, b, gamma, beta + 2.0 * gamma * l0, alpha + l0 * (beta + gamma * l0)


@triton.jit
def grad_nonlabel_x(x, m, inv_t, u_min, b, c2, c1, c0, delta_t, HAS_GAMMA: tl.constexpr, HAS_DELTA: tl.constexpr):
    """:func:`grad_nonlabel` with the optional terms: the polynomial ``(c2 u + c1) u + c0`` (one more FMA) with
    HAS_GAMMA, and ``+ delta / T`` (``delta_t``) folded into the last multiply as an FMA with HAS_DELTA, so a
    column with p = 0 (a -inf logit) gets exactly ``delta_t`` (0 x finite + delta_t)."""
    u = tl.maximum((x - m) * inv_t, u_min)
    if HAS_GAMMA:
        poly = tl.fma(tl.fma(u, c2, c1), u, c0)
    else:
        poly = tl.fma(u, c1, c0)
    e = tl.exp2(tl.fma(u, LOG2E, b))
    if HAS_DELTA:
        return tl.fma(e, poly, delta_t)
    else:
        return e * poly


@triton.jit
def grad_label_x(logp, alpha, beta, gamma, lam, delta, inv_t, HAS_GAMMA: tl.constexpr, HAS_DELTA: tl.constexpr):
    """:func:`grad_label` with the optional terms: ``[p (alpha + lam + beta L + gamma L^2) - lam expm1(L) + delta]
    / T`` (the p term exactly 0 where p is)."""
    p = tl.exp2(logp * LOG2E)
    if HAS_GAMMA:
        inner = alpha + ((beta + gamma * logp) * logp + lam)
    else:
        inner = alpha + (beta * logp + lam)
    g = lam * -expm1_from(logp, p) + tl.where(p > 0.0, p * inner, 0.0)
    if HAS_DELTA:
        g = g + delta
    return g * inv_t


@triton.jit
def merge_partials_kernel(
    part_m, part_s, part_w, part_u, part_q, xy_ptr, labels_ptr, out_lp, out_h, out_stats, out_sc, out_ve,
    N, V, NUM_SPLITS, xy_stride, inv_t, scale2, ignore_index, chunk,
    LABEL_FROM_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_VE: tl.constexpr,
):
    """Merges the per-split partial states [N, NUM_SPLITS] of each row (a fixed-shape reduction: deterministic).

    The label's raw logit is read at ``xy_ptr + row * xy_stride + label`` (logits input, LABEL_FROM_ROWS) or
    at ``xy_ptr + row`` (fused-linear, where the split that owned the label wrote it; no other row of it is read,
    so it may be left uninitialised). With HAS_SC / HAS_VE the optional sums ``part_u`` / ``part_q`` are merged too
    (:func:`rescale_extras`; split k covers ``min(chunk, V - k chunk)`` columns) and finalized into ``out_sc`` /
    ``out_ve``.
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
    if HAS_SC or HAS_VE:
        pu = tl.load(part_u + idx, mask=mask, other=0.0) if HAS_SC else ps
        pq = tl.load(part_q + idx, mask=mask, other=0.0) if HAS_VE else ps
        n_k = tl.maximum(tl.minimum(V - ks * chunk, chunk), 0).to(tl.float32)
        u2, q2 = rescale_extras(pm, ps, pw, pu, pq, n_k[None, :], m[:, None], scale2, HAS_SC, HAS_VE)
        u2 = tl.sum(u2, axis=1)
        q2 = tl.sum(q2, axis=1)
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
    if HAS_SC or HAS_VE:
        sc, ve = finalize_extras(s, w2, u2, q2, tl.zeros([BLOCK_N], tl.float32) + V, bad)
        store_extras(out_sc, out_ve, rows, row_ok, valid, sc, ve, HAS_SC, HAS_VE)


# --------------------------------------------------------------------------------------------------------------
# tiles of the logits kernels: [R, T, VEC], every thread owning R x VEC elements
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def tile_offsets(R: tl.constexpr, T: tl.constexpr, VEC: tl.constexpr):
    """Column offsets of one tile: row r of thread t holds VEC contiguous columns at r * T * VEC + t * VEC, so
    each of the R loads of a warp is 32 x 16 contiguous bytes and every reduction over axes 0 and 2 stays in
    the thread."""
    return (tl.arange(0, R)[:, None, None] * (T * VEC) + tl.arange(0, T)[None, :, None] * VEC
            + tl.arange(0, VEC)[None, None, :])


@triton.jit
def thread_max(x):
    return tl.max(tl.max(x, axis=2), axis=0)


@triton.jit
def thread_sum(x):
    return tl.sum(tl.sum(x, axis=2), axis=0)


@triton.jit
def reduce_thread_states(m, s, w2, scale2):
    """One block reduction of the per-thread states [T]: (max, s, w2) of the row."""
    m_row = tl.max(m, axis=0)
    s, w2 = rescale_state(m, s, w2, m_row, scale2)
    return m_row, tl.sum(s, axis=0), tl.sum(w2, axis=0)


@triton.jit
def reduce_thread_states_extras(m, s, w2, u2, q2, n, scale2, HAS_SC: tl.constexpr, HAS_VE: tl.constexpr):
    """:func:`reduce_thread_states` with the optional sums (``n`` [T]: the columns each thread covered)."""
    m_row = tl.max(m, axis=0)
    u2, q2 = rescale_extras(m, s, w2, u2, q2, n, m_row, scale2, HAS_SC, HAS_VE)
    s, w2 = rescale_state(m, s, w2, m_row, scale2)
    return m_row, tl.sum(s, axis=0), tl.sum(w2, axis=0), tl.sum(u2, axis=0), tl.sum(q2, axis=0)


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_fwd_kernel(
    x_ptr, labels_ptr, out_lp, out_h, out_stats, out_sc, out_ve, part_m, part_s, part_w, part_u, part_q,
    stride_row, V, inv_t, scale2, ignore_index, chunk, NUM_SPLITS,
    SPLIT: tl.constexpr, R: tl.constexpr, T: tl.constexpr, VEC: tl.constexpr, UNIT: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_VE: tl.constexpr,
):
    """Row ``program_id(0)``, columns [split * chunk, +chunk) of it (``stride_row`` in units of UNIT
    elements). No barrier in the loop: the state is per thread and reduced across the block once. HAS_SC /
    HAS_VE add the self-certainty / varentropy sums (:func:`update_state_extras`; each thread's column count
    ``n`` for their rescale); with both off the kernel is the plain one."""
    TILE: tl.constexpr = R * T * VEC
    row = tl.program_id(0).to(tl.int64)  # row * stride_row can exceed 2**31
    split = tl.program_id(1)
    label, valid, bad = load_labels(labels_ptr, row, True, V, ignore_index)
    v_begin = split * chunk
    v_stop = tl.minimum(v_begin + chunk, V)
    v_stop = tl.where(valid, v_stop, v_begin)  # ignored rows load nothing
    body_stop = v_begin + (v_stop - v_begin) // TILE * TILE
    base = x_ptr + row * stride_row * UNIT
    offs = tile_offsets(R, T, VEC)
    m = tl.full([T], float("-inf"), tl.float32)
    s = tl.zeros([T], tl.float32)
    w2 = tl.zeros([T], tl.float32)
    u2 = tl.zeros([T], tl.float32)
    q2 = tl.zeros([T], tl.float32)
    n = tl.zeros([T], tl.float32)  # columns each thread covered so far (the extras' rescale)
    for start in range(v_begin, body_stop, TILE):  # unmasked: 16-byte loads
        x = tl.load(base + start + offs).to(tl.float32)
        if HAS_SC or HAS_VE:
            m, s, w2, u2, q2 = update_state_extras(m, s, w2, u2, q2, x, n, x, scale2, True, False, HAS_SC, HAS_VE)
            n += R * VEC
        else:
            m, s, w2 = update_state(m, s, w2, x, scale2, True)
    cols = body_stop + offs  # the one masked tile
    tail = cols < v_stop
    x = tl.load(base + cols, mask=tail, other=float("-inf")).to(tl.float32)
    if HAS_SC or HAS_VE:
        m, s, w2, u2, q2 = update_state_extras(m, s, w2, u2, q2, x, n, tail, scale2, True, True, HAS_SC, HAS_VE)
        n += thread_sum(tail.to(tl.float32))
        m, s, w2, u2, q2 = reduce_thread_states_extras(m, s, w2, u2, q2, n, scale2, HAS_SC, HAS_VE)
    else:
        m, s, w2 = update_state(m, s, w2, x, scale2, True)
        m, s, w2 = reduce_thread_states(m, s, w2, scale2)
    if SPLIT:
        tl.store(part_m + row * NUM_SPLITS + split, m)
        tl.store(part_s + row * NUM_SPLITS + split, s)
        tl.store(part_w + row * NUM_SPLITS + split, w2)
        if HAS_SC:
            tl.store(part_u + row * NUM_SPLITS + split, u2)
        if HAS_VE:
            tl.store(part_q + row * NUM_SPLITS + split, q2)
    else:
        x_y = tl.load(base + label, mask=valid & ~bad, other=0.0).to(tl.float32)
        lp, h, log_s = finalize_state(m, s, w2, x_y, inv_t, bad)
        store_row_outputs(out_lp, out_h, out_stats, row, True, valid, lp, h, m, log_s)
        if HAS_SC or HAS_VE:
            sc, ve = finalize_extras(s, w2, u2, q2, (v_stop - v_begin).to(tl.float32), bad)
            store_extras(out_sc, out_ve, row, True, valid, sc, ve, HAS_SC, HAS_VE)


def _split_plan(kernel, n, vocab, tile, args_of, kwargs_of, target, num_splits):
    """(chunk, splits) of a logits kernel over ``n`` rows: forced, or from the compiled kernel's resident CTAs
    (``args_of(chunk, splits)`` and ``kwargs_of(split)`` give the launch)."""
    tiles = utils.cdiv(vocab, tile)
    if num_splits is None:
        def launch_of(splits):
            chunk, splits = utils.split_chunk(vocab, tile, splits)
            return (n, splits), args_of(chunk, splits), kwargs_of(splits > 1)

        num_splits = utils.plan_splits(kernel, launch_of,
                                       lambda slots, least: utils.choose_num_splits(n, tiles, slots, least), target)
    return utils.split_chunk(vocab, tile, max(1, min(num_splits, tiles)))


def extra_outputs(extras, dummy):
    """(pointers, constexprs) of the optional outputs ``extras`` (``rows.Extras`` or None): the tensors to fill,
    ``dummy`` for those not wanted, and HAS_SC / HAS_VE."""
    sc, ve = (None, None) if extras is None else (extras.self_certainty, extras.varentropy)
    for t in (sc, ve):
        assert t is None or (t.dtype == torch.float32 and t.is_contiguous()), "extras: contiguous fp32 [N]"
    return (dummy if sc is None else sc, dummy if ve is None else ve), dict(HAS_SC=sc is not None,
                                                                           HAS_VE=ve is not None)


def logits_forward(rows: Rows, extras=None, num_splits=None, batch_invariant=False) -> RowOutputs:
    """(logprobs, entropy [N], stats [N, 2]) fp32; ``extras`` (``rows.Extras``: [N] fp32 tensors or None) are
    filled in the same pass; ``num_splits`` forces the split-V path (tests).

    ``batch_invariant``: every output of a row is bitwise the same whatever N, the other rows and the row's
    position. One program reduces one row (and split), with a tile (``utils.logits_tiles``) that depends on V,
    the dtype and the target only; what depends on N by default is the split count (planned from N and the
    occupancy). Here it is ``_sizes.batch_invariant_splits(V)`` (capped by the tiles as always; ``num_splits``
    and ``utils.force_num_splits`` are ignored), so a row always takes the same path (unsplit, or split and
    merged in a fixed order) over the same column ranges, and the merge's row block does not depend on N either
    (``launch_merge``)."""
    logits, labels, temperature, ignore_index = rows
    n, v = logits.shape
    dev = logits.device
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(2)]
    out.append(torch.empty((n, 2), dtype=torch.float32, device=dev))
    if n == 0:
        return RowOutputs(*out)
    assert logits.stride(1) == 1 or v == 1
    labels = labels.contiguous()
    inv_t = 1.0 / temperature
    target = utils.target_of(dev)
    cfg = utils.logits_tiles(v, logits.dtype, target)
    unit = utils.stride_unit(logits.dtype, logits.stride(0))
    scalars = (inv_t, inv_t * LOG2E, ignore_index)
    extra_ptrs, flags = extra_outputs(extras, out[0])

    def args_of(chunk, splits, parts=(out[0],) * 5):
        return (logits, labels, *out, *extra_ptrs, *parts, logits.stride(0) // unit, v, *scalars, chunk, splits)

    kwargs = dict(R=cfg["R"], T=cfg["T"], VEC=cfg["VEC"], UNIT=unit, num_warps=cfg["num_warps"], **flags)
    if batch_invariant:
        num_splits = batch_invariant_splits(v)
    chunk, splits = _split_plan(_logits_fwd_kernel, n, v, utils.tile_width(cfg), args_of,
                                lambda split: dict(kwargs, SPLIT=split), target, num_splits)
    if splits == 1:
        utils.launch(_logits_fwd_kernel, (n, 1), *args_of(chunk, 1), SPLIT=False, **kwargs)
        return RowOutputs(*out)
    parts = partial_states(n, splits, dev, flags)
    utils.launch(_logits_fwd_kernel, (n, splits), *args_of(chunk, splits, parts), SPLIT=True, **kwargs)
    launch_merge(parts, logits, labels, out, n, v, logits.stride(0), scalars, target, label_from_rows=True,
                 extra_ptrs=extra_ptrs, flags=flags, chunk=chunk, batch_invariant=batch_invariant)
    return RowOutputs(*out)


def partial_states(n, splits, dev, flags):
    """The split-V partial states [n, splits] fp32: (m, s, w2, u2, q2), the last two only where their flag is on
    (the first otherwise, never written)."""
    parts = [torch.empty(n, splits, dtype=torch.float32, device=dev) for _ in range(3)]
    return parts + [torch.empty(n, splits, dtype=torch.float32, device=dev) if flags[f] else parts[0]
                    for f in ("HAS_SC", "HAS_VE")]


def launch_merge(parts, xy, labels, out, n, v, xy_stride, args, target, label_from_rows, extra_ptrs=None,
                 flags=None, chunk=0, batch_invariant=False):
    """Merges the split-V partial states ``parts`` (``merge_partials_kernel``; ``partial_states``) into the row
    outputs ``out`` and, per ``flags``, the optional ones ``extra_ptrs`` (splits of ``chunk`` columns).

    A row's merge is a reduction over its own splits only; its block of BLOCK_N rows depends on the splits alone
    on a GPU, and on N under the interpreter (one numpy reduction for all rows), except with ``batch_invariant``,
    where the interpreter takes the GPU's block too: the shape of the arrays numpy reduces then never depends
    on N."""
    flags = flags or dict(HAS_SC=False, HAS_VE=False)
    extra_ptrs = extra_ptrs or (out[0], out[0])
    parts = list(parts) + [parts[0]] * (5 - len(parts))
    splits = parts[0].shape[1]
    block_s = utils.next_pow2(splits)
    # on a GPU about 2048 partial states per program (three fp32 [BLOCK_N, BLOCK_S] tiles stay in registers; the
    # optional sums add up to two more)
    per_program = 2048 if not (flags["HAS_SC"] or flags["HAS_VE"]) else 1024
    gpu_block = max(2, min(64, per_program // block_s))
    block_n = gpu_block if target.gpu or batch_invariant else min(1024, utils.next_pow2(n))
    utils.launch(merge_partials_kernel, (utils.cdiv(n, block_n),),
                 *parts, xy, labels, *out, *extra_ptrs, n, v, splits, xy_stride, *args, chunk,
                 LABEL_FROM_ROWS=label_from_rows, BLOCK_N=block_n, BLOCK_S=block_s, **flags)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_bwd_kernel(
    x_ptr, labels_ptr, stats_ptr, alpha_ptr, beta_ptr, lam_ptr, gamma_ptr, delta_ptr, out_ptr,
    stride_row, out_stride_row, V, inv_t, log2_inv_t, ignore_index, chunk,
    R: tl.constexpr, T: tl.constexpr, VEC: tl.constexpr, UNIT: tl.constexpr, OUT_UNIT: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_DELTA: tl.constexpr,
):
    """One pass: read a tile of logits, write the same tile of gradient (possibly into the logits' storage), the
    non-label elements by :func:`grad_nonlabel` from per-row constants (the stats and the row's coefficients alpha,
    beta), the label rewritten once after the loop, as a scalar (:func:`grad_label`, with lam).

    In place (``out_ptr`` the logits' own storage), every element of the loop is read by the thread that then
    writes it; the label's logit is read once, before the loop, by one thread, and two block barriers (once per
    row, outside the loop) order the label column's three accesses across threads: the early read before any
    thread's loop store (another warp may own that column in the loop and overwrite it first), and the loop's
    store of that column before the label's own gradient is stored over it.

    HAS_GAMMA / HAS_DELTA add the ``gamma L^2`` and ``delta`` terms of the form (:func:`grad_nonlabel_x`); with
    both off the kernel is the plain one."""
    TILE: tl.constexpr = R * T * VEC
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    label, valid, bad = load_labels(labels_ptr, row, True, V, ignore_index)
    v_begin = split * chunk
    v_stop = tl.minimum(v_begin + chunk, V)
    body_stop = v_begin + (v_stop - v_begin) // TILE * TILE
    base = x_ptr + row * stride_row * UNIT
    out_base = out_ptr + row * out_stride_row * OUT_UNIT
    offs = tile_offsets(R, T, VEC)
    cols = body_stop + offs
    tail = cols < v_stop
    if valid & ~bad:
        m = tl.load(stats_ptr + 2 * row)
        log_s = tl.load(stats_ptr + 2 * row + 1)
        alpha = tl.load(alpha_ptr + row)
        beta = tl.load(beta_ptr + row)
        # lam (only the label's) is loaded here, not after the loop: there it cost the V % 8 != 0 views up to 16
        # registers (4 CTAs an SM instead of 6) and an instruction a loop iteration on sm_90
        lam = tl.load(lam_ptr + row)
        if HAS_GAMMA or HAS_DELTA:
            gamma = tl.load(gamma_ptr + row) if HAS_GAMMA else 0.0
            delta = tl.load(delta_ptr + row) if HAS_DELTA else 0.0
            u_min, b, c2, c1, c0 = grad_row_x(m, log_s, alpha, beta, gamma, log2_inv_t)
            delta_t = delta * inv_t
        else:
            u_min, b, c1, c0 = grad_row(m, log_s, alpha, beta, log2_inv_t)
        owns_label = (label >= v_begin) & (label < v_stop)
        x_y = tl.load(base + label, mask=owns_label, other=0.0).to(tl.float32)
        tl.debug_barrier()  # in place: x_y is read before any thread's loop store to the label's column
        for start in range(v_begin, body_stop, TILE):  # unmasked: 16-byte loads and stores
            x = tl.load(base + start + offs).to(tl.float32)
            if HAS_GAMMA or HAS_DELTA:
                dz = grad_nonlabel_x(x, m, inv_t, u_min, b, c2, c1, c0, delta_t, HAS_GAMMA, HAS_DELTA)
            else:
                dz = grad_nonlabel(x, m, inv_t, u_min, b, c1, c0)
            tl.store(out_base + start + offs, dz.to(out_ptr.dtype.element_ty))
        x = tl.load(base + cols, mask=tail, other=float("-inf")).to(tl.float32)
        if HAS_GAMMA or HAS_DELTA:
            dz = grad_nonlabel_x(x, m, inv_t, u_min, b, c2, c1, c0, delta_t, HAS_GAMMA, HAS_DELTA)
        else:
            dz = grad_nonlabel(x, m, inv_t, u_min, b, c1, c0)
        tl.store(out_base + cols, dz.to(out_ptr.dtype.element_ty), mask=tail)
        if owns_label:
            tl.debug_barrier()  # the loop's store of this column (by some thread) lands first
            if HAS_GAMMA or HAS_DELTA:
                g_y = grad_label_x((x_y - m) * inv_t - log_s, alpha, beta, gamma, lam, delta, inv_t, HAS_GAMMA,
                                   HAS_DELTA)
            else:
                g_y = grad_label((x_y - m) * inv_t - log_s, alpha, beta, lam, inv_t)
            tl.store(out_base + label, g_y.to(out_ptr.dtype.element_ty))
    else:  # ignored rows get zeros, rows with a label outside [0, V) NaN; neither is read
        fill = tl.where(bad, float("nan"), 0.0) + tl.zeros([R, T, VEC], tl.float32)
        fill = fill.to(out_ptr.dtype.element_ty)
        for start in range(v_begin, body_stop, TILE):
            tl.store(out_base + start + offs, fill)
        tl.store(out_base + cols, fill, mask=tail)


def coefficient_rows(coef):
    """The kernels' five coefficient pointers (alpha, beta, lam, gamma, delta) of ``coef`` (``rows.Coefficients``),
    contiguous fp32; alpha stands in for an absent gamma or delta (never read: HAS_GAMMA / HAS_DELTA off)."""
    alpha, beta, lam = (c.to(torch.float32).contiguous() for c in coef[:3])
    return (alpha, beta, lam, *(alpha if c is None else c.to(torch.float32).contiguous() for c in coef[3:5]))


def coefficient_flags(coef):
    return dict(HAS_GAMMA=coef.gamma is not None, HAS_DELTA=coef.delta is not None)


def logits_backward(rows: Rows, stats, coef, num_splits=None, out=None):
    """The backward form of ``backends/rows.py`` for the coefficients ``coef`` (``rows.Coefficients``: alpha, beta,
    lam and optional gamma, delta, [N] each) w.r.t. the logits, in their dtype. ``out`` may be ``logits`` itself
    (in-place backward)."""
    logits, labels, temperature, ignore_index = rows
    n, v = logits.shape
    dev = logits.device
    target = utils.target_of(dev)
    if out is None:
        # on a GPU, rows as far from 16-byte alignment as the logits' (aligned wherever they are, whatever V: the
        # op allocates the same, ops._gradient_strides)
        out = empty_aligned_rows(n, v, logits.dtype, dev, like=logits.stride(0)) if target.gpu else \
            torch.empty((n, v), dtype=logits.dtype, device=dev)
    if n == 0:
        return out
    cfg = utils.logits_tiles(v, logits.dtype, target)
    # Each side's rows start 16-byte aligned when its stride is a multiple of 16 bytes: on a GPU the gradient's is
    # wherever the logits' is, whatever V (allocated above or by the op); the in-place backward writes with the
    # logits' own stride (docs/triton-kernels.md, "Alignment").
    unit, out_unit = utils.stride_unit(logits.dtype, logits.stride(0)), utils.stride_unit(out.dtype, out.stride(0))
    rows = (labels.contiguous(), stats.to(torch.float32).contiguous(), *coefficient_rows(coef))

    def args_of(chunk, splits):
        return (logits, rows[0], *rows[1:], out, logits.stride(0) // unit, out.stride(0) // out_unit, v,
                1.0 / temperature, -math.log2(temperature), ignore_index, chunk)

    kwargs = dict(R=cfg["R"], T=cfg["T"], VEC=cfg["VEC"], UNIT=unit, OUT_UNIT=out_unit, num_warps=cfg["num_warps"],
                  **coefficient_flags(coef))
    chunk, splits = _split_plan(_logits_bwd_kernel, n, v, utils.tile_width(cfg), args_of, lambda split: kwargs,
                                target, num_splits)
    utils.launch(_logits_bwd_kernel, (n, splits), *args_of(chunk, splits), **kwargs)
    return out
