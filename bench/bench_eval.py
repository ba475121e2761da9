"""Evaluation at training speed: evaluate.py rm's scoring against train_rm.py's training step, and
KV-cache decoding against transformers' generate, on the real SmolLM2-135M-Instruct (fp32).

    /work/refenv/bin/python bench/bench_eval.py            # both sections, with the transformers column
    python bench/bench_eval.py --skip_decode               # the scoring section only (no transformers needed)
    /work/refenv/bin/python bench/bench_eval.py --quick    # fewer pairs, tokens and rounds (a smoke test)

Scoring. N HH-RLHF harmless pairs (a seeded subset), tokenized with SmolLM2's chat template and
training's truncation (--max_length, prompt budget half of it), and one reward model: SmolLM2's
backbone with a fresh score head (load_model(..., reward=True), as train_rm.py starts). Three
ways through the same pairs, B pairs per batch, each round the whole subset:
  train      train_rm.py's step (minialign.train.train_step: forward, backward, clip, AdamW) on
             one packed row per pair in length-grouped batches (--prefix_sharing, the default,
             with --group_by_length), on its own copy of the model
  eval       evaluate.py rm today: eval_models.map_batches over reward.score_pairs, one packed row
             per pair in length-grouped batches, no graph
  eval_old   evaluate.py rm before issue #28: better answers then worse answers in two passes of
             one right-padded row per conversation, batches in file order (reward.score_ids)
pairs/s = pairs / wall time of the round. The rewards of eval and eval_old are compared (max
absolute difference; the same tokens, so rounding only).

Decoding. Greedy answers to the first B distinct HH prompts (chat template and generation prompt,
their last --prompt_tokens tokens, left padded), --new_tokens each; no row stops early (minialign:
no stop id; transformers: a stop id greedy decoding never picks here), so every row runs the full
length and both compute the same tokens (an end of turn is one more token; no logit is masked);
tokens/s = generated tokens / wall time of the call, prefill included. At batch 16 a third column,
minialign with the KV cache repeated per query head (model.attend in place of attend_folded, the
decoding before issue #27 item 7). Greedy tokens are compared with minialign's, token for token
(same_greedy_tokens: the share of equal tokens, and of identical rows).

Every section alternates its configurations round by round in one process (round 0 warms up,
and who goes first rotates), so a ratio compares runs made under the same machine load; the ratios
are medians of per-round ratios. The figures depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from common import SHARED, Report, environment
from minialign import load_model, load_tokenizer
from minialign import model as model_module
from minialign.collate import collate_prompts, tokenize_pairs
from minialign.data import load_preferences, prompts_view
from minialign.distributed import DistEnv
from minialign.eval_models import batch_ranges, map_batches
from minialign.generate import encode_prompts, generate_tokens
from minialign.packing import packed_length
from minialign.precision import autocast_context
from minialign.reducer import GradReducer
from minialign.reward import RewardObjective, score_ids, score_pairs
from minialign.sampler import global_batches
from minialign.packing import make_batch
from minialign.train import build_optimizer, train_step

SMOLLM2 = "/work/smollm2/SmolLM2-135M-Instruct"
HH = SHARED / "data/hh-rlhf/harmless-base-test.jsonl.gz"
LR = 1e-6  # any small value: it does not change the cost of a step
ENV = DistEnv(0, 1, 0, torch.device("cpu"))


def alternating(configs: dict, rounds: int) -> dict[str, list[tuple[object, float]]]:
    """Run each config's function once per round, rotating who goes first; round 0 warms up.
    Returns per config the (output, seconds) of every measured round."""
    names, out = list(configs), {name: [] for name in configs}
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            result = configs[name]()
            seconds = time.perf_counter() - t
            if r > 0:
                out[name].append((result, seconds))
    return out


def per_round_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# ------------------------------------------------------------------------------- scoring

def hh_items(tokenizer, n: int, max_length: int, seed: int):
    pairs, _ = load_preferences(str(HH))
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), 2 * n, replace=False))
    items, stats = tokenize_pairs(tokenizer, [pairs[i] for i in keep], max_length=max_length,
                                  max_prompt_length=max_length // 2)
    print(stats.summary(), f"-> the first {n} kept", flush=True)
    return items[:n]  # n pairs that training keeps


def scoring_section(args, report: Report):
    tokenizer = load_tokenizer(SMOLLM2)
    items = hh_items(tokenizer, args.pairs, args.max_length, args.seed)
    pad, B, n = tokenizer.pad_token_id, args.batch, len(items)
    lengths = [packed_length(it) for it in items]
    torch.manual_seed(args.seed)
    scorer = load_model(SMOLLM2, reward=True).eval().requires_grad_(False)
    trained = load_model(SMOLLM2, reward=True)
    trained.score.weight.data.copy_(scorer.score.weight)  # the same fresh head on both copies
    trained.train()

    # train_rm.py's step on length-grouped packed batches (train.train: make_batch, train_step).
    order = global_batches(n, B, args.seed, 0, lengths)
    batches = [make_batch(items, idx, pad, "train", ENV.device, packed=True) for idx in order]
    optimizer, grad_sync = build_optimizer(trained, LR, weight_decay=0.0), GradReducer(trained, ENV)
    objective, precision = RewardObjective(), autocast_context("fp32", ENV.device)

    def train():
        for b in batches:
            train_step(trained, objective, [b], optimizer, grad_sync, LR, 1.0, precision, ENV)
        return sum(len(idx) for idx in order)

    def evaluate_now():  # evaluate.py rm's scoring
        return map_batches(lambda idx: score_pairs(scorer, [items[i] for i in idx], pad), n, B, ENV,
                           "scoring pairs", "pairs", lengths=lengths)

    def evaluate_old():  # before: two passes of one row per conversation, in file order
        sides = []
        for side in ("chosen_ids", "rejected_ids"):
            seqs = [it.prompt_ids + getattr(it, side) for it in items]
            sides.append([r for idx in batch_ranges(n, B) for r in score_ids(scorer, [seqs[i] for i in idx], pad)])
        return list(zip(*sides))

    runs = alternating({"train": train, "eval": evaluate_now, "eval_old": evaluate_old}, args.rounds)
    now, old = np.array(runs["eval"][-1][0]), np.array(runs["eval_old"][-1][0])
    trained_pairs = sum(len(idx) for idx in order)  # a length-grouped epoch drops the n mod B tail
    rates = {name: [(trained_pairs if name == "train" else n) / s for _, s in r] for name, r in runs.items()}
    positions = sum(lengths) / n
    for name in ("train", "eval", "eval_old"):
        report.add(section="rm scoring", name=name, pairs=n, batch=B, positions_per_pair=positions,
                   pairs_per_s=statistics.median(rates[name]),
                   vs_train=per_round_ratio(rates[name], rates["train"]) if name != "train" else None,
                   max_reward_diff=f"{np.abs(now - old).max():.1e}" if name == "eval" else None)


# ------------------------------------------------------------------------------ decoding

def decoding_section(args, report: Report):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not installed: decoding section skipped (run with /work/refenv/bin/python)")
        return
    tokenizer = load_tokenizer(SMOLLM2)
    pairs, _ = load_preferences(str(HH))
    ours = load_model(SMOLLM2).eval()
    theirs = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32, attn_implementation="sdpa").eval()
    pad = tokenizer.pad_token_id
    # Neither side may stop early, and neither may change a logit: minialign gets no stop id, and
    # transformers a stop id that greedy decoding never picks here (the vocabulary's last id; a
    # row that picked it would stop, and show in same_greedy_tokens). min_new_tokens would instead
    # forbid <|im_end|>, which the real model does choose, and the two would decode other tokens.
    never_chosen = theirs.config.vocab_size - 1
    for B in args.decode_batches:
        prompts = [p[-args.prompt_tokens:] for p in encode_prompts(tokenizer, prompts_view(pairs)[:B])]
        padded = collate_prompts(prompts, pad)

        def minialign_now():
            return generate_tokens(ours, prompts, [], pad, args.new_tokens, temperature=0.0)[0]

        def minialign_repeat():  # the KV cache repeated per query head, as decoding did before
            folded = model_module.attend_folded
            model_module.attend_folded = model_module.attend
            try:
                return minialign_now()
            finally:
                model_module.attend_folded = folded

        @torch.no_grad()
        def transformers_generate():
            out = theirs.generate(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                  max_new_tokens=args.new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                                  eos_token_id=never_chosen)
            return out[:, padded["input_ids"].shape[1]:].tolist()

        configs = {"minialign": minialign_now, "transformers": transformers_generate}
        if B == 16:
            configs["minialign_repeat_kv"] = minialign_repeat
        runs = alternating(configs, args.rounds)
        rates = {name: [sum(map(len, out)) / s for out, s in r] for name, r in runs.items()}
        ours_ids = runs["minialign"][-1][0]

        def same(name):  # share of minialign's greedy tokens that `name` produced too, and rows identical
            theirs_ids = runs[name][-1][0]
            tokens = sum(a == b for x, y in zip(ours_ids, theirs_ids) for a, b in zip(x, y)) / sum(map(len, ours_ids))
            return f"{tokens:.4f} ({sum(x == y for x, y in zip(ours_ids, theirs_ids))}/{B} rows)"

        for name in configs:
            report.add(section="decoding", name=name, batch=B, prompt_tokens=max(map(len, prompts)),
                       new_tokens=args.new_tokens, tokens_per_s=statistics.median(rates[name]),
                       vs_transformers=per_round_ratio(rates[name], rates["transformers"]) if name != "transformers"
                       else None, same_greedy_tokens=same(name) if name != "minialign" else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=16, help="HH-RLHF pairs scored and trained on per round")
    p.add_argument("--batch", type=int, default=8, help="pairs per batch (training and scoring)")
    p.add_argument("--max_length", type=int, default=256, help="training's --max_length for the pairs")
    p.add_argument("--decode_batches", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32])
    p.add_argument("--prompt_tokens", type=int, default=64, help="each prompt's last tokens")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 by default: on a loaded machine, 2 threads spin at every small op's barrier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_scoring", action="store_true")
    p.add_argument("--skip_decode", action="store_true")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.batch, args.new_tokens, args.rounds, args.decode_batches = 8, 4, 16, 1, [16]
    if not HH.is_file():
        print(f"the shared HH-RLHF file is missing ({HH}): set MINIALIGN_SHARED")
        return 1
    torch.set_num_threads(args.threads)
    print("environment:", environment(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), flush=True)
    report = Report(f"evaluation vs training, decoding vs generate (SmolLM2-135M-Instruct, fp32, cpu, "
                    f"{args.threads} threads)")
    if not args.skip_scoring:
        scoring_section(args, report)
    if not args.skip_decode:
        decoding_section(args, report)
    report.table(["section", "name", "batch", "pairs", "positions_per_pair", "pairs_per_s", "vs_train",
                  "max_reward_diff", "new_tokens", "tokens_per_s", "vs_transformers", "same_greedy_tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
