"""The sync-free path on CUDA (skipped without CUDA): with ``check_labels=False`` the ops make no host
synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises on one) and a forward+backward can be
captured in a CUDA graph and replayed on new data, giving the same numbers as eager calls, bitwise.

For the "triton" backend and, when its extension is built, the "cuda" backend; both the logits-input op and
the fused-linear op (bf16, with a bias, several backward chunks).
"""

from __future__ import annotations

import pytest
import torch

import sirl_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sync-free path, CUDA graphs)"),
]

DEV = "cuda"
N, V, D = 96, 5000, 256


def _backend(name):
    status = sirl_kernels.available_backends()[name]
    if not status.available or "cuda" not in status.reason:
        pytest.skip(f"backend {name} does not run on CUDA here: {status.reason}")
    return name


class _Case:
    """Static input buffers (a CUDA graph replays on the same addresses) and one call of the op on them."""

    def __init__(self, op, backend, seed=0):
        self.op, self.backend = op, backend
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.labels = torch.randint(0, V, (N,), device=DEV, generator=g)
        self.labels[::7] = -100
        self.g_lp = torch.randn(N, device=DEV, generator=g)
        self.g_h = torch.randn(N, device=DEV, generator=g)
        if op == "logits":
            self.leaves = [(torch.randn(N, V, device=DEV, generator=g) * 3).to(torch.bfloat16).requires_grad_(True)]
        else:
            self.leaves = [
                torch.randn(N, D, device=DEV, generator=g).to(torch.bfloat16).requires_grad_(True),
                (torch.randn(V, D, device=DEV, generator=g) / D**0.5).to(torch.bfloat16).requires_grad_(True),
                (torch.randn(V, device=DEV, generator=g) * 0.1).to(torch.bfloat16).requires_grad_(True),
            ]

    def step(self):
        """Forward and backward with the sync-free options; returns (logprobs, entropy)."""
        if self.op == "logits":
            lp, h = sirl_kernels.token_logprobs_entropy(self.leaves[0], self.labels, temperature=0.9,
                                                        backend=self.backend, check_labels=False)
        else:
            hidden, weight, bias = self.leaves
            lp, h = sirl_kernels.linear_token_logprobs_entropy(hidden, weight, self.labels, bias=bias,
                                                               temperature=0.9, backend=self.backend,
                                                               chunk_size=40, check_labels=False)
        (lp * self.g_lp + h * self.g_h).sum().backward()
        return lp, h

    def refill(self, seed):
        """New values in the same buffers."""
        other = _Case(self.op, self.backend, seed)
        with torch.no_grad():
            for mine, theirs in zip(self.leaves, other.leaves):
                mine.copy_(theirs)
        self.labels.copy_(other.labels)
        self.g_lp.copy_(other.g_lp)
        self.g_h.copy_(other.g_h)

    def clear_grads(self):
        for t in self.leaves:
            t.grad = None


@pytest.mark.parametrize("op", ["logits", "linear"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_host_synchronisation(backend, op):
    case = _Case(op, _backend(backend))
    case.step()  # compiles and loads the kernels (which may synchronise), outside the checked region
    case.clear_grads()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp, h = case.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(case.leaves[0].grad).all())


@pytest.mark.parametrize("op", ["logits", "linear"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_forward_backward_capture_in_a_cuda_graph(backend, op):
    case = _Case(op, _backend(backend))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch.cuda.graphs asks
        for _ in range(2):
            case.clear_grads()
            case.step()
    torch.cuda.current_stream().wait_stream(side)
    case.clear_grads()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lp, h = case.step()
    grads = [t.grad for t in case.leaves]

    case.refill(seed=1)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [lp.clone(), h.clone()] + [g.clone() for g in grads]

    eager = _Case(op, backend, seed=1)
    e_lp, e_h = eager.step()
    torch.cuda.synchronize()
    for got, want in zip(replayed, [e_lp, e_h] + [t.grad for t in eager.leaves]):
        assert torch.equal(got, want)
