"""DPO for the training loop: log-probabilities of chosen and rejected answers under the policy
and a frozen reference, fed to a loss from losses.py.

Direct Preference Optimization (Rafailov et al. 2023) needs four numbers per pair:
log pi(y_c|x), log pi(y_r|x) from the policy being trained, and the same two from the
reference (the initial policy, frozen). They come from one concatenated forward:
chosen and rejected rows stacked as one [2B, T] batch, so the model runs once per step
(one set of kernel launches, and the same padding for both halves).

The reference never changes, so its log-probs can be computed once before training
(`reference_table`), cached on disk keyed by everything they depend on, and looked up per
pair during training (`PrecomputedReference`) instead of running the reference model
(`LiveReference`).

Shape legend: B pairs, T padded length, C hidden size, N pairs of a split.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import save_tensors
from .collate import to_device
from .distributed import DistEnv, barrier, broadcast_object, broadcast_tensors, print0
from .logprobs import CHECKPOINT_LOGITS_CHUNK, sequence_logprobs_from_hidden
from .lora import adapters_disabled
from .losses import dpo_loss, simpo_loss
from .objective import mean_metrics, preference_sums
from .packing import collate, is_packed, packed_logps
from .precision import autocast_context
from .progress import Progress
from .sampler import eval_shard

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


def concatenated_logps(model, batch):
    """One forward over the [2B, T] batch -> (logps_sum [2B], logps_mean [2B]) in fp32.

    Only positions that predict a label are projected onto the vocabulary (logprobs.py):
    the prompt and the padding never touch the largest matrix of the model."""
    # Right padding: causal attention alone is exact for every real token (padding comes after it),
    # so no mask: SDPA's flash kernel, and no host sync to check the padding (model.Backbone.forward).
    hidden = model.hidden_states(batch["input_ids"])  # (2B, T, C)
    chunk = CHECKPOINT_LOGITS_CHUNK if getattr(model, "gradient_checkpointing", False) else None
    labelled = (batch["label_rows"], batch["label_cols"]) if "label_rows" in batch else None  # collate_pairs'
    return sequence_logprobs_from_hidden(hidden, model.lm_head.weight, batch["labels"], chunk_size=chunk,
                                         labelled=labelled)


def answer_logps(model, batch):
    """(chosen_sum, rejected_sum, chosen_mean, rejected_mean), (B,) each in fp32, from either layout:
    one packed row per pair (packing.packed_logps, the prompt computed once) or chosen and
    rejected rows (concatenated_logps). The same numbers to rounding (tests/test_packing.py)."""
    if is_packed(batch):
        return packed_logps(model, batch)
    logps_sum, logps_mean = concatenated_logps(model, batch)  # (2B,) each
    return (*logps_sum.chunk(2), *logps_mean.chunk(2))


class LiveReference:
    """The reference as a forward of the frozen model, no graph: reference(batch) -> (chosen, rejected)
    log-probs, (B,) each."""

    def __init__(self, ref_model):
        self.model = ref_model

    def __call__(self, batch):
        with torch.no_grad():
            return answer_logps(self.model, batch)[:2]  # (B,) chosen, (B,) rejected


class AdapterOffReference:
    """LoRA (lora.py): the reference is the policy itself with its adapters switched off, which is
    the initial model exactly (W0 never trains), so no second copy of the model is held. No graph;
    gradient checkpointing and the adapters' dropout take no part without gradients and adapters."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, batch):
        with torch.no_grad(), adapters_disabled(self.policy):
            return answer_logps(self.policy, batch)[:2]  # (B,) chosen, (B,) rejected


class PrecomputedReference:
    """The reference as a lookup: tables[split] is (N, 2) [chosen, rejected] log-probs of that
    split's pairs; a batch names its split and its pairs' indices (train.make_batch). The tables
    move to `device` once here (8 bytes per pair), not once per micro-step."""

    def __init__(self, tables: dict[str, torch.Tensor], device="cpu"):
        self.tables = {name: t.to(device) for name, t in tables.items() if t is not None}

    def __call__(self, batch):
        rows = self.tables[batch["split"]][batch["pair_index"]]  # (B, 2)
        return rows.unbind(-1)


@dataclass
class DPOObjective:
    """What train() optimises for DPO and its variants: loss(model, batch) -> (losses (B,), metric
    sums), summarize(sums) -> the logged means. `reference(batch) -> (ref_chosen, ref_rejected)` is a
    LiveReference, AdapterOffReference or PrecomputedReference; SimPO needs none."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float | None = None
    reference: object = None
    headline = ("loss", "rewards/accuracies", "rewards/margins")  # metrics printed on the progress line

    def __post_init__(self):  # checks only: nothing is changed here
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if self.loss_type != "simpo" and self.reference is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs a reference (LiveReference, AdapterOffReference "
                             "or PrecomputedReference)")

    def loss(self, model, batch):
        chosen, rejected, chosen_mean, rejected_mean = answer_logps(model, batch)  # (B,) each
        if self.loss_type == "simpo":  # reference-free, on per-token averages (Meng et al. 2024 eq. 6)
            losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_mean, rejected_mean, self.beta,
                                                                  self.simpo_gamma)
        else:
            ref_chosen, ref_rejected = self.reference(batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                label_smoothing=self.label_smoothing)
        sums = {**preference_sums(chosen_rewards, rejected_rewards),
                "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
                "logps/chosen_per_token": chosen_mean.detach().sum(),
                "logps/rejected_per_token": rejected_mean.detach().sum()}
        if self.rpo_alpha:
            # RPO (Pang et al. 2024, eq. 3): add the per-token NLL of the chosen answer, so the
            # policy keeps (or gains) likelihood on what people preferred, not only the margin.
            nll = -chosen_mean  # (B,)
            sums.update({"loss/preference": losses.detach().sum(), "loss/nll": nll.detach().sum()})
            losses = losses + self.rpo_alpha * nll
        return losses, sums

    def summarize(self, sums: dict) -> dict[str, float]:
        return summarize_dpo(sums)


def summarize_dpo(s: dict) -> dict[str, float]:
    """Logged means, named as TRL names them, of the DPO objective's metric sums."""
    m = mean_metrics(s)
    out = {"loss": m.pop("loss"), "rewards/chosen": m.pop("chosen_reward"), "rewards/rejected": m.pop("rejected_reward"),
           "rewards/margins": m.pop("margin"), "rewards/accuracies": m.pop("correct"), "rewards/ties": m.pop("ties")}
    return {**out, **{k: v for k, v in m.items() if "/" in k}}


# ------------------------------------------------------------------------ precomputed reference

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
        batch = to_device(collate([items[j] for j in idx or [0]], pad_id, packed), env.device)
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


__all__ = ["LOSS_TYPES", "concatenated_logps", "answer_logps", "LiveReference", "AdapterOffReference",
           "PrecomputedReference", "DPOObjective", "summarize_dpo", "reference_table", "compute_reference_logps",
           "reference_cache_key", "weights_digest"]
