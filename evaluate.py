"""Evaluate reward models and DPO policies; overlay training curves.

    python evaluate.py rm       --reward_model runs/rm/model --data FILE --output runs/eval/rm
    python evaluate.py dpo      --base DIR --policy runs/dpo/model --reward_model runs/rm/model --data FILE
    python evaluate.py implicit --policy runs/dpo/model --ref_model DIR --data FILE --beta 0.1
    python evaluate.py curves   runs/dpo_lr1 runs/dpo_lr2 --output runs/eval/curves

rm:       accuracy of a reward model on preference pairs (95% bootstrap interval, ties apart),
          margins, reward statistics, length bias -> summary.json, pairs.json, rm_eval.png.
dpo:      base and policy answer the same prompts (the same seed per prompt), --samples_per_prompt
          times each; the reward model scores every answer; win rate (strict, ties as 1/2, and
          controlled for length: minialign.length_control) and reward gain per prompt (on the mean
          reward of its answers), the policy's KL from the base on its own answers, stop rate, length
          and repetition of both -> summary.json, generations.json, dpo_eval.png, report.md (with the
          largest gains and losses). --generation_cache reuses the base's answers across evaluations.
          Its generation stage is minialign/policy_vs_base.py.
implicit: accuracy of DPO's implicit reward beta * log(pi / ref) on pairs -> summary.json, pairs.json.
curves:   training curves of several runs (their metrics.jsonl) in one curves.png.

Before any heavy work every model folder is checked: its checkpoint (config.json values, weight
files, tensor names and shapes), its kind (rm's --reward_model is a reward model; dpo's --base and
--policy and implicit's models are causal LMs), that its tokenizer fits its embedding, and that
--base and --policy (dpo), --policy and --ref_model (implicit) share one tokenizer and chat format.
The reward model may have a tokenizer of its own: it re-renders each conversation as text with
its own chat template.

Prompts longer than --max_prompt_length keep their last tokens for generation, as in training.
Scoring truncates as training does (collate.py): a prompt keeps its last --max_prompt_length tokens
(rm: by default half of --max_length, train_rm.py's default) and then loses more of its start if
prompt + answer exceed --max_length, never the end of the answer, where the reward is read; rm and
implicit drop (and report) a pair whose longer answer alone fills --max_length, as training does.

Scoring runs at training's layout and speed: rm and implicit put each pair in one packed row
[prompt | better | worse] (minialign.packing: the prompt computed once), and every scoring and
log-prob pass (rm, implicit, dpo's rewards and KL) groups its rows by length into batches of
--batch_size (evaluation.map_batches); the results come back in file order.

With no model and no data flag at all, a command evaluates the demo world (minialign.demo; the
reward model and policy that train_rm.py / train_dpo.py write to runs/rm/model, runs/dpo/model)
and says so first; some flags but not all is an error naming the missing ones.

Under torchrun, generation and scoring are shared among the ranks, batch by batch (each batch the
same as in one process, so the numbers are the same), and rank 0 writes the results.
"""
import argparse
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import torch

from minialign import load_model, load_tokenizer
from minialign.checkpoint import same_weights
from minialign.cli import (ArgumentParser, eval_dtype, float_range, int_range, non_negative_float, non_negative_int,
                           positive_float, positive_int, run_main)
from minialign.collate import tokenize_pairs
from minialign.compat import check_model_kind, check_same_tokenizer, check_tokenizer_fits, describe_kind
from minialign.data import FORMATS, load_preferences, prompts_view
from minialign.distributed import barrier, destroy_distributed, init_distributed, print0
from minialign.errors import MissingFileError, UserError, read_json
from minialign.answer_cache import folder_fingerprint
from minialign.evaluation import (N_RESAMPLES, REPETITION_NGRAM, implicit_reward_summary, implicit_rewards,
                                  map_batches, per_prompt_means, policy_comparison_summary, prompt_outcomes,
                                  repetition_rate, reward_model_summary, sampled_kl)
