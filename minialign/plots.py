"""Figures: training curves of one or more runs, and the reward-model / DPO evaluation panels.

Every function draws with matplotlib's Agg backend (no display needed, safe on a cluster node),
saves one PNG and closes its figure so that long scripts do not accumulate open figures.
Nothing here computes a statistic: the numbers come from minialign.evaluation or metrics.jsonl.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files only, never try to open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .evaluation import per_prompt_means  # noqa: E402

DPI = 110            # ~1.5k pixels wide for the multi-panel figures; sharp, and small files
SMOOTH_WINDOW = 20   # train curves are noisy per step; a centred mean over 20 steps shows the trend
HIST_BINS = 30       # at most: enough to see the shape of a few hundred rewards without gaps


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; near the ends the window shrinks to what exists, so the curve
    neither lags the raw line (as a trailing mean would) nor bends toward zero at the edges."""
    if window <= 1 or len(values) < 2:
        return values
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo = np.clip(idx - window // 2, 0, len(values))
    hi = np.clip(idx + (window + 1) // 2, 0, len(values))
    return (csum[hi] - csum[lo]) / (hi - lo)


def _series(records: list[dict], split: str, metric: str):
    """(steps, values) of one metric in one split, skipping records that lack it or are non-finite."""
    pts = [(r["step"], float(r[metric])) for r in records
           if r.get("split") == split and isinstance(r.get(metric), (int, float)) and np.isfinite(r[metric])]
    pts.sort()
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def _save(fig, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return out_path


def plot_training_curves(runs, out_path, metrics=("loss", "accuracy"), smooth: int = SMOOTH_WINDOW):
    """One panel per metric; per run a thin raw train line, its smoothed trend, and eval markers.

    runs: list of (label, records), records being the dicts of a run's metrics.jsonl
    ({"step", "split": "train"|"eval", metric: value, ...}). Metrics found in no record are skipped;
    if none is found a single panel says so, so the caller always gets a file. Returns the path.
    """
    present = [m for m in metrics if any(m in r for _, recs in runs for r in recs)]
    n = max(1, len(present))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.0), squeeze=False)
    axes = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, present):
        for i, (label, records) in enumerate(runs):
            color = colors[i % len(colors)]
            steps, vals = _series(records, "train", metric)
            if len(steps):
                ax.plot(steps, vals, color=color, alpha=0.3, linewidth=0.8)
                window = smooth if len(steps) > 2 * smooth else max(1, len(steps) // 5)
                ax.plot(steps, _smooth(vals, window), color=color, linewidth=1.6,
                        label=f"{label} train" + (f" (mean of {window})" if window > 1 else ""))
            steps, vals = _series(records, "eval", metric)
            if len(steps):
                ax.plot(steps, vals, color=color, marker="o", markersize=5, linestyle="--",
                        linewidth=1.0, label=f"{label} eval")
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not present:
        axes[0].text(0.5, 0.5, f"none of {list(metrics)} in the records", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle("training curves")
    fig.tight_layout()
    return _save(fig, out_path)


def _n_bins(n: int) -> int:
    """About 2 sqrt(n) bins, between 5 and HIST_BINS: a dozen values should not spread over 30 bins."""
    return int(np.clip(2 * np.sqrt(max(n, 1)), 5, HIST_BINS))


def _count_axis(ax):
    ax.set_ylabel("count")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts are whole numbers


def _hist_pair(ax, a, b, label_a, label_b, xlabel):
    """Two overlaid histograms on shared bins, so their shapes are directly comparable."""
    both = np.concatenate([a, b])
    bins = np.histogram_bin_edges(both, bins=_n_bins(len(a))) if both.size else HIST_BINS
    ax.hist(a, bins=bins, alpha=0.55, label=f"{label_a} (mean {np.mean(a):.3g})" if len(a) else label_a)
    ax.hist(b, bins=bins, alpha=0.55, label=f"{label_b} (mean {np.mean(b):.3g})" if len(b) else label_b)
    ax.set_xlabel(xlabel)
    _count_axis(ax)
    ax.legend(fontsize=8)


def _identity_line(ax, x, y):
    """The y = x diagonal across the data range: points above it favour the y axis."""
    both = np.concatenate([x, y])
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", linewidth=0.8, linestyle="--",
                label="y = x")


def _difference_hist(ax, diff, xlabel: str, title: str):
    """Histogram of per-item differences with 0 (a tie) and the mean marked."""
    ax.hist(diff, bins=_n_bins(diff.size), color="tab:purple", alpha=0.75)
    ax.axvline(0.0, color="black", linewidth=1.0, linestyle="--", label="0 (tie)")
    if diff.size:
        ax.axvline(float(diff.mean()), color="tab:orange", linewidth=1.2, label=f"mean {diff.mean():.3g}")
    ax.set_xlabel(xlabel)
    _count_axis(ax)
    ax.set_title(title)
    ax.legend(fontsize=8)


def rm_eval_figure(better, worse, out_path, title: str = "reward model on held-out pairs"):
    """Four panels for a reward model on N preference pairs (better/worse: (N,) rewards):
    box plot of the two reward sets; better vs worse scatter coloured by correctness with y = x;
    the two reward distributions overlaid; the distribution of r_better - r_worse with 0 marked."""
    b, w = np.asarray(better, float), np.asarray(worse, float)
    correct = b > w
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))

    ax = axes[0, 0]
    ax.boxplot([b, w], showmeans=True)
    ax.set_xticks([1, 2], ["better (chosen)", "worse (rejected)"])
    ax.set_ylabel("reward")
    ax.set_title("rewards of better vs worse responses")

    ax = axes[0, 1]
    ax.scatter(w[correct], b[correct], s=12, alpha=0.6, color="tab:green", label=f"correct ({correct.sum()})")
    ax.scatter(w[~correct], b[~correct], s=12, alpha=0.6, color="tab:red", label=f"wrong or tie ({(~correct).sum()})")
    _identity_line(ax, w, b)
    ax.set_xlabel("reward of worse response")
    ax.set_ylabel("reward of better response")
    ax.set_title("per pair: above the diagonal = correct")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    _hist_pair(ax, b, w, "better", "worse", "reward")
    ax.set_title("reward distributions")

    _difference_hist(axes[1, 1], b - w, "r(better) - r(worse)",
                     f"reward differences: {correct.mean() if b.size else float('nan'):.1%} > 0")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (n = {b.size})")
    fig.tight_layout()
    return _save(fig, out_path)


