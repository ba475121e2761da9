"""Prefix sharing (packing.py) against the unpacked [2B, T] path it replaces: the same log-probs,
rewards, losses and gradients of every parameter; the mask against a slow per-token reference;
the position ids against the unpacked rows' positions."""
import os
import random
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import minialign.packing as packing
from minialign.collate import TokenizedPair
from minialign.dpo import dpo_loss, simpo_loss
from minialign.reward import bradley_terry_loss
from minialign.model import CausalLM, RewardModel, positions_from_mask
from minialign.packing import (CHOSEN, IGNORE_INDEX, PADDING, PROMPT, REJECTED, PairBatch, collate_packed, collate_pairs, packed_attention_mask,
                               answer_logps, packed_position_ids, pair_rewards, segment_ids)
from test_model import ARCHS, tiny_config

I = IGNORE_INDEX
SHARED = Path(os.environ.get("MINIALIGN_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
QWEN3_DIR = SHARED / "data" / "qwen3-tokenizer"
HH_FILE = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
# (prompt, chosen, rejected) lengths: a one-token chosen, a one-token rejected, answers of equal
# length, a one-token prompt, and the longest row (17), which fills the padded width exactly.
LENGTHS = [(5, 1, 4), (2, 6, 1), (4, 3, 3), (1, 2, 5), (7, 4, 6)]


def random_pairs(lengths=LENGTHS, seed=0, vocab=101):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r), line=i + 1) for i, (p, c, r) in enumerate(lengths)]


def perturbed(model, seed):
    """Larger weights than the init, so that a leak through the mask or a wrong position shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    return model


# ------------------------------------------------------------------ layout

def test_collate_packed_exact_tensors():
    """Rows [prompt | chosen | rejected], right-padded with pad id 0 to T = 9; the rejected answer's
    positions restart at the prompt's end (3 for pair 0, 1 for pair 1)."""
    pairs = [TokenizedPair([5, 6, 7], [8, 2], [9, 10, 11, 2]), TokenizedPair([5], [12, 2], [13, 2])]
    b = collate_packed(pairs, pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 2, 9, 10, 11, 2], [5, 12, 2, 13, 2, 0, 0, 0, 0]]
    assert b.labels.tolist() == [[I, I, I, 8, 2, 9, 10, 11, 2], [I, 12, 2, 13, 2, I, I, I, I]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 6], [0, 1, 2, 1, 2, 5, 6, 7, 8]]
    assert b.prompt_lengths.tolist() == [3, 1] and b.chosen_lengths.tolist() == [2, 2]
    assert b.rejected_lengths.tolist() == [4, 2] and b.lengths.tolist() == [9, 5]
    assert b.packed and b.attention_mask is None  # a 2-D padding mask would let rejected see chosen
    assert all(t.dtype == torch.long for t in (b.input_ids, b.labels, b.position_ids, b.lengths, b.prompt_lengths, b.label_rows))
    assert collate_packed(pairs, 0, pad_to_multiple_of=8).input_ids.shape == (2, 16)


def test_collate_packed_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="line 4 has an empty prompt"):
        collate_packed([TokenizedPair([], [1], [2], line=4)], 0)
    with pytest.raises(ValueError, match="no pairs"):
        collate_packed([], 0)


