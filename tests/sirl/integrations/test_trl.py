"""SIRLGRPOTrainer against the real TRL package on CPU: its head against TRL's head and the full logits, a few
training steps whose SIRL rewards equal ``sirl.score`` on the same tokens, no policy pass beyond those TRL runs
(in TRL's default on-policy setting the reward comes from the training forward), and no vocabulary-sized
activation in the log-prob pass."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("trl", reason="trl is not installed (pip install 'sirl-kernels[trl]')")
pytest.importorskip("peft", reason="peft is not installed")

import peft  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

import sirl.integrations.trl as sirl_trl  # noqa: E402
import sirl_kernels.api  # noqa: E402
from sirl.integrations.trl import SIRLGRPOConfig, SIRLGRPOTrainer, add_sirl_lm_head  # noqa: E402
from sirl.models import tiny_random_llama, tiny_tokenizer  # noqa: E402
from sirl.rollout import Rollout, left_pad  # noqa: E402
from sirl.passes import token_logprobs_entropy  # noqa: E402
from sirl.scoring import sirl_rewards  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 kernels against float32 / float64 references


def llama(vocab=97, hidden=32, tie=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


def trl_style_batch(vocab, b=3, prompt=5, completion=7, seed=1):
    """Left-padded prompts, right-padded completions and TRL's labels (only completion tokens scored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, prompt + completion), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # a shorter prompt
    attn[1, prompt + 4:] = 0  # a shorter completion
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :-completion] = -100
    return ids, attn, labels


def full_logits_reference(model, ids, attn, labels, temperature):
    """float64 log-probs and entropies from the model's own full logits, TRL's [B, T - 1] layout."""
    z = model(input_ids=ids, attention_mask=attn).logits.double()[:, :-1] / temperature
    logp = torch.log_softmax(z, -1)
    mask = labels[:, 1:] != -100
    lp = logp.gather(-1, labels[:, 1:].clamp_min(0)[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(mask, lp, 0.0), torch.where(mask, ent, 0.0)


@pytest.mark.parametrize("tie", [False, True])
def test_head_matches_trl_head_and_full_logits(tie):
    temperature = 0.7
    model = llama(tie=tie).eval()
    ids, attn, labels = trl_style_batch(model.config.vocab_size)
    trl_utils.add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    trl_out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    (trl_out.log_probs.sum() + 0.3 * trl_out.entropy.sum()).backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    add_sirl_lm_head(model, temperature=temperature)
    out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
    with torch.no_grad():
        ref_lp, ref_ent = full_logits_reference(model, ids, attn, labels, temperature)

    assert out.log_probs.shape == trl_out.log_probs.shape == (3, ids.shape[1] - 1)
    torch.testing.assert_close(out.log_probs, trl_out.log_probs, **TOL)
    torch.testing.assert_close(out.entropy, trl_out.entropy, **TOL)
    torch.testing.assert_close(out.log_probs.double(), ref_lp, **TOL)
    torch.testing.assert_close(out.entropy.double(), ref_ent, **TOL)
    assert torch.equal(out.label_mask, trl_out.label_mask)
    torch.testing.assert_close(out.loss, trl_out.loss, **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    # generation (no fused_lm_head) still reaches the model's own forward
    assert model(input_ids=ids, attention_mask=attn).logits.shape == (*ids.shape, model.config.vocab_size)


def max_allocation_bytes(fn) -> int:
    """Largest single CPU allocation while ``fn`` runs (the profiler sees allocations inside C++ kernels too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_logprob_pass_memory_is_tokens_times_hidden(monkeypatch):
    """Forward + backward of the fused head never allocates a [tokens, V] buffer: with a small token chunk the
    largest allocation is weight-sized (V x D), whereas TRL's own head (32k-token chunks) allocates the logits."""
    vocab, hidden, b, t = 4096, 16, 4, 64
    model = llama(vocab=vocab, hidden=hidden)
    ids, attn, labels = trl_style_batch(vocab, b=b, prompt=8, completion=t - 8)
    logits_bytes = b * (t - 8) * vocab * 4
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))

    def step():
        out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()

    trl_peak = max_allocation_bytes(step)
    add_sirl_lm_head(model)
    monkeypatch.setattr(sirl_kernels.api, "default_linear_chunk_size", lambda v, *_: 8)  # 8 x V fp32 workspace
    ours_peak = max_allocation_bytes(step)
    weight_bytes = vocab * hidden * 4
    assert trl_peak >= logits_bytes  # the probe does see vocabulary-sized buffers
    assert ours_peak <= 2 * weight_bytes < logits_bytes // 4, (ours_peak, weight_bytes, logits_bytes)


# ---------------------------------------------------------------------------------------------------------------
# the trainer


def polite(completions, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float("please" in t) + 0.5 * float("sorry" in t) for t in texts]


class ProbeTrainer(SIRLGRPOTrainer):
    """Records, for every generation batch, TRL's reward matrix and ``sirl.score``'s reward on the same tokens
    (from the policy that sampled them), and for every reward computed inside compute_loss ("loss" mode) the
    micro-batch's prompts and the values written to TRL's completions table."""

    probes: list
    in_loss: list

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        prompt_ids, completion_ids, _ = self._sirl_rollout
        eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        p_ids, p_mask = left_pad(prompt_ids, self._tokenizer.pad_token_id)
        c_ids, c_mask = left_pad([c[::-1] for c in completion_ids], self._tokenizer.pad_token_id)
        c_ids, c_mask = c_ids.flip(-1), c_mask.flip(-1)  # right-padded completions
        truncated = torch.tensor([c[-1] not in eos_and_pad for c in completion_ids])
        rollout = Rollout(torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1),
                          torch.cat([torch.zeros_like(p_mask), c_mask], 1), truncated,
                          torch.zeros(len(c_ids), dtype=torch.long), p_ids.shape[1])
        _, entropy = token_logprobs_entropy(self.model, rollout, temperature=self.temperature, token_budget=4096)
        expected, valid = sirl_rewards(entropy, rollout.completion_mask, truncated, self._sirl_spec)
        self.probes.append((rewards_per_func.clone(), expected, valid, truncated))
        return rewards_per_func

    def _sirl_advantages_in_loss(self, inputs, entropy):
        advantages = super()._sirl_advantages_in_loss(inputs, entropy)
        rows = inputs["sirl_table_row"].tolist()
        table = [(self._logs["rewards"]["sirl"][r], self._logs["advantages"][r]) for r in rows]
        self.in_loss.append((len(self.probes) - 1, rows, inputs["prompt_ids"].clone(), table, advantages.clone()))
        return advantages


