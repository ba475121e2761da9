"""Batches of preference pairs, and the answers' log-probabilities and rewards read out of them.

A batch holds B pairs in one of two layouts (PairBatch.packed says which):

  two rows per pair (collate_pairs), the textbook layout: chosen and rejected rows stacked as one
      right-padded [2B, T] batch (rows 0..B-1 chosen, B..2B-1 rejected), so that both answers go
      through the model in one forward (one set of kernel launches, the same padding for both);
  one row per pair (collate_packed), prefix sharing, the trainers' default: [prompt | chosen |
      rejected], the prompt computed once. The rest of this docstring is about this layout.

The two-row layout runs every prompt twice, once before each answer, forward and backward, in
the policy and in the reference. Here each pair is one right-padded row, and the
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
(column P - 1). Only the predicting positions are projected onto the vocabulary (below).
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

Log-probabilities. DPO compares how likely a model finds two answers: log pi(y|x), the sum of
log p(token | everything before it) over the answer's tokens, and its mean per token (SimPO's
length-normalised score). The log-probability of one token is  log p(y) = z_y - logsumexp(z),
z the logits; it is computed as minus the fused cross-entropy of y (token_logprobs), in fp32,
for the N positions that predict an answer token only: the prompt and the padding never touch
the vocabulary projection, the largest matrix of the model (V ~ 150k for Qwen).

Shape legend: B pairs (one row each packed, two rows each otherwise), T padded row length,
C hidden size, V vocabulary, N answer tokens in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .collate import TokenizedPair

# The one value that marks a label position as "not scored" (torch.nn.functional.cross_entropy's
# default ignore_index): the prompt and the padding.
IGNORE_INDEX = -100
# What each column of a packed row holds (segment_ids).
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3
# With gradient checkpointing on, the vocabulary projection too is done this many positions at
# a time and recomputed in backward. Otherwise its (N, V) logits would outweigh the checkpointed
# layers: 1024 scored positions x V = 152k in fp32 are 622 MB per copy, and backward holds ~3.
CHECKPOINT_LOGITS_CHUNK = 256
CUDA_PAD_MULTIPLE = 8  # bf16 tensor cores work on multiples of 8 (and the mask's rows are then aligned already)


# ------------------------------------------------------------------------------ the batch

@dataclass
class PairBatch:
    """B preference pairs as long tensors, in one of the two layouts (module docstring).

    R rows: B packed, 2B otherwise (chosen rows 0..B-1, rejected rows B..2B-1)."""

    packed: bool                 # the layout: one row [prompt | chosen | rejected] per pair, or two rows
    input_ids: torch.Tensor      # (R, T) right-padded token ids
    labels: torch.Tensor         # (R, T) the answers' ids, IGNORE_INDEX on prompt and padding
    lengths: torch.Tensor        # (R,) real tokens per row
    label_rows: torch.Tensor     # (N,) every answer token's row and column (labelled_positions), found on
    label_cols: torch.Tensor     # (N,) the CPU: nonzero on a GPU would wait for the device to learn N
    attention_mask: torch.Tensor | None = None    # (2B, T) 1 on real tokens; two rows only
    position_ids: torch.Tensor | None = None      # (B, T) packed only (packed_position_ids)
    prompt_lengths: torch.Tensor | None = None    # (B,) packed only: the three segments of each row
    chosen_lengths: torch.Tensor | None = None    # (B,)
    rejected_lengths: torch.Tensor | None = None  # (B,)
    # Where the pairs come from (make_batch), for values computed per pair beforehand (DPO's
    # precomputed reference log-probs, dpo.PrecomputedReference): their split and indices in it.
    split: str | None = None
    pair_index: torch.Tensor | None = None        # (B,)

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] if self.packed else self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> torch.Tensor:
        """Real tokens in the batch, a 0-d tensor on the batch's device (no host sync)."""
        return self.lengths.sum()

    def to(self, device) -> PairBatch:
        """The same batch with every tensor on `device`. On CUDA each goes through pinned
        (page-locked) host memory, so that the copy is truly asynchronous: from pageable memory,
        the host would wait for it."""
        device = torch.device(device)

        def move(v):
            if not torch.is_tensor(v) or v.device == device:
                return v
            if device.type == "cuda" and v.device.type == "cpu":
                v = v.pin_memory()
            return v.to(device, non_blocking=True)
        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


