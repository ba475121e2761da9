"""What train_rm.py and train_dpo.py share around their own part: starting a run, loading the model
to train, and saving what it trained. Each script reads top to bottom as

    env, run, dtype = start_run(args, "train_dpo.py")      # process group, run folder, precision
    ... data, the model (load_trainable), the objective ...
    train(...)                                             # train.py: the loop and the step
    save_trained(model, ...)                               # model/ (and adapter/), curves, finished

so that what differs between the reward model and DPO is all that is left in the scripts.
"""
from __future__ import annotations

import torch

from .checkpoint import load_model, save_model
from .compat import check_tokenizer_fits
from .demo_build import use_demo_world
from .distributed import broadcast_parameters, finish_distributed, init_distributed, print0
from .fsdp import load_sharded
from .hub import resolve_model_path
from .lora import adapter_state, apply_lora, describe_lora, hold_base_in_bf16, merged_state, save_adapter
from .plots import plot_training_curves
from .precision import default_dtype
from .resume import full_model_state
from .run_folder import RunFolder
from .save_precision import choose_save_dtype
from .training_log import describe_setup


def start_run(args, script: str):
    """Join the process group, fill in the demo world when no --model/--data is given, resolve
    --model (a folder, also for a Hub id in the local cache), check the run folder before any work
    (never into another run's folder), pick the precision and seed. Returns (env, run, dtype)."""
    env = init_distributed(args.dist_timeout)
    if args.model is None:  # no --model and no --data: the demo world fills all three flags
        demo = use_demo_world(env)
        args.model, args.data, args.eval_data = str(demo.base_model), str(demo.train_data), str(demo.eval_data)
    args.model = str(resolve_model_path(args.model, "--model"))
    run = RunFolder(args.output, env, script=script)
    run.check(args.resume, args.overwrite)
    dtype = default_dtype(env.device) if args.dtype == "auto" else args.dtype
    torch.manual_seed(args.seed)
    return env, run, dtype


def load_trainable(args, env, dtype: str, tokenizer, lora, reward: bool):
    """The model to train from --model: replicated (every rank starts from rank 0's weights, a fresh
    reward head included) or sharded (--fsdp); with LoRA (lora.py) adapters on the frozen model, a
    reward model's head trained in full, and under bf16 no fp32 master copy of the frozen base."""
    if args.fsdp:
        model = load_sharded(args.model, env, dtype, reward=reward,
                             prepare=(lambda m: apply_lora(m, lora)) if lora else None)
    else:
        model = load_model(args.model, reward=reward, device=env.device)
        if lora:
            apply_lora(model, lora)
            if dtype == "bf16":
                hold_base_in_bf16(model)
        broadcast_parameters(model, env)
    check_tokenizer_fits(model.config, tokenizer, args.model)  # every token id has an embedding row
    model.gradient_checkpointing = args.gradient_checkpointing
    print0(env, describe_setup(model, env, dtype))
    if lora:
        print0(env, describe_lora(model, lora))
    return model


def save_trained(model, args, env, run, tokenizer, records, lora, reward: bool, curve_metrics: tuple) -> None:
    """model/ as trained (the save dtype measured: save_precision.py; with LoRA the merged model,
    and adapter/ in peft's layout beside it), curves.png, the run recorded as finished; every rank
    leaves once rank 0 has saved."""
    weights = full_model_state(model, env)  # on rank 0 (gathered from the shards under --fsdp)
    if lora and env.is_main:
        save_adapter(run.path / "adapter", adapter_state(model, weights), lora, args.model, reward=reward)
    weights = merged_state(model, weights)  # LoRA: W0 + s*B*A, a plain model; unchanged without LoRA
    if env.is_main:
        save_dtype, kept = choose_save_dtype(weights, args.model, args.save_dtype)
        save_model(model, run.path / "model", tokenizer, dtype=save_dtype, state=weights)
        plot_training_curves([(run.path.name, records)], run.path / "curves.png", metrics=curve_metrics)
        what = "reward model" if reward else "policy"
        print0(env, f"{what} saved to {run.path / 'model'}; {kept}; curves in {run.path / 'curves.png'}")
    run.finish()
    run.release()
    finish_distributed(env)


__all__ = ["start_run", "load_trainable", "save_trained"]
