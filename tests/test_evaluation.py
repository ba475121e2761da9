"""minialign.evaluation: statistics checked against values worked out by hand, and the bootstrap
against its defining properties (contains the estimate, narrows with n, seeded)."""
import math

import numpy as np
import pytest

from minialign.evaluation import (accuracy_with_ties, bootstrap_ci, compare_scores, implicit_reward_summary,
                                  length_bias, mean_std, pearson, per_prompt_means, policy_comparison_summary,
                                  repetition_rate, reward_model_summary, top_k_changes, win_rate)


def test_accuracy_counts_ties_apart():
    """better = [2, 1, 0, 5], worse = [1, 1, 3, 4]: pair by pair >, =, <, > -> 2 correct, 1 tie,
    1 wrong; accuracy 2/4 = 0.5, tie rate 0.25, ties-as-half (2 + 0.5) / 4 = 0.625."""
    acc = accuracy_with_ties([2, 1, 0, 5], [1, 1, 3, 4])
    assert (acc["n"], acc["correct"], acc["ties"], acc["wrong"]) == (4, 2, 1, 1)
    assert acc["accuracy"] == 0.5 and acc["tie_rate"] == 0.25 and acc["accuracy_ties_half"] == 0.625


def test_all_ties_is_not_half_right():
    """A constant scorer ties every pair: accuracy 0, tie rate 1 (not a flattering 0.5)."""
    acc = accuracy_with_ties([0.3] * 5, [0.3] * 5)
    assert acc["accuracy"] == 0.0 and acc["tie_rate"] == 1.0 and acc["accuracy_ties_half"] == 0.5


def test_win_rate_by_hand():
    """policy [3, 2, 2, 0, 1], base [1, 2, 3, 0, 0]: win, tie, loss, tie, win -> 2/5, 2/5, 1/5."""
    w = win_rate([3, 2, 2, 0, 1], [1, 2, 3, 0, 0])
    assert (w["wins"], w["ties"], w["losses"]) == (2, 2, 1)
    assert w["win_rate"] == pytest.approx(0.4) and w["tie_rate"] == pytest.approx(0.4)
    assert w["loss_rate"] == pytest.approx(0.2)


def test_compare_scores_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        compare_scores([1, 2], [1])


def test_repetition_rate_by_hand():
    """[1,2,3,1,2,3]: 3-grams 123, 231, 312, 123 -> one of four repeats = 0.25.
    [7]*6: four 3-grams, all (7,7,7) -> 3 of 4 repeat = 0.75 = (L-3)/(L-2).
    Distinct tokens never repeat (0); shorter than n has no 3-grams (0).
    With n=2, [1,2,1,2]: 12, 21, 12 -> 1/3."""
    assert repetition_rate([1, 2, 3, 1, 2, 3]) == 0.25
    assert repetition_rate([7] * 6) == 0.75
    assert repetition_rate(list(range(10))) == 0.0
    assert repetition_rate([1, 2]) == 0.0 and repetition_rate([]) == 0.0
    assert repetition_rate([1, 2, 1, 2], n=2) == pytest.approx(1 / 3)


def test_pearson_by_hand_and_against_numpy():
    """x = [1, 2, 3], y = [1, 3, 2]: deviations (-1, 0, 1) and (-1, 1, 0); cov sum 1,
    sum of squares 2 and 2 -> r = 1 / 2 = 0.5. Exact lines give +-1; a constant gives nan."""
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([1], [2]))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_bootstrap_contains_estimate_narrows_and_is_seeded():
    rng = np.random.default_rng(1)
    small = (rng.random(50) < 0.7).astype(float)
    large = (rng.random(5000) < 0.7).astype(float)
    lo_s, hi_s = bootstrap_ci(small, seed=3)
    lo_l, hi_l = bootstrap_ci(large, seed=3)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    # Width shrinks like 1/sqrt(n): 100x the data -> about 10x narrower; demand at least 5x.
    assert (hi_l - lo_l) * 5 < (hi_s - lo_s)
    # Width of a proportion's 95% interval ~ 2 * 1.96 * sqrt(p(1-p)/n) = 0.025 for p=0.7, n=5000.
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 5000), rel=0.15)
    assert bootstrap_ci(small, seed=3) == (lo_s, hi_s)
    assert bootstrap_ci(small, seed=4) != (lo_s, hi_s)
    assert bootstrap_ci(np.ones(20)) == (1.0, 1.0)  # no variation, no width
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_bootstrap_with_another_statistic():
    """Any stat taking axis=-1 works; the median of a symmetric sample sits inside its interval."""
    values = np.arange(101, dtype=float)
    lo, hi = bootstrap_ci(values, np.median, n_resamples=500, seed=0)
    assert lo <= 50 <= hi


