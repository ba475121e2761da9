"""Reward accuracy on held-out preference pairs, for the two rewards minialign trains:
a reward model's r(x, y) (`evaluate.py rm`) and DPO's implicit reward beta * log(pi / ref)
(`evaluate.py implicit`; DPO paper, eq. 5).

Both score the pairs as training does: collate.tokenize_pairs cuts each pair with training's
prompt budget (a pair training would drop is dropped and counted), each pair is one packed row
[prompt | better | worse] (packing.py: the prompt computed once), and the rows go through the
model in length-grouped batches (eval_models.map_batches), the results coming back in file order.
Rank 0 writes summary.json and pairs.json and prints the table."""
from dataclasses import dataclass

import numpy as np

from .collate import tokenize_pairs
from .compat import check_same_tokenizer, check_tokenizer_fits
from .data import load_preferences
from .distributed import print0
from .errors import UserError
from .eval_io import EvalSettings, check_slot, load_data, load_slot, output_folder, print_table, write_json
from .eval_models import implicit_rewards, map_batches
from .evaluation import implicit_reward_summary, reward_model_summary
from .packing import packed_length
from .plots import rm_eval_figure
from .reward import score_pairs
from .tokenizer import load_tokenizer


@dataclass
class RMSettings(EvalSettings):
    """evaluate.py rm's settings."""
    reward_model: str  # the reward-model checkpoint: a folder or a cached Hub id
    num_pairs: int | None  # evaluate a seeded random subset of this many pairs; None: every pair
    max_prompt_length: int | None  # prompt budget as in train_rm.py; None: half of max_length


@dataclass
class ImplicitSettings(EvalSettings):
    """evaluate.py implicit's settings."""
    policy: str  # the DPO policy's checkpoint
    ref_model: str  # its reference's checkpoint (shares the policy's tokenizer)
    beta: float  # the beta of training: scales the rewards, not the accuracy
    max_prompt_length: int  # prompt budget; must be below max_length


# ---------------------------------------------------------------------------------- rm

