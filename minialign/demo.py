"""The whole demo in one command: the demo world, a reward model, DPO, both evaluations, a judge.

    python -m minialign.demo            world, reward model, DPO, evaluation, judge, summary

The world is built (only when missing) by minialign/demo_build.py; its questions, rules and
judge are in minialign/demo_world.py. This file runs train_rm.py, train_dpo.py and evaluate.py
on it as the user would, each in its own process, then judges the base and policy answers by
the world's rule, so the results are checked by that rule and not only by a learned reward
model, and writes summary.json and report.md under the root (default runs/demo/).
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .cli import ArgumentParser, run_main
from .demo_build import FAST_BASE, FULL_BASE, BaseModelSettings, demo_paths
from .demo_world import kind_of, preferred
from .errors import UserError

REPO = Path(__file__).resolve().parents[1]  # train_rm.py, train_dpo.py and evaluate.py live here
THRESHOLDS = {"rm_accuracy": 0.95, "win_rate": 0.80, "preferred_rate_policy": 0.80}


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo trains with; the scripts get these as command-line flags."""
    base: BaseModelSettings
    rm: tuple[str, ...]  # train_rm.py flags
    dpo: tuple[str, ...]  # train_dpo.py flags
    generation: tuple[str, ...]  # evaluate.py dpo flags


# Sequences are short (< 100 tokens); batches of similar lengths keep padding low.
COMMON = ("--batch_size", "16", "--max_length", "128", "--max_prompt_length", "64", "--group_by_length",
          "--log_every", "20", "--seed", "0")
# Sampling at temperature 1 shows each model's behaviours in their learned proportions. Each
# model answers every prompt 4 times and a prompt is won on the mean reward of its answers:
# with one answer, a prompt where base and policy both give the same right answer word for
# word (the world has few wordings) is a tie, and ties then decided the win rate.
GENERATION = ("--temperature", "1.0", "--top_p", "1.0", "--seed", "0", "--batch_size", "64",
              "--samples_per_prompt", "4")
# The DPO objective of both runs: beta 0.1 plus the NLL term on the chosen answers, which keeps
# the tiny policy fluent (DPO alone drives it to degenerate text; see the notebook).
DPO = COMMON + ("--lr", "3e-4", "--beta", "0.1", "--rpo_alpha", "1.0", "--warmup_ratio", "0.05", "--precompute_ref")
FULL = DemoSettings(
    base=FULL_BASE,
    rm=COMMON + ("--lr", "3e-4", "--epochs", "5", "--warmup_ratio", "0.05"),
    dpo=DPO + ("--epochs", "3"),
    generation=GENERATION + ("--max_new_tokens", "64", "--num_prompts", "1000"),
)
FAST = DemoSettings(  # for the test: a shorter base-model pass, fewer epochs, 40 prompts
    base=FAST_BASE,
    rm=COMMON + ("--lr", "3e-4", "--epochs", "2", "--warmup_ratio", "0.05"),
    dpo=DPO + ("--epochs", "2"),
    generation=GENERATION + ("--max_new_tokens", "48", "--num_prompts", "40"),
)


def log(*args):
    print(*args, flush=True)


def _children_cpu() -> float:
    """CPU seconds used so far by finished child processes (all their threads)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_script(script: str, args, step: str) -> float:
    """Run one of the repository's scripts with this Python, its output streaming through."""
    if not (REPO / script).is_file():
        raise UserError(f"the demo runs {script}, which is not beside the minialign package ({REPO / script}); "
                        f"run the demo from a clone of the repository (pip install -e . there)")
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    log(f"\n=== {step}: {script} {' '.join(map(str, args))}")
    t0, cpu0 = time.time(), _children_cpu()
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"demo: {script} failed with exit code {result.returncode} (command: {' '.join(cmd)})")
    seconds = time.time() - t0
    log(f"=== {step}: done in {seconds:.0f}s (cpu {_children_cpu() - cpu0:.0f}s)")
    return seconds


OWN_OUTPUTS = "demo_outputs.json"  # the folders a demo run created under its root


