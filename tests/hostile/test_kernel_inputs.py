"""Hostile inputs to the kernels' public functions and raw custom ops: every one gets a typed error naming the
culprit, on every backend usable here, or a result equal to float64 PyTorch (never a silent wrong number).

The audit's categories: dtypes, layouts (strided, overlapping and expanded views), labels, temperatures at the
edge of float32, the raw ops ``torch.ops.sirl_kernels.*`` (which must check what the API checks), in-place
backward into a leaf, ``torch.compile(dynamic=True)``, degenerate sizes.
"""

from __future__ import annotations

import pytest
import torch

import sirl_kernels
from reference_impl import reference_logprobs_entropy as reference_forward
from sirl_kernels import TEMPERATURE_RANGE, linear_token_logprobs_entropy, token_logprobs_entropy, validate_labels

OPS = torch.ops.sirl_kernels


# ---- temperatures: 1/T must be a normal float32 on every backend ------------------------------------------------

@pytest.mark.parametrize("temperature", [1e46, 1e-40, 5e-39, 9e37, 0.0, -1.0, float("nan"), float("inf")])
def test_extreme_temperatures_are_refused_the_same_way_everywhere(backend, device, temperature):
    logits, labels = torch.randn(3, 17, device=device), torch.tensor([0, 5, 16], device=device)
    with pytest.raises(ValueError, match=r"^temperature .*(outside \[1\.18e-38, 8\.51e\+37\]|finite and > 0)"):
        token_logprobs_entropy(logits, labels, temperature=temperature, backend=backend)
    with pytest.raises(ValueError, match=r"^temperature "):
        OPS.token_logprobs_entropy(logits, labels, temperature, -100, backend)
    hidden, weight = torch.randn(3, 4, device=device), torch.randn(17, 4, device=device)
    with pytest.raises(ValueError, match=r"^temperature "):
        linear_token_logprobs_entropy(hidden, weight, labels, temperature=temperature, backend=backend)
    with pytest.raises(ValueError, match=r"^temperature "):
        OPS.linear_token_logprobs_entropy(hidden, weight, None, labels, temperature, -100, backend, 8)


