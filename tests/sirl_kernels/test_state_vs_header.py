"""The softmax state has one source: ``csrc/include/sirl/online_state.h``. Every other form of it (the CPU SIMD kernels
of each ISA build this CPU runs, the Triton kernels under the interpreter, the "torch" backend) must agree with the
header's scalar reference, exported by libsirl_cpu as ``sirl_reference_logits_forward/backward``, on the same
adversarial rows: NaN and +inf anywhere (the label too), -inf, rows of only -inf, huge values, common offsets of
1e6, denormals, V = 1, tails of every length, ignored and out-of-range labels. (The CUDA vector form is checked
against ``sirl::update`` on such values in the host-only csrc/cuda/test_cuda_launchers.cpp.)

Agreement: NaN exactly where the header has NaN, infinities equal, finite values to fp32 rounding; the backward of
each form, fed its own forward's stats, against the header's backward fed the header's stats.
"""

from __future__ import annotations

import math

import pytest
import torch

import sirl_kernels
from sirl_kernels import backends
from sirl_kernels.backends.rows import Rows, logprob_entropy_coefficients

REPORT = sirl_kernels.available_backends()
pytestmark = pytest.mark.skipif(not REPORT["cpu"].available, reason=f"no libsirl_cpu: {REPORT['cpu'].reason}")

if REPORT["cpu"].available:
    from sirl_kernels.backends import cpu

IGNORE = -100


def _forms():
    """(id, backend name, ISA build or None) for every form of the state this machine can run."""
    forms = [pytest.param("torch", None, id="torch")]
    for isa in ("avx512", "avx2", "baseline"):
        forms.append(pytest.param("cpu", isa, id=f"cpu-{isa}"))
    status = REPORT["triton"]
    forms.append(pytest.param("triton", None, id="triton", marks=[] if status.available else [
        pytest.mark.skip(reason=f"backend triton unavailable: {status.reason}")]))
    return forms


def adversarial_rows(v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, v] fp32 logits and int64 labels: one special case per row."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []

    def row(values=None, label=0):
        base = torch.randn(v, generator=g) * 3 if values is None else values
        rows.append(base.float())
        labels.append(label)

    mid, last = v // 2, v - 1
    row()                                                    # plain
    row(label=IGNORE)                                        # ignored
    row(label=v)                                             # label past V (unchecked)
    row(label=-3)                                            # negative label (unchecked)
    for pos in sorted({0, mid, last}):
        for special in (math.nan, math.inf):
            x = torch.randn(v, generator=g)
            x[pos] = special
            row(x, label=(pos + 1) % v)                      # special elsewhere
            row(x.clone(), label=pos)                        # special at the label
    x = torch.randn(v, generator=g)
    x[::3] = -math.inf
    row(x, label=1 % v if v > 1 else 0)                      # -inf entries, finite label
    if v > 1:
        x = torch.randn(v, generator=g)
        x[1::2] = -math.inf
        row(x, label=1)                                      # label at -inf
    row(torch.full((v,), -math.inf), label=0)                # all -inf
    x = torch.full((v,), -math.inf)
    x[last] = 1.5
    row(x, label=last)                                       # one finite entry at the end
    x = torch.full((v,), -math.inf)
    x[mid] = math.nan
    row(x, label=0)                                          # NaN among -inf only
    row(torch.randn(v, generator=g) * 1e30, label=mid)       # huge spread
    x = torch.randn(v, generator=g)
    x[mid] = 3e38
    row(x, label=mid)                                        # near FLT_MAX
    for c in (1e4, 1e6):
        x = torch.full((v,), -1.0 + c)
        x[0] = 2.0 + c
        row(x, label=0)                                      # common offset, exact in fp32
        row(torch.round(torch.randn(v, generator=g) * 8) + c, label=last)
    row(torch.randn(v, generator=g) * 1e-40, label=mid)      # denormals
    row(torch.zeros(v), label=last)                          # uniform
    return torch.stack(rows), torch.tensor(labels, dtype=torch.int64)