def clear_own_outputs(root: Path, folders) -> None:
    """Make room for a fresh run: remove the output folders an earlier demo run created (listed
    in root/demo_outputs.json), and refuse to touch a folder the demo did not create."""
    record = root / OWN_OUTPUTS
    ours = set(json.loads(record.read_text())) if record.is_file() else set()
    for d in folders:
        if d.exists() and str(d) not in ours:
            raise UserError(f"{d} exists and was not written by the demo; move it away or choose another --root")
    for d in folders:
        shutil.rmtree(d, ignore_errors=True)
    record.write_text(json.dumps(sorted(str(d) for d in folders), indent=1))


def judge_generations(generations_path) -> dict:
    """Apply the world's rule to the base and policy answers written by `evaluate.py dpo`.

    Returns the preferred-behaviour rate of each model over all its answers, overall and per
    kind of question."""
    rows = json.loads(Path(generations_path).read_text())
    verdicts = {"base": {}, "policy": {}}  # model -> kind -> [bool], one per answer
    prompts: dict[str, int] = {}  # kind -> prompts
    for row in rows:
        kind = kind_of(row["prompt"])
        prompts[kind] = prompts.get(kind, 0) + 1
        for who in verdicts:
            verdicts[who].setdefault(kind, []).extend(preferred(row["prompt"], answer["response"])
                                                      for answer in row[who]["samples"])

    def rate(values):
        return sum(values) / max(len(values), 1)

    out = {f"preferred_rate_{who}": rate([v for vs in kinds.values() for v in vs]) for who, kinds in verdicts.items()}
    out["by_kind"] = {kind: {who: rate(verdicts[who][kind]) for who in verdicts} | {"prompts": prompts[kind]}
                      for kind in sorted(verdicts["base"])}
    return out


def write_report(root: Path, summary: dict, generations_path: Path, examples_per_kind: int = 2) -> Path:
    """report.md: the headline numbers against their thresholds, per-kind rates, a few answers."""
    lines = ["# minialign demo: reward model and DPO on the demo world\n",
             "| metric | value | threshold |", "|---|---|---|"]
    for key in ("rm_accuracy", "win_rate", "preferred_rate_base", "preferred_rate_policy"):
        lines.append(f"| {key} | {summary[key]:.3f} | {THRESHOLDS.get(key, '')} |")
    lines += ["", "Preferred behaviour by kind of question (judged by the world's rule):", "",
              "| kind | prompts | base | policy |", "|---|---|---|---|"]
    for kind, r in summary["by_kind"].items():
        lines.append(f"| {kind} | {r['prompts']} | {r['base']:.2f} | {r['policy']:.2f} |")
    lines.append("\n## Examples\n")
    shown: dict[str, int] = {}
    for row in json.loads(generations_path.read_text()):
        kind = kind_of(row["prompt"])
        if shown.get(kind, 0) >= examples_per_kind:
            continue
        shown[kind] = shown.get(kind, 0) + 1
        lines.append(f"**{kind}**: {row['prompt'][-1]['content']}\n")
        for who in ("base", "policy"):
            r = row[who]["samples"][0]
            verdict = "preferred" if preferred(row["prompt"], r["response"]) else "not preferred"
            lines.append(f"- {who} (reward {r['reward']:.2f}, {verdict}): `{r['response']}`")
        lines.append("")
    lines += ["## Files\n"] + [f"- {name}: `{path}`" for name, path in summary["files"].items()]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_demo(root="runs/demo", fast: bool = False, force: bool = False) -> dict:
    """World, reward model, DPO, both evaluations and the judge; returns the summary dict."""
    t0 = time.time()
    settings = FAST if fast else FULL
    root = Path(root).resolve()  # the scripts run from the repository root
    log(f"=== 1/6 demo world under {root}")
    paths = demo_paths(None, root, base=settings.base, force=force, log=log)
    data = ("--model", paths.base_model, "--data", paths.train_data, "--eval_data", paths.eval_data)
    rm_dir, dpo_dir, eval_dir = root / "rm", root / "dpo", root / "eval"
    clear_own_outputs(root, (rm_dir, dpo_dir, eval_dir))
    stage_seconds = {
        "world": time.time() - t0,
        "train_rm": run_script("train_rm.py", data + ("--output", rm_dir) + settings.rm, "2/6 reward model"),
        "train_dpo": run_script("train_dpo.py", data + ("--output", dpo_dir) + settings.dpo, "3/6 DPO"),
        "evaluate_rm": run_script("evaluate.py", ("rm", "--reward_model", rm_dir / "model", "--data",
                                                  paths.eval_data, "--output", eval_dir / "rm"),
                                  "4/6 reward model on held-out pairs"),
        "evaluate_dpo": run_script("evaluate.py", ("dpo", "--base", paths.base_model, "--policy", dpo_dir / "model",
                                                   "--reward_model", rm_dir / "model", "--data", paths.eval_data,
                                                   "--output", eval_dir / "dpo") + settings.generation,
                                   "5/6 policy vs base on held-out prompts"),
    }
    log("\n=== 6/6 judging base and policy answers by the world's rule")
    generations = eval_dir / "dpo" / "generations.json"
    judged = judge_generations(generations)
    rm_summary = json.loads((eval_dir / "rm" / "summary.json").read_text())
    dpo_summary = json.loads((eval_dir / "dpo" / "summary.json").read_text())
    summary = {
        "rm_accuracy": rm_summary["accuracy"], "win_rate": dpo_summary["win_rate"],
        "preferred_rate_base": judged["preferred_rate_base"],
        "preferred_rate_policy": judged["preferred_rate_policy"],
        "seconds": round(time.time() - t0, 1), "fast": fast,
        "thresholds": THRESHOLDS, "by_kind": judged["by_kind"],
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        "files": {
            "reward model curves": str(rm_dir / "curves.png"), "DPO curves": str(dpo_dir / "curves.png"),
            "reward model evaluation": str(eval_dir / "rm" / "rm_eval.png"),
            "policy vs base": str(eval_dir / "dpo" / "dpo_eval.png"),
            "evaluate.py report": str(eval_dir / "dpo" / "report.md"), "generations": str(generations),
        },
    }
    summary["files"]["demo report"] = str(write_report(root, summary, generations))
    summary["seconds"] = round(time.time() - t0, 1)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, root)
    return summary