def slow_mask(P, C, R, T):
    """Per token, in words: a prompt token sees the prompt up to itself; an answer token sees the whole
    prompt and its own answer up to itself; a padding token sees the prompt, padding up to itself."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    part = [PROMPT] * P + [CHOSEN] * C + [REJECTED] * R + [PADDING] * (T - P - C - R)
    for q in range(T):
        for k in range(T):
            if part[k] == PROMPT:
                mask[q, k] = part[q] != PROMPT or k <= q
            elif part[k] == part[q]:
                mask[q, k] = k <= q
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_equals_per_token_reference(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (6, 3), generator=g)
    lengths[:, 0] += 1  # prompts are never empty (collate_packed refuses them); answers may be
    T = int(lengths.sum(-1).max()) + 2
    ids = torch.zeros(6, T, dtype=torch.long)
    batch = PairBatch(packed=True, input_ids=ids, labels=ids, lengths=lengths.sum(-1), label_rows=None,
                      label_cols=None, prompt_lengths=lengths[:, 0], chosen_lengths=lengths[:, 1],
                      rejected_lengths=lengths[:, 2])
    got = packed_attention_mask(batch)
    assert got.shape == (6, 1, T, T) and got.dtype == torch.bool
    for b, (P, C, R) in enumerate(lengths.tolist()):
        assert torch.equal(got[b, 0], slow_mask(P, C, R, T)), (P, C, R)
        assert got[b, 0].any(-1).all()  # every query sees at least one key: no NaN row
        assert segment_ids(*lengths[b:b + 1].unbind(-1), T)[0].tolist() == \
            [PROMPT] * P + [CHOSEN] * C + [REJECTED] * R + [PADDING] * (T - P - C - R)


def test_position_ids_equal_the_unpacked_rows_positions():
    pairs = random_pairs()
    packed, unpacked = collate_packed(pairs, 0), collate_pairs(pairs, 0)
    positions = positions_from_mask(unpacked.attention_mask, unpacked.input_ids.shape[1])  # (2B, T)
    B = len(pairs)
    for b, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        row = packed.position_ids[b]
        assert torch.equal(row[:P + C], positions[b, :P + C])  # prompt and chosen, as in row b
        assert torch.equal(row[P + C:P + C + R], positions[B + b, P:P + R])  # rejected, as in row B + b
    lengths = [torch.tensor([len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)]) for p in pairs]
    assert torch.equal(packed_position_ids(*torch.stack(lengths).unbind(-1), packed.input_ids.shape[1]),
                       packed.position_ids)


# ------------------------------------------------------------------ packed = unpacked

def assert_close_to_scale(got, want, name, tol=1e-5):
    """|got - want| <= tol x the largest |want|: a gradient summed over many tokens (entries up to ~100
    here) carries fp32 rounding of its own scale, so a per-entry relative test would fail on entries
    that cancel to near zero."""
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= tol * max(scale, 1.0), (name, scale)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def dpo_losses(chosen, rejected, chosen_mean, rejected_mean, ref_chosen, ref_rejected):
    """Every loss built on the log-probs: DPO (sigmoid and IPO), SimPO and RPO's NLL term, mixed."""
    sigmoid, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, loss_type="sigmoid")
    ipo, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, loss_type="ipo")
    simpo, _, _ = simpo_loss(chosen_mean, rejected_mean, beta=2.0, gamma=0.5)
    return torch.stack([sigmoid, 0.1 * ipo, simpo, -chosen_mean])  # (4, B)


@pytest.mark.parametrize("arch,over", ARCHS)
@pytest.mark.parametrize("ckpt", [False, True])
def test_packed_dpo_equals_unpacked(arch, over, ckpt, monkeypatch):
    """Log-prob sums and means, the reference's, every loss and every parameter's gradient: packed
    rows against the [2B, T] layout's reading (answer_logps of collate_pairs' batch), within 1e-5 (gradients: 1e-5 of each
    gradient's largest entry). With checkpointing the vocabulary projection is chunked too, 3
    positions at a time so that chunks split answers."""
    monkeypatch.setattr(packing, "CHECKPOINT_LOGITS_CHUNK", 3)
    policy = perturbed(CausalLM(tiny_config(arch, **over)), seed=1).train()
    reference = perturbed(CausalLM(tiny_config(arch, **over)), seed=2).eval()
    policy.gradient_checkpointing = ckpt
    pairs = random_pairs(seed=3)
    packed, unpacked = collate_packed(pairs, 0, pad_to_multiple_of=8), collate_pairs(pairs, 0)

    results = []
    for logps, batch in ((answer_logps, packed), (answer_logps, unpacked)):
        policy.zero_grad()
        with torch.no_grad():
            ref = logps(reference, batch)
        out = logps(policy, batch)
        losses = dpo_losses(*out, ref[0], ref[1])
        (losses * torch.tensor([0.7, -1.3, 0.4, 2.1, -0.5])).sum().backward()  # arbitrary weights per pair
        results.append(([o.detach() for o in out + ref], losses.detach(), grads(policy)))
    (v_packed, l_packed, g_packed), (v_unpacked, l_unpacked, g_unpacked) = results
    for got, want, name in zip(v_packed, v_unpacked, ["chosen", "rejected", "chosen_mean", "rejected_mean",
                                                      "ref_chosen", "ref_rejected", "ref_chosen_mean",
                                                      "ref_rejected_mean"]):
        assert got.dtype == torch.float32 and got.shape == (len(pairs),)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(l_packed, l_unpacked, atol=1e-5, rtol=1e-5)
    assert g_packed.keys() == g_unpacked.keys() == {n for n, _ in policy.named_parameters()}
    for n in g_unpacked:
        assert_close_to_scale(g_packed[n], g_unpacked[n], n)


