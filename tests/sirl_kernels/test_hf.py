"""sirl_kernels.hf against the HF model's own logits and `labels` loss on tiny random models (float64 refs), and
the logits check that makes it fail closed on models that transform their logits after lm_head."""

from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import sirl_kernels.hf as sirl_hf  # noqa: E402
from sirl_kernels.hf import (  # noqa: E402
    VERIFY_ENV,
    causal_lm_token_logprobs_entropy,
    clear_logits_verdicts,
    sirl_reward,
    verify_model_logits,
)

VOCAB = 97


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Every test sees the logits check as a new process would: no cached verdict, no opt-out."""
    monkeypatch.delenv(VERIFY_ENV, raising=False)
    clear_logits_verdicts()
    yield
    clear_logits_verdicts()


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

    verify_model_logits(model, ids, attn)  # the once-per-process check runs the LM head on one position
    model.get_output_embeddings().register_forward_pre_hook(no_logits)
    with torch.no_grad():
        rewards = sirl_reward(model, ids, attn, comp, temperature=temperature)
    assert rewards.shape == (4,) and rewards.dtype == torch.float32
    assert rewards[2] == 0
    torch.testing.assert_close(rewards.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(rewards).all() and (rewards[[0, 1, 3]] < 0).all()


# ---------------------------------------------------------------------------------------------------------------
# the logits check: fails closed on logits that the fused head does not reproduce


class LogitsTimesTwoLlama(transformers.LlamaForCausalLM):
    """Scales its logits after lm_head, as a model with a logit multiplier unknown to sirl_kernels.hf would."""

    factor = 2.0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.factor
        return out


class LogitsTimesOnePointOhFiveLlama(LogitsTimesTwoLlama):
    """A scaling within bf16 rounding of these small logits, but far outside float32's."""

    factor = 1.05


class LogitsBiasLlama(transformers.LlamaForCausalLM):
    """Adds a fixed bias to its logits after lm_head (no temperature reproduces that)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + torch.linspace(-0.5, 0.5, out.logits.shape[-1], dtype=out.logits.dtype)
        return out


def tiny(cls=transformers.LlamaForCausalLM, tie: bool = False, dtype=torch.float32):
    """A model of ``cls`` with ``tiny_llama``'s weights (the subclasses differ from it only after lm_head)."""
    source = tiny_llama(tie=tie)
    model = cls(source.config)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert set(missing) <= {"lm_head.bias"} and not unexpected, (missing, unexpected)  # a biased head keeps its own
    return model.to(dtype).eval()


def count_forwards(module) -> list:
    """Grows by one entry per call of ``module``."""
    calls = []
    module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)
    return calls


def training_flags(model) -> dict:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("cls", [LogitsTimesTwoLlama, LogitsBiasLlama])
@pytest.mark.parametrize("tie", [False, True])
def test_logits_edited_in_forward_raise_naming_the_class(cls, tie):
    model = tiny(cls, tie=tie)
    ids, attn, comp = batch()
    with pytest.raises(NotImplementedError, match=rf"^{cls.__name__}: \d+ of {VOCAB} logits .* by up to \d"):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    with pytest.raises(NotImplementedError, match=cls.__name__), torch.no_grad():
        sirl_reward(model, ids, attn, comp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [LogitsTimesTwoLlama, LogitsTimesOnePointOhFiveLlama, LogitsBiasLlama])
def test_plain_model_passes_and_edited_ones_fail_in_every_dtype(dtype, cls):
    """The bound follows the dtype: a 16-bit model's own 16-bit logits pass, and one scaling them by 1.05 (well
    inside the old log-prob tolerance of 4 eps max|logit|) fails."""
    ids, attn, comp = batch()
    with torch.no_grad():
        lp, _ = causal_lm_token_logprobs_entropy(tiny(dtype=dtype), ids, attn, comp)
        with pytest.raises(NotImplementedError, match=f"^{cls.__name__}: "):
            causal_lm_token_logprobs_entropy(tiny(cls, dtype=dtype), ids, attn, comp)
    assert torch.isfinite(lp).all()