def make_batch(items: list[TokenizedPair], indices: list[int], pad_id: int, split: str, device,
               packed: bool = False, pad_to_multiple_of: int | None = None) -> PairBatch:
    """The tokenized pairs `indices` of a split as one batch on the device, in either layout,
    naming where its pairs come from. The length is rounded up to pad_to_multiple_of, by default
    8 on CUDA (pad_multiple)."""
    batch = collate([items[i] for i in indices], pad_id, packed, pad_multiple(pad_to_multiple_of, device))
    batch = replace(batch, split=split, pair_index=torch.tensor(indices, dtype=torch.long))
    return batch.to(device)


def pad_multiple(asked: int | None, device) -> int | None:
    """The multiple batches are padded to: --pad_to_multiple_of if given, else 8 on CUDA (a packed
    row's mask would otherwise be padded to it inside SDPA, again in every layer), else none."""
    return asked or (CUDA_PAD_MULTIPLE if torch.device(device).type == "cuda" else None)


def collate(pairs: list[TokenizedPair], pad_token_id: int, packed: bool, pad_to_multiple_of: int | None = None) -> PairBatch:
    """The batch of either layout: one row per pair (prefix sharing) or chosen and rejected rows."""
    if packed:
        return collate_packed(pairs, pad_token_id, pad_to_multiple_of)
    return collate_pairs(pairs, pad_token_id, pad_to_multiple_of)


def padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    """T: the longest row, rounded up to a multiple of pad_to_multiple_of if given."""
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else longest


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int | None = None) -> PairBatch:
    """Right-pad B pairs into one batch of 2B rows [prompt | answer]: rows 0..B-1 chosen, B..2B-1
    rejected, with attention_mask (1 on real tokens)."""
    if not pairs:
        raise ValueError("collate_pairs: no pairs to collate")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    T = padded_length(max(len(prompt) + len(answer) for prompt, answer in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)     # (2B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)             # (2B, T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)        # (2B, T)
    lengths = torch.zeros(len(rows), dtype=torch.long)                         # (2B,)
    for r, (prompt, answer) in enumerate(rows):
        n, m = len(prompt), len(answer)
        input_ids[r, :n + m] = torch.tensor(prompt + answer, dtype=torch.long)
        attention_mask[r, :n + m] = 1
        labels[r, n:n + m] = torch.tensor(answer, dtype=torch.long)  # the prompt stays IGNORE_INDEX
        lengths[r] = n + m
    label_rows, label_cols = labelled_positions(labels)  # (N,) each
    return PairBatch(packed=False, input_ids=input_ids, labels=labels, lengths=lengths, label_rows=label_rows,
                     label_cols=label_cols, attention_mask=attention_mask)


def collate_packed(pairs: list[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int | None = None) -> PairBatch:
    """Right-pad B pairs into B rows [prompt | chosen | rejected | padding], with the position ids
    (packed_position_ids) and the three segment lengths. There is no 2-D attention_mask: it would
    let the rejected answer see the chosen one; the model gets packed_attention_mask(batch) instead."""
    if not pairs:
        raise ValueError("collate_packed: no pairs to collate")
    for p in pairs:
        if not p.prompt_ids:  # the first rejected token would have no position to be predicted from
            raise ValueError(f"collate_packed: the pair from line {p.line} has an empty prompt; "
                             "prefix sharing needs at least one prompt token (use collate_pairs)")
    T = padded_length(max(packed_length(p) for p in pairs), pad_to_multiple_of)
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
    return PairBatch(packed=True, input_ids=input_ids, labels=labels, lengths=prompt + chosen + rejected,
                     label_rows=label_rows, label_cols=label_cols,
                     position_ids=packed_position_ids(prompt, chosen, rejected, T),
                     prompt_lengths=prompt, chosen_lengths=chosen, rejected_lengths=rejected)


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N], cols [N]) of every labelled token that has a predecessor (col >= 1), row-major:
    the positions the log-probs are read at. Found at collate time, on the CPU, because on a GPU
    `nonzero` must wait for the device to learn N before the forward can go on."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,) each
    return rows, cols + 1


