import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from sirl.models import tiny_random_llama, tiny_tokenizer  # noqa: E402
from sirl.reference import Reference, reference_logprobs  # noqa: E402
from sirl.rollout import Rollout  # noqa: E402
from sirl.passes import token_logprobs_entropy  # noqa: E402


def toy_rollout(V):
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(0))
    comp = torch.zeros_like(ids)
    comp[:, 4:] = 1
    return Rollout(ids, torch.ones_like(ids), comp, torch.zeros(3, dtype=torch.bool), torch.zeros(3), 4)


def test_lora_reference_equals_the_base_model():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    tok = tiny_tokenizer()
    base = tiny_random_llama(tok)
    r = toy_rollout(base.config.vocab_size)
    base_lp, _ = token_logprobs_entropy(base, r, 1.0, 1000)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = peft.get_peft_model(base, cfg)
    policy_lp, _ = token_logprobs_entropy(policy, r, 1.0, 1000)
    assert not torch.allclose(policy_lp, base_lp)  # the adapter is live
    ref = Reference(policy)
    assert ref.frozen is None  # no copy with LoRA
    torch.testing.assert_close(reference_logprobs(ref, policy, r, 1.0, 1000), base_lp)
    torch.testing.assert_close(token_logprobs_entropy(policy, r, 1.0, 1000)[0], policy_lp)  # adapters back on


def test_full_finetune_reference_is_a_frozen_copy():
    tok = tiny_tokenizer()
    policy = tiny_random_llama(tok)
    r = toy_rollout(policy.config.vocab_size)
    before, _ = token_logprobs_entropy(policy, r, 1.0, 1000)
    ref = Reference(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05)
    assert not torch.allclose(token_logprobs_entropy(policy, r, 1.0, 1000)[0], before)
    torch.testing.assert_close(reference_logprobs(ref, policy, r, 1.0, 1000), before)
    assert not any(p.requires_grad for p in ref.frozen.parameters())