def dpo_eval_figure(base, policy, base_lengths, policy_lengths, out_path,
                    title: str = "policy vs base, scored by the reward model", samples_per_prompt: int = 1):
    """Four panels for two models answering the same N prompts, k = samples_per_prompt answers
    each (rewards and lengths in tokens, per answer, k consecutive answers per prompt):
    reward distributions of all answers overlaid; per-prompt gain (mean over the k answers)
    r(policy) - r(base) with 0 marked; base vs policy scatter of the per-prompt means with
    y = x; reward against response length of every answer for both models."""
    sb, sp = np.asarray(base, float), np.asarray(policy, float)  # per answer
    b, p = per_prompt_means(sb, samples_per_prompt), per_prompt_means(sp, samples_per_prompt)
    lb, lp = np.asarray(base_lengths, float), np.asarray(policy_lengths, float)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))

    ax = axes[0, 0]
    _hist_pair(ax, sb, sp, "base", "policy", "reward")
    ax.set_title("reward distributions" + (f" (all {samples_per_prompt} answers per prompt)"
                                           if samples_per_prompt > 1 else ""))

    gain = p - b
    _difference_hist(axes[0, 1], gain, "r(policy) - r(base), same prompt",
                     f"per-prompt reward gain: policy wins {(gain > 0).mean() if gain.size else float('nan'):.1%}")

    ax = axes[1, 0]
    wins = p > b
    ax.scatter(b[wins], p[wins], s=12, alpha=0.6, color="tab:green", label=f"policy higher ({wins.sum()})")
    ax.scatter(b[~wins], p[~wins], s=12, alpha=0.6, color="tab:red", label=f"base higher or tie ({(~wins).sum()})")
    _identity_line(ax, b, p)
    what = "reward" if samples_per_prompt == 1 else f"mean reward of {samples_per_prompt} responses"
    ax.set_xlabel(f"{what}, base")
    ax.set_ylabel(f"{what}, policy")
    ax.set_title("per prompt: above the diagonal = policy wins")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    ax.scatter(lb, sb, s=12, alpha=0.5, label="base")
    ax.scatter(lp, sp, s=12, alpha=0.5, label="policy")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("reward")
    ax.set_title("reward vs length (a slope = length exploitation)")
    ax.legend(fontsize=8)

    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (n = {b.size})")
    fig.tight_layout()
    return _save(fig, out_path)


