"""Sequence log-probs checked against a slow per-token loop in float64, and the hidden-state
path training uses (packing.sequence_logprobs_from_hidden: only the labelled positions are
projected onto the vocabulary) checked against the textbook full-logits formula below (values
and gradients)."""
import math

import pytest
import torch

from minialign.packing import IGNORE_INDEX, sequence_logprobs_from_hidden


def sequence_logprobs(logits, labels):
    """The textbook formula on full logits [B, T, V]: log p(y_t) = z_y - logsumexp(z) at every
    position t - 1 whose next label is scored, summed per row and averaged per scored token (0 for
    a row with none). logsumexp in fp32: in bf16 the sum over V exponentials loses 2-3 digits."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    targets = labels[:, 1:]                                    # (B, T-1): token t+1 is predicted at t
    mask = targets != IGNORE_INDEX                             # (B, T-1)
    logits = logits[:, :-1]                                    # (B, T-1, V)
    picked = logits.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1).float()  # (B, T-1)
    token_logps = torch.where(mask, picked - torch.logsumexp(logits.float(), dim=-1), 0.0)   # (B, T-1)
    logps_sum = token_logps.sum(dim=-1)                        # (B,)
    return logps_sum, logps_sum / mask.sum(dim=-1).clamp(min=1)


def reference_logprobs(logits, labels):
    """Slow, obvious version: loop over rows and positions, log_softmax in float64."""
    batch, time, _ = logits.shape
    sums, means = [], []
    for b in range(batch):
        total, count = 0.0, 0
        for t in range(time - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            total += torch.log_softmax(logits[b, t].double(), dim=-1)[target].item()
            count += 1
        sums.append(total)
        means.append(total / count if count else 0.0)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)


def make_batch(seed=0, batch=3, time=7, vocab=11, hidden=5):
    """Random hidden states, head weight and labels: prompt positions and right padding ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, time, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g)
    labels = torch.randint(0, vocab, (batch, time), generator=g)
    labels[0, :2] = IGNORE_INDEX                 # 2-token prompt
    labels[1, :3] = IGNORE_INDEX                 # 3-token prompt ...
    labels[1, 5:] = IGNORE_INDEX                 # ... and 2 pad positions
    labels[2, :1] = IGNORE_INDEX
    return h, w, labels


def test_matches_per_token_loop():
    h, w, labels = make_batch()
    logits = h @ w.T
    got_sum, got_mean = sequence_logprobs(logits, labels)
    want_sum, want_mean = reference_logprobs(logits, labels)
    assert got_sum.dtype == torch.float32 and got_mean.dtype == torch.float32
    torch.testing.assert_close(got_sum.double(), want_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_mean.double(), want_mean, atol=1e-5, rtol=1e-5)


def test_uniform_logits_hand_value():
    """All-zero logits over V=4 give log(1/4) per scored token.

    labels [x, -100, 1, 2]: targets after the shift are [-100, 1, 2] -> 2 scored tokens,
    sum = 2 * log(1/4) = -2.7725887, mean = log(1/4) = -1.3862944.
    """
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[3, IGNORE_INDEX, 1, 2]])
    logps_sum, logps_mean = sequence_logprobs(logits, labels)
    assert logps_sum.item() == pytest.approx(2 * math.log(0.25), abs=1e-6)
    assert logps_mean.item() == pytest.approx(math.log(0.25), abs=1e-6)


def test_first_label_is_never_scored():
    """labels[:, 0] has no logit predicting it (the shift), so changing it changes nothing."""
    h, w, labels = make_batch(seed=1)
    logits = h @ w.T
    changed = labels.clone()
    changed[:, 0] = (changed[:, 0].clamp(min=0) + 1) % w.shape[0]
    for a, b in zip(sequence_logprobs(logits, labels), sequence_logprobs(logits, changed)):
        torch.testing.assert_close(a, b)


