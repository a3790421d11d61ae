"""Triton-specific tests against float64 PyTorch: split-V merge path, tile tails, V % 8 != 0 views, in-place
backward, the fused-linear forward and vocabulary-chunked backward (every dtype, bias or not, odd shapes,
strided rows, needs_grad), bitwise determinism, the matmul work counted with the GPU tile table (8·NDV), int64
offsets past 2**31, NaN poison and bad labels that never read outside their row, the occupancy-sized grids and
the L2-aware program order, the launch path planned on meta tensors under the tensors' device, and the optional
self-certainty / varentropy outputs and the backward's gamma / delta terms (against float64 and autograd, within
bounds derived from fp32 rounding).

Run on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no CUDA) with small shapes and
large tiles; on a GPU the same tests run on CUDA tensors (those that watch the interpreter skip there). The
interpreter instrumentation lives in the checkout's ``tools/`` (not installed): tests that need it skip where it
is absent (the installed-wheel run).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference_impl import grad_tolerance, reference_grads, reference_linear, reference_logprobs_entropy

import sirl_kernels
from sirl_kernels.backends import triton as tb
from sirl_kernels.backends.rows import Coefficients, Extras, LinearRows, Rows, logprob_entropy_coefficients

pytestmark = pytest.mark.skipif(
    not sirl_kernels.available_backends()["triton"].available,
    reason=f"triton backend unavailable: {sirl_kernels.available_backends()['triton'].reason}",
)

try:
    from tools import triton_instrument as instrument
except ImportError:  # the installed-wheel run, outside the checkout
    instrument = None
needs_tools = pytest.mark.skipif(instrument is None, reason="needs the checkout's tools/ (not installed)")

if tb._IMPORT_ERROR is None:
    from sirl_kernels.backends.triton import linear as tlin
    from sirl_kernels.backends.triton import logits as tlog
    from sirl_kernels.backends.triton import utils

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FWD_TOL = {"rtol": 1e-5, "atol": 2e-5}


def _case(n, v, dtype=torch.float32, seed=0, scale=3.0, ignore_frac=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        labels[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return logits.to(DEV), labels.to(DEV), g_lp.to(DEV), g_h.to(DEV)


def _check_fwd(lp, h, logits, labels, temperature=1.0, ignore_index=-100):
    ref_lp, ref_h = reference_logprobs_entropy(logits.cpu(), labels.cpu(), temperature, ignore_index)
    torch.testing.assert_close(lp.double().cpu(), ref_lp, **FWD_TOL)
    torch.testing.assert_close(h.double().cpu(), ref_h, **FWD_TOL)


def _run(logits, labels, g_lp, g_h, temperature=1.0, ignore_index=-100, splits=None, bwd_splits=None):
    lp, h, lse = tb.logits_forward(Rows(logits, labels, temperature, ignore_index)) if splits is None else \
        tlog.logits_forward(Rows(logits, labels, temperature, ignore_index), num_splits=splits)
    with utils.quiet():
        grad = tlog.logits_backward(Rows(logits, labels, temperature, ignore_index), lse,
                                    logprob_entropy_coefficients(g_lp, g_h, h), num_splits=bwd_splits)
    return lp, h, lse, grad


# --- split-V merge and tiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_forced_split_v_matches_float64(splits):
    """Split V across programs and merge the partial states; V = 3 * 4096 + 5 leaves a 5-wide tail tile."""
    logits, labels, g_lp, g_h = _case(3, 3 * 4096 + 5, seed=splits, ignore_frac=0.3)
    logits[0, 4096:] -= 40.0  # later splits much smaller than the first: the merge must rescale them
    logits[1, :4096] = float("-inf")  # a split made only of -inf entries is an empty state
    with utils.quiet():
        lp, h, lse, grad = _run(logits, labels, g_lp, g_h, temperature=0.8, splits=splits, bwd_splits=splits)
    _check_fwd(lp, h, logits, labels, 0.8)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 0.8)
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


def test_split_count_choice():
    """Splits come from the slots (resident CTAs x SMs): the fewest that fill whole waves to 90%."""
    assert utils.choose_num_splits(10_000, 40, 1) == 1  # the interpreter
    slots = 5 * 132  # e.g. 5 CTAs of the bf16 forward on an H100
    assert utils.choose_num_splits(16384, 38, slots) == 1  # 16384 / (25 x 660) = 99%
    assert utils.choose_num_splits(4096, 38, slots) == 2  # one program per row: 4096 / 4620 = 89% < 90%
    assert utils.choose_num_splits(256, 38, slots) == 5  # 1280 / 1320 = 97% (2: 78%, 3: 58%, 4: 78%)
    assert utils.choose_num_splits(1, 3, slots) == 3  # never more splits than tiles (the best there is)
    assert utils.choose_num_splits(256, 38, slots, least=6) == 7  # 1792 / 1980 = 90.5%: the fewest >= least
    for n in (256, 1024, 4096, 16384):
        splits = utils.choose_num_splits(n, 38, slots)
        assert utils.wave_efficiency(n * splits, slots) >= utils.TARGET_WAVE_EFFICIENCY
    assert utils.wave_efficiency(1056, 1056) == 1.0 and utils.wave_efficiency(1057, 1056) == 1057 / 2112
    with utils.force_num_splits(5):
        assert utils.choose_num_splits(10_000, 40, 1) == 5
        assert utils.choose_num_splits(1, 3, 1) == 3  # never more splits than tiles
    chunk, splits = utils.split_chunk(3 * 4096 + 5, 4096, 3)
    assert chunk % 4096 == 0 and splits * chunk >= 3 * 4096 + 5 and (splits - 1) * chunk < 3 * 4096 + 5


def test_split_search_visits_each_split_count_once():
    """``distinct_splits`` yields exactly the split counts ``split_chunk`` can make (for every wanted count from
    ``least`` on), ascending, each once: what lets the planners skip the ~1187 wanted counts of the fused forward."""
    for v_tiles in [*range(1, 200), 1187, 4097]:
        for least in (1, 2, 7, 40):
            every = sorted({utils.actual_splits(v_tiles, w) for w in range(least, v_tiles + 1)})
            assert list(utils.distinct_splits(v_tiles, least)) == every, (v_tiles, least)


def test_fused_plan_is_cached_and_cheap():
    """The fused forward's plan is a pure function of integers, computed once per shape and device: a second call
    is a cache hit, and even the first searches the ~70 split counts there are, not the 1187 wanted counts (that
    search took ~17 ms per call, twice per forward, on this project's CI machine)."""
    tlin._fused_plan.cache_clear()
    first = tlin.fused_plan(256, 1187, 100, 264)
    assert tlin.fused_plan(256, 1187, 100, 264) == first and tlin._fused_plan.cache_info().hits == 1
    assert len(list(utils.distinct_splits(1187))) < 70


def test_registers_fall_back_when_triton_does_not_say(monkeypatch):
    """The compiled kernel's registers come from Triton's private loader (``_init_handles``, then ``n_regs``): a
    Triton without it costs only the occupancy plan (``ASSUMED_CTAS``, with one warning), never the launch."""

    class Loaded:
        n_regs = 40

        def _init_handles(self):
            pass

    class Hidden:  # a Triton that renamed or dropped the loader
        pass

    assert utils._registers_of(Loaded()) == 40
    monkeypatch.setattr(utils, "_REGISTERS_WARNED", False)
    with pytest.warns(RuntimeWarning, match="cannot read the registers"):
        assert utils._registers_of(Hidden()) is None
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert utils._registers_of(Hidden()) is None
    assert not again  # warned once per process


def _claiming(t: torch.Tensor, device: str) -> torch.Tensor:
    """``t`` as a tensor that says it lives on ``device``: a public ``Tensor.as_subclass`` whose ``device`` property
    answers it (torch has no public fake-tensor constructor: FakeTensorMode lives in the private
    ``torch._subclasses``). Enough for code that only reads ``.device``, shapes and strides."""

    class Claimed(torch.Tensor):
        @property
        def device(self):
            return torch.device(device)

    return t.as_subclass(Claimed)


def test_out_of_place_gradient_rows_align_like_the_logits():
    """On a GPU the out-of-place gradient's row r starts as far from 16-byte alignment as the logits' row r
    (``_sizes.aligned_row_stride``): the launcher's own gradient (planned for an H100 on meta tensors, which the
    AOT compile counts) and the op's, whose fake implementation returns the same strides; on CPU the op's is the
    backend's contiguous buffer."""
    from sirl_kernels import ops

    cases = {  # (row stride of the logits, V) -> row stride of the gradient
        (151936, 151665): 151672,  # Qwen's vocabulary viewed in its lm_head's width: padded, aligned rows
        (151936, 151936): 151936,  # contiguous and aligned: contiguous
        (50257, 50257): 50257,  # contiguous, unaligned (GPT-2): the same misalignment, so contiguous too
        (50264, 50257): 50264,  # a padded buffer's view: aligned
    }
    for (stride, v), want in cases.items():
        x = torch.empty(4, stride, dtype=torch.bfloat16, device="meta")[:, :v]
        labels = torch.empty(4, dtype=torch.int64, device="meta")
        with utils.record_launches(utils.GPU_TARGETS[90]) as launches:
            _, ent, stats = tlog.logits_forward(Rows(x, labels, 1.0, -100))
            coef = Coefficients(*(torch.empty(4, device="meta") for _ in range(3)))
            grad = tlog.logits_backward(Rows(x, labels, 1.0, -100), stats, coef)
        assert grad.shape == (4, v) and grad.stride() == (want, 1), (stride, v, grad.stride())
        backward = [launch for launch in launches if launch.name == "_logits_bwd_kernel"]
        assert backward and backward[0].kwargs["OUT_UNIT"] == (8 if want % 8 == 0 else 1)
        assert ops._gradient_strides(_claiming(x, "cuda")) == (want, 1)
        assert ops._gradient_strides(x) == (v, 1)  # not CUDA: the backend's contiguous buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_into_padded_rows_of_a_view(dtype):
    """A V % 8 != 0 view's gradient written into rows padded to 16 bytes (what a GPU gets), with a row stride
    other than the logits': float64's values, the padding untouched."""
    base, labels, g_lp, g_h = _case(5, 1064, dtype, seed=4)
    logits, labels = base[:, :1037], labels.clamp(max=1036)
    with utils.quiet():
        lp, h, stats = tlog.logits_forward(Rows(logits, labels, 0.9, -100))
        buf = torch.full((5, 1040), 7.0, dtype=dtype, device=DEV)
        grad = tlog.logits_backward(Rows(logits, labels, 0.9, -100), stats, logprob_entropy_coefficients(g_lp, g_h, h),
                                    out=buf[:, :1037])
    assert grad.data_ptr() == buf.data_ptr() and grad.stride() == (1040, 1)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 0.9)
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(dtype, ref))
    assert (buf[:, 1037:] == 7.0).all()


