"""Collect experiments/quality.sh's results into one small JSON and a markdown table.

    python experiments/quality_summary.py RUN OUT.json     # also writes OUT.md beside it

Reads RUN/eval/{rm,rm_bf16,implicit,dpo}/summary.json, RUN/rm_bf16/update_kept.json and
RUN/trl/summary.json; a missing one is reported as missing, not guessed.
"""
import datetime
import json
import sys
from pathlib import Path


def read(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def accuracy(s):
    return None if s is None else {"accuracy": s["accuracy"], "ci95": s["accuracy_ci95"], "n": s["n"],
                                   "ties": s["ties"]}


def paired_difference(run, a, b):
    """Accuracy of eval a minus eval b on the same pairs, with a paired 95 % bootstrap interval
    (the pairs resampled together, so the spread of the pairs' difficulty cancels)."""
    pa, pb = read(run / f"eval/{a}/pairs.json"), read(run / f"eval/{b}/pairs.json")
    if pa is None or pb is None:
        return None
    import numpy as np
    from minialign.evaluation import bootstrap_ci
    assert [r["line"] for r in pa] == [r["line"] for r in pb], "not the same pairs"
    d = np.array([float(x["correct"]) - float(y["correct"]) for x, y in zip(pa, pb)])
    return {"difference": float(d.mean()), "ci95": bootstrap_ci(d), "n": int(d.size),
            "pairs_flipped": int((d != 0).sum())}


def main():
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    dpo = read(run / "eval/dpo/summary.json")
    implicit = read(run / "eval/implicit/summary.json")
    summary = {
        "date": datetime.date.today().isoformat(),
        "split": read(run / "data/split.json"),
        "reward_model_fp32_save": accuracy(read(run / "eval/rm/summary.json")),
        "reward_model_same_weights_bf16": accuracy(read(run / "eval/rm_bf16/summary.json")),
        "bf16_rounding_keeps": read(run / "rm_bf16/update_kept.json"),
        "fp32_minus_bf16": paired_difference(run, "rm", "rm_bf16"),
        "trl_reward_trainer": accuracy(read(run / "trl/summary.json")),
        "dpo_implicit": accuracy(implicit),
        "dpo_kl": None if dpo is None else dpo["kl"],
        "dpo_win_rate": None if dpo is None else {"win_rate": dpo["win_rate"], "ci95": dpo["win_rate_ci95"],
                                                  "n": dpo["n"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")

    def row(name, a):
        if a is None:
            return f"| {name} | missing | | |"
        return f"| {name} | {a['accuracy']:.3f} | {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f} | {a['n']} |"

    lines = [f"# Quality on real material ({summary['date']})", "",
             "| held-out preference accuracy | accuracy | 95% CI | pairs |", "|---|---|---|---|",
             row("minialign RM, saved fp32 (auto)", summary["reward_model_fp32_save"]),
             row("the same weights rounded to bf16", summary["reward_model_same_weights_bf16"]),
             row("TRL RewardTrainer, same split and settings", summary["trl_reward_trainer"]),
             row("DPO implicit reward", summary["dpo_implicit"])]
    d = summary["fp32_minus_bf16"]
    if d:
        lines += ["", f"fp32 minus bf16 save, same pairs: {d['difference']:+.3f} (paired 95% CI "
                      f"{d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}; {d['pairs_flipped']} of {d['n']} pairs change side)."]
    k = summary["bf16_rounding_keeps"]
    if k:
        lines += ["", f"bf16 rounding of the RM keeps {100 * k['kept']:.1f} % of the update (cosine {k['cosine']:.4f}); "
                      f"{100 * k['survived']:.1f} % of the {k['changed']:,} changed weights differ from the start."]
    if summary["dpo_kl"]:
        kl = summary["dpo_kl"]
        lines += [f"DPO KL from the base on its own answers: {kl['kl_per_token']:.5f} per token "
                  f"(95% CI {kl['kl_per_token_ci95'][0]:.5f}-{kl['kl_per_token_ci95'][1]:.5f}, {kl['answers']} answers)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