def reference_slack(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, what the header's reference itself may be off by: it rounds z = x * (1/T) per element (as
    torch.log_softmax(x / T) does), which costs up to ulp(z) / 2 each when T != 1; the CPU kernels scale differences
    from the max and do not pay it (0.06 at a common offset of 1e6 with T = 0.7)."""
    if temperature == 1.0:
        return torch.zeros(logits.shape[0], dtype=torch.float64)
    z = (logits.float() * (1.0 / temperature)).abs()
    top = torch.where(torch.isfinite(z), z, torch.zeros_like(z)).amax(1)
    return 4 * (torch.nextafter(top, torch.full_like(top, math.inf)) - top).double()


def _assert_agree(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float, atol) -> None:
    got, want = got.double(), want.double()
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), (
        f"{what}: NaN where the header has none at {torch.nonzero(nan_got & ~nan_want).flatten().tolist()[:10]}, "
        f"a number where it has NaN at {torch.nonzero(nan_want & ~nan_got).flatten().tolist()[:10]}")
    inf = torch.isinf(want) | torch.isinf(got)
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    finite = ~(nan_want | inf)
    bound = rtol * want.abs() + torch.as_tensor(atol, dtype=torch.float64).expand_as(want)
    bad = finite & ((got - want).abs() > bound)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} values beyond tolerance, e.g. at "
                                 f"{torch.nonzero(bad)[0].tolist()}: {float(got[bad][0])!r} vs the header's "
                                 f"{float(want[bad][0])!r}")


@pytest.fixture
def form(request):
    backend, isa = request.param
    if backend == "cpu":
        chosen = cpu.set_isa(isa)
        if chosen != isa:
            cpu.set_isa("auto")
            pytest.skip(f"this CPU does not run the {isa} build")
    yield backends.get(backend)
    if backend == "cpu":
        cpu.set_isa("auto")


@pytest.mark.parametrize("form", [p.values for p in _forms()], ids=[p.id for p in _forms()], indirect=True)
@pytest.mark.parametrize("v", [1, 2, 17, 2049, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_every_form_agrees_with_the_header(form, v, dtype, temperature):
    logits, labels = adversarial_rows(v, seed=v)
    logits = logits.to(dtype)
    ref_lp, ref_h, ref_stats = cpu.reference_forward(Rows(logits, labels, temperature, IGNORE))
    lp, h, stats = form.logits_forward(Rows(logits, labels, temperature, IGNORE))
    # Rows whose x / T overflows fp32 (3e38 / 0.7) are outside the header's domain, which takes z = x / T: it sees
    # +inf there (NaN, as log_softmax(x / T) does), where the CPU kernels, scaling differences, stay finite.
    keep = ~(torch.isfinite(logits.float()) & ~torch.isfinite(logits.float() * (1.0 / temperature))).any(1)
    logits, labels, ref_lp, ref_h, ref_stats = logits[keep], labels[keep], ref_lp[keep], ref_h[keep], ref_stats[keep]
    lp, h, stats = lp[keep], h[keep], stats[keep]
    slack = reference_slack(logits, temperature)
    _assert_agree(lp, ref_lp, "logprob", rtol=1e-5, atol=2e-5 + slack)
    _assert_agree(h, ref_h, "entropy", rtol=1e-5, atol=2e-5 + slack)
    # The stats are each backend's own (read back only by its own backward), but a NaN logit makes them NaN anywhere.
    nan_rows = torch.isnan(logits.float()).any(1) & (labels != IGNORE)
    assert bool(torch.isnan(stats[nan_rows]).any(1).all()), "stats of a row holding NaN must be NaN"
    assert bool(torch.isnan(ref_stats[nan_rows]).any(1).all())

    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    grad = form.logits_backward(Rows(logits, labels, temperature, IGNORE), stats,
                                logprob_entropy_coefficients(g_lp, g_h, h))
    ref_coef = logprob_entropy_coefficients(g_lp, g_h, ref_h)
    ref_grad = cpu.reference_backward(Rows(logits, labels, temperature, IGNORE), ref_stats, ref_coef)
    finite = torch.isfinite(ref_grad)
    scale = float(ref_grad[finite].abs().max()) if bool(finite.any()) else 1.0
    eps = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    row_atol = eps * max(scale, 1.0) + slack[:, None] * (g_lp.abs() + g_h.abs() * 20).double()[:, None]
    _assert_agree(grad, ref_grad, "gradient", rtol=eps * 10, atol=row_atol)
