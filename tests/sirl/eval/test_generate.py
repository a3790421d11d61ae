import math

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from sirl.eval.generate import Generation, generate, load_model, logprob_under, pack, perplexity, reencode  # noqa: E402

PROMPTS = ["tell joke", "how do i bake bread please", "what is capital of france"]


def test_pack_layout():
    r = pack([[1, 2], [3]], [[4], [5, 6]], pad_id=0)
    assert r.input_ids.tolist() == [[1, 2, 4, 0], [0, 3, 5, 6]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert r.completion_mask.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]] and r.prompt_length == 2


def test_greedy_is_deterministic_and_keeps_prompt_order(tiny):
    model, tok = tiny
    a = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=2)
    b = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=3)  # other batching, same answers
    assert [g.prompt for g in a] == PROMPTS
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    for g in a:
        assert 1 <= g.n_tokens <= 5 and g.truncated == (tok.eos_token_id not in g.response_ids)
        assert g.entropy_mean > 0 and g.logprob_mean < 0
        assert set(g.record()) >= {"prompt", "response", "truncated", "entropy_mean", "logprob_mean", "n_tokens"}
        assert "prompt_ids" not in g.record()


def test_sampling_groups_samples_per_prompt(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    gens = generate(model, tok, PROMPTS[:2], max_new_tokens=6, do_sample=True, samples_per_prompt=3,
                    score_temperature=None)
    assert [g.prompt for g in gens] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert all(g.entropy_mean is None for g in gens)
    assert len({tuple(g.response_ids) for g in gens}) > 1


def test_entropy_and_logprob_match_the_full_logits(tiny):
    model, tok = tiny
    gens = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    for g in gens:
        ids = torch.tensor([g.prompt_ids + g.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        P, n = len(g.prompt_ids), g.n_tokens
        rows = logp[P - 1:P - 1 + n]  # row t-1 predicts token t
        ent = -(rows.exp() * rows).sum(-1).mean().item()
        lp = rows.gather(-1, torch.tensor(g.response_ids)[:, None]).mean().item()
        assert g.entropy_mean == pytest.approx(ent, abs=1e-4) and g.logprob_mean == pytest.approx(lp, abs=1e-4)
    assert logprob_under(model, gens, tok.pad_token_id, batch_size=2) == pytest.approx(
        [g.logprob_mean for g in gens], abs=1e-5)


def test_reencode_round_trip(tiny):
    model, tok = tiny
    words = tok.convert_tokens_to_ids(["yes", "no"])
    g = Generation("tell joke", "yes no", [], words + [tok.eos_token_id], truncated=False)
    prompts, responses = reencode([g], tok)
    assert responses == [words + [tok.eos_token_id]] and tok.decode(prompts[0]).endswith("<|assistant|>")
    g.prompt_ids = prompts[0]
    assert logprob_under(model, [g], tok.pad_token_id, prompt_ids=prompts, response_ids=responses) == pytest.approx(
        logprob_under(model, [g], tok.pad_token_id))


def test_perplexity():
    assert perplexity([-1.0, None, -3.0], [1, 5, 1]) == pytest.approx(math.exp(2))
    assert perplexity([None], [3]) is None


def test_adapter_loads_and_base_scores_disable_it(tiny, tmp_path):
    pytest.importorskip("peft", reason="peft is not installed")
    from sirl.eval.capability import base_logprobs
    from sirl.models import add_lora, tiny_random_llama

    _, tok = tiny
    lora = add_lora(tiny_random_llama(tok, seed=0), r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-trivial adapter (B starts at zero)
    lora.save_pretrained(tmp_path / "adapter")
    model, tok2 = load_model("tiny-random-llama", str(tmp_path / "adapter"), device="cpu", dtype="float32")
    assert callable(getattr(model, "disable_adapter", None)) and not model.training
    gens = generate(model, tok2, PROMPTS, max_new_tokens=4)
    base = base_logprobs(model, tok2, gens)
    plain = logprob_under(tiny_random_llama(tok, seed=0), gens, tok.pad_token_id)
    assert base == pytest.approx(plain, abs=1e-5)
    assert base != pytest.approx([g.logprob_mean for g in gens], abs=1e-3)  # the adapter changed the policy
