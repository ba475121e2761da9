"""The reference's log-probs computed once and cached on disk (--precompute_ref), beside
answer_cache.py, which does the same for evaluation's base answers.

DPO's reference never changes, so the two log-probs of each pair under it can be computed once
before training (`reference_table`), in the training's layout, and looked up per pair during
training (dpo.PrecomputedReference) instead of running the reference model every step. They are
stored under a key of everything they depend on (`reference_cache_key`): the pairs' token ids,
the reference weights' sha256 (`weights_digest`, read once by rank 0), the template, the
precision and the layout. A run that finds its key reuses the table; any difference is another key.

Shape legend: N pairs of a split, B pairs of a batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import save_tensors
from .distributed import DistEnv, barrier, broadcast_object, broadcast_tensors, print0
from .packing import answer_logps, collate
from .precision import autocast_context
from .progress import Progress
from .sampler import eval_shard


def weights_digest(ref_dir, env: DistEnv) -> str:
    """sha256 of the reference weights' bytes, read by rank 0 alone and broadcast: the other
    ranks may not hold the files (fsdp.load_sharded), and at 32B each read is 64 GB or more.
    Computed once per run, for both splits' cache keys."""
    digest = None
    if env.is_main:
        h = hashlib.sha256()
        for f in sorted(Path(ref_dir).glob("*.safetensors")):
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        digest = h.hexdigest()
    return broadcast_object(digest, env)


def reference_cache_key(items, weights_sha256: str, tokenizer, settings: dict) -> str:
    """sha256 over everything the reference log-probs depend on: the token ids of every pair
    (which already reflect data, chat template and truncation), the reference weights
    (weights_digest), the template and the precision."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.prompt_ids, it.chosen_ids, it.rejected_ids]).encode())
    h.update(weights_sha256.encode())
    h.update(json.dumps({"template": tokenizer.chat_format, **settings}, sort_keys=True).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_reference_logps(ref_model, items, batch_size: int, env: DistEnv, dtype: str, pad_id: int,
                            name: str = "pairs", packed: bool = False) -> torch.Tensor:
    """(N, 2) summed log-probs [chosen, rejected] of every pair under the reference, on the CPU.

    Each rank scores a disjoint shard of rows into a zero table; an all-reduce SUM of the tables
    then gives every rank the complete one (the rows are disjoint, so the sum is their union),
    identical whatever the number of ranks. Prints progress with an ETA."""
    table = torch.zeros(len(items), 2, dtype=torch.float64, device=env.device)
    mine = eval_shard(len(items), env.rank, env.world_size)
    precision = autocast_context(dtype, env.device)
    progress = Progress(f"reference log-probs for {name} (rank 0's share)", len(mine), "pairs", env.is_main)
    # As many batches on every rank as the largest shard needs: a sharded reference (--fsdp)
    # all-gathers inside each forward, so the ranks' forwards must pair up. A rank past its
    # shard scores pair 0 and keeps nothing.
    for i in range(0, math.ceil(len(items) / env.world_size), batch_size):
        idx = mine[i:i + batch_size]
        batch = collate([items[j] for j in idx or [0]], pad_id, packed).to(env.device)
        with precision:
            chosen, rejected = answer_logps(ref_model, batch)[:2]  # (B,) each
        if not idx:
            continue
        table[idx] = torch.stack([chosen, rejected], dim=-1).double()
        progress.advance(len(idx))
    if env.world_size > 1:
        torch.distributed.all_reduce(table)
    return table.float().cpu()


def reference_table(ref_model, weights_sha256: str, tokenizer, items, name: str, batch_size: int, dtype: str,
                    settings: dict, cache_dir, env: DistEnv, packed: bool = False) -> torch.Tensor | None:
    """The (N, 2) reference log-probs of one split, read from the cache when its key matches,
    else computed (compute_reference_logps, in the training's layout) and cached. Rank 0 reads
    the cache and broadcasts it, so ranks need no shared file system. None for an empty split.
    weights_sha256: weights_digest of the reference checkpoint."""
    if not items:
        return None
    # The layout is in the key: both give the same numbers to rounding, but a cache should give
    # back exactly what this run would compute. Only rank 0 reads the cache, so only it needs the key.
    key = (reference_cache_key(items, weights_sha256, tokenizer, {**settings, "dtype": dtype, "packed": packed})
           if env.is_main else None)
    path = Path(cache_dir) / f"ref_logps-{name}-{key}.safetensors"
    cached = load_file(str(path))["ref_logps"] if env.is_main and path.is_file() else None
    if broadcast_object(cached is not None, env):
        table = broadcast_tensors({"t": cached} if env.is_main else None, env)["t"].cpu()
        print0(env, f"reference log-probs for {name}: reused {path}")
        return table
    table = compute_reference_logps(ref_model, items, batch_size, env, dtype, tokenizer.pad_token_id, name, packed)
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_tensors({"ref_logps": table.contiguous()}, tmp)
        os.replace(tmp, path)
    barrier(env)
    print0(env, f"reference log-probs for {name}: computed {len(items)} pairs, cached in {path}")
    return table


__all__ = ["weights_digest", "reference_cache_key", "compute_reference_logps", "reference_table"]
