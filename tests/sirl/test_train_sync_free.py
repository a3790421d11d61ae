"""The trainer runs the kernels on their sync-free path: token ids are checked once per rollout, every kernel
call skips its own check (check_labels=False), and a NaN that the kernels then report stops training loudly
instead of reaching the weights."""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

import sirl.score as score_mod  # noqa: E402
import sirl.train as train_mod  # noqa: E402
from sirl.config import load_config  # noqa: E402


def _config(out, **overrides):
    base = dict(steps=2, max_new_tokens=4, prompts_per_step=2, output_dir=str(out), progress=False,
                save_every=1000, kl_beta=0.001)
    return load_config(preset="tiny", overrides={**base, **overrides})


@pytest.mark.parametrize("reward_pass", ["auto", "separate"])
def test_ids_checked_once_per_rollout_and_never_per_kernel_call(tmp_path, monkeypatch, reward_pass):
    validations, kernel_checks = [], []
    real_validate, real_hf = train_mod.validate_labels, train_mod.causal_lm_token_logprobs_entropy
    real_score = score_mod.causal_lm_token_logprobs_entropy

    def validate(labels, vocab_size, *args, **kwargs):
        validations.append(vocab_size)
        return real_validate(labels, vocab_size, *args, **kwargs)

    def spy(real):
        def call(*args, **kwargs):
            kernel_checks.append(kwargs.get("check_labels", True))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(train_mod, "validate_labels", validate)
    monkeypatch.setattr(train_mod, "causal_lm_token_logprobs_entropy", spy(real_hf))
    monkeypatch.setattr(score_mod, "causal_lm_token_logprobs_entropy", spy(real_score))
    rows = train_mod.train(_config(tmp_path, reward_pass=reward_pass))
    assert len(rows) == 2 and len(validations) == 2  # one check per step's rollout
    assert kernel_checks and not any(kernel_checks), kernel_checks  # policy, score and reference passes


def test_a_nan_in_the_log_probs_stops_training_before_the_update(tmp_path, monkeypatch):
    real = train_mod.causal_lm_token_logprobs_entropy

    def poisoned(*args, **kwargs):
        logprobs, entropy = real(*args, **kwargs)
        return logprobs * float("nan"), entropy

    monkeypatch.setattr(train_mod, "causal_lm_token_logprobs_entropy", poisoned)
    cfg = _config(tmp_path, lora=False)
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match="step 1: the gradient norm is nan"):
        train_mod.train(cfg)
