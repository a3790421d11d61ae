import math

import pytest
import torch

from sirl.eval.judge import (
    DEFAULT_PHRASES,
    GCG_PHRASES,
    JBB_PHRASES,
    JUDGE_PROMPT,
    KEYWORD_SETS,
    XSTEST_PHRASES,
    KeywordJudge,
    LLMJudge,
    apply_judge,
    describe,
    load_judge,
)


def test_default_set_is_case_insensitive_and_normalises_apostrophes():
    j = KEYWORD_SETS["default"]
    assert j.is_refusal("I cannot help with that.")
    assert j.is_refusal("i cannot help with that.")  # lower case
    assert j.is_refusal("I CAN'T DO THAT")  # upper case
    assert j.is_refusal("Well... I can\u2019t do that")  # curly apostrophe, not at the start
    assert not j.is_refusal("Sure, here is a poem about the sea.")
    assert not j.is_refusal("Such as an example, this is illegal in some places.")  # GCG's broad phrases left out
    assert j.is_refusal("") and j.is_refusal("   \n")  # empty = refusal
    assert KeywordJudge(empty_is_refusal=False).is_refusal("") is False


def test_gcg_and_jbb_sets_are_case_sensitive_as_published():
    gcg, jbb = KEYWORD_SETS["gcg"], KEYWORD_SETS["jbb"]
    assert gcg.is_refusal("I cannot do this") and not gcg.is_refusal("i cannot do this")
    assert gcg.is_refusal("Here it is, although it is illegal.")  # GCG's "illegal" matches anywhere
    assert gcg.is_refusal("such As an")  # ... and "As an", case-sensitively
    assert not gcg.is_refusal("such as an example")
    assert jbb.is_refusal("Sure. I'm unable to finish") and not jbb.is_refusal("i'm unable to")
    assert not jbb.is_refusal("This is illegal.")
    assert len(GCG_PHRASES) == 29 and len(JBB_PHRASES) == 12 and len(XSTEST_PHRASES) == 21
    assert set(JBB_PHRASES) <= set(DEFAULT_PHRASES)


def test_xstest_set_matches_the_start_only():
    x = KEYWORD_SETS["xstest"]
    assert x.is_refusal("  SORRY, I won't")  # lower-cased and stripped, as XSTest's strmatch_label
    assert x.is_refusal("No, that is not something I can do")
    assert not x.is_refusal("Here is how. Sorry for the delay.")
    assert KEYWORD_SETS["default"].is_refusal("Here is how. I'm sorry for the delay.")  # anywhere


def test_matched_lists_the_phrases_and_call_is_batched():
    j = KEYWORD_SETS["default"]
    assert set(j.matched("I'm sorry, but I cannot")) == {"I'm sorry", "I cannot", "but I cannot"}
    assert j(["a", "b"], ["I apologize.", "Sure!"]) == [True, False]
    assert "case-insensitive" in describe(j) and "case-sensitive" in describe(KEYWORD_SETS["gcg"])


def test_load_judge_specs(tmp_path, monkeypatch):
    assert load_judge("keyword") is KEYWORD_SETS["default"]
    assert load_judge("keyword:gcg") is KEYWORD_SETS["gcg"]
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("# mine\nnope\n\n")
    j = load_judge(f"keyword:{phrases}")
    assert j.phrases == ("nope",) and j.is_refusal("NOPE.") and not j.is_refusal("yes")
    (tmp_path / "myjudge.py").write_text("def judge(prompts, responses):\n    return ['x' in r for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_judge("py:myjudge:judge")
    assert apply_judge(fn, ["p", "q"], ["x", "y"]) == [True, False]
    for bad in ("keyword:nosuchset", "gpt4", "llm:", "py:nomodule"):
        with pytest.raises(ValueError):
            load_judge(bad)


def test_apply_judge_checks_the_count():
    with pytest.raises(ValueError, match="1 verdicts for 2"):
        apply_judge(lambda p, r: [True], ["a", "b"], ["c", "d"])


def test_llm_judge_reads_yes_no_logprobs(tiny):
    model, tok = tiny
    judge = LLMJudge(model, tok, batch_size=2)
    assert judge.yes_ids == [tok.convert_tokens_to_ids("yes")] and judge.no_ids == [tok.convert_tokens_to_ids("no")]
    prompts, responses = ["how do i make a bomb", "tell joke", "bake bread"], ["sorry i cannot", "yes", "no"]
    verdicts = judge(prompts, responses)
    scores = judge.last_scores
    assert len(verdicts) == 3 and all(0 < s < 1 for s in scores) and verdicts == [s > 0.5 for s in scores]
    # the same number from the full logits of the last position
    ids = torch.tensor([judge.encode(prompts[1], responses[1])])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    y, n = logp[judge.yes_ids[0]], logp[judge.no_ids[0]]
    assert scores[1] == pytest.approx(1 / (1 + math.exp(-(y - n).item())), abs=1e-4)
    assert "bake bread" in judge.judge_message("bake bread", "no") and "[REPLY]" in JUDGE_PROMPT


def test_llm_judge_scores_a_logit_scaling_model_on_its_real_logits_and_refuses_an_unknown_one(tiny, monkeypatch):
    """A Cohere-style judge (logits * logit_scale) is scored on its own scaled logits: the judge goes through
    sirl_kernels.hf, which folds the scaling in and checks the logits. A model that changes its logits in a way the
    fused head does not know is refused (fail closed), never judged on the wrong numbers."""
    transformers = pytest.importorskip("transformers")
    from sirl_kernels.hf import clear_logits_verdicts

    _, tok = tiny
    config = transformers.CohereConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, logit_scale=4.0,
                                       max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(config).eval()
    judge = LLMJudge(model, tok, batch_size=2)
    judge(["how do i make a bomb", "tell joke"], ["sorry i cannot", "yes"])
    for i, (p, r) in enumerate([("how do i make a bomb", "sorry i cannot"), ("tell joke", "yes")]):
        ids = torch.tensor([judge.encode(p, r)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)  # includes * logit_scale
        y, n = logp[judge.yes_ids[0]], logp[judge.no_ids[0]]
        assert judge.last_scores[i] == pytest.approx(1 / (1 + math.exp(-(y - n).item())), abs=1e-5)
    unscaled = torch.log_softmax((model(ids).logits[0, -1] / 4.0).double(), -1)
    wrong = 1 / (1 + math.exp(-(unscaled[judge.yes_ids[0]] - unscaled[judge.no_ids[0]]).item()))
    assert abs(wrong - judge.last_scores[1]) > 1e-3  # the test can tell the scaling apart

    class Edited(type(tiny[0])):  # a Llama whose forward scales its logits by 1.05 after lm_head
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.05
            return out

    clear_logits_verdicts()
    edited = Edited(tiny[0].config).eval()
    with pytest.raises(NotImplementedError, match="Edited"):
        LLMJudge(edited, tok)(["tell joke"], ["yes"])
