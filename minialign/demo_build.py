"""The demo world on disk: its data, tokenizer and base model, built once and found again.

Real checkpoints and data sets need a download; this module builds everything the scripts
need from nothing, in a couple of minutes on a laptop CPU. The questions, their rules and the
judge are in minialign/demo_world.py; minialign/demo.py runs the whole pipeline on the world.

What gets built under `root` (default runs/demo/), each step only when missing:
  data/train.jsonl, data/eval.jsonl   align-anything layout, prompts disjoint between them
  tokenizer/                          byte-level BPE trained on that text, ChatML template
  base/                               a tiny Qwen2 trained from scratch on BOTH answers of
                                      every training pair, so it shows both behaviours
                                      (about half preferred): the base and reference model
A marker file, written last, says the build finished; a crash mid-build rebuilds.

    paths = demo_paths()       # DemoPaths: base_model, train_data, eval_data, root
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import save_model
from .collate import tokenize_pairs
from .config import ModelConfig
from .data import PreferencePair, load_preferences
from .demo_world import make_preference_data
from .distributed import DistEnv, barrier, print0
from .model import CausalLM, num_parameters
from .packing import IGNORE_INDEX, collate_pairs, sequence_logprobs_from_hidden
from .sampler import global_batches
from .tokenizer import train_bpe_tokenizer
from .train import learning_rate

BUILD_VERSION = 5  # bump when the world changes, so that old builds are rebuilt
MARKER = "COMPLETE.json"  # written last: its presence means the whole build finished
VOCAB_SIZE = 640  # byte-level BPE: 256 bytes + 3 specials + merges; covers the world's words


@dataclass(frozen=True)
class BaseModelSettings:
    """The tiny Qwen2 (these sizes go into its config.json) and its supervised pass."""
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4  # head_dim 24
    num_kv_heads: int = 2  # grouped-query attention, as in Qwen2
    intermediate_size: int = 256
    steps: int = 600
    batch_size: int = 32  # pairs per step: 64 sequences, both answers of each pair
    lr: float = 3e-3
    seed: int = 0


FULL_BASE, FAST_BASE = BaseModelSettings(), BaseModelSettings(steps=400)


def base_config(vocab_size: int, s: BaseModelSettings, eos_id: int, pad_id: int) -> dict:
    """A Hugging Face Qwen2 config.json for the tiny base model."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab_size,
        "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu", "initializer_range": 0.02,
        "use_sliding_window": False, "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def train_base_model(pairs: list[PreferencePair], tokenizer, s: BaseModelSettings, log=print) -> CausalLM:
    """Supervised pass from scratch on the better AND the worse answer of every pair.

    collate_pairs already builds the [2B, T] batch this needs: both answers, labels on the
    answer tokens (<|im_end|> included) and IGNORE_INDEX on prompt and padding. The loss is
    the mean negative log-likelihood per answer token. Learning both answers equally makes
    this model show the preferred behaviour about half of the time; DPO must find which half.
    """
    items, stats = tokenize_pairs(tokenizer, pairs)
    if stats.kept != len(pairs):
        raise RuntimeError(f"demo base model: {stats.summary()}")
    torch.manual_seed(s.seed)
    cfg = ModelConfig.from_hf_dict(base_config(len(tokenizer), s, tokenizer.end_of_turn_token_id,
                                               tokenizer.pad_token_id), source="demo base config")
    model = CausalLM(cfg)
    log(f"base model: qwen2, {num_parameters(model) / 1e6:.2f}M parameters; supervised pass of "
        f"{s.steps} steps on both answers of {len(items)} pairs")
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    lengths = [it.length for it in items]  # batches of similar lengths: little padding
    steps_per_epoch = len(items) // s.batch_size
    t0, cpu0 = time.time(), time.process_time()
    for step in range(s.steps):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            batches = global_batches(len(items), s.batch_size, s.seed, epoch, lengths)
        batch = collate_pairs([items[j] for j in batches[i]], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s.steps, s.lr, warmup_ratio=0.05)
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)  # (2B, T, C)
        logps_sum, _ = sequence_logprobs_from_hidden(hidden, model.lm_head.weight, batch.labels)  # (2B,)
        n_tokens = (batch.labels[:, 1:] != IGNORE_INDEX).sum()  # answer tokens scored
        loss = -logps_sum.sum() / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == s.steps:
            log(f"  step {step + 1}/{s.steps} | loss per answer token {loss.item():.3f} | {time.time() - t0:.0f}s "
                f"(cpu {time.process_time() - cpu0:.0f}s)")
    return model.eval()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def build_world(root, base: BaseModelSettings = FULL_BASE, seed: int = 0, log=print) -> None:
    """Write data, tokenizer and base model under root, then the marker (last)."""
    root = Path(root)
    (root / MARKER).unlink(missing_ok=True)
    t0 = time.time()
    train, held_out = make_preference_data(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    _write_jsonl(root / "data" / "train.jsonl", train)
    _write_jsonl(root / "data" / "eval.jsonl", held_out)
    log(f"demo data: {len(train)} train / {len(held_out)} held-out pairs in {root / 'data'}")
    # The tokenizer learns its merges from the training text only (held-out questions are
    # built from the same words, so they still encode compactly).
    texts = [r[k] for r in train for k in ("question", "response_1", "response_2")]
    tokenizer = train_bpe_tokenizer(texts + ["system user assistant"], root / "tokenizer", vocab_size=VOCAB_SIZE)
    pairs, report = load_preferences(root / "data" / "train.jsonl", strict=True)
    model = train_base_model(pairs, tokenizer, base, log)
    save_model(model, root / "base", tokenizer)
    marker = {"version": BUILD_VERSION, "seed": seed, "base": vars(base), "seconds": round(time.time() - t0, 1)}
    (root / MARKER).write_text(json.dumps(marker, indent=2))
    log(f"demo world built in {time.time() - t0:.0f}s under {root}")


def world_is_built(root, base: BaseModelSettings | None = None) -> bool:
    """A finished build of this version (and, if given, with these base-model settings)."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    return info.get("version") == BUILD_VERSION and (base is None or info.get("base") == vars(base))


@dataclass
class DemoPaths:
    base_model: Path  # the tiny base model: the policy DPO starts from and its reference
    train_data: Path
    eval_data: Path
    root: Path


def demo_paths(env: DistEnv | None = None, root="runs/demo", base: BaseModelSettings | None = None,
               force: bool = False, log=print) -> DemoPaths:
    """Paths of the demo world under root, building whatever is missing first.

    base: required base-model settings (None accepts any finished build). Under data
    parallelism only rank 0 builds; the other ranks wait at the barrier, then read.
    """
    root = Path(root)
    if env is None or env.is_main:
        if force or not world_is_built(root, base):
            build_world(root, base or FULL_BASE, log=log)
    if env is not None:
        barrier(env)
    return DemoPaths(root / "base", root / "data" / "train.jsonl", root / "data" / "eval.jsonl", root)


def use_demo_world(env: DistEnv, root="runs/demo") -> DemoPaths:
    """For a trainer given neither --model nor --data: the demo world's base model, train and
    eval splits (built under `root` on first use), announced in the first line of output. The
    caller fills its own flags from the paths returned."""
    print0(env, f"no --model and --data given: training on the demo world in {root} "
                f"(python -m minialign.demo runs the whole assignment on it)")
    return demo_paths(env, root)


__all__ = ["BaseModelSettings", "FULL_BASE", "FAST_BASE", "MARKER", "base_config", "train_base_model",
           "build_world", "world_is_built", "DemoPaths", "demo_paths", "use_demo_world"]
