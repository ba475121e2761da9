"""Policy against base (`evaluate.py dpo`): both answer the same prompts, the reward model judges
every answer, and the policy wins a prompt when the mean reward of its answers is higher.

The steps, in order: check the three checkpoints (kinds, tokenizers) before any heavy work; cut
the prompts to --max_prompt_length (keeping their last tokens, as training does); generate with
both models, one in memory at a time (policy_vs_base.py, which also gives the log-probs for the
KL); score every answer with the reward model (rewards_of_both); then rank 0 writes
summary.json (win rates strict, ties as 1/2 and length-controlled, reward gain, KL, stop rate,
length, repetition), generations.json, dpo_eval.png and report.md, and prints the table."""
from dataclasses import dataclass

from .answer_cache import folder_fingerprint
from .checkpoint import same_weights
from .compat import check_same_tokenizer, check_tokenizer_fits
from .data import prompts_view
from .distributed import print0
from .eval_io import EvalSettings, check_slot, jsonable, load_data, load_slot, output_folder, print_table, write_json
from .eval_models import map_batches
from .evaluation import (REPETITION_NGRAM, per_prompt_means, policy_comparison_summary, prompt_outcomes, repetition_rate,
                         sampled_kl)
from .hub import resolve_model_path
from .length_control import length_control_summary
from .plots import dpo_eval_figure
from .policy_vs_base import SharedCache, Sampling, answers_of_both, prompt_ids_kept_end
from .report import dpo_report
from .reward import conversation_ids, score_ids
from .tokenizer import load_tokenizer

# A prompt longer than this makes generation's prefill slow enough to deserve a line first.
LONG_PROMPT_TOKENS = 8192
SAME_MODEL_NOTE = "the comparison can only come out a tie (win rate 0, every prompt a tie)"


@dataclass
class DPOSettings(EvalSettings):
    """evaluate.py dpo's settings."""
    base: str  # the model before DPO (a causal LM checkpoint)
    policy: str  # the DPO policy (shares the base's tokenizer)
    reward_model: str  # the reward model that judges both (may have a tokenizer of its own)
    num_prompts: int  # the first N distinct prompts of data
    max_prompt_length: int  # longer prompts keep their last tokens, for generation and scoring
    max_new_tokens: int  # answer budget; longer answers are cut
    temperature: float  # sampling temperature; 0 is greedy
    top_p: float  # nucleus sampling mass in (0, 1]; 1 keeps every token
    samples_per_prompt: int  # answers per prompt and model; a prompt compares the mean rewards
    top_k_report: int  # largest gains and losses shown in report.md
    skip_kl: bool  # True: no estimate of the policy's KL from the base
    generation_cache: str | None  # folder where the base's answers and rewards are kept; None: no cache


def check_dpo_models(s: DPOSettings, env):
    """Before any heavy work: the three checkpoints load and are the right kinds, --base and --policy
    share one tokenizer, each tokenizer fits its model; says when --policy is --base. Returns
    (tokenizer of base and policy, the reward model's tokenizer, whether policy and base are the same)."""
    base_config = check_slot(s.base, "--base", reward=False)
    policy_config = check_slot(s.policy, "--policy", reward=False)
    rm_config = check_slot(s.reward_model, "--reward_model", reward=True)
    same_model = same_weights(resolve_model_path(s.policy, "--policy"), resolve_model_path(s.base, "--base"))
    if same_model:
        print0(env, f"note: --policy and --base are the same model (identical weight files); {SAME_MODEL_NOTE}")
    tokenizer = load_tokenizer(s.base, chat_format=s.chat_format)
    rm_tokenizer = load_tokenizer(s.reward_model, chat_format=s.chat_format)
    check_same_tokenizer(tokenizer, s.base, load_tokenizer(s.policy, chat_format=s.chat_format), s.policy,
                         "--base", "--policy")
    check_tokenizer_fits(base_config, tokenizer, s.base)
    check_tokenizer_fits(policy_config, tokenizer, s.policy, tokenizer_dir=s.base)
    check_tokenizer_fits(rm_config, rm_tokenizer, s.reward_model)
    return tokenizer, rm_tokenizer, same_model


def describe_prompts(ids, n_cut: int, k: int, max_prompt_length: int, env) -> None:
    """How many prompts, how many were cut, and a warning before the long silence of a huge prefill."""
    print0(env, f"{len(ids)} prompts, {k} answer(s) each per model; {n_cut} prompt(s) longer than "
                f"--max_prompt_length {max_prompt_length} keep their last tokens")
    longest = max(map(len, ids), default=0)
    if longest > LONG_PROMPT_TOKENS:
        print0(env, f"the longest prompt has {longest:,} tokens: generating from it takes long (attention's cost grows "
                    f"with the square of the length; minutes on a CPU); lower --max_prompt_length to go faster")


