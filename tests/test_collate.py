"""Collation: hand-written tensors, the prompt-prefix property on real data with the real Qwen3
tokenizer, the truncation policy, and length-grouped batching (coverage and less padding)."""
import gzip
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from minialign.collate import (
    PairSkipped, TokenizedPair, collate_prompts,
    tokenize_pairs,
)
from minialign.data import LoadReport, PreferencePair
from minialign.packing import IGNORE_INDEX, collate_pairs
from minialign.tokenizer import load_tokenizer

I = IGNORE_INDEX
SHARED = Path(os.environ.get("MINIALIGN_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
QWEN3_DIR = SHARED / "data" / "qwen3-tokenizer"
HH_FILE = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
IM_END_TINY = 2  # <|im_end|> in the tiny tokenizer (see conftest)


def tokenize_one(tok, pair, **options):
    """One pair through tokenize_pairs, raising PairSkipped instead of dropping it."""
    return tokenize_pairs(tok, [pair], strict=True, **options)[0][0]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def pair(chosen="Paris.", rejected="I am fine", line=7):
    return PreferencePair(prompt=[{"role": "user", "content": "Hello!"}], chosen=chosen, rejected=rejected, line=line)


# ------------------------------------------------------------------ one pair

def test_tokenize_pair_splits_prompt_and_answers(tok):
    """Written out: the prompt ends with the generation prompt; each answer is its text's tokens
    followed by <|im_end|> (labelled), and the template's trailing "\\n" is cut off."""
    tp = tokenize_one(tok, pair())
    assert tp.prompt_ids == tok.encode("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    assert tp.chosen_ids == tok.encode("Paris.") + [IM_END_TINY]
    assert tp.rejected_ids == tok.encode("I am fine") + [IM_END_TINY]
    assert tp.line == 7 and not tp.prompt_truncated and not tp.prompt_mostly_cut
    assert tp.length == len(tp.prompt_ids) + len(tp.rejected_ids)


def test_tokenized_batch_labels_answers_and_im_end(tok):
    pairs, stats = tokenize_pairs(tok, [pair(), pair("Two plus two is four.", "No.", line=8)])
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert stats.kept == 2 and batch.input_ids.shape[0] == 4
    for r in range(4):
        n = int(batch.lengths[r])
        labelled = batch.labels[r][batch.labels[r] != I].tolist()
        assert batch.labels[r, n - 1] == IM_END_TINY  # the last real token is <|im_end|>, labelled
        assert tok.decode(labelled) == ["Paris.", "Two plus two is four.", "I am fine", "No."][r] + "<|im_end|>"
        assert tok.decode(batch.input_ids[r, :n].tolist()).endswith("<|im_end|>")


# ------------------------------------------------------------------ collate_pairs / collate_prompts

HAND_PAIRS = [TokenizedPair([5, 6, 7], [8, 2], [9, 10, 11, 2], line=1), TokenizedPair([5], [12, 2], [13, 2], line=2)]


def test_collate_pairs_exact_tensors():
    """Rows: chosen 0, chosen 1, rejected 0, rejected 1; right-padded with pad id 0 to T = 7."""
    b = collate_pairs(HAND_PAIRS, pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 2, 0, 0], [5, 12, 2, 0, 0, 0, 0],
                                       [5, 6, 7, 9, 10, 11, 2], [5, 13, 2, 0, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0],
                                            [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]]
    assert b.labels.tolist() == [[I, I, I, 8, 2, I, I], [I, 12, 2, I, I, I, I],
                                    [I, I, I, 9, 10, 11, 2], [I, 13, 2, I, I, I, I]]
    assert b.lengths.tolist() == [5, 3, 7, 3]
    assert all(t.dtype == torch.long for t in (b.input_ids, b.attention_mask, b.labels, b.lengths, b.label_rows, b.label_cols))


def test_collate_pairs_pad_to_multiple_of():
    """T = 7 rounds up to 8: one more column of pad, mask 0, IGNORE_INDEX; lengths unchanged."""
    b = collate_pairs(HAND_PAIRS, pad_token_id=99, pad_to_multiple_of=4)
    assert b.input_ids.shape == (4, 8)
    assert b.input_ids[:, 7].tolist() == [99] * 4 and b.input_ids[1].tolist() == [5, 12, 2] + [99] * 5
    assert b.attention_mask[:, 7].tolist() == [0] * 4 and b.labels[:, 7].tolist() == [I] * 4
    assert b.lengths.tolist() == [5, 3, 7, 3]
    assert collate_pairs(HAND_PAIRS, 0, pad_to_multiple_of=7).input_ids.shape == (4, 7)


def test_collate_prompts_left_pads():
    b = collate_prompts([[5, 6, 7], [8]], pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_empty_is_an_error():
    with pytest.raises(ValueError, match="no pairs"):
        collate_pairs([], 0)
    with pytest.raises(ValueError, match="no prompts"):
        collate_prompts([], 0)


# ------------------------------------------------------------------ truncation policy

def test_prompt_keeps_its_end(tok):
    full = tokenize_one(tok, pair())
    tp = tokenize_one(tok, pair(), max_prompt_length=3)
    assert tp.prompt_ids == full.prompt_ids[-3:] and tp.prompt_truncated
    assert tp.chosen_ids == full.chosen_ids and tp.rejected_ids == full.rejected_ids


def test_over_length_drop_is_counted(tok):
    full = tokenize_one(tok, pair())
    assert tokenize_one(tok, pair(), max_length=full.length).length == full.length  # exactly fits: kept
    with pytest.raises(PairSkipped, match="line 7: over_length"):
        tokenize_one(tok, pair(), max_length=full.length - 1, truncation="drop")
    report = LoadReport(path="pairs.jsonl", format="test", read=2, kept=2)
    short = pair("a", "b", line=8)  # one byte token + <|im_end|> each: shorter than "I am fine"
    kept, stats = tokenize_pairs(tok, [pair(), short], max_length=full.length - 1, report=report, truncation="drop")
    assert [p.line for p in kept] == [8] and stats.dropped == {"over_length": 1}
    assert report.kept == 1 and report.skipped == {"over_length": 1} and report.examples[0][:2] == (7, "over_length")
    assert "over_length 1" in stats.summary()


def test_keep_end_cuts_the_prompts_start_never_an_answer(tok):
    """Over max_length by 2 tokens, the prompt loses its first 2 tokens; both answers stay whole
    and keep their <|im_end|>, where a reward is read and where DPO learns to stop."""
    full = tokenize_one(tok, pair())
    max_length = full.length - 2
    kept, stats = tokenize_pairs(tok, [pair()], max_length=max_length, truncation="keep_end")
    tp = kept[0]
    assert tp.prompt_ids == full.prompt_ids[2:] and tp.prompt_truncated and tp.length == max_length
    assert tp.chosen_ids == full.chosen_ids and tp.rejected_ids == full.rejected_ids
    assert tp.chosen_ids[-1] == IM_END_TINY and tp.rejected_ids[-1] == IM_END_TINY
    assert stats.prompt_truncated == 1 and stats.dropped == {}
    # The longer answer alone fills max_length: no room for a prompt token, so the pair is dropped.
    longer = max(len(full.chosen_ids), len(full.rejected_ids))
    _, stats = tokenize_pairs(tok, [pair()], max_length=longer, truncation="keep_end")
    assert stats.kept == 0 and stats.dropped == {"over_length": 1}


def test_most_prompts_mostly_cut_is_a_warning(tok):
    """Keeping 1 prompt token of many is < 1/4 of the prompt: counted, and warned about when most
    kept pairs are like that."""
    full = tokenize_one(tok, pair())
    longer = max(len(full.chosen_ids), len(full.rejected_ids))
    kept, stats = tokenize_pairs(tok, [pair()], max_length=longer + 1)
    assert len(kept[0].prompt_ids) == 1 and kept[0].prompt_mostly_cut and stats.prompt_mostly_cut == 1
    assert "warning: 1 of 1 pairs kept less than a quarter of their prompt" in stats.summary()
    _, fine = tokenize_pairs(tok, [pair()], max_length=full.length)
    assert fine.prompt_mostly_cut == 0 and "warning" not in fine.summary()


def test_truncation_options_are_checked(tok):
    with pytest.raises(ValueError, match="truncation='left'"):
        tokenize_one(tok, pair(), truncation="left")
    with pytest.raises(ValueError, match="max_prompt_length=8 must be below max_length=8"):
        tokenize_pairs(tok, [pair()], max_length=8, max_prompt_length=8)


# ------------------------------------------------------------------ the real Qwen3 tokenizer

needs_qwen3 = pytest.mark.skipif(not QWEN3_DIR.is_dir(), reason=f"shared Qwen3 tokenizer absent ({QWEN3_DIR})")


def _hh_pairs():
    """hh-rlhf read directly (independent of minialign.data): each transcript split at its last
    "\\n\\nAssistant:"; pairs whose histories differ or with an empty answer are left out."""
    pairs = []
    with gzip.open(HH_FILE, "rt") as f:
        for line, raw in enumerate(f, 1):
            rec = json.loads(raw)
            (hc, _, c), (hr, _, r) = (rec[k].rpartition("\n\nAssistant:") for k in ("chosen", "rejected"))
            if hc != hr or not c.strip() or not r.strip():
                continue
            turns = re.split(r"\n\n(Human|Assistant):", hc)[1:]  # [role, text, role, text, ...]
            prompt = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
                      for role, text in zip(turns[::2], turns[1::2])]
            pairs.append(PreferencePair(prompt, c.strip(), r.strip(), line))
    return pairs


@needs_qwen3
@pytest.mark.skipif(not HH_FILE.is_file(), reason=f"shared hh-rlhf data absent ({HH_FILE})")
def test_prefix_property_on_real_pairs_with_qwen3():
    """For ~2,300 real conversations: prompt tokens + answer tokens + "\\n" are exactly the tokens
    of the whole rendered conversation, and each answer decodes to its text + <|im_end|>."""
    qwen3 = load_tokenizer(QWEN3_DIR)
    pairs = _hh_pairs()
    assert len(pairs) > 2000
    kept, stats = tokenize_pairs(qwen3, pairs, strict=True)
    assert stats.kept == len(pairs) and stats.dropped == {}
    newline = qwen3.encode("\n")
    fulls = qwen3.encode_batch([qwen3.apply_chat_template(p.prompt + [{"role": "assistant", "content": p.chosen}])
                                for p in pairs])
    for p, tp, full in zip(pairs, kept, fulls):
        assert tp.prompt_ids + tp.chosen_ids + newline == full, p.line
        assert qwen3.decode(tp.chosen_ids) == p.chosen + "<|im_end|>", p.line
        assert qwen3.decode(tp.rejected_ids) == p.rejected + "<|im_end|>", p.line


@needs_qwen3
def test_not_prefix_is_reported():
    """Plain ChatML + an answer starting with "\\n": "assistant\\n" + "\\nHi" has "\\n\\n", one Qwen
    token, so the prompt's final "\\n" token is not in the full tokens."""
    qwen3 = load_tokenizer(QWEN3_DIR, chat_format="chatml")
    bad = pair(chosen="\nHi", line=3)
    with pytest.raises(PairSkipped, match="line 3: not_prefix"):
        tokenize_one(qwen3, bad)
    report = LoadReport(path="pairs.jsonl", format="test", read=2, kept=2)
    kept, stats = tokenize_pairs(qwen3, [bad, pair()], report=report)
    assert len(kept) == 1 and stats.dropped == {"not_prefix": 1} and report.skipped == {"not_prefix": 1}


# ------------------------------------------------------------------ length-grouped batches

def _skewed_lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [int(rng.lognormvariate(5, 0.8)) + 1 for _ in range(n)]
