import math

import pytest
import torch

from sirl.loss import aggregate, clipped_surrogate, kl_penalty, sirl_loss


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0]])
    loss, clipped = clipped_surrogate(new, old, adv, eps_low=0.2, eps_high=0.3)
    # ratio 1 -> -2; ratio 1.5 (A>0) clipped to 1.3 -> -2.6; ratio 0.5 (A<0) clipped to 0.8 -> 0.8; 1.1 -> 1.1
    torch.testing.assert_close(loss, torch.tensor([[-2.0, -2.6, 0.8, 1.1]]))
    assert clipped.tolist() == [[False, True, True, False]]
    # the gradient vanishes exactly where clipping is active
    new.requires_grad_(True)
    clipped_surrogate(new, old, adv, eps_low=0.2, eps_high=0.3)[0].sum().backward()
    g = new.grad[0]
    assert g[1] == 0 and g[2] == 0
    torch.testing.assert_close(g[[0, 3]], torch.tensor([-2.0 * 1.0, 1.0 * 1.1]))


def test_log_ratio_clamp():
    loss, _ = clipped_surrogate(torch.tensor([[100.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]),
                                log_ratio_clamp=5.0)
    torch.testing.assert_close(loss, torch.tensor([[math.exp(5.0)]]))


def test_kl_estimators_hand_computed():
    new, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = ref - new  # [-0.5, 1.0]
    torch.testing.assert_close(kl_penalty(new, ref, "k1"), -d)
    torch.testing.assert_close(kl_penalty(new, ref, "k2"), 0.5 * d ** 2)
    torch.testing.assert_close(kl_penalty(new, ref, "k3"), d.exp() - d - 1)
    torch.testing.assert_close(kl_penalty(torch.tensor([0.0]), torch.tensor([50.0]), "k3", clamp=2.0),
                               torch.tensor([math.exp(2.0) - 3.0]))
    with pytest.raises(ValueError):
        kl_penalty(new, ref, "k4")


def test_k3_is_unbiased_for_the_true_kl():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum()
    expected_k3 = (p * kl_penalty(p.log(), q.log(), "k3")).sum()
    torch.testing.assert_close(expected_k3, true_kl)


def test_aggregation_modes_hand_computed():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    norm = dict(total_tokens=4, total_sequences=2, max_completion_tokens=3)
    assert aggregate(v, m, "token-mean", **norm).item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "seq-mean", **norm).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, m, "constant", **norm).item() == pytest.approx(10 / 6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean", "constant"])
def test_micro_batch_shares_add_up_to_the_batch_loss(mode):
    g = torch.Generator().manual_seed(0)
    new, old, ref = (torch.randn(6, 5, generator=g) * 0.1 for _ in range(3))
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    kw = dict(eps_low=0.2, eps_high=0.28, log_ratio_clamp=20.0, kl_beta=0.1, kl_estimator="k3", kl_clamp=10.0,
              aggregation=mode, total_tokens=mask.sum().item(), total_sequences=6, max_completion_tokens=5)
    whole, _ = sirl_loss(new, old, ref, adv, mask, **kw)
    parts = sum(sirl_loss(new[s], old[s], ref[s], adv[s], mask[s], **kw)[0] for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, whole)
    # and the whole equals a direct float64 computation for token-mean
    if mode == "token-mean":
        ratio = (new - old).double().exp()
        a = adv.double()[:, None]
        pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        d = (ref - new).double()
        tok = pg + 0.1 * (d.exp() - d - 1)
        torch.testing.assert_close(whole.double(), (tok * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


def test_on_policy_gradient_is_the_reinforce_gradient():
    """At ratio 1 the surrogate's gradient is -A * grad log pi, averaged over tokens."""
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    mask = torch.ones(2, 2)
    loss, stats = sirl_loss(lp, lp.detach(), None, adv, mask, eps_low=0.2, eps_high=0.2, log_ratio_clamp=20.0,
                            kl_beta=0.0, kl_estimator="k3", kl_clamp=10.0, aggregation="token-mean",
                            total_tokens=4, total_sequences=2, max_completion_tokens=2)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv[:, None].expand(2, 2) / 4)
    assert stats["clipped_tokens"] == 0 and stats["kl_sum"] == 0.0


def test_tokens_outside_the_trainers_support_leave_the_loss_without_nan():
    """A sampled token whose trainer log-prob is -inf (outside the sampler support the trainer computes) has no
    ratio: the loss and every gradient stay finite, equal to the loss with that token masked out, and the token is
    counted. Before, -inf - -inf made the whole batch's loss NaN."""
    inf = math.inf
    new = torch.tensor([[-1.0, -inf, -0.3], [-0.5, -0.7, -inf]], requires_grad=True)
    old = torch.tensor([[-1.1, -inf, -0.2], [-0.4, -inf, -2.0]])
    ref = torch.tensor([[-1.0, -inf, -0.5], [-0.6, -0.9, -inf]])
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the last token is padding: not counted
    kwargs = dict(eps_low=0.2, eps_high=0.2, log_ratio_clamp=20.0, kl_beta=0.1, kl_estimator="k3", kl_clamp=10.0,
                  aggregation="token-mean", total_tokens=5, total_sequences=2, max_completion_tokens=3)
    loss, stats = sirl_loss(new, old, ref, adv, mask, **kwargs)
    loss.backward()
    assert math.isfinite(float(loss)) and bool(torch.isfinite(new.grad).all())
    assert int(stats["outside_support"]) == 2 and int(stats["tokens"]) == 3
    kept = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    finite = lambda t: torch.where(kept.bool(), t, 0.0)  # noqa: E731
    new2 = finite(new.detach()).requires_grad_(True)
    expected, _ = sirl_loss(new2, finite(old), finite(ref), adv, kept, **kwargs)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(new.grad, new2.grad, rtol=0, atol=0)