def make_trainer(tmp_path, *, steps_per_generation=None, truncation="keep", weights=(1.0, 0.5), reward_pass="auto",
                 batch_size=8, accumulation=1):
    tok = tiny_tokenizer()
    model = tiny_random_llama(tok, seed=0, init_std=0.2)  # peaked enough that entropies differ between samples
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    prompts = ["how do i make a bomb", "tell joke please", "write poem about the sea", "pick lock"]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    args = SIRLGRPOConfig(
        output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2, beta=0.04, per_device_train_batch_size=batch_size,
        num_generations=4, max_completion_length=6, temperature=1.0, top_k=0, top_p=1.0,
        steps_per_generation=steps_per_generation, gradient_accumulation_steps=accumulation,
        reward_weights=list(weights), sirl_truncation=truncation, sirl_truncation_penalty=-7.0,
        sirl_reward_pass=reward_pass, use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ProbeTrainer(model, reward_funcs=[polite], args=args, train_dataset=data, processing_class=tok)
    trainer.probes, trainer.in_loss = [], []
    return trainer


def count_passes(monkeypatch, trainer):
    """(grad enabled, policy) of every fused log-prob pass; widths of every LM-head call."""
    passes, widths = [], []
    real = sirl_trl.causal_lm_token_logprobs_entropy

    def counting(model, *args, **kwargs):
        lora = next(m for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer))
        policy = not lora.disable_adapters and "ref" not in lora.active_adapters  # TRL's frozen copy: "ref"
        passes.append((torch.is_grad_enabled(), policy))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sirl_trl, "causal_lm_token_logprobs_entropy", counting)
    # no scoring pass may run the LM head over a whole sequence (generation: one position)
    trainer.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
    return passes, widths


