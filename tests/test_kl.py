"""The KL of a policy from its base on the policy's own answers (minialign.evaluation): teacher-forced
log-probs against a hand-built model and a slow one-row-at-a-time implementation, the invariant
"a policy equal to its base drifts 0", the estimator's arithmetic by hand; and generation's
keep_eos, which tells which stop token an answer chose."""
import math

import pytest
import torch
from torch import nn

from minialign.eval_models import answer_logprobs, scored_answer_ids
from minialign.evaluation import sampled_kl
from minialign.generate import generate_tokens
from test_generate import tiny_lm


class ConstantLM(nn.Module):
    """A 'model' whose next-token distribution is softmax(logits) at every position, whatever the
    input: hidden states are all ones (C = 1) and the LM head's weight column is the logits."""

    def __init__(self, logits):
        super().__init__()
        self.lm_head = nn.Linear(1, len(logits), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.tensor(logits, dtype=torch.float32)[:, None])

    def hidden_states(self, input_ids, attention_mask):
        return torch.ones(*input_ids.shape, 1)  # (B, T, 1)


def test_log_ratio_by_hand():
    """Policy p = (1/2, 1/4, 1/4) over 3 tokens at every position, base uniform (1/3 each).
    Answer [0, 1] after prompt [2]: log(1/2 / 1/3) + log(1/4 / 1/3) = log 1.5 + log 0.75 = log 1.125.
    Answer [2] (a one-token answer: the stop token) after prompt [1, 1]: log 0.75.
    Per token: (log 1.125 + log 0.75) / 3; per answer: (log 1.125 + log 0.75) / 2."""
    policy = ConstantLM([math.log(0.5), math.log(0.25), math.log(0.25)])
    base = ConstantLM([0.0, 0.0, 0.0])
    prompts, answers = [[2], [1, 1]], [[0, 1], [2]]
    lp = answer_logprobs(policy, prompts, answers, pad_token_id=0)
    lb = answer_logprobs(base, prompts, answers, pad_token_id=0)
    assert lp == pytest.approx([math.log(0.5 * 0.25), math.log(0.25)], abs=1e-6)
    assert lb == pytest.approx([2 * math.log(1 / 3), math.log(1 / 3)], abs=1e-6)
    kl = sampled_kl(lp, lb, [len(a) for a in answers], n_resamples=50)
    total = math.log(1.125) + math.log(0.75)
    assert kl["kl_per_token"] == pytest.approx(total / 3, abs=1e-6)
    assert kl["kl_per_answer"] == pytest.approx(total / 2, abs=1e-6)
    assert (kl["answers"], kl["tokens"], kl["negative_share"]) == (2, 3, 0.5)


def test_policy_equal_to_base_drifts_exactly_zero():
    """Invariant: the same model as policy and base gives log-ratio 0 on every answer, exactly (the
    same computation twice on the same rows)."""
    m = tiny_lm(40, seed=4).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    answers, finished = generate_tokens(m, prompts, eos_token_ids=[3], pad_token_id=0, max_new_tokens=6,
                                        temperature=1.0, seed=1, keep_eos=True)
    lp = answer_logprobs(m, prompts, answers, pad_token_id=0)
    kl = sampled_kl(lp, answer_logprobs(m, prompts, answers, pad_token_id=0), [len(a) for a in answers],
                    n_resamples=20)
    assert kl["kl_per_token"] == 0.0 and kl["kl_per_answer"] == 0.0 and kl["kl_per_token_ci95"] == (0.0, 0.0)


def test_batched_log_probs_equal_a_slow_row_by_row_sum():
    """Right-padded rows of different lengths, projected only where labelled, equal the textbook
    sum over answer positions of log_softmax(full logits) computed one unpadded row at a time."""
    m = tiny_lm(40, seed=5).eval()
    prompts, answers = [[5, 6, 7], [8], [10, 11, 12, 13, 14]], [[20, 21], [22, 23, 24, 25], [26]]
    fast = answer_logprobs(m, prompts, answers, pad_token_id=0)
    for p, a, got in zip(prompts, answers, fast):
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logps = torch.log_softmax(m(ids, torch.ones_like(ids)).float(), dim=-1)[0]  # (T, V)
        slow = sum(float(logps[len(p) - 1 + t, tok]) for t, tok in enumerate(a))  # position t-1 predicts token t
        assert got == pytest.approx(slow, abs=1e-5)


def test_estimator_by_hand_and_per_prompt_resampling():
    """l = (1, 0, 2, -1) over n = (1, 2, 3, 2) tokens: per token 2 / 8 = 0.25, per answer 0.5, one
    negative of four. With 2 answers per prompt the prompts are (1, 0) and (2, -1): every bootstrap
    resample takes both answers of a prompt, so per-token values are 1/3 (first prompt twice),
    1/5 (second twice) or 2/8; the interval lies within [1/5, 1/3]."""
    kl = sampled_kl([-1.0, -2.0, -3.0, -4.0], [-2.0, -2.0, -5.0, -3.0], [1, 2, 3, 2], samples_per_prompt=2,
                    n_resamples=200)
    assert kl["kl_per_token"] == pytest.approx(0.25) and kl["kl_per_answer"] == pytest.approx(0.5)
    assert kl["negative_share"] == 0.25
    lo, hi = kl["kl_per_token_ci95"]
    assert 1 / 5 - 1e-12 <= lo <= 0.25 <= hi <= 1 / 3 + 1e-12


def test_scored_answer_ids_append_the_stop_token_chosen():
    assert scored_answer_ids([[4, 5], [6], []], [True, False, True], [2, None, 7]) == [[4, 5, 2], [6], [7]]


def test_keep_eos_returns_the_stop_token_it_ended_on():
    """keep_eos changes nothing but the end of finished rows: the same tokens, plus the EOS id that
    stopped each (either of two EOS ids); unfinished rows are unchanged."""
    m = tiny_lm(50, seed=2)
    prompts = [[5, 6, 7, 8], [9, 10], [11]]
    free, _ = generate_tokens(m, prompts, eos_token_ids=[], pad_token_id=0, max_new_tokens=8)
    eos = [free[0][2], free[1][4]]
    out, finished = generate_tokens(m, prompts, eos_token_ids=eos, pad_token_id=0, max_new_tokens=8)
    kept, finished_kept = generate_tokens(m, prompts, eos_token_ids=eos, pad_token_id=0, max_new_tokens=8,
                                          keep_eos=True)
    assert finished == finished_kept and finished[0] and finished[1]
    for o, k, f in zip(out, kept, finished):
        assert k == (o + [k[-1]] if f else o)
        if f:
            assert k[-1] in eos
