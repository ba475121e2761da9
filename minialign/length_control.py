"""How much of a win rate is length? Win rates of a policy over its base that control for answer length.

A judge that rewards short (or long) answers turns any change of length into wins or losses. Two
views separate that from the rest, both on the per-prompt outcome and length difference:

    o_i = 1 if the policy's mean reward on prompt i is strictly higher, 1/2 on a tie, 0 if lower
    d_i = (policy's mean answer length) - (base's mean answer length) on prompt i, in tokens

1. The length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple Way
   to Debias Automatic Evaluators", the metric of AlpacaEval 2): fit a logistic model of the outcome
   on the length difference,

       P(policy wins on prompt i) = sigmoid(theta + phi * tanh(d_i / s)),   s = std of d over the prompts,

   by maximum likelihood with o_i as a fractional response (a tie is half a win), and report
   sigmoid(theta): the predicted win rate on a prompt where both answers have the same length. The
   question it answers is counterfactual: "what would the win rate be if the policy wrote as long
   as the base?". tanh(d / s) is AlpacaEval 2's feature, kept for two reasons: a few prompts where
   one side hit max_new_tokens and the other answered in a line have huge |d|, and a linear term
   would let them set the slope; tanh saturates them. Dividing by s makes the slope unitless
   (tokens or characters, short or long answers alike). At d = 0 the feature is 0 whatever s is,
   so s changes how the slope is estimated, never what sigmoid(theta) means.

   The assumption: length acts on the judge's verdict only through this one logistic shift, the
   same on every prompt, and what is left (theta) is the part of the policy's advantage that does
   not come with a length change. Length is treated as a bias to remove: if shorter answers are
   really better on these prompts, the control removes real quality too. Prompts are independent.

2. Win rates within length buckets: the same ties-as-half win rate on the prompts where the policy
   answered about as long as the base (|d| <= tolerance), and apart on those where it was shorter
   or longer. No model, fewer prompts.

Intervals are percentile bootstraps over prompts (minialign.evaluation.bootstrap_ci): each resample
refits the whole procedure, s included.
"""
from __future__ import annotations

import numpy as np

from .evaluation import CONFIDENCE, N_RESAMPLES, bootstrap_ci, resample_indices

# A weak L2 penalty (lambda / 2) * (theta^2 + phi^2) on the log-likelihood keeps the fit finite
# when the outcomes are separable (all wins, or every win shorter than every loss: likely in a
# bootstrap resample of a few prompts), where the unpenalised estimate runs off to infinity. On
# 100 prompts it moves a typical sigmoid(theta) by ~1e-4 (tests/test_length_control.py).
RIDGE = 1e-2
NEWTON_TOLERANCE = 1e-10  # stop when no coefficient moves by more than this
NEWTON_MAX_STEPS = 100    # Newton converges in ~5-10 steps here; more means something is wrong
LENGTH_MATCH_TOKENS = 10  # "about as long": within ~one short sentence of each other


def length_feature(length_diff) -> tuple[np.ndarray, float]:
    """AlpacaEval 2's length feature tanh(d / s), s = the standard deviation of d; returns (feature, s).
    All d equal gives s = 0 and a feature of zeros (no length variation to learn from)."""
    d = np.asarray(length_diff, float)
    s = float(d.std()) if d.size else 0.0
    return (np.tanh(d / s) if s > 0 else np.zeros_like(d)), s


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow for large |z|