def test_occupancy_rule():
    """CTAs per SM from registers (per warp in units of 256), shared memory (+1 KiB a block) and warps."""
    sm = utils.GPU_TARGETS[90].sm
    assert utils.ctas_per_sm(sm, 32, 0, 8) == 8  # 64 warps
    assert utils.ctas_per_sm(sm, 48, 1056, 8) == 5  # 48 x 32 x 8 = 12288 registers a CTA
    assert utils.ctas_per_sm(sm, 128, 74752, 8) == 2
    assert utils.ctas_per_sm(sm, 131, 74752, 8) == 1  # 136 x 32 x 8 > 32768: the 128-register cliff
    assert utils.ctas_per_sm(utils.GPU_TARGETS[80].sm, 40, 100 * 1024, 4) == 1  # sm_80's 164 KiB of smem


def test_fused_forward_program_order_is_l2_aware():
    """Row groups fit the L2 share; several groups come with group x splits a multiple of the slots (a wave never
    straddles two groups); waves are >= 90% full; one group when every row tile fits."""
    h100 = utils.GPU_TARGETS[90]
    block_n, dim = 64, 4096
    fit = tlin.rows_in_l2(block_n, dim, 2, h100)
    assert fit * block_n * dim * 2 <= utils.L2_FRACTION * h100.l2_bytes < (fit + 1) * block_n * dim * 2
    for slots in (132, 264):
        for n in (256, 1024, 4096, 16384):
            row_tiles = -(-n // block_n)
            group, splits = tlin.fused_plan(row_tiles, 1187, fit, slots)
            assert utils.wave_efficiency(row_tiles * splits, slots) >= utils.TARGET_WAVE_EFFICIENCY
            if row_tiles <= fit:
                assert group == row_tiles
            else:
                assert group <= fit and group * splits % slots == 0, (n, slots, group, splits)
    assert tlin.fused_plan(7, 100, 1, 1) == (7, 1)  # the interpreter


if tb._IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _program_order_kernel(out_ptr, ROWS, COLS, GROUP):
        pid = tl.program_id(0)
        row, col = tlin.grouped_tile(pid, ROWS, COLS, GROUP)
        tl.store(out_ptr + 2 * pid, row)
        tl.store(out_ptr + 2 * pid + 1, col)


def test_grouped_program_order_covers_every_tile_once():
    """grouped_tile maps programs 0..R*C-1 onto every (row tile, column) once, ragged last group included, and
    consecutive programs of a group walk its row tiles first."""
    rows, cols, group = 11, 5, 4
    out = torch.full((rows * cols, 2), -1, dtype=torch.int32, device=DEV)
    utils.launch(_program_order_kernel, (rows * cols,), out, rows, cols, group)
    seen = [tuple(p) for p in out.cpu().tolist()]
    assert sorted(seen) == [(r, c) for r in range(rows) for c in range(cols)]
    assert seen[:5] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]
    assert seen[-3:] == [(8, 4), (9, 4), (10, 4)]  # the last group holds 3 row tiles
    if instrument is not None:  # the traffic model's copy of the order (tools/gpu_model.py) is the kernel's
        from tools import gpu_model

        assert [gpu_model._grouped(pid, rows, cols, group) for pid in range(rows * cols)] == seen


def test_public_api_with_forced_splits():
    logits, labels, g_lp, g_h = _case(4, 9000, seed=3)
    x = logits.clone().requires_grad_(True)
    with utils.force_num_splits(3):
        lp, h = sirl_kernels.token_logprobs_entropy(x, labels, backend="triton")
        (lp * g_lp + h * g_h).sum().backward()
    _check_fwd(lp, h, logits, labels)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu())
    torch.testing.assert_close(x.grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


@pytest.mark.parametrize("v", [1, 15, 4095, 4096, 4097])
def test_tile_tails(v):
    logits, labels, g_lp, g_h = _case(3, v, seed=v)
    with utils.quiet():
        lp, h, _, grad = _run(logits, labels, g_lp, g_h)
    _check_fwd(lp, h, logits, labels)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu())
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


def test_row_stride_and_dtypes():
    base, labels, g_lp, g_h = _case(5, 1300, torch.bfloat16, seed=4)
    logits = base[:, :1000]  # row stride 1300
    labels = labels % 1000
    with utils.quiet():
        lp, h, _, grad = _run(logits, labels, g_lp, g_h)
    assert grad.dtype == torch.bfloat16
    _check_fwd(lp, h, logits, labels)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu())
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(torch.bfloat16, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_split(dtype):
    logits, labels, g_lp, g_h = _case(4, 5000, dtype, seed=5, ignore_frac=0.25)
    with utils.quiet():
        lp, h, _, grad = _run(logits, labels, g_lp, g_h, temperature=1.7, splits=2, bwd_splits=2)
    _check_fwd(lp, h, logits, labels, 1.7)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 1.7)
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(dtype, ref))


def test_label_gradient_exact_when_p_near_one():
    """1 - p_y is computed as -expm1(log p_y): with log p_y = -1e-9 (given the row stats), 1 - exp(log p_y)
    rounds to 0 in fp32 while the exact value is 1e-9."""
    logits = torch.full((2, 300), -40.0, device=DEV)
    logits[:, 7] = 0.0
    labels = torch.tensor([7, 7], device=DEV)
    stats = torch.tensor([[0.0, 1e-9], [0.0, 1e-9]], device=DEV)  # (max, log-sum): log p_y = 0 - 0 - 1e-9
    ent = torch.zeros(2, device=DEV)
    g = torch.ones(2, device=DEV)
    with utils.quiet():
        grad = tlog.logits_backward(Rows(logits, labels, 1.0, -100), stats,
                                    logprob_entropy_coefficients(g, torch.zeros(2, device=DEV), ent))
    torch.testing.assert_close(grad[:, 7].double().cpu(), -torch.expm1(torch.tensor([-1e-9, -1e-9],
                               dtype=torch.float64)), rtol=1e-6, atol=0)


# --- in-place backward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_kernel(dtype):
    logits, labels, g_lp, g_h = _case(4, 6000, dtype, seed=6, ignore_frac=0.3)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 0.9)
    lp, h, lse = tb.logits_forward(Rows(logits, labels, 0.9, -100))
    buf = logits.clone()
    ptr = buf.data_ptr()
    with utils.quiet():
        out = tlog.logits_backward(Rows(buf, labels, 0.9, -100), lse, logprob_entropy_coefficients(g_lp, g_h, h),
                                   num_splits=2, out=buf)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(buf.double().cpu(), ref, **grad_tolerance(dtype, ref))


