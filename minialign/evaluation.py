"""Evaluation statistics: accuracy and win rate with ties kept apart, bootstrap intervals,
length bias, repetition, the implicit reward of a DPO policy and its KL from the base.

The statistics are pure functions of plain numbers (numpy only), so they can be tested by hand;
the summaries below assemble them into the dicts that evaluate.py writes to summary.json. The
models that produce those numbers run in eval_models.py; win rates controlled for answer length
are in minialign.length_control.

Conventions used throughout:
  * "correct" / "win" is a STRICT inequality: a tie (equal scores) is neither a win nor a loss
    and is counted on its own, so accuracy + tie_rate + error_rate = 1. A model that scores
    everything equally has accuracy 0 and tie_rate 1, never a flattering 0.5.
  * Intervals are 95% percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13):
    resample the items with replacement, recompute the statistic, take the 2.5% and 97.5%
    quantiles. They describe the sampling noise of the evaluation set, not of training.
"""
from __future__ import annotations

import numpy as np

N_RESAMPLES = 1000      # bootstrap resamples: the 2.5% quantile then rests on ~25 values, stable to ~0.5 pt
CONFIDENCE = 0.95
REPETITION_NGRAM = 3    # token 3-grams: long enough that ordinary text rarely repeats them by chance


# ------------------------------------------------------------------------- basic statistics

def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(R, n) indices of R bootstrap resamples of n items (with replacement). The same seed gives
    the same resamples, so statistics bootstrapped with one seed share them."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_ci(values, stat=np.mean, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(values).

    values: (N,) numbers. stat: called as stat(samples, axis=-1) on an (n_resamples, N) array
    (np.mean, np.median, ... all accept that). The same seed gives the same interval.
    Returns (low, high); (nan, nan) for an empty input.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    stats = stat(values[resample_indices(values.size, n_resamples, seed)], axis=-1)  # (R,)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def compare_scores(a, b) -> dict:
    """How often a > b, a == b, a < b, pair by pair (the shared core of accuracy and win rate).

    Returns counts (n, greater, ties, less) and the rates greater_rate, tie_rate, less_rate."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"compare_scores: shapes differ, {a.shape} vs {b.shape}")
    n = int(a.size)
    greater, ties = int((a > b).sum()), int((a == b).sum())
    less = n - greater - ties
    d = max(n, 1)  # rates of an empty comparison are 0, not a division error
    return {"n": n, "greater": greater, "ties": ties, "less": less,
            "greater_rate": greater / d, "tie_rate": ties / d, "less_rate": less / d}


def accuracy_with_ties(better_scores, worse_scores) -> dict:
    """Preference accuracy: the share of pairs where the better response scores strictly higher.

    Returns n, correct, ties, wrong, accuracy, tie_rate, and accuracy_ties_half (a tie counted
    as half right, the convention of some leaderboards; reported for comparison only)."""
    c = compare_scores(better_scores, worse_scores)
    n = max(c["n"], 1)
    return {"n": c["n"], "correct": c["greater"], "ties": c["ties"], "wrong": c["less"],
            "accuracy": c["greater_rate"], "tie_rate": c["tie_rate"],
            "accuracy_ties_half": (c["greater"] + 0.5 * c["ties"]) / n}


def win_rate(policy_scores, base_scores) -> dict:
    """Win rate of the policy over the base on the same prompts: strictly higher reward.

    Returns n, wins, ties, losses, win_rate, tie_rate, loss_rate, and win_rate_ties_half
    ((wins + ties / 2) / n: a tie as half a win, as AlpacaEval and Chatbot Arena count it)."""
    c = compare_scores(policy_scores, base_scores)
    return {"n": c["n"], "wins": c["greater"], "ties": c["ties"], "losses": c["less"],
            "win_rate": c["greater_rate"], "tie_rate": c["tie_rate"], "loss_rate": c["less_rate"],
            "win_rate_ties_half": c["greater_rate"] + 0.5 * c["tie_rate"]}


def prompt_outcomes(policy_scores, base_scores) -> np.ndarray:
    """(N,) outcome per prompt: 1.0 where the policy scores strictly higher, 0.5 on a tie, 0.0 where
    lower. Their mean is win_rate_ties_half; the strict win rate is the mean of (outcome == 1)."""
    p, b = np.asarray(policy_scores, dtype=float), np.asarray(base_scores, dtype=float)
    if p.shape != b.shape:
        raise ValueError(f"prompt_outcomes: shapes differ, {p.shape} vs {b.shape}")
    return np.where(p > b, 1.0, np.where(p == b, 0.5, 0.0))


def pearson(x, y) -> float:
    """Pearson correlation cov(x, y) / (std x * std y); nan when either side is constant
    or there are fewer than two points (the correlation is undefined, not zero)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or x.size != y.size:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def repetition_rate(token_ids, n: int = REPETITION_NGRAM) -> float:
    """Share of a sequence's token n-grams that already occurred earlier in the same sequence.

    = 1 - (distinct n-grams / all n-grams). 0 for text that never repeats an n-gram; it tends
    to 1 for a degenerate loop ("the the the ..." has 3-gram repetition (L-3)/(L-2)).
    Sequences shorter than n have no n-grams and count as 0.
    Example: [1, 2, 3, 1, 2, 3] has 3-grams 123, 231, 312, 123 -> 1 repeat of 4 = 0.25.
    """
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def mean_std(values) -> tuple[float, float]:
    """(mean, population std) as floats; (nan, nan) when empty."""
    v = np.asarray(values, dtype=float)
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


