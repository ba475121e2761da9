"""minialign.length_control: the logistic fit against a slow second implementation and against
fits derived by hand, the length-controlled win rate on cases where the answer is known, the
buckets by hand; and the ties-as-1/2 win rate of minialign.evaluation."""
import math

import numpy as np
import pytest

from minialign.evaluation import bootstrap_ci, policy_comparison_summary, prompt_outcomes, win_rate
from minialign.length_control import (fit_logistic, length_bucket_win_rates, length_control_summary,
                                      length_controlled_win_rate, length_feature)


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def test_outcomes_and_ties_as_half_by_hand():
    """policy [3, 2, 2, 0, 1] vs base [1, 2, 3, 0, 0]: win, tie, loss, tie, win -> outcomes
    (1, 1/2, 0, 1/2, 1); strict win rate 2/5 = 0.4, ties as 1/2 (2 + 2/2) / 5 = 0.6."""
    o = prompt_outcomes([3, 2, 2, 0, 1], [1, 2, 3, 0, 0])
    assert o.tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]
    w = win_rate([3, 2, 2, 0, 1], [1, 2, 3, 0, 0])
    assert w["win_rate"] == pytest.approx(0.4) and w["win_rate_ties_half"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="shapes differ"):
        prompt_outcomes([1, 2], [1])


def test_comparison_summary_interval_of_ties_as_half():
    """The ties-as-1/2 interval is the bootstrap of the outcomes, with the strict one's resamples:
    so it lies at or above the strict interval, and equals bootstrap_ci of the outcomes."""
    rng = np.random.default_rng(1)
    base, pol = rng.integers(0, 3, 60).astype(float), rng.integers(0, 3, 60).astype(float)  # many ties
    s = policy_comparison_summary(base, pol, [[1]] * 60, [[1]] * 60, [True] * 60, [True] * 60, n_resamples=300)
    assert s["win_rate_ties_half"] == pytest.approx(np.mean(prompt_outcomes(pol, base)))
    assert s["win_rate_ties_half_ci95"] == bootstrap_ci(prompt_outcomes(pol, base), np.mean, 300, 0)
    assert s["win_rate_ties_half_ci95"][0] >= s["win_rate_ci95"][0]
    assert s["win_rate_ties_half_ci95"][1] >= s["win_rate_ci95"][1]


def slow_fit(X, y, ridge):
    """A second implementation: plain gradient ascent on the same penalised log-likelihood, many
    small steps from zero (no Hessian, no line search)."""
    w = np.zeros(X.shape[1])
    for _ in range(200_000):
        p = 1 / (1 + np.exp(-X @ w))
        g = X.T @ (y - p) - ridge * w
        w += 0.5 / len(y) * g
        if np.abs(g).max() < 1e-10:
            break
    return w


def test_newton_fit_equals_gradient_ascent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=80)
    y = (rng.random(80) < 1 / (1 + np.exp(-(0.4 - 1.3 * x)))).astype(float)
    y[::7] = 0.5  # some ties: fractional responses
    X = np.stack([np.ones_like(x), x], axis=1)
    for ridge in (0.0, 0.01, 1.0):
        w, converged = fit_logistic(X, y, ridge)
        assert converged
        np.testing.assert_allclose(w, slow_fit(X, y, ridge), atol=1e-6)


def test_two_groups_saturated_fit_by_hand():
    """With two values of the length feature, x = -t and x = +t, the (unpenalised) model fits
    each group's mean exactly: theta - phi t = logit(p1), theta + phi t = logit(p2), so
    theta = (logit p1 + logit p2) / 2. Policy shorter by 10 tokens on 30 prompts winning 0.9 of
    them, longer by 10 on 10 prompts winning 0.5 (3 wins, 4 ties, 3 losses): theta =
    logit(0.9) / 2 = ln(9) / 2 = ln 3, so the length-controlled win rate is sigmoid(ln 3) = 3/4,
    while the raw win rate (ties as 1/2) is (27 + 5) / 40 = 0.8."""
    y = np.array([1.0] * 27 + [0.0] * 3 + [1.0] * 3 + [0.5] * 4 + [0.0] * 3)
    d = np.array([-10.0] * 30 + [10.0] * 10)
    lc = length_controlled_win_rate(y, d, n_resamples=50, ridge=0.0)
    assert y.mean() == pytest.approx(0.8)
    assert lc["win_rate"] == pytest.approx(0.75, abs=1e-9) and lc["intercept"] == pytest.approx(math.log(3), abs=1e-9)
    assert lc["slope"] < 0 and lc["converged"]  # the shorter side wins more: the judge likes short answers