class HeadWithBiasLlama(transformers.LlamaForCausalLM):
    """An lm_head with a bias (as some models have): the fused head adds it, and so does the check."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        torch.nn.init.normal_(self.lm_head.bias, std=2.0)


class HeadWithBiasTimesOnePointOhFiveLlama(HeadWithBiasLlama):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.05
        return out


class HiddenScaledBeforeHeadLlama(transformers.LlamaForCausalLM):
    """Rescales the hidden state between decoder and lm_head (as MiniCPM does), which the fused head skips."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 1.05,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_bias_is_reproduced_and_checked(dtype):
    ids, attn, comp = batch()
    model = tiny(HeadWithBiasLlama, dtype=dtype)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        lp, ent = causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    assert list(sirl_hf._logits_verdicts.values()) == [None]
    ref_lp, ref_ent = reference_from_logits(logits, ids, comp)
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16: the model's logits are rounded, the fused head's not
    torch.testing.assert_close(lp.double(), ref_lp, rtol=tol, atol=tol)
    clear_logits_verdicts()
    scaled = tiny(HeadWithBiasTimesOnePointOhFiveLlama, dtype=dtype)
    scaled.lm_head.load_state_dict(model.lm_head.state_dict())
    with pytest.raises(NotImplementedError, match="^HeadWithBiasTimesOnePointOhFiveLlama: "):
        causal_lm_token_logprobs_entropy(scaled, ids, attn, comp)
    clear_logits_verdicts()
    unbiased = tiny(HeadWithBiasLlama, dtype=dtype)
    with torch.no_grad():
        unbiased.lm_head.bias.zero_()  # the bias is part of the check: a head without it is a different head
    sirl_hf.verify_model_logits(unbiased, ids, attn)
    clear_logits_verdicts()
    with pytest.MonkeyPatch.context() as mp:  # the check must add the bias: without it the biased model fails
        mp.setattr(sirl_hf, "output_head", lambda m: (m.get_output_embeddings().weight, None))
        with pytest.raises(NotImplementedError, match="^HeadWithBiasLlama: "):
            sirl_hf.verify_model_logits(model, ids, attn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_rescaled_before_the_head_is_caught(dtype):
    ids, attn, comp = batch()
    with pytest.raises(NotImplementedError, match="^HiddenScaledBeforeHeadLlama: the hidden state its lm_head"):
        causal_lm_token_logprobs_entropy(tiny(HiddenScaledBeforeHeadLlama, dtype=dtype), ids, attn, comp)


def test_fingerprint_is_computed_once_per_model_and_config(monkeypatch):
    model = tiny()
    ids, attn, comp = batch()
    calls = []
    fingerprint = sirl_hf.config_fingerprint
    monkeypatch.setattr(sirl_hf, "config_fingerprint", lambda config: calls.append(1) or fingerprint(config))
    for _ in range(3):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    assert len(calls) == 1
    model.config = type(model.config)(**model.config.to_dict())  # a new config object: fingerprinted again
    causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    assert len(calls) == 2


def test_autocast_model_passes_and_is_checked_at_its_own_precision():
    """Under bf16 autocast a float32 model passes, and the check still runs in float32 (autocast off), so a 5%
    logit scaling that bf16 rounding of these small logits could hide is caught."""
    ids, attn, comp = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal_lm_token_logprobs_entropy(tiny(), ids, attn, comp)
        for cls in (LogitsTimesTwoLlama, LogitsTimesOnePointOhFiveLlama):
            with pytest.raises(NotImplementedError, match=f"^{cls.__name__}: "):
                causal_lm_token_logprobs_entropy(tiny(cls), ids, attn, comp)


def test_left_padded_and_empty_rows():
    """The check takes the row with the most attended tokens, padding left out; a batch with no attended token
    defers it (no verdict, no forward) to the next call."""
    model = tiny(LogitsTimesTwoLlama)
    forwards = count_forwards(model)
    ids, attn, comp = batch()
    attn[:] = 0
    comp[:] = 0
    causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    assert forwards == [] and sirl_hf._logits_verdicts == {}
    attn[0, 6:] = 1  # left padding
    attn[2, 3:] = 1
    with pytest.raises(NotImplementedError, match="LogitsTimesTwoLlama"):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    plain = tiny()
    lp, _ = causal_lm_token_logprobs_entropy(plain, ids, attn, attn)  # passes on the same left-padded batch
    assert len(forwards) == 1 and torch.isfinite(lp).all()


def test_check_runs_once_per_class_and_config():
    """One model(...) call and one LM-head call (on a single position) per process, whatever follows; a failed
    verdict raises again without running the model."""
    model = tiny()
    forwards, head_widths = count_forwards(model), []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: head_widths.append(args[0].shape[1]))
    ids, attn, comp = batch()
    for _ in range(3):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    causal_lm_token_logprobs_entropy(tiny(), ids, attn, comp)  # another instance: same class and config
    assert len(forwards) == 1 and head_widths == [1]
    another_config_model = tiny_llama()
    another_config_model.config.rms_norm_eps = 1e-5
    causal_lm_token_logprobs_entropy(another_config_model, ids, attn, comp)  # checked again
    assert len(sirl_hf._logits_verdicts) == 2

    scaled = tiny(LogitsTimesTwoLlama)
    scaled_forwards = count_forwards(scaled)
    for _ in range(2):
        with pytest.raises(NotImplementedError, match="LogitsTimesTwoLlama"):
            causal_lm_token_logprobs_entropy(scaled, ids, attn, comp)
    assert len(scaled_forwards) == 1


