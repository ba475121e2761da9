"""experiments/sweep_report.py on made-up evaluation summaries of two runs (one with an intermediate
checkpoint): the table has a row per run with the numbers of its files, the JSON holds them, and
both figures are real PNGs. A few seconds (the interpreter and matplotlib)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dpo_summary(win, gain, kl):
    bucket = {"n": 10, "win_rate": 0.5, "win_rate_ci95": [0.3, 0.7]}
    return {"n": 20, "samples_per_prompt": 4, "wins": int(20 * win), "ties": 0, "losses": 20 - int(20 * win),
            "win_rate": win, "win_rate_ci95": [win - 0.1, win + 0.1], "win_rate_ties_half": win,
            "win_rate_ties_half_ci95": [win - 0.1, win + 0.1], "mean_gain": gain, "mean_gain_ci95": [gain - 0.1, gain + 0.1],
            "length_controlled": {"win_rate": win - 0.05, "win_rate_ci95": [win - 0.2, win + 0.1], "slope": -1.0},
            "length_buckets": {"tolerance_tokens": 10, "shorter": bucket, "similar": bucket, "longer": bucket},
            "mean_length_diff_tokens": -5.0,
            "kl": {"kl_per_token": kl / 50, "kl_per_token_ci95": [0, kl / 25], "kl_per_answer": kl,
                   "kl_per_answer_ci95": [kl / 2, kl * 2]},
            "base": {"mean_length_tokens": 60.0, "stop_rate": 0.4, "reward_mean": 1.0},
            "policy": {"mean_length_tokens": 55.0, "stop_rate": 0.5, "reward_mean": 1.0 + gain}}


def write(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_sweep_report(tmp_path):
    root = tmp_path / "sweep"
    for name, lr, win, gain, kl in (("slow", 5e-6, 0.5, 0.0, 0.1), ("fast", 5e-5, 0.7, 0.3, 4.0)):
        write(root / "dpo" / name / "run_config.json", {"lr": lr, "beta": 0.1})
        (root / "dpo" / name / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n"
                                                                   for s in (1, 2, 3)))
        write(root / "eval" / name / "dpo" / "summary.json", dpo_summary(win, gain, kl))
        write(root / "eval" / name / "implicit" / "summary.json", {"n": 50, "accuracy": 0.6, "accuracy_ci95": [0.5, 0.7]})
    write(root / "eval" / "fast" / "step-000002" / "summary.json", dpo_summary(0.6, 0.1, 1.0))
    judge = tmp_path / "rm.json"
    write(judge, {"n": 300, "accuracy": 0.62, "accuracy_ci95": [0.57, 0.68],
                  "length_bias": {"accuracy_better_shorter": 0.85, "accuracy_better_longer": 0.31,
                                  "reward_length_pearson": -0.71}})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "experiments/sweep_report.py", "--root", str(root), "slow", "fast", "--judge", str(judge),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[1].startswith("| slow | 5e-06 | 0.1 | 3 |")
    assert "**0.700** [0.60, 0.80]" in table[2] and "+0.300" in table[2]
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["slow", "fast"] and rows[1]["kl_per_answer"] == 4.0
    for figure in ("frontier.png", "win_rates.png"):
        assert (out / figure).read_bytes()[:8] == PNG_SIGNATURE