def test_inplace_backward_public_api():
    logits, labels, g_lp, g_h = _case(6, 2000, seed=7, ignore_frac=0.3)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), 1.3)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf whose storage backward may overwrite
    x.retain_grad()
    ptr = x.data_ptr()
    lp, h = sirl_kernels.token_logprobs_entropy(x, labels, temperature=1.3, backend="triton", inplace_backward=True)
    _check_fwd(lp, h, logits, labels, 1.3)
    (lp * g_lp + h * g_h).sum().backward()
    torch.testing.assert_close(leaf.grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))
    # the gradient was written into the logits' storage: their values are gone
    torch.testing.assert_close(x.detach().double().cpu(), ref, **grad_tolerance(torch.float32, ref))
    assert x.data_ptr() == ptr
    # the default path leaves the logits alone
    y = logits.clone().requires_grad_(True)
    lp, h = sirl_kernels.token_logprobs_entropy(y, labels, temperature=1.3, backend="triton")
    (lp * g_lp + h * g_h).sum().backward()
    assert torch.equal(y.detach(), logits)
    torch.testing.assert_close(y.grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


# --- determinism ----------------------------------------------------------------------------------------------


def test_bitwise_deterministic_split_paths():
    logits, labels, g_lp, g_h = _case(3, 9000, torch.bfloat16, seed=8)
    runs = []
    for _ in range(2):
        with utils.quiet():
            runs.append(_run(logits, labels, g_lp, g_h, splits=3, bwd_splits=3))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- fused linear ---------------------------------------------------------------------------------------------

LIN_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 5e-2), torch.float16: (5e-3, 1e-2)}


def _lin_case(n, d, v, dtype, seed=0, bias=True, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    to = (lambda t: None if t is None else t.to(DEV))
    return to(hidden), to(weight), to(b), to(labels), to(g_lp), to(g_h)


def _lin_reference_grads(hidden, weight, bias, labels, g_lp, g_h, temperature):
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (hidden, weight)]
    b = None if bias is None else bias.detach().cpu().double().requires_grad_(True)
    lp, h = reference_linear(leaves[0], leaves[1], labels.cpu(), b, temperature)
    (lp * g_lp.cpu().double() + h * g_h.cpu().double()).sum().backward()
    return lp, h, leaves[0].grad, leaves[1].grad, None if b is None else b.grad


def _lin_run(hidden, weight, b, labels, g_lp, g_h, temperature=1.0, splits=None, chunk=16, needs=(True, True, True)):
    with utils.quiet():
        lp, h, stats = tlin.linear_forward(LinearRows(hidden, weight, b, labels, temperature, -100), num_splits=splits)
        grads = tb.linear_backward(LinearRows(hidden, weight, b, labels, temperature, -100), stats,
                                   logprob_entropy_coefficients(g_lp, g_h, h), chunk, needs)
    return lp, h, grads


def _lin_check(hidden, weight, b, labels, g_lp, g_h, temperature, lp, h, grads):
    dtype = hidden.dtype
    ref_lp, ref_h, *refs = _lin_reference_grads(hidden, weight, b, labels, g_lp, g_h, temperature)
    rtol, atol = LIN_TOL[dtype]
    torch.testing.assert_close(lp.double().cpu(), ref_lp.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(h.double().cpu(), ref_h.detach(), rtol=rtol, atol=atol)
    for got, ref in zip(grads, refs):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == dtype
        scale = max(float(ref.abs().max()), 1.0)
        torch.testing.assert_close(got.double().cpu(), ref, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("dtype,bias,splits,temperature,chunk", [
    (torch.float32, True, 1, 1.0, 16),    # three chunks of 16 rows: dW accumulated in fp32
    (torch.float32, False, 3, 0.7, 64),   # one chunk: dW written directly
    (torch.bfloat16, True, 2, 1.0, 13),   # a chunk that is not a whole row tile
    (torch.float16, True, 1, 1.5, 40),
])
def test_linear_forward_backward(dtype, bias, splits, temperature, chunk):
    n, d, v = 40, 48, 2100  # tails in every dimension of the tiles (BLOCK_N 64, BLOCK_V 1024, BLOCK_D 64)
    case = _lin_case(n, d, v, dtype, seed=splits, bias=bias)
    lp, h, grads = _lin_run(*case, temperature, splits=splits, chunk=chunk)
    _lin_check(*case, temperature, lp, h, grads)
    assert bool((grads[0][case[3] == -100] == 0).all())


@pytest.mark.parametrize("n,d,v", [(1, 16, 1), (3, 17, 5), (70, 24, 33)])
def test_linear_odd_shapes(n, d, v):
    """V = 1, D not a multiple of 16, N above one row tile of the interpreter (64)."""
    case = _lin_case(n, d, v, torch.float32, seed=n, ignore_frac=0.2)
    lp, h, grads = _lin_run(*case, 1.0, chunk=32)
    _lin_check(*case, 1.0, lp, h, grads)


def test_linear_empty():
    hidden, weight, b, labels, g_lp, g_h = _lin_case(0, 8, 11, torch.float32)
    lp, h, (gh, gw, gb) = _lin_run(hidden, weight, b, labels, g_lp, g_h)
    assert lp.shape == (0,) and gh.shape == (0, 8)
    assert bool((gw == 0).all()) and bool((gb == 0).all()) and gw.shape == weight.shape


def test_linear_non_contiguous_rows():
    """hidden rows with a stride larger than D (a slice of a wider tensor) and a weight view likewise."""
    hidden, weight, b, labels, g_lp, g_h = _lin_case(20, 40, 300, torch.float32, seed=3)
    wide_h = torch.zeros(20, 56, device=DEV)
    wide_h[:, 8:48] = hidden
    wide_w = torch.zeros(300, 64, device=DEV)
    wide_w[:, 16:56] = weight
    h_view, w_view = wide_h[:, 8:48], wide_w[:, 16:56]
    assert h_view.stride(0) == 56 and w_view.stride(0) == 64
    lp, h, grads = _lin_run(h_view, w_view, b, labels, g_lp, g_h, 0.8, chunk=7)
    _lin_check(hidden, weight, b, labels, g_lp, g_h, 0.8, lp, h, grads)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False)])
def test_linear_needs_grad(needs):
    """Only the gradients asked for come back, and they equal those of the full backward bitwise."""
    case = _lin_case(30, 32, 500, torch.float32, seed=4)
    _, _, full = _lin_run(*case, chunk=8)
    _, _, part = _lin_run(*case, chunk=8, needs=needs)
    for want, got, ref in zip(needs, part, full):
        assert (got is not None) == want
        if want:
            assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_deterministic_and_public_api(dtype):
    """Through the public op (7 chunks of 3 rows): two runs equal bitwise, and every output (logprob, entropy,
    dX, dW, db) matches float64 within the dtype's tolerance."""
    hidden, weight, b, labels, g_lp, g_h = _lin_case(20, 32, 700, dtype, seed=9)
    outs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
        lp, h = sirl_kernels.linear_token_logprobs_entropy(leaves[0], leaves[1], labels, bias=leaves[2],
                                                           backend="triton", chunk_size=3)
        (lp * g_lp + h * g_h).sum().backward()
        outs.append([lp, h] + [t.grad for t in leaves])
    for a, c in zip(*outs):
        assert torch.equal(a, c)
    lp, h, *grads = outs[0]
    _lin_check(hidden, weight, b, labels, g_lp, g_h, 1.0, lp, h, grads)


def test_linear_split_forward_reads_no_uninitialised_memory(monkeypatch):
    """The split-V forward's per-row label logits (and partial states) are allocated uninitialised: filled with
    NaN here, every row with a label in [0, V) must still come out right, ignored rows 0 and bad labels NaN."""
    hidden, weight, b, labels, _, _ = _lin_case(12, 16, 700, torch.float32, seed=19)
    labels[1], labels[5] = 700, -3  # outside [0, V), not ignore_index (check_labels=False)
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    with utils.quiet():
        lp, h, stats = tlin.linear_forward(LinearRows(hidden, weight, b, labels, 1.0, -100), num_splits=3)
    monkeypatch.undo()
    bad = torch.zeros(12, dtype=torch.bool, device=DEV)
    bad[[1, 5]] = True
    ignored = labels == -100
    assert bool(ignored.any()) and bool((~ignored & ~bad).sum() >= 6)
    assert bool(torch.isnan(lp[bad]).all()) and bool(torch.isnan(h[bad]).all())
    assert bool((lp[ignored] == 0).all()) and bool((h[ignored] == 0).all()) and bool((stats[ignored] == 0).all())
    good = ~bad
    zeros = torch.zeros(int(good.sum()), device=DEV)
    ref_lp, ref_h, *_ = _lin_reference_grads(hidden[good], weight, b, labels[good], zeros, zeros, 1.0)
    torch.testing.assert_close(lp[good].double().cpu(), ref_lp.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h[good].double().cpu(), ref_h.detach(), rtol=1e-4, atol=1e-4)


def _spy_allocations(monkeypatch):
    """Shapes of every tensor the Triton launchers allocate (torch.empty / zeros / empty_like)."""
    made = []
    for name in ("empty", "zeros", "empty_like", "zeros_like"):
        real = getattr(torch, name)

        def spy(*args, real=real, **kwargs):
            t = real(*args, **kwargs)
            made.append(tuple(t.shape))
            return t

        monkeypatch.setattr(torch, name, spy)
    return made


