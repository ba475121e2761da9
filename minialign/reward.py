"""Reward modelling: the Bradley-Terry objective for the training loop, and scoring of texts.

A reward model reads a whole conversation (prompt + answer, ending at the answer's end-of-turn
token, e.g. <|im_end|>) and returns one number, the score head applied to the hidden state of the
last real token. Training pushes r(chosen) above r(rejected) (losses.bradley_terry_loss).
"""
from __future__ import annotations

import math

import torch

from .collate import conversation_text, through_last_end_of_turn
from .losses import bradley_terry_loss
from .objective import Objective, preference_sums
from .packing import is_packed, packed_rewards


def reward_objective(center_rewards_coef: float = 0.0, margin: float | None = None) -> Objective:
    """The Bradley-Terry objective: rewards of the [2B, T] batch's rows, chosen rows first."""

    def loss(model, batch):
        chosen, rejected = pair_rewards(model, batch)  # (B,) each
        losses, chosen, rejected = bradley_terry_loss(chosen, rejected, margin=margin,
                                                      center_rewards_coef=center_rewards_coef)
        return losses, preference_sums(chosen, rejected)

    return Objective(loss, summarize_rewards, headline=("loss", "accuracy", "margin"))


def pair_rewards(model, batch):
    """(chosen, rejected) rewards, (B,) each, read at each answer's last token (its end of turn):
    from one packed row per pair (packing.packed_rewards, the prompt computed once) or from the
    [2B, T] batch, chosen rows first."""
    if is_packed(batch):
        return packed_rewards(model, batch)
    # The rows are right-padded: causal attention alone is exact for every real token, so no mask
    # (SDPA's flash kernel, and no host sync to check the padding); each reward is read at its row's
    # last real token, as RewardModel.forward reads it.
    last = batch["lengths"] - 1  # (2B,)
    return model.rewards_at(batch["input_ids"], None, last[:, None])[:, 0].chunk(2)  # (2B,) -> (B,), (B,)


def summarize_rewards(s: dict) -> dict[str, float]:
    """Logged means of the reward model's metric sums (objective.preference_sums)."""
    n = max(s["pairs"], 1)
    mean = (s["chosen_reward"] + s["rejected_reward"]) / (2 * n)
    return {
        "loss": s["loss"] / n, "accuracy": s["correct"] / n, "ties": s["ties"] / n, "margin": s["margin"] / n,
        "chosen_reward": s["chosen_reward"] / n, "rejected_reward": s["rejected_reward"] / n,
        "reward_mean": mean, "reward_std": math.sqrt(max(s["reward_sq"] / (2 * n) - mean**2, 0.0)),
    }


def conversation_ids(tokenizer, prompt: list[dict], response: str, max_length: int | None = None) -> list[int]:
    """Token ids of prompt + assistant response, ending at the response's end of turn: the same
    sequence training built (collate.conversation_text).

    Truncation, the trainer's policy: the reward is read at the last token, which must always be
    the end-of-turn token, so a conversation longer than max_length loses the START of its prompt
    (the oldest turns, the system prompt first), never the end of the answer. Only an answer that
    alone is longer than max_length loses its own start too. An answer that stopped without an
    end-of-turn token (cut at max_new_tokens) gets the template's end-of-turn text like any other."""
    text, _ = conversation_text(tokenizer, prompt, response)
    ids = through_last_end_of_turn(tokenizer.encode(text), tokenizer.end_of_turn_ids)
    return ids[-max_length:] if max_length else ids


@torch.no_grad()
def score_responses(reward_model, tokenizer, prompts, responses, batch_size=16, max_length=None, device=None):
    """Rewards for (prompt, response) pairs -> list of floats. Batches are right-padded."""
    device = device or next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    seqs = [conversation_ids(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    scores = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        scores += reward_model(ids.to(device), mask.to(device)).tolist()
    reward_model.train(was_training)
    return scores
