"""``batch_invariant=True`` of the Triton forwards (logits input and fused linear): a row's outputs (logprob,
entropy, stats, self-certainty, varentropy) are bitwise the same whatever N, the other rows and the row's
position, and as accurate as the default forward against float64.

Each case computes a target row alone, then inside batches of several sizes with random other rows, the target
at the first, middle and last positions of the same batch. Under the interpreter (``TRITON_INTERPRET=1``, CPU) the
fused linear's batch-invariant tiles are formed by a fixed-order sum rather than numpy's matmul, whose OpenBLAS
kernels give position-dependent rows on some CPUs (Haswell / Zen): ``test_interpreter_robust_to_openblas_coretype``
reruns a case in a subprocess with ``OPENBLAS_CORETYPE=Haswell``. Shapes are small (the interpreter is slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_impl import reference_linear, reference_logprobs_entropy
from statistics_reference import reference as stats_reference
from statistics_reference import tolerance as stats_tolerance

import sirl_kernels
from sirl_kernels._sizes import batch_invariant_splits
from sirl_kernels.backends import triton as tb
from sirl_kernels.backends.rows import Extras, LinearRows, Rows

pytestmark = pytest.mark.skipif(
    not sirl_kernels.available_backends()["triton"].available,
    reason=f"triton backend unavailable: {sirl_kernels.available_backends()['triton'].reason}",
)

if tb._IMPORT_ERROR is None:
    from sirl_kernels.backends.triton import utils

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TEMPERATURE = 0.7
SIZES = (1, 2, 5, 16, 17, 64, 100)
FWD_TOL = {"rtol": 1e-5, "atol": 2e-5}  # test_triton.py's, logits input
LIN_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 5e-2)}  # test_triton.py's, fused linear


def _positions(n):
    return sorted({0, n // 2, n - 1})


def _outputs(res, extras):
    """The row outputs of one forward as a list of tensors (extras' tensors included)."""
    lp, h, stats = res
    outs = [lp, h, stats]
    if extras is not None:
        outs += [t for t in (extras.self_certainty, extras.varentropy) if t is not None]
    return outs


def _new_extras(n, which):
    if which is None:
        return None
    sc = torch.empty(n, device=DEV) if which in ("sc", "both") else None
    ve = torch.empty(n, device=DEV) if which in ("ve", "both") else None
    return Extras(sc, ve)


def _assert_rows_equal(alone, batch, pos, what):
    for k, (a, b) in enumerate(zip(alone, batch)):
        a0, b0 = a[0].cpu(), b[pos].cpu()
        # bitwise: compare the bits (NaN payloads and signed zeros included)
        assert torch.equal(a0.view(torch.int32), b0.view(torch.int32)), (what, pos, k, a0, b0)


# --- logits input ---------------------------------------------------------------------------------------------
def _logits_rows(n, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    return x, labels


def _logits_fwd(x, labels, which):
    ex = _new_extras(x.shape[0], which)
    res = tb.logits_forward(Rows(x.to(DEV), labels.to(DEV), TEMPERATURE, -100), ex, batch_invariant=True)
    return _outputs(res, ex)


@pytest.mark.parametrize("which", [None, "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v,sizes", [(37, SIZES), (1000, SIZES), (20000, (1, 2, 5, 17))])
def test_logits_forward_batch_invariant(v, sizes, dtype, which):
    """The target row alone and at the first, middle and last positions of batches of ``sizes`` rows: the same
    bits. V = 20000 > 16384 splits every row in two (whatever N) and merges them. (N = 1024:
    ``test_logits_forward_batch_invariant_many_rows``.)"""
    target, target_label = _logits_rows(1, v, dtype, seed=1)
    target_label[0] = v // 3
    alone = _logits_fwd(target, target_label, which)
    for n in sizes:
        x, labels = _logits_rows(n, v, dtype, seed=100 + n)
        for pos in _positions(n):
            x[pos], labels[pos] = target[0], target_label[0]
        batch = _logits_fwd(x, labels, which)
        for pos in _positions(n):
            _assert_rows_equal(alone, batch, pos, f"logits V={v} N={n}")


def test_logits_forward_batch_invariant_many_rows():
    """N = 1024 rows of V = 37 (one program per row under the interpreter: ~17 s, so one dtype): the same bits.
    (N = 4096 cost 70 s here and adds nothing: rows are programs; the GPU-target launch records below cover 4096.)"""
    test_logits_forward_batch_invariant(37, (1024,), torch.float32, "both")


@pytest.mark.parametrize("v", [37, 20000])
def test_logits_forward_batch_invariant_splits(v):
    """The split count is ``_sizes.batch_invariant_splits(V)`` whatever N (and ignores a forced split count):
    the launches recorded for a GPU target differ only in their grids' row dimension."""
    shapes = []
    for n in (1, 8, 4096):
        x = torch.empty(n, v, dtype=torch.bfloat16, device="meta")
        labels = torch.empty(n, dtype=torch.int64, device="meta")
        with utils.record_launches(utils.GPU_TARGETS[90]) as launches, utils.force_num_splits(7):
            tb.logits_forward(Rows(x, labels, 1.0, -100), batch_invariant=True)
        shapes.append([(lc.name, lc.grid[1:] if lc.name == "_logits_fwd_kernel" else (),
                        tuple(sorted((k, val) for k, val in lc.kwargs.items()))) for lc in launches])
        fwd = [lc for lc in launches if lc.name == "_logits_fwd_kernel"]
        cfg = utils.logits_tiles(v, torch.bfloat16, utils.GPU_TARGETS[90])
        tiles = utils.cdiv(v, utils.tile_width(cfg))
        assert fwd[0].grid == (n, utils.actual_splits(tiles, batch_invariant_splits(v)))
    assert shapes[0] == shapes[1] == shapes[2]


# --- fused linear ---------------------------------------------------------------------------------------------
def _linear_rows(n, d, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    return hidden, labels


def _linear_params(d, v, dtype, bias, seed=7):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    return weight.to(DEV), None if b is None else b.to(DEV)


def _linear_fwd(hidden, weight, b, labels, which, chunk_size=16):
    ex = _new_extras(hidden.shape[0], which)
    res = tb.linear_forward(LinearRows(hidden.to(DEV), weight, b, labels.to(DEV), TEMPERATURE, -100), chunk_size, ex,
                            batch_invariant=True)
    return _outputs(res, ex)


def _check_linear_invariance(d, v, dtype, bias, which, sizes, chunks=(1, 16, 4096)):
    weight, b = _linear_params(d, v, dtype, bias)
    target, target_label = _linear_rows(1, d, v, dtype, seed=1)
    target_label[0] = v // 3
    alone = _linear_fwd(target, weight, b, target_label, which)
    for i, n in enumerate(sizes):
        hidden, labels = _linear_rows(n, d, v, dtype, seed=100 + n)
        for pos in _positions(n):
            hidden[pos], labels[pos] = target[0], target_label[0]
        batch = _linear_fwd(hidden, weight, b, labels, which, chunk_size=chunks[i % len(chunks)])
        for pos in _positions(n):
            _assert_rows_equal(alone, batch, pos, f"linear V={v} N={n}")


@pytest.mark.parametrize("which", [None, "both"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", [37, 1000])
def test_linear_forward_batch_invariant(v, dtype, bias, which):
    """As for the logits input, D = 24 (not a multiple of the tile), chunk_size varied across the batches."""
    _check_linear_invariance(24, v, dtype, bias, which, SIZES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_forward_batch_invariant_split(dtype):
    """V = 20000 > 16384: two vocabulary splits merged, whatever N (N = 67: two row tiles of 64)."""
    _check_linear_invariance(16, 20000, dtype, True, "both", (1, 5, 67))


def test_linear_forward_batch_invariant_plan():
    """On a GPU target the batch-invariant fused forward launches the same tiles and splits for every N (the
    grid and the row group may differ: program order only), and for many rows it is the default launch."""
    v, d = 151936, 4096
    weight = torch.empty(v, d, dtype=torch.bfloat16, device="meta")
    seen = []
    for n in (1, 16, 100, 4096):
        hidden = torch.empty(n, d, dtype=torch.bfloat16, device="meta")
        labels = torch.empty(n, dtype=torch.int64, device="meta")
        with utils.record_launches(utils.GPU_TARGETS[90]) as launches:
            tb.linear_forward(LinearRows(hidden, weight, None, labels, 1.0, -100), 16, batch_invariant=True)
        fwd = [lc for lc in launches if lc.name == "_linear_fwd_kernel"][0]
        assert "FIXED_ORDER_DOT" not in fwd.kwargs  # a GPU keeps tl.dot: the default specialisation
        # (chunk, splits) are the args after ignore_index; the row group (the last) may differ
        seen.append((tuple(sorted(fwd.kwargs.items())), fwd.args[-3:-1]))
        splits = fwd.args[-2]
        assert splits == utils.actual_splits(utils.cdiv(v, fwd.kwargs["BLOCK_V"]), batch_invariant_splits(v))
    assert all(s == seen[0] for s in seen)
    assert dict(seen[0][0])["BLOCK_N"] == utils.LINEAR_MAX_BLOCK_N


# --- accuracy -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", [37, 20000])
def test_logits_forward_batch_invariant_matches_float64(v, dtype):
    """The batch-invariant logits forward (split or not) against float64, within test_triton.py's tolerances
    (logprob, entropy) and the statistics' fp32 bounds (self-certainty, varentropy)."""
    n = 6
    x, labels = _logits_rows(n, v, dtype, seed=3)
    ex = _new_extras(n, "both")
    lp, h, _ = tb.logits_forward(Rows(x.to(DEV), labels.to(DEV), TEMPERATURE, -100), ex, batch_invariant=True)
    ref_lp, ref_h = reference_logprobs_entropy(x, labels, TEMPERATURE, -100)
    torch.testing.assert_close(lp.double().cpu(), ref_lp, **FWD_TOL)
    torch.testing.assert_close(h.double().cpu(), ref_h, **FWD_TOL)
    _check_extras(ex, x.double(), labels, dtype, v)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_forward_batch_invariant_matches_float64(dtype, bias):
    """The batch-invariant fused forward against float64 of ``hidden @ weight.T + bias``, within test_triton.py's
    fused-linear tolerances."""
    n, d, v = 20, 24, 300
    weight, b = _linear_params(d, v, dtype, bias)
    hidden, labels = _linear_rows(n, d, v, dtype, seed=5)
    ex = _new_extras(n, "both")
    lp, h, _ = tb.linear_forward(LinearRows(hidden.to(DEV), weight, b, labels.to(DEV), TEMPERATURE, -100), 16, ex,
                                 batch_invariant=True)
    b64 = None if b is None else b.double().cpu()
    ref_lp, ref_h = reference_linear(hidden.double(), weight.double().cpu(), labels, b64, TEMPERATURE)
    rtol, atol = LIN_TOL[dtype]
    torch.testing.assert_close(lp.double().cpu(), ref_lp, rtol=rtol, atol=atol)
    torch.testing.assert_close(h.double().cpu(), ref_h, rtol=rtol, atol=atol)
    x64 = hidden.double() @ weight.double().cpu().T + (0.0 if b64 is None else b64)
    _check_extras(ex, x64, labels, dtype, v, extra=atol)


def _check_extras(ex, x64, labels, dtype, v, extra=0.0):
    ref = stats_reference(x64, labels, TEMPERATURE, v)
    kept = labels != -100
    for name, got in (("self_certainty", ex.self_certainty), ("varentropy", ex.varentropy)):
        tol = stats_tolerance(name, ref[name], x64, TEMPERATURE, torch.float32, v) + extra
        err = (got.double().cpu() - ref[name]).abs()
        assert (err[kept] <= tol[kept]).all(), (name, err[kept].max(), tol[kept].min())
        assert (got.cpu()[~kept] == 0).all()


# --- the interpreter's BLAS ------------------------------------------------------------------------------------
@pytest.mark.skipif(DEV.type != "cpu", reason="the interpreter's numpy / OpenBLAS only")
def test_interpreter_robust_to_openblas_coretype():
    """Under ``OPENBLAS_CORETYPE=Haswell`` (whose matmul kernels give rows that depend on their position in the
    tile) the batch-invariant fused forward still gives a row the same bits in every batch: its tiles do not go
    through numpy's matmul. Run in a subprocess, as OpenBLAS reads the variable when it loads."""
    code = (
        "import torch, test_triton_batch_invariant as t\n"
        "t._check_linear_invariance(24, 1000, torch.float32, True, 'both', (1, 5, 17, 64, 100))\n"
        "t._check_linear_invariance(24, 37, torch.bfloat16, False, None, (2, 16, 100))\n"
        "print('ok')\n")
    here = Path(__file__).resolve().parent
    tests = here.parents[1]
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
