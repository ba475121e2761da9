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
--batch_size (eval_models.map_batches); the results come back in file order.

With no model and no data flag at all, a command evaluates the demo world (minialign.demo; the
reward model and policy that train_rm.py / train_dpo.py write to runs/rm/model, runs/dpo/model)
and says so first; some flags but not all is an error naming the missing ones.

Under torchrun, generation and scoring are shared among the ranks, batch by batch (each batch the
same as in one process, so the numbers are the same), and rank 0 writes the results.
"""
# This file is the command line alone: the flags, the demo world when no model or data flag is
# given, and for each command a small settings dataclass handed to its pipeline in minialign:
# eval_rm.py (rm, implicit), eval_dpo.py (dpo), eval_curves.py (curves); eval_io.py holds what
# they share. The docstring above is `--help`'s text.
import argparse
import textwrap
from dataclasses import fields

import torch

from minialign.cli import (ArgumentParser, eval_dtype, float_range, int_range, non_negative_float, non_negative_int,
                           positive_float, positive_int, run_main)
from minialign.data import FORMATS
from minialign.distributed import barrier, destroy_distributed, init_distributed, print0
from minialign.errors import UserError
from minialign.eval_curves import CURVE_METRICS, CurvesSettings, overlay_curves
from minialign.eval_dpo import DPOSettings, evaluate_dpo
from minialign.eval_io import DEMO_POLICY, DEMO_RM
from minialign.eval_rm import ImplicitSettings, RMSettings, evaluate_implicit, evaluate_rm
from minialign.evaluation import N_RESAMPLES
from minialign.tokenizer import CHAT_FORMAT_CHOICES


# ------------------------------------------------------------------------ the demo world

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


def announce(args, env) -> None:
    """The start-up line: what runs where (after the demo-world line, which must come first)."""
    print0(env, f"evaluate.py {args.command}: {env.world_size} rank(s), device {env.device}, dtype {args.dtype}")


def settings_from(cls, args):
    """The settings dataclass cls, each field read from the flag of the same name."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# ------------------------------------------------------------------ one function a command

def run_rm(args, env):
    given = {"--reward_model": args.reward_model, "--data": args.data}
    demo = demo_world_if_none(given, env, f"{DEMO_RM} on the demo world's held-out pairs")
    if demo is not None:
        args.reward_model, args.data = DEMO_RM, str(demo.eval_data)
    announce(args, env)
    return evaluate_rm(settings_from(RMSettings, args), env)


def run_dpo(args, env):
    given = {"--base": args.base, "--policy": args.policy, "--reward_model": args.reward_model, "--data": args.data}
    demo = demo_world_if_none(given, env, f"the demo base model vs {DEMO_POLICY}, judged by {DEMO_RM}")
    if demo is not None:
        args.base, args.policy, args.reward_model, args.data = (str(demo.base_model), DEMO_POLICY, DEMO_RM,
                                                                str(demo.eval_data))
    announce(args, env)
    return evaluate_dpo(settings_from(DPOSettings, args), env)


def run_implicit(args, env):
    given = {"--policy": args.policy, "--ref_model": args.ref_model, "--data": args.data}
    demo = demo_world_if_none(given, env, f"{DEMO_POLICY} against the demo base model")
    if demo is not None:
        args.policy, args.ref_model, args.data = DEMO_POLICY, str(demo.base_model), str(demo.eval_data)
    announce(args, env)
    return evaluate_implicit(settings_from(ImplicitSettings, args), env)


def run_curves(args):
    return overlay_curves(settings_from(CurvesSettings, args))


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


def add_command(sub, name: str, help_: str, description: str, run):
    """A subcommand's parser; its description is kept as written and wrapped here."""
    p = sub.add_parser(name, help=help_, description=textwrap.fill(f"{help_.capitalize()}{description}", 92))
    p.set_defaults(run=run)
    return p


def add_rm(sub) -> None:
    p = add_command(sub, "rm", "accuracy, margins and length bias of a reward model on preference pairs",
                    ": each pair's better and worse answer scored by the reward model (a "
                    "*ForSequenceClassification checkpoint, as train_rm.py writes).", run_rm)
    p.add_argument("--reward_model", help=f"reward-model checkpoint folder (with no --data either: {DEMO_RM})")
    p.add_argument("--num_pairs", type=positive_int, default=None, help="evaluate a seeded random subset of this many pairs")
    p.add_argument("--max_prompt_length", type=positive_int, default=None,
                   help="prompt budget, as train_rm.py's: longer prompts keep their last tokens (default: half of "
                        "--max_length, train_rm.py's default); pairs that do not fit are dropped as in training")
    add_common(p, seed_help="seeds the --num_pairs subset and the bootstrap")


def add_dpo(sub) -> None:
    p = add_command(sub, "dpo", "policy vs base: generate, score with the reward model, compare",
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


def add_implicit(sub) -> None:
    p = add_command(sub, "implicit", "accuracy of DPO's implicit reward beta*log(pi/ref) on preference pairs",
                    ". --policy and --ref_model are causal LMs sharing one tokenizer (the policy's is used for "
                    "both).", run_implicit)
    p.add_argument("--policy", help=f"the DPO policy (with no other model or data flag: {DEMO_POLICY})")
    p.add_argument("--ref_model", help="its reference (with no other model or data flag: the demo base model)")
    p.add_argument("--beta", type=positive_float, default=0.1, help="the beta of training (scales rewards, not accuracy)")
    p.add_argument("--max_prompt_length", type=positive_int, default=512,
                   help="longer prompts keep their last tokens; must be below --max_length")
    add_common(p)


def add_curves(sub) -> None:
    p = add_command(sub, "curves", "overlay the training curves of several runs", " (each run folder's metrics.jsonl).",
                    run_curves)
    p.add_argument("run_dirs", nargs="+", help="run folders, each with metrics.jsonl")
    p.add_argument("--output", help="folder for curves.png (default: runs/eval/curves)")
    p.add_argument("--metrics", nargs="+", default=list(CURVE_METRICS), help="metrics to plot (absent ones skipped)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error too")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_rm, add_dpo, add_implicit, add_curves):
        add(sub)
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