def rewards_of_both(asked, both, rm_tokenizer, cache, s: DPOSettings, env) -> tuple[list[float], list[float]]:
    """The reward model's score of every base and policy answer (the base's read from
    --generation_cache when its answers and the reward model are the ones it was stored with).
    Each model's answers go through the reward model one conversation per row, in length-grouped
    batches (a model's rewards so depend on its own answers only, as the cache needs); each
    conversation is cut as training cuts it (reward.conversation_ids, --max_prompt_length the budget)."""
    rm = load_slot(s.reward_model, "--reward_model", s.dtype, env)

    def scored(texts, what):
        seqs = [conversation_ids(rm_tokenizer, prompt, text, s.max_length, s.max_prompt_length)
                for prompt, text in zip(asked, texts, strict=True)]
        return map_batches(lambda idx: score_ids(rm, [seqs[i] for i in idx], rm_tokenizer.pad_token_id), len(seqs),
                           s.batch_size, env, f"scoring {what}", "answers", lengths=[len(q) for q in seqs])

    settings = None if both.base_key is None else {  # the base's answers, and what scores them
        "answers": both.base_key, "reward_model_files": folder_fingerprint(s.reward_model),
        "max_length": s.max_length, "max_prompt_length": s.max_prompt_length, "batch_size": s.batch_size,
        "dtype": s.dtype, "device": env.device.type, "chat_format": s.chat_format, "layout": "length-grouped"}
    key, base_r = cache.get("base_rewards", settings)
    if base_r is None:
        base_r = scored(both.base.texts, "base answers")
        cache.put("base_rewards", key, settings, base_r)
    return base_r, scored(both.policy.texts, "policy answers")


def dpo_summary(s: DPOSettings, both, base_r, policy_r, same_model: bool, n_cut: int) -> tuple[dict, list]:
    """summary.json's dict (win rates, length control, KL, and the settings that produced them),
    and the length difference per prompt ((N,) policy minus base, tokens)."""
    k, policy, base = s.samples_per_prompt, both.policy, both.base
    summary = policy_comparison_summary(base_r, policy_r, base.token_ids, policy.token_ids, base.finished,
                                        policy.finished, s.n_resamples, s.seed, samples_per_prompt=k)
    length_diff = (per_prompt_means([len(t) for t in policy.token_ids], k)
                   - per_prompt_means([len(t) for t in base.token_ids], k))  # (N,) policy minus base, tokens
    summary.update(length_control_summary(prompt_outcomes(per_prompt_means(policy_r, k), per_prompt_means(base_r, k)),
                                          length_diff, s.n_resamples, s.seed))
    if not s.skip_kl:
        summary["kl"] = sampled_kl(both.policy_logps, both.base_logps, [len(a) for a in both.scored_ids], k,
                                   s.n_resamples, s.seed)
    summary.update(same_model=same_model, base_model=s.base, policy_model=s.policy, reward_model=s.reward_model,
                   data=s.data, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                   max_prompt_length=s.max_prompt_length, prompts_truncated=n_cut, max_length=s.max_length,
                   seed=s.seed, n_resamples=s.n_resamples, length_unit="tokens (generated, EOS excluded)",
                   generation_cache=s.generation_cache, base_answers_reused=both.base_from_cache)
    return summary, length_diff


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


def evaluate_dpo(s: DPOSettings, env):
    """Policy vs base on the first --num_prompts prompts of the data, judged by the reward model
    -> summary.json, generations.json, dpo_eval.png, report.md in the output folder. Returns the
    summary (rank 0), None on the other ranks."""
    tokenizer, rm_tokenizer, same_model = check_dpo_models(s, env)
    out = output_folder(s.output or "runs/eval/dpo", env)
    pairs, report = load_data(s.data, s.data_format, env)
    prompts = prompts_view(pairs)[: s.num_prompts]
    k = s.samples_per_prompt
    ids, cut = prompt_ids_kept_end(tokenizer, prompts, s.max_prompt_length)
    n_cut = sum(cut)
    describe_prompts(ids, n_cut, k, s.max_prompt_length, env)
    asked = [p for p in prompts for _ in range(k)]  # each prompt k times in a row
    asked_ids = [p for p in ids for _ in range(k)]

    sampling = Sampling(s.max_new_tokens, s.temperature, s.top_p, s.seed, s.batch_size)
    cache = SharedCache(s.generation_cache, env)
    both = answers_of_both(lambda path, flag: load_slot(path, flag, s.dtype, env), s.policy, s.base, tokenizer,
                           asked_ids, sampling, env, cache, s.dtype, not s.skip_kl)
    base_r, policy_r = rewards_of_both(asked, both, rm_tokenizer, cache, s, env)
    if not env.is_main:
        return None

    summary, length_diff = dpo_summary(s, both, base_r, policy_r, same_model, n_cut)
    rows = generation_rows(prompts, cut, length_diff, both, base_r, policy_r, k)
    write_json(out / "summary.json", summary)
    write_json(out / "generations.json", rows)
    dpo_eval_figure(base_r, policy_r, [len(t) for t in both.base.token_ids], [len(t) for t in both.policy.token_ids],
                    out / "dpo_eval.png", samples_per_prompt=k)
    (out / "report.md").write_text(dpo_report(jsonable(summary), rows, s.top_k_report))

    print_dpo_summary(summary, s.reward_model, not s.skip_kl, n_cut)
    print(f"\nwrote {out / 'summary.json'}, {out / 'generations.json'}, {out / 'dpo_eval.png'}, {out / 'report.md'}")
    return summary


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