def test_a_gain_that_is_all_length_is_controlled_to_one_half():
    """Symmetric groups: the policy wins 0.8 of the prompts where it is shorter (30 prompts) and
    0.2 where it is longer (10): theta = (logit 0.8 + logit 0.2) / 2 = 0, length-controlled win rate
    exactly 1/2, although the raw win rate is (24 + 2) / 40 = 0.65: all of the gain is length."""
    y = np.array([1.0] * 24 + [0.0] * 6 + [1.0] * 2 + [0.0] * 8)
    d = np.array([-25.0] * 30 + [25.0] * 10)
    lc = length_controlled_win_rate(y, d, n_resamples=100, ridge=0.0)
    assert y.mean() == pytest.approx(0.65)
    assert lc["win_rate"] == pytest.approx(0.5, abs=1e-9)
    lo, hi = lc["win_rate_ci95"]
    assert lo < 0.5 < hi


def test_equal_lengths_give_the_raw_win_rate():
    """No length difference anywhere: the feature is 0, the model is the intercept alone, and the
    maximum-likelihood sigmoid(theta) is the mean outcome, (5 + 1.5) / 10 = 0.65."""
    y = np.array([1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0, 0], dtype=float)
    lc = length_controlled_win_rate(y, np.zeros(10), n_resamples=20, ridge=0.0)
    assert lc["win_rate"] == pytest.approx(0.65, abs=1e-9) and lc["scale"] == 0 and lc["slope"] == 0


def test_ridge_keeps_separable_data_finite_and_barely_moves_a_fit():
    """All wins, or every win shorter than every loss, have no finite maximum-likelihood fit; the
    penalised one converges and stays near the data. On 100 noisy prompts the default penalty moves
    sigmoid(theta) by less than 1e-3 from the unpenalised fit."""
    lc = length_controlled_win_rate(np.ones(4), np.array([-3.0, 5, 1, 2]), n_resamples=20)
    assert lc["converged"] and 0.95 < lc["win_rate"] < 1
    lc = length_controlled_win_rate(np.array([1.0, 1, 0, 0]), np.array([-9.0, -4, 3, 8]), n_resamples=20)
    assert lc["converged"] and 0 < lc["win_rate"] < 1 and lc["slope"] < 0
    rng = np.random.default_rng(3)
    d = rng.normal(0, 20, 100)
    y = (rng.random(100) < 1 / (1 + np.exp(-(0.3 - 0.02 * d)))).astype(float)
    a = length_controlled_win_rate(y, d, n_resamples=10)["win_rate"]
    b = length_controlled_win_rate(y, d, n_resamples=10, ridge=0.0)["win_rate"]
    assert abs(a - b) < 1e-3


def test_length_feature_is_tanh_of_standardised_difference():
    """d = (-2, 0, 2): population std sqrt(8/3); feature tanh(d / s)."""
    x, s = length_feature([-2.0, 0.0, 2.0])
    assert s == pytest.approx(math.sqrt(8 / 3))
    np.testing.assert_allclose(x, np.tanh(np.array([-2.0, 0.0, 2.0]) / math.sqrt(8 / 3)))


def test_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(5)
    d = rng.normal(-5, 15, 100)
    y = prompt_outcomes(rng.normal(0.2 - 0.02 * d, 1), np.zeros(100))
    a = length_controlled_win_rate(y, d, n_resamples=300, seed=4)
    b = length_controlled_win_rate(y, d, n_resamples=300, seed=4)
    assert a == b
    assert a["win_rate_ci95"][0] <= a["win_rate"] <= a["win_rate_ci95"][1]


def test_buckets_by_hand():
    """d = (-30, -5, 0, 4, 12, 40), outcomes (1, 1, 0.5, 0, 0, 1), tolerance 10:
    shorter {-30}: 1 prompt, win rate 1; similar {-5, 0, 4}: (1 + 0.5 + 0) / 3 = 0.5;
    longer {12, 40}: (0 + 1) / 2 = 0.5."""
    b = length_bucket_win_rates([1, 1, 0.5, 0, 0, 1], [-30, -5, 0, 4, 12, 40], tolerance=10, n_resamples=50)
    assert (b["shorter"]["n"], b["similar"]["n"], b["longer"]["n"]) == (1, 3, 2)
    assert b["shorter"]["win_rate"] == 1.0 and b["similar"]["win_rate"] == pytest.approx(0.5)
    assert b["longer"]["win_rate"] == 0.5
    empty = length_bucket_win_rates([1.0], [0.0], tolerance=10, n_resamples=5)
    assert empty["shorter"]["n"] == 0 and math.isnan(empty["shorter"]["win_rate"])


def test_summary_holds_both_views():
    s = length_control_summary([1.0, 0.0, 0.5, 1.0], [-12.0, 20.0, 3.0, -1.0], n_resamples=20)
    assert s["mean_length_diff_tokens"] == pytest.approx(2.5)
    assert set(s) == {"mean_length_diff_tokens", "length_controlled", "length_buckets"}
    assert s["length_buckets"]["similar"]["n"] == 2
