"""A training step logs the metrics its scoring computes besides the reward: varentropy_mean always and
top_k_confidence_mean with confidence_top_k, in the rows train() returns and in metrics.jsonl, equal to a float64
recomputation from the step's own hidden states (the rollout and weights the step scored)."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

import sirl.train as train_mod  # noqa: E402
from sirl.config import load_config  # noqa: E402
from sirl_kernels.hf import final_hidden_states, model_logit_temperature, output_head, unwrap_model  # noqa: E402

K = 5


@pytest.mark.parametrize("reward_pass", ["separate", "loss"])
def test_a_step_logs_varentropy_and_top_k_confidence(tmp_path, monkeypatch, reward_pass):
    """One step of the tiny random model, the rewards from a no-grad scoring pass or from the training forward.
    The float64 reference is taken when the step's loss pass starts, so from the weights that scored the rollout
    (both the scoring pass and the training forward run before the optimizer step, and the tiny model has no
    dropout): per token Var_p[log p] and -mean of the K largest log p of softmax(z / T), then averaged as the
    metric is, over each completion's tokens, then over the completions."""
    seen = {}
    original = train_mod.policy_gradient_pass

    def recording_pass(scorer, batch, *args, **kwargs):
        if "ref" not in seen:
            cfg = args[4]
            model = unwrap_model(getattr(scorer, "model", scorer))
            with torch.no_grad():
                weight, bias = output_head(model)
                z = final_hidden_states(model, batch.input_ids, batch.attention_mask).double() @ weight.double().T
                z = (z if bias is None else z + bias.double()) / model_logit_temperature(model.config, cfg.temperature)
            z = z[:, :-1]  # row t - 1 produced token t
            logp = torch.log_softmax(z, -1)
            entropy = -(logp.exp() * logp).sum(-1)
            seen["ref"] = {"varentropy": (logp.exp() * (logp + entropy[..., None]) ** 2).sum(-1),
                           "top_k_confidence": -logp.topk(K, dim=-1).values.mean(-1)}
            seen["z"], seen["mask"] = z, batch.completion_mask[:, 1:].double()
        return original(scorer, batch, *args, **kwargs)

    monkeypatch.setattr(train_mod, "policy_gradient_pass", recording_pass)
    overrides = dict(output_dir=str(tmp_path), progress=False, kl_beta=0.0, max_new_tokens=6, prompts_per_step=2,
                     steps=1, confidence_top_k=K, reward_pass=reward_pass, eval_every=0)
    cfg = load_config(preset="tiny", overrides=overrides)
    torch.manual_seed(0)
    rows = train_mod.train(cfg)
    step = [r for r in rows if "reward_mean" in r]
    assert len(step) == 1
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if r.get("step") == 1 and "reward_mean" in r]
    assert len(logged) == 1

    z, mask = seen["z"], seen["mask"]
    assert mask.sum() > 0
    eps = torch.finfo(torch.float32).eps
    # Per token, the fp32 kernels on the same hidden states round to 64 ulp of |statistic| + log V + the rows'
    # spread of z (varentropy, E[d^2] - E[d]^2 in the kernels, at the square of that scale); the top-k confidence
    # is log_softmax's own log-probs, within the same bound. The metric averages them, which cannot grow that
    # error, and sums in fp32: at most T terms per completion, then N completions, one division each: (T + N + 2)
    # ulp of the largest value more.
    bound = math.log(z.shape[-1]) + (z.amax(-1) - z.amin(-1)).max().item() + 1
    scale = {"varentropy": bound ** 2, "top_k_confidence": bound}
    for name, per_token in seen["ref"].items():
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        want = per_seq.mean().item()
        largest = (per_token * mask).abs().max().item()
        tol = 64 * eps * (largest + scale[name]) + (z.shape[1] + z.shape[0] + 2) * eps * largest
        for row in (step[0], logged[0]):
            got = row[f"{name}_mean"]
            assert math.isfinite(got) and abs(got - want) <= tol, (name, got, want, tol)
    # and the ranges the definitions give: a variance; -mean of the K largest log-probs >= log K (their
    # probabilities sum to at most 1, so their mean log is at most log(1 / K))
    assert step[0]["varentropy_mean"] >= 0
    assert step[0]["top_k_confidence_mean"] >= math.log(K) - 64 * eps * bound