from minialign.length_control import length_control_summary
from minialign.report import dpo_report
from minialign.plots import dpo_eval_figure, plot_training_curves, rm_eval_figure
from minialign.policy_vs_base import SharedCache, Sampling, answers_of_both, prompt_ids_kept_end
from minialign.packing import packed_length
from minialign.reward import score_ids, conversation_ids, score_pairs
from minialign.hub import resolve_model_path
from minialign.tokenizer import CHAT_FORMAT_CHOICES

DEMO_RM, DEMO_POLICY = "runs/rm/model", "runs/dpo/model"  # where train_rm.py / train_dpo.py save by default
DEMO_HINTS = {DEMO_RM: " (train it with `python train_rm.py`)", DEMO_POLICY: " (train it with `python train_dpo.py`)"}
CURVE_METRICS = ("loss", "accuracy", "margin", "rewards/accuracies", "rewards/margins")  # absent ones are skipped


# ------------------------------------------------------------------------ inputs, checked

def demo_world_if_none(given: dict, env, what: str):
    """minialign.demo_build's paths when none of the command's model and data flags is given (the
    demo world is built first if it does not exist yet); None when all are. Some but not all is an
    error: a forgotten flag is never filled in from the demo world behind the user's back."""
    missing = [flag for flag, value in given.items() if value is None]
    if not missing:
        return None
    if len(missing) < len(given):
        raise UserError(f"missing {', '.join(missing)}: give all of {', '.join(given)}, "
                        f"or none of them to evaluate the demo world")
    print0(env, f"no {', '.join(given)} given: evaluating the demo world ({what})")
    from minialign.demo_build import demo_paths  # imported only when needed: it may build the demo world

    return demo_paths(env)


# A prompt longer than this makes generation's prefill slow enough to deserve a line first.
LONG_PROMPT_TOKENS = 8192
SAME_MODEL_NOTE = "the comparison can only come out a tie (win rate 0, every prompt a tie)"


def announce(args, env) -> None:
    """The start-up line: what runs where (after the demo-world line, which must come first)."""
    print0(env, f"evaluate.py {args.command}: {env.world_size} rank(s), device {env.device}, dtype {args.dtype}")


def check_slot(path, flag: str, reward: bool):
    """The checkpoint a flag names (a folder, or a Hub id in the local Hugging Face cache), checked
    before any heavy work (compat.check_model_kind)."""
    path = resolve_model_path(path, flag)
    if not (Path(path) / "config.json").is_file():
        raise MissingFileError(f"{flag} {path}: no checkpoint there (no config.json){DEMO_HINTS.get(str(path), '')}")
    return check_model_kind(path, reward, flag)


def load_slot(path, flag: str, args, env):
    """Load a checked checkpoint for inference, and say what was loaded."""
    model = load_model(path, dtype=args.dtype, device=env.device).eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    print0(env, f"loaded {flag} {path}: {describe_kind(model.config)}, {n / 1e6:.2f}M parameters, "
                f"{args.dtype} on {env.device}")
    return model


def output_folder(path, env) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder")
    if env.is_main:  # rank 0 alone writes
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output {out}: cannot create the folder ({e.strerror or e})") from None
    return out


def load_data(args, env):
    pairs, report = load_preferences(args.data, args.data_format)
    print0(env, report.summary())
    return pairs, report


# ------------------------------------------------------------------------------- output

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


# ---------------------------------------------------------------------------------- rm

