"""Reward modelling: the Bradley-Terry loss, the objective for the training loop, and scoring of texts.

A reward model reads a whole conversation (prompt + answer, ending at the answer's end-of-turn
token, e.g. <|im_end|>) and returns one number, the score head applied to the hidden state of the
last real token (model.RewardModel). Training pushes r(chosen) above r(rejected) under the
Bradley-Terry model of a human choice: P(chosen preferred) = sigmoid(r_c - r_r).

Precision: a reward difference is computed in at least float32 (bf16 inputs are promoted; a
float64 unit test gets the float64 formula), and -log sigmoid(x) as -F.logsigmoid(x), exact for
|x| in the thousands.

Shape legend: B pairs in a batch, T padded length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .collate import conversation_text, through_last_end_of_turn
from .packing import PairBatch, collate, pair_rewards


def _precise(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: bf16/fp16 are promoted, float64 stays float64. (dpo.py has the same
    line: each loss chapter keeps its own, so that a step reads in one file, tests/test_layout.py.)"""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reward-model loss: negative log-likelihood of the human choice under Bradley-Terry.

    Bradley & Terry 1952; Ouyang et al. 2022 eq. 1:  P(c > r) = sigmoid(r_c - r_r),
    loss = -log sigmoid(r_c - r_r). With a margin m (Touvron et al. 2023, Llama 2, eq. 2):
    -log sigmoid(r_c - r_r - m), asking the chosen reward to lead by at least about m.

    Centering (Eisenstein et al. 2023, as in TRL's `center_rewards_coefficient`): BT only
    sees reward differences, so the reward's offset drifts freely; the penalty
    coef * (r_c + r_r)^2 pulls the rewards of each pair toward zero mean. It is added
    PER PAIR, so losses.mean() = mean(-log sigmoid(...)) + coef * mean((r_c + r_r)^2),
    which is exactly TRL's batch formula.

    Args:
        chosen_rewards, rejected_rewards: [B] scalar rewards.
        margin: None, a float, or [B] per-pair margins.
        center_rewards_coef: weight of the centering penalty (0 disables it).
    Returns:
        losses [B] (float32, or float64 for float64 inputs), and the two rewards, detached.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(chosen_rewards.shape)} vs {tuple(rejected_rewards.shape)}")
    chosen, rejected = _precise(chosen_rewards), _precise(rejected_rewards)  # (B,) each
    difference = chosen - rejected                                         # (B,)
    if margin is not None:
        difference = difference - torch.as_tensor(margin, dtype=difference.dtype, device=difference.device)
    losses = -F.logsigmoid(difference)                                     # Ouyang et al. 2022 eq. 1
    if center_rewards_coef != 0.0:
        losses = losses + center_rewards_coef * (chosen + rejected) ** 2   # per-pair centering penalty
    return losses, chosen.detach(), rejected.detach()



@dataclass
class RewardObjective:
    """What train() optimises for a reward model, one micro-batch at a time (loss), and the means
    it logs (summarize)."""

    center_rewards_coef: float = 0.0
    margin: float | None = None
    headline = ("loss", "accuracy", "margin")  # metrics printed on the progress line

    def loss(self, model, batch: PairBatch):
        """-> (losses (B,), chosen_rewards (B,), rejected_rewards (B,), metric sums): both rewards
        from one forward, the Bradley-Terry loss. The loop logs accuracy, margin and ties from the
        two rewards (train.preference_sums)."""
        chosen, rejected = pair_rewards(model, batch)  # (B,) each
        losses, chosen, rejected = bradley_terry_loss(chosen, rejected, margin=self.margin,
                                                      center_rewards_coef=self.center_rewards_coef)
        return losses, chosen, rejected, {}

    def summarize(self, s: dict) -> dict[str, float]:
        """Logged means of the metric sums over the global batch (train.preference_sums')."""
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
    batch = collate(items, pad_token_id, packed=all(it.prompt_ids for it in items)).to(device)
    chosen, rejected = pair_rewards(reward_model, batch)  # (B,) each
    return list(zip(chosen.tolist(), rejected.tolist()))


@torch.no_grad()
def score_responses(reward_model, tokenizer, prompts, responses, batch_size=16, max_length=None,
                    max_prompt_length=None):
    """Rewards for (prompt, response) pairs -> list of floats, batch_size right-padded rows at a
    time in the given order (`evaluate.py dpo` groups its rows by length first: eval_dpo.rewards_of_both)."""
    was_training = reward_model.training
    reward_model.eval()
    seqs = [conversation_ids(tokenizer, p, r, max_length, max_prompt_length) for p, r in zip(prompts, responses)]
    scores = []
    for start in range(0, len(seqs), batch_size):
        scores += score_ids(reward_model, seqs[start:start + batch_size], tokenizer.pad_token_id)
    reward_model.train(was_training)
    return scores