def test_fused_forward_never_materialises_logits(monkeypatch):
    """The fused forward allocates O(N) outputs only (under the interpreter: no [N, V] tensor is created)."""
    hidden, weight, b, labels, _, _ = _lin_case(8, 16, 3000, torch.float32, seed=10)
    made = _spy_allocations(monkeypatch)
    with utils.quiet():
        tlin.linear_forward(LinearRows(hidden, weight, b, labels, 1.0, -100))
    assert made and max(math.prod(s) for s in made) < 3000


def test_backward_workspace_is_bounded_by_chunk_size(monkeypatch):
    """The backward holds at most chunk_size x V values of dz (in the input dtype), whatever N; with room for
    all rows it chunks the vocabulary only, so no fp32 [V, D] weight-gradient buffer exists (each slice of dW is
    written once), and the fp32 [N, D] dX accumulator exists only when there are several vocabulary chunks."""
    n, d, v = 50, 16, 3000
    case = _lin_case(n, d, v, torch.bfloat16, seed=11)
    for chunk, vocab_chunks in ((12, None), (30, True), (50, False)):
        made, held = [], {}

        def spy(real):
            def allocate(*args, **kwargs):
                t = real(*args, **kwargs)
                made.append((tuple(t.shape), t.dtype))
                held[(tuple(t.shape), t.dtype)] = t.untyped_storage().nbytes() // t.element_size()
                return t
            return allocate

        # the workspace is allocated with padded rows (torch.empty_strided): its storage is what is held
        monkeypatch.setattr(torch, "empty", spy(torch.empty))
        monkeypatch.setattr(torch, "empty_strided", spy(torch.empty_strided))
        _lin_run(*case, chunk=chunk)
        monkeypatch.undo()
        workspace = [s for s, dt in made if dt == torch.bfloat16 and len(s) == 2 and s != (n, d) and s != (v, d)]
        assert workspace and max(held[(s, torch.bfloat16)] for s in workspace) <= chunk * v, made
        if vocab_chunks is not None:  # all 50 rows at once
            assert all(s[0] == n for s in workspace), workspace
            assert ((v, d), torch.float32) not in made, "a [V, D] fp32 buffer with a single row chunk"
            assert (((n, d), torch.float32) in made) == vocab_chunks, made


@pytest.mark.parametrize("chunk", [30, 13])
def test_linear_vocabulary_chunks_against_float64(chunk):
    """30 rows of room for 50 tokens: three vocabulary chunks of all rows (dX summed in fp32 across them);
    13: not one vocabulary tile of all rows fits, so row chunks too (dW summed in fp32 across them)."""
    case = _lin_case(50, 24, 3000, torch.bfloat16, seed=21)
    rows, cols = tlin.chunk_plan(50, 3000, chunk, *(lambda c: (c["BLOCK_N"], c["BLOCK_V"]))(
        utils.linear_logits_blocks(50, 3000, 24, torch.bfloat16, utils.target_of(DEV))))
    assert (rows == 50 and cols < 3000) if chunk == 30 else rows < 50
    lp, h, grads = _lin_run(*case, 0.9, chunk=chunk)
    _lin_check(*case, 0.9, lp, h, grads)


# --- the coefficient form (backends/rows.py) with arbitrary coefficients -----------------------------------------

EPS32 = torch.finfo(torch.float32).eps


def _random_coefficients(n, seed, ignored_row=None, gamma=False, delta=False):
    """Random (alpha, beta, lam) [n] fp32: row 1 has lam = 0, row 2 alpha only (beta = lam = 0); the rest all
    three, at scales up to 10. ``gamma`` / ``delta``: random varentropy / self-certainty terms too (row 2 without
    them)."""
    g = torch.Generator().manual_seed(seed)
    alpha, beta, lam, gam, dlt = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
                                  for _ in range(5))
    lam[1] = 0.0
    beta[2] = lam[2] = gam[2] = dlt[2] = 0.0
    return Coefficients(*(t.to(DEV).contiguous() for t in (alpha, beta, lam)),
                        gam.to(DEV).contiguous() if gamma else None, dlt.to(DEV).contiguous() if delta else None)


def _form_reference(z64, labels, coef, temperature, ignore_index, logit_err):
    """(dz, bound) in float64: the form ``(p (alpha + beta L + gamma L^2) + delta + lam [i = y]) / T`` from float64
    log_softmax of ``z64`` (the logits / T; gamma, delta 0 when None), ``delta / T`` where p = 0, 0 on ignored
    rows, and a bound on an fp32 evaluation's error.

    The bound follows fp32 rounding: the kernels' L = (x - m) / T - ln s carries ``dL`` of absolute error, a few
    ulps of |x - m| / T and of ln s (ln s from a sum of V terms: up to log2(V) more ulps) plus ``logit_err / T``
    (the logits' own error, 0 for given logits) at the element and at the row's max; p = exp(L) then has relative
    error dL, so ``p (alpha + beta L)`` has ``p dL (|alpha| + |beta| (|L| + 1))``, and every product, sum and the
    stored result add a few ulps of ``p (|alpha| + |beta| |L|) + |lam| [i = y]`` (the label's lam (1 - p) is
    -lam expm1(L), a few ulps of lam). The gamma term is a polynomial in L: its error is ``p dL`` times the size of
    the polynomial plus its derivative ``|beta| + 2 |gamma| |L|``, and a few ulps of ``p |gamma| L^2`` (the kernel's
    terms in ``u = L + ln s`` all have one sign: no cancellation); delta adds a few ulps of |delta|."""
    zero = torch.zeros(z64.shape[0])
    alpha, beta, lam, gamma, delta = ((zero if c is None else c.double().cpu())[:, None] for c in coef)
    logp = torch.log_softmax(z64, dim=1)
    p = logp.exp()
    valid = labels != ignore_index
    onehot = torch.zeros_like(z64)
    onehot[valid.nonzero()[:, 0], labels[valid]] = 1.0
    finite_l = torch.where(p > 0, logp, torch.zeros_like(logp))
    dz = (p * (alpha + beta * finite_l + gamma * finite_l**2) + delta + lam * onehot) / temperature
    dz[~valid] = 0.0
    v = z64.shape[1]
    log_s = (z64 - z64.max(dim=1, keepdim=True).values).exp().sum(dim=1, keepdim=True).log()
    err = logit_err / temperature
    d_l = EPS32 * (4 * (finite_l.abs() + 2 * log_s + 1) + math.log2(v)) + err + err.max(dim=1, keepdim=True).values
    poly = alpha.abs() + beta.abs() * (finite_l.abs() + 1) + gamma.abs() * finite_l.abs() * (finite_l.abs() + 2)
    size = p * poly + lam.abs() * onehot + delta.abs()
    bound = (p * d_l * poly + 8 * EPS32 * size) / temperature + 1e-30
    return dz, bound.where(valid[:, None], 1e-30)


def _assert_within(got, ref, bound, what):
    excess = (got - ref).abs() / bound
    worst = int(excess.nan_to_num(nan=math.inf).argmax())
    assert not excess.isnan().any() and float(excess.max()) <= 1.0, (
        f"{what}: |error| {float((got - ref).abs().flatten()[worst]):.3e} > bound "
        f"{float(bound.flatten()[worst]):.3e} at flat index {worst}")


def _logits_backward_against_the_form(coef, logits, labels, temperature, splits):
    """The logits backward with ``coef`` against the float64 backward form; returns (the gradient, the forward's
    stats, the -inf columns)."""
    with utils.quiet():
        lp, h, stats = tlog.logits_forward(Rows(logits, labels, temperature, -100), num_splits=splits)
        grad = tlog.logits_backward(Rows(logits, labels, temperature, -100), stats, coef, num_splits=splits)
    z64 = logits.double().cpu() / temperature
    ref, bound = _form_reference(z64, labels.cpu(), coef, temperature, -100, torch.zeros_like(z64))
    got = grad.double().cpu()
    _assert_within(got, ref, bound, "dlogits")
    return grad, stats, torch.isinf(logits.cpu())