def rm_pairs(args, tokenizer, env):
    """The held-out pairs (a seeded --num_pairs subset, in file order) tokenized by training's
    policy (collate.py), its prompt budget included: a pair training would drop is dropped and
    counted the same way, in the load report. Returns (pairs, items, report, stats, budget)."""
    pairs, report = load_preferences(args.data, args.data_format)
    if args.num_pairs and args.num_pairs < len(pairs):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(pairs), args.num_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    budget = args.max_prompt_length or args.max_length // 2
    if budget >= args.max_length:
        raise UserError(f"--max_prompt_length {budget} must be below --max_length {args.max_length}")
    items, stats = tokenize_pairs(tokenizer, pairs, max_length=args.max_length, max_prompt_length=budget,
                                  truncation="keep_end", report=report)
    print0(env, f"{report.summary()}\n{stats.summary()}")
    if not items:
        raise UserError(f"no pair of {args.data} fits --max_length {args.max_length}: {stats.summary()}")
    kept = {it.line for it in items}  # a pair's line is unique in its file
    return [p for p in pairs if p.line in kept], items, report, stats, budget


def run_rm(args, env):
    given = {"--reward_model": args.reward_model, "--data": args.data}
    demo = demo_world_if_none(given, env, f"{DEMO_RM} on the demo world's held-out pairs")
    if demo is not None:
        args.reward_model, args.data = DEMO_RM, str(demo.eval_data)
    announce(args, env)
    config = check_slot(args.reward_model, "--reward_model", reward=True)
    tokenizer = load_tokenizer(args.reward_model, chat_format=args.chat_format)
    check_tokenizer_fits(config, tokenizer, args.reward_model)
    out = output_folder(args.output or "runs/eval/rm", env)
    pairs, items, report, stats, budget = rm_pairs(args, tokenizer, env)

    model = load_slot(args.reward_model, "--reward_model", args, env)
    # One packed row per pair, the prompt computed once, in length-grouped batches (training's layout).
    rewards = map_batches(lambda idx: score_pairs(model, [items[i] for i in idx], tokenizer.pad_token_id),
                          len(items), args.batch_size, env, "scoring pairs", "pairs",
                          lengths=[packed_length(it) for it in items])
    better, worse = (list(column) for column in zip(*rewards))
    if not env.is_main:
        return None
    # Length = tokens of the response alone (the reward model's tokenizer), not of the conversation.
    better_len = [len(t) for t in tokenizer.encode_batch([p.chosen for p in pairs])]
    worse_len = [len(t) for t in tokenizer.encode_batch([p.rejected for p in pairs])]

    summary = reward_model_summary(better, better_len, worse, worse_len, args.n_resamples, args.seed)
    summary["length_bias"]["length_unit"] = "tokens of the response (reward-model tokenizer)"
    summary.update(reward_model=args.reward_model, data=args.data, n_resamples=args.n_resamples, seed=args.seed,
                   max_length=args.max_length, max_prompt_length=budget, data_read=report.read,
                   data_kept=report.kept, data_skipped=report.skipped, prompts_truncated=stats.prompt_truncated)
    write_json(out / "summary.json", summary)
    write_json(out / "pairs.json", [
        {"line": p.line, "prompt": p.prompt, "better": p.chosen, "worse": p.rejected,
         "better_reward": b, "worse_reward": w, "margin": b - w, "correct": b > w, "tie": b == w,
         "better_length_tokens": lb, "worse_length_tokens": lw}
        for p, b, w, lb, lw in zip(pairs, better, worse, better_len, worse_len)])
    rm_eval_figure(better, worse, out / "rm_eval.png", title=f"reward model {args.reward_model}")

    print_rm_summary(summary, args.data)
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


# --------------------------------------------------------------------------------- dpo