def print_summary(summary: dict, root: Path) -> None:
    rows = [("reward-model accuracy (held-out pairs)", "rm_accuracy"),
            ("policy win rate over base (reward model)", "win_rate"),
            ("preferred behaviour, base (rule)", "preferred_rate_base"),
            ("preferred behaviour, policy (rule)", "preferred_rate_policy")]
    log(f"\n{'=' * 72}\nminialign demo summary ({'fast, reduced' if summary['fast'] else 'full'} run, "
        f"{summary['seconds']:.0f}s)\n{'=' * 72}")
    for name, key in rows:
        threshold = THRESHOLDS.get(key)
        if threshold is None:
            mark = ""
        elif summary["fast"]:  # a reduced run is only expected to move each number the right way
            mark = f"  (full-run target >= {threshold:.2f})"
        else:
            mark = f"  (target >= {threshold:.2f}: {'ok' if summary[key] >= threshold else 'MISSED'})"
        log(f"{name:<44} {summary[key]:.3f}{mark}")
    for kind, r in summary["by_kind"].items():
        log(f"  {kind:<12} {r['prompts']:>3} prompts  preferred: base {r['base']:.2f} -> policy {r['policy']:.2f}")
    if summary["fast"]:
        log("(a fast run trains briefly: only the direction of each number is expected, not the targets)")
    log(f"\nsummary: {root / 'summary.json'}")
    for name, path in summary["files"].items():
        log(f"{name + ':':<26} {path}")


def main(argv=None):
    p = ArgumentParser(description="Run the whole minialign demo: demo world, reward model, DPO, "
                                            "evaluation, rule-based judge.")
    p.add_argument("--root", default="runs/demo", help="where the demo world and all results go")
    p.add_argument("--fast", action="store_true", help="a reduced run (fewer steps and prompts), for tests")
    p.add_argument("--force", action="store_true", help="rebuild the demo world even if it exists")
    args = p.parse_args(argv)
    run_demo(args.root, args.fast, args.force)


if __name__ == "__main__":
    run_main(main)
