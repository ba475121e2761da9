"""Train a reward model on pairwise preferences (Bradley-Terry).

    python train_rm.py --model DIR --data FILE --output runs/rm
    torchrun --nproc_per_node 8 train_rm.py --model DIR --data FILE --output runs/rm

With neither --model nor --data it trains on the demo world (built under runs/demo/ if missing).
The backbone is any supported causal-LM checkpoint; a scalar head Linear(hidden, 1) reads
the last real token (the answer's end-of-turn token). Output: runs/rm/model/ (Hugging Face
sequence-classification layout), metrics.jsonl, curves.png, run_config.json, checkpoints/.
With --lora_rank r the backbone trains low-rank adapters and the head in full (minialign/lora.py);
model/ holds the merged weights and adapter/ the adapters and head in peft's layout.
"""
from minialign import load_tokenizer
from minialign.checkpoint import weights_fingerprint
from minialign.cli import (ArgumentParser, add_training_args, check_training_args, data_config, float_range, lora_config,
                           non_negative_float, run_main, run_settings, train_config)
from minialign.distributed import print0
from minialign.fsdp import FSDPGradSync
from minialign.launch import load_trainable, save_trained, start_run
from minialign.prepare import data_settings, prepare_pairs
from minialign.reducer import GradReducer
from minialign.reward import RewardObjective
from minialign.train import train


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    add_training_args(p)
    g = p.add_argument_group("reward model")
    g.add_argument("--center_rewards_coef", type=non_negative_float, default=0.0,
                   help="weight of the reward-centering penalty coef * (r_c + r_r)^2 (0: off)")
    g.add_argument("--margin", type=float_range(), default=None, help="constant margin m in -log sigmoid(r_c - r_r - m)")
    p.set_defaults(lr=2e-5, output="runs/rm")
    args = p.parse_args(argv)
    check_training_args(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    env, run, dtype = start_run(args, "train_rm.py")  # process group, run folder checked, precision (launch.py)

    # 1. Data: load, report what was skipped, split by prompt, tokenize.
    tokenizer = load_tokenizer(args.model, chat_format=args.chat_format)
    print0(env, tokenizer.describe_chat_format())
    data = data_config(args)
    train_items, eval_items = prepare_pairs(tokenizer, data, env)

    # 2. Model: the causal-LM backbone with a fresh scalar head (or a reward model to continue).
    # The fresh head is random: every rank starts from rank 0's (broadcast, or scattered into shards).
    # With --lora_rank: adapters on the frozen backbone, the head trained in full (lora.py).
    lora = lora_config(args)
    model = load_trainable(args, env, dtype, tokenizer, lora, reward=True)
    model.config.pad_token_id = tokenizer.pad_token_id  # written to config.json, as HF expects

    # 3. Train, evaluate, save.
    objective = RewardObjective(args.center_rewards_coef, args.margin)
    settings = {**data_settings(data), **run_settings(args, objective="bradley_terry", margin=args.margin,
                                                       center_rewards_coef=args.center_rewards_coef),
                # what a resumed run must also share: the renderer, the precision, the very weights it started from
                "chat_format": tokenizer.chat_format_id, "dtype": dtype,
                "model_weights": weights_fingerprint(args.model)}
    run.claim(args.resume, args.overwrite, {**vars(args), "dtype": dtype, "world_size": env.world_size})
    grad_sync = FSDPGradSync(model) if args.fsdp else GradReducer(model, env, args.bucket_mb)
    eval_metrics, records = train(model, objective, train_items, eval_items, train_config(args, dtype, settings), env,
                                  tokenizer, grad_sync, run)
    save_trained(model, args, env, run, tokenizer, records, lora, reward=True, curve_metrics=("loss", "accuracy"))
    return eval_metrics


if __name__ == "__main__":
    run_main(main)