def print_dpo_summary(summary: dict, reward_model: str, kl: bool, n_cut: int) -> None:
    """The terminal table of evaluate.py dpo: win rates, gain, KL, length and stop rates."""
    b, p = summary["base"], summary["policy"]
    rep = f"repetition_{REPETITION_NGRAM}gram"
    lc, similar = summary["length_controlled"], summary["length_buckets"]["similar"]
    print_table(f"policy vs base on {summary['n']} prompts (reward model {reward_model})", [
        ("win rate (strict)", summary["win_rate"]), ("  95% bootstrap CI", summary["win_rate_ci95"]),
        ("ties / losses", f"{summary['ties']} / {summary['losses']}"),
        ("win rate, ties as 1/2", summary["win_rate_ties_half"]), ("  95% bootstrap CI", summary["win_rate_ties_half_ci95"]),
        ("length-controlled win rate", lc["win_rate"]), ("  95% bootstrap CI", lc["win_rate_ci95"]),
        (f"win rate, |length diff| <= {summary['length_buckets']['tolerance_tokens']} tokens (n={similar['n']})",
         similar["win_rate"]),
        ("mean length diff (tokens), policy - base", summary["mean_length_diff_tokens"]),
        ("mean reward gain ± std", f"{summary['mean_gain']:.4f} ± {summary['std_gain']:.4f}"),
        ("  95% bootstrap CI", summary["mean_gain_ci95"]),
        *([("KL per token, on policy answers", summary["kl"]["kl_per_token"]),
           ("  95% bootstrap CI", summary["kl"]["kl_per_token_ci95"]),
           ("KL per answer", summary["kl"]["kl_per_answer"])] if kl else []),
        ("reward mean, base / policy", f"{b['reward_mean']:.4f} / {p['reward_mean']:.4f}"),
        ("stop rate, base / policy", f"{b['stop_rate']:.3f} / {p['stop_rate']:.3f}"),
        ("mean length (tokens), base / policy", f"{b['mean_length_tokens']:.1f} / {p['mean_length_tokens']:.1f}"),
        (f"repeated {REPETITION_NGRAM}-grams, base / policy", f"{b[rep]:.3f} / {p[rep]:.3f}"),
        ("prompts cut to --max_prompt_length", n_cut),
    ])


def rewards_of_both(asked, both, rm_tokenizer, cache, args, env) -> tuple[list[float], list[float]]:
    """The reward model's score of every base and policy answer (the base's read from
    --generation_cache when its answers and the reward model are the ones it was stored with).
    Each model's answers go through the reward model one conversation per row, in length-grouped
    batches (a model's rewards so depend on its own answers only, as the cache needs); each
    conversation is cut as training cuts it (reward.conversation_ids, --max_prompt_length the budget)."""
    rm = load_slot(args.reward_model, "--reward_model", args, env)

    def scored(texts, what):
        seqs = [conversation_ids(rm_tokenizer, prompt, text, args.max_length, args.max_prompt_length)
                for prompt, text in zip(asked, texts, strict=True)]
        return map_batches(lambda idx: score_ids(rm, [seqs[i] for i in idx], rm_tokenizer.pad_token_id), len(seqs),
                           args.batch_size, env, f"scoring {what}", "answers", lengths=[len(q) for q in seqs])

    settings = None if both.base_key is None else {  # the base's answers, and what scores them
        "answers": both.base_key, "reward_model_files": folder_fingerprint(args.reward_model),
        "max_length": args.max_length, "max_prompt_length": args.max_prompt_length, "batch_size": args.batch_size,
        "dtype": args.dtype, "device": env.device.type, "chat_format": args.chat_format, "layout": "length-grouped"}
    key, base_r = cache.get("base_rewards", settings)
    if base_r is None:
        base_r = scored(both.base.texts, "base answers")
        cache.put("base_rewards", key, settings, base_r)
    return base_r, scored(both.policy.texts, "policy answers")


def generation_rows(prompts, cut, length_diff, both, base_r, policy_r, k: int) -> list[dict]:
    """generations.json: per prompt, the gain, and each model's mean reward and k answers."""
    kl = both.policy_logps is not None

    def answers(g, rewards, i):  # the k answers of one model to prompt i
        return [{"response": g.texts[j], "reward": rewards[j], "length_tokens": len(g.token_ids[j]),
                 "finished": g.finished[j], f"repetition_{REPETITION_NGRAM}gram": repetition_rate(g.token_ids[j]),
                 **({"log_ratio": both.policy_logps[j] - both.base_logps[j]} if kl and g is both.policy else {})}
                for j in range(i * k, (i + 1) * k)]

    means = {"base": per_prompt_means(base_r, k), "policy": per_prompt_means(policy_r, k)}
    return [{"index": i, "prompt": prompt, "gain": float(means["policy"][i] - means["base"][i]),
             "length_diff_tokens": float(length_diff[i]), "prompt_truncated": cut[i],
             **{who: {"reward": float(means[who][i]), "samples": answers(g, r, i)}
                for who, g, r in (("base", both.base, base_r), ("policy", both.policy, policy_r))}}
            for i, prompt in enumerate(prompts)]


