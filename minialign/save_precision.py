"""What the saved model keeps of its training: the dtype of the final model/, chosen by measurement.

Training updates fp32 master weights (precision.py). A checkpoint written in bf16 keeps 8
significant bits, so a weight whose update is smaller than half a bf16 step (a relative 2^-9 of
the weight) rounds back to its starting value exactly. A fine-tune's updates are that small: the
real SmolLM2-135M reward model (lr 2e-5, 45 steps) saved in bf16 had 88 % of its weights
bit-identical to the starting checkpoint, and DPO at lr 5e-7 moves a weight far less than one
bf16 step. Whether a bf16 save is harmless is a question of numbers, so it is measured here.

Over all tensors at once, with w the weights now (fp32), w0 the starting weights, round() the
cast to the smaller dtype and back:
    u = w - w0                       the update training made
    e = round(w) - w                 what the save would change
    kept = 1 - ||e|| / ||u||         the update saved, round(w) - w0 = u + e, is u up to a relative
                                     error ||e|| / ||u||
    cosine(u + e, u), ||u + e|| / ||u||, and the share of changed weights (u != 0) whose saved
    value still differs from w0 are reported beside it.
kept >= 0.99 implies cosine >= 0.99995 and a norm ratio within 1 +- 0.01, so the one number
bounds the others. A tensor the start does not have (a fresh reward head) counts as new: its w0
is 0.

--save_dtype auto: fp32 when the starting weights are fp32; when they are bf16 (or fp16), their
own dtype if that keeps at least KEEP_AT_LEAST of the update, else fp32 with a note saying why.
An explicit --save_dtype bf16 is obeyed, with the same measurement printed.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from safetensors import safe_open

from .checkpoint import parse_dtype, read_tensor_index

KEEP_AT_LEAST = 0.99  # the share of the update (1 - relative error) a smaller save must keep
SAFETENSORS_DTYPES = {"F32": "fp32", "F64": "fp32", "BF16": "bf16", "F16": "fp16"}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def starting_tensors(start, names):
    """Yield (name, w0 or None) for each name: from a dict of tensors, or read one at a time from
    a checkpoint folder's safetensors files (the whole starting model is never held in memory)."""
    if isinstance(start, dict):
        for name in names:
            yield name, start.get(name)
        return
    index = read_tensor_index(start)
    handles = {}
    try:
        for name in names:
            if name not in index:
                yield name, None
                continue
            file = index[name].file
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            yield name, handles[file].get_tensor(name)
    finally:
        handles.clear()


def _is_tied_copy(name, state, start_names) -> bool:
    """A tied lm_head is the embedding under a second name: stored once, measured once."""
    embed = "model.embed_tokens.weight"
    return (name == "lm_head.weight" and name not in start_names and embed in state
            and state[name].shape == state[embed].shape and torch.equal(state[name], state[embed]))


@torch.no_grad()
def update_kept(state: dict[str, torch.Tensor], start, dtype) -> dict[str, float]:
    """How much of the update from `start` to `state` a save in `dtype` keeps (module docstring).

    state: name -> the weights now (fp32). start: name -> the starting weights, or the folder of
    the checkpoint the run started from. Returns kept, cosine, norm_ratio, changed (weights with
    u != 0), survived (share of those still != w0 once saved), update_norm, error_norm."""
    dtype = parse_dtype(dtype)
    start_names = set(start) if isinstance(start, dict) else set(read_tensor_index(start))
    uu = ee = ue = 0.0  # float64 sums: ||u||^2, ||e||^2, <u, e>
    changed = survived = 0
    for name, w0 in starting_tensors(start, list(state)):
        w = state[name].detach()
        if not w.is_floating_point() or _is_tied_copy(name, state, start_names):
            continue
        w = w.float()
        w0 = torch.zeros_like(w) if w0 is None else w0.to(w.device, torch.float32)
        u = w - w0
        saved = w.to(dtype).float()
        e = saved - w
        uu += torch.sum(u * u, dtype=torch.float64).item()
        ee += torch.sum(e * e, dtype=torch.float64).item()
        ue += torch.sum(u * e, dtype=torch.float64).item()
        moved = u != 0
        changed += int(moved.sum())
        survived += int((moved & (saved != w0)).sum())
    u_norm, e_norm = math.sqrt(uu), math.sqrt(ee)
    saved_sq = uu + 2 * ue + ee  # ||u + e||^2
    if u_norm == 0:  # nothing was trained: kept in full if the save changes nothing either
        return {"kept": 1.0 if e_norm == 0 else 0.0, "cosine": 1.0, "norm_ratio": 1.0, "changed": 0,
                "survived": 1.0, "update_norm": 0.0, "error_norm": e_norm}
    return {"kept": 1.0 - e_norm / u_norm, "cosine": (uu + ue) / (u_norm * math.sqrt(saved_sq)) if saved_sq else 0.0,
            "norm_ratio": math.sqrt(saved_sq) / u_norm, "changed": changed, "survived": survived / max(changed, 1),
            "update_norm": u_norm, "error_norm": e_norm}


def stored_dtype(start) -> str:
    """The dtype most of the starting weights are stored in: "fp32", "bf16" or "fp16"."""
    if isinstance(start, dict):
        counts = Counter(NAMES.get(t.dtype, "fp32") for t in start.values() if t.is_floating_point())
    else:
        counts = Counter(SAFETENSORS_DTYPES.get(info.dtype, "fp32") for info in read_tensor_index(start).values())
    return counts.most_common(1)[0][0] if counts else "fp32"


def describe(dtype: str, m: dict) -> str:
    """"keeps 99.7 % of the update (cosine 0.99998, 97.1 % of the changed weights differ from the start)"."""
    return (f"keeps {100 * max(m['kept'], 0.0):.1f} % of the update (cosine {m['cosine']:.5f}, "
            f"{100 * m['survived']:.1f} % of the {m['changed']:,} changed weights differ from the start in {dtype})")


def choose_save_dtype(state: dict[str, torch.Tensor], start, requested: str) -> tuple[str, str]:
    """The dtype to save `state` in, and the line that says what the save keeps.

    state: the weights now (fp32 master weights), by name. start: the starting weights by name, or
    the checkpoint folder the run started from (read tensor by tensor). requested: "auto", "fp32",
    "bf16" or "fp16" (--save_dtype). Returns e.g. ("fp32", "saved fp32: the update is kept exactly")."""
    exact = "saved fp32: the update is kept exactly"
    candidate = stored_dtype(start) if requested == "auto" else NAMES[parse_dtype(requested)]
    if candidate == "fp32":
        return "fp32", exact
    m = update_kept(state, start, candidate)
    if m["kept"] >= KEEP_AT_LEAST:
        return candidate, f"saved {candidate}: {describe(candidate, m)}"
    if requested == "auto":
        return "fp32", (f"{exact} (a {candidate} save, the starting checkpoint's dtype, would have kept only "
                        f"{100 * max(m['kept'], 0.0):.1f} % of it: below {100 * KEEP_AT_LEAST:.0f} %)")
    return candidate, (f"saved {candidate} as asked: {describe(candidate, m)}; below {100 * KEEP_AT_LEAST:.0f} %: "
                       f"--save_dtype fp32 keeps it exactly")


__all__ = ["KEEP_AT_LEAST", "choose_save_dtype", "update_kept", "stored_dtype"]