def test_opt_out_by_keyword_and_environment(monkeypatch):
    model = tiny(LogitsTimesTwoLlama)
    forwards = count_forwards(model)
    ids, attn, comp = batch()
    causal_lm_token_logprobs_entropy(model, ids, attn, comp, verify_logits=False)
    with torch.no_grad():
        sirl_reward(model, ids, attn, comp, verify_logits=False)
    monkeypatch.setenv(VERIFY_ENV, "0")
    causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    assert forwards == []
    with pytest.raises(NotImplementedError, match="LogitsTimesTwoLlama"):  # the keyword wins over the variable
        causal_lm_token_logprobs_entropy(model, ids, attn, comp, verify_logits=True)
    monkeypatch.setenv(VERIFY_ENV, "1")
    with pytest.raises(NotImplementedError, match="LogitsTimesTwoLlama"):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    monkeypatch.setenv(VERIFY_ENV, "off")
    with pytest.raises(ValueError, match=f"{VERIFY_ENV} must be 0 or 1, got 'off'"):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    with pytest.raises(TypeError, match="verify_logits must be True, False or None"):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp, verify_logits="no")


def test_peft_lora_with_dropout_in_train_mode_passes_and_keeps_every_training_flag():
    """LoRA adapters on the body (non-zero, dropout 0.9) change both paths alike: no false alarm, provided the
    check runs without dropout; the mixed training flags the caller set are all restored."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.9,
                          init_lora_weights=False)
    model = peft.get_peft_model(tiny(), cfg).train()
    model.base_model.model.model.layers[0].eval()
    flags = training_flags(model)
    assert True in flags.values() and False in flags.values()
    ids, attn, comp = batch()
    lp, ent = causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    assert training_flags(model) == flags
    assert lp.requires_grad and len(sirl_hf._logits_verdicts) == 1

    scaled = peft.get_peft_model(tiny(LogitsTimesTwoLlama), cfg).train()
    flags = training_flags(scaled)
    with pytest.raises(NotImplementedError, match="LogitsTimesTwoLlama"):
        causal_lm_token_logprobs_entropy(scaled, ids, attn, comp)
    assert training_flags(scaled) == flags


def test_the_check_builds_no_graph_and_leaves_grad_mode_alone():
    model = tiny().train()
    grad_modes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: grad_modes.append(torch.is_grad_enabled()),
                                    with_kwargs=True)
    ids, attn, comp = batch()
    lp, _ = causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    assert grad_modes == [False]  # model(...) ran once, for the check, without autograd
    assert torch.is_grad_enabled() and lp.requires_grad and model.training


@contextlib.contextmanager
def single_process_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with no process group already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/process-group", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["compiled", "ddp"])
def test_compiled_and_ddp_wrappers_are_checked_on_the_inner_model(wrapper, tmp_path):
    ids, attn, comp = batch()
    group = single_process_group(tmp_path) if wrapper == "ddp" else contextlib.nullcontext()
    with group:
        wrap = torch.compile if wrapper == "compiled" else torch.nn.parallel.DistributedDataParallel
        causal_lm_token_logprobs_entropy(wrap(tiny()), ids, attn, comp)
        with pytest.raises(NotImplementedError, match="^LogitsTimesTwoLlama"):
            causal_lm_token_logprobs_entropy(wrap(tiny(LogitsTimesTwoLlama)), ids, attn, comp)


def test_skipped_while_torch_compile_traces():
    model = tiny(LogitsTimesTwoLlama)
    forwards = count_forwards(model)
    ids, attn, _ = batch()
    torch.compile(lambda i, a: verify_model_logits(model, i, a), fullgraph=True, backend="eager")(ids, attn)
    assert forwards == [] and sirl_hf._logits_verdicts == {}
    with pytest.raises(NotImplementedError, match="LogitsTimesTwoLlama"):  # eager: checked
        verify_model_logits(model, ids, attn)


def tiny_cohere(logit_scale=0.25):
    torch.manual_seed(0)
    config = transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, logit_scale=logit_scale, max_position_embeddings=64,
    )
    return transformers.CohereForCausalLM(config).eval()


def tiny_granite(logits_scaling=4.0):
    torch.manual_seed(0)
    config = transformers.GraniteConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, logits_scaling=logits_scaling, embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.2, max_position_embeddings=64,
    )
    return transformers.GraniteForCausalLM(config).eval()


@pytest.mark.parametrize("make", [tiny_cohere, tiny_granite], ids=["cohere-logit_scale", "granite-logits_scaling"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_folded_scalings_pass_the_check_and_fail_it_unfolded(make, temperature, monkeypatch):
    """Cohere's and Granite's real classes pass, which proves the folding; with the folding switched off the
    same models are caught."""
    model = make()
    ids, attn, comp = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        lp, ent = causal_lm_token_logprobs_entropy(model, ids, attn, comp, temperature=temperature)
    assert list(sirl_hf._logits_verdicts.values()) == [None]
    ref_lp, ref_ent = reference_from_logits(logits, ids, comp, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)

    clear_logits_verdicts()
    monkeypatch.setattr(sirl_hf, "model_logit_temperature", lambda config, t: t)
    with pytest.raises(NotImplementedError, match=f"^{type(model).__name__}: "):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp, temperature=temperature)


def tiny_falcon_h1(lm_head_multiplier):
    torch.manual_seed(0)
    config = transformers.FalconH1Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
        mamba_chunk_size=8, max_position_embeddings=64, lm_head_multiplier=lm_head_multiplier,
    )
    return transformers.FalconH1ForCausalLM(config).eval()


def test_falcon_h1_lm_head_multiplier_is_caught():
    """A real transformers class that rescales its logits with a config value sirl_kernels.hf does not know."""
    if not hasattr(transformers, "FalconH1ForCausalLM"):
        pytest.skip("this transformers has no Falcon-H1")
    ids, attn, comp = batch()
    causal_lm_token_logprobs_entropy(tiny_falcon_h1(1.0), ids, attn, comp)
    with pytest.raises(NotImplementedError, match="^FalconH1ForCausalLM: "):
        causal_lm_token_logprobs_entropy(tiny_falcon_h1(0.5), ids, attn, comp)


def test_soft_capping_raises_before_any_forward():
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
    )
    model = transformers.Gemma2ForCausalLM(config).eval()
    forwards, body = count_forwards(model), count_forwards(model.get_decoder())
    ids, attn, comp = batch()
    with pytest.raises(NotImplementedError, match="softcapping"):
        causal_lm_token_logprobs_entropy(model, ids, attn, comp)
    assert forwards == [] and body == [] and sirl_hf._logits_verdicts == {}


def test_check_labels_passes_through_to_the_op(monkeypatch):
    """The trainer's sync-free path: check_labels=False reaches the fused op (no host-side label check)."""
    import sirl_kernels.hf as hf

    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    mask = torch.ones_like(ids)
    seen = []
    real = hf.linear_token_stats

    def spy(*args, **kwargs):
        seen.append(kwargs.get("check_labels"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "linear_token_stats", spy)
    with torch.no_grad():
        checked = hf.sirl_reward(model, ids, mask, mask, verify_logits=False)
        unchecked = hf.sirl_reward(model, ids, mask, mask, verify_logits=False, check_labels=False)
    assert seen == [True, False]
    torch.testing.assert_close(checked, unchecked, rtol=0, atol=0)