def rm_pairs(s: RMSettings, tokenizer, env):
    """The held-out pairs (a seeded --num_pairs subset, in file order) tokenized by training's
    policy (collate.py), its prompt budget included: a pair training would drop is dropped and
    counted the same way, in the load report. Returns (pairs, items, report, stats, budget)."""
    pairs, report = load_preferences(s.data, s.data_format)
    if s.num_pairs and s.num_pairs < len(pairs):
        keep = np.sort(np.random.default_rng(s.seed).choice(len(pairs), s.num_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    budget = s.max_prompt_length or s.max_length // 2
    if budget >= s.max_length:
        raise UserError(f"--max_prompt_length {budget} must be below --max_length {s.max_length}")
    items, stats = tokenize_pairs(tokenizer, pairs, max_length=s.max_length, max_prompt_length=budget,
                                  truncation="keep_end", report=report)
    print0(env, f"{report.summary()}\n{stats.summary()}")
    if not items:
        raise UserError(f"no pair of {s.data} fits --max_length {s.max_length}: {stats.summary()}")
    kept = {it.line for it in items}  # a pair's line is unique in its file
    return [p for p in pairs if p.line in kept], items, report, stats, budget


def evaluate_rm(s: RMSettings, env):
    """Accuracy, margins, reward spread and length bias of a reward model on preference pairs
    -> summary.json, pairs.json, rm_eval.png in the output folder. Returns the summary (rank 0),
    None on the other ranks."""
    config = check_slot(s.reward_model, "--reward_model", reward=True)
    tokenizer = load_tokenizer(s.reward_model, chat_format=s.chat_format)
    check_tokenizer_fits(config, tokenizer, s.reward_model)
    out = output_folder(s.output or "runs/eval/rm", env)
    pairs, items, report, stats, budget = rm_pairs(s, tokenizer, env)

    model = load_slot(s.reward_model, "--reward_model", s.dtype, env)
    # One packed row per pair, the prompt computed once, in length-grouped batches (training's layout).
    rewards = map_batches(lambda idx: score_pairs(model, [items[i] for i in idx], tokenizer.pad_token_id),
                          len(items), s.batch_size, env, "scoring pairs", "pairs",
                          lengths=[packed_length(it) for it in items])
    better, worse = (list(column) for column in zip(*rewards))
    if not env.is_main:
        return None
    # Length = tokens of the response alone (the reward model's tokenizer), not of the conversation.
    better_len = [len(t) for t in tokenizer.encode_batch([p.chosen for p in pairs])]
    worse_len = [len(t) for t in tokenizer.encode_batch([p.rejected for p in pairs])]

    summary = reward_model_summary(better, better_len, worse, worse_len, s.n_resamples, s.seed)
    summary["length_bias"]["length_unit"] = "tokens of the response (reward-model tokenizer)"
    summary.update(reward_model=s.reward_model, data=s.data, n_resamples=s.n_resamples, seed=s.seed,
                   max_length=s.max_length, max_prompt_length=budget, data_read=report.read,
                   data_kept=report.kept, data_skipped=report.skipped, prompts_truncated=stats.prompt_truncated)
    write_json(out / "summary.json", summary)
    write_json(out / "pairs.json", [
        {"line": p.line, "prompt": p.prompt, "better": p.chosen, "worse": p.rejected,
         "better_reward": b, "worse_reward": w, "margin": b - w, "correct": b > w, "tie": b == w,
         "better_length_tokens": lb, "worse_length_tokens": lw}
        for p, b, w, lb, lw in zip(pairs, better, worse, better_len, worse_len)])
    rm_eval_figure(better, worse, out / "rm_eval.png", title=f"reward model {s.reward_model}")

    print_rm_summary(summary, s.data)
    print(f"\nwrote {out / 'summary.json'}, {out / 'pairs.json'}, {out / 'rm_eval.png'}")
    return summary


def print_rm_summary(summary: dict, data: str) -> None:
    """The terminal table of evaluate.py rm: accuracy, margins, reward spread and length bias."""
    lb = summary["length_bias"]
    print_table(f"reward model on {summary['n']} pairs of {data}", [
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


# ---------------------------------------------------------------------------- implicit

def implicit_tokenizer(s: ImplicitSettings):
    """Before any heavy work: both checkpoints are causal LMs sharing one tokenizer (the policy's,
    returned), which fits both embeddings."""
    if s.max_prompt_length >= s.max_length:
        raise UserError(f"--max_prompt_length {s.max_prompt_length} must be below --max_length {s.max_length}")
    policy_config = check_slot(s.policy, "--policy", reward=False)
    ref_config = check_slot(s.ref_model, "--ref_model", reward=False)
    tokenizer = load_tokenizer(s.policy, chat_format=s.chat_format)
    check_same_tokenizer(tokenizer, s.policy, load_tokenizer(s.ref_model, chat_format=s.chat_format),
                         s.ref_model, "--policy", "--ref_model")
    check_tokenizer_fits(policy_config, tokenizer, s.policy)
    check_tokenizer_fits(ref_config, tokenizer, s.ref_model, tokenizer_dir=s.policy)
    return tokenizer


def evaluate_implicit(s: ImplicitSettings, env):
    """Accuracy of DPO's implicit reward beta * log(pi / ref) on preference pairs -> summary.json,
    pairs.json in the output folder. Returns the summary (rank 0), None on the other ranks."""
    tokenizer = implicit_tokenizer(s)
    out = output_folder(s.output or "runs/eval/implicit", env)
    pairs, report = load_data(s.data, s.data_format, env)
    items, stats = tokenize_pairs(tokenizer, pairs, max_length=s.max_length,
                                  max_prompt_length=s.max_prompt_length, truncation="keep_end")
    print0(env, stats.summary())
    if not items:
        raise UserError(f"no pair of {s.data} fits --max_length {s.max_length}: {stats.summary()}")

    policy = load_slot(s.policy, "--policy", s.dtype, env)
    ref = load_slot(s.ref_model, "--ref_model", s.dtype, env)

    def rewards(idx):  # (chosen reward, rejected reward, policy log-probs, ref log-probs) per pair
        return zip(*implicit_rewards(policy, ref, [items[i] for i in idx], s.beta, len(idx), tokenizer.pad_token_id))

    results = map_batches(rewards, len(items), s.batch_size, env, "implicit rewards", "pairs",
                          lengths=[packed_length(it) for it in items])  # length-grouped, as in training
    if not env.is_main:
        return None
    chosen, rejected, pol_lp, ref_lp = (list(column) for column in zip(*results))
    summary = implicit_reward_summary(chosen, rejected, s.n_resamples, s.seed)
    summary.update(policy_model=s.policy, ref_model=s.ref_model, data=s.data, beta=s.beta,
                   n_resamples=s.n_resamples, seed=s.seed, pairs_given=stats.pairs, pairs_dropped=stats.dropped,
                   prompts_truncated=stats.prompt_truncated, prompts_mostly_cut=stats.prompt_mostly_cut)
    write_json(out / "summary.json", summary)
    write_json(out / "pairs.json", [
        {"line": it.line, "chosen_reward": c, "rejected_reward": r, "margin": c - r, "correct": c > r,
         "policy_logps": list(pl), "ref_logps": list(rl)}
        for it, c, r, pl, rl in zip(items, chosen, rejected, pol_lp, ref_lp)])

    print_implicit_summary(summary, s.beta)
    print(f"\nwrote {out / 'summary.json'}, {out / 'pairs.json'}")
    return summary


def print_implicit_summary(summary: dict, beta: float) -> None:
    """The terminal table of evaluate.py implicit: accuracy, ties, margin and mean rewards."""
    print_table(f"implicit reward beta*log(pi/ref) on {summary['n']} pairs (beta {beta})", [
        ("accuracy (strict)", summary["accuracy"]), ("  95% bootstrap CI", summary["accuracy_ci95"]),
        ("ties", summary["ties"]), ("mean margin", summary["mean_margin"]),
        ("chosen / rejected reward mean",
         f"{summary['chosen_reward_mean']:.4f} / {summary['rejected_reward_mean']:.4f}"),
    ])
