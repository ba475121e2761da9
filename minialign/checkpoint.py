"""Hugging Face checkpoints in and out: config.json + safetensors, strictly checked.

Loading checks before it reads: config.json's values, then the safetensors headers (layer count,
floating-point dtypes), then the key sets and shapes against the module built on the meta device
(no wasted random init), naming any tensor that is missing, unexpected or mis-shaped; only then
are the tensors read, with safetensors (never pickle).

Saving writes the same layout (sharded with an index above a size limit) into a temporary
folder beside the target and renames it into place, so a crash mid-save never leaves a
half-written checkpoint where a good one was.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .hub import resolve_model_path
from .errors import MissingFileError, UserError, read_json
from .model import CausalLM, RewardModel

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# The file atomic_directory puts inside its temporary folders: with the name's pattern, what lets
# the start-up clean-up (run_folder.py) tell a killed writer's leftovers from a user's folder.
TEMP_MARKER = ".minialign-partial"
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
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(path) -> ModelConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise MissingFileError(f"{cfg_path}: no config.json in checkpoint folder {path}")
    return ModelConfig.from_hf_dict(read_json(cfg_path, "the model's config"), source=str(cfg_path))


# ----------------------------------------------------------------------------- reading weights

@dataclass
class TensorInfo:
    """One tensor as a safetensors header describes it: nothing of its data is read."""
    file: Path
    dtype: str                 # safetensors spelling: "F32", "BF16", "I64", "BOOL", ...
    shape: tuple[int, ...]


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if not (path / INDEX_NAME).is_file():
        raise MissingFileError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found (only safetensors is read)")
    index = read_json(path / INDEX_NAME, "the index of a sharded checkpoint")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{path / INDEX_NAME}: expected a 'weight_map' object of tensor name -> file name")
    files = [path / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise MissingFileError(f"{file}: shard listed in {INDEX_NAME} is missing")
    return files


def read_tensor_index(path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo of every tensor of a (sharded) safetensors checkpoint, from the file
    headers alone: cheap even for a large model. A truncated or corrupt file is named."""
    index = {}
    for file in _weight_files(Path(path)):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    index[key] = TensorInfo(file, piece.get_dtype(), tuple(piece.get_shape()))
        except SafetensorError as e:  # the header checks the file's size too: truncation is caught here
            raise UserError(f"{file}: not a readable safetensors file ({e}); was it copied or downloaded completely?") from None
    return index


