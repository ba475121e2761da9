"""Gather a DPO sweep's evaluations into one table (markdown + JSON) and two figures.

    python experiments/sweep_report.py --root RUN NAME... --judge RM_SUMMARY --output DIR [--timings FILE]

Each NAME is one DPO run of experiments/hh_dpo_sweep.sh, with under RUN
    dpo/NAME/run_config.json, metrics.jsonl       the training run (learning rate, beta, steps)
    eval/NAME/dpo/summary.json                    evaluate.py dpo: win rates, gain, length, KL
    eval/NAME/implicit/summary.json               evaluate.py implicit: held-out implicit-reward accuracy
    eval/NAME/step-NNNNNN/summary.json            (optional) evaluate.py dpo of an intermediate checkpoint
--judge is evaluate.py rm's summary.json of the reward model that judged every run.

Writes to --output: sweep.json (every row, the base and the judge), sweep.md (the table and how to
read it), frontier.png (reward gain against KL, one point per run and checkpoint, the base at the
origin) and win_rates.png (strict, ties-as-1/2 and length-controlled win rate per run).
Nothing is computed here that evaluate.py did not write: this is bookkeeping.
"""
import argparse
import json
import re
from pathlib import Path

from minialign.errors import read_json
from minialign.plots import reward_kl_frontier_figure, win_rates_figure

CHECKPOINT_EVAL = re.compile(r"step-(\d+)")


def last_train_step(metrics: Path) -> int | None:
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines() if line.strip()]
    return max((s for s in steps if isinstance(s, int)), default=None)


def run_row(root: Path, name: str) -> dict:
    """One table row: the run's settings and the numbers its evaluations wrote."""
    config = read_json(root / "dpo" / name / "run_config.json", "the DPO run's settings")
    dpo = read_json(root / "eval" / name / "dpo" / "summary.json", "evaluate.py dpo's summary")
    implicit = read_json(root / "eval" / name / "implicit" / "summary.json", "evaluate.py implicit's summary")
    lc, kl = dpo["length_controlled"], dpo.get("kl", {})
    return {
        "run": name, "lr": config["lr"], "beta": config["beta"],
        "steps": last_train_step(root / "dpo" / name / "metrics.jsonl"),
        "prefix_sharing": config.get("prefix_sharing"),
        "implicit_accuracy": implicit["accuracy"], "implicit_accuracy_ci95": implicit["accuracy_ci95"],
        "implicit_pairs": implicit["n"],
        "prompts": dpo["n"], "samples_per_prompt": dpo["samples_per_prompt"],
        "wins": dpo["wins"], "ties": dpo["ties"], "losses": dpo["losses"],
        "win_rate": dpo["win_rate"], "win_rate_ci95": dpo["win_rate_ci95"],
        "win_rate_ties_half": dpo["win_rate_ties_half"], "win_rate_ties_half_ci95": dpo["win_rate_ties_half_ci95"],
        "lc_win_rate": lc["win_rate"], "lc_win_rate_ci95": lc["win_rate_ci95"], "lc_length_slope": lc["slope"],
        "similar_length": dpo["length_buckets"]["similar"], "length_tolerance": dpo["length_buckets"]["tolerance_tokens"],
        "gain": dpo["mean_gain"], "gain_ci95": dpo["mean_gain_ci95"],
        "kl_per_token": kl.get("kl_per_token"), "kl_per_token_ci95": kl.get("kl_per_token_ci95"),
        "kl_per_answer": kl.get("kl_per_answer"), "kl_per_answer_ci95": kl.get("kl_per_answer_ci95"),
        "length_base": dpo["base"]["mean_length_tokens"], "length_policy": dpo["policy"]["mean_length_tokens"],
        "length_diff": dpo["mean_length_diff_tokens"],
        "stop_rate_base": dpo["base"]["stop_rate"], "stop_rate_policy": dpo["policy"]["stop_rate"],
        "reward_base": dpo["base"]["reward_mean"], "reward_policy": dpo["policy"]["reward_mean"],
    }


def frontier_points(root: Path, row: dict) -> list[dict]:
    """The run's intermediate checkpoints (eval/NAME/step-N) in training order, then its final model."""
    points = []
    for d in sorted((root / "eval" / row["run"]).glob("step-*"), key=lambda d: int(CHECKPOINT_EVAL.fullmatch(d.name)[1])):
        s = read_json(d / "summary.json", "evaluate.py dpo's summary of a checkpoint")
        points.append({"series": row["run"], "label": f"step {int(CHECKPOINT_EVAL.fullmatch(d.name)[1])}",
                       "kl": s["kl"]["kl_per_answer"], "kl_ci95": s["kl"]["kl_per_answer_ci95"],
                       "gain": s["mean_gain"], "gain_ci95": s["mean_gain_ci95"]})
    points.append({"series": row["run"], "label": row["label"], "kl": row["kl_per_answer"],
                   "kl_ci95": row["kl_per_answer_ci95"], "gain": row["gain"], "gain_ci95": row["gain_ci95"]})
    return points


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def ci(pair, spec=".2f"):
    return "" if pair is None else f" [{fmt(pair[0], spec)}, {fmt(pair[1], spec)}]"


