"""DPO for the training loop: log-probabilities of chosen and rejected answers under the policy
and a frozen reference, fed to a loss from losses.py.

Direct Preference Optimization (Rafailov et al. 2023) needs four numbers per pair:
log pi(y_c|x), log pi(y_r|x) from the policy being trained, and the same two from the
reference (the initial policy, frozen). They come from one concatenated forward:
chosen and rejected rows stacked as one [2B, T] batch, so the model runs once per step
(one set of kernel launches, and the same padding for both halves).

The reference never changes, so its log-probs can be computed once before training
(`precompute_reference_logps`) and cached on disk, keyed by everything they depend on.

Shape legend: B pairs, T padded length, C hidden size.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .distributed import all_reduce_sums, barrier, print0
from .logprobs import sequence_logprobs_from_hidden
from .losses import dpo_loss, simpo_loss
from .sampler import eval_shard
from .train import Objective, autocast_context, make_batch, move

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
# With gradient checkpointing on, the vocabulary projection too is done this many positions at
# a time and recomputed in backward. Otherwise its (N, V) logits would outweigh the checkpointed
# layers: 1024 scored positions x V = 152k in fp32 are 622 MB per copy, and backward holds ~3.
CHECKPOINT_LOGITS_CHUNK = 256


def concatenated_logps(model, batch):
    """One forward over the [2B, T] batch -> (logps_sum [2B], logps_mean [2B]) in fp32.

    Only positions that predict a label are projected onto the vocabulary (logprobs.py):
    the prompt and the padding never touch the largest matrix of the model."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # (2B, T, C)
    chunk = CHECKPOINT_LOGITS_CHUNK if getattr(model, "gradient_checkpointing", False) else None
    return sequence_logprobs_from_hidden(hidden, model.lm_head.weight, batch["labels"], chunk_size=chunk)


def dpo_objective(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, rpo_alpha=None,
                  ref_model=None) -> Objective:
    """The Objective train() optimises. Reference log-probs come from batch["ref_logps"]
    (precomputed, [B, 2] chosen/rejected) or else from a live forward of `ref_model`."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")

    def compute(model, batch):
        logps_sum, logps_mean = concatenated_logps(model, batch)  # (2B,) each
        chosen, rejected = logps_sum.chunk(2)
        chosen_mean, rejected_mean = logps_mean.chunk(2)
        if loss_type == "simpo":  # reference-free, on per-token averages (Meng et al. 2024 eq. 6)
            losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_mean, rejected_mean, beta, simpo_gamma)
        else:
            if "ref_logps" in batch:
                ref_chosen, ref_rejected = batch["ref_logps"].unbind(-1)  # (B,) each
            else:
                with torch.no_grad():
                    ref_chosen, ref_rejected = concatenated_logps(ref_model, batch)[0].chunk(2)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                label_smoothing=label_smoothing)
        if rpo_alpha:
            # RPO (Pang et al. 2024, eq. 3): add the per-token NLL of the chosen answer, so the
            # policy keeps (or gains) likelihood on what people preferred, not only the margin.
            losses = losses + rpo_alpha * (-chosen_mean)
        margins = chosen_rewards - rejected_rewards
        sums = {
            "pairs": chosen.shape[0],
            "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": margins.sum(),
            "rewards/accuracies": (margins > 0).sum(), "rewards/ties": (margins == 0).sum(),
            "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
            "logps/chosen_per_token": chosen_mean.detach().sum(),
            "logps/rejected_per_token": rejected_mean.detach().sum(),
        }
        return losses.sum(), sums

    def summarize(s):
        n = max(s["pairs"], 1)
        return {k: v / n for k, v in s.items() if k not in ("pairs", "tokens")}

    return Objective(compute, summarize, headline=("loss", "rewards/accuracies", "rewards/margins"))


def reference_cache_key(items, ref_dir, tokenizer, settings: dict) -> str:
    """sha256 over everything the reference log-probs depend on: the token ids of every pair
    (which already reflect data, chat template and truncation), the reference weights' bytes,
    the template and the truncation settings."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.prompt_ids, it.chosen_ids, it.rejected_ids]).encode())
    for f in sorted(Path(ref_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    h.update(json.dumps({"template": tokenizer.chat_format, **settings}, sort_keys=True).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_reference_logps(ref_model, items, batch_size, env, dtype="fp32", pad_id=0) -> torch.Tensor:
    """(N, 2) summed log-probs [chosen, rejected] of every pair under the reference.

    Each rank scores a disjoint shard into a zero table; an all-reduce SUM of the tables then
    gives every rank the complete one, identical whatever the number of ranks."""
    table = torch.zeros(len(items), 2, dtype=torch.float64, device=env.device)
    mine = eval_shard(len(items), env.rank, env.world_size)
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        batch = move(make_batch(items, idx, pad_id), env.device)
        with autocast_context(dtype, env.device):
            logps = concatenated_logps(ref_model, batch)[0]  # (2B,)
        table[idx] = torch.stack(logps.double().chunk(2), dim=-1)
    if env.world_size > 1:
        torch.distributed.all_reduce(table)
    return table.float().cpu()


def precompute_reference_logps(ref_model, ref_dir, tokenizer, splits: dict, args, env, pad_id, cache_dir):
    """Attach `ref_logps` to every tokenized pair of each split, from the cache when the key matches.

    Rank 0 decides whether the cache file exists and broadcasts it through the same all-reduce,
    so ranks need no shared file system."""
    settings = {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
                "truncation": args.truncation, "dtype": args.dtype}
    for name, items in splits.items():
        if not items:
            continue
        key = reference_cache_key(items, ref_dir, tokenizer, settings)
        path = Path(cache_dir) / f"ref_logps-{name}-{key}.safetensors"
        have = all_reduce_sums({"cached": float(env.is_main and path.is_file())}, env)["cached"] > 0
        if have:
            table = torch.zeros(len(items), 2)
            if env.is_main:
                table = load_file(str(path))["ref_logps"]
            if env.world_size > 1:
                table = table.to(env.device)
                torch.distributed.all_reduce(table)
                table = table.cpu()
            print0(env, f"reference log-probs for {name}: reused {path}")
        else:
            table = compute_reference_logps(ref_model, items, args.eval_batch_size or args.batch_size,
                                            env, args.dtype, pad_id)
            if env.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({"ref_logps": table.contiguous()}, str(tmp))
                os.replace(tmp, path)
            print0(env, f"reference log-probs for {name}: computed {len(items)} pairs, cached in {path}")
        barrier(env)
        for it, row in zip(items, table):
            it.ref_logps = (float(row[0]), float(row[1]))