# ------------------------------------------------------------------------------ length bias

def length_bias(better_scores, worse_scores, better_lengths, worse_lengths) -> dict:
    """Does the reward model simply prefer longer answers?

    reward_length_pearson: correlation of reward with length over all 2N responses.
    margin_length_pearson: correlation of (r_better - r_worse) with (len_better - len_worse),
        which removes the prompt's effect (both answers share it).
    accuracy_better_longer / _shorter / _equal: accuracy on the pairs where the human-preferred
        answer is the longer one / the shorter one / as long; a length-driven model is good on
        the first group and bad on the second.
    prefers_longer_rate: share of unequal-length pairs where the longer answer scores higher.
    better_is_longer_rate: the data's own bias; the accuracy of "always pick the longer answer".
    """
    b, w = np.asarray(better_scores, float), np.asarray(worse_scores, float)
    lb, lw = np.asarray(better_lengths, float), np.asarray(worse_lengths, float)
    longer, shorter, equal = lb > lw, lb < lw, lb == lw

    def acc(mask):
        return float((b[mask] > w[mask]).mean()) if mask.any() else float("nan")

    unequal = ~equal
    longer_score = np.where(longer, b, w)[unequal]   # score of the longer answer of each pair
    shorter_score = np.where(longer, w, b)[unequal]
    return {
        "reward_length_pearson": pearson(np.concatenate([b, w]), np.concatenate([lb, lw])),
        "margin_length_pearson": pearson(b - w, lb - lw),
        "accuracy_better_longer": acc(longer), "n_better_longer": int(longer.sum()),
        "accuracy_better_shorter": acc(shorter), "n_better_shorter": int(shorter.sum()),
        "accuracy_equal_length": acc(equal), "n_equal_length": int(equal.sum()),
        "prefers_longer_rate": float((longer_score > shorter_score).mean()) if unequal.any() else float("nan"),
        "better_is_longer_rate": float(longer.mean()) if b.size else float("nan"),
    }


# -------------------------------------------------------------------------------- summaries

