"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint folder `checkpoints/step-000040/` holds the model in Hugging Face layout (so any
checkpoint can be evaluated directly), `optimizer.safetensors` (AdamW's state, no pickle) and
`trainer_state.json` (step, run id, the settings that must not change, RNG state). It is
written with the same atomic rename as save_model, and only then does the pointer
`checkpoints/latest` move to it (run_folder.py): a crash at any moment leaves the previous
checkpoint complete and pointed to.

The data order is a function of (seed, epoch) and the learning rate a function of the step,
so the step number is all the loop needs to rebuild its position.

Resuming, rank 0 alone reads: it takes the newest checkpoint that reads completely (falling
back to an older one, saying so, when the newest is damaged), checks that the settings which
must not change did not, and sends the step, the weights and the optimizer state to every
rank. Ranks whose disks do not hold the checkpoint (several machines without a shared file
system) thus resume from the same step as rank 0, never silently from scratch.

A sharded model (--fsdp, fsdp.py) takes the same files: `full_model_state` and
`full_optimizer_tensors` gather its full state to rank 0 for writing, and `load_full_state`
scatters rank 0's back into the shards. So a checkpoint written with --fsdp resumes without it,
and the other way round.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import atomic_directory, read_state_dict, save_tensors, write_model_files
from .distributed import DistEnv, barrier, broadcast_object, broadcast_tensors, print0
from .errors import UserError, read_json
from .fsdp import gather_model_state, gather_optimizer_state, is_sharded, scatter_state
from .lora import ADAPTER_WEIGHTS, adapter_state, has_lora, merged_state, read_adapter, trained_names
from .run_folder import RunFolder

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name: '<name>.exp_avg', '<name>.exp_avg_sq', '<name>.step'."""
    by_name = {name: optimizer.state.get(p, {}) for name, p in model.named_parameters()}
    return flatten_adamw_state(by_name)


def flatten_adamw_state(by_name: dict[str, dict]) -> dict[str, torch.Tensor]:
    """{param name: {key: value}} -> {'<name>.<key>': tensor}, on the CPU: the file's layout.

    No copy of a tensor that is on the CPU already: the state is written before the optimizer steps
    again, and under --fsdp rank 0 holds the gathered state (8 bytes per parameter) besides the
    gathered weights (4): a copy would add 8 more to that peak (655 GB of host memory at 32B)."""
    out = {}
    for name, fields in by_name.items():
        for key, value in fields.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{name}.{key}"] = value.detach().cpu().contiguous()
    return out


def adamw_state_by_name(model, tensors: dict[str, torch.Tensor], source) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors regrouped as {param name: {"step", "exp_avg", "exp_avg_sq"}}, every
    trained parameter present and shaped like its parameter (a UserError naming the file if not)."""
    by_name = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        missing = [k for k in ADAMW_STATE if f"{name}.{k}" not in tensors]
        if missing:
            raise UserError(f"{source}: no optimizer state '{name}.{missing[0]}' (the file is incomplete or from "
                            "another model); resume from an earlier checkpoint or start over with --overwrite")
        fields = {k: tensors[f"{name}.{k}"] for k in ADAMW_STATE}
        for k in ("exp_avg", "exp_avg_sq"):
            if fields[k].shape != p.shape:
                raise UserError(f"{source}: optimizer state '{name}.{k}' has shape {tuple(fields[k].shape)}, "
                                f"the parameter {tuple(p.shape)}")
        by_name[name] = fields
    return by_name


def load_optimizer_tensors(model, optimizer, tensors: dict[str, torch.Tensor], source) -> None:
    """Restore AdamW's state through torch's own Optimizer.load_state_dict, which puts every
    tensor where the optimizer needs it (moments on the parameter's device and dtype; `step` on
    the parameter's device for the fused and capturable kernels, on the CPU otherwise)."""
    by_name = adamw_state_by_name(model, tensors, source)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    state = {i: by_name[names[id(p)]] for i, p in enumerate(order)}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def full_model_state(model, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The model's full weights by name on rank 0, None on the other ranks: its own state_dict,
    or, sharded, gathered from every rank (then every rank must call this: a collective)."""
    if is_sharded(model):
        state = gather_model_state(model)
        return state if env.is_main else None
    return model.state_dict() if env.is_main else None


def full_optimizer_tensors(model, optimizer, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """AdamW's full state in the file's layout (optimizer_tensors) on rank 0, None elsewhere;
    gathered from every rank when the model is sharded (a collective)."""
    if is_sharded(model):
        by_name = gather_optimizer_state(model, optimizer)
        return flatten_adamw_state(by_name) if env.is_main else None
    return optimizer_tensors(model, optimizer) if env.is_main else None


def load_full_state(model, optimizer, weights: dict | None, optim: dict | None, source, env: DistEnv) -> None:
    """Rank 0's full weights and optimizer tensors (None on the other ranks) into every rank's
    model and optimizer. Replicated: broadcast whole, then loaded on each rank. Sharded: rank 0
    checks them, then each tensor is broadcast in turn and every rank keeps its shard (fsdp.py)."""
    source = Path(source)
    if not is_sharded(model):
        load_weights(model, broadcast_tensors(weights, env), source)
        load_optimizer_tensors(model, optimizer, broadcast_tensors(optim, env), source / OPTIMIZER_FILE)
        return
    adamw, refusal = None, None
    if env.is_main:
        try:
            weights = checked_weights(model, weights, source)
            adamw = adamw_state_by_name(model, optim, source / OPTIMIZER_FILE)
        except UserError as e:
            refusal = str(e)
    refusal = broadcast_object(refusal, env)
    if refusal:
        raise UserError(refusal)
    scatter_state(model, optimizer, weights, adamw)


def rng_state(device: torch.device) -> dict:
    """This process's RNG: the CPU generator, and the current GPU's (not every visible GPU's)."""
    rng = {"torch": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return rng


def restore_rng(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in rng:
        cuda = rng["cuda"]
        if cuda and isinstance(cuda[0], list):  # older checkpoints saved one state per visible GPU
            cuda = cuda[0]
        torch.cuda.set_rng_state(torch.tensor(cuda, dtype=torch.uint8), device)


def save_training_checkpoint(run: RunFolder, step: int, model, optimizer, tokenizer, settings: dict, keep: int,
                             env: DistEnv) -> None:
    """Write checkpoint `step` (rank 0), point `latest` at it and prune this run's older ones; all
    ranks wait until it is on disk."""
    weights, optim = full_model_state(model, env), full_optimizer_tensors(model, optimizer, env)
    if env.is_main:
        name = run.checkpoint_name(step)  # never a folder this run did not write
        with atomic_directory(run.checkpoints / name) as tmp:
            write_model_files(model, tmp, tokenizer, state=merged_state(model, weights))  # LoRA: W0 + s*B*A (lora.py)
            if has_lora(model):  # LoRA (#29): and the trained tensors alone, which are what a resume restores
                save_tensors(adapter_state(model, weights), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            save_tensors(optim, tmp / OPTIMIZER_FILE)
            state = {"step": step, "run_id": run.run_id, "settings": settings, "rng": rng_state(env.device)}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        run.add_checkpoint(name, keep)
    barrier(env)


def read_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(state, weights, optimizer tensors) of one checkpoint folder; a UserError naming the file
    when any part is missing or damaged. A LoRA run's weights are its trained tensors alone
    (adapter_model.safetensors): its model files hold the merged weights, not the frozen base."""
    state_file = folder / STATE_FILE
    state = read_json(state_file, "the checkpoint's training state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{state_file} is damaged (no integer 'step')")
    try:
        weights = read_adapter(folder / ADAPTER_WEIGHTS) if (folder / ADAPTER_WEIGHTS).is_file() else read_state_dict(folder)
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"the weights in {folder} are missing or damaged ({e})") from None
    try:
        with safe_open(str(folder / OPTIMIZER_FILE), framework="pt") as f:
            optim = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise UserError(f"{folder / OPTIMIZER_FILE} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{folder / OPTIMIZER_FILE} is damaged ({e})") from None
    return state, weights, optim


def settings_differences(saved: dict, now: dict) -> list[str]:
    """The settings that must not change between a run and its resumption, and did."""
    return [f"{k}: {saved[k]!r} then, {now[k]!r} now" for k in sorted(now) if k in saved and saved[k] != now[k]]


def _read_for_resume(run: RunFolder, settings: dict, anyway: bool):
    """Rank 0: the newest checkpoint of the run that reads completely, or a refusal message."""
    for folder in run.checkpoint_candidates():
        try:
            state, weights, optim = read_checkpoint(folder)
        except UserError as e:
            print(f"warning: cannot resume from {folder}: {e}; trying the previous checkpoint", flush=True)
            continue
        diffs = settings_differences(state.get("settings", {}), settings)
        if diffs and not anyway:
            return None, (f"{folder} was written with other settings, which a resumed run must keep: "
                          f"{'; '.join(diffs)}. Use the same flags, start a new run (--overwrite or another "
                          f"--output), or pass --resume_anyway to continue regardless")
        if diffs:
            print(f"warning: resuming despite changed settings ({'; '.join(diffs)})", flush=True)
        return (folder, state, weights, optim), None
    if run.checkpoint_candidates():
        return None, f"no checkpoint of {run.path} could be read (see the warnings above)"
    return None, None


def load_training_checkpoint(run: RunFolder, model, optimizer, settings: dict, anyway: bool, env: DistEnv) -> int | None:
    """Restore the newest good checkpoint into model and optimizer on every rank; its step, or
    None when the run has no checkpoint yet. See the module docstring."""
    found, refusal = _read_for_resume(run, settings, anyway) if env.is_main else (None, None)
    refusal = broadcast_object(refusal, env)
    if refusal:
        raise UserError(refusal)
    folder, state, weights, optim = found or (None, None, None, None)
    header = broadcast_object(None if found is None else (str(folder), state), env)
    if header is None:
        return None
    folder, state = header
    if has_lora(model):  # LoRA (#29): the checkpoint holds the trained tensors, the frozen base is --model's
        weights = with_frozen_base(model, weights, env)
    load_full_state(model, optimizer, weights, optim, folder, env)
    restore_rng(state["rng"], env.device)
    print0(env, f"resuming from {folder}")
    return state["step"]


def resume_step(run: RunFolder, model, optimizer, settings: dict, anyway: bool, env: DistEnv) -> int:
    """--resume: restore the newest good checkpoint into model and optimizer on every rank and return
    its step. Rank 0 chooses and reads the checkpoint and every rank receives its state, so ranks
    on machines with their own disks cannot start from different steps."""
    step = load_training_checkpoint(run, model, optimizer, settings, anyway, env)
    if step is None:  # claim() refuses such a run already; never train it again from scratch over its files
        raise UserError(f"--resume: no checkpoint of this run in {run.checkpoints}; start it again with --overwrite")
    print0(env, f"resumed at step {step}/{settings['total_steps']}")
    return step


def with_frozen_base(model, trained: dict | None, env: DistEnv) -> dict | None:
    """Rank 0: the full state to restore into a LoRA model, its frozen base as loaded from --model
    (training never changes it) with the checkpoint's trained tensors; None on the other ranks. A
    trained tensor the checkpoint lacks stays missing, for checked_weights to name. A collective
    when the model is sharded (the base is gathered)."""
    base = full_model_state(model, env)
    if not env.is_main:
        return None
    trained_here = set(trained_names(model))
    return {**{k: v for k, v in base.items() if k not in trained_here}, **trained}


def checked_weights(model, weights: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against the model's names, shapes and dtypes (a
    UserError naming the tensor if one differs); a tied head gets the embedding's tensor."""
    own = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in own if k not in weights and not (k == "lm_head.weight" and tied)]
    if missing:
        raise UserError(f"{source}: the checkpoint lacks {', '.join(missing[:5])} (written by another model?)")
    for k, v in own.items():
        if k not in weights:
            continue
        w = weights[k]
        if w.shape != v.shape or w.dtype != v.dtype:
            raise UserError(f"{source}: tensor '{k}' is {tuple(w.shape)} {w.dtype}, the model's is "
                            f"{tuple(v.shape)} {v.dtype}")
    if "lm_head.weight" in own and "lm_head.weight" not in weights:
        weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}  # saved once when tied
    return {k: weights[k] for k in own}


@torch.no_grad()
def load_weights(model, weights: dict[str, torch.Tensor], source) -> None:
    """Copy checkpoint tensors into the model in place; names, shapes and dtypes must match."""
    own = model.state_dict()
    for k, w in checked_weights(model, weights, source).items():
        own[k].copy_(w)
