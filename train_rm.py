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
import torch

from minialign import load_model, load_tokenizer, save_model
from minialign.checkpoint import weights_fingerprint
from minialign.compat import check_tokenizer_fits
from minialign.cli import (ArgumentParser, add_training_args, check_training_args, data_config, float_range, lora_config,
                           non_negative_float, run_main, run_settings, train_config)
from minialign.demo import use_demo_world
from minialign.hub import resolve_model_path
from minialign.distributed import broadcast_parameters, finish_distributed, init_distributed, print0
from minialign.fsdp import FSDPGradSync, load_sharded
from minialign.lora import adapter_state, apply_lora, describe_lora, hold_base_in_bf16, merged_state, save_adapter
from minialign.reducer import GradReducer
from minialign.plots import plot_training_curves
from minialign.precision import default_dtype
from minialign.prepare import data_settings, prepare_pairs
from minialign.resume import full_model_state
from minialign.reward import RewardObjective
from minialign.run_folder import RunFolder
from minialign.save_precision import choose_save_dtype
from minialign.train import describe_setup, train


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
    env = init_distributed(args.dist_timeout)
    if args.model is None:
        use_demo_world(args, env)
    args.model = str(resolve_model_path(args.model, "--model"))  # a folder, also for a Hub id in the local cache
    run = RunFolder(args.output, env, script="train_rm.py")
    run.check(args.resume, args.overwrite)  # before any work: never into another run's folder
    dtype = default_dtype(env.device) if args.dtype == "auto" else args.dtype
    torch.manual_seed(args.seed)

    # 1. Data: load, report what was skipped, split by prompt, tokenize.
    tokenizer = load_tokenizer(args.model, chat_format=args.chat_format)
    print0(env, tokenizer.describe_chat_format())
    data = data_config(args)
    train_items, eval_items = prepare_pairs(tokenizer, data, env)

    # 2. Model: the causal-LM backbone with a fresh scalar head (or a reward model to continue).
    # The fresh head is random: every rank starts from rank 0's (broadcast, or scattered into shards).
    # With --lora_rank: adapters on the frozen backbone, the head trained in full (lora.py).
    lora = lora_config(args)
    if args.fsdp:
        model = load_sharded(args.model, env, dtype, reward=True, prepare=(lambda m: apply_lora(m, lora)) if lora else None)
    else:
        model = load_model(args.model, reward=True, device=env.device)
        if lora:  # LoRA (#29); under bf16 its frozen base needs no fp32 master copy
            apply_lora(model, lora)
            if dtype == "bf16":
                hold_base_in_bf16(model)
        broadcast_parameters(model, env)
    check_tokenizer_fits(model.config, tokenizer, args.model)  # every token id has an embedding row
    model.config.pad_token_id = tokenizer.pad_token_id  # written to config.json, as HF expects
    model.gradient_checkpointing = args.gradient_checkpointing
    print0(env, describe_setup(model, env, dtype))
    if lora:
        print0(env, describe_lora(model, lora))

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
    weights = full_model_state(model, env)  # on rank 0 (gathered from the shards under --fsdp)
    if lora and env.is_main:  # LoRA (#29): the adapters and the head alone, in peft's layout, beside the merged model
        save_adapter(run.path / "adapter", adapter_state(model, weights), lora, args.model, reward=True)
    weights = merged_state(model, weights)  # LoRA (#29): W0 + s*B*A, a plain model; unchanged without LoRA
    if env.is_main:
        save_dtype, kept = choose_save_dtype(weights, args.model, args.save_dtype)  # measured: save_precision.py
        save_model(model, run.path / "model", tokenizer, dtype=save_dtype, state=weights)
        plot_training_curves([(run.path.name, records)], run.path / "curves.png", metrics=("loss", "accuracy"))
        print0(env, f"reward model saved to {run.path / 'model'}; {kept}; curves in {run.path / 'curves.png'}")
    run.finish()
    run.release()
    finish_distributed(env)  # every rank leaves once rank 0 has saved
    return eval_metrics


if __name__ == "__main__":
    run_main(main)
