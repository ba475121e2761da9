"""Fine-tune a policy with Direct Preference Optimization against a frozen reference.

    python train_dpo.py --model DIR --data FILE --output runs/dpo
    torchrun --nproc_per_node 8 train_dpo.py --model DIR --data FILE --output runs/dpo --precompute_ref

With no --model / --data it runs on the demo world (built under runs/demo/ if missing).
The reference is the initial policy (or --ref_model), frozen in eval mode; with
--precompute_ref its log-probs are computed once and cached. --loss_type simpo needs no
reference and loads none. Output: runs/dpo/model/ (causal-LM layout with tokenizer files),
metrics.jsonl, curves.png, run_config.json, checkpoints/.
"""
import argparse
from pathlib import Path

import torch

from minialign import load_model, load_tokenizer, save_model
from minialign.distributed import broadcast_parameters, destroy_distributed, init_distributed, print0
from minialign.dpo import LOSS_TYPES, dpo_objective, precompute_reference_logps
from minialign.hub import resolve_model_path
from minialign.plots import plot_training_curves
from minialign.train import add_training_args, prepare_pairs, resolve_data_defaults, train, write_run_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    a = p.add_argument
    a("--beta", type=float, default=0.1, help="strength of the implicit KL penalty towards the reference")
    a("--loss_type", default="sigmoid", choices=LOSS_TYPES, help="sigmoid (DPO), ipo, hinge, robust, or simpo")
    a("--label_smoothing", type=float, default=0.0, help="assumed rate of flipped labels (sigmoid: cDPO; robust: rDPO)")
    a("--simpo_gamma", type=float, default=0.5, help="SimPO target margin gamma")
    a("--rpo_alpha", type=float, default=None, help="weight of the chosen answer's per-token NLL added to the loss (RPO)")
    a("--ref_model", default=None, help="reference checkpoint (default: the initial policy, --model)")
    a("--precompute_ref", action="store_true", help="compute reference log-probs once before training and cache them")
    a("--ref_cache_dir", default=None, help="where cached reference log-probs live (default: OUTPUT/ref_cache)")
    p.set_defaults(lr=5e-7, output="runs/dpo")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    env = init_distributed(args.dist_timeout)
    resolve_data_defaults(args, env)
    torch.manual_seed(args.seed)
    write_run_config(args, env)
    output = Path(args.output)

    # 1. Data: load, report what was skipped, split by prompt, tokenize.
    tokenizer = load_tokenizer(args.model, chat_format=args.chat_format)
    train_items, eval_items = prepare_pairs(args, env, tokenizer)

    # 2. Policy, and the frozen reference (none for SimPO).
    policy = load_model(args.model, device=env.device)
    policy.gradient_checkpointing = args.gradient_checkpointing
    broadcast_parameters(policy, env)
    ref_model = None
    if args.loss_type != "simpo":
        ref_dir = resolve_model_path(args.ref_model or args.model, "--ref_model")  # a folder, also for a Hub id
        ref_model = load_model(ref_dir, device=env.device).eval().requires_grad_(False)
        if args.precompute_ref:
            cache_dir = args.ref_cache_dir or output / "ref_cache"
            precompute_reference_logps(ref_model, ref_dir, tokenizer, {"train": train_items, "eval": eval_items},
                                       args, env, tokenizer.pad_token_id, cache_dir)
            ref_model = None  # every pair now carries its reference log-probs: free the memory

    # 3. Train, evaluate, save.
    objective = dpo_objective(args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma,
                              args.rpo_alpha, ref_model)
    eval_metrics, records = train(policy, objective, train_items, eval_items, args, env, tokenizer,
                                  tokenizer.pad_token_id)
    if env.is_main:
        save_model(policy, output / "model", tokenizer)
        plot_training_curves([(output.name, records)], output / "curves.png",
                             metrics=("loss", "rewards/accuracies", "rewards/margins"))
        print0(env, f"policy saved to {output / 'model'}; curves in {output / 'curves.png'}")
    destroy_distributed(env)
    return eval_metrics


if __name__ == "__main__":
    main()
