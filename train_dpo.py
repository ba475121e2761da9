"""Fine-tune a policy with Direct Preference Optimization against a frozen reference.

    python train_dpo.py --model DIR --data FILE --output runs/dpo
    torchrun --nproc_per_node 8 train_dpo.py --model DIR --data FILE --output runs/dpo --precompute_ref

With neither --model nor --data it runs on the demo world (built under runs/demo/ if missing).
The reference is the initial policy (or --ref_model), frozen in eval mode (under bf16, its
linear weights are held in bf16); with --precompute_ref its log-probs are computed once and
cached. --loss_type simpo needs no reference and loads none. Output: runs/dpo/model/
(causal-LM layout with tokenizer files), metrics.jsonl, curves.png, run_config.json, checkpoints/.
With --lora_rank r only low-rank adapters train (minialign/lora.py), the reference is the policy
with its adapters off (no second model), model/ holds the merged weights and adapter/ the adapters
alone in peft's layout.
"""
import gc
from pathlib import Path

import torch

from minialign import load_model, load_tokenizer
from minialign.checkpoint import weights_fingerprint
from minialign.compat import check_model_kind, check_same_tokenizer
from minialign.cli import (ArgumentParser, add_training_args, check_training_args, data_config, float_range, lora_config,
                           non_negative_float, positive_float, run_main, run_settings, train_config)
from minialign.distributed import print0
from minialign.dpo import LOSS_TYPES, AdapterOffReference, DPOObjective, LiveReference, PrecomputedReference
from minialign.fsdp import FSDPGradSync, FreeingRootAfter, load_sharded, release
from minialign.hub import resolve_model_path
from minialign.launch import load_trainable, save_trained, start_run
from minialign.lora import adapters_disabled
from minialign.precision import hold_frozen_in_bf16
from minialign.prepare import data_settings, prepare_pairs
from minialign.reducer import GradReducer
from minialign.reference_cache import reference_table, weights_digest
from minialign.train import step_plan, train


DPO_BETA = 0.1  # Rafailov et al. 2023 use 0.1 (0.5 for some tasks)
SIMPO_BETA = 2.0  # Meng et al. 2024: beta 2.0-2.5 in their recipes (2.0 in their trainer's defaults)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    add_training_args(p)
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=positive_float, default=None,
                   help=f"strength of the implicit KL penalty towards the reference (default {DPO_BETA}; "
                        f"SimPO: the reward scale, default {SIMPO_BETA})")
    g.add_argument("--loss_type", default="sigmoid", choices=LOSS_TYPES, help="sigmoid (DPO), ipo, hinge, robust, or simpo")
    g.add_argument("--label_smoothing", type=float_range(0.0, 0.5), default=0.0,
                   help="assumed rate of flipped labels (sigmoid: cDPO; robust: rDPO, below 0.5)")
    g.add_argument("--simpo_gamma", type=float_range(), default=0.5, help="SimPO target margin gamma")
    g.add_argument("--rpo_alpha", type=non_negative_float, default=None,
                   help="weight of the chosen answer's per-token NLL added to the loss (RPO)")
    g.add_argument("--ref_model", default=None, help="reference checkpoint (default: the initial policy, --model)")
    g.add_argument("--precompute_ref", action="store_true", help="compute reference log-probs once before training and cache them")
    g.add_argument("--ref_cache_dir", default=None, help="where cached reference log-probs live (default: OUTPUT/ref_cache)")
    p.set_defaults(lr=5e-7, output="runs/dpo")
    args = p.parse_args(argv)
    if args.beta is None:  # SimPO's beta scales a per-token mean, not a KL: its paper uses 2-10
        args.beta = SIMPO_BETA if args.loss_type == "simpo" else DPO_BETA
    check_training_args(p, args)
    if args.loss_type == "robust" and args.label_smoothing >= 0.5:
        p.error("--label_smoothing must be below 0.5 for --loss_type robust (it divides by 1 - 2 * label_smoothing)")
    if args.label_smoothing and args.loss_type in ("ipo", "hinge", "simpo"):
        p.error(f"--label_smoothing is not defined for --loss_type {args.loss_type}")
    return args


def load_reference(args, env, dtype, tokenizer, train_items, eval_items, policy=None):
    """The frozen reference as a function of the batch (dpo.py): a live forward of the reference
    model, or a lookup in its log-probs computed once (--precompute_ref). None for SimPO. With
    LoRA and no --ref_model the reference is the policy with its adapters off: nothing is loaded."""
    if args.loss_type == "simpo":
        return None
    ref_dir = resolve_model_path(args.ref_model, "--ref_model") if args.ref_model else args.model
    if args.lora_rank and not args.ref_model:  # LoRA (#29): the initial model is the policy, adapters off
        if not args.precompute_ref:
            return AdapterOffReference(policy)
        ref_model = policy  # scored inside adapters_disabled below
    else:
        ref_model = load_reference_model(args, env, dtype, tokenizer, ref_dir)
        if not args.precompute_ref:
            return FreeingRootAfter(LiveReference(ref_model), ref_model) if args.fsdp else LiveReference(ref_model)
    tables = reference_tables(args, env, dtype, tokenizer, ref_model, ref_dir, train_items, eval_items)
    if ref_model is not policy:  # a separate reference model: give its memory back for training
        release(ref_model)
        del ref_model
        # FSDP2 ties a sharded module into reference cycles, which only the cyclic collector frees: run it
        # now, rather than whenever it next happens to run.
        gc.collect()
    return PrecomputedReference(tables, env.device)


