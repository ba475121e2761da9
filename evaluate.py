"""Evaluate reward models and DPO policies; overlay training curves.

    python evaluate.py rm       --reward_model runs/rm/model --data FILE --output runs/eval/rm
    python evaluate.py dpo      --base DIR --policy runs/dpo/model --reward_model runs/rm/model --data FILE
    python evaluate.py implicit --policy runs/dpo/model --ref_model DIR --data FILE --beta 0.1
    python evaluate.py curves   runs/dpo_lr1 runs/dpo_lr2 --output runs/eval/curves

rm:       accuracy of a reward model on preference pairs (95% bootstrap interval, ties apart),
          margins, reward statistics, length bias -> summary.json, pairs.json, rm_eval.png.
dpo:      base and policy answer the same prompts (same seed), --samples_per_prompt times each;
          the reward model scores every answer; win rate and reward gain per prompt (on the mean
          reward of its answers), stop rate, length and repetition of both -> summary.json,
          generations.json, dpo_eval.png, report.md (with the largest gains and losses).
implicit: accuracy of DPO's implicit reward beta * log(pi / ref) on pairs -> summary.json, pairs.json.
curves:   training curves of several runs (their metrics.jsonl) in one curves.png.

Missing model or data flags fall back to the demo world: the demo base model and eval split
(minialign.demo), runs/rm/model and runs/dpo/model as written by train_rm.py / train_dpo.py.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from minialign import generate, load_model, load_tokenizer
from minialign.collate import tokenize_pairs
from minialign.data import load_preferences, prompts_view
from minialign.evaluation import (N_RESAMPLES, REPETITION_NGRAM, implicit_reward_summary, implicit_rewards,
                                  per_prompt_means, policy_comparison_summary, repetition_rate, reward_model_summary, top_k_changes)
from minialign.hub import resolve_model_path
from minialign.plots import dpo_eval_figure, plot_training_curves, rm_eval_figure
from minialign.reward import score_responses
from minialign.tokenizer import CHAT_FORMAT_CHOICES

DEMO_RM, DEMO_POLICY = "runs/rm/model", "runs/dpo/model"  # where train_rm.py / train_dpo.py save by default
CURVE_METRICS = ("loss", "accuracy", "margin", "rewards/accuracies", "rewards/margins")  # absent ones are skipped


# ------------------------------------------------------------------------------- helpers

def demo_world(*flags):
    """minialign.demo's paths when any of the given flag values is missing (the demo world is
    then built if it does not exist yet), else None."""
    if all(f is not None for f in flags):
        return None
    from minialign.demo import demo_paths  # imported only when needed: it may build the demo world
    from minialign.distributed import init_distributed

    return demo_paths(init_distributed())


def require_model(path, flag: str):
    """Fail early, naming the flag, when a checkpoint folder is missing (e.g. not trained yet).
    A Hub id `org/name` is looked up in the local Hugging Face cache (minialign.hub)."""
    path = resolve_model_path(path, f"--{flag}")
    if not (Path(path) / "config.json").is_file():
        hint = {DEMO_RM: " (train it with `python train_rm.py`)",
                DEMO_POLICY: " (train it with `python train_dpo.py`)"}.get(path, "")
        raise SystemExit(f"--{flag}: no checkpoint at {path} (config.json not found){hint}")


def device_of(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_eval_model(path, args):
    return load_model(path, dtype=args.dtype, device=device_of(args)).eval().requires_grad_(False)


def jsonable(x):
    """NaN/inf become null (strict JSON has no NaN); numpy scalars and tuples become plain values."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: Path, obj):
    path.write_text(json.dumps(jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def print_table(title: str, rows):
    """rows: (name, value) pairs; floats get 4 decimals, (low, high) tuples print as an interval."""
    def fmt(v):
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return f"[{fmt(v[0])}, {fmt(v[1])}]"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    width = max(len(name) for name, _ in rows)
    print(f"\n{title}\n" + "-" * len(title))
    for name, value in rows:
        print(f"{name:<{width}}  {fmt(value)}")


def add_common(p, seed_help="seeds the bootstrap"):
    p.add_argument("--data", help="preference file (.json, .jsonl, .gz); default: the demo eval split")
    p.add_argument("--data_format", default="auto", help="auto, or one of the formats in minialign.data")
    p.add_argument("--output", help="folder for the results (created)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max_length", type=int, default=1024, help="max tokens of prompt + response")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--n_resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    p.add_argument("--chat_format", default="auto", choices=CHAT_FORMAT_CHOICES,
                   help="chat template renderer for every checkpoint loaded: auto (a known family in Python, "
                        "any other template with Jinja), a family, or jinja")


# ---------------------------------------------------------------------------- subcommands

def run_rm(args):
    demo = demo_world(args.data)
    args.reward_model = args.reward_model or DEMO_RM
    args.data = args.data or str(demo.eval_data)
    require_model(args.reward_model, "reward_model")
    out = Path(args.output or "runs/eval/rm")
    out.mkdir(parents=True, exist_ok=True)
    pairs, report = load_preferences(args.data, args.data_format)
    print(report.summary())
    if args.num_pairs and args.num_pairs < len(pairs):  # a seeded random subset, kept in file order
        keep = np.sort(np.random.default_rng(args.seed).choice(len(pairs), args.num_pairs, replace=False))
        pairs = [pairs[i] for i in keep]

    tokenizer = load_tokenizer(args.reward_model, chat_format=args.chat_format)
    model = load_eval_model(args.reward_model, args)
    prompts = [p.prompt for p in pairs]
    better = score_responses(model, tokenizer, prompts, [p.chosen for p in pairs], args.batch_size, args.max_length)
    worse = score_responses(model, tokenizer, prompts, [p.rejected for p in pairs], args.batch_size, args.max_length)
    # Length = tokens of the response alone (the reward model's tokenizer), not of the conversation.
    better_len = [len(t) for t in tokenizer.encode_batch([p.chosen for p in pairs])]
    worse_len = [len(t) for t in tokenizer.encode_batch([p.rejected for p in pairs])]

    summary = reward_model_summary(better, better_len, worse, worse_len, args.n_resamples, args.seed)
    summary["length_bias"]["length_unit"] = "tokens of the response (reward-model tokenizer)"
    summary.update(reward_model=args.reward_model, data=args.data, n_resamples=args.n_resamples, seed=args.seed,
                   data_read=report.read, data_kept=report.kept, data_skipped=report.skipped)
    write_json(out / "summary.json", summary)
    write_json(out / "pairs.json", [
        {"line": p.line, "prompt": p.prompt, "better": p.chosen, "worse": p.rejected,
         "better_reward": b, "worse_reward": w, "margin": b - w, "correct": b > w, "tie": b == w,
         "better_length_tokens": lb, "worse_length_tokens": lw}
        for p, b, w, lb, lw in zip(pairs, better, worse, better_len, worse_len)])
    rm_eval_figure(better, worse, out / "rm_eval.png", title=f"reward model {args.reward_model}")

    lb = summary["length_bias"]
    print_table(f"reward model on {summary['n']} pairs of {args.data}", [
        ("accuracy (strict)", summary["accuracy"]), ("  95% bootstrap CI", summary["accuracy_ci95"]),
        ("ties", summary["ties"]), ("accuracy, ties as 1/2", summary["accuracy_ties_half"]),
        ("mean margin r(better) - r(worse)", summary["mean_margin"]),
        ("better reward mean / std", f"{summary['better_reward_mean']:.4f} / {summary['better_reward_std']:.4f}"),
        ("worse reward mean / std", f"{summary['worse_reward_mean']:.4f} / {summary['worse_reward_std']:.4f}"),
        ("pearson(reward, length in tokens)", lb["reward_length_pearson"]),
        (f"accuracy, better is longer (n={lb['n_better_longer']})", lb["accuracy_better_longer"]),
        (f"accuracy, better is shorter (n={lb['n_better_shorter']})", lb["accuracy_better_shorter"]),
        ("longer answer preferred by the RM", lb["prefers_longer_rate"]),
    ])
    print(f"\nwrote {out / 'summary.json'}, {out / 'pairs.json'}, {out / 'rm_eval.png'}")
    return summary


def generate_with(model_dir, prompts, args):
    """Load one causal LM, answer every prompt, free the model (base and policy never coexist)."""
    tokenizer = load_tokenizer(model_dir, chat_format=args.chat_format)
    model = load_eval_model(model_dir, args)
    gen = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    del model
    return gen


def _conversation_md(messages) -> str:
    return "\n".join(f"**{m['role']}:** {m['content']}" for m in messages)


def dpo_report(summary, rows, k, args) -> str:
    """report.md: the summary table, then the k largest gains and the k largest losses."""
    b, p = summary["base"], summary["policy"]
    spp = summary["samples_per_prompt"]
    lines = [
        f"# DPO policy vs base\n\npolicy `{args.policy}`, base `{args.base}`, reward model `{args.reward_model}`, "
        f"{summary['n']} prompts of `{args.data}`, {spp} answer(s) per prompt and model; sampling: temperature "
        f"{args.temperature}, top_p {args.top_p}, max_new_tokens {args.max_new_tokens}, seed {args.seed}.\n",
        f"Win rate of the policy (strictly higher {'mean ' if spp > 1 else ''}reward on the prompt): "
        f"**{summary['win_rate']:.3f}** "
        f"(95% bootstrap CI {summary['win_rate_ci95'][0]:.3f} to {summary['win_rate_ci95'][1]:.3f}); "
        f"ties {summary['ties']}, losses {summary['losses']}. Mean reward gain {summary['mean_gain']:.4f} "
        f"± {summary['std_gain']:.4f} (std).\n",
        "| | base | policy |", "|---|---|---|",
        f"| reward mean ± std | {b['reward_mean']:.4f} ± {b['reward_std']:.4f} "
        f"| {p['reward_mean']:.4f} ± {p['reward_std']:.4f} |",
        f"| stopped with end of turn | {b['stop_rate']:.3f} | {p['stop_rate']:.3f} |",
        f"| mean length (tokens) | {b['mean_length_tokens']:.1f} | {p['mean_length_tokens']:.1f} |",
        f"| repeated {REPETITION_NGRAM}-grams | {b[f'repetition_{REPETITION_NGRAM}gram']:.3f} "
        f"| {p[f'repetition_{REPETITION_NGRAM}gram']:.3f} |",
        "", "Responses that did not stop were cut at max_new_tokens and scored as they were.",
    ]
    gains, losses = top_k_changes([r["gain"] for r in rows], k)
    for heading, picks in ((f"{k} largest gains", gains), (f"{k} largest losses", losses)):
        lines.append(f"\n## {heading}\n")
        for i in picks:
            r = rows[i]
            lines += [f"### prompt {i}: gain {r['gain']:+.4f}\n", _conversation_md(r["prompt"]), ""]
            for who in ("base", "policy"):
                for n, g in enumerate(r[who]["samples"], 1):
                    label = who if spp == 1 else f"{who}, answer {n} of {spp}"
                    lines += [f"**{label}** (reward {g['reward']:.4f}, {g['length_tokens']} tokens, "
                              f"{'stopped' if g['finished'] else 'cut off'}):\n", "````text", g["response"], "````", ""]
    return "\n".join(lines) + "\n"


def run_dpo(args):
    demo = demo_world(args.base, args.data)
    args.base = args.base or str(demo.base_model)
    args.policy, args.reward_model = args.policy or DEMO_POLICY, args.reward_model or DEMO_RM
    args.data = args.data or str(demo.eval_data)
    require_model(args.base, "base")
    require_model(args.policy, "policy")
    require_model(args.reward_model, "reward_model")
    out = Path(args.output or "runs/eval/dpo")
    out.mkdir(parents=True, exist_ok=True)
    pairs, report = load_preferences(args.data, args.data_format)
    print(report.summary())
    prompts = prompts_view(pairs)[: args.num_prompts]
    k = args.samples_per_prompt
    if k < 1:
        raise SystemExit(f"--samples_per_prompt must be at least 1, got {k}")
    asked = [p for p in prompts for _ in range(k)]  # each prompt k times in a row

    base = generate_with(args.base, asked, args)
    policy = generate_with(args.policy, asked, args)
    tokenizer = load_tokenizer(args.reward_model, chat_format=args.chat_format)
    rm = load_eval_model(args.reward_model, args)
    base_r = score_responses(rm, tokenizer, asked, base.texts, args.batch_size, args.max_length)
    policy_r = score_responses(rm, tokenizer, asked, policy.texts, args.batch_size, args.max_length)

    summary = policy_comparison_summary(base_r, policy_r, base.token_ids, policy.token_ids, base.finished,
                                        policy.finished, args.n_resamples, args.seed, samples_per_prompt=k)
    summary.update(base_model=args.base, policy_model=args.policy, reward_model=args.reward_model, data=args.data,
                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                   seed=args.seed, n_resamples=args.n_resamples, length_unit="tokens (generated, EOS excluded)")

    def answers(g, rewards, i):  # the k answers of one model to prompt i
        return [{"response": g.texts[j], "reward": rewards[j], "length_tokens": len(g.token_ids[j]),
                 "finished": g.finished[j], f"repetition_{REPETITION_NGRAM}gram": repetition_rate(g.token_ids[j])}
                for j in range(i * k, (i + 1) * k)]

    means = {"base": per_prompt_means(base_r, k), "policy": per_prompt_means(policy_r, k)}
    rows = [{"index": i, "prompt": prompt, "gain": float(means["policy"][i] - means["base"][i]),
             **{who: {"reward": float(means[who][i]), "samples": answers(g, r, i)}
                for who, g, r in (("base", base, base_r), ("policy", policy, policy_r))}}
            for i, prompt in enumerate(prompts)]
    write_json(out / "summary.json", summary)
    write_json(out / "generations.json", rows)
    dpo_eval_figure(base_r, policy_r, [len(t) for t in base.token_ids], [len(t) for t in policy.token_ids],
                    out / "dpo_eval.png", samples_per_prompt=k)
    (out / "report.md").write_text(dpo_report(jsonable(summary), rows, args.top_k_report, args))

    b, p = summary["base"], summary["policy"]
    rep = f"repetition_{REPETITION_NGRAM}gram"
    print_table(f"policy vs base on {summary['n']} prompts (reward model {args.reward_model})", [
        ("win rate (strict)", summary["win_rate"]), ("  95% bootstrap CI", summary["win_rate_ci95"]),
        ("ties / losses", f"{summary['ties']} / {summary['losses']}"),
        ("mean reward gain ± std", f"{summary['mean_gain']:.4f} ± {summary['std_gain']:.4f}"),
        ("reward mean, base / policy", f"{b['reward_mean']:.4f} / {p['reward_mean']:.4f}"),
        ("stop rate, base / policy", f"{b['stop_rate']:.3f} / {p['stop_rate']:.3f}"),
        ("mean length (tokens), base / policy", f"{b['mean_length_tokens']:.1f} / {p['mean_length_tokens']:.1f}"),
        (f"repeated {REPETITION_NGRAM}-grams, base / policy", f"{b[rep]:.3f} / {p[rep]:.3f}"),
    ])
    print(f"\nwrote {out / 'summary.json'}, {out / 'generations.json'}, {out / 'dpo_eval.png'}, {out / 'report.md'}")
    return summary


def run_implicit(args):
    demo = demo_world(args.ref_model, args.data)
    args.policy = args.policy or DEMO_POLICY
    args.ref_model = args.ref_model or str(demo.base_model)
    args.data = args.data or str(demo.eval_data)
    require_model(args.policy, "policy")
    require_model(args.ref_model, "ref_model")
    out = Path(args.output or "runs/eval/implicit")
    out.mkdir(parents=True, exist_ok=True)
    pairs, report = load_preferences(args.data, args.data_format)
    print(report.summary())
    tokenizer = load_tokenizer(args.policy, chat_format=args.chat_format)
    items, stats = tokenize_pairs(tokenizer, pairs, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, truncation="keep_end")
    print(stats.summary())

    policy, ref = load_eval_model(args.policy, args), load_eval_model(args.ref_model, args)
    chosen, rejected, pol_lp, ref_lp = implicit_rewards(policy, ref, items, args.beta, args.batch_size,
                                                        tokenizer.pad_token_id)
    summary = implicit_reward_summary(chosen, rejected, args.n_resamples, args.seed)
    summary.update(policy_model=args.policy, ref_model=args.ref_model, data=args.data, beta=args.beta,
                   n_resamples=args.n_resamples, seed=args.seed, pairs_given=stats.pairs, pairs_dropped=stats.dropped)
    write_json(out / "summary.json", summary)
    write_json(out / "pairs.json", [
        {"line": it.line, "chosen_reward": c, "rejected_reward": r, "margin": c - r, "correct": c > r,
         "policy_logps": list(pl), "ref_logps": list(rl)}
        for it, c, r, pl, rl in zip(items, chosen, rejected, pol_lp, ref_lp)])

    print_table(f"implicit reward beta*log(pi/ref) on {summary['n']} pairs (beta {args.beta})", [
        ("accuracy (strict)", summary["accuracy"]), ("  95% bootstrap CI", summary["accuracy_ci95"]),
        ("ties", summary["ties"]), ("mean margin", summary["mean_margin"]),
        ("chosen / rejected reward mean",
         f"{summary['chosen_reward_mean']:.4f} / {summary['rejected_reward_mean']:.4f}"),
    ])
    print(f"\nwrote {out / 'summary.json'}, {out / 'pairs.json'}")
    return summary


def run_label(run_dir: Path) -> str:
    """The run folder's name, with its learning rate when run_config.json records one."""
    cfg = run_dir / "run_config.json"
    lr = json.loads(cfg.read_text()).get("lr") if cfg.is_file() else None
    return f"{run_dir.name} (lr {lr:g})" if isinstance(lr, (int, float)) else run_dir.name


def run_curves(args):
    runs = []
    for d in map(Path, args.run_dirs):
        path = d / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {d} a training run folder?")
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
        runs.append((run_label(d), records))
    out = Path(args.output or "runs/eval/curves")
    figure = plot_training_curves(runs, out / "curves.png", metrics=tuple(args.metrics))
    print_table("training curves", [(label, f"{len(r)} records") for label, r in runs])
    print(f"\nwrote {figure}")
    return figure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rm", help="accuracy, margins and length bias of a reward model on preference pairs")
    p.set_defaults(run=run_rm)
    p.add_argument("--reward_model", help=f"reward-model checkpoint folder (default: {DEMO_RM})")
    p.add_argument("--num_pairs", type=int, default=None, help="evaluate a seeded random subset of this many pairs")
    add_common(p, seed_help="seeds the --num_pairs subset and the bootstrap")

    p = sub.add_parser("dpo", help="policy vs base: generate, score with the reward model, compare")
    p.set_defaults(run=run_dpo)
    p.add_argument("--base", help="the model before DPO (default: the demo base model)")
    p.add_argument("--policy", help=f"the DPO policy (default: {DEMO_POLICY})")
    p.add_argument("--reward_model", help=f"reward model that judges both (default: {DEMO_RM})")
    p.add_argument("--num_prompts", type=int, default=100, help="the first N distinct prompts of --data")
    p.add_argument("--max_new_tokens", type=int, default=128, help="response budget; longer answers are cut")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--samples_per_prompt", type=int, default=1,
                   help="answers per prompt and model; wins and gains compare each model's mean reward over them")
    p.add_argument("--top_k_report", type=int, default=5, help="largest gains and losses shown in report.md")
    add_common(p, seed_help="seeds sampling (the same for both models) and the bootstrap")

    p = sub.add_parser("implicit", help="accuracy of DPO's implicit reward beta*log(pi/ref) on preference pairs")
    p.set_defaults(run=run_implicit)
    p.add_argument("--policy", help=f"the DPO policy (default: {DEMO_POLICY})")
    p.add_argument("--ref_model", help="its reference (default: the demo base model)")
    p.add_argument("--beta", type=float, default=0.1, help="the beta of training (scales rewards, not accuracy)")
    p.add_argument("--max_prompt_length", type=int, default=512, help="longer prompts keep their last tokens")
    add_common(p)

    p = sub.add_parser("curves", help="overlay the training curves of several runs")
    p.set_defaults(run=run_curves)
    p.add_argument("run_dirs", nargs="+", help="run folders, each with metrics.jsonl")
    p.add_argument("--output", help="folder for curves.png (default: runs/eval/curves)")
    p.add_argument("--metrics", nargs="+", default=list(CURVE_METRICS), help="metrics to plot (absent ones skipped)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