@pytest.mark.parametrize("arch,over", ARCHS + [("qwen2", {"num_hidden_layers": 0})])
@pytest.mark.parametrize("ckpt", [False, True])
def test_pair_rewards_equal_unpacked(arch, over, ckpt):
    """Rewards at each answer's last token, the Bradley-Terry loss and every parameter's gradient:
    packed rows (the last layer run at two positions per row) against RewardModel on the [2B, T]
    layout and against the full-width packed forward (every position through every layer)."""
    rm = perturbed(RewardModel(tiny_config(arch, **over)), seed=4).train()
    rm.gradient_checkpointing = ckpt
    pairs = random_pairs(seed=5)
    packed, unpacked = collate_packed(pairs, 0), collate_pairs(pairs, 0)
    B = len(pairs)

    def unpacked_rewards(model, batch):
        return model(batch.input_ids, batch.attention_mask).chunk(2)

    def full_width(model, batch):  # the slow way: all positions, then pick the two per row
        h = model.model(batch.input_ids, packed_attention_mask(batch), position_ids=batch.position_ids)
        P, C, R = batch.prompt_lengths, batch.chosen_lengths, batch.rejected_lengths
        rows = torch.arange(B)
        return model.score(h[rows, P + C - 1])[:, 0], model.score(h[rows, P + C + R - 1])[:, 0]

    results = []
    for read, batch in ((pair_rewards, packed), (unpacked_rewards, unpacked), (full_width, packed)):
        rm.zero_grad()
        chosen, rejected = read(rm, batch)
        losses = bradley_terry_loss(chosen, rejected, center_rewards_coef=0.1)[0]  # (B,)
        (losses * torch.tensor([0.7, -1.3, 0.4, 2.1, -0.5])).sum().backward()
        results.append((chosen.detach(), rejected.detach(), losses.detach(), grads(rm)))
    for other in results[1:]:
        for got, want in zip(results[0][:3], other[:3]):
            assert got.dtype == torch.float32 and got.shape == (B,)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert results[0][3].keys() == other[3].keys()
        for n in other[3]:
            assert_close_to_scale(results[0][3][n], other[3][n], n)