def reference_tables(args, env, dtype, tokenizer, ref_model, ref_dir, train_items, eval_items) -> dict:
    """--precompute_ref: the reference's log-probs, {split: (N, 2) [chosen, rejected]}, cached in
    OUTPUT/ref_cache. Only the training pairs that the run's steps take (all of them unless
    --max_steps stops early); the final evaluation takes every held-out pair."""
    cache_dir = args.ref_cache_dir or Path(args.output) / "ref_cache"
    settings = {"max_length": args.max_length, "max_prompt_length": data_config(args).prompt_budget,
                "truncation": args.truncation,
                **({"fsdp": True} if args.fsdp and dtype == "bf16" else {})}  # bf16 residual stream: other numbers
    used = step_plan(train_items, train_config(args, dtype, {}), env).pairs_used()
    if len(used) < len(train_items):
        print0(env, f"reference log-probs for train: the run's steps use {len(used)} of {len(train_items)} pairs; "
                    f"computing those")
    digest = weights_digest(ref_dir, env)  # rank 0 reads the weights once, for both splits' keys
    with adapters_disabled(ref_model):  # LoRA: the base model; a model without adapters is left as it is
        tables = {name: reference_table(ref_model, digest, tokenizer, items, name, args.eval_batch_size or args.batch_size,
                                        dtype, settings, cache_dir, env, packed=args.prefix_sharing)
                  for name, items in (("train", [train_items[i] for i in used]), ("eval", eval_items))}
    if tables["train"] is not None and len(used) < len(train_items):  # back to the split's indices
        full = torch.full((len(train_items), 2), float("nan"))  # (N, 2): a pair no step takes is never read
        full[used] = tables["train"]
        tables["train"] = full
    return tables


def load_reference_model(args, env, dtype, tokenizer, ref_dir):
    """The reference model, frozen: --ref_model (checked to share the tokenizer) or the initial policy."""
    if args.ref_model:  # another checkpoint: it must score the same token ids the same way
        check_model_kind(ref_dir, reward=False, what="--ref_model")
        check_same_tokenizer(tokenizer, args.model, load_tokenizer(ref_dir, chat_format=args.chat_format), ref_dir,
                             "--model", "--ref_model")
    if args.fsdp:  # sharded too, stored in the compute dtype: 2 bytes per parameter / W under bf16 (fsdp.py)
        return load_sharded(ref_dir, env, dtype, reward=False, frozen=True)
    ref_model = load_model(ref_dir, device=env.device).eval().requires_grad_(False)
    if dtype == "bf16":
        hold_frozen_in_bf16(ref_model)  # half the memory, the same numbers under autocast (precision.py)
    return ref_model


def main(argv=None):
    args = parse_args(argv)
    env, run, dtype = start_run(args, "train_dpo.py")  # process group, run folder checked, precision (launch.py)
    check_model_kind(args.model, reward=False, what="--model")  # DPO trains a causal LM, not a reward model

    # 1. Data: load, report what was skipped, split by prompt, tokenize.
    tokenizer = load_tokenizer(args.model, chat_format=args.chat_format)
    print0(env, tokenizer.describe_chat_format())
    data = data_config(args)
    train_items, eval_items = prepare_pairs(tokenizer, data, env)

    # 2. Policy (with --lora_rank: adapters on the frozen model, lora.py), and the frozen reference (none for SimPO).
    lora = lora_config(args)
    policy = load_trainable(args, env, dtype, tokenizer, lora, reward=False)
    reference = load_reference(args, env, dtype, tokenizer, train_items, eval_items, policy)

    # 3. Train, evaluate, save.
    objective = DPOObjective(args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma, args.rpo_alpha,
                             reference)
    settings = {**data_settings(data), **run_settings(
        args, objective="dpo", loss_type=args.loss_type, beta=args.beta, label_smoothing=args.label_smoothing,
        simpo_gamma=args.simpo_gamma, rpo_alpha=args.rpo_alpha, ref_model=str(args.ref_model or args.model)),
        # what a resumed run must also share: the renderer, the precision, the very weights it started from
        "chat_format": tokenizer.chat_format_id, "dtype": dtype, "model_weights": weights_fingerprint(args.model)}
    if args.loss_type != "simpo":  # the reference is re-read from its folder on resume: it must not have changed
        settings["ref_weights"] = weights_fingerprint(resolve_model_path(args.ref_model or args.model, "--ref_model"))
    run.claim(args.resume, args.overwrite, {**vars(args), "dtype": dtype, "world_size": env.world_size})
    grad_sync = FSDPGradSync(policy) if args.fsdp else GradReducer(policy, env, args.bucket_mb)
    eval_metrics, records = train(policy, objective, train_items, eval_items, train_config(args, dtype, settings), env,
                                  tokenizer, grad_sync, run)
    save_trained(policy, args, env, run, tokenizer, records, lora, reward=False,
                 curve_metrics=("loss", "rewards/accuracies", "rewards/margins"))
    return eval_metrics


if __name__ == "__main__":
    run_main(main)
