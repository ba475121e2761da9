"""Prefix sharing: a preference pair as ONE row [prompt | chosen | rejected], its prompt computed once.

collate.py's [2B, T] layout runs every prompt twice, once before each answer, forward and
backward, in the policy and in the reference. Here each pair is one right-padded row, and the
attention mask lets each answer see the prompt and its own earlier tokens, never the other answer.
For a prompt of 3 tokens, a chosen answer of 2 and a rejected one of 3 (1: the query of that row
may see the key of that column):

                      keys  p0 p1 p2 c0 c1 r0 r1 r2
            queries   p0     1  .  .  .  .  .  .  .
                      p1     1  1  .  .  .  .  .  .
                      p2     1  1  1  .  .  .  .  .
                      c0     1  1  1  1  .  .  .  .
                      c1     1  1  1  1  1  .  .  .
                      r0     1  1  1  .  .  1  .  .
                      r1     1  1  1  .  .  1  1  .
                      r2     1  1  1  .  .  1  1  1
            position ids     0  1  2  3  4  3  4  5      (rejected restarts where the prompt ends)
            predicted by    -- p0 p1 p2 c0 p2 r0 r1      (the column whose hidden state scores it)

Why it is exact. In a decoder-only transformer, the only operation that mixes positions is
attention, and a query mixes exactly the keys and values it may see; norms, projections and the
MLP act on each position alone, and RoPE rotates each query and key by its own position id. So a
token's hidden state at every layer is a function of the tokens it may see and of their position
ids, nothing else. In the unpacked row [prompt | rejected], rejected token j sees the prompt and
rejected tokens 0..j at positions 0..P+j; here it sees the same tokens (the mask) at the same
positions (the position ids), so by induction over the layers its hidden states equal the
unpacked ones, and likewise for prompt and chosen tokens. Only rounding differs (other
summation orders in the matmuls and the softmax): the tests hold it to 1e-5 in fp32.

Reading the results. Token t is predicted by the hidden state at column t - 1, except the first
rejected token: the column before it is the chosen answer's last token, which the rejected answer
must not be conditioned on; as in the unpacked row, it is predicted by the prompt's last token
(column P - 1). Only the predicting positions are projected onto the vocabulary (logprobs.py).
A reward is read at each answer's last token (its <|im_end|>): column P + C - 1 for the chosen,
P + C + R - 1 for the rejected, with the reward model's last layer run at those two positions only
(model.DecoderLayer.forward_at).

Cost. A pair is P + C + R token positions instead of 2P + C + R: on the HH-RLHF harmless pairs with
the Qwen3 chat template, 216 instead of 343 (1.59x fewer). One pair per row, not several: with
length-grouped batches of 2 pairs the packed rows waste 3.7 % of their slots on padding (12.7 % for
the [2B, T] layout), so packing several pairs into a row would save at most that, for a mask with
one more level (pairs) and a longer row for attention to cover.

The mask is built from the three segment lengths on the batch's device, in a few vectorised
operations, once per forward; the model turns it into the additive mask SDPA uses, once, in the
compute dtype (model.additive_mask), and every layer reuses that. On CUDA a mask rules out SDPA's flash kernel;
model.attend keeps it on the memory-efficient kernel (docs/benchmarks.md).

Shape legend: B pairs (one row each), T padded row length, C hidden size, N answer tokens in the batch.
"""
from __future__ import annotations

import torch

from .collate import TokenizedPair, collate_pairs, labelled_positions
from .logprobs import CHECKPOINT_LOGITS_CHUNK, IGNORE_INDEX, token_logprobs

# What each column of a packed row holds (segment_ids).
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3


def is_packed(batch: dict) -> bool:
    """Does this batch hold one row per pair (collate_packed) rather than two (collate.collate_pairs)?
    Only collate_packed writes the segment lengths."""
    return "prompt_lengths" in batch


