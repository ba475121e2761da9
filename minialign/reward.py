"""Reward modelling: the Bradley-Terry objective for the training loop, and scoring of texts.

A reward model reads a whole conversation (prompt + answer, ending at the answer's end-of-turn
token, e.g. <|im_end|>) and returns one number, the score head applied to the hidden state of the
last real token. Training pushes r(chosen) above r(rejected) (losses.bradley_terry_loss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .collate import conversation_text, through_last_end_of_turn, to_device
from .losses import bradley_terry_loss
from .objective import preference_sums
from .packing import collate, is_packed, packed_rewards


@dataclass
class RewardObjective:
    """What train() optimises for a reward model, the Bradley-Terry loss of each pair's two rewards:
    loss(model, batch) -> (losses (B,), metric sums), summarize(sums) -> the logged means."""

    center_rewards_coef: float = 0.0
    margin: float | None = None
    headline = ("loss", "accuracy", "margin")  # metrics printed on the progress line

    def loss(self, model, batch):
        chosen, rejected = pair_rewards(model, batch)  # (B,) each
        losses, chosen, rejected = bradley_terry_loss(chosen, rejected, margin=self.margin,
                                                      center_rewards_coef=self.center_rewards_coef)
        return losses, preference_sums(chosen, rejected)

    def summarize(self, sums: dict) -> dict[str, float]:
        return summarize_rewards(sums)


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


def conversation_ids(tokenizer, prompt: list[dict], response: str, max_length: int | None = None,
                     max_prompt_length: int | None = None) -> list[int]:
    """Token ids of prompt + assistant response, ending at the response's end of turn: the same
    sequence training built (collate.conversation_text).

    Truncation, the trainer's policy with the trainer's prompt budget (collate.py; train_rm.py's
    --max_prompt_length, by default half of --max_length): the reward is read at the last token,
    which must always be the end-of-turn token, so a prompt keeps its last max_prompt_length tokens
    (None: no budget), and a conversation still longer than max_length loses more of its prompt's
    START (the oldest turns, the system prompt first), never the end of the answer. So a pair that
    training keeps is scored here on exactly the tokens it trained on. Training drops a pair whose
    answer alone fills max_length (over_length); `evaluate.py rm` drops and reports such pairs
    the same way (it scores through collate.tokenize_pairs and score_pairs), while a single
    generated answer that long (`evaluate.py dpo`) is scored on its last max_length tokens. An answer
    that stopped without an end-of-turn token (cut at max_new_tokens) gets the template's
    end-of-turn text like any other."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    text, _ = conversation_text(tokenizer, prompt, response, prompt_text)
    prompt_ids, full = tokenizer.encode_batch([prompt_text, text])
    ids = through_last_end_of_turn(full, tokenizer.end_of_turn_ids)
    if not max_length:
        return ids
    P = len(prompt_ids) if ids[:len(prompt_ids)] == prompt_ids else 0  # no prefix (a BPE merge): one piece
    answer = ids[P:]
    keep = P if max_prompt_length is None else min(P, max_prompt_length)  # the prompt budget
    keep = max(min(keep, max_length - len(answer)), 0)  # then only what fits beside the answer
    return (ids[P - keep:P] + answer)[-max_length:]  # the prompt's END, and the answer's end always


@torch.no_grad()
def score_ids(reward_model, seqs: list[list[int]], pad_token_id: int) -> list[float]:
    """Rewards of B token sequences (conversation_ids) in one right-padded (B, T) batch, each read
    at its row's last real token."""
    device = next(reward_model.parameters()).device
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)               # (B, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return reward_model(ids.to(device), mask.to(device)).tolist()


@torch.no_grad()
def score_pairs(reward_model, items, pad_token_id: int) -> list[tuple[float, float]]:
    """(chosen, rejected) rewards of B tokenized pairs (collate.TokenizedPair) in one forward, in
    training's layout: one packed row [prompt | chosen | rejected] per pair, the prompt computed
    once (packing.py; two rows per pair if a prompt is empty, which packing cannot hold). The same
    numbers as scoring each conversation in its own row, to rounding (tests/test_evaluate_cli.py)."""
    device = next(reward_model.parameters()).device
    batch = to_device(collate(items, pad_token_id, packed=all(it.prompt_ids for it in items)), device)
    chosen, rejected = pair_rewards(reward_model, batch)  # (B,) each
    return list(zip(chosen.tolist(), rejected.tolist()))


@torch.no_grad()
def score_responses(reward_model, tokenizer, prompts, responses, batch_size=16, max_length=None,
                    max_prompt_length=None):
    """Rewards for (prompt, response) pairs -> list of floats, batch_size right-padded rows at a
    time in the given order (evaluate.py groups its rows by length first)."""
    was_training = reward_model.training
    reward_model.eval()
    seqs = [conversation_ids(tokenizer, p, r, max_length, max_prompt_length) for p, r in zip(prompts, responses)]
    scores = []
    for start in range(0, len(seqs), batch_size):
        scores += score_ids(reward_model, seqs[start:start + batch_size], tokenizer.pad_token_id)
    reward_model.train(was_training)
    return scores