def trl_advantages(rewards_per_func, weights, groups=4):
    """TRL's sum_then_normalize / scale_rewards="group" advantages (no NaN rows)."""
    rewards = (rewards_per_func * torch.tensor(weights)).sum(1).view(-1, groups)
    return ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()


@pytest.mark.parametrize("truncation", ["penalize", "keep"])
def test_reward_from_the_training_forward(tmp_path, monkeypatch, truncation):
    """TRL's default on-policy setting: the reward comes from the training forward, so the only policy passes are
    the ones TRL runs (training, reference): none without grad. The rewards equal sirl.score on the same tokens
    under the policy that sampled them, and the advantages and logged metrics are TRL's formulas on them."""
    trainer = make_trainer(tmp_path, truncation=truncation)
    assert trainer.sirl_reward_pass == "loss" and trainer.sirl_kernels_head
    passes, widths = count_passes(monkeypatch, trainer)
    trainer.train()

    assert trainer.state.global_step == 2 and len(trainer.probes) == 2 and len(trainer.in_loss) == 2
    assert passes.count((False, True)) == 0  # no extra policy pass
    assert passes.count((False, False)) == 2 and passes.count((True, True)) == 2  # TRL's reference + training
    assert max(widths) == 1
    for batch, rows, _, table, advantages in trainer.in_loss:
        rewards_per_func, expected, valid, truncated = trainer.probes[batch]
        assert valid.all() and sorted(rows) == list(range(8))  # one micro-batch = the whole generation batch,
        assert all(rows[i] % 4 == i % 4 for i in range(8))  # shuffled by whole groups
        logged = torch.tensor([r for r, _ in table])
        torch.testing.assert_close(logged, expected[rows], **TOL)
        if truncation == "penalize":
            assert torch.equal(logged == -7.0, truncated[rows])
        else:
            assert logged.std() > 0
        both = torch.stack([expected, rewards_per_func[:, 1]], 1)[rows]
        torch.testing.assert_close(advantages, trl_advantages(both, [1.0, 0.5]), **TOL)
        torch.testing.assert_close(torch.tensor([a for _, a in table]), advantages, **TOL)
    logs = [h for h in trainer.state.log_history if "rewards/sirl/mean" in h]
    assert len(logs) == 2
    for h, (batch, *_) in zip(logs, trainer.in_loss):
        assert h["rewards/sirl/mean"] == pytest.approx(float(trainer.probes[batch][1].mean()), abs=1e-5)
        assert h["reward"] == pytest.approx(h["rewards/sirl/mean"] + 0.5 * h["rewards/polite/mean"], abs=1e-5)


def test_reward_in_loss_keeps_groups_together(tmp_path, monkeypatch):
    """Two micro-batches per generation batch (gradient accumulation): the shuffle moves whole groups, so each
    micro-batch is one prompt's 4 completions and its rewards are normalised within that group."""
    trainer = make_trainer(tmp_path, batch_size=4, accumulation=2, truncation="penalize")
    assert trainer.sirl_reward_pass == "loss"
    passes, _ = count_passes(monkeypatch, trainer)
    trainer.train()
    assert len(trainer.probes) == 2 and len(trainer.in_loss) == 4
    assert passes.count((False, True)) == 0
    for batch, rows, prompt_ids, table, advantages in trainer.in_loss:
        assert (prompt_ids == prompt_ids[0]).all()  # one group
        assert sorted(rows) in ([0, 1, 2, 3], [4, 5, 6, 7])
        rewards_per_func, expected, _, _ = trainer.probes[batch]
        torch.testing.assert_close(torch.tensor([r for r, _ in table]), expected[rows], **TOL)
        both = torch.stack([expected, rewards_per_func[:, 1]], 1)[rows]
        torch.testing.assert_close(advantages, trl_advantages(both, [1.0, 0.5]), **TOL)


