import pytest

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is not installed")

from sirl.eval.entropy_gap import compare_groups, entropy_gap_summary, entropy_gap_table  # noqa: E402


def test_mann_whitney_hand_case():
    r = compare_groups([1.0, 2.0], [3.0, 4.0], min_group=2)
    # every "high" value beats every "low" one: U = 2 * 2 = 4; exact two-sided p = 2 / C(4, 2) = 1/3
    assert (r["u_statistic"], r["auc"], r["gap"], r["status"]) == (4.0, 1.0, 2.0, "ok")
    assert r["p_value"] == pytest.approx(1 / 3)


def test_matches_scipy_on_known_inputs():
    low = [0.8, 1.1, 0.5, 0.9, 1.3, 0.7, 1.0]
    high = [1.2, 1.9, 2.2, 0.95, 1.7, 2.5]
    r = compare_groups(low, high, names=("refusal", "compliance"))
    ref = scipy_stats.mannwhitneyu(high, low, alternative="two-sided")
    assert r["u_statistic"] == ref.statistic and r["p_value"] == pytest.approx(ref.pvalue)
    assert r["gap"] == pytest.approx(sum(high) / 6 - sum(low) / 7) and r["auc"] == pytest.approx(ref.statistic / 42)
    assert (r["n_refusal"], r["n_compliance"]) == (7, 6)
    assert r["mean_refusal"] == pytest.approx(sum(low) / 7)


def test_small_and_empty_groups_are_reported_not_numbers():
    r = compare_groups([1.0, 2.0], [3.0] * 9, names=("refusal", "compliance"), min_group=5)
    assert r["gap"] is None and r["p_value"] is None and r["auc"] is None
    assert r["status"] == "group too small: refusal n=2 (need >= 5)" and r["mean_refusal"] == 1.5
    r = compare_groups([], [3.0] * 9, names=("refusal", "compliance"))
    assert r["status"].startswith("empty group: refusal n=0") and r["mean_refusal"] is None and r["gap"] is None
    with pytest.raises(ValueError):
        compare_groups([1.0], [2.0], min_group=0)


def test_entropy_gap_summary_fields_and_counts():
    # harmful: 5 refusals (low entropy) + 1 compliance; benign: 6 compliant (high entropy)
    entropy = [0.1, 0.2, 0.3, 0.2, 0.1, 1.0] + [1.5, 1.4, 1.6, 1.2, 1.3, 1.1]
    refused = [True] * 5 + [False] + [False] * 6
    harmful = [True] * 6 + [False] * 6
    s = entropy_gap_summary(entropy, refused, harmful, min_group=5)
    required = {"refusal_entropy_mean", "compliance_entropy_mean", "gap", "p_value", "harmful_entropy_mean",
                "benign_entropy_mean", "prompt_gap", "prompt_p_value", "n_refusal", "n_compliance", "n_harmful",
                "n_benign"}
    assert required <= set(s)
    assert (s["n_refusal"], s["n_compliance"], s["n_harmful"], s["n_benign"], s["n"]) == (5, 7, 6, 6, 12)
    assert s["refusal_entropy_mean"] == pytest.approx(0.18) and s["gap"] == pytest.approx(9.1 / 7 - 0.18)
    ref = scipy_stats.mannwhitneyu(entropy[5:], entropy[:5], alternative="two-sided")
    assert s["p_value"] == pytest.approx(ref.pvalue) and s["auc"] == 1.0
    assert s["prompt_gap"] == pytest.approx(8.1 / 6 - 1.9 / 6)
    assert s["refusal_rate_harmful"] == pytest.approx(5 / 6) and s["refusal_rate_benign"] == 0.0
    assert s["harmful_only"]["status"].startswith("group too small: compliance n=1")  # 1 harmful compliance
    table = entropy_gap_table(s)
    assert "refusal vs compliance" in table and "group too small" in table and "n/a" in table
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table.splitlines()[2:]}
    assert "AUROC (B above A)" in table and rows["refusal vs compliance"][5] == "1.000"  # fully separated
    assert rows["refusal vs compliance (harmful only)"][5] == "n/a"
    with pytest.raises(ValueError):
        entropy_gap_summary([0.1], [True, False], [True])
