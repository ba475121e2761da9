"""Reward modelling: the Bradley-Terry objective for the training loop, and scoring of texts.

A reward model reads a whole conversation (prompt + answer, ending at the answer's
<|im_end|>) and returns one number, the score head applied to the hidden state of the
last real token. Training pushes r(chosen) above r(rejected) (losses.bradley_terry_loss).
"""
from __future__ import annotations

import math

import torch

from .collate import through_last_end_of_turn
from .losses import bradley_terry_loss
from .train import Objective


def reward_objective(center_rewards_coef: float = 0.0, margin: float | None = None) -> Objective:
    """The Objective that train() optimises for a reward model."""

    def compute(model, batch):
        rewards = model(batch["input_ids"], batch["attention_mask"])  # (2B,) chosen rows first
        chosen, rejected = rewards.chunk(2)  # (B,) each
        losses, _ = bradley_terry_loss(chosen, rejected, margin=margin, center_rewards_coef=center_rewards_coef)
        r = rewards.detach()
        sums = {
            "pairs": chosen.shape[0],
            "correct": (chosen > rejected).sum(),  # strict: a tie is not correct
            "ties": (chosen == rejected).sum(),
            "margin": (chosen - rejected).detach().sum(),
            "chosen_reward": chosen.detach().sum(),
            "rejected_reward": rejected.detach().sum(),
            "reward_sum": r.sum(),
            "reward_sq": r.pow(2).sum(),
        }
        return losses.sum(), sums

    def summarize(s):
        n = max(s["pairs"], 1)
        mean = s["reward_sum"] / (2 * n)
        return {
            "loss": s["loss"] / n, "accuracy": s["correct"] / n, "ties": s["ties"] / n, "margin": s["margin"] / n,
            "chosen_reward": s["chosen_reward"] / n, "rejected_reward": s["rejected_reward"] / n,
            "reward_mean": mean, "reward_std": math.sqrt(max(s["reward_sq"] / (2 * n) - mean**2, 0.0)),
        }

    return Objective(compute, summarize, headline=("loss", "accuracy", "margin"))


def conversation_ids(tokenizer, prompt: list[dict], response: str, max_length: int | None = None) -> list[int]:
    """Token ids of prompt + assistant response, ending at the response's <|im_end|> (as in training).

    Truncation, the trainer's policy: the reward is read at the last token, which must always be
    the end-of-turn token, so a conversation longer than max_length loses the START of its prompt
    (the oldest turns, the system prompt first), never the end of the answer. Only an answer that
    alone is longer than max_length loses its own start too. An answer that stopped without an
    end-of-turn token (cut at max_new_tokens) gets the template's <|im_end|> like any other."""
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}])
    ids = through_last_end_of_turn(tokenizer.encode(text), tokenizer.end_of_turn_token_id)
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
