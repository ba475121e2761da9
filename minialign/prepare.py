"""From a preference file to the tokenized pairs a trainer trains and evaluates on.

Load (data.py: every skipped record counted by reason and line), split by prompt unless a
held-out file is given (no prompt on both sides), tokenize with the chat template and the
truncation policy (collate.py), and print one report per file. Both trainers call
`prepare_pairs` with a `DataConfig` built from their flags (cli.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .collate import tokenize_pairs
from .data import load_preferences, split_by_prompt
from .distributed import DistEnv, gather_objects, print0
from .errors import UserError


@dataclass
class DataConfig:
    data: str
    eval_data: str | None = None
    eval_split: float = 0.1  # share of --data's distinct prompts held out when eval_data is None
    data_format: str = "auto"
    strict: bool = False
    pku_label_key: str = "better_response_id"
    max_length: int = 512
    max_prompt_length: int | None = None  # None: half of max_length
    truncation: str = "keep_end"
    seed: int = 0  # the split

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_length or self.max_length // 2


def prepare_pairs(tokenizer, cfg: DataConfig, env: DistEnv):
    """Load, report what was skipped, split by prompt (unless eval_data), tokenize:
    -> (train_items, eval_items), lists of collate.TokenizedPair."""
    load = dict(data_format=cfg.data_format, strict=cfg.strict, pku_label_key=cfg.pku_label_key)
    pairs, report = load_preferences(cfg.data, **load)
    eval_report = None
    if cfg.eval_data:
        train_pairs = pairs
        eval_pairs, eval_report = load_preferences(cfg.eval_data, **load)
    elif cfg.eval_split > 0:
        n_prompts = len({repr(p.prompt) for p in pairs})
        if n_prompts < 2:
            raise UserError(f"{cfg.data} has {n_prompts} distinct prompt(s), too few to hold some out with "
                            f"--eval_split {cfg.eval_split}: give --eval_data, or --eval_split 0 for no evaluation")
        train_pairs, eval_pairs = split_by_prompt(pairs, eval_fraction=cfg.eval_split, seed=cfg.seed)
    else:
        train_pairs, eval_pairs = pairs, []
    tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.prompt_budget, truncation=cfg.truncation,
               strict=cfg.strict)
    # Drops at tokenization are counted in the report of the file the pair came from: both
    # splits of --data go to its report, so its `kept` is what is really used.
    train_items, train_stats = tokenize_pairs(tokenizer, train_pairs, report=report, **tok)
    eval_items, eval_stats = tokenize_pairs(tokenizer, eval_pairs, report=eval_report or report, **tok)
    print0(env, report.summary())
    if eval_report is not None:
        print0(env, eval_report.summary())
    print0(env, f"train: {train_stats.summary()}\neval:  {eval_stats.summary()}")
    if not train_items:
        raise UserError(f"no training pair of {cfg.data} survived tokenization (see the report above): "
                        f"raise --max_length, or use --truncation keep_end")
    check_same_data_on_every_rank(cfg, train_items, eval_items, env)
    return train_items, eval_items


def check_same_data_on_every_rank(cfg: DataConfig, train_items, eval_items, env: DistEnv) -> None:
    """Every rank reads the data from its own disk: a rank whose file differs (another version of
    the data set on one node) would train on other pairs under the same indices. Compare the
    files' fingerprints and the pair counts with rank 0's."""
    if env.world_size == 1:
        return
    mine = (file_fingerprint(cfg.data), cfg.eval_data and file_fingerprint(cfg.eval_data), len(train_items),
            len(eval_items))
    everyone = gather_objects(mine, env)
    differ = [r for r, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differ:
        raise UserError(f"ranks {differ} read other data than rank 0 ({cfg.data}: fingerprint and pair counts "
                        f"differ): every node must hold the same --data and --eval_data files")


def file_fingerprint(path) -> str:
    """sha256 of a file's bytes (short): a resumed run checks it trains on the same data."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def data_settings(cfg: DataConfig) -> dict:
    """The data settings a resumed run must share with the run it continues."""
    return {"data": str(Path(cfg.data).resolve()), "data_sha256": file_fingerprint(cfg.data),
            "eval_data": cfg.eval_data and file_fingerprint(cfg.eval_data), "eval_split": cfg.eval_split,
            "data_format": cfg.data_format, "max_length": cfg.max_length, "max_prompt_length": cfg.prompt_budget,
            "truncation": cfg.truncation, "split_seed": cfg.seed}


__all__ = ["DataConfig", "prepare_pairs", "file_fingerprint", "data_settings"]
