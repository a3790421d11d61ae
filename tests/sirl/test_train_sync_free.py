"""The trainer runs the kernels without their per-call token-id check: token ids are checked once per rollout,
every kernel call skips its own check (check_labels=False), and a NaN that the kernels then report stops training
loudly instead of reaching the weights."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

import sirl.passes as passes_mod  # noqa: E402
import sirl.train as train_mod  # noqa: E402
from sirl.config import load_config  # noqa: E402


def _config(out, **overrides):
    base = dict(steps=2, max_new_tokens=4, prompts_per_step=2, output_dir=str(out), progress=False,
                save_every=1000, kl_beta=0.001)
    return load_config(preset="tiny", overrides={**base, **overrides})


@pytest.mark.parametrize("reward_pass", ["auto", "separate"])
def test_ids_checked_once_per_rollout_and_never_per_kernel_call(tmp_path, monkeypatch, reward_pass):
    validations, kernel_checks = [], []
    real_validate, real_hf = train_mod.validate_labels, passes_mod.causal_lm_token_stats

    def validate(labels, vocab_size, *args, **kwargs):
        validations.append(vocab_size)
        return real_validate(labels, vocab_size, *args, **kwargs)

    def spy(real):
        def call(*args, **kwargs):
            kernel_checks.append(kwargs.get("check_labels", True))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(train_mod, "validate_labels", validate)
    monkeypatch.setattr(passes_mod, "causal_lm_token_stats", spy(real_hf))
    rows = train_mod.train(_config(tmp_path, reward_pass=reward_pass))
    assert len(rows) == 2 and len(validations) == 2  # one check per step's rollout
    assert kernel_checks and not any(kernel_checks), kernel_checks  # policy, score and reference passes


def test_a_nan_in_the_log_probs_stops_training_before_the_update(tmp_path, monkeypatch):
    real = passes_mod.causal_lm_token_stats

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        return dataclasses.replace(stats, logprobs=stats.logprobs * float("nan"))

    monkeypatch.setattr(passes_mod, "causal_lm_token_stats", poisoned)
    cfg = _config(tmp_path, lora=False)
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match="step 1: the gradient norm is nan"):
        train_mod.train(cfg)


def test_loss_statistics_are_read_once_per_pass_not_per_micro_batch(monkeypatch):
    """sirl_loss returns its statistics as 0-d tensors; policy_gradient_pass sums them on the device and reads
    them once after its micro-batches, and the loss normalisers once before them (two host reads in all)."""
    from contextlib import nullcontext

    from sirl.config import SIRLConfig
    from sirl.dist import Dist
    from sirl.models import tiny_random_llama, tiny_tokenizer
    from sirl.rollout import Rollout

    model = tiny_random_llama(tiny_tokenizer(), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (8, 10), generator=torch.Generator().manual_seed(0))
    comp = torch.zeros_like(ids)
    comp[:, 4:] = 1
    batch = Rollout(ids, torch.ones_like(ids), comp, torch.zeros(8, dtype=torch.bool), torch.arange(8) // 4, 4)
    old, _ = passes_mod.token_logprobs_entropy(model, batch, 1.0, 1000)
    reads = {"item": 0, "tolist": 0}
    for name in reads:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _real=real, **kwargs):
            reads[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = SIRLConfig(micro_batch_tokens=20, kl_beta=0.1)  # 2 rows of 10 tokens each: 4 micro-batches
    stats = passes_mod.policy_gradient_pass(model, batch, old - 0.3 * comp, old + 0.1 * comp,
                                            torch.linspace(-1, 1, 8), comp.bool(), cfg, Dist(), nullcontext())
    assert reads == {"item": 0, "tolist": 2}, reads
    assert stats["clip_frac"] > 0 and stats["kl"] > 0 and isinstance(stats["loss"], float)