def check_dpo_models(args, env):
    """Before any heavy work: the three checkpoints load and are the right kinds, --base and --policy
    share one tokenizer, each tokenizer fits its model; says when --policy is --base. Returns
    (tokenizer of base and policy, the reward model's tokenizer, whether policy and base are the same)."""
    base_config = check_slot(args.base, "--base", reward=False)
    policy_config = check_slot(args.policy, "--policy", reward=False)
    rm_config = check_slot(args.reward_model, "--reward_model", reward=True)
    same_model = same_weights(resolve_model_path(args.policy, "--policy"), resolve_model_path(args.base, "--base"))
    if same_model:
        print0(env, f"note: --policy and --base are the same model (identical weight files); {SAME_MODEL_NOTE}")
    tokenizer = load_tokenizer(args.base, chat_format=args.chat_format)
    rm_tokenizer = load_tokenizer(args.reward_model, chat_format=args.chat_format)
    check_same_tokenizer(tokenizer, args.base, load_tokenizer(args.policy, chat_format=args.chat_format), args.policy,
                         "--base", "--policy")
    check_tokenizer_fits(base_config, tokenizer, args.base)
    check_tokenizer_fits(policy_config, tokenizer, args.policy, tokenizer_dir=args.base)
    check_tokenizer_fits(rm_config, rm_tokenizer, args.reward_model)
    return tokenizer, rm_tokenizer, same_model


def describe_prompts(ids, n_cut: int, k: int, max_prompt_length: int, env) -> None:
    """How many prompts, how many were cut, and a warning before the long silence of a huge prefill."""
    print0(env, f"{len(ids)} prompts, {k} answer(s) each per model; {n_cut} prompt(s) longer than "
                f"--max_prompt_length {max_prompt_length} keep their last tokens")
    longest = max(map(len, ids), default=0)
    if longest > LONG_PROMPT_TOKENS:
        print0(env, f"the longest prompt has {longest:,} tokens: generating from it takes long (attention's cost grows "
                    f"with the square of the length; minutes on a CPU); lower --max_prompt_length to go faster")


