"""sirl_kernels.hf against the HF model's own logits and `labels` loss on tiny random models (float64 refs)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from sirl_kernels.hf import causal_lm_token_logprobs_entropy, sirl_reward  # noqa: E402

VOCAB = 97


def tiny_llama(tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()


def reference_from_logits(logits, input_ids, completion_mask, temperature=1.0):
    """float64 reference written with the full logits: value at t from row t-1."""
    z = logits.double()[:, :-1] / temperature
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    mask = completion_mask[:, 1:].bool()
    out_lp = torch.zeros(input_ids.shape, dtype=torch.float64)
    out_ent = torch.zeros(input_ids.shape, dtype=torch.float64)
    out_lp[:, 1:] = torch.where(mask, lp, 0.0)
    out_ent[:, 1:] = torch.where(mask, ent, 0.0)
    return out_lp, out_ent


def batch(seed=1, b=3, t=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    comp = torch.zeros(b, t, dtype=torch.long)
    comp[:, 5:] = 1
    if b > 1:
        comp[1, 9:] = 0  # a shorter completion
    return ids, attn, comp


def test_alignment_matches_hf_labels_loss():
    model = tiny_llama()
    ids, attn, comp = batch()
    labels = torch.where(comp.bool(), ids, torch.full_like(ids, -100))
    with torch.no_grad():
        hf_loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        lp, ent = causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    ours = -(lp.sum() / comp[:, 1:].sum())
    torch.testing.assert_close(ours, hf_loss, rtol=1e-5, atol=1e-5)
    assert lp[:, 0].eq(0).all() and ent[:, 0].eq(0).all()
    assert lp[~comp.bool()].eq(0).all() and ent[~comp.bool()].eq(0).all()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64_reference(tie, temperature):
    model = tiny_llama(tie=tie)
    if tie:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids, attn, comp = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        lp, ent = causal_lm_token_logprobs_entropy(model, ids, attn, comp, temperature=temperature)
    ref_lp, ref_ent = reference_from_logits(logits, ids, comp, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_left_padding_uses_generate_positions():
    """A left-padded row scores exactly like the same row without padding."""
    model = tiny_llama()
    ids, attn, comp = batch(b=1, t=9)
    pad = 3
    ids_p = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
    attn_p = torch.cat([torch.zeros(1, pad, dtype=torch.long), attn], 1)
    comp_p = torch.cat([torch.zeros(1, pad, dtype=torch.long), comp], 1)
    with torch.no_grad():
        lp, ent = causal_lm_token_logprobs_entropy(model, ids, attn, comp)
        lp_p, ent_p = causal_lm_token_logprobs_entropy(model, ids_p, attn_p, comp_p)
    torch.testing.assert_close(lp_p[:, pad:], lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_p[:, pad:], ent, rtol=1e-5, atol=1e-5)


def test_gradients_match_full_logits_path():
    model = tiny_llama(tie=True).train()
    ids, attn, comp = batch()
    lp, ent = causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    (lp.sum() + 0.3 * ent.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attn).logits
    rlp, rent = reference_from_logits(logits, ids, comp)  # float64, differentiable
    (rlp.sum() + 0.3 * rent.sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_sirl_reward_is_minus_mean_completion_entropy():
    model = tiny_llama()
    ids, attn, comp = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        reward = sirl_reward(model, ids, attn, comp)
    _, ref_ent = reference_from_logits(logits, ids, comp)
    n = comp[:, 1:].sum(-1).double()
    torch.testing.assert_close(reward.double(), -ref_ent.sum(-1) / n, rtol=1e-5, atol=1e-6)


def test_peft_model_uses_active_adapters():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg).eval()
    ids, attn, comp = batch()
    with torch.no_grad():
        lp, ent = causal_lm_token_logprobs_entropy(pm, ids, attn, comp)
        ref_lp, ref_ent = reference_from_logits(pm(input_ids=ids, attention_mask=attn).logits, ids, comp)
        with pm.disable_adapter():
            lp_off, _ = causal_lm_token_logprobs_entropy(pm, ids, attn, comp)
            base_lp, _ = reference_from_logits(pm(input_ids=ids, attention_mask=attn).logits, ids, comp)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_off.double(), base_lp, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lp, lp_off)  # the adapter (non-zero init) really changes the output


def test_logit_scale_is_folded_into_temperature():
    torch.manual_seed(0)
    config = transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, logit_scale=0.25, max_position_embeddings=64,
    )
    model = transformers.CohereForCausalLM(config).eval()
    ids, attn, comp = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        lp, ent = causal_lm_token_logprobs_entropy(model, ids, attn, comp, temperature=0.5)
    ref_lp, ref_ent = reference_from_logits(logits, ids, comp, 0.5)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_final_logit_softcapping_raises():
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
    )
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids, attn, comp = batch()
    with pytest.raises(NotImplementedError, match="softcapping"):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sirl_reward_three_line_recipe(temperature):
    """The documented custom-loop recipe: one reward per sequence, minus the mean over the generated tokens of the
    entropy of the distribution that produced each (at the sampling temperature), and the LM head never runs."""
    model = tiny_llama(tie=True)
    ids, attn, comp = batch(b=4)
    attn[3, :2] = 0  # a left-padded prompt
    comp[2] = 0  # no generated token: reward 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
    _, ref_ent = reference_from_logits(logits, ids, comp, temperature)
    n = comp[:, 1:].sum(-1).double()
    expected = -ref_ent.sum(-1) / n.clamp_min(1)

    def no_logits(module, args):
        raise AssertionError("sirl_reward must not run the LM head")

    model.get_output_embeddings().register_forward_pre_hook(no_logits)
    with torch.no_grad():
        rewards = sirl_reward(model, ids, attn, comp, temperature=temperature)
    assert rewards.shape == (4,) and rewards.dtype == torch.float32
    assert rewards[2] == 0
    torch.testing.assert_close(rewards.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(rewards).all() and (rewards[[0, 1, 3]] < 0).all()
