"""Trainer options that change how the loss pass runs must not change what it computes.

Gradient checkpointing and torch.compile of the decoder body are checked against the plain pass on the same
rollout (same gradients); bf16 autocast is CUDA-only and is covered by the GPU suite when a GPU is present.
"""

import math
from contextlib import nullcontext

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from sirl.advantage import group_advantages  # noqa: E402
from sirl.config import load_config  # noqa: E402
from sirl.data import encode_prompt, load_prompts  # noqa: E402
from sirl.build import build  # noqa: E402
from sirl.dist import Dist  # noqa: E402
from sirl.knobs import ConfigError  # noqa: E402
from sirl.train import train  # noqa: E402
from sirl.passes import policy_gradient_pass, token_logprobs_entropy  # noqa: E402
from sirl.rollout import rollout  # noqa: E402


def _config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), progress=False, kl_beta=0.0, max_new_tokens=6, prompts_per_step=2)
    return load_config(preset="tiny", overrides={**base, **overrides})


def _built_and_rolled_out(cfg):
    """The trainer's model and reference, and one rollout of the first prompts, from fixed seeds."""
    torch.manual_seed(0)
    run = build(cfg, Dist(), load_prompts(cfg.prompts))
    policy, tokenizer, reference, stream = run.policy, run.tokenizer, run.reference, run.stream
    prompts = [encode_prompt(tokenizer, stream.prompts[i], None, 64) for i in range(cfg.prompts_per_step)]
    torch.manual_seed(1)
    batch = rollout(policy, tokenizer, prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                    temperature=1.0, top_p=1.0, top_k=0)
    return policy, reference, batch


def _gradients(cfg):
    """One rollout + policy-gradient pass from a fixed seed; returns {name: grad} of the trainable parameters."""
    policy, _, batch = _built_and_rolled_out(cfg)
    old_logprobs, entropy = token_logprobs_entropy(policy, batch, 1.0, cfg.micro_batch_tokens)
    rewards = -(entropy.sum(-1) / batch.completion_mask.sum(-1).clamp_min(1))
    advantages, _ = group_advantages(rewards, cfg.group_size, scale="group", min_std=1e-4)
    loss_mask = batch.completion_mask.bool()
    policy.train()
    policy_gradient_pass(policy, batch, old_logprobs, None, advantages, loss_mask, cfg, Dist(), nullcontext())
    return {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    assert any(g.abs().sum() > 0 for g in a.values())
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, lora):
    plain = _gradients(_config(tmp_path / "a", lora=lora))
    ckpt = _gradients(_config(tmp_path / "b", lora=lora, gradient_checkpointing=True))
    _assert_same(plain, ckpt)


@pytest.mark.slow
def test_compiled_decoder_gives_the_same_gradients(tmp_path):
    plain = _gradients(_config(tmp_path / "a"))
    compiled = _gradients(_config(tmp_path / "b", compile=True))
    _assert_same(plain, compiled)


@pytest.mark.parametrize("options", [dict(), dict(truncation="mask", max_new_tokens=3), dict(micro_batch_tokens=40),
                                     dict(truncation="penalize", max_new_tokens=3, advantage_scale="none")])