def collate(pairs: list[TokenizedPair], pad_token_id: int, packed: bool, pad_to_multiple_of: int | None = None) -> dict:
    """The batch of either layout: one row per pair (prefix sharing) or chosen and rejected rows."""
    if packed:
        return collate_packed(pairs, pad_token_id, pad_to_multiple_of)
    return collate_pairs(pairs, pad_token_id, pad_to_multiple_of)


def row_length(pair: TokenizedPair, packed: bool) -> int:
    """Columns a pair needs in its batch: P + C + R packed, P + max(C, R) for two rows."""
    return packed_length(pair) if packed else pair.length


def packed_length(pair: TokenizedPair) -> int:
    """Columns this pair fills in a packed row: prompt + chosen + rejected."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def collate_packed(pairs: list[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad B pairs into B rows [prompt | chosen | rejected | padding].

    Returns, all long:
      input_ids [B, T], position_ids [B, T] (packed_position_ids),
      labels [B, T]: both answers' ids, IGNORE_INDEX on prompt and padding,
      prompt_lengths, chosen_lengths, rejected_lengths [B], and lengths [B] (real tokens per row),
      label_rows, label_cols [N]: every answer token (collate.labelled_positions, found on the CPU).
    T is the longest row, rounded up to a multiple of pad_to_multiple_of if given (on CUDA, 8 spares
    SDPA a padded copy of the mask in every layer).
    There is no 2-D attention_mask: it would let the rejected answer see the chosen one. The model
    gets packed_attention_mask(batch) instead.
    """
    if not pairs:
        raise ValueError("collate_packed: no pairs to collate")
    for p in pairs:
        if not p.prompt_ids:  # the first rejected token would have no position to be predicted from
            raise ValueError(f"collate_packed: the pair from line {p.line} has an empty prompt; "
                             "prefix sharing needs at least one prompt token (use collate_pairs)")
    T = max(packed_length(p) for p in pairs)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of  # ceil to a multiple
    B = len(pairs)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)   # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)      # (B, T)
    for r, p in enumerate(pairs):
        answers = p.chosen_ids + p.rejected_ids
        n, m = len(p.prompt_ids), len(answers)
        input_ids[r, :n + m] = torch.tensor(p.prompt_ids + answers, dtype=torch.long)
        labels[r, n:n + m] = torch.tensor(answers, dtype=torch.long)  # the prompt stays IGNORE_INDEX
    prompt = torch.tensor([len(p.prompt_ids) for p in pairs], dtype=torch.long)      # (B,)
    chosen = torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long)      # (B,)
    rejected = torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.long)  # (B,)
    label_rows, label_cols = labelled_positions(labels)  # (N,) each; the prompt is never empty, so cols >= 1
    return {"input_ids": input_ids, "position_ids": packed_position_ids(prompt, chosen, rejected, T),
            "labels": labels, "prompt_lengths": prompt, "chosen_lengths": chosen, "rejected_lengths": rejected,
            "lengths": prompt + chosen + rejected, "label_rows": label_rows, "label_cols": label_cols}


def segment_ids(prompt_lengths, chosen_lengths, rejected_lengths, T: int):
    """What each column holds, PROMPT, CHOSEN, REJECTED or PADDING: (B,) lengths -> (B, T) long,
    on the lengths' device."""
    ends = torch.stack([prompt_lengths, prompt_lengths + chosen_lengths,
                        prompt_lengths + chosen_lengths + rejected_lengths], dim=-1)  # (B, 3): where each part ends
    t = torch.arange(T, device=prompt_lengths.device)  # (T,)
    return (t[None, :, None] >= ends[:, None, :]).sum(-1)  # (B, T): how many parts end at or before column t


def packed_position_ids(prompt_lengths, chosen_lengths, rejected_lengths, T: int):
    """Rotary position of each column, (B,) lengths -> (B, T): the column index, except that the
    rejected answer restarts at the prompt's end, where it sits in its unpacked row."""
    segment = segment_ids(prompt_lengths, chosen_lengths, rejected_lengths, T)  # (B, T)
    t = torch.arange(T, device=prompt_lengths.device)  # (T,)
    return t - chosen_lengths[:, None] * (segment == REJECTED)  # (B, T)