@pytest.mark.parametrize("splits", [1, 3])
def test_logits_backward_coefficient_form_matches_float64(splits):
    """The logits backward for random (alpha, beta, lam), lam = 0 and alpha-only rows included, against the form
    evaluated from float64 log_softmax, within a bound derived from fp32 rounding (``_form_reference``); -inf
    columns get exactly 0 and an ignored row (with nonzero coefficients) exactly 0. A forced split
    (``num_splits=3``: 2 programs a row over V's 4 interpreter tiles) puts the label in one split's chunk only."""
    n, v, temperature = 6, 3 * 4096 + 37, 0.8
    logits, labels, _, _ = _case(n, v, seed=40 + splits, scale=4.0)
    labels[3] = -100
    logits[0, 5:900:7] = float("-inf")
    logits[4, : v // 2] = float("-inf")
    labels[4] = v // 2 + 11
    labels[0] = 6  # a finite column
    coef = _random_coefficients(n, seed=splits)
    grad, _, inf_cols = _logits_backward_against_the_form(coef, logits, labels, temperature, splits)
    got = grad.double().cpu()
    assert (got[inf_cols] == 0).all() and bool(inf_cols.any())
    assert (got[3] == 0).all()
    # the old (g_lp, g_H) inputs are the special case alpha = -g_lp - g_H H, beta = -g_H, lam = g_lp
    g_lp, g_h = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    with utils.quiet():
        _, h, stats = tlog.logits_forward(Rows(logits, labels, temperature, -100), num_splits=splits)
        grad = tlog.logits_backward(Rows(logits, labels, temperature, -100), stats,
                                    logprob_entropy_coefficients(g_lp, g_h, h), num_splits=splits)
    ref = reference_grads(logits.cpu(), labels.cpu(), g_lp.cpu(), g_h.cpu(), temperature)
    torch.testing.assert_close(grad.double().cpu(), ref, **grad_tolerance(torch.float32, ref))


def _linear_backward_against_the_form(coef, hidden, weight, b, labels, temperature):
    """The fused-linear backward with ``coef`` against the float64 backward form chained through the layer, each
    gradient within the bound carried through the products; returns ``(grad_hidden, grad_weight, grad_bias)``."""
    (n, d), v = hidden.shape, weight.shape[0]
    with utils.quiet():
        lp, h, stats = tlin.linear_forward(LinearRows(hidden, weight, b, labels, temperature, -100))
        gx, gw, gb = tb.linear_backward(LinearRows(hidden, weight, b, labels, temperature, -100), stats, coef, 8,
                                        (True,) * 3)
    h64, w64, b64 = (t.double().cpu() for t in (hidden, weight, b))
    x64 = h64 @ w64.T + b64
    finite_b = torch.where(torch.isinf(b64), torch.zeros_like(b64), b64)
    logit_err = d * EPS32 * (h64.abs() @ w64.abs().T + finite_b.abs())
    dz, bound = _form_reference(x64 / temperature, labels.cpu(), coef, temperature, -100, logit_err)
    _assert_within(gx.double().cpu(), dz @ w64, bound @ w64.abs() + v * EPS32 * (dz.abs() @ w64.abs()) + 1e-30,
                   "grad_hidden")
    _assert_within(gw.double().cpu(), dz.T @ h64, bound.T @ h64.abs() + n * EPS32 * (dz.abs().T @ h64.abs()) + 1e-30,
                   "grad_weight")
    _assert_within(gb.double().cpu(), dz.sum(0), bound.sum(0) + n * EPS32 * dz.abs().sum(0) + 1e-30, "grad_bias")
    return gx, gw, gb


def test_linear_backward_coefficient_form_matches_float64():
    """The fused-linear backward for random (alpha, beta, lam) (lam = 0 and alpha-only rows included) against the
    float64 form chained through ``hidden @ weight.T + bias``: dX = dz W, dW = dz^T X, db = sum dz, each within
    the dz bound of ``_form_reference`` (the logits' own fp32 error is D ulps of |h| |w|) carried through the
    products plus their own fp32 accumulation (V or N ulps). A -inf bias column gets exactly 0 in dW and db, and an
    ignored row exactly 0 in dX. Several vocabulary chunks and row chunks (chunk 8)."""
    n, d, v, temperature = 24, 48, 300, 0.9
    hidden, weight, b, labels, _, _ = _lin_case(n, d, v, torch.float32, seed=41, ignore_frac=0.0)
    labels[5] = -100
    dead = next(c for c in range(v) if not (labels == c).any())  # a column no row has for its label
    b[dead] = float("-inf")
    coef = _random_coefficients(n, seed=7)
    gx, gw, gb = _linear_backward_against_the_form(coef, hidden, weight, b, labels, temperature)
    assert (gw[dead] == 0).all() and gb[dead] == 0
    assert (gx[5] == 0).all()


# --- matmul work: counted under the interpreter with the GPU tile table ---------------------------------------


@needs_tools
@pytest.mark.parametrize("d,v", [(1024, 1024), (4096, 256)])
def test_fused_linear_flops_with_gpu_tiles(d, v):
    """Every tl.dot counted (instrument.count_dot_flops) and every torch matmul the backward runs
    (``torch.utils.flop_counter``: its dX and dW products, cuBLAS on a GPU) with the tiles an H100 gets: forward
    2·NDV, backward 6·NDV (each logits tile recomputed once, then dX and dW), 8·NDV in all; 4·NDV with a frozen
    weight or input, 2·NDV for the bias alone. The backward runs 2 vocabulary chunks here."""
    if DEV.type != "cpu":
        pytest.skip("counts tl.dot under the interpreter")
    n = 64
    case = _lin_case(n, d, v, torch.bfloat16, seed=12)
    ndv = n * d * v
    with utils.tile_target(utils.GPU_TARGETS[90]), instrument.count_dot_flops() as dots:
        with utils.quiet():
            lp, h, stats = tlin.linear_forward(LinearRows(*case[:4], 1.0, -100))
        forward = dots["flops"]
        backward = {}
        for needs in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
            before = dots["flops"]
            with utils.quiet():
                mm = instrument.torch_matmul_flops(
                    lambda needs=needs: tb.linear_backward(LinearRows(*case[:4], 1.0, -100), stats,
                                                           logprob_entropy_coefficients(*case[4:], h), n // 2, needs))
            backward[needs] = (dots["flops"] - before + mm) / ndv
    assert forward / ndv == 2.0
    assert backward[(True, True, True)] == 6.0
    assert backward[(True, False, False)] == 4.0 and backward[(False, True, False)] == 4.0
    assert backward[(False, False, True)] == 2.0


# --- int64 offsets -----------------------------------------------------------------------------------------------


def _huge_stride_view(values: torch.Tensor, row_stride: int) -> torch.Tensor:
    """``values`` [R, C] copied into a view whose rows are ``row_stride`` elements apart, over a lazily allocated
    buffer: only the pages of the R rows are ever touched."""
    rows, cols = values.shape
    buf = torch.empty((rows - 1) * row_stride + cols, dtype=values.dtype, device=values.device)
    view = buf.as_strided((rows, cols), (row_stride, 1))
    view.copy_(values)
    return view


def test_offsets_past_2_31_are_int64():
    """Row offsets past 2**31 elements with 32-bit strides: weight row 8 and hidden row 8 start at 2**31
    (stride 2**28), where a 32-bit ``row * stride`` would wrap to a negative offset."""
    if DEV.type != "cpu":
        pytest.skip("the lazily allocated 4 GiB views are for the interpreter")
    n, d, v, stride = 9, 16, 9, 2**28
    hidden, weight, b, labels, g_lp, g_h = _lin_case(n, d, v, torch.bfloat16, seed=13, ignore_frac=0.0)
    h_view, w_view = _huge_stride_view(hidden, stride), _huge_stride_view(weight, stride)
    assert (v - 1) * w_view.stride(0) >= 2**31 and w_view.stride(0) < 2**31
    lp, h, grads = _lin_run(h_view, w_view, b, labels, g_lp, g_h, chunk=4)
    _lin_check(hidden, weight, b, labels, g_lp, g_h, 1.0, lp, h, grads)
    # the logits kernels: row 2 starts at 2 * 2**30 elements
    logits, labels, g_lp, g_h = _case(3, 100, torch.bfloat16, seed=14)
    x = _huge_stride_view(logits, 2**30)
    with utils.quiet():
        got = _run(x, labels, g_lp, g_h)
    _check_fwd(got[0], got[1], logits, labels)
    ref = reference_grads(logits, labels, g_lp, g_h)
    torch.testing.assert_close(got[3].double(), ref, **grad_tolerance(torch.bfloat16, ref))


@needs_tools
def test_bias_row_sums_offsets_past_2_31_are_int64():
    """The bias-gradient reduction over the rows of its fp32 partial sums (``add_row_sums``), with rows 2**30
    elements apart: row 2 starts at 2**31 elements, where a 32-bit ``r * stride`` wraps to -2**31."""
    if DEV.type != "cpu":
        pytest.skip("the lazily allocated 8 GiB view is for the interpreter")
    g = torch.Generator().manual_seed(20)
    values = torch.randn(3, 1100, generator=g)  # two column blocks of 1024, the second a tail
    part = _huge_stride_view(values, 2**30)
    assert 2 * part.stride(0) >= 2**31 and part.stride(0) < 2**31
    out = torch.randn(1100, generator=g)
    want = out.double() + values.double().sum(0)
    buffers = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in (part, out)]

    def inside(kind, addresses, elem_bytes):  # before the access: a wrapped offset fails here, not by a segfault
        ok = sum((addresses >= lo) & (addresses + elem_bytes <= hi) for lo, hi in buffers)
        assert ok.all(), f"{kind} at byte offsets {[int(a) - buffers[0][0] for a in addresses[ok == 0][:4]]} of part"

    with utils.quiet(), instrument.watch_memory(inside):
        tlin.add_row_sums(part, out)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


# --- NaN and bad labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 3])
def test_nan_filling_whole_tiles_poisons_the_row(splits):
    """A row whose first tile (4096 columns) is all NaN, then finite: the max (which drops NaN, as on a GPU)
    stays -inf over that tile, and the NaN in s must survive the rescale to the next tile's max; likewise a
    split made only of NaN in the split-V merge."""
    logits, labels, g_lp, g_h = _case(3, 3 * 4096 + 5, seed=15)
    logits[1, :4096] = float("nan")
    logits[2, 5000] = float("nan")
    with utils.quiet():
        lp, h, stats, grad = _run(logits, labels, g_lp, g_h, splits=splits, bwd_splits=splits)
    for r in (1, 2):
        assert bool(torch.isnan(lp[r])) and bool(torch.isnan(h[r])) and bool(torch.isnan(stats[r, 1]))
        assert bool(torch.isnan(grad[r]).all())
    _check_fwd(lp[:1], h[:1], logits[:1], labels[:1])
    assert bool(torch.isfinite(grad[0]).all())


def test_linear_nan_poisons_its_row_only():
    hidden, weight, b, labels, g_lp, g_h = _lin_case(6, 16, 2500, torch.float32, seed=16, ignore_frac=0.0)
    hidden[2, 3] = float("nan")
    lp, h, (gh, gw, gb) = _lin_run(hidden, weight, b, labels, g_lp, g_h, chunk=4)
    keep = torch.tensor([0, 1, 3, 4, 5], device=DEV)
    assert bool(torch.isnan(lp[2])) and bool(torch.isnan(h[2]))
    assert bool(torch.isfinite(lp[keep]).all()) and bool(torch.isfinite(h[keep]).all())
    assert bool(torch.isnan(gh[2]).all()) and bool(torch.isfinite(gh[keep]).all())
    weight[7, 0] = float("nan")  # logits column 7 is NaN in every row
    lp, h, _ = _lin_run(hidden, weight, b, labels, g_lp, g_h, splits=2)
    assert bool(torch.isnan(lp).all()) and bool(torch.isnan(h).all())


class _ReadsOutside:
    """Records every load or store of an active lane that falls inside a guard buffer but outside the view the
    kernels were given: a row read through a bad label would land in the guard band around the view."""

    def __init__(self, **views):
        self.views = views
        self.outside = []

    def __call__(self, kind, addresses, elem_bytes):
        import numpy as np

        for name, (view, base) in self.views.items():
            lo, hi = base.data_ptr(), base.data_ptr() + base.untyped_storage().nbytes()
            inside_buf = addresses[(addresses >= lo) & (addresses < hi)]
            off = (inside_buf - view.data_ptr()) // view.element_size()
            row, col = np.divmod(off, view.stride(0))
            bad = (off < 0) | (row >= view.shape[0]) | (col >= view.shape[1])
            if bad.any():
                self.outside.append((kind, name, off[bad][:5].tolist()))


def _guarded(values: torch.Tensor, pad: int = 8):
    """``values`` inside a NaN guard band of ``pad`` elements on every side: (view, buffer)."""
    rows, cols = values.shape
    buf = torch.full((rows + 2, cols + 2 * pad), float("nan"), dtype=values.dtype, device=values.device)
    view = buf[1:-1, pad:pad + cols]
    view.copy_(values)
    return view, buf


@needs_tools
def test_unchecked_bad_label_never_reads_outside_its_row():
    """Labels V and -7 (check_labels=False): NaN row outputs and NaN gradient rows, and not one load or store
    outside the logits view (a guard band of NaN surrounds it) in the forward, split-V merge or backward."""
    if DEV.type != "cpu":
        pytest.skip("watches the interpreter's loads")
    values, _, g_lp, g_h = _case(4, 100, seed=17)
    labels = torch.tensor([3, 100, -7, -100])
    x, buf = _guarded(values)
    watch = _ReadsOutside(logits=(x, buf))
    for splits in (1, 2):
        with instrument.watch_memory(watch), utils.quiet():
            lp, h, stats, grad = _run(x, labels, g_lp, g_h, splits=splits, bwd_splits=splits)
        assert watch.outside == []
        assert bool(torch.isnan(lp[1:3]).all()) and bool(torch.isnan(h[1:3]).all())
        assert bool(torch.isnan(grad[1:3]).all())
        assert float(lp[3]) == 0.0 and bool((grad[3] == 0).all()) and bool(torch.isfinite(grad[0]).all())


@needs_tools
@pytest.mark.parametrize("splits", [1, 2])
def test_linear_unchecked_bad_label_gives_nan_never_a_wild_read(splits):
    """The fused-linear variant of test_api's bad-label test, through the public op with check_labels=False,
    with every load of hidden and weight watched."""
    if DEV.type != "cpu":
        pytest.skip("watches the interpreter's loads")
    hidden, weight, b, _, g_lp, g_h = _lin_case(4, 16, 100, torch.float32, seed=18)
    labels = torch.tensor([3, 100, -7, -100])
    (h_view, h_buf), (w_view, w_buf) = _guarded(hidden), _guarded(weight)
    leaves = [h_view.detach().requires_grad_(True), w_view.detach().requires_grad_(True),
              b.clone().requires_grad_(True)]
    watch = _ReadsOutside(hidden=(h_view, h_buf), weight=(w_view, w_buf))
    with instrument.watch_memory(watch), utils.force_num_splits(splits):
        lp, h = sirl_kernels.linear_token_logprobs_entropy(leaves[0], leaves[1], labels, bias=leaves[2],
                                                           backend="triton", check_labels=False, chunk_size=2)
        (lp * g_lp + h * g_h).sum().backward()
    assert watch.outside == []
    assert bool(torch.isfinite(lp[0])) and bool(torch.isfinite(h[0]))
    assert bool(torch.isnan(lp[1:3]).all()) and bool(torch.isnan(h[1:3]).all())
    assert float(lp[3]) == 0.0 and float(h[3]) == 0.0
    grad_h = leaves[0].grad
    assert bool(torch.isnan(grad_h[1:3]).all()) and bool((grad_h[3] == 0).all())
    assert bool(torch.isfinite(grad_h[0]).all())
    with pytest.raises(ValueError, match=r"label 100 at flattened position 1"):
        sirl_kernels.linear_token_logprobs_entropy(hidden, weight, labels, backend="triton")


# --- launch path: every launch recorded, planned without a GPU, no host synchronisation ------------------------


@needs_tools
def test_launchers_run_on_meta_tensors_for_a_gpu():
    """The launchers plan every case of the AOT tool's CASES for sm_90 on meta tensors (no values: a .item() or a
    bool(tensor) would raise), and every @triton.jit kernel of the backend is launched by some case, so the
    AOT compile test covers them all. A frozen weight gets no [V, D] output anywhere."""
    from tools import triton_aot as aot

    launches = aot.record(90)
    launched = {launch.name for _, launch in launches}
    kernels = {name for mod in (tlog, tlin) for name in vars(mod) if name.endswith("_kernel")}
    assert len(kernels) == 6 and kernels <= launched, kernels - launched
    frozen = [launch for case, launch in launches if case == "linear bf16 frozen weight and bias"]
    assert any(launch.name == "_dlogits_kernel" for launch in frozen)
    big = [a for launch in frozen for a in launch.args
           if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == aot.VOCAB and a is not frozen[0].args[1]]
    assert not [a for a in big if a.dtype == torch.float32], "a frozen weight got an fp32 [V, D] buffer"


def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """utils.launch enters the CUDA device of its tensors (so Triton takes that device's current stream): checked
    with a tensor that says it lives on cuda:1 (``_claiming``) and a recording torch.cuda.device, as no GPU is
    needed for the control flow."""
    entered, calls = [], []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(torch.device(self.device))

        def __exit__(self, *exc):
            entered.append(None)

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, list(entered)))

    monkeypatch.setattr(torch.cuda, "device", Device)
    x = _claiming(torch.empty(4), "cuda:1")
    monkeypatch.setattr(utils, "_RECORDING", None)
    utils.launch(Kernel(), (3,), x, 7)
    assert calls == [((3,), [torch.device("cuda:1")])] and entered[-1] is None
    utils.launch(Kernel(), (1,), torch.empty(2), 7)  # CPU tensors (the interpreter): no device switch
    assert calls[-1] == ((1,), [torch.device("cuda:1"), None])