def test_reward_from_the_training_forward_equals_a_separate_scoring_pass(tmp_path, options):
    """On-policy, the loss pass's own entropies and log-probs give the same rewards, advantages and gradients as a
    no-grad scoring pass before it (micro-batches of whole groups; micro_batch_tokens=40 forces several).

    The two passes see different micro-batches, so their fp32 matmuls may round differently (they do on AMD Zen 4
    with micro_batch_tokens=40: 4.8e-7 in the rewards), and a group's standardisation divides that by its std.
    So: the rewards agree to the rounding bound of the model's fp32 forward; the advantages to what that reward
    difference becomes after standardisation; and the gradients, given the same advantages, tightly."""
    from sirl.reference import reference_logprobs
    from sirl.scoring import ScoreInLoss, Scoring, valid_rows

    cfg = _config(tmp_path, lora=True, kl_beta=0.05, **options)

    def run(mode, advantages=None):
        policy, reference, batch = _built_and_rolled_out(cfg)
        with torch.no_grad():  # a trained-looking adapter, so the reference differs from the policy
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        ref = reference_logprobs(reference, policy, batch, 1.0, cfg.micro_batch_tokens)
        loss_mask = batch.completion_mask.bool() & valid_rows(batch.truncated, cfg.truncation)[:, None]
        policy.train()
        if mode == "separate":
            old, entropy = token_logprobs_entropy(policy, batch, 1.0, cfg.micro_batch_tokens)
            scores = Scoring.of(cfg)(batch, entropy, old)
            stats = policy_gradient_pass(policy, batch, old, ref, scores.advantages if advantages is None
                                         else advantages, loss_mask, cfg, Dist(), nullcontext())
        else:
            scorer = ScoreInLoss(Scoring.of(cfg), batch)
            stats = policy_gradient_pass(policy, batch, None, ref, None, loss_mask, cfg, Dist(), nullcontext(),
                                         score_in_loss=scorer)
            scores = scorer.scores
        grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        with torch.no_grad():
            logit_scale = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.abs().max()
        return scores, stats, grads, policy, logit_scale.item()

    loss, loss_stats, loss_grads, policy, logit_scale = run("loss")
    separate, separate_stats, *_ = run("separate")
    # Rewards: minus mean entropies of the same logits z. Each fp32 matmul of the forward (about 10 in a row, of
    # length <= 2 * hidden) rounds to within 2 * hidden * u relatively, so |dz| <= 10 * 2 * hidden * u * max|z|,
    # and |dH| <= max|dz| * sum_i p_i |log p_i + H| <= max|dz| * log V.
    hidden, vocab = policy.config.hidden_size, policy.config.vocab_size
    u = torch.finfo(torch.float32).eps / 2
    reward_tol = 10 * 2 * hidden * u * logit_scale * math.log(vocab)
    torch.testing.assert_close(separate.entropy, loss.entropy, rtol=0, atol=reward_tol)
    delta = (separate.rewards - loss.rewards).abs().max().item()
    assert delta <= reward_tol
    # Advantages (r - mean) / std: a reward error delta moves the numerator by <= 2 delta and the std by <= 2 delta,
    # so A by <= delta (2 + 2 |A|) / std (std 1 when not scaled), plus the fp32 rounding of A itself.
    std = (torch.ones_like(loss.group_std) if cfg.advantage_scale == "none"
           else loss.group_std.clamp_min(cfg.advantage_min_std)).repeat_interleave(cfg.group_size)
    bound = delta * (2 + 2 * loss.advantages.abs()) / std + 8 * u * (1 + loss.advantages.abs())
    assert ((separate.advantages - loss.advantages).abs() <= bound).all(), (separate.advantages, loss.advantages)
    assert separate.group_std.shape == loss.group_std.shape
    # Gradients, given the same advantages: only the loss pass's own rounding may differ.
    _, same_stats, same_grads, *_ = run("separate", advantages=loss.advantages)
    assert same_stats["clip_frac"] == loss_stats["clip_frac"] == separate_stats["clip_frac"] == 0.0
    assert same_stats["kl"] == pytest.approx(loss_stats["kl"], rel=1e-4)
    assert same_stats["loss"] == pytest.approx(loss_stats["loss"], rel=1e-3, abs=1e-6)
    _assert_same(same_grads, loss_grads)


def _tiny_with_attention_dropout(monkeypatch, p=0.1):
    """The tiny Llama with attention dropout in its config and its attention layers (as HF builds it from one)."""
    import sirl.models

    real = sirl.models.tiny_random_llama

    def built(*args, **kwargs):
        model = real(*args, **kwargs)
        model.config.attention_dropout = p
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = p
        return model

    monkeypatch.setattr(sirl.models, "tiny_random_llama", built)