@pytest.mark.parametrize(
    "steps_per_generation, reward_pass",
    [(None, "policy_pass"), (2, "auto")],
    ids=["trainer-runs-the-policy-pass", "reads-trls-old-policy-pass"],
)
def test_reward_from_a_policy_pass(tmp_path, monkeypatch, steps_per_generation, reward_pass):
    trainer = make_trainer(tmp_path, steps_per_generation=steps_per_generation, reward_pass=reward_pass)
    assert trainer.sirl_kernels_head and trainer.reward_func_names == ["sirl", "polite"]
    assert trainer.sirl_reward_pass == ("policy_pass" if steps_per_generation is None else "old_policy_pass")
    passes, widths = count_passes(monkeypatch, trainer)
    trainer.train()

    generations = 2 if steps_per_generation is None else 1
    calls = 1 if steps_per_generation is None else 2  # a no-grad pass runs per_device_train_batch_size rows a call
    assert trainer.state.global_step == 2 and len(trainer.probes) == generations and not trainer.in_loss
    for rewards_per_func, expected, valid, truncated in trainer.probes:
        torch.testing.assert_close(rewards_per_func[:, 0], expected, **TOL)
        assert valid.all() and rewards_per_func[:, 0].std() > 0
    truncated = torch.cat([p[3] for p in trainer.probes])
    assert truncated.any() and not truncated.all()  # both kinds of completion were scored
    # exactly one no-grad policy pass and one reference pass per generation batch; the rest train
    assert passes.count((False, True)) == passes.count((False, False)) == generations * calls
    assert passes.count((True, True)) == 2
    assert max(widths) == 1
    # TRL's weighting: the logged reward is 1.0 * sirl + 0.5 * polite
    logs = [h for h in trainer.state.log_history if "rewards/sirl/mean" in h]
    for h in logs:
        combined = h["rewards/sirl/mean"] + 0.5 * h["rewards/polite/mean"]
        assert h["reward"] == pytest.approx(combined, abs=1e-5)


def test_reward_pass_choice(tmp_path):
    """Where the groups cannot stay whole in a micro-batch, "auto" warns and adds the policy pass; "loss" refuses."""
    tok = tiny_tokenizer()
    model = tiny_random_llama(tok)
    common = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, use_cpu=True, report_to="none")
    data = Dataset.from_list([{"prompt": "hi"}] * 4)
    new = functools.partial(SIRLGRPOTrainer, model, train_dataset=data, processing_class=tok)
    with pytest.warns(UserWarning, match="extra no-grad policy pass.*not a multiple of num_generations"):
        trainer = new(args=SIRLGRPOConfig(**common))
    assert trainer.sirl_reward_pass == "policy_pass"
    with pytest.raises(ValueError, match="cannot be used.*not a multiple"):
        new(args=SIRLGRPOConfig(sirl_reward_pass="loss", **common))
    common.update(per_device_train_batch_size=4, gradient_accumulation_steps=1)
    with pytest.warns(UserWarning, match="whole generation batch"):
        new(args=SIRLGRPOConfig(scale_rewards="batch", **common))
    with pytest.raises(ValueError, match="sirl_reward_pass must be"):
        new(args=SIRLGRPOConfig(sirl_reward_pass="never", **common))
    assert new(args=SIRLGRPOConfig(**common)).sirl_reward_pass == "loss"


@pytest.mark.parametrize("reward_pass", ["loss", "policy_pass"])
def test_mask_truncation_gives_no_reward(tmp_path, reward_pass):
    trainer = make_trainer(tmp_path, truncation="mask", weights=(1.0, 0.0), reward_pass=reward_pass)
    trainer.args.max_steps = 1
    trainer.train()
    rewards_per_func, expected, valid, truncated = trainer.probes[0]
    assert truncated.any() and not truncated.all()
    if reward_pass == "loss":
        _, rows, _, table, _ = trainer.in_loss[0]
        sirl, truncated, expected = torch.tensor([r for r, _ in table]), truncated[rows], expected[rows]
    else:
        sirl = rewards_per_func[:, 0]
    assert torch.isnan(sirl[truncated]).all()  # None -> NaN: TRL leaves them out of the baseline
    torch.testing.assert_close(sirl[~truncated], expected[~truncated], **TOL)