def reward_model_summary(better_scores, better_lengths, worse_scores, worse_lengths,
                         n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Headline numbers of a reward model on held-out preference pairs (summary.json of `rm`)."""
    b, w = np.asarray(better_scores, float), np.asarray(worse_scores, float)
    acc = accuracy_with_ties(b, w)
    margin = b - w
    b_mean, b_std = mean_std(b)
    w_mean, w_std = mean_std(w)
    m_mean, m_std = mean_std(margin)
    return {
        **acc,
        "accuracy_ci95": bootstrap_ci((b > w).astype(float), np.mean, n_resamples, seed),
        "mean_margin": m_mean, "std_margin": m_std,
        "mean_margin_ci95": bootstrap_ci(margin, np.mean, n_resamples, seed),
        "better_reward_mean": b_mean, "better_reward_std": b_std,
        "worse_reward_mean": w_mean, "worse_reward_std": w_std,
        "length_bias": length_bias(b, w, better_lengths, worse_lengths),
    }


def per_prompt_means(values, samples_per_prompt: int = 1) -> np.ndarray:
    """(N * k,) values of k consecutive samples per prompt -> (N,) means, one per prompt."""
    v = np.asarray(values, float)
    if v.size % samples_per_prompt:
        raise ValueError(f"{v.size} values do not split into groups of samples_per_prompt={samples_per_prompt}")
    return v.reshape(-1, samples_per_prompt).mean(axis=1)


def policy_comparison_summary(base_scores, policy_scores, base_token_ids, policy_token_ids,
                              base_finished, policy_finished, n_resamples: int = N_RESAMPLES,
                              seed: int = 0, samples_per_prompt: int = 1) -> dict:
    """Policy vs base on the same prompts (summary.json of `dpo`).

    Scores, token ids and finished flags are given per sample: k = samples_per_prompt
    consecutive samples for each of the N prompts. The win rate and the reward gain compare
    the two models prompt by prompt on their mean reward over the k samples, an estimate of
    each model's expected reward on that prompt; with k > 1 a tie needs all k answers equal.
    Per model, over all samples: reward mean and std, stop_rate (share of responses that ended
    with an end-of-turn token rather than hitting max_new_tokens), mean length in tokens and
    mean repetition_rate, so a policy that wins by rambling or looping is visible."""
    base = per_prompt_means(base_scores, samples_per_prompt)
    pol = per_prompt_means(policy_scores, samples_per_prompt)
    gain = pol - base
    gain_mean, gain_std = mean_std(gain)

    def per_model(scores, token_ids, finished):
        mean, std = mean_std(scores)
        return {"reward_mean": mean, "reward_std": std,
                "stop_rate": float(np.mean(finished)) if len(finished) else float("nan"),
                "mean_length_tokens": mean_std([len(t) for t in token_ids])[0],
                f"repetition_{REPETITION_NGRAM}gram": mean_std([repetition_rate(t) for t in token_ids])[0]}

    outcome = prompt_outcomes(pol, base)  # (N,) 1, 1/2, 0
    return {
        **win_rate(pol, base),
        "win_rate_ci95": bootstrap_ci((outcome == 1.0).astype(float), np.mean, n_resamples, seed),
        "win_rate_ties_half_ci95": bootstrap_ci(outcome, np.mean, n_resamples, seed),
        "mean_gain": gain_mean, "std_gain": gain_std,
        "mean_gain_ci95": bootstrap_ci(gain, np.mean, n_resamples, seed),
        "samples_per_prompt": samples_per_prompt,
        "base": per_model(base_scores, base_token_ids, base_finished),
        "policy": per_model(policy_scores, policy_token_ids, policy_finished),
    }


def implicit_reward_summary(chosen_rewards, rejected_rewards, n_resamples: int = N_RESAMPLES,
                            seed: int = 0) -> dict:
    """Accuracy of the DPO implicit reward on preference pairs (summary.json of `implicit`)."""
    c, r = np.asarray(chosen_rewards, float), np.asarray(rejected_rewards, float)
    margin_mean, margin_std = mean_std(c - r)
    return {**accuracy_with_ties(c, r),
            "accuracy_ci95": bootstrap_ci((c > r).astype(float), np.mean, n_resamples, seed),
            "mean_margin": margin_mean, "std_margin": margin_std,
            "chosen_reward_mean": mean_std(c)[0], "rejected_reward_mean": mean_std(r)[0]}


def top_k_changes(gains, k: int) -> tuple[list[int], list[int]]:
    """Indices of the k largest gains (best first) and the k largest losses (worst first).
    The two lists never share an index (with fewer than 2k items the losses list is shorter)."""
    order = np.argsort(np.asarray(gains, float), kind="stable")  # ascending
    best = [int(i) for i in order[::-1][:k]]
    worst = [int(i) for i in order[:k] if int(i) not in best]
    return best, worst


# ------------------------------------------------------- KL from the base, on the policy's samples

def sampled_kl(policy_logps, base_logps, n_tokens, samples_per_prompt: int = 1,
               n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """KL of the policy from its base, estimated on the policy's own answers.

    For each answer y_i (n_i tokens, its stop token included) the log-ratio
    l_i = log pi(y_i|x) - log pi_base(y_i|x) = sum_t [log pi(y_t|.) - log pi_base(y_t|.)], both
    models teacher-forced on the same tokens (eval_models.answer_logprobs). Returns
        kl_per_token  = sum_i l_i / sum_i n_i   the mean per-token log-ratio over all answer tokens
        kl_per_answer = mean_i l_i              the sequence-level log-ratio, per answer
    with 95% bootstrap intervals over prompts (the k = samples_per_prompt consecutive answers of a
    prompt move together), and the share of answers with l_i < 0.

    If the answers were sampled from pi itself (temperature 1, top-p 1), kl_per_answer is an
    unbiased Monte Carlo estimate of KL(pi || pi_base) = E_{y~pi}[log pi(y) - log pi_base(y)],
    the quantity DPO's beta trades against reward (Rafailov et al. 2023, eq. 3). At a lower
    temperature or top-p < 1 the answers come from a sharpened pi, and the same average is the
    expected log-ratio under that sampling distribution: the drift of the answers that were
    actually judged (it is not a KL then, and is not guaranteed to be >= 0). A policy equal to
    its base gives exactly 0 either way.
    Example: l = (1, 0, 2, -1) over n = (1, 2, 3, 2) tokens -> per token 2/8 = 0.25, per answer 0.5.
    """
    lp, lb, n = (np.asarray(v, dtype=float) for v in (policy_logps, base_logps, n_tokens))
    ratio = lp - lb                                                        # (N * k,)
    if ratio.size == 0:
        nan = float("nan")
        return {"kl_per_token": nan, "kl_per_answer": nan, "kl_per_token_ci95": (nan, nan),
                "kl_per_answer_ci95": (nan, nan), "negative_share": nan, "answers": 0, "tokens": 0}
    by_prompt = ratio.reshape(-1, samples_per_prompt).sum(axis=1)         # (N,) summed over a prompt's k answers
    tokens = n.reshape(-1, samples_per_prompt).sum(axis=1)                 # (N,)
    idx = resample_indices(by_prompt.size, n_resamples, seed)              # (R, N)
    alpha = (1.0 - CONFIDENCE) / 2
    per_token = by_prompt[idx].sum(axis=1) / np.maximum(tokens[idx].sum(axis=1), 1)  # (R,) ratio of sums
    per_answer = by_prompt[idx].mean(axis=1) / samples_per_prompt                    # (R,)
    return {"kl_per_token": float(ratio.sum() / max(n.sum(), 1)), "kl_per_answer": float(ratio.mean()),
            "kl_per_token_ci95": tuple(float(q) for q in np.quantile(per_token, [alpha, 1 - alpha])),
            "kl_per_answer_ci95": tuple(float(q) for q in np.quantile(per_answer, [alpha, 1 - alpha])),
            "negative_share": float((ratio < 0).mean()), "answers": int(ratio.size), "tokens": int(n.sum())}