def test_active_dropout_names_what_makes_the_training_forward_random(monkeypatch):
    from sirl.models import active_dropout, add_lora, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny-random-llama", device=torch.device("cpu"))
    assert active_dropout(model) is None
    model.model.layers[0].mlp.act_fn = torch.nn.Sequential(model.model.layers[0].mlp.act_fn, torch.nn.Dropout(0.0))
    assert active_dropout(model) is None  # p = 0 is no dropout
    assert active_dropout(add_lora(model, 4, 8, 0.1, ["q_proj"])) == (
        "dropout p=0.1 in base_model.model.model.layers.0.self_attn.q_proj.lora_dropout.default")
    _tiny_with_attention_dropout(monkeypatch)
    model, _ = load_model_and_tokenizer("tiny-random-llama", device=torch.device("cpu"))
    assert active_dropout(model) == "the model config's attention_dropout=0.1"


def test_dropout_in_the_model_keeps_the_reward_out_of_the_training_forward(tmp_path, monkeypatch, capsys):
    """The loss pass runs in train mode: with dropout active there, auto scores in the separate (eval-mode) pass
    and says so; an explicit reward_pass=loss is refused with a one-line error."""
    import sirl.train as train_mod
    from sirl.config import ConfigError

    _tiny_with_attention_dropout(monkeypatch)
    base = dict(steps=1, max_new_tokens=4, prompts_per_step=2, progress=False, save_every=1000, kl_beta=0.0)
    rows = train_mod.train(load_config(preset="tiny", overrides={**base, "output_dir": str(tmp_path / "auto")}))
    assert rows[0]["time/score_s"] > 0 and rows[0]["time/score_tokens_per_s"] > 0  # the separate pass ran
    assert ("reward_pass=auto: the rewards come from a separate no-grad pass (the model config's "
            "attention_dropout=0.1 is active in the training forward)") in capsys.readouterr().out
    loss = load_config(preset="tiny", overrides={**base, "output_dir": str(tmp_path / "loss"), "reward_pass": "loss"})
    with pytest.raises(ConfigError, match=r"^reward_pass=loss: not with the model config's attention_dropout=0.1 "
                                          r"\(the training forward is not the sampling policy\); use "
                                          r"reward_pass=separate or auto$"):
        train_mod.train(loss)