def markdown(rows, judge, base, timings) -> str:
    lines = [
        "| run | lr | β | steps | implicit acc. | win rate (strict) | W/T/L | win rate, ties ½ | "
        "length-controlled win rate | similar length: win rate (n) | reward gain | KL per token | KL per answer | "
        "length base → policy | stop rate base → policy |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        sim = r["similar_length"]
        lines.append(
            f"| {r['run']} | {r['lr']:g} | {r['beta']:g} | {r['steps']} | {fmt(r['implicit_accuracy'])}"
            f"{ci(r['implicit_accuracy_ci95'])} | **{fmt(r['win_rate'])}**{ci(r['win_rate_ci95'])} | "
            f"{r['wins']}/{r['ties']}/{r['losses']} | {fmt(r['win_rate_ties_half'])}{ci(r['win_rate_ties_half_ci95'])} | "
            f"**{fmt(r['lc_win_rate'])}**{ci(r['lc_win_rate_ci95'])} | {fmt(sim['win_rate'])} ({sim['n']}) | "
            f"{fmt(r['gain'], '+.3f')}{ci(r['gain_ci95'], '+.3f')} | {fmt(r['kl_per_token'], '.4f')}"
            f"{ci(r['kl_per_token_ci95'], '.4f')} | {fmt(r['kl_per_answer'], '.2f')} | "
            f"{r['length_base']:.1f} → {r['length_policy']:.1f} | {r['stop_rate_base']:.2f} → {r['stop_rate_policy']:.2f} |")
    lb = judge["length_bias"]
    text = [
        f"# DPO sweep: {rows[0]['prompts'] if rows else 0} held-out prompts × {rows[0]['samples_per_prompt'] if rows else 0} "
        "answers per model, judged by the reward model\n",
        f"Judge (reward model) on {judge['n']} held-out pairs: accuracy {judge['accuracy']:.3f}"
        f"{ci(judge['accuracy_ci95'], '.3f')}; right on {lb['accuracy_better_shorter']:.2f} of the pairs where the "
        f"better answer is the shorter one and {lb['accuracy_better_longer']:.2f} where it is the longer one; "
        f"reward-length correlation {lb['reward_length_pearson']:+.2f}.\n",
        f"Base: mean reward {base['reward_mean']:.3f}, mean length {base['mean_length_tokens']:.1f} tokens, "
        f"stop rate {base['stop_rate']:.2f}.\n",
        *lines, "",
        "Intervals are 95% bootstrap intervals over prompts (pairs for the implicit accuracy). W/T/L: prompts won, "
        "tied, lost on the mean reward of the answers. Length-controlled: the win rate a logistic model of the "
        "outcome on tanh(length difference / s) predicts at equal length (AlpacaEval 2). Similar length: "
        f"prompts where the policy's mean answer length is within {rows[0]['length_tolerance'] if rows else '–'} tokens "
        "of the base's. KL: mean log-ratio log π − log π_base on the policy's own sampled answers, per token and "
        "per answer (the stop token included).",
    ]
    if timings:
        text += ["", "Wall time per stage (seconds): " + ", ".join(f"{k} {v}" for k, v in timings) + "."]
    return "\n".join(text) + "\n"


def read_timings(path):
    if not path or not Path(path).is_file():
        return []
    rows = [line.split("\t") for line in Path(path).read_text().splitlines()[1:] if line.strip()]
    return [(r[0], r[1]) for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, type=Path, help="the sweep's folder ($RUN of hh_dpo_sweep.sh)")
    p.add_argument("names", nargs="+", help="the runs, in the order of the table")
    p.add_argument("--judge", required=True, type=Path, help="evaluate.py rm's summary.json of the judge")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--timings", default=None, help="timings.tsv of the sweep (stage, seconds, load)")
    args = p.parse_args()

    rows = [run_row(args.root, name) for name in args.names]
    for r in rows:
        r["label"] = f"{r['run']} (lr {r['lr']:g}, β {r['beta']:g})"
    base = read_json(args.root / "eval" / args.names[0] / "dpo" / "summary.json", "evaluate.py dpo's summary")["base"]
    judge = read_json(args.judge, "evaluate.py rm's summary")
    args.output.mkdir(parents=True, exist_ok=True)
    timings = read_timings(args.timings)
    (args.output / "sweep.json").write_text(json.dumps(
        {"runs": rows, "base": base, "judge": judge, "timings_s": dict(timings)}, indent=2) + "\n")
    (args.output / "sweep.md").write_text(markdown(rows, judge, base, timings))
    points = [pt for r in rows for pt in frontier_points(args.root, r)]
    if all(pt["kl"] is not None for pt in points):
        reward_kl_frontier_figure(points, args.output / "frontier.png")
    win_rates_figure(rows, args.output / "win_rates.png")
    print((args.output / "sweep.md").read_text())
    print(f"wrote {args.output}/sweep.json, sweep.md, frontier.png, win_rates.png")


if __name__ == "__main__":
    main()
