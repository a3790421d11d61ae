"""The pure metric functions, against hand-computed numbers."""

import math

import pytest

from sirl.eval.attacks import resolve_attacks
from sirl.eval.capability import capability_summary, capability_tables
from sirl.eval.dsr import build_items, dsr_summary, dsr_tables
from sirl.eval.overrefusal import overrefusal_summary, overrefusal_tables
from sirl.eval.report import markdown_table, rates_by


def test_dsr_summary_hand_computed():
    attacks = ["direct", "direct", "direct", "base64", "base64"]
    categories = ["x", "y", "x", "x", None]
    refused = [True, False, True, False, False]
    s = dsr_summary(attacks, categories, refused)
    assert (s["dsr"], s["asr"], s["n"], s["n_refused"]) == (0.4, 0.6, 5, 2)
    assert s["per_attack"] == {"direct": {"n": 3, "refused": 2, "dsr": 2 / 3}, "base64": {"n": 2, "refused": 0, "dsr": 0.0}}
    assert s["per_category"] == {"x": {"n": 3, "refused": 2, "dsr": 2 / 3}, "y": {"n": 1, "refused": 0, "dsr": 0.0}}
    table = dsr_tables(s)
    assert "| direct | 3 | 0.667 |" in table.replace("  ", " ").replace("  ", " ")
    assert "overall DSR 0.400 (n=5, refused 2)" in table and "| category" in table
    assert "category" not in dsr_tables(dsr_summary(["a"], [None], [True]))
    with pytest.raises(ValueError):
        dsr_summary([], [], [])


def test_build_items_crosses_attacks_and_rows():
    class Fake:
        prompts = ["p0", "p1"]
        rows = [{"Goal": "p0", "PAIR": "pair0"}, {"Goal": "p1", "PAIR": "pair1"}]

        def categories(self):
            return ["c0", None]

    items = build_items(Fake(), resolve_attacks("direct,PAIR,base64", columns=["PAIR"]))
    assert [(it.attack, it.index, it.category, it.goal) for it in items][:3] == [
        ("direct", 0, "c0", "p0"), ("direct", 1, None, "p1"), ("PAIR", 0, "c0", "p0")]
    assert [it.prompt for it in items][:4] == ["p0", "p1", "pair0", "pair1"] and len(items) == 6


def test_overrefusal_summary_hand_computed():
    s = overrefusal_summary(["homonyms", "homonyms", "definitions", "definitions", "definitions"],
                            [True, False, False, False, True])
    assert (s["refusal_rate"], s["n"], s["n_refused"]) == (0.4, 5, 2)
    assert s["per_type"]["homonyms"] == {"n": 2, "refused": 1, "refusal_rate": 0.5}
    assert s["per_type"]["definitions"]["refusal_rate"] == pytest.approx(1 / 3)
    assert "over-refusal rate 0.400" in overrefusal_tables(s)


def test_capability_summary_hand_computed():
    s = capability_summary(["a", "a", "b"], n_tokens=[2, 4, 3], truncated=[False, True, False], words=[1, 3, 2],
                           base_logprobs=[-1.0, -2.0, None], refused=[False, False, True], scores=[5.0, 7.0, None])
    assert s["n"] == 3 and s["response_tokens_mean"] == 3 and s["response_tokens_median"] == 3
    assert s["truncated_frac"] == pytest.approx(1 / 3) and s["refusal_rate"] == pytest.approx(1 / 3)
    assert s["perplexity"] == pytest.approx(math.exp((1 * 2 + 2 * 4) / 6))  # token-weighted; None skipped
    assert s["perplexity_median"] == pytest.approx((math.e + math.e ** 2) / 2)
    assert s["judge_score_mean"] == 6.0 and s["per_category"]["b"]["perplexity"] is None
    assert s["per_category"]["a"]["perplexity"] == pytest.approx(s["perplexity"])
    assert "judge_score_mean" in capability_tables(s)


def test_rates_by_and_table():
    assert rates_by(["a", None, "a", "b"], [1, 1, 0, 1], "r") == {"a": {"n": 2, "count": 1, "r": 0.5},
                                                                   "b": {"n": 1, "count": 1, "r": 1.0}}
    assert markdown_table(["x", "y"], [[1, None], [0.5, True]]).splitlines() == [
        "| x     | y    |", "|-------|------|", "| 1     | n/a  |", "| 0.500 | true |"]