def read_state_dict(path, names=None) -> dict[str, torch.Tensor]:
    """Tensors of a single-file or sharded safetensors checkpoint (safetensors only: no pickle);
    all of them, or only `names`."""
    index = read_tensor_index(path)
    wanted = index if names is None else names
    state = {}
    for file in sorted({index[key].file for key in wanted}):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in wanted:
                        state[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    check_finite(state, index)
    return state


def check_finite(state: dict[str, torch.Tensor], index: dict[str, TensorInfo]) -> None:
    """Refuse weights holding NaN or Inf: training from them gives a non-finite loss at the first
    step, evaluating them gives nonsense, and neither says which tensor was at fault."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{index[key].file}: tensor '{key}' holds {bad} NaN or infinite value(s); these weights "
                            f"are damaged (re-download or re-save them, or pick an earlier checkpoint)")


def same_weights(a, b) -> bool:
    """Whether two checkpoint folders hold the same weight files: the same files, or byte-equal ones
    (read only when the names and sizes already agree)."""
    fa, fb = _weight_files(Path(a)), _weight_files(Path(b))
    if [f.name for f in fa] != [f.name for f in fb] or [f.stat().st_size for f in fa] != [f.stat().st_size for f in fb]:
        return False
    return all(os.path.samefile(x, y) or filecmp.cmp(x, y, shallow=False) for x, y in zip(fa, fb))


def weights_fingerprint(path) -> str:
    """Size and modification time of every weight file of a checkpoint folder: a resumed run
    compares it with the one it recorded, so weights replaced under the same path are noticed
    without reading them (hashing a 1 GB file on every start would cost seconds)."""
    files = _weight_files(Path(path))
    return "; ".join(f"{f.name} {f.stat().st_size} bytes, modified {f.stat().st_mtime_ns}" for f in files)


LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors names of the dtypes weights may be cast from


def check_weights_fit_config(cfg: ModelConfig, index: dict[str, TensorInfo], path) -> None:
    """Checks that need only the headers, made before any module is built: the number of decoder
    layers (a config saying 200000 would otherwise spend minutes building modules before the key
    check could refuse it) and the dtypes (an integer or bool tensor cast to float would load
    without complaint and train nonsense)."""
    layers = sorted({int(m.group(1)) for key in index if (m := LAYER_KEY.match(key))})
    if layers != list(range(cfg.num_hidden_layers)):
        held = (f"layers {layers[0]}..{layers[-1]} ({len(layers)} in all)" if layers
                else "no decoder layers (no tensor named model.layers.N.*)")
        raise UserError(f"{Path(path) / 'config.json'}: num_hidden_layers = {cfg.num_hidden_layers}, but the weights "
                        f"in {path} hold {held}: the config and the weights do not belong together")
    for key, info in index.items():
        if info.dtype not in FLOAT_DTYPES:
            raise UserError(f"{info.file}: tensor '{key}' is stored as {info.dtype}; weights must be floating point "
                            f"({', '.join(FLOAT_DTYPES)}); this is not a checkpoint minialign can load")


def _check_keys(expected: dict, found: dict, path):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise UserError(f"{path}: checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        raise UserError(f"{path}: checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}")
    for key, param in expected.items():
        if tuple(found[key].shape) != tuple(param.shape):
            raise UserError(
                f"{path}: tensor '{key}' has shape {tuple(found[key].shape)}, config expects {tuple(param.shape)}"
            )


def inspect_checkpoint(path, reward: bool | None = None):
    """Everything load_model checks, without reading one weight: config.json, the safetensors
    headers, layer count and dtypes, then the key set and every shape against the model built on
    the meta device (no memory). Returns (config, model on meta, names of the tensors to read)."""
    cfg = load_config(path)
    index = read_tensor_index(path)
    check_weights_fit_config(cfg, index, path)
    as_reward = cfg.is_reward_model if reward is None else reward
    new_head = as_reward and not cfg.is_reward_model
    with torch.device("meta"):
        model = RewardModel(cfg) if as_reward else CausalLM(cfg)
    names = set(index)
    if new_head:  # a causal LM checkpoint becomes a reward-model backbone; lm_head is not used
        names = {k for k in names if k.startswith("model.")}
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings and not as_reward:
        expected.pop("lm_head.weight")  # the same tensor as the embedding
        names.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
    if new_head:
        expected.pop("score.weight")
    _check_keys(expected, {k: index[k] for k in names}, path)
    return cfg, model, names


def load_model(path, dtype=None, device=None, reward: bool | None = None):
    """A CausalLM, or a RewardModel when config.json names a *ForSequenceClassification
    architecture (or `reward=True`: then a fresh scalar head on a causal-LM backbone).

    dtype: None keeps fp32 (master weights for training), or "bf16"/"fp16"/torch.dtype.
    path: a checkpoint folder, or a Hub id `org/name` found in the local Hugging Face cache (minialign.hub).
    """
    path = resolve_model_path(path)
    cfg, model, names = inspect_checkpoint(path, reward)
    dtype = parse_dtype(dtype) or torch.float32
    as_reward = isinstance(model, RewardModel)
    state = {k: v.to(dtype) for k, v in read_state_dict(path, names).items()}
    if as_reward and not cfg.is_reward_model:  # the new head: small random values, as transformers initialises it
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
    if (tmp / TEMP_MARKER).is_file():  # our own leftover (a pid reused); anything else is not ours to delete
        shutil.rmtree(tmp, ignore_errors=True)
    if tmp.exists():
        raise UserError(f"{tmp} exists and was not made by minialign; move it away so that {path} can be written")
    tmp.mkdir()
    (tmp / TEMP_MARKER).write_text(str(os.getpid()))
    try:
        yield tmp
        (tmp / TEMP_MARKER).unlink()
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():  # the replaced copy is now redundant: marked, so a kill mid-delete is tidied later
            (old / TEMP_MARKER).write_text(str(os.getpid()))
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file's permissions set by the umask like any other file
    (save_file creates it 0600, which a teammate on a shared cluster cannot read)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # safetensors reports a full disk or a file-size limit this way
        raise UserError(f"{path} could not be written ({e}); check the free disk space, quota and "
                        f"file-size limit (ulimit -f)") from None
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