def test_empty_answer_reads_like_the_unpacked_row():
    """An empty answer (possible in hand-made pairs) scores 0 log-prob and its reward is read at the
    prompt's last token, as in the unpacked row."""
    rm = perturbed(RewardModel(tiny_config("qwen3")), seed=6).eval()
    lm = perturbed(CausalLM(tiny_config("qwen3")), seed=7).eval()
    pairs = random_pairs([(3, 0, 2), (4, 2, 0)], seed=8)
    packed, unpacked = collate_packed(pairs, 0), collate_pairs(pairs, 0)
    with torch.no_grad():
        for got, want in zip(pair_rewards(rm, packed), unpacked_rewards_of(rm, unpacked)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        chosen, rejected, chosen_mean, rejected_mean = answer_logps(lm, packed)
        sums, means = two_row_logps(lm, unpacked)
    assert chosen[0] == 0 and rejected[1] == 0 and chosen_mean[0] == 0 and rejected_mean[1] == 0
    torch.testing.assert_close(torch.cat([chosen, rejected]), sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([chosen_mean, rejected_mean]), means, atol=1e-5, rtol=1e-5)


def two_row_logps(lm, batch):
    """answer_logps of a [2B, T] batch as (sums (2B,), means (2B,)), chosen rows first."""
    chosen, rejected, chosen_mean, rejected_mean = answer_logps(lm, batch)
    return torch.cat([chosen, rejected]), torch.cat([chosen_mean, rejected_mean])


def unpacked_rewards_of(rm, batch):
    return rm(batch.input_ids, batch.attention_mask).chunk(2)


@pytest.mark.parametrize("breakage", ["rejected sees chosen", "rejected positions after chosen"])
def test_a_broken_layout_is_caught(breakage, monkeypatch):
    """The comparisons above can fail: let rejected tokens see the chosen answer, or number their
    positions on from the chosen answer's end, and the log-probs and rewards move far beyond 1e-5."""
    pairs = random_pairs(seed=9)
    packed, unpacked = collate_packed(pairs, 0), collate_pairs(pairs, 0)
    if breakage == "rejected sees chosen":  # plain causal attention over the whole row
        def leaky(batch):
            B, T = batch.input_ids.shape
            return torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
        monkeypatch.setattr(packing, "packed_attention_mask", leaky)
    else:
        T = packed.input_ids.shape[1]
        packed.position_ids = torch.arange(T).expand(len(pairs), T)
    lm = perturbed(CausalLM(tiny_config("qwen2")), seed=10).eval()
    rm = perturbed(RewardModel(tiny_config("qwen2")), seed=11).eval()
    with torch.no_grad():
        rejected = answer_logps(lm, packed)[1]
        want = two_row_logps(lm, unpacked)[0].chunk(2)[1]
        rejected_reward = pair_rewards(rm, packed)[1]
        want_reward = unpacked_rewards_of(rm, unpacked)[1]
    assert (rejected - want).abs().max() > 1e-3
    assert (rejected_reward - want_reward).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not (HH_FILE.is_file() and QWEN3_DIR.is_dir()), reason=f"shared data absent ({SHARED})")
def test_packed_equals_unpacked_on_real_pairs():
    """Real HH-RLHF pairs with the Qwen3 chat template (prompts of ~100 tokens, <|im_end|> closing each
    answer), a tiny random qwen3 over the real vocabulary: the same log-probs and rewards both ways."""
    from minialign.collate import tokenize_pairs
    from minialign.data import load_preferences
    from minialign.tokenizer import load_tokenizer

    tok = load_tokenizer(QWEN3_DIR)
    records, _ = load_preferences(str(HH_FILE))
    pairs, _ = tokenize_pairs(tok, random.Random(0).sample(records, 6), max_length=512)
    packed, unpacked = collate_packed(pairs, tok.pad_token_id), collate_pairs(pairs, tok.pad_token_id)
    assert packed.input_ids.numel() < unpacked.input_ids.numel()
    lm = perturbed(CausalLM(tiny_config("qwen3", vocab_size=len(tok))), seed=13).eval()
    rm = perturbed(RewardModel(tiny_config("qwen3", vocab_size=len(tok))), seed=14).eval()
    with torch.no_grad():
        sums, means = two_row_logps(lm, unpacked)
        torch.testing.assert_close(torch.stack(answer_logps(lm, packed)),
                                   torch.stack([*sums.chunk(2), *means.chunk(2)]), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(torch.stack(pair_rewards(rm, packed)), torch.stack(unpacked_rewards_of(rm, unpacked)),
                                   atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the attention kernel

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_packed_path_runs_on_a_fused_attention_kernel(device):
    """SDPA with the packed mask (additive, built once per forward: model.additive_mask) and grouped
    heads: on CPU the flash kernel takes it (forward and backward); on CUDA the memory-efficient or
    cuDNN kernel must (model.attend repeats the key/value heads for it). Excluding the math kernel
    makes a fallback an error instead of a silent slowdown. Marked cuda on CUDA, so that
    `pytest -m cuda` (bench/gpu_check.py) runs it."""
    fused = [SDPBackend.FLASH_ATTENTION] if device == "cpu" else [SDPBackend.EFFICIENT_ATTENTION,
                                                                   SDPBackend.CUDNN_ATTENTION]
    pairs = random_pairs(seed=12)
    batch = collate_packed(pairs, 0, pad_to_multiple_of=8).to(device)
    for model in (CausalLM(tiny_config("qwen2")), RewardModel(tiny_config("qwen2"))):
        model.to(device).train()
        with sdpa_kernel(fused):
            out = answer_logps(model, batch) if isinstance(model, CausalLM) else pair_rewards(model, batch)
            sum(o.sum() for o in out).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
