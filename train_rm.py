"""Train a reward model on pairwise preferences (Bradley-Terry).

    python train_rm.py --model DIR --data FILE --output runs/rm
    torchrun --nproc_per_node 8 train_rm.py --model DIR --data FILE --output runs/rm

With no --model / --data it trains on the demo world (built under runs/demo/ if missing).
The backbone is any supported causal-LM checkpoint; a scalar head Linear(hidden, 1) reads
the last real token. Output: runs/rm/model/ (Hugging Face sequence-classification layout),
metrics.jsonl, curves.png, run_config.json, checkpoints/.
"""
import argparse
from pathlib import Path

import torch

from minialign import load_model, load_tokenizer, save_model
from minialign.distributed import broadcast_parameters, destroy_distributed, init_distributed, print0
from minialign.plots import plot_training_curves
from minialign.reward import reward_objective
from minialign.train import add_training_args, prepare_pairs, resolve_data_defaults, train, write_run_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--center_rewards_coef", type=float, default=0.0,
                   help="weight of the reward-centering penalty coef * (r_c + r_r)^2 (0: off)")
    p.add_argument("--margin", type=float, default=None, help="constant margin m in -log sigmoid(r_c - r_r - m)")
    p.set_defaults(lr=2e-5, output="runs/rm")
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

    # 2. Model: the causal-LM backbone with a fresh scalar head (or a reward model to continue).
    model = load_model(args.model, reward=True, device=env.device)
    model.config.pad_token_id = tokenizer.pad_token_id  # written to config.json, as HF expects
    model.gradient_checkpointing = args.gradient_checkpointing
    broadcast_parameters(model, env)  # the fresh head is random: every rank starts from rank 0's

    # 3. Train, evaluate, save.
    eval_metrics, records = train(model, reward_objective(args.center_rewards_coef, args.margin),
                                  train_items, eval_items, args, env, tokenizer, tokenizer.pad_token_id)
    if env.is_main:
        save_model(model, output / "model", tokenizer)
        plot_training_curves([(output.name, records)], output / "curves.png", metrics=("loss", "accuracy"))
        print0(env, f"reward model saved to {output / 'model'}; curves in {output / 'curves.png'}")
    destroy_distributed(env)
    return eval_metrics


if __name__ == "__main__":
    main()
