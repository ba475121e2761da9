"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint folder `checkpoints/step-000040/` holds the model in Hugging Face layout (so any
checkpoint can be evaluated directly), `optimizer.safetensors` (AdamW moments, no pickle) and
`trainer_state.json` (step, RNG state, run arguments). It is written with the same atomic
rename as save_model, and only then does the one-line file `checkpoints/latest` move to it:
a crash at any moment leaves the previous checkpoint complete and pointed to.

The data order is a function of (seed, epoch) and the learning rate a function of the step,
so the step number is all the loop needs to rebuild its position.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_directory, write_model_files

LATEST = "latest"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def checkpoint_dir(output, step: int) -> Path:
    return Path(output) / "checkpoints" / f"step-{step:06d}"


def optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name: '<name>.exp_avg', '<name>.exp_avg_sq', '<name>.step'."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = value.detach().cpu().contiguous().clone() if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(model, optimizer, tensors: dict[str, torch.Tensor]):
    by_param: dict[str, dict] = {}  # '<name>.exp_avg' -> by_param[name]['exp_avg']
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        by_param.setdefault(name, {})[field] = value
    for name, p in model.named_parameters():
        state = by_param.get(name)
        if state:
            # moments live with the parameter; AdamW keeps `step` as a CPU scalar tensor
            optimizer.state[p] = {k: (v if k == "step" else v.to(p.device, p.dtype)) for k, v in state.items()}


def save_training_checkpoint(output, step: int, model, optimizer, tokenizer, state: dict, keep: int | None = 2):
    """Write checkpoint `step`, point `latest` at it, then delete all but the newest `keep`."""
    folder = checkpoint_dir(output, step)
    with atomic_directory(folder) as tmp:
        write_model_files(model, tmp, tokenizer)
        save_file(optimizer_tensors(model, optimizer), str(tmp / OPTIMIZER_FILE))
        rng = {"torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({**state, "step": step, "rng": rng}, f)
    latest = Path(output) / "checkpoints" / LATEST
    tmp_latest = latest.with_suffix(".tmp")
    tmp_latest.write_text(folder.name)
    os.replace(tmp_latest, latest)  # atomic: readers see the old or the new pointer, never half
    if keep:
        steps = sorted(p for p in folder.parent.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(output) -> Path | None:
    latest = Path(output) / "checkpoints" / LATEST
    if not latest.is_file():
        return None
    folder = latest.parent / latest.read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{latest} points to {folder}, which has no {STATE_FILE}")
    return folder


def load_training_checkpoint(folder, model, optimizer) -> dict:
    """Restore weights (in place, keeping dtype and device), optimizer moments and RNG; return the state."""
    from .checkpoint import read_state_dict

    folder = Path(folder)
    weights = read_state_dict(folder)
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing:
        raise KeyError(f"{folder}: checkpoint lacks {', '.join(missing[:5])}")
    with torch.no_grad():
        for k, v in own.items():
            if k in weights:
                v.copy_(weights[k])
    with safe_open(str(folder / OPTIMIZER_FILE), framework="pt") as f:
        load_optimizer_tensors(model, optimizer, {k: f.get_tensor(k) for k in f.keys()})
    with open(folder / STATE_FILE) as f:
        state = json.load(f)
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["rng"]["cuda"]])
    return state
