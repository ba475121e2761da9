"""The markdown report of `evaluate.py dpo` (report.md): headline numbers in words, the table of
both models, and the prompts where the policy gained and lost most, with every answer.

Numbers come from summary.json's dict and generations.json's rows as written (jsonable: an
undefined statistic, such as the win rate of an empty length bucket, is None and prints "n/a").
"""
from .evaluation import REPETITION_NGRAM, top_k_changes


def _conversation_md(messages) -> str:
    return "\n".join(f"**{m['role']}:** {m['content']}" for m in messages)


def _num(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)  # jsonable() turned an undefined statistic into None


def _ci(pair, spec=".3f") -> str:
    return f"{_num(pair[0], spec)} to {_num(pair[1], spec)}"


def length_paragraph(summary) -> str:
    """report.md's lines on ties as 1/2, the length-controlled win rate, length buckets and the KL."""
    lc, buckets = summary["length_controlled"], summary["length_buckets"]
    tol = buckets["tolerance_tokens"]
    text = (f"Ties counted as half a win: **{_num(summary['win_rate_ties_half'])}** (95% CI "
            f"{_ci(summary['win_rate_ties_half_ci95'])}). Mean length difference, policy minus base: "
            f"{_num(summary['mean_length_diff_tokens'], '+.1f')} tokens per prompt. {length_controlled_sentence(lc)} "
            f"Win rate (ties as 1/2) where the policy answered within {tol} tokens of the base: "
            f"{_num(buckets['similar']['win_rate'])} (n={buckets['similar']['n']}); shorter: "
            f"{_num(buckets['shorter']['win_rate'])} (n={buckets['shorter']['n']}); longer: "
            f"{_num(buckets['longer']['win_rate'])} (n={buckets['longer']['n']}).")
    if "kl" in summary:
        kl = summary["kl"]
        text += (f" KL from the base on the policy's own answers: {_num(kl['kl_per_token'], '.4f')} per token "
                 f"(95% CI {_ci(kl['kl_per_token_ci95'], '.4f')}), {_num(kl['kl_per_answer'], '.3f')} per answer.")
    return text + "\n"


def length_controlled_sentence(lc: dict) -> str:
    """The length-controlled win rate in words; without any length difference (scale 0, e.g. a
    policy identical to its base) there is nothing to control for, and no tanh(d / 0) to print."""
    if not lc["scale"]:
        return (f"Length-controlled win rate: {_num(lc['win_rate'])}, the plain model with no length term (every "
                f"prompt's length difference is 0, so there is no length to control for).")
    return (f"Length-controlled win rate (logistic model of the outcome on tanh(length difference / "
            f"{_num(lc['scale'], '.1f')}), AlpacaEval 2's; the predicted win rate at equal length): "
            f"**{_num(lc['win_rate'])}** (95% CI {_ci(lc['win_rate_ci95'])}; "
            f"length slope {_num(lc['slope'], '+.2f')}).")


SAME_MODEL = ("The policy and the base are the same model (identical weight files): every difference below is "
              "sampling noise or none at all, and a win rate of 0 with every prompt a tie is the expected result.")


def dpo_report(summary: dict, rows: list[dict], k: int) -> str:
    """report.md of `evaluate.py dpo`: the settings, the headline numbers, the table of both models,
    then the k largest gains and the k largest losses with every answer.

    summary: summary.json's dict (after jsonable: an undefined statistic is None); rows: generations.json's."""
    b, p = summary["base"], summary["policy"]
    spp = summary["samples_per_prompt"]
    lines = [
        f"# DPO policy vs base\n\npolicy `{summary['policy_model']}`, base `{summary['base_model']}`, reward model "
        f"`{summary['reward_model']}`, {summary['n']} prompts of `{summary['data']}`, {spp} answer(s) per prompt and "
        f"model; sampling: temperature {summary['temperature']}, top_p {summary['top_p']}, max_new_tokens "
        f"{summary['max_new_tokens']}, seed {summary['seed']}. {summary['prompts_truncated']} prompt(s) longer than "
        f"max_prompt_length {summary['max_prompt_length']} "
        f"tokens kept their last tokens for generation.\n",
        *([f"**{SAME_MODEL}**\n"] if summary.get("same_model") else []),
        f"Win rate of the policy (strictly higher {'mean ' if spp > 1 else ''}reward on the prompt): "
        f"**{summary['win_rate']:.3f}** "
        f"(95% bootstrap CI {summary['win_rate_ci95'][0]:.3f} to {summary['win_rate_ci95'][1]:.3f}); "
        f"ties {summary['ties']}, losses {summary['losses']}. Mean reward gain {summary['mean_gain']:.4f} "
        f"± {summary['std_gain']:.4f} (std).\n",
        length_paragraph(summary),
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
