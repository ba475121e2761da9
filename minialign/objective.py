"""What a trainer optimises, as the training loop sees it, and the metrics both objectives log.

An objective is a small class whose loss(model, batch) returns the loss of every pair in the
batch, (B,), and a dict of metric *sums* over those pairs. The loop (train.py) turns the
losses into one step and adds the sums up over micro-batches and ranks; `summarize` turns the
totals into the means that are logged. Sums, never means, travel between ranks, so that a
mean over the global batch is exact whatever the split.

The reward model and DPO both end in a pair of scalar rewards per pair (a learned reward, or
DPO's implicit reward beta * log(pi / pi_ref)), so their accuracy, ties and margin come from
one helper, `preference_sums`.

Shape legend: B pairs in a micro-batch.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    """What the loop needs of an objective: reward.RewardObjective and dpo.DPOObjective are the two.

    loss(model, batch) -> (losses (B,), metric sums incl. "pairs"); summarize(sums) -> logged means;
    headline: the metrics printed on the progress line."""

    headline: tuple

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]: ...

    def summarize(self, sums: dict) -> dict[str, float]: ...


def preference_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Sums over B pairs of what both objectives log; rewards (B,) each, detached here.

    Accuracy is strict: a pair counts as correct only when chosen > rejected, so a model that
    scores every answer the same has accuracy 0 and ties 1, never a flattering 0.5."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "pairs": chosen.shape[0],
        "correct": (chosen > rejected).sum(),
        "ties": (chosen == rejected).sum(),
        "margin": (chosen - rejected).sum(),
        "chosen_reward": chosen.sum(),
        "rejected_reward": rejected.sum(),
        "reward_sq": chosen.pow(2).sum() + rejected.pow(2).sum(),  # for the std of all 2B rewards
    }


def mean_metrics(sums: dict) -> dict[str, float]:
    """Totals -> per-pair means: every key but the counters ("pairs", "tokens") divided by pairs."""
    n = max(sums["pairs"], 1)
    return {k: v / n for k, v in sums.items() if k not in ("pairs", "tokens", "reward_sq")}


__all__ = ["Objective", "preference_sums", "mean_metrics"]
