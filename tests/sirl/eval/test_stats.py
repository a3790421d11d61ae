"""Bootstrap intervals: exact cases, the cluster effect, seeding and the errors."""

import numpy as np
import pytest

from sirl.eval.stats import bootstrap_mean, bootstrap_paired_difference


def test_constant_values_give_a_point_interval():
    out = bootstrap_mean([True] * 7, n_boot=200)
    assert out == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 7, "clusters": 7}


def test_interval_brackets_the_mean_and_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = rng.random(400) < 0.3
    out = bootstrap_mean(x, n_boot=4000, seed=3)
    p = x.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / len(x))
    assert out["lo"] < p < out["hi"]
    assert out["mean"] == pytest.approx(p)
    assert out["lo"] == pytest.approx(p - half, abs=0.015) and out["hi"] == pytest.approx(p + half, abs=0.015)


def test_clusters_of_agreeing_answers_widen_the_interval():
    # 20 behaviours, 10 answers each, all answers of a behaviour the same: effectively 20 observations, not 200
    flags = [b % 2 == 0 for b in range(20) for _ in range(10)]
    behaviour = [b for b in range(20) for _ in range(10)]
    iid = bootstrap_mean(flags, n_boot=3000)
    clustered = bootstrap_mean(flags, behaviour, n_boot=3000)
    assert clustered["clusters"] == 20 and iid["clusters"] == 200
    assert clustered["mean"] == iid["mean"] == 0.5
    assert (clustered["hi"] - clustered["lo"]) > 2 * (iid["hi"] - iid["lo"])


def test_unequal_cluster_sizes_weight_answers_not_clusters():
    out = bootstrap_mean([1, 1, 1, 0], ["a", "a", "a", "b"], n_boot=100)
    assert out["mean"] == 0.75 and out["clusters"] == 2


def test_same_seed_same_interval_other_seed_other_draws():
    x = [1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1]
    assert bootstrap_mean(x, seed=5) == bootstrap_mean(x, seed=5)
    assert bootstrap_mean(x, seed=5, n_boot=50) != bootstrap_mean(x, seed=6, n_boot=50)


def test_paired_difference():
    a = [0, 0, 1, 1, 0, 1]
    assert bootstrap_paired_difference(a, a, n_boot=100) == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 6, "clusters": 6}
    b = [1, 1, 1, 1, 1, 1]
    out = bootstrap_paired_difference(a, b, n_boot=500)
    assert out["diff"] == pytest.approx(0.5) and 0 <= out["lo"] <= 0.5 <= out["hi"] <= 1
    # a shared shift cancels: b = a + 1 on every item is exactly +1, however noisy a is
    noisy = np.random.default_rng(0).random(50)
    assert bootstrap_paired_difference(noisy, noisy + 1, n_boot=200)["lo"] == pytest.approx(1.0)


def test_errors():
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="cluster labels"):
        bootstrap_mean([1, 0], ["a"])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_mean([1], level=1.0)
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_paired_difference([1], [1, 0])
