"""Hugging Face checkpoints in and out: config.json + safetensors, strictly checked.

Loading builds the module on the meta device (no wasted random init), reads the tensors
with safetensors (never pickle), and checks that the key sets and shapes match exactly,
naming any tensor that is missing, unexpected or mis-shaped.

Saving writes the same layout (sharded with an index above a size limit) into a temporary
folder beside the target and renames it into place, so a crash mid-save never leaves a
half-written checkpoint where a good one was.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .hub import resolve_model_path
from .model import CausalLM, RewardModel

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Files a tokenizer may consist of; copied along with the weights when given a tokenizer folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "vocab.json", "merges.txt",
)
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(path) -> ModelConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no config.json in checkpoint folder {path}")
    with open(cfg_path) as f:
        return ModelConfig.from_hf_dict(json.load(f), source=str(cfg_path))


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint (safetensors only: no pickle)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        files = [path / WEIGHTS_NAME]
    elif (path / INDEX_NAME).is_file():
        with open(path / INDEX_NAME) as f:
            weight_map = json.load(f)["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found (only safetensors is read)")
    state = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: shard listed in {INDEX_NAME} is missing")
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def _check_keys(expected: dict, found: dict, path):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise KeyError(f"{path}: checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        raise KeyError(f"{path}: checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}")
    for key, param in expected.items():
        if tuple(found[key].shape) != tuple(param.shape):
            raise ValueError(
                f"{path}: tensor '{key}' has shape {tuple(found[key].shape)}, config expects {tuple(param.shape)}"
            )


def load_model(path, dtype=None, device=None, reward: bool | None = None):
    """A CausalLM, or a RewardModel when config.json names a *ForSequenceClassification
    architecture (or `reward=True`: then a fresh scalar head on a causal-LM backbone).

    dtype: None keeps fp32 (master weights for training), or "bf16"/"fp16"/torch.dtype.
    path: a checkpoint folder, or a Hub id `org/name` found in the local Hugging Face cache (minialign.hub).
    """
    path = resolve_model_path(path)
    cfg = load_config(path)
    dtype = parse_dtype(dtype) or torch.float32
    as_reward = cfg.is_reward_model if reward is None else reward
    new_head = as_reward and not cfg.is_reward_model
    with torch.device("meta"):
        model = RewardModel(cfg) if as_reward else CausalLM(cfg)
    state = read_state_dict(path)
    if new_head:  # a causal LM checkpoint becomes a reward-model backbone; lm_head is not used
        state = {k: v for k, v in state.items() if k.startswith("model.")}
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings and not as_reward:
        expected.pop("lm_head.weight")  # the same tensor as the embedding
        state.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    if new_head:
        expected.pop("score.weight")
    _check_keys(expected, state, path)
    state = {k: v.to(dtype) for k, v in state.items()}
    if new_head:
        std = cfg.initializer_range
        state["score.weight"] = torch.randn(1, cfg.hidden_size).mul_(std).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings and not as_reward:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True broke the tie; restore it
    if device is not None:
        model.to(device)
    return model


@contextmanager
def atomic_directory(path):
    """Yield a temporary folder; on success it replaces `path` in (nearly) one step.

    The old folder is moved aside before the new one is renamed in, and deleted only after:
    if the process dies at any point, either the old or the new complete checkpoint exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file's permissions set by the umask like any other file
    (save_file creates it 0600, which a teammate on a shared cluster cannot read)."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_state_dict(state: dict[str, torch.Tensor], folder, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES):
    """Write tensors as model.safetensors, or as shards plus an index when larger than the limit."""
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_tensors(shards[0], folder / WEIGHTS_NAME, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, folder / name, metadata=metadata)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(folder / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_model_files(model, folder, tokenizer=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, dtype=None,
                      state=None):
    """config.json, the safetensors weights (cast to `dtype` if given) and the tokenizer files,
    written into `folder`. state: the weights to write, by name (default: model.state_dict(); a
    sharded model's are gathered first, resume.full_model_state)."""
    folder = Path(folder)
    state = dict(model.state_dict() if state is None else state)
    if isinstance(model, CausalLM) and model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # stored once, as the embedding (what transformers expects)
    dtype = parse_dtype(dtype) or next(model.parameters()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with open(folder / "config.json", "w") as f:
        json.dump(model.config.to_hf_dict(dtype), f, indent=2)
    write_state_dict(state, folder, max_shard_bytes)
    if tokenizer is not None and isinstance(tokenizer, (str, os.PathLike)):
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy(Path(tokenizer) / name, folder / name)
    elif tokenizer is not None:
        tokenizer.save(folder)


def save_model(model, path, tokenizer=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, dtype=None, state=None):
    """Save in Hugging Face layout (loadable by transformers' Auto classes), atomically.

    tokenizer: a minialign Tokenizer (its files are written) or a folder whose tokenizer files
    are copied alongside, so the checkpoint is self-contained. dtype: store the weights in this
    dtype ("bf16", torch.bfloat16, ...); default: the model's own. state: the weights by name,
    when they are not model.state_dict() (a sharded model's, gathered: resume.full_model_state).
    """
    with atomic_directory(path) as tmp:
        write_model_files(model, tmp, tokenizer, max_shard_bytes, dtype, state)


def checkpoint_dtype(config: ModelConfig) -> str:
    """The dtype a checkpoint declares in config.json ("torch_dtype" in 4.x, "dtype" in 5.x), as
    "fp32" / "bf16" / "fp16"; fp32 when it declares none."""
    declared = config.raw.get("torch_dtype") or config.raw.get("dtype") or "float32"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(str(declared), "fp32")