@pytest.mark.parametrize("in_loss", [False, True], ids=["scoring-pass", "training-forward"])
def test_self_certainty_reward_is_the_mean_kl_from_uniform(tmp_path, in_loss):
    """reward=self_certainty (Intuitor): each completion's reward is the mean over its tokens of KL(U || p) =
    lse(z) - mean(z) - log V of the distribution that produced the token, from a no-grad scoring pass or from the
    training forward; varentropy comes with it as a metric, and DeepConf's top-k confidence when asked for. Against
    float64 statistics of the same hidden states."""
    from sirl.passes import token_statistics
    from sirl.scoring import ScoreInLoss, Scoring
    from sirl_kernels.hf import final_hidden_states, output_head, unwrap_model

    cfg = _config(tmp_path, reward="self_certainty", confidence_top_k=5)
    scoring = Scoring.of(cfg)
    assert scoring.extra_statistics == ("self_certainty", "varentropy", "top_k_confidence")
    policy, _, batch = _built_and_rolled_out(cfg)
    with torch.no_grad():
        weight, bias = output_head(unwrap_model(policy))
        z = final_hidden_states(policy, batch.input_ids, batch.attention_mask).double() @ weight.double().T
        z = z if bias is None else z + bias.double()
    z = z[:, :-1]  # row t - 1 produced token t
    logp = torch.log_softmax(z, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    per_token = {
        "self_certainty": torch.logsumexp(z, -1) - z.mean(-1) - math.log(z.shape[-1]),
        "varentropy": (logp.exp() * (logp + entropy[..., None]) ** 2).sum(-1),
        "top_k_confidence": -logp.topk(5, dim=-1).values.mean(-1),
    }
    mask = batch.completion_mask[:, 1:].double()
    if in_loss:
        score_in_loss = ScoreInLoss(scoring, batch)
        policy.train()
        policy_gradient_pass(policy, batch, None, None, None, batch.completion_mask.bool(), cfg, Dist(),
                             nullcontext(), score_in_loss=score_in_loss)
        scores = score_in_loss.scores
    else:
        stats = token_statistics(policy, batch, 1.0, cfg.micro_batch_tokens, extra=scoring.extra_statistics,
                                 confidence_k=scoring.confidence_k)
        scores = scoring(batch, stats.pop("entropy"), stats.pop("logprobs"), extra=stats)
    # fp32 kernels on the same hidden states: 64 ulp of |statistic| + log V + the rows' spread of z (varentropy,
    # E[d^2] - E[d]^2 in the kernels, rounds at the square of that scale)
    bound = math.log(z.shape[-1]) + (z.amax(-1) - z.amin(-1)).max().item() + 1
    eps = torch.finfo(torch.float32).eps
    tol = {"self_certainty": 64 * eps * bound, "varentropy": 64 * eps * bound ** 2, "top_k_confidence": 64 * eps * bound}
    for name, ref in per_token.items():
        err = (scores.extra[name][:, 1:].double() - ref).abs() * mask
        assert err.max().item() <= tol[name] * (1 + (ref * mask).abs().max().item()), name
    expected = (per_token["self_certainty"] * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    reward_tol = tol["self_certainty"] * (1 + expected.abs().max().item())
    torch.testing.assert_close(scores.rewards.double(), expected, rtol=0, atol=reward_tol)
    assert (scores.rewards > 0).all()  # a KL: confident answers score higher, never below 0


def test_logprob_support_sampler_scores_the_truncated_distribution(tmp_path):
    """logprob_support=sampler: the scoring pass's log-probs and entropies are those of the distribution the
    sampler drew from (top_k, then top_p, renormalised), against float64 over the full logits; the sampled tokens
    are all in that support (finite log-probs); a 2-step run trains; top_k=0 is refused by name."""
    from sirl.passes import logprob_support, token_statistics
    from sirl_kernels.hf import final_hidden_states, output_head, unwrap_model

    cfg = _config(tmp_path, logprob_support="sampler", top_k=5, top_p=0.8)
    torch.manual_seed(0)
    run = build(cfg, Dist(), load_prompts(cfg.prompts))
    policy = run.policy
    prompts = [encode_prompt(run.tokenizer, run.stream.prompts[i], None, 64) for i in range(cfg.prompts_per_step)]
    torch.manual_seed(2)
    batch = rollout(policy, run.tokenizer, prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                    temperature=1.0, top_p=cfg.top_p, top_k=cfg.top_k)
    stats = token_statistics(policy, batch, 1.0, cfg.micro_batch_tokens, support=logprob_support(cfg))
    with torch.no_grad():
        weight, bias = output_head(unwrap_model(policy))
        z = final_hidden_states(policy, batch.input_ids, batch.attention_mask).double() @ weight.double().T
        z = (z if bias is None else z + bias.double())[:, :-1]
    order = torch.sort(-z, dim=-1, stable=True).indices[..., : cfg.top_k]
    zs = z.gather(-1, order)
    p = torch.softmax(zs, -1)
    keep = (p.cumsum(-1) - p) < cfg.top_p
    keep[..., 0] = True
    logp = torch.log_softmax(torch.where(keep, zs, -math.inf), -1)
    entropy = -torch.where(keep, logp.exp() * torch.where(keep, logp, 0.0), 0.0).sum(-1)
    tokens = batch.input_ids[:, 1:]
    hit = (order == tokens[..., None]) & keep
    lp = logp.gather(-1, hit.int().argmax(-1, keepdim=True)).squeeze(-1)
    mask = batch.completion_mask[:, 1:].bool()
    assert hit.any(-1)[mask].all()  # every sampled token lies in the support the trainer scores
    tol = 64 * torch.finfo(torch.float32).eps * (math.log(cfg.top_k) + 1 + (zs[..., 0] - zs[..., -1]).max().item())
    assert (stats["logprobs"][:, 1:].double() - lp).abs()[mask].max().item() <= tol * (1 + lp.abs()[mask].max().item())
    assert (stats["entropy"][:, 1:].double() - entropy).abs()[mask].max().item() <= tol * 2
    rows = train(_config(tmp_path / "run", logprob_support="sampler", top_k=5, top_p=0.8, steps=2))
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    with pytest.raises(ConfigError, match="logprob_support=sampler with top_k=0"):
        _config(tmp_path / "bad", logprob_support="sampler")