def run_dpo(args, env):
    given = {"--base": args.base, "--policy": args.policy, "--reward_model": args.reward_model, "--data": args.data}
    demo = demo_world_if_none(given, env, f"the demo base model vs {DEMO_POLICY}, judged by {DEMO_RM}")
    if demo is not None:
        args.base, args.policy, args.reward_model, args.data = (str(demo.base_model), DEMO_POLICY, DEMO_RM,
                                                                str(demo.eval_data))
    announce(args, env)
    tokenizer, rm_tokenizer, same_model = check_dpo_models(args, env)
    out = output_folder(args.output or "runs/eval/dpo", env)
    pairs, report = load_data(args, env)
    prompts = prompts_view(pairs)[: args.num_prompts]
    k = args.samples_per_prompt
    ids, cut = prompt_ids_kept_end(tokenizer, prompts, args.max_prompt_length)
    n_cut = sum(cut)
    describe_prompts(ids, n_cut, k, args.max_prompt_length, env)
    asked = [p for p in prompts for _ in range(k)]  # each prompt k times in a row
    asked_ids = [p for p in ids for _ in range(k)]

    kl = not args.skip_kl
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.batch_size)
    cache = SharedCache(args.generation_cache, env)
    both = answers_of_both(lambda path, flag: load_slot(path, flag, args, env), args.policy, args.base, tokenizer,
                           asked_ids, sampling, env, cache, args.dtype, kl)
    policy, base = both.policy, both.base
    base_r, policy_r = rewards_of_both(asked, both, rm_tokenizer, cache, args, env)
    if not env.is_main:
        return None

    summary = policy_comparison_summary(base_r, policy_r, base.token_ids, policy.token_ids, base.finished,
                                        policy.finished, args.n_resamples, args.seed, samples_per_prompt=k)
    length_diff = (per_prompt_means([len(t) for t in policy.token_ids], k)
                   - per_prompt_means([len(t) for t in base.token_ids], k))  # (N,) policy minus base, tokens
    summary.update(length_control_summary(prompt_outcomes(per_prompt_means(policy_r, k), per_prompt_means(base_r, k)),
                                          length_diff, args.n_resamples, args.seed))
    if kl:
        summary["kl"] = sampled_kl(both.policy_logps, both.base_logps, [len(a) for a in both.scored_ids], k,
                                   args.n_resamples, args.seed)
    summary.update(same_model=same_model, base_model=args.base, policy_model=args.policy, reward_model=args.reward_model, data=args.data,
                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                   max_prompt_length=args.max_prompt_length, prompts_truncated=n_cut, max_length=args.max_length,
                   seed=args.seed, n_resamples=args.n_resamples, length_unit="tokens (generated, EOS excluded)",
                   generation_cache=args.generation_cache, base_answers_reused=both.base_from_cache)

    rows = generation_rows(prompts, cut, length_diff, both, base_r, policy_r, k)
    write_json(out / "summary.json", summary)
    write_json(out / "generations.json", rows)
    dpo_eval_figure(base_r, policy_r, [len(t) for t in base.token_ids], [len(t) for t in policy.token_ids],
                    out / "dpo_eval.png", samples_per_prompt=k)
    (out / "report.md").write_text(dpo_report(jsonable(summary), rows, args.top_k_report))

    print_dpo_summary(summary, args.reward_model, kl, n_cut)
    print(f"\nwrote {out / 'summary.json'}, {out / 'generations.json'}, {out / 'dpo_eval.png'}, {out / 'report.md'}")
    return summary


# ---------------------------------------------------------------------------- implicit

def run_implicit(args, env):
    given = {"--policy": args.policy, "--ref_model": args.ref_model, "--data": args.data}
    demo = demo_world_if_none(given, env, f"{DEMO_POLICY} against the demo base model")
    if demo is not None:
        args.policy, args.ref_model, args.data = DEMO_POLICY, str(demo.base_model), str(demo.eval_data)
    announce(args, env)
    if args.max_prompt_length >= args.max_length:
        raise UserError(f"--max_prompt_length {args.max_prompt_length} must be below --max_length {args.max_length}")
    policy_config = check_slot(args.policy, "--policy", reward=False)
    ref_config = check_slot(args.ref_model, "--ref_model", reward=False)
    tokenizer = load_tokenizer(args.policy, chat_format=args.chat_format)
    check_same_tokenizer(tokenizer, args.policy, load_tokenizer(args.ref_model, chat_format=args.chat_format),
                         args.ref_model, "--policy", "--ref_model")
    check_tokenizer_fits(policy_config, tokenizer, args.policy)
    check_tokenizer_fits(ref_config, tokenizer, args.ref_model, tokenizer_dir=args.policy)
    out = output_folder(args.output or "runs/eval/implicit", env)
    pairs, report = load_data(args, env)
    items, stats = tokenize_pairs(tokenizer, pairs, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, truncation="keep_end")
    print0(env, stats.summary())
    if not items:
        raise UserError(f"no pair of {args.data} fits --max_length {args.max_length}: {stats.summary()}")

    policy = load_slot(args.policy, "--policy", args, env)
    ref = load_slot(args.ref_model, "--ref_model", args, env)

    def rewards(idx):  # (chosen reward, rejected reward, policy log-probs, ref log-probs) per pair
        return zip(*implicit_rewards(policy, ref, [items[i] for i in idx], args.beta, len(idx), tokenizer.pad_token_id))

    results = map_batches(rewards, len(items), args.batch_size, env, "implicit rewards", "pairs",
                          lengths=[packed_length(it) for it in items])  # length-grouped, as in training
    if not env.is_main:
        return None
    chosen, rejected, pol_lp, ref_lp = (list(column) for column in zip(*results))
    summary = implicit_reward_summary(chosen, rejected, args.n_resamples, args.seed)
    summary.update(policy_model=args.policy, ref_model=args.ref_model, data=args.data, beta=args.beta,
                   n_resamples=args.n_resamples, seed=args.seed, pairs_given=stats.pairs, pairs_dropped=stats.dropped,
                   prompts_truncated=stats.prompt_truncated, prompts_mostly_cut=stats.prompt_mostly_cut)
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


