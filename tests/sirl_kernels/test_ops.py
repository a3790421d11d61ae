"""The custom ops: torch.library.opcheck and torch.compile(fullgraph=True) for every usable backend."""

from __future__ import annotations

import pytest
import torch

import sirl_kernels
from sirl_kernels import ops
from sirl_kernels.backends.rows import Rows, logprob_entropy_coefficients


def test_opcheck_logits_op(backend, device):
    logits = torch.randn(6, 300, device=device, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 299, 7, 1], device=device)
    torch.library.opcheck(ops.token_logprobs_entropy_op, (logits, labels, 0.9, -100, backend))
    # in place: on logits computed from the leaf (the leaf itself is refused, as torch refuses in-place writes to it)
    torch.library.opcheck(ops.token_logprobs_entropy_op, (logits * 1.0, labels, 0.9, -100, backend, True, False))
    _, ent, stats = ops.token_logprobs_entropy_op(logits.detach(), labels, 0.9, -100, backend)
    grads = (torch.randn(6, device=device), torch.randn(6, device=device))
    torch.library.opcheck(
        ops.token_logprobs_entropy_backward_op, (*grads, logits.detach(), labels, stats, ent, 0.9, -100, backend)
    )
    torch.library.opcheck(
        ops.token_logprobs_entropy_backward_inplace_op,
        (*grads, logits.detach().clone(), labels, stats, ent, 0.9, -100, backend),
    )


def test_opcheck_linear_op(backend, device):
    hidden = torch.randn(7, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device, requires_grad=True)
    bias = torch.randn(50, device=device, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 49, 7, 1, 2], device=device)
    torch.library.opcheck(ops.linear_token_logprobs_entropy_op, (hidden, weight, bias, labels, 1.0, -100, backend, 3))
    torch.library.opcheck(ops.linear_token_logprobs_entropy_op, (hidden, weight, None, labels, 1.0, -100, backend, 4))
    _, ent, stats = ops.linear_token_logprobs_entropy_op(hidden.detach(), weight.detach(), bias.detach(), labels, 1.0,
                                                          -100, backend, 3)
    grads = (torch.randn(7, device=device), torch.randn(7, device=device))
    for needs in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        torch.library.opcheck(
            ops.linear_token_logprobs_entropy_backward_op,
            (*grads, hidden.detach(), weight.detach(), bias.detach(), labels, stats, ent, 1.0, -100, backend, 3,
             *needs),
        )


def test_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    logits = torch.randn(4, 5, 301, device=device)
    labels = torch.randint(0, 301, (4, 5), device=device)
    hidden = torch.randn(4, 5, 16, device=device)
    weight = torch.randn(301, 16, device=device)

    def loss(logits, hidden, weight, labels):
        lp, h = sirl_kernels.token_logprobs_entropy(logits, labels, temperature=0.7, backend=backend)
        lp2, h2 = sirl_kernels.linear_token_logprobs_entropy(hidden, weight, labels, backend=backend, chunk_size=6)
        return (lp - 0.1 * h).sum() + (lp2 * h2).mean()

    compiled = torch.compile(loss, fullgraph=True)
    grads = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (logits, hidden, weight)]
        out = fn(*leaves, labels)
        out.backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def _backward_case(backend, device):
    logits = torch.randn(4, 300, device=device)
    labels = torch.tensor([0, 5, -100, 299], device=device)
    _, ent, stats = ops.token_logprobs_entropy_op(logits, labels, 1.0, -100, backend)
    return torch.ones(4, device=device), torch.ones(4, device=device), logits, labels, stats, ent


def test_public_backward_ops_refuse_mis_sized_row_tensors(backend, device):
    """The backward custom ops are public (torch.ops.sirl_kernels.*) and their kernels read N rows of every per-row
    tensor through raw pointers: a short or mis-shaped one is a typed one-line error, never an out-of-bounds read."""
    g_lp, g_h, logits, labels, stats, ent = _backward_case(backend, device)
    public = torch.ops.sirl_kernels
    bad = {
        "stats": (g_lp, g_h, logits, labels, stats[:2], ent),
        "stats ": (g_lp, g_h, logits, labels, stats[:, :1], ent),
        "grad_logprobs": (g_lp[:1], g_h, logits, labels, stats, ent),
        "grad_entropy": (g_lp, torch.ones(3, device=device), logits, labels, stats, ent),
        "entropy": (g_lp, g_h, logits, labels, stats, ent[:3]),
    }
    for name, args in bad.items():
        for op in (public.token_logprobs_entropy_backward, public.token_logprobs_entropy_backward_):
            with pytest.raises(ValueError, match=rf"^{name.strip()} must have shape \((4, 2|4,)\)"):
                op(*args[:2], args[2].clone(), *args[3:], 1.0, -100, backend)
    with pytest.raises(TypeError, match=r"^stats must be torch.float32, got torch.float64"):
        public.token_logprobs_entropy_backward(g_lp, g_h, logits, labels, stats.double(), ent, 1.0, -100, backend)
    # the linear backward op takes the same checks
    hidden, weight = torch.randn(4, 8, device=device), torch.randn(300, 8, device=device)
    _, ent, stats = ops.linear_token_logprobs_entropy_op(hidden, weight, None, labels, 1.0, -100, backend, 2)
    with pytest.raises(ValueError, match=r"^stats must have shape \(4, 2\)"):
        public.linear_token_logprobs_entropy_backward(g_lp, g_h, hidden, weight, None, labels, stats[:3], ent, 1.0,
                                                      -100, backend, 2, True, True, False)


def test_native_binding_checks_row_tensors_and_devices():
    """The last layer before the raw pointers checks on its own (the backends' functions are callable directly)."""
    from sirl_kernels.backends import cpu

    why = cpu.unavailable_reason(torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    g_lp, g_h, logits, labels, stats, ent = _backward_case("cpu", "cpu")
    coef = logprob_entropy_coefficients(g_lp, g_h, ent)
    with pytest.raises(ValueError, match=r"^stats must have shape \(4, 2\)"):
        cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats[:1], coef)
    with pytest.raises(ValueError, match=r"^beta must have shape \(4,\)"):
        cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef._replace(beta=coef.beta[:2]))
    with pytest.raises(TypeError, match=r"^alpha must be torch.float32, got torch.float64"):
        cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef._replace(alpha=coef.alpha.double()))
    meta = torch.empty(4, 300, device="meta")
    with pytest.raises(ValueError, match=r"^out must be a torch.float32 \(4, 300\) tensor on cpu"):
        cpu.library().logits_backward(Rows(logits, labels, 1.0, -100), stats, coef, meta, cpu._launch())
    with pytest.raises(ValueError, match=r"^labels are on meta but the logits are on cpu"):
        cpu.library().logits_forward(Rows(logits, labels.to("meta"), 1.0, -100), cpu._launch())
    # an expanded (stride 0) coefficient, as a caller may hand over, is read correctly
    expected = cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef._replace(beta=torch.zeros(4)))
    got = cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef._replace(beta=torch.zeros(1).expand(4)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
