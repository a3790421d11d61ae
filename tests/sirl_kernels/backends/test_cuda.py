"""The "cuda" backend (libsirl_cuda.so): GPU parity tests (skipped with the reason where there is no usable CUDA
backend) and CPU-runnable checks of how it reports itself, of the library loading and probing without a driver, and
of its host-only launcher tests (csrc/cuda)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sirl_kernels
from reference_impl import grad_tolerance, reference_grads, reference_logprobs_entropy
from sirl_kernels import _native, backends
from sirl_kernels.backends import cuda as cuda_backend
from sirl_kernels.backends.rows import Coefficients, Extras, Rows, logprob_entropy_coefficients

ROOT = Path(__file__).resolve().parents[3]
_REASON = cuda_backend.unavailable_reason(torch.device("cuda"))
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")
gpu = [pytest.mark.gpu, needs_cuda]


# ----------------------------------------------------------------------------------------------------------------
# CPU-runnable
# ----------------------------------------------------------------------------------------------------------------
def test_report_gives_a_precise_reason():
    status = sirl_kernels.available_backends()["cuda"]
    if not torch.version.cuda:
        assert not status.available
        assert f"torch {torch.__version__} has no CUDA" in status.reason
    elif not torch.cuda.is_available():
        assert not status.available and "no CUDA device" in status.reason
    elif _REASON is not None:
        assert not status.available and ("libsirl_cuda" in status.reason or "sirl_probe" in status.reason)
    else:
        assert status.available and "cuda" in status.reason


def test_cpu_tensors_are_refused_with_reason():
    why = cuda_backend.unavailable_reason(torch.device("cpu"))
    assert why is not None and ("CUDA" in why)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable for cpu tensors"):
        backends.resolve("cuda", torch.device("cpu"))


def _library():
    lib = _native.load("cuda")
    if isinstance(lib, str):
        pytest.skip(lib)
    return lib


def test_library_loads_without_a_driver_and_its_probe_says_what_is_missing():
    """The static CUDA runtime makes loading need nothing; the probe answers ok on a usable GPU, else a reason."""
    lib = _library()
    assert lib.fn("sirl_device_kind")() == b"cuda"
    why = lib.probe(_native.Launch(device=0))
    if why is not None:
        assert why.startswith("sirl_probe: ") and ("driver" in why or "device" in why), why


def test_library_needs_only_the_c_runtime():
    """No torch, no Python, no libcudart.so, no libstdc++: the wheel works beside any torch."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run([readelf, "-d", str(_library().path)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    assert needed <= {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2", "libdl.so.2", "librt.so.1",
                      "libpthread.so.0"}, needed


def _launcher_test_binary() -> Path | None:
    env = os.environ.get("SIRL_CUDA_TEST_BINARY")
    candidates = [Path(env)] if env else []
    candidates += [
        ROOT / "build" / "cmake" / "csrc" / "cuda" / "test_cuda_launchers",
        ROOT / "build" / "cuda" / "test_cuda_launchers",
    ]
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def test_host_only_launcher_checks():
    """Runs the ctest binary of csrc/cuda (argument checks fire before any CUDA call; no GPU needed)."""
    binary = _launcher_test_binary()
    if binary is None:
        pytest.skip("csrc/cuda test binary not built (run scripts/build_csrc.sh or the CMake build in docs/cuda.md)")
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failures" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# GPU parity
# ----------------------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype):
    # Outputs are fp32 computed from rounded inputs; the float64 reference sees the same rounded inputs.
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-4, "atol": 1e-4}