def packed_attention_mask(batch: dict):
    """Boolean (B, 1, T, T) mask of a packed batch: query t may see key s if s <= t and s is in the
    prompt or in t's own part (the diagram in the module docstring).

    Padding queries see the prompt, earlier padding and themselves (never nothing, which would give
    NaN); their outputs are unused. Real queries never see padding, which comes after them."""
    T = batch["input_ids"].shape[1]
    segment = segment_ids(batch["prompt_lengths"], batch["chosen_lengths"], batch["rejected_lengths"], T)  # (B, T)
    query, key = segment[:, :, None], segment[:, None, :]  # (B, T, 1), (B, 1, T)
    t = torch.arange(T, device=segment.device)
    causal = t[None, :] <= t[:, None]  # (T, T): key s at or before query t
    return (causal & ((key == query) | (key == PROMPT)))[:, None]  # (B, T, T) -> (B, 1, T, T)


def packed_logps(model, batch: dict):
    """One forward over the packed rows -> (chosen_sum, rejected_sum, chosen_mean, rejected_mean),
    each (B,) fp32: log pi(answer | prompt) summed over the answer's tokens, and its mean per token.
    The same numbers as dpo.concatenated_logps on the [2B, T] layout of the same pairs."""
    prompt, chosen = batch["prompt_lengths"], batch["chosen_lengths"]
    hidden = model.hidden_states(batch["input_ids"], packed_attention_mask(batch),
                                 position_ids=batch["position_ids"])  # (B, T, C)
    # Every answer token, found on the CPU at collate time: nonzero here would make the host wait for
    # the GPU, which must first finish the forward just queued, to learn N.
    rows, cols = batch["label_rows"], batch["label_cols"]  # (N,) each
    rejected_start = (prompt + chosen)[rows]  # (N,) the column of each token's row where rejected begins
    # A token is predicted by the column before it, except the first rejected token: by the prompt's last.
    predictor = torch.where(cols == rejected_start, prompt[rows] - 1, cols - 1)  # (N,)
    chunk = CHECKPOINT_LOGITS_CHUNK if model.gradient_checkpointing else None
    token_logps = token_logprobs(hidden[rows, predictor], model.lm_head.weight,
                                 batch["labels"][rows, cols], chunk_size=chunk)  # (N,)
    B = hidden.shape[0]
    answer = rows + B * (cols >= rejected_start)  # (N,) 0..B-1 chosen answers, B..2B-1 rejected ones
    sums = torch.zeros(2 * B, dtype=torch.float32, device=hidden.device).index_add(0, answer, token_logps)
    # Tokens per answer: every answer token is labelled, so these are the answer lengths (bincount of
    # `answer` would give the same, after a host sync). clamp: avoid 0/0 for an empty answer.
    counts = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]]).clamp(min=1)  # (2B,)
    chosen_sum, rejected_sum = sums.chunk(2)
    chosen_mean, rejected_mean = (sums / counts).chunk(2)
    return chosen_sum, rejected_sum, chosen_mean, rejected_mean


def packed_rewards(reward_model, batch: dict):
    """One forward over the packed rows -> (chosen, rejected) rewards, each (B,) fp32, read at each
    answer's last token. The same numbers as RewardModel.forward on the [2B, T] layout."""
    prompt, chosen, rejected = batch["prompt_lengths"], batch["chosen_lengths"], batch["rejected_lengths"]
    last_chosen = prompt + chosen - 1  # (B,) the prompt's last token if the answer is empty, as unpacked
    last_rejected = torch.where(rejected > 0, prompt + chosen + rejected - 1, prompt - 1)  # (B,)
    rewards = reward_model.rewards_at(batch["input_ids"], packed_attention_mask(batch),
                                      torch.stack([last_chosen, last_rejected], dim=-1),
                                      position_ids=batch["position_ids"])  # (B, 2)
    return rewards[:, 0], rewards[:, 1]
