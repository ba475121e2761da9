"""Which examples each rank sees, defined globally so the world size does not matter.

The data order is a function of (n, G, seed, epoch) only: every epoch is a list of
global batches of exactly G indices, and each optimizer step consumes one of them.
A rank then takes its fixed slice of that batch. Consequences:
  - 2 ranks x B items (or 1 rank x 2 micro-batches of B) see exactly the same examples
    per optimizer step as 1 rank x 2B, so runs are comparable across world sizes;
  - resuming at step s needs only (epoch, s mod batches_per_epoch), for any world size
    and accumulation that divide G: no sampler state to save.

Randomness: Python's random.Random seeded with the string "seed/epoch" (strings are
hashed with SHA-512, so the seed is the same in every process and Python version, and
seed 1 epoch 0 differs from seed 0 epoch 1 - which a plain seed + epoch would not).

Pure Python: indices in, lists of indices out; the caller collates them (packing.make_batch).
"""
from __future__ import annotations

import math
import random

from .errors import UserError

DEFAULT_BATCHES_PER_GROUP = 16  # k: global batches per length-sorted mega-group (see global_batches)


def _rng(seed: int, epoch: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}")


def batches_per_epoch(n: int, global_batch_size: int) -> int:
    """Optimizer steps in one epoch: the tail of n mod G items is dropped (see global_batches)."""
    return n // global_batch_size


def global_batches(n: int, global_batch_size: int, seed: int, epoch: int, lengths=None,
                   batches_per_group: int = DEFAULT_BATCHES_PER_GROUP) -> list[list[int]]:
    """The epoch's global batches: n // G lists of exactly G distinct indices in range(n).

    Plain (lengths None): a seeded permutation of range(n), cut into consecutive batches.
    The n mod G items left at the end of the permutation are dropped for this epoch, so
    that every step has the same batch size (a short last batch would weigh its examples
    more and break the equal split across ranks); since the permutation changes every
    epoch, a different random few are dropped each time.

    Length grouped (lengths[i] = tokens of example i, e.g. max of chosen and rejected):
    shuffle, split into mega-groups of G * batches_per_group indices, sort each mega-group
    by length, cut it into batches, then shuffle the order of all batches. Each batch then
    holds similar lengths (little padding), while which examples share a batch and the
    order of batches stay random at the scale of a mega-group.
    """
    G = global_batch_size
    if G <= 0:
        raise ValueError(f"global_batch_size must be positive, got {G}")
    if n < G:
        raise ValueError(f"dataset has {n} examples, fewer than one global batch of {G}")
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} entries but the dataset has {n} examples")
    if batches_per_group <= 0:
        raise ValueError(f"batches_per_group must be positive, got {batches_per_group}")
    rng = _rng(seed, epoch)
    order = list(range(n))
    rng.shuffle(order)
    order = order[: batches_per_epoch(n, G) * G]  # drop the tail that does not fill a batch
    if lengths is None:
        return [order[i : i + G] for i in range(0, len(order), G)]
    batches = []
    group = G * batches_per_group  # a multiple of G, so every group cuts into whole batches
    for start in range(0, len(order), group):
        # sorted() is stable: equal lengths keep their shuffled order.
        mega = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches.extend(mega[i : i + G] for i in range(0, len(mega), G))
    rng.shuffle(batches)  # otherwise each group would go from short to long batches
    return batches


def rank_micro_batches(batch: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This rank's grad_accum micro-batches of B = G / (world_size * grad_accum) indices.

    Micro-batch m of rank r is batch[(m * world + r) * B : (m * world + r + 1) * B]:
    micro-step m of all ranks together covers one contiguous slice of the batch, so with
    a length-sorted batch the ranks work on similar lengths at each micro-step (and wait
    less for each other). Over all (m, r) the slices tile the batch exactly once.
    """
    G = len(batch)
    if world_size <= 0 or grad_accum <= 0:
        raise ValueError(f"world_size ({world_size}) and grad_accum ({grad_accum}) must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if G % (world_size * grad_accum):
        raise ValueError(
            f"global batch of {G} is not divisible by world_size {world_size} x grad_accum {grad_accum}")
    B = G // (world_size * grad_accum)
    return [batch[(m * world_size + rank) * B : (m * world_size + rank + 1) * B] for m in range(grad_accum)]


def eval_shard(n: int, rank: int, world_size: int) -> list[int]:
    """Indices rank evaluates: rank, rank + world, rank + 2 world, ... (disjoint, together all of range(n)).

    Ranks may get counts differing by one; no example is padded in or repeated, so that
    reducing sums and counts with reducer.all_reduce_sums gives exactly the single-process metrics.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(range(rank, n, world_size))


def padding_fraction(batches_of_lengths) -> float:
    """Share of padded slots when each batch is padded to its longest: 1 - real / (sum of B * max)."""
    real = sum(sum(b) for b in batches_of_lengths)
    slots = sum(len(b) * max(b) for b in batches_of_lengths if len(b))
    return 1.0 - real / slots if slots else 0.0


class StepPlan:
    """Which pairs every optimizer step of a run takes: a function of (seed, epoch) (global_batches),
    so the step number alone says where a run is, and a resumed run takes exactly the same batches.

    batch_size pairs per rank per micro-step, grad_accum micro-steps, world_size ranks: a global
    batch of G = batch_size * grad_accum * world_size pairs per step. total: max_steps if given,
    else epochs (a float) of whole global batches. lengths: per-pair row lengths to group by."""

    def __init__(self, n_pairs: int, batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                 epochs: float = 1.0, max_steps: int | None = None, lengths=None):
        self.n, self.grad_accum, self.rank, self.world_size = n_pairs, grad_accum, rank, world_size
        self.seed, self.lengths = seed, lengths
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = batches_per_epoch(n_pairs, self.global_batch)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{n_pairs} training pairs do not fill one global batch of {self.global_batch} (--batch_size "
                f"{batch_size} x --grad_accum {grad_accum} x {world_size} ranks): lower --batch_size "
                f"or --grad_accum, or give more data")
        self.total = max_steps or max(1, int(epochs * self.steps_per_epoch))
        self._epoch, self._batches = None, None

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's grad_accum lists of pair indices for optimizer step `step`."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # the epoch's global batches, computed once per epoch
            self._epoch = epoch
            self._batches = global_batches(self.n, self.global_batch, self.seed, epoch, self.lengths)
        return rank_micro_batches(self._batches[in_epoch], self.rank, self.world_size, self.grad_accum)

    def pairs_used(self) -> list[int]:
        """Sorted indices of the training pairs that some step of the run takes: every pair of the
        first epochs the run covers, fewer when max_steps ends it within an epoch (each epoch drops
        its n mod G tail, so a run may skip a few pairs even then). What must be precomputed per
        pair (DPO's reference log-probs) is needed for these alone."""
        used: set[int] = set()
        for epoch in range(math.ceil(self.total / self.steps_per_epoch)):
            steps = min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch)
            for batch in global_batches(self.n, self.global_batch, self.seed, epoch, self.lengths)[:steps]:
                used.update(batch)
            if len(used) == self.n:
                break
        return sorted(used)


__all__ = ["StepPlan", "global_batches", "rank_micro_batches", "eval_shard", "padding_fraction", "batches_per_epoch"]
