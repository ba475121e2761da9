"""Hugging Face Hub ids (`Qwen/Qwen2.5-0.5B-Instruct`) found in the local Hugging Face cache.

minialign never downloads: it reads checkpoints from disk. But a model a user has downloaded
with `hf download ORG/NAME` (`huggingface-cli download` in older huggingface_hub, or through
transformers) sits in the Hugging Face cache, one folder per repository and one subfolder per downloaded revision:

    <cache>/models--ORG--NAME/refs/main               the commit hash "main" pointed to
    <cache>/models--ORG--NAME/snapshots/<hash>/       config.json, *.safetensors, tokenizer files

so `--model ORG/NAME` resolves to the snapshot `refs/main` names, or, without a usable
refs/main, to the most recently written snapshot. The caches searched, in order:
$HF_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub
(those set), the places huggingface_hub itself uses. A folder that exists always wins over a
Hub id of the same spelling, so a local `runs/rm` is never looked up in the cache. Whatever
refs/main holds (a hash, but a damaged or hostile cache could hold `/etc` or `../..`), the
snapshot chosen is a folder inside that repository's snapshots/, or nothing.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import MissingFileError, UserError

# ORG/NAME as the Hub spells repository ids: letters, digits, '-', '_', '.', one slash.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def hub_cache_dirs() -> list[Path]:
    """The Hugging Face caches to search, in order, without duplicates."""
    env = os.environ
    dirs = []
    if env.get("HF_HUB_CACHE"):
        dirs.append(Path(env["HF_HUB_CACHE"]))
    if env.get("HF_HOME"):
        dirs.append(Path(env["HF_HOME"]) / "hub")
    if env.get("XDG_CACHE_HOME"):
        dirs.append(Path(env["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(d.expanduser() for d in dirs))


def cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The snapshot folder of `repo_id` in one cache: refs/main's, else the newest; None if absent.
    A snapshot outside snapshots/ (refs/main naming an absolute or relative path elsewhere, or a
    snapshot that is a link out of the cache) is refused."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    inside = os.path.realpath(snapshots)
    def contained(p: Path) -> bool:  # resolved, it is one folder directly under snapshots/
        return p.is_dir() and os.path.dirname(os.path.realpath(p)) == inside

    ref = repo / "refs" / "main"
    if ref.is_file() and ref.read_text().strip():
        pointed = snapshots / ref.read_text().strip()
        if pointed.is_dir() and not contained(pointed):
            raise UserError(f"{ref} names {pointed}, which is not a snapshot inside {snapshots}; the cache is damaged "
                            f"(download the model again, or pass its folder)")
        if pointed.is_dir():
            return pointed
    found = [p for p in snapshots.iterdir() if contained(p)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_model_path(name: str | os.PathLike, flag: str = "--model") -> Path:
    """A checkpoint folder for `name`: the folder itself when it exists; for a Hub id `ORG/NAME`
    that is not a folder, its snapshot in the local cache. Anything else comes back as a Path
    for the caller to report missing files in."""
    path = Path(name).expanduser()
    if path.exists() or not HUB_ID.fullmatch(str(name)):
        return path
    caches = hub_cache_dirs()
    for cache in caches:
        snapshot = cached_snapshot(str(name), cache)
        if snapshot is not None:
            return snapshot
    raise MissingFileError(
        f"{flag} {name}: no such folder, and no download of the Hub model {name} in the Hugging Face cache "
        f"(looked in {', '.join(map(str, caches))}); download it with `hf download {name}` (then {flag} {name} "
        f"finds it) or `hf download {name} --local-dir {path.name}` and pass {flag} {path.name} (`hf` comes with "
        f"pip install -U huggingface_hub; older versions call it huggingface-cli)"
    )


__all__ = ["resolve_model_path", "hub_cache_dirs", "cached_snapshot"]