# --- self-certainty and varentropy (rows.Extras) and the backward's gamma / delta terms ----------------------


def _extras_reference(x64, labels, temperature, ignore_index=-100, logit_err=None):
    """(sc, ve, sc_bound, ve_bound) [N] float64 of raw logits ``x64`` [N, V]: ``SC = logsumexp(z) - mean(z) - ln V``
    and ``VE = sum p L^2 - H^2`` from float64 log_softmax of z = x / T; ignored rows 0, labels outside [0, V) NaN.

    The bounds follow the kernels' fp32 evaluation (natural units, D_i = z_i - max z, moments over p:
    ``M1 = E|D|``, ``M2 = E D^2``, ``M3 = E|D|^3``; ``mean|D|`` the plain mean): each d = (x - m) log2(e) / T
    carries ~3 ulps (subtract, the fp32 scale, the multiply), so 2^d a relative ``3 eps |D|`` more; every sum is
    of same-signed terms (the online rescales included: ``n c`` and ``2 c w2``, ``c^2 s`` have the sign of the
    sums), so a sum of V terms is within ``K eps`` of its size, K = V / 256 + 2 log2(V) + 16 (a GPU thread adds
    V / 256 of a row's terms in sequence, the interpreter fewer; then log2 of the tree), and s so within K eps:

    - SC = ln s - mean(D) - ln V: ``eps ((K + 8) (ln s + mean|D| + ln V + 1) + 3 M1)``;
    - VE = E[D^2] - E[D]^2, whose cancellation is the ulps of its two terms: p_i within
      ``eps (3 |D_i| + K + 4)``, so E[D^2] within ``eps ((2 K + 12) M2 + 3 M3)`` and E[D]^2 within
      ``2 M1 eps ((2 K + 7) M1 + 3 M2)``.

    ``logit_err`` [N, V] (the fused linear's fp32 logits): up to ``e = 2 max_i err_i / T`` more in each D, so
    ``2 e`` in SC and ``e (2 M2 + 4 M1 + 4 M1^2)`` in VE (p moves by 2 e relative). A factor 2 on the whole covers
    the second-order terms, and 1e-12 of the terms the float64 reference's own rounding. Non-finite references
    (+inf SC with a -inf logit, NaN rows) must match exactly."""
    z = x64 / temperature
    v = z.shape[1]
    sc = torch.logsumexp(z, dim=1) - z.mean(dim=1) - math.log(v)
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    fl = torch.where(p > 0, logp, torch.zeros_like(logp))
    h = -(p * fl).sum(dim=1)
    ve = (p * fl * fl).sum(dim=1) - h * h
    dd = z - z.max(dim=1, keepdim=True).values
    dd = torch.where(torch.isfinite(dd), dd, torch.zeros_like(dd))
    m1, m2, m3 = ((p * dd.abs() ** k).sum(dim=1) for k in (1, 2, 3))
    log_s = (torch.logsumexp(z, dim=1) - z.max(dim=1).values).nan_to_num(0.0, 0.0, 0.0)
    kk = v / 256 + 2 * math.log2(max(v, 2)) + 16
    sc_bound = EPS32 * ((kk + 8) * (log_s + dd.abs().mean(dim=1) + math.log(v) + 1) + 3 * m1)
    ve_bound = EPS32 * ((2 * kk + 12) * m2 + 3 * m3 + 2 * m1 * ((2 * kk + 7) * m1 + 3 * m2) + 4 * ve.abs())
    if logit_err is not None:
        e = 2 * logit_err.max(dim=1).values / temperature
        sc_bound = sc_bound + 2 * e
        ve_bound = ve_bound + e * (2 * m2 + 4 * m1 + 4 * m1 * m1)
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= v))
    for t in (sc, ve):
        t[ignored] = 0.0
        t[bad] = float("nan")
    # plus the float64 reference's own rounding (its VE cancels E[L^2] against H^2: ~1e-16 of E[L^2])
    sc_bound = sc_bound + 1e-12 * (torch.logsumexp(z, dim=1).abs() + z.mean(dim=1).abs()).nan_to_num(0.0, 0.0, 0.0)
    ve_bound = ve_bound + 1e-12 * (p * fl * fl).sum(dim=1).nan_to_num(0.0, 0.0, 0.0)
    return sc, ve, 2 * sc_bound + 1e-30, 2 * ve_bound + 1e-30