# ----------------------------------------------------------------------------- a sweep of runs

def _error(value, ci):
    """matplotlib's (2, 1) asymmetric error bar from a value and its (low, high) interval."""
    low, high = (np.nan, np.nan) if ci is None else ci
    return np.array([[value - low], [high - value]]) if np.isfinite([value, low, high]).all() else None


def reward_kl_frontier_figure(points, out_path, kl_label: str = "KL from the base per answer (nats)",
                              title: str = "reward vs KL: what each run bought, and at what drift"):
    """The DPO paper's Figure 2 idea (Rafailov et al. 2023): each point is a policy, at its KL from
    the base (x) and the mean reward gain of its answers over the base's on the same prompts (y),
    both with 95% intervals; the base is the origin. A good run is high and to the left.

    points: dicts with label, series, kl, kl_ci95, gain, gain_ci95. The points of one series (a run's
    checkpoints, in training order) are joined by a line that starts at the base; the last one
    carries the series' label."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = list(dict.fromkeys(p["series"] for p in points))  # first-seen order
    ax.scatter([0], [0], marker="*", s=180, color="black", zorder=3, label="base (origin)")
    for i, name in enumerate(series):
        color = colors[i % len(colors)]
        mine = [p for p in points if p["series"] == name]
        ax.plot([0] + [p["kl"] for p in mine], [0] + [p["gain"] for p in mine], color=color, alpha=0.5, linewidth=1)
        for j, p in enumerate(mine):
            last = j == len(mine) - 1
            ax.errorbar(p["kl"], p["gain"], xerr=_error(p["kl"], p.get("kl_ci95")),
                        yerr=_error(p["gain"], p.get("gain_ci95")), fmt="o" if last else ".", color=color,
                        markersize=7 if last else 5, capsize=3, label=p["label"] if last else None)
            if not last:
                ax.annotate(p["label"], (p["kl"], p["gain"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax.axvline(0.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel(kl_label)
    ax.set_ylabel("mean reward gain over the base (reward-model units)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out_path)


WIN_RATE_KINDS = (("win_rate", "strict (ties lost)"), ("win_rate_ties_half", "ties as 1/2"),
                  ("lc_win_rate", "length-controlled"))


def win_rates_figure(runs, out_path, title: str = "win rate against the base, raw and length-controlled"):
    """Per run three win rates with their 95% intervals side by side: strict, ties as 1/2, and the
    length-controlled one (minialign.length_control); the dashed line at 0.5 is "no better than the
    base". A run whose raw interval clears 0.5 while its length-controlled one does not won by length.

    runs: dicts with label and, for each key of WIN_RATE_KINDS, the value and key + "_ci95"."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(runs) + 2), 4.8))
    x = np.arange(len(runs))
    width = 0.8 / len(WIN_RATE_KINDS)
    for k, (key, label) in enumerate(WIN_RATE_KINDS):
        offset = (k - (len(WIN_RATE_KINDS) - 1) / 2) * width
        for i, r in enumerate(runs):
            ax.errorbar(x[i] + offset, r[key], yerr=_error(r[key], r.get(f"{key}_ci95")), fmt="os^"[k],
                        color=f"C{k}", capsize=3, markersize=6, label=label if i == 0 else None)
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, [r["label"] for r in runs], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate of the policy over the base")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)
