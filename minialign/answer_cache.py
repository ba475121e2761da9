"""Answers reused across evaluations, under a key that names everything they depend on.

A sweep evaluates several policies against one base, on the same prompts with the same sampling:
the base's answers, and the reward model's scores of them, come out the same every time.
`evaluate.py dpo --generation_cache DIR` stores them once and reads them back when, and only when,
their key matches:

  answers  sha256 of the model folder's files (config.json, tokenizer files and every *.safetensors,
           byte by byte), the prompt token ids row by row (each prompt repeated k times, so the
           number of samples is in it), the stop and pad ids, max_new_tokens, temperature, top_p,
           top_k, the seed, the batch size (it decides which rows are padded together), the dtype,
           the device type and the torch version (sampling kernels may change between versions)
  scores   the answers' key, the reward model folder's files, max_length, batch size, dtype,
           device type and chat format

Change any of them and the key changes, so another file is used: answers made with other settings
are never read back. A file is JSON, written under a temporary name and renamed into place, and
records the settings it was made with (readable with any JSON viewer).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import UserError, read_json

FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
READ_BLOCK = 1 << 24  # hash 16 MB at a time: a large checkpoint never sits in memory whole


def folder_fingerprint(model_dir) -> str:
    """sha256 over the bytes of a checkpoint folder's config, tokenizer and weight files (with
    their names), in sorted order: the same files give the same fingerprint wherever they are."""
    h = hashlib.sha256()
    folder = Path(model_dir)
    names = sorted({*(n for n in FINGERPRINT_FILES if (folder / n).is_file()),
                    *(f.name for f in folder.glob("*.safetensors"))})
    for name in names:
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(READ_BLOCK), b""):
                h.update(block)
    return h.hexdigest()


def cache_key(settings: dict) -> str:
    """sha256 of the settings as canonical JSON (sorted keys): equal settings, equal key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def ids_digest(rows) -> str:
    """sha256 of id lists row by row (they go into a key without making the stored file large)."""
    return hashlib.sha256(json.dumps([list(map(int, r)) for r in rows]).encode()).hexdigest()


def _path(cache_dir, kind: str, key: str) -> Path:
    return Path(cache_dir) / f"{kind}-{key}.json"


def read_cached(cache_dir, kind: str, key: str):
    """The payload stored for this kind and key, or None if there is none."""
    path = _path(cache_dir, kind, key)
    if not path.is_file():
        return None
    stored = read_json(path, f"cached {kind}")
    if not isinstance(stored, dict) or stored.get("key") != key or "payload" not in stored:
        raise UserError(f"{path}: not a cache file of minialign (no matching key); remove it or use another "
                        f"--generation_cache folder")
    return stored["payload"]


def write_cached(cache_dir, kind: str, key: str, settings: dict, payload) -> Path:
    """Store a JSON-able payload with the settings it was made with; atomic (temporary file, rename)."""
    path = _path(cache_dir, kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "settings": settings, "payload": payload}) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"--generation_cache {cache_dir}: cannot write {path.name} ({e.strerror or e})") from None
    return path