# ------------------------------------------------------------------------------ curves

def run_label(run_dir: Path) -> str:
    """The run folder's name, with its learning rate when run_config.json records one."""
    cfg = run_dir / "run_config.json"
    settings = read_json(cfg, "the run's settings") if cfg.is_file() else {}
    lr = settings.get("lr") if isinstance(settings, dict) else None
    return f"{run_dir.name} (lr {lr:g})" if isinstance(lr, (int, float)) else run_dir.name


def run_curves(args):
    runs = []
    for d in map(Path, args.run_dirs):
        path = d / "metrics.jsonl"
        if not path.is_file():
            raise MissingFileError(f"{path} not found: is {d} a training run folder?")
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise UserError(f"{path}, line {n}: not JSON ({e})") from None
        runs.append((run_label(d), records))
    out = Path(args.output or "runs/eval/curves")
    figure = plot_training_curves(runs, out / "curves.png", metrics=tuple(args.metrics))
    print_table("training curves", [(label, f"{len(r)} records") for label, r in runs])
    print(f"\nwrote {figure}")
    return figure


# ------------------------------------------------------------------------ command line

def device_flag(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda or cuda:N)") from None
    return text


def add_common(p, seed_help="seeds the bootstrap"):
    p.add_argument("--data", help="preference file (.json, .jsonl, .gz); with no model flag either: the demo eval split")
    p.add_argument("--data_format", default="auto", choices=("auto", *FORMATS), help="the preference file's format")
    p.add_argument("--output", help="folder for the results (created); default runs/eval/<command>")
    p.add_argument("--batch_size", type=positive_int, default=16, help="sequences per forward pass (>= 1)")
    p.add_argument("--max_length", type=int_range(2), default=1024,
                   help="max tokens of prompt + response when scoring (>= 2); longer ones lose the start of the prompt")
    p.add_argument("--seed", type=non_negative_int, default=0, help=seed_help)
    p.add_argument("--n_resamples", type=positive_int, default=N_RESAMPLES, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--device", type=device_flag, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", type=eval_dtype, default="fp32",
                   help="weights dtype: fp32/float32, bf16/bfloat16, fp16/float16")
    p.add_argument("--chat_format", default="auto", choices=CHAT_FORMAT_CHOICES,
                   help="chat template renderer for every checkpoint loaded: auto (a known family in Python, "
                        "any other template with Jinja), a family, or jinja")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error too")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_, description, run):  # descriptions are kept as written: wrap them here
        p = sub.add_parser(name, help=help_, description=textwrap.fill(f"{help_.capitalize()}{description}", 92))
        p.set_defaults(run=run)
        return p

    p = command("rm", "accuracy, margins and length bias of a reward model on preference pairs",
                ": each pair's better and worse answer scored by the reward model (a "
                "*ForSequenceClassification checkpoint, as train_rm.py writes).", run_rm)
    p.add_argument("--reward_model", help=f"reward-model checkpoint folder (with no --data either: {DEMO_RM})")
    p.add_argument("--num_pairs", type=positive_int, default=None, help="evaluate a seeded random subset of this many pairs")
    p.add_argument("--max_prompt_length", type=positive_int, default=None,
                   help="prompt budget, as train_rm.py's: longer prompts keep their last tokens (default: half of "
                        "--max_length, train_rm.py's default); pairs that do not fit are dropped as in training")
    add_common(p, seed_help="seeds the --num_pairs subset and the bootstrap")

    p = command("dpo", "policy vs base: generate, score with the reward model, compare",
                ". --base and --policy are causal LMs sharing one tokenizer; --reward_model is a reward model, "
                "which may have its own tokenizer (it re-renders each conversation with its own chat template). "
                "Prompts longer than --max_prompt_length keep their last tokens. Sampling is seeded per "
                "prompt: the answers do not depend on --batch_size or the number of ranks.", run_dpo)
    p.add_argument("--base", help="the model before DPO (with no other model or data flag: the demo base model)")
    p.add_argument("--policy", help=f"the DPO policy (with no other model or data flag: {DEMO_POLICY})")
    p.add_argument("--reward_model", help=f"reward model that judges both (with no other model or data flag: {DEMO_RM})")
    p.add_argument("--num_prompts", type=positive_int, default=100, help="the first N distinct prompts of --data")
    p.add_argument("--max_prompt_length", type=positive_int, default=512,
                   help="longer prompts keep their last tokens for generation, as in training")
    p.add_argument("--max_new_tokens", type=positive_int, default=128, help="response budget; longer answers are cut")
    p.add_argument("--temperature", type=non_negative_float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float_range(0.0, 1.0, low_open=True), default=0.9,
                   help="nucleus sampling mass, in (0, 1]; 1 keeps every token")
    p.add_argument("--samples_per_prompt", type=positive_int, default=1,
                   help="answers per prompt and model; wins and gains compare each model's mean reward over them")
    p.add_argument("--top_k_report", type=non_negative_int, default=5, help="largest gains and losses shown in report.md")
    p.add_argument("--skip_kl", action="store_true",
                   help="do not estimate the policy's KL from the base (one teacher-forced forward per model over "
                        "the policy's answers)")
    p.add_argument("--generation_cache", default=None,
                   help="folder where the base's answers and their rewards are stored and reused by later runs "
                        "with exactly the same base files, prompts, sampling settings and reward model")
    add_common(p, seed_help="seeds sampling (per prompt, the same for both models) and the bootstrap")

    p = command("implicit", "accuracy of DPO's implicit reward beta*log(pi/ref) on preference pairs",
                ". --policy and --ref_model are causal LMs sharing one tokenizer (the policy's is used for "
                "both).", run_implicit)
    p.add_argument("--policy", help=f"the DPO policy (with no other model or data flag: {DEMO_POLICY})")
    p.add_argument("--ref_model", help="its reference (with no other model or data flag: the demo base model)")
    p.add_argument("--beta", type=positive_float, default=0.1, help="the beta of training (scales rewards, not accuracy)")
    p.add_argument("--max_prompt_length", type=positive_int, default=512,
                   help="longer prompts keep their last tokens; must be below --max_length")
    add_common(p)

    p = command("curves", "overlay the training curves of several runs", " (each run folder's metrics.jsonl).",
                run_curves)
    p.add_argument("run_dirs", nargs="+", help="run folders, each with metrics.jsonl")
    p.add_argument("--output", help="folder for curves.png (default: runs/eval/curves)")
    p.add_argument("--metrics", nargs="+", default=list(CURVE_METRICS), help="metrics to plot (absent ones skipped)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.run is run_curves:  # reads files only: no model, no device, no ranks
        return run_curves(args)
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available on this machine")
    env = init_distributed(device=args.device)
    try:
        result = args.run(args, env)
        barrier(env)  # every rank leaves once rank 0 has written (distributed.finish_distributed)
    finally:
        destroy_distributed()
    return result


if __name__ == "__main__":
    run_main(main)
