"""Per-sequence log-probabilities of labelled response tokens.

DPO and SimPO compare how likely a model finds two responses. Both need, for each
row of a batch, the sum of log p(token | everything before it) over the response
tokens only, and its mean per scored token (SimPO's length-normalised score).

Labels are aligned with input_ids: labels[b, t] is the token at position t where that
position is scored, and IGNORE_INDEX where it is not (prompt and padding). A causal LM's
logits at position t predict token t+1, so both functions shift internally:
logits[:, :-1] are scored against labels[:, 1:].

The log-probability of one token is   log p(y) = z_y - logsumexp(z)   where z are the
logits. Writing it that way (instead of log_softmax followed by gather) avoids keeping
a second vocabulary-sized [*, V] tensor of log-probabilities. (bf16 logits still get one
fp32 copy for logsumexp; the hidden-state path below limits that copy to scored positions.)

Entry points:
  sequence_logprobs(logits, labels)                     from full logits [B, T, V]
  sequence_logprobs_from_hidden(hidden, weight, labels) from final hidden states; only the
      labelled positions are projected onto the vocabulary, which is where most of the
      memory of a full [B, T, V] logits tensor goes (V is ~150k for Qwen). Training uses this one;
      it computes z_y - logsumexp(z) as minus the fused cross-entropy (token_logprobs).
  token_logprobs(hidden, weight, targets)               the same for N gathered positions, for
      layouts where the predicting position is not simply the previous column (packing.py).

Shape legend: B batch, T time, C hidden size, V vocabulary, N labelled positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# The one value that marks a position as "not scored" (same convention as
# torch.nn.functional.cross_entropy's default ignore_index).
IGNORE_INDEX = -100
# With gradient checkpointing on, the vocabulary projection too is done this many positions at
# a time and recomputed in backward. Otherwise its (N, V) logits would outweigh the checkpointed
# layers: 1024 scored positions x V = 152k in fp32 are 622 MB per copy, and backward holds ~3.
CHECKPOINT_LOGITS_CHUNK = 256


def _shift(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for next-token prediction: returns (targets [B, T-1], mask [B, T-1])."""
    targets = labels[:, 1:]                      # (B, T-1): token t+1 is predicted at t
    mask = targets != IGNORE_INDEX               # (B, T-1) bool
    return targets, mask


def _reduce(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and mean over scored tokens of each row; rows with no scored token give 0, not NaN."""
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))  # (B, T-1)
    logps_sum = token_logps.sum(dim=-1)                                         # (B,)
    n_tokens = mask.sum(dim=-1).clamp(min=1)                                    # (B,) avoid 0/0
    return logps_sum, logps_sum / n_tokens


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and per-token mean of log p(label) over the labelled positions of each row.

    Args:
        logits: [B, T, V] any float dtype; logits[:, t] predict the token at t+1.
        labels: [B, T] long, aligned with input_ids; IGNORE_INDEX marks unscored positions.
    Returns:
        (logps_sum [B], logps_mean [B]), both float32. A row with no labelled token gets 0.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    targets, mask = _shift(labels)
    logits = logits[:, :-1]                                   # (B, T-1, V)
    safe_targets = targets.masked_fill(~mask, 0)              # gather needs a valid index everywhere
    # Picking one logit and casting it is exact, so gather in the input dtype: no [*, V] copy.
    target_logits = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1).float()  # (B, T-1)
    # logsumexp in fp32 on purpose: in bf16 (8 mantissa bits) the sum over ~150k exponentials
    # and the difference z_y - logsumexp lose about 2-3 decimal digits per token, and DPO
    # then subtracts sums of hundreds of such numbers.
    log_normaliser = torch.logsumexp(logits.float(), dim=-1)  # (B, T-1)
    return _reduce(target_logits - log_normaliser, mask)


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for N positions: hidden [N, C], weight [V, C], targets [N] -> [N] float32."""
    logits = F.linear(hidden, weight)                         # (N, V) in the hidden dtype, like the LM head
    # z_y - logsumexp(z) is exactly minus the cross-entropy of target y. F.cross_entropy computes it
    # with one fused log_softmax and gets a fused backward (softmax - one-hot), where logsumexp
    # + gather take ~6 passes over the (N, V) logits and allocate ~2x more (N, V) temporaries:
    # ~1.5x faster forward + backward on CPU at V = 152k. fp32, as in sequence_logprobs.
    return -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log p(target) of N tokens from the hidden states that predict them.

    Args:
        hidden: [N, C] final hidden states (after the final norm), one per predicted token.
        weight: [V, C] the LM head (or tied embedding) weight, same dtype as hidden.
        targets: [N] long, the token each hidden state predicts.
        chunk_size: if given, project at most this many positions at a time and recompute
            each chunk's logits in the backward pass, so peak memory is O(chunk_size * V)
            instead of O(N * V). None: one projection of all N positions.
        labelled: (rows [N], cols [N]) of the labelled tokens (col >= 1), as collate.labelled_positions
            finds them on the CPU; None: found here with nonzero, which waits for the GPU (N sizes a tensor).
    Returns:
        [N] float32.
    """
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


def sequence_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as sequence_logprobs(hidden @ weight.T, labels), projecting only labelled positions.

    Args:
        hidden: [B, T, C] final hidden states (after the final norm).
        weight: [V, C] the LM head (or tied embedding) weight, same dtype as hidden.
        labels: [B, T] long, aligned with input_ids; IGNORE_INDEX marks unscored positions.
        chunk_size: if given, project at most this many positions at a time and recompute
            each chunk's logits in the backward pass, so peak memory is O(chunk_size * V)
            instead of O(N * V). None: one projection of all N positions.
        labelled: (rows [N], cols [N]) of the labelled tokens (col >= 1), as collate.labelled_positions
            finds them on the CPU; None: found here with nonzero, which waits for the GPU (N sizes a tensor).
    Returns:
        (logps_sum [B], logps_mean [B]), both float32. A row with no labelled token gets 0.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"expected hidden [B, T, C], weight [V, C], labels [B, T]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    targets, mask = _shift(labels)                            # (B, T-1) each
    if labelled is None:
        rows, cols = mask.nonzero(as_tuple=True)              # (N,) each: the labelled positions, row-major
    else:
        rows, cols = labelled[0], labelled[1] - 1             # (N,) each: the same, in targets' columns
    selected = hidden[rows, cols]                             # (N, C) hidden states that predict a label
    token_logps = token_logprobs(selected, weight, targets[rows, cols], chunk_size)  # (N,)

    batch = hidden.shape[0]
    # Scatter-add each token's log-prob into its row: (N,) -> (B,).
    logps_sum = torch.zeros(batch, dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    n_tokens = mask.sum(dim=-1).clamp(min=1)                  # (B,) avoid 0/0 for rows with no label
    return logps_sum, logps_sum / n_tokens