def _assert_extras(got, ref, bound, what):
    got = got.double().cpu()
    finite = torch.isfinite(ref)
    assert torch.equal(got[~finite].nan_to_num(nan=7.0), ref[~finite].nan_to_num(nan=7.0)), (
        what, got[~finite], ref[~finite])
    _assert_within(got[finite], ref[finite], bound[finite], what)


def _adversarial_rows(v, dtype, seed=0):
    """[12, v] logits and labels: normal, a NaN, a +inf, a -inf, all -inf, offset 1e4, ignored (-100), a bad label
    (V + 5), peaked (one logit 30 above: varentropy's cancellation), -inf over the first half (the max arrives
    after -inf states), constant (SC = VE = 0), wide (scale 20)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, v, generator=g) * 3
    labels = torch.randint(0, v, (12,), generator=g)
    x[1, v // 3] = float("nan")
    x[2, v // 2] = float("inf")
    x[3, v - 1] = float("-inf")
    labels[3] = 0 if v > 1 else labels[3]
    x[4] = float("-inf")
    x[5] += 1e4
    labels[6] = -100
    labels[7] = v + 5
    x[8, v // 4] += 30.0
    x[9, : v // 2] = float("-inf")
    labels[9] = v - 1
    x[10] = 1.5
    x[11] *= 20 / 3
    if v == 1:
        x[3, 0] = 0.25
    return x.to(dtype).to(DEV), labels.to(DEV)


@pytest.mark.parametrize("v", [1, 15, 3 * 4096 + 37])
@pytest.mark.parametrize("dtype,temperature,splits", [
    (torch.float32, 0.5, None), (torch.float32, 2.0, 3), (torch.bfloat16, 2.0, None), (torch.bfloat16, 0.5, 2),
    (torch.float32, 1.0, 7)])
def test_logits_forward_self_certainty_and_varentropy(v, dtype, temperature, splits):
    """Self-certainty and varentropy of the logits forward (unsplit and forced split-V merge) against float64 over
    adversarial rows (``_adversarial_rows``), within ``_extras_reference``'s fp32 bounds; the other outputs are
    those of the forward without them, bit for bit; each statistic alone gives the same bits as both."""
    x, labels = _adversarial_rows(v, dtype, seed=v)
    n = x.shape[0]
    both = Extras(torch.full((n,), -7.0, device=DEV), torch.full((n,), -7.0, device=DEV))
    with utils.quiet():
        outs = tlog.logits_forward(Rows(x, labels, temperature, -100), both, num_splits=splits)
        plain = tlog.logits_forward(Rows(x, labels, temperature, -100), num_splits=splits)
        sc_only = Extras(torch.empty(n, device=DEV), None)
        ve_only = Extras(None, torch.empty(n, device=DEV))
        tlog.logits_forward(Rows(x, labels, temperature, -100), sc_only, num_splits=splits)
        tlog.logits_forward(Rows(x, labels, temperature, -100), ve_only, num_splits=splits)
    for a, b in zip(outs, plain):
        assert torch.equal(a.nan_to_num(nan=7.0), b.nan_to_num(nan=7.0))
    assert torch.equal(sc_only.self_certainty.nan_to_num(nan=7.0), both.self_certainty.nan_to_num(nan=7.0))
    assert torch.equal(ve_only.varentropy.nan_to_num(nan=7.0), both.varentropy.nan_to_num(nan=7.0))
    sc, ve, sc_b, ve_b = _extras_reference(x.double().cpu(), labels.cpu(), temperature)
    _assert_extras(both.self_certainty, sc, sc_b, "self-certainty")
    _assert_extras(both.varentropy, ve, ve_b, "varentropy")
    assert (both.varentropy.nan_to_num(0.0) >= 0).all()
    if v > 1:  # the cases the rows are there for
        assert both.self_certainty[3] == math.inf and both.self_certainty[4].isnan()
        assert both.self_certainty[6] == 0 and both.varentropy[6] == 0
        assert both.varentropy[7].isnan() and both.varentropy[1].isnan()


@pytest.mark.parametrize("dtype,temperature,splits,bias", [
    (torch.float32, 0.5, None, True), (torch.float32, 2.0, 3, False), (torch.bfloat16, 2.0, 2, True),
    (torch.bfloat16, 0.5, None, False)])
def test_linear_forward_self_certainty_and_varentropy(dtype, temperature, splits, bias):
    """The fused-linear forward's self-certainty and varentropy (unsplit and split-V) against float64 of
    ``hidden @ weight.T + bias`` within ``_extras_reference``'s bounds with the logits' own fp32 error (D ulps of
    |h| |w| + |b|): ignored rows 0, a bad label NaN, a NaN hidden row NaN, an offset of 1e4 on every logit (the
    bias) and V = 300 (not a multiple of 8 nor of the tile); a -inf bias column makes every row's SC +inf."""
    n, d, v = 20, 24, 300
    hidden, weight, b, labels, _, _ = _lin_case(n, d, v, dtype, seed=50, bias=bias, ignore_frac=0.2)
    labels[0] = v + 5
    labels[1] = 3
    hidden[1] = float("nan")
    if bias:
        b = (b.float() + 1e4).to(dtype)
    ex = Extras(torch.empty(n, device=DEV), torch.empty(n, device=DEV))
    with utils.quiet():
        outs = tlin.linear_forward(LinearRows(hidden, weight, b, labels, temperature, -100), ex, num_splits=splits)
        plain = tlin.linear_forward(LinearRows(hidden, weight, b, labels, temperature, -100), num_splits=splits)
    for a, c in zip(outs, plain):
        assert torch.equal(a.nan_to_num(nan=7.0), c.nan_to_num(nan=7.0))
    h64, w64 = hidden.double().cpu(), weight.double().cpu()
    b64 = torch.zeros(v, dtype=torch.float64) if b is None else b.double().cpu()
    x64 = h64 @ w64.T + b64
    logit_err = d * EPS32 * (h64.abs() @ w64.abs().T + b64.abs())
    sc, ve, sc_b, ve_b = _extras_reference(x64, labels.cpu(), temperature, logit_err=logit_err.nan_to_num(0.0))
    _assert_extras(ex.self_certainty, sc, sc_b, "self-certainty")
    _assert_extras(ex.varentropy, ve, ve_b, "varentropy")
    assert ex.self_certainty[0].isnan() and ex.self_certainty[1].isnan()
    if bias:
        b = b.clone()
        b[7] = float("-inf")
        with utils.quiet():
            tlin.linear_forward(LinearRows(hidden, weight, b, labels, temperature, -100), ex, num_splits=splits)
        valid = (labels.cpu() != -100) & (labels.cpu() < v)
        valid[1] = False
        assert (ex.self_certainty.cpu()[valid] == math.inf).all()
        assert torch.isfinite(ex.varentropy.cpu()[valid]).all()