def _closed_form_grads(logits, labels, g_lp, g_h, temperature):
    """float64 [g_lp (1[i = y] - p_i) - g_h p_i (log p_i + H)] / T. Not autograd through log_softmax(x / T): at
    T = 1.2e-38 that cancels terms of ~1e38 (z_max g_h against -z_max g_h) and loses the O(1) rest in float64
    (``reference_grads`` returns 0 for the argmax's -g_lp / T there)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    entropy = -plogp.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[-1]).double()
    ent_term = torch.where(p > 0, plogp + p * entropy, torch.zeros_like(p))
    return (g_lp.double()[:, None] * (onehot - p) - g_h.double()[:, None] * ent_term) / temperature


@pytest.mark.parametrize("temperature", TEMPERATURE_RANGE)
def test_the_extreme_temperatures_allowed_give_finite_float64_answers(backend, device, temperature):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 17, generator=g, dtype=torch.float64).float().to(device).requires_grad_(True)
    labels = torch.tensor([0, 5, 16], device=device)
    lp, h = token_logprobs_entropy(logits, labels, temperature=temperature, backend=backend)
    ref_lp, ref_h = reference_forward(logits.detach().double().cpu(), labels.cpu(), temperature=temperature)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    # T = 1.2e-38: logits / T are ~1e38, so p is one-hot (H = 0 up to rounding); T = 8.5e37: uniform (H = log V).
    torch.testing.assert_close(lp.detach().double().cpu(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.detach().double().cpu(), ref_h, rtol=1e-5, atol=1e-5)
    # The backward, at both ends: dL/dx = [g_lp (1[i = y] - p_i) - g_h p_i (log p_i + H)] / T. Upstream gradients
    # in [-1, 1] keep it inside fp32 (|.| <= 8.5e37 at T = 1.2e-38, where the label's and the argmax's entries are
    # +-g_lp / T and every other one is exactly 0).
    g_lp, g_h = (torch.rand(3, generator=g) * 2 - 1 for _ in range(2))
    (lp * g_lp.to(device) + h * g_h.to(device)).sum().backward()
    got = logits.grad.double().cpu()
    ref = _closed_form_grads(logits.detach().cpu(), labels.cpu(), g_lp, g_h, temperature)
    assert torch.isfinite(got).all(), got
    # Tolerance, per row: the bracket's terms are bounded by S T with S = (|g_lp| + |g_h| (1 + H)) / T, and every
    # backend forms it in fp32 with a few roundings and one exp whose relative error is below 2^-21 (approximate
    # exp2 on a GPU) or 2^-18 ln 2 (an fp32 exponent of magnitude <= 2^7 rounded, where 1/T <= 2^126 is folded
    # into it): 1e-5 S covers both. Results below the smallest normal fp32 (T = 8.5e37: |dL/dx| ~ 1e-39) may be
    # flushed to 0 on a GPU: FP32_MIN_NORMAL more.
    scale = (g_lp.abs() + g_h.abs() * (1 + ref_h)).double() / temperature
    tol = 1e-5 * scale[:, None] + TEMPERATURE_RANGE[0]
    assert ((got - ref).abs() <= tol).all(), (got, ref)
    assert ref.abs().max() > 1e37 if temperature < 1 else ref.abs().max() < 1e-37


# ---- the raw ops check what the API checks ----------------------------------------------------------------------

def test_raw_ops_refuse_what_the_api_refuses(backend, device):
    logits, labels = torch.randn(4, 10, device=device), torch.tensor([0, 1, 2, 3], device=device)
    hidden, weight = torch.randn(4, 6, device=device), torch.randn(10, 6, device=device)
    with pytest.raises(ValueError, match=r"labels shape \(5,\) must equal the leading shape \(4,\)"):
        OPS.token_logprobs_entropy(logits, torch.tensor([0, 1, 2, 3, 4], device=device), 1.0, -100, backend)
    with pytest.raises(TypeError, match=r"labels must have torch.int64, got torch.int32"):
        OPS.token_logprobs_entropy(logits, labels.int(), 1.0, -100, backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\), got \(1,\)"):
        OPS.linear_token_logprobs_entropy(hidden, weight, torch.zeros(1, device=device), labels, 1.0, -100, backend, 4)
    with pytest.raises(ValueError, match=r"labels shape \(6,\) must equal the leading shape \(4,\)"):
        OPS.linear_token_logprobs_entropy(hidden, weight, None, torch.zeros(6, dtype=torch.long, device=device), 1.0,
                                          -100, backend, 4)
    with pytest.raises(ValueError, match="^temperature must be finite and > 0, got -1.0"):
        OPS.token_logprobs_entropy(logits, labels, -1.0, -100, backend)
    with pytest.raises(ValueError, match="^temperature must be finite and > 0, got 0.0"):
        OPS.token_logprobs_entropy(logits, labels, 0.0, -100, backend)
    with pytest.raises(ValueError, match=r"label 10 at flattened position 1"):
        OPS.token_logprobs_entropy(logits, torch.tensor([0, 10, 2, 3], device=device), 1.0, -100, backend)
    with pytest.raises(ValueError, match=r"logits must be 2-D \[N, V\]"):
        OPS.token_logprobs_entropy(logits.view(2, 2, 10), labels.view(2, 2), 1.0, -100, backend)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        OPS.token_logprobs_entropy(logits, labels, 1.0, -100, "nope")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        OPS.linear_token_logprobs_entropy(hidden, weight, None, labels, 1.0, -100, backend, 0)


def test_fused_linear_with_an_empty_model_dimension_says_so(backend, device):
    with pytest.raises(ValueError, match=r"empty model dimension \(D = 0\)"):
        linear_token_logprobs_entropy(torch.randn(3, 0, device=device), torch.randn(7, 0, device=device),
                                      torch.tensor([0, 1, 2], device=device), backend=backend)
    with pytest.raises(ValueError, match=r"empty model dimension \(D = 0\)"):
        OPS.linear_token_logprobs_entropy(torch.randn(3, 0, device=device), torch.randn(7, 0, device=device), None,
                                          torch.tensor([0, 1, 2], device=device), 1.0, -100, backend, 4)


# ---- layouts: any view is computed, on every backend --------------------------------------------------------------

@pytest.mark.parametrize("layout", ["overlapping", "expanded", "strided", "transposed"])
def test_every_backend_computes_any_view_as_float64_does(backend, device, layout):
    base = torch.randn(40, 33, device=device)
    if layout == "overlapping":  # rows 5 elements apart, 33 wide: a sliding window over one buffer
        logits = base.reshape(-1).as_strided((30, 33), (5, 1))
    elif layout == "expanded":
        logits = base[:1].expand(6, 33)
    elif layout == "strided":
        logits = base[::2, ::3]
    else:
        logits = base.t()[:20]
    labels = torch.arange(logits.shape[0], device=device) % logits.shape[1]
    x = logits.detach().clone().requires_grad_(True)
    lp, h = token_logprobs_entropy(x if layout == "transposed" else logits.requires_grad_(False), labels,
                                   backend=backend)
    ref_lp, ref_h = reference_forward(logits.double().cpu(), labels.cpu())
    torch.testing.assert_close(lp.double().cpu(), ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.double().cpu(), ref_h, rtol=1e-6, atol=1e-6)


def test_inplace_backward_is_refused_on_a_leaf_and_on_a_view_of_one(backend, device):
    leaf = torch.randn(3, 11, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 2], device=device)
    for logits in (leaf, leaf.view(3, 11), leaf[1:]):
        with pytest.raises(RuntimeError, match="inplace_backward=True on logits that are \\(a view of\\) a leaf"):
            token_logprobs_entropy(logits, labels[: logits.shape[0]], inplace_backward=True, backend=backend)
    before = leaf.detach().clone()
    lp, _ = token_logprobs_entropy(leaf * 1.0, labels, inplace_backward=True, backend=backend)
    lp.sum().backward()
    assert torch.equal(leaf.detach(), before)  # the leaf keeps its values; its gradient is its own tensor
    assert leaf.grad.data_ptr() != leaf.data_ptr()


# ---- labels -------------------------------------------------------------------------------------------------------

def test_validate_labels_refuses_float_labels():
    with pytest.raises(TypeError, match="labels must have an integer dtype, got torch.float32"):
        validate_labels(torch.tensor([0.0, 1.0]), 5)
    with pytest.raises(ValueError, match="label 7 at flattened position 1"):
        validate_labels(torch.tensor([0, 7]), 5)


@pytest.mark.parametrize("bad", [torch.tensor([0.0, 1.0]), torch.tensor([True, False]), [0, 1]])
def test_labels_of_the_wrong_kind_are_typed_errors(backend, device, bad):
    bad = bad.to(device) if isinstance(bad, torch.Tensor) else bad
    with pytest.raises(TypeError, match="labels must"):
        token_logprobs_entropy(torch.randn(2, 5, device=device), bad, backend=backend)


# ---- torch.compile -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_dynamic_fullgraph_traces_a_symbolic_temperature():
    torch._dynamo.reset()

    def f(logits, labels, t):
        return sirl_kernels.token_logprobs_entropy(logits, labels, temperature=t)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    x, y = torch.randn(5, 33, requires_grad=True), torch.randint(0, 33, (5,))
    for t in (0.7, 1.3):  # one graph, two temperatures
        lp, h = compiled(x, y, t)
        want = f(x, y, t)
        torch.testing.assert_close(lp, want[0])
        torch.testing.assert_close(h, want[1])
        (lp.sum() + h.sum()).backward()
    with pytest.raises(ValueError, match="^temperature 1e-40 is outside"):  # checked when the op runs
        compiled(x, y, 1e-40)