def _case(n, v, dtype, seed=0, scale=3.0, ignore_every=0, ninf_every=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    if ninf_every:
        logits[1::ninf_every, ::7] = float("-inf")
        labels[1::ninf_every] = 1  # label stays finite (column 1 is not masked)
    return logits.cuda(), labels.cuda()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", [(1, 1), (3, 7), (17, 1000), (64, 4099), (5, 32768 + 3)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.gpu
@needs_cuda
def test_forward_matches_float64(dtype, n, v, temperature):
    logits, labels = _case(n, v, dtype, seed=n + v, ignore_every=4, ninf_every=3 if v > 7 else 0)
    lp, h, stats = cuda_backend.logits_forward(Rows(logits, labels, temperature, -100))
    ref_lp, ref_h = reference_logprobs_entropy(logits, labels, temperature, -100)
    torch.testing.assert_close(lp.double(), ref_lp, **_tol(dtype))
    torch.testing.assert_close(h.double(), ref_h, **_tol(dtype))
    ignored = labels == -100
    assert torch.all(lp[ignored] == 0) and torch.all(h[ignored] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [2, 3, 7, 64, 256])
@pytest.mark.gpu
@needs_cuda
def test_split_v_matches_unsplit_and_is_deterministic(dtype, splits):
    logits, labels = _case(6, 20011, dtype, seed=splits, ignore_every=5)
    one = cuda_backend.logits_forward(Rows(logits, labels, 0.9, -100), num_splits=1)
    many = cuda_backend.logits_forward(Rows(logits, labels, 0.9, -100), num_splits=splits)
    again = cuda_backend.logits_forward(Rows(logits, labels, 0.9, -100), num_splits=splits)
    for a, b, c in zip(one, many, again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c), "split-V merge must be bit-reproducible"
    ref_lp, ref_h = reference_logprobs_entropy(logits, labels, 0.9, -100)
    torch.testing.assert_close(many[0].double(), ref_lp, **_tol(dtype))
    torch.testing.assert_close(many[1].double(), ref_h, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.gpu
@needs_cuda
def test_unaligned_rows_and_strides(dtype):
    base, _ = _case(9, 1031, dtype, seed=5)
    logits = base[:, 3:1030]  # row start off 16-byte alignment, odd row stride
    labels = torch.randint(0, logits.shape[1], (9,), device="cuda")
    lp, h, _ = cuda_backend.logits_forward(Rows(logits, labels, 1.3, -100))
    ref_lp, ref_h = reference_logprobs_entropy(logits, labels, 1.3, -100)
    torch.testing.assert_close(lp.double(), ref_lp, **_tol(dtype))
    torch.testing.assert_close(h.double(), ref_h, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.gpu
@needs_cuda
def test_backward_matches_float64_and_in_place(dtype, temperature):
    logits, labels = _case(33, 3001, dtype, seed=11, ignore_every=6, ninf_every=4)
    g_lp = torch.randn(33, device="cuda")
    g_h = torch.randn(33, device="cuda")
    _, h, stats = cuda_backend.logits_forward(Rows(logits, labels, temperature, -100))
    coef = logprob_entropy_coefficients(g_lp, g_h, h)
    grad = cuda_backend.logits_backward(Rows(logits, labels, temperature, -100), stats, coef)
    assert grad.dtype == dtype and grad.shape == logits.shape
    ref = reference_grads(logits, labels, g_lp, g_h, temperature, -100)
    torch.testing.assert_close(grad.double(), ref, **grad_tolerance(dtype, ref))
    assert torch.all(grad[labels == -100] == 0)
    assert torch.all(grad[torch.isinf(logits)] == 0), "-inf logits get exactly zero gradient"
    inplace = logits.clone()
    out = cuda_backend.logits_backward(Rows(inplace, labels, temperature, -100), stats, coef, out=inplace)
    assert out.data_ptr() == inplace.data_ptr()
    assert torch.equal(inplace, grad), "in-place backward must equal the out-of-place one bit for bit"


def _extras_reference(logits, labels, temperature, ignore_index=-100):
    """float64 self-certainty (lse - mean z - log V) and varentropy (sum p L^2 - H^2) per row, with the kernels' row
    conventions (ignored 0, out-of-range label / NaN / +inf / all -inf rows NaN)."""
    z = logits.double().cpu() / temperature
    lse = torch.logsumexp(z, -1)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    L = torch.where(p > 0, logp, torch.zeros_like(logp))
    h = -(p * L).sum(-1)
    ve = (p * L * L).sum(-1) - h * h
    sc = lse - z.mean(-1) - torch.log(torch.tensor(float(z.shape[-1]), dtype=torch.float64))
    bad = ~torch.isfinite(lse)
    sc[bad], ve[bad] = float("nan"), float("nan")
    labels = labels.cpu()
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < z.shape[-1])
    nan = torch.full_like(sc, float("nan"))
    sc = torch.where(valid, torch.where(in_range, sc, nan), torch.zeros_like(sc))
    ve = torch.where(valid, torch.where(in_range, ve, nan), torch.zeros_like(ve))
    return sc, ve


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.gpu
@needs_cuda
def test_forward_self_certainty_and_varentropy(dtype, splits, temperature):
    """The specialised forward (either output asked for): against float64 and the CPU backend, split-V merges (the
    header's rescale rules) bit-reproducible, the plain outputs as the plain kernel's up to rounding."""
    n, v = 9, 20011
    logits, labels = _case(n, v, dtype, seed=3 + splits, ignore_every=0)
    logits[1, 17] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, ::3] = float("-inf")
    labels[3] = 1
    logits[4] = float("-inf")
    logits[5] += 1e4 if dtype != torch.float16 else 0
    labels[6] = -100
    labels[7] = v + 3
    logits[8, : v // 2] = float("-inf")
    labels[8] = v - 1
    sc = torch.empty(n, device="cuda")
    ve = torch.empty(n, device="cuda")
    out = cuda_backend.logits_forward(Rows(logits, labels, temperature, -100), extras=Extras(sc, ve), num_splits=splits)
    plain = cuda_backend.logits_forward(Rows(logits, labels, temperature, -100), num_splits=splits)
    for a, b in zip(out, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    ref_sc, ref_ve = _extras_reference(logits, labels, temperature)
    # fp32 sums over 20011 logits (chains of ~80 per thread, merged in a tree) and MUFU.EX2 (~2 ulp): 1e-4 of scale
    torch.testing.assert_close(sc.double().cpu(), ref_sc, rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(ve.double().cpu(), ref_ve, rtol=1e-4, atol=1e-4, equal_nan=True)
    sc2, ve2 = torch.empty_like(sc), torch.empty_like(ve)
    cuda_backend.logits_forward(Rows(logits, labels, temperature, -100), extras=Extras(sc2, ve2), num_splits=splits)
    assert torch.equal(sc.nan_to_num(7.0), sc2.nan_to_num(7.0)) and torch.equal(ve.nan_to_num(7.0), ve2.nan_to_num(7.0))
    only = torch.empty_like(sc)
    cuda_backend.logits_forward(Rows(logits, labels, temperature, -100), extras=Extras(None, only), num_splits=splits)
    assert torch.equal(only.nan_to_num(7.0), ve.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.gpu
@needs_cuda
def test_backward_with_gamma_and_delta(dtype, temperature):
    """The specialised backward: against the CPU backend's (float64-tested) kernel, -inf columns exactly delta / T,
    in place equal to out of place."""
    logits, labels = _case(33, 3001, dtype, seed=13, ignore_every=6, ninf_every=4)
    g = torch.Generator(device="cuda").manual_seed(14)
    alpha, beta, lam, gamma, delta = (torch.randn(33, device="cuda", generator=g) for _ in range(5))
    coef = Coefficients(alpha, beta, lam, gamma, delta)
    _, _, stats = cuda_backend.logits_forward(Rows(logits, labels, temperature, -100))
    grad = cuda_backend.logits_backward(Rows(logits, labels, temperature, -100), stats, coef)
    from sirl_kernels.backends import cpu as cpu_backend

    c_logits, c_labels = logits.cpu(), labels.cpu()
    _, _, c_stats = cpu_backend.logits_forward(Rows(c_logits, c_labels, temperature, -100))
    c_coef = Coefficients(*(t.cpu() for t in coef))
    c_grad = cpu_backend.logits_backward(Rows(c_logits, c_labels, temperature, -100), c_stats, c_coef)
    scale = c_grad.float().abs().amax(-1, keepdim=True)
    torch.testing.assert_close(grad.float().cpu(), c_grad.float(), rtol=1e-2 if dtype != torch.float32 else 1e-4,
                               atol=float(1e-5 * scale.max()))
    ninf = torch.isinf(logits)
    valid = (labels != -100)[:, None].expand_as(logits)
    label_col = torch.zeros_like(ninf)
    label_col[valid[:, 0].nonzero()[:, 0], labels[valid[:, 0]]] = True
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32, device="cuda")
    want = (delta[:, None] * inv_t).expand_as(grad).to(dtype)
    sel = ninf & valid & ~label_col
    assert torch.equal(grad[sel], want[sel]), "-inf columns get exactly delta / T"
    assert torch.all(grad[labels == -100] == 0)
    inplace = logits.clone()
    cuda_backend.logits_backward(Rows(inplace, labels, temperature, -100), stats, coef, out=inplace)
    assert torch.equal(inplace, grad)


@pytest.mark.gpu
@needs_cuda
def test_public_api_and_autograd_on_cuda():
    logits, labels = _case(4 * 5, 777, torch.bfloat16, seed=2, ignore_every=3)
    x = logits.view(4, 5, 777).requires_grad_(True)
    lp, h = sirl_kernels.token_logprobs_entropy(x, labels.view(4, 5), temperature=0.8, backend="cuda")
    (lp.sum() + 0.5 * h.sum()).backward()
    g_lp, g_h = torch.ones(20, device="cuda"), torch.full((20,), 0.5, device="cuda")
    ref = reference_grads(logits, labels, g_lp, g_h, 0.8, -100)
    torch.testing.assert_close(x.grad.view(20, 777).double(), ref, **grad_tolerance(torch.bfloat16, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.gpu
@needs_cuda
def test_fused_linear_matches_torch_backend(dtype, bias):
    g = torch.Generator().manual_seed(7)
    n, d, v = 70, 64, 5003
    hidden = (torch.randn(n, d, generator=g)).to(dtype).cuda()
    weight = (torch.randn(v, d, generator=g) * 0.2).to(dtype).cuda()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).cuda() if bias else None
    labels = torch.randint(0, v, (n,), generator=g).cuda()
    labels[::9] = -100

    def run(backend):
        leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
        bb = None if b is None else b.clone().requires_grad_(True)
        lp, h = sirl_kernels.linear_token_logprobs_entropy(
            leaves[0], leaves[1], labels, bias=bb, temperature=0.9, backend=backend, chunk_size=16
        )
        (lp.sum() - 0.3 * h.sum()).backward()
        return lp, h, leaves[0].grad, leaves[1].grad, None if bb is None else bb.grad

    got, want = run("cuda"), run("torch")
    for a, e in zip(got, want):
        if e is None:
            assert a is None
            continue
        tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(a.float(), e.float(), **tol)


@pytest.mark.slow
@pytest.mark.gpu
@needs_cuda
def test_large_vocab_bf16_vs_float64_and_triton():
    n, v = 16384, 151936
    torch.manual_seed(0)
    logits = (torch.randn(n, v, device="cuda") * 4).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::13] = -100
    lp, h, stats = cuda_backend.logits_forward(Rows(logits, labels, 1.0, -100))
    rows = torch.arange(0, n, 997, device="cuda")  # float64 on a sample of rows (the full tensor is 20 GB)
    ref_lp, ref_h = reference_logprobs_entropy(logits[rows], labels[rows])
    torch.testing.assert_close(lp[rows].double(), ref_lp, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(h[rows].double(), ref_h, rtol=1e-4, atol=2e-4)
    g_lp = torch.randn(n, device="cuda")
    g_h = torch.randn(n, device="cuda")
    coef = logprob_entropy_coefficients(g_lp, g_h, h)
    grad = cuda_backend.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef)
    ref = reference_grads(logits[rows], labels[rows], g_lp[rows], g_h[rows])
    torch.testing.assert_close(grad[rows].double(), ref, **grad_tolerance(torch.bfloat16, ref))
    cuda_backend.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef, out=logits)  # in place, 5 GB saved
    assert torch.equal(logits, grad)
    del grad, logits
    torch.cuda.empty_cache()

    if not sirl_kernels.available_backends()["triton"].available:
        pytest.skip("triton backend unavailable: compared with float64 only")
    torch.manual_seed(0)
    logits = (torch.randn(n, v, device="cuda") * 4).to(torch.bfloat16)
    t_lp, t_h, t_lse = backends.get("triton").logits_forward(Rows(logits, labels, 1.0, -100))
    torch.testing.assert_close(lp, t_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h, t_h, rtol=1e-5, atol=1e-4)
    t_coef = logprob_entropy_coefficients(g_lp, g_h, t_h)
    t_grad = backends.get("triton").logits_backward(Rows(logits, labels, 1.0, -100), t_lse, t_coef)
    c_grad = cuda_backend.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef)
    torch.testing.assert_close(c_grad.float(), t_grad.float(), rtol=1e-2, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# SASS of the main loops (no GPU: nvcc compiles sm_90a cubins, tools/cuda_sass.py counts them)
# ----------------------------------------------------------------------------------------------------------------
def test_main_loops_within_the_instruction_budget_on_sm90():
    """forward_kernel and backward_kernel, every dtype: at most 12 thread-instructions per logit in the main loop
    on sm_90a (the Triton kernels' budget, docs/cuda.md "Main loops"), 16-byte loads (and stores), no barrier. The
    specialised instantiations (`true`: the forward's self-certainty / varentropy sums, the backward's gamma / delta
    terms) may spend 16; the plain ones (`false`) keep the budget of 12."""
    try:
        from tools import cuda_sass
    except ImportError:
        pytest.skip("needs the checkout's tools/")
    if not (cuda_sass.ROOT / "csrc" / "cuda").is_dir():
        pytest.skip("needs the checkout's csrc/ (not beside the installed wheel)")
    nvcc = cuda_sass.find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc ($CUDACXX, PATH, /usr/local/cuda/bin, build/cuda-toolkit)")
    rows = [r for r in cuda_sass.count(("90a",), nvcc) if r["kernel"].startswith(("forward_kernel", "backward_kernel"))]
    assert len(rows) == 12, rows
    bad = []
    for r in rows:
        loop = r["main_loop"]
        budget = 16 if r["kernel"].endswith("true>") else 12
        if not (loop["instructions_per_element"] <= budget and set(loop["loads"]) <= {"LDG.E.128", "LDG.E.128.CONSTANT"}
                and set(loop["stores"]) <= {"STG.E.128"} and loop["barriers"] == 0):
            bad.append(f"{r['kernel']}: {loop['instructions_per_element']:.2f} per element, loads {loop['loads']}, "
                       f"stores {loop['stores']}, {loop['barriers']} barriers")
    assert not bad, "\n".join(bad)