def test_config_errors(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_random_llama(tok)
    common = dict(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, use_cpu=True,
                  report_to="none")
    with pytest.raises(ValueError, match="list its weight first"):
        SIRLGRPOTrainer(model, reward_funcs=[polite], args=SIRLGRPOConfig(reward_weights=[1.0], **common))
    with pytest.raises(ValueError, match="mask_truncated_completions"):
        SIRLGRPOTrainer(model, args=SIRLGRPOConfig(mask_truncated_completions=True, **common))
    with pytest.raises(ValueError, match="truncation"):
        SIRLGRPOTrainer(model, args=SIRLGRPOConfig(sirl_truncation="drop", **common))


@pytest.mark.slow
def test_data_parallel_ranks_stay_in_sync(tmp_path):
    """examples/trl_sirl.py under torchrun (2 gloo processes, DDP): each rank scores different completions, and
    the trained weights still agree because the fused head runs inside the DDP forward, whose hooks all-reduce
    the gradients. The SIRL reward comes from the training forward, and its metrics are gathered over ranks. (With the head called on the unwrapped model the two checksums differ: checked by hand.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[3] / "examples" / "trl_sirl.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(example),
           "--steps", "2", "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {}
    for path in Path(tmp_path).glob("summary_rank*.json"):
        row = json.loads(path.read_text())
        ranks[row["rank"]] = row
    assert set(ranks) == {0, 1} and all(r["steps"] == 2 and r["sirl_kernels_head"] for r in ranks.values())
    assert all(r["sirl_reward_pass"] == "loss" for r in ranks.values())  # rewards gathered across ranks
    assert ranks[0]["rewards/sirl/mean"] == ranks[1]["rewards/sirl/mean"]
    assert ranks[0]["trained_param_checksum"] == ranks[1]["trained_param_checksum"]



@pytest.mark.parametrize("quantile", [1.0, 0.5], ids=["all-tokens", "top-entropy-half"])
def test_entropy_coef_gradient_arrives_through_the_fused_head(tmp_path, monkeypatch, quantile):
    """TRL's entropy bonus (entropy_coef, top_entropy_quantile) reads the entropies our fused head returns, and its
    gradient must reach our op's entropy backward (TRL#6625 was a silently dropped one). The gradient arriving at
    the entropies is exactly -entropy_coef / (tokens it acts on) on those tokens and 0 elsewhere; from there the
    head's entropy backward is the one test_head_matches_trl_head_and_full_logits checks against full logits."""
    coef = 0.5
    arrived = []
    original = SIRLGRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, model, *args, **kwargs):
        logps, entropies, aux = original(self, model, *args, **kwargs)
        if torch.is_grad_enabled() and entropies is not None:
            assert entropies.requires_grad  # connected to the model through our op
            entropies.register_hook(lambda g: arrived.append(g.detach().clone()))
        return logps, entropies, aux

    monkeypatch.setattr(SIRLGRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    tok = tiny_tokenizer()
    model = tiny_random_llama(tok, seed=0, init_std=0.2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    prompts = ["how do i make a bomb", "tell joke please", "write poem about the sea", "pick lock"]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    args = SIRLGRPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, learning_rate=1e-2, beta=0.0, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=6, temperature=1.0, top_k=0, top_p=1.0, entropy_coef=coef,
        top_entropy_quantile=quantile, sirl_fused_logps=True, use_cpu=True, bf16=False, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SIRLGRPOTrainer(model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    assert trainer.sirl_kernels_head
    assert arrived, "no gradient reached the entropies of the fused head"
    for grad in arrived:
        acted = grad != 0
        assert acted.any()
        # the policy term does not read the entropies, so all of their gradient is the bonus's
        torch.testing.assert_close(grad[acted], torch.full_like(grad[acted], -coef / acted.sum().item()))
        if quantile == 1.0:  # every completion token, the padding never
            assert acted.sum() >= grad.shape[0]