def test_ignored_positions_do_not_matter():
    """Logits at positions whose next label is IGNORE_INDEX may be anything, even huge."""
    h, w, labels = make_batch(seed=2)
    logits = h @ w.T
    noisy = logits.clone()
    ignored_next = labels[:, 1:] == IGNORE_INDEX           # (B, T-1)
    noisy[:, :-1][ignored_next] = 1e4
    noisy[:, -1] = -1e4                                    # the last position predicts nothing
    for a, b in zip(sequence_logprobs(logits, labels), sequence_logprobs(noisy, labels)):
        torch.testing.assert_close(a, b)


def test_row_without_labels_gives_zero_and_no_nan():
    h, w, labels = make_batch(seed=3)
    labels[1] = IGNORE_INDEX
    h.requires_grad_(True)
    logps_sum, logps_mean = sequence_logprobs(h @ w.T, labels)
    assert logps_sum[1].item() == 0.0 and logps_mean[1].item() == 0.0
    (logps_sum.sum() + logps_mean.sum()).backward()
    assert torch.isfinite(h.grad).all()
    assert h.grad[1].abs().sum().item() == 0.0              # the empty row gets no gradient
    hs, hm = sequence_logprobs_from_hidden(h.detach(), w, labels)
    assert hs[1].item() == 0.0 and hm[1].item() == 0.0


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
def test_from_hidden_equals_full_logits_values_and_grads(chunk_size):
    h, w, labels = make_batch(seed=4, batch=4, time=9, vocab=13, hidden=6)
    weights = torch.tensor([0.3, -1.2, 0.7, 2.0])           # arbitrary mix of both outputs

    def grads(fn):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logps_sum, logps_mean = fn(hh, ww)
        ((logps_sum * weights).sum() + (logps_mean * weights.flip(0)).sum()).backward()
        return logps_sum.detach(), logps_mean.detach(), hh.grad, ww.grad

    full = grads(lambda hh, ww: sequence_logprobs(hh @ ww.T, labels))
    fast = grads(lambda hh, ww: sequence_logprobs_from_hidden(hh, ww, labels, chunk_size=chunk_size))
    for a, b in zip(fast, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_logits_scored_in_fp32():
    """bf16 logits are cast (exactly) to fp32 before logsumexp, so the result matches the
    float64 reference on the same bf16 values to fp32 precision, not bf16 precision."""
    h, w, labels = make_batch(seed=5, vocab=1000, hidden=16)
    logits = (h @ w.T).bfloat16()
    got_sum, got_mean = sequence_logprobs(logits, labels)
    want_sum, want_mean = reference_logprobs(logits.double(), labels)
    assert got_sum.dtype == torch.float32
    torch.testing.assert_close(got_sum.double(), want_sum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_mean.double(), want_mean, atol=1e-4, rtol=1e-5)


def test_bf16_from_hidden_matches_bf16_full_logits():
    """Projection in bf16 (like the model's LM head), then fp32 scoring, on both paths."""
    h, w, labels = make_batch(seed=6, vocab=1000, hidden=16)
    hb, wb = h.bfloat16(), w.bfloat16()
    got_sum, got_mean = sequence_logprobs_from_hidden(hb, wb, labels)
    want_sum, want_mean = sequence_logprobs(hb @ wb.T, labels)
    assert got_sum.dtype == torch.float32
    # Same bf16 products either way; only the matmul's blocking may round differently.
    torch.testing.assert_close(got_sum, want_sum, atol=0.1, rtol=1e-2)
    torch.testing.assert_close(got_mean, want_mean, atol=0.02, rtol=1e-2)
    # And the bf16 answer is close to the fp32 one (a sanity bound on the whole pipeline).
    fp32_sum, _ = sequence_logprobs(h @ w.T, labels)
    assert (got_sum - fp32_sum).abs().max().item() < 0.5


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        sequence_logprobs_from_hidden(torch.zeros(2, 3, 4), torch.zeros(5, 3), torch.zeros(2, 3, dtype=torch.long))
