"""The custom ops: torch.library.opcheck and torch.compile(fullgraph=True) for every usable backend."""

from __future__ import annotations

import torch

import sirl_kernels
from sirl_kernels import ops


def test_opcheck_logits_op(backend, device):
    logits = torch.randn(6, 300, device=device, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 299, 7, 1], device=device)
    torch.library.opcheck(ops.token_logprobs_entropy_op, (logits, labels, 0.9, -100, backend))
    torch.library.opcheck(ops.token_logprobs_entropy_op, (logits, labels, 0.9, -100, backend, True, False))
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