def row_length(pair: TokenizedPair, packed: bool) -> int:
    """Columns a pair needs in its batch: P + C + R packed, P + max(C, R) for two rows."""
    return packed_length(pair) if packed else pair.length


def packed_length(pair: TokenizedPair) -> int:
    """Columns this pair fills in a packed row: prompt + chosen + rejected."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


# ------------------------------------------------------------------- the packed row's geometry

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


def packed_attention_mask(batch: PairBatch):
    """Boolean (B, 1, T, T) mask of a packed batch: query t may see key s if s <= t and s is in the
    prompt or in t's own part (the diagram in the module docstring).

    Padding queries see the prompt, earlier padding and themselves (never nothing, which would give
    NaN); their outputs are unused. Real queries never see padding, which comes after them."""
    T = batch.input_ids.shape[1]
    segment = segment_ids(batch.prompt_lengths, batch.chosen_lengths, batch.rejected_lengths, T)  # (B, T)
    query, key = segment[:, :, None], segment[:, None, :]  # (B, T, 1), (B, 1, T)
    t = torch.arange(T, device=segment.device)
    causal = t[None, :] <= t[:, None]  # (T, T): key s at or before query t
    return (causal & ((key == query) | (key == PROMPT)))[:, None]  # (B, T, T) -> (B, 1, T, T)


# ------------------------------------------------------------- reading the answers back out

def answer_logps(model, batch: PairBatch):
    """One forward of a causal LM -> (chosen_sum, rejected_sum, chosen_mean, rejected_mean), (B,)
    each in fp32: log pi(answer | prompt) summed over the answer's tokens, and its mean per token.
    The two layouts give the same numbers to rounding (tests/test_packing.py)."""
    chunk = CHECKPOINT_LOGITS_CHUNK if model.gradient_checkpointing else None
    if not batch.packed:
        # Right padding: causal attention alone is exact for every real token (padding comes after
        # it), so no mask: SDPA's flash kernel, and no host sync to check the padding.
        hidden = model.hidden_states(batch.input_ids)  # (2B, T, C)
        logps_sum, logps_mean = sequence_logprobs_from_hidden(
            hidden, model.lm_head.weight, batch.labels, chunk, (batch.label_rows, batch.label_cols))  # (2B,) each
        return (*logps_sum.chunk(2), *logps_mean.chunk(2))
    prompt, chosen = batch.prompt_lengths, batch.chosen_lengths
    hidden = model.hidden_states(batch.input_ids, packed_attention_mask(batch),
                                 position_ids=batch.position_ids)  # (B, T, C)
    rows, cols = batch.label_rows, batch.label_cols  # (N,) each: every answer token
    rejected_start = (prompt + chosen)[rows]  # (N,) the column of each token's row where rejected begins
    # A token is predicted by the column before it, except the first rejected token: by the prompt's last.
    predictor = torch.where(cols == rejected_start, prompt[rows] - 1, cols - 1)  # (N,)
    token_logps = token_logprobs(hidden[rows, predictor], model.lm_head.weight,
                                 batch.labels[rows, cols], chunk_size=chunk)  # (N,)
    B = hidden.shape[0]
    answer = rows + B * (cols >= rejected_start)  # (N,) 0..B-1 chosen answers, B..2B-1 rejected ones
    sums = torch.zeros(2 * B, dtype=torch.float32, device=hidden.device).index_add(0, answer, token_logps)
    # Tokens per answer: every answer token is labelled, so these are the answer lengths (bincount of
    # `answer` would give the same, after a host sync). clamp: avoid 0/0 for an empty answer.
    counts = torch.cat([batch.chosen_lengths, batch.rejected_lengths]).clamp(min=1)  # (2B,)
    return (*sums.chunk(2), *(sums / counts).chunk(2))


def pair_rewards(reward_model, batch: PairBatch):
    """One forward of a reward model -> (chosen, rejected) rewards, (B,) each in fp32, read at each
    answer's last token (its end of turn). The two layouts give the same numbers to rounding."""
    if not batch.packed:
        # Causal attention alone is exact for right-padded rows (answer_logps); each reward is read
        # at its row's last real token, as RewardModel.forward reads it.
        last = batch.lengths - 1  # (2B,)
        return reward_model.rewards_at(batch.input_ids, None, last[:, None])[:, 0].chunk(2)  # (B,), (B,)
    prompt, chosen, rejected = batch.prompt_lengths, batch.chosen_lengths, batch.rejected_lengths
    last_chosen = prompt + chosen - 1  # (B,) the prompt's last token if the answer is empty, as unpacked
    last_rejected = torch.where(rejected > 0, prompt + chosen + rejected - 1, prompt - 1)  # (B,)
    rewards = reward_model.rewards_at(batch.input_ids, packed_attention_mask(batch),
                                      torch.stack([last_chosen, last_rejected], dim=-1),
                                      position_ids=batch.position_ids)  # (B, 2)
    return rewards[:, 0], rewards[:, 1]


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for N positions: hidden [N, C], weight [V, C], targets [N] -> [N] float32."""
    logits = F.linear(hidden, weight)                         # (N, V) in the hidden dtype, like the LM head
    # z_y - logsumexp(z) is exactly minus the cross-entropy of target y. F.cross_entropy computes it
    # with one fused log_softmax and gets a fused backward (softmax - one-hot), where logsumexp
    # + gather take ~6 passes over the (N, V) logits and allocate ~2x more (N, V) temporaries:
    # ~1.5x faster forward + backward on CPU at V = 152k. In fp32 on purpose: in bf16 (8 mantissa
    # bits) the sum over ~150k exponentials loses 2-3 decimal digits per token, and DPO then
    # subtracts sums of hundreds of such numbers.
    return -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """log p(target) of N tokens from the hidden states that predict them: hidden [N, C] (after the
    final norm), weight [V, C] (the LM head, same dtype), targets [N] long -> [N] float32.

    chunk_size: if given, project at most this many positions at a time and recompute each chunk's
    logits in the backward pass, so peak memory is O(chunk_size * V) instead of O(N * V)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    n = hidden.shape[0]
    if n == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if chunk_size is None:
        return _token_logps(hidden, weight, targets)
    # Without recomputation autograd would keep every chunk's [chunk, V] logits alive until
    # backward, and chunking would save nothing.
    return torch.cat([
        checkpoint(_token_logps, hidden[start:start + chunk_size], weight, targets[start:start + chunk_size],
                   use_reentrant=False)
        for start in range(0, n, chunk_size)
    ])  # (N,)


def sequence_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  chunk_size: int | None = None,
                                  labelled: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Per row of right-padded rows [prompt | answer]: (logps_sum [R], logps_mean [R]) in fp32 of the
    labelled tokens, projecting only the positions that predict one (hidden [R, T, C] after the final
    norm, weight [V, C], labels [R, T] with IGNORE_INDEX on unscored positions; a row with no
    labelled token gets 0). Token t is predicted at column t - 1. labelled: (rows, cols) [N] of the
    labelled tokens as labelled_positions finds them; None: found here with nonzero, which waits for
    the GPU. The full-logits formula it equals is tests/test_logprobs.py's reference."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"expected hidden [R, T, C], weight [V, C], labels [R, T]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    rows, cols = labelled if labelled is not None else labelled_positions(labels)  # (N,) each
    token_logps = token_logprobs(hidden[rows, cols - 1], weight, labels[rows, cols], chunk_size)  # (N,)
    R = hidden.shape[0]
    # Scatter-add each token's log-prob into its row: (N,) -> (R,).
    logps_sum = torch.zeros(R, dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1).clamp(min=1)  # (R,) avoid 0/0 for rows with no label
    return logps_sum, logps_sum / n_tokens