def test_length_bias_by_hand():
    """Three pairs (better score, worse score, better len, worse len):
       (2, 1, 10, 5)  better longer, correct; longer scored higher
       (0, 1, 3, 8)   better shorter, wrong;  longer (worse) scored higher
       (1, 0, 4, 4)   equal length, correct
    -> accuracy_better_longer 1, _shorter 0, _equal 1; prefers_longer 2/2; better_is_longer 1/3.
    margin vs length difference: margins (1, -1, 1), differences (5, -5, 0) -> r = 10/sqrt(8/3*50)."""
    lb = length_bias([2, 0, 1], [1, 1, 0], [10, 3, 4], [5, 8, 4])
    assert lb["accuracy_better_longer"] == 1.0 and lb["accuracy_better_shorter"] == 0.0
    assert lb["accuracy_equal_length"] == 1.0
    assert (lb["n_better_longer"], lb["n_better_shorter"], lb["n_equal_length"]) == (1, 1, 1)
    assert lb["prefers_longer_rate"] == 1.0 and lb["better_is_longer_rate"] == pytest.approx(1 / 3)
    assert lb["margin_length_pearson"] == pytest.approx(10 / math.sqrt(8 / 3 * 50))
    assert lb["reward_length_pearson"] == pytest.approx(np.corrcoef([2, 0, 1, 1, 1, 0], [10, 3, 4, 5, 8, 4])[0, 1])


def test_summaries_are_consistent():
    rng = np.random.default_rng(0)
    b, w = rng.normal(1, 1, 200), rng.normal(0, 1, 200)
    s = reward_model_summary(b, rng.integers(1, 50, 200), w, rng.integers(1, 50, 200), n_resamples=200)
    assert s["accuracy"] == pytest.approx(np.mean(b > w))
    assert s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1]
    assert s["mean_margin"] == pytest.approx(np.mean(b - w))
    assert (s["better_reward_mean"], s["worse_reward_std"]) == pytest.approx((b.mean(), w.std()))

    p = policy_comparison_summary(w, b, [[1, 2, 3, 1, 2, 3]] * 200, [[5] * 4] * 200,
                                  [True] * 150 + [False] * 50, [True] * 200, n_resamples=200)
    assert p["win_rate"] == pytest.approx(np.mean(b > w)) and p["mean_gain"] == pytest.approx(np.mean(b - w))
    assert p["base"]["stop_rate"] == 0.75 and p["policy"]["stop_rate"] == 1.0
    assert p["base"]["mean_length_tokens"] == 6 and p["policy"]["mean_length_tokens"] == 4
    assert p["base"]["repetition_3gram"] == 0.25 and p["policy"]["repetition_3gram"] == 0.5

    # Two answers per prompt: prompt means base (0, 1, 2), policy (1, 1, 3): 2 wins, 1 tie.
    p = policy_comparison_summary([0, 0, 1, 1, 2, 2], [2, 0, 0, 2, 3, 3], [[1]] * 6, [[1, 2]] * 6,
                                  [True] * 6, [False, True] * 3, n_resamples=50, samples_per_prompt=2)
    assert (p["n"], p["wins"], p["ties"], p["losses"]) == (3, 2, 1, 0)
    assert p["mean_gain"] == pytest.approx(2 / 3) and p["samples_per_prompt"] == 2
    assert p["policy"]["reward_mean"] == pytest.approx(10 / 6) and p["policy"]["stop_rate"] == 0.5
    with pytest.raises(ValueError, match="samples_per_prompt=4"):
        per_prompt_means([1.0] * 6, 4)

    i = implicit_reward_summary([0.2, 0.1, 0.0], [0.1, 0.1, 0.3])
    assert (i["correct"], i["ties"], i["wrong"]) == (1, 1, 1)
    assert i["mean_margin"] == pytest.approx((0.1 + 0.0 - 0.3) / 3)


def test_top_k_changes_and_mean_std():
    best, worst = top_k_changes([0.5, -2.0, 3.0, 0.0, -1.0], k=2)
    assert best == [2, 0] and worst == [1, 4]
    assert top_k_changes([1.0, 0.0, 2.0], k=2) == ([2, 0], [1])  # disjoint when n < 2k
    assert mean_std([1, 3]) == (2.0, 1.0)