@pytest.mark.parametrize("splits,gamma,delta", [(1, True, True), (3, True, True), (1, True, False), (1, False, True)])
def test_logits_backward_gamma_delta_match_float64(splits, gamma, delta):
    """The logits backward with random gamma and/or delta against the float64 form (``_form_reference``'s
    bound); -inf columns get exactly delta / T (fp32 delta x fp32 1/T), an ignored row exactly 0, a bad label NaN."""
    n, v, temperature = 6, 3 * 4096 + 37, 0.8
    logits, labels, _, _ = _case(n, v, seed=60 + splits, scale=4.0)
    labels[3] = -100
    logits[0, 5:900:7] = float("-inf")
    logits[4, : v // 2] = float("-inf")
    labels[4] = v // 2 + 11
    labels[0] = 6
    coef = _random_coefficients(n, seed=splits + 10, gamma=gamma, delta=delta)
    grad, stats, inf_cols = _logits_backward_against_the_form(coef, logits, labels, temperature, splits)
    got = grad.double().cpu()
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    delta_t = (coef.delta.cpu() * inv_t if delta else torch.zeros(n))[:, None].expand(n, v)
    assert torch.equal(grad.cpu()[inf_cols], delta_t[inf_cols]) and bool(inf_cols.any())
    assert (got[3] == 0).all()
    inplace = logits.clone()
    with utils.quiet():  # in place: the same bits
        tlog.logits_backward(Rows(inplace, labels, temperature, -100), stats, coef, num_splits=splits, out=inplace)
    assert torch.equal(inplace, grad)
    bad = labels.clone()
    bad[1] = v + 3
    with utils.quiet():
        grad = tlog.logits_backward(Rows(logits, bad, temperature, -100), stats, coef, num_splits=splits)
    assert grad[1].isnan().all() and (grad[3] == 0).all()


def _statistics_coefficients(g_sc, g_ve, h, ve, v):
    """The coefficients of ``g_SC SC + g_VE VE`` (backends/rows.py) from the forward's entropy and varentropy."""
    return Coefficients(g_sc + g_ve * (2 * h + h * h - ve), 2 * g_ve * (1 + h), torch.zeros_like(h), g_ve.clone(),
                        -g_sc / v)


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_statistics_coefficients_give_autograds_gradient(temperature):
    """Coefficients built from g_SC, g_VE (alpha = g_SC + g_VE (2H + H^2 - VE), beta = 2 g_VE (1 + H), gamma = g_VE,
    delta = -g_SC / V, lam = 0) give torch autograd's float64 gradient of ``g_SC SC + g_VE VE`` w.r.t. the logits:
    the float64 form with float64 coefficients equals autograd to 1e-9, and the kernel, fed the fp32 coefficients
    of its own forward (H and VE in fp32), is within the form's fp32 bound of the float64 form evaluated with
    those same coefficients (so each check holds the part of the error it is about). A -inf logit's column is
    -g_SC / (V T) (SC's mean term) and an ignored row 0."""
    n, v = 5, 4096 + 21
    logits, labels, _, _ = _case(n, v, seed=70, scale=3.0)
    logits[2, 100:200] = float("-inf")
    labels[2] = 5
    labels[4] = -100
    g = torch.Generator().manual_seed(71)
    g_sc, g_ve = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    x64 = logits.double().cpu().requires_grad_(True)
    z = x64 / temperature
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    fl = torch.where(p > 0, logp, torch.zeros_like(logp))
    h64 = -(p * fl).sum(dim=1)
    ve64 = (p * fl * fl).sum(dim=1) - h64 * h64
    # +inf on row 2 (its -inf logits); the gradient of its mean term is 1 / (V T) in every column all the same
    sc64 = torch.logsumexp(z, dim=1) - z.mean(dim=1) - math.log(v)
    valid = labels.cpu() != -100
    loss = (g_sc.cpu().double() * sc64 + g_ve.cpu().double() * ve64)[valid].sum()
    (auto,) = torch.autograd.grad(loss, x64)
    coef64 = _statistics_coefficients(g_sc.cpu().double(), g_ve.cpu().double(), h64.detach(), ve64.detach(), v)
    form64, _ = _form_reference(z.detach(), labels.cpu(), coef64, temperature, -100, torch.zeros_like(z))
    torch.testing.assert_close(form64, auto, rtol=1e-9, atol=1e-12)
    ex = Extras(None, torch.empty(n, device=DEV))
    with utils.quiet():
        lp, h, stats = tb.logits_forward(Rows(logits, labels, temperature, -100), ex)  # the backend's entry point
        coef = _statistics_coefficients(g_sc, g_ve, h, ex.varentropy, v)
        grad = tlog.logits_backward(Rows(logits, labels, temperature, -100), stats, coef)
    ref, bound = _form_reference(z.detach(), labels.cpu(), coef, temperature, -100, torch.zeros_like(z))
    _assert_within(grad.double().cpu(), ref, bound, "dlogits")
    # and end to end, with the fp32 H and VE in the coefficients (a few ulps of |g_VE| (2 + 2H + H^2 + VE) in alpha)
    torch.testing.assert_close(grad.double().cpu(), auto, rtol=1e-4, atol=1e-5 * float(auto.abs().max()))
    assert (grad[4] == 0).all()


def test_linear_backward_gamma_delta_match_float64():
    """The fused-linear backward with random gamma and delta (several vocabulary and row chunks) against the
    float64 form chained through ``hidden @ weight.T + bias`` (bounds as in
    ``test_linear_backward_coefficient_form_matches_float64``; a -inf bias column, whose dz is delta / T, included);
    and the statistics' coefficients against autograd's float64 gradient of ``g_SC SC + g_VE VE`` through the
    linear layer."""
    n, d, v, temperature = 24, 48, 300, 0.9
    hidden, weight, b_clean, labels, _, _ = _lin_case(n, d, v, torch.float32, seed=42, ignore_frac=0.0)
    labels[5] = -100
    dead = next(c for c in range(v) if not (labels == c).any())
    b = b_clean.clone()
    b[dead] = float("-inf")
    coef = _random_coefficients(n, seed=9, gamma=True, delta=True)
    gx, gw, gb = _linear_backward_against_the_form(coef, hidden, weight, b, labels, temperature)
    assert (gx[5] == 0).all() and gb[dead] != 0
    # the statistics through the layer (finite bias), against autograd
    b = b_clean
    h64, w64, b64 = (t.double().cpu() for t in (hidden, weight, b_clean))
    g = torch.Generator().manual_seed(43)
    g_sc, g_ve = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    ex = Extras(torch.empty(n, device=DEV), torch.empty(n, device=DEV))
    with utils.quiet():
        lp, h, stats = tb.linear_forward(LinearRows(hidden, weight, b, labels, temperature, -100), 8, ex)
        grads = tb.linear_backward(LinearRows(hidden, weight, b, labels, temperature, -100), stats,
                                   _statistics_coefficients(g_sc, g_ve, h, ex.varentropy, v), 8, (True,) * 3)
    leaves = [t.requires_grad_(True) for t in (h64.clone(), w64.clone(), b64.clone())]
    z = (leaves[0] @ leaves[1].T + leaves[2]) / temperature
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    hh = -(p * logp).sum(dim=1)
    ve = (p * logp * logp).sum(dim=1) - hh * hh
    sc = torch.logsumexp(z, dim=1) - z.mean(dim=1) - math.log(v)
    valid = labels.cpu() != -100
    loss = (g_sc.cpu().double() * sc + g_ve.cpu().double() * ve)[valid].sum()
    autos = torch.autograd.grad(loss, leaves)
    for got, ref, what in zip(grads, autos, ("grad_hidden", "grad_weight", "grad_bias")):
        scale = float(ref.abs().max())
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-5 * scale, msg=what)
