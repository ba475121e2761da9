"""What every evaluation pipeline shares (evaluate.py rm, dpo, implicit): the settings common to
them, the checkpoints checked and loaded for inference, the results folder, and the JSON files
and terminal tables the results are written as.

A checkpoint is checked (compat.check_model_kind: config, weight files, tensor names and shapes,
kind) before any heavy work, and loaded only once every check of the command has passed."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import load_model
from .compat import check_model_kind, describe_kind
from .data import load_preferences
from .distributed import print0
from .errors import MissingFileError, UserError
from .hub import resolve_model_path

DEMO_RM, DEMO_POLICY = "runs/rm/model", "runs/dpo/model"  # where train_rm.py / train_dpo.py save by default
DEMO_HINTS = {DEMO_RM: " (train it with `python train_rm.py`)", DEMO_POLICY: " (train it with `python train_dpo.py`)"}


@dataclass
class EvalSettings:
    """The settings rm, dpo and implicit share (evaluate.py's flags of the same names)."""
    data: str  # the held-out preference file (.json, .jsonl, .gz)
    data_format: str  # its format: "auto" or one of data.FORMATS
    output: str | None  # folder for the results (created); None: runs/eval/<command>
    batch_size: int  # rows per forward pass, >= 1
    max_length: int  # max tokens of prompt + response when scoring; longer ones lose the start of the prompt
    seed: int  # seeds the bootstrap (and what each command adds: a subset, sampling)
    n_resamples: int  # bootstrap resamples for the 95% intervals
    dtype: str  # weights dtype as loaded: fp32, bf16 or fp16 (cli.eval_dtype's spelling)
    chat_format: str  # chat template renderer for every checkpoint loaded (tokenizer.CHAT_FORMAT_CHOICES)


# ------------------------------------------------------------------------ inputs, checked

def check_slot(path, flag: str, reward: bool):
    """The checkpoint a flag names (a folder, or a Hub id in the local Hugging Face cache), checked
    before any heavy work (compat.check_model_kind)."""
    path = resolve_model_path(path, flag)
    if not (Path(path) / "config.json").is_file():
        raise MissingFileError(f"{flag} {path}: no checkpoint there (no config.json){DEMO_HINTS.get(str(path), '')}")
    return check_model_kind(path, reward, flag)


def load_slot(path, flag: str, dtype: str, env):
    """Load a checked checkpoint for inference, and say what was loaded."""
    model = load_model(path, dtype=dtype, device=env.device).eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    print0(env, f"loaded {flag} {path}: {describe_kind(model.config)}, {n / 1e6:.2f}M parameters, "
                f"{dtype} on {env.device}")
    return model


def output_folder(path, env) -> Path:
    """The --output folder, created by rank 0 alone (the one that writes)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder")
    if env.is_main:  # rank 0 alone writes
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output {out}: cannot create the folder ({e.strerror or e})") from None
    return out


def load_data(path, data_format: str, env):
    """The preference pairs of a file and its load report (printed)."""
    pairs, report = load_preferences(path, data_format)
    print0(env, report.summary())
    return pairs, report


# ------------------------------------------------------------------------------- output

def jsonable(x):
    """NaN/inf become null (strict JSON has no NaN); numpy scalars and tuples become plain values."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: Path, obj):
    path.write_text(json.dumps(jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def print_table(title: str, rows):
    """rows: (name, value) pairs; floats get 4 decimals, (low, high) tuples print as an interval."""
    def fmt(v):
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return f"[{fmt(v[0])}, {fmt(v[1])}]"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    width = max(len(name) for name, _ in rows)
    print(f"\n{title}\n" + "-" * len(title))
    for name, value in rows:
        print(f"{name:<{width}}  {fmt(value)}")