def fit_logistic(X, y, ridge: float = RIDGE) -> tuple[np.ndarray, bool]:
    """Maximise sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - (ridge / 2) |w|^2, p = sigmoid(X w),
    by Newton's method (= iteratively reweighted least squares). y may be fractional, in [0, 1].

    X: (N, P) design; y: (N,). Returns (w (P,), converged). One Newton step solves
        (X^T W X + ridge I) delta = X^T (y - p) - ridge w,   W = diag(p (1 - p)),
    and is halved while it lowers the objective (the objective is concave, so a full step almost
    always helps; halving guards the rare overshoot far from the optimum)."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    w = np.zeros(X.shape[1])

    def objective(w):
        z = X @ w
        # log p = -log(1 + e^-z), log(1 - p) = -log(1 + e^z), both with logaddexp (no overflow)
        return float(-(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)).sum() - 0.5 * ridge * w @ w)

    for _ in range(NEWTON_MAX_STEPS):
        p = _sigmoid(X @ w)                                               # (N,)
        grad = X.T @ (y - p) - ridge * w                                  # (P,)
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(X.shape[1])  # (P, P), minus the Hessian
        try:
            delta = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:  # only without the penalty: p(1 - p) underflowed to 0 on separable data
            return w, False
        step, before = 1.0, objective(w)
        while objective(w + step * delta) < before and step > 1e-8:
            step /= 2
        w = w + step * delta
        if np.max(np.abs(step * delta)) < NEWTON_TOLERANCE:
            return w, True
    return w, False


def _lc_fit(y, d, ridge: float) -> dict:
    """One length-controlled fit: sigmoid(theta) of the model in the module docstring."""
    x, s = length_feature(d)
    if s == 0:  # no length variation: the model is the intercept alone
        (theta,), converged = fit_logistic(np.ones((len(y), 1)), y, ridge)
        phi = 0.0
    else:
        (theta, phi), converged = fit_logistic(np.stack([np.ones_like(x), x], axis=1), y, ridge)
    return {"win_rate": float(_sigmoid(theta)), "intercept": float(theta), "slope": float(phi), "scale": s,
            "converged": converged}


def length_controlled_win_rate(outcome, length_diff, n_resamples: int = N_RESAMPLES, seed: int = 0,
                               ridge: float = RIDGE, confidence: float = CONFIDENCE) -> dict:
    """The length-controlled win rate sigmoid(theta) (module docstring) with its bootstrap interval.

    outcome: (N,) per-prompt outcomes in [0, 1] (evaluation.prompt_outcomes); length_diff: (N,) policy minus base
    mean answer length. Returns win_rate (sigmoid(theta)), win_rate_ci95, intercept theta, slope phi
    (negative: the judge prefers the shorter side), scale s, converged, bootstrap_not_converged (fits
    of resamples that did not converge; 0 with the default penalty), n; win_rate is nan when N = 0.
    The interval resamples prompts with replacement (the resamples bootstrap_ci draws with this
    seed) and refits each time, s included."""
    y, d = np.asarray(outcome, float), np.asarray(length_diff, float)
    if y.shape != d.shape:
        raise ValueError(f"length_controlled_win_rate: shapes differ, {y.shape} vs {d.shape}")
    if y.size == 0:
        nan = float("nan")
        return {"n": 0, "win_rate": nan, "win_rate_ci95": (nan, nan), "intercept": nan, "slope": nan, "scale": nan,
                "converged": False, "bootstrap_not_converged": 0}
    fit = _lc_fit(y, d, ridge)
    idx = resample_indices(y.size, n_resamples, seed)  # (R, N): the resamples bootstrap_ci draws with this seed
    boot = [_lc_fit(y[i], d[i], ridge) for i in idx]
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile([b["win_rate"] for b in boot], [alpha, 1.0 - alpha])
    return {"n": int(y.size), **fit, "win_rate_ci95": (float(low), float(high)),
            "bootstrap_not_converged": sum(not b["converged"] for b in boot)}


def length_bucket_win_rates(outcome, length_diff, tolerance: float = LENGTH_MATCH_TOKENS,
                            n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Win rate (ties as 1/2) with its bootstrap interval within three length buckets:
    "shorter" d < -tolerance, "similar" |d| <= tolerance, "longer" d > tolerance (policy vs base).
    Returns {bucket: {n, win_rate, win_rate_ci95}} plus the tolerance; an empty bucket has nan."""
    y, d = np.asarray(outcome, float), np.asarray(length_diff, float)
    buckets = {"shorter": d < -tolerance, "similar": np.abs(d) <= tolerance, "longer": d > tolerance}
    out = {"tolerance_tokens": tolerance}
    for name, mask in buckets.items():
        part = y[mask]
        out[name] = {"n": int(mask.sum()), "win_rate": float(part.mean()) if part.size else float("nan"),
                     "win_rate_ci95": bootstrap_ci(part, np.mean, n_resamples, seed)}
    return out


def length_control_summary(outcome, length_diff, n_resamples: int = N_RESAMPLES, seed: int = 0,
                           tolerance: float = LENGTH_MATCH_TOKENS) -> dict:
    """Both views for summary.json: {"length_controlled": ..., "length_buckets": ...}, plus the mean
    length difference (policy minus base, per prompt) that they control for."""
    d = np.asarray(length_diff, float)
    return {"mean_length_diff_tokens": float(d.mean()) if d.size else float("nan"),
            "length_controlled": length_controlled_win_rate(outcome, d, n_resamples, seed),
            "length_buckets": length_bucket_win_rates(outcome, d, tolerance, n_resamples, seed)}
