"""From preference pairs to token ids: render with the chat template, tokenize, truncate.

A pair is one prompt and two answers. We render it with the chat template twice,

    prompt text = template(prompt, add_generation_prompt=True)   ends "<|im_start|>assistant\\n"
    full text   = template(prompt + [assistant: answer])          ends "answer<|im_end|>\\n"

tokenize both, and take the answer's tokens as everything after the prompt's tokens. That is
only right if the prompt's tokens are a *prefix* of the full tokens (BPE could merge across
the seam, e.g. when an answer starts with "\\n"), so we check it.

The answer's tokens end with the template's end-of-turn text (tokenizer.end_of_turn_ids:
<|im_end|> for ChatML, <|eot_id|> for Llama 3, </s> for Zephyr), which is labelled: the model
must learn to stop, and a generation stops there (it is an eos id). What the template writes
after it (ChatML's and Zephyr's "\\n") is cut off, not just left unlabelled: a generation never
produces it, so every training sequence ends exactly where a sampled answer ends, and a reward
model reads its score at the end-of-turn token in training and at inference alike.

Templates whose prompt is not a prefix of their own full rendering: DeepSeek-R1's generation
prompt ends "<｜Assistant｜><think>\\n", but its rendering of an answered conversation writes
"<｜Assistant｜>" + answer, with no "<think>" (and keeps only the text after the answer's last
"</think>"). Splitting that rendering after the prompt would label template text that is not
the answer, or cut into it. For such pairs (found by comparing strings, pair by pair) the full
text is built instead as

    full text = prompt text + answer + end-of-turn text

the sequence the model sees when it generates this answer from this prompt, so that training,
scoring (reward.conversation_ids) and generation agree. These pairs are counted
(TokenizeStats.from_generation_prompt) and the load report names the template. Templates that
rewrite *earlier* assistant turns (Qwen3 and DeepSeek-R1 drop their reasoning) rewrite them in
both renderings alike, so their prompt stays a prefix. If the tokens of the full text still do
not start with the prompt's tokens (a BPE merge across the seam), the pair is skipped as
not_prefix, with the template's name in the message.

Truncation policy (`max_prompt_length`, `max_length`, `truncation`), the same for the reward
model, DPO and scoring at evaluation: `evaluate.py rm` and `implicit` tokenize their pairs here,
with training's prompt budget, so they keep, cut and drop exactly what training does, and
reward.conversation_ids cuts a single (generated) answer's conversation by the same rules:
  * an answer is never cut: it always ends with its end-of-turn token, so a reward is always
    read at that token and DPO always learns where an answer stops;
  * a prompt longer than max_prompt_length keeps its last max_prompt_length tokens (the most
    recent turns matter most); counted as prompt_truncated;
  * if prompt + longer answer still exceeds max_length:
      truncation="keep_end" (default): the prompt's start is cut further, down to what fits
          beside the longer answer; a pair whose longer answer alone fills max_length is dropped
          ("over_length");
      truncation="drop": the pair is dropped ("over_length").
  * when most kept pairs lose more than three quarters of their prompt (max_length far below
    the prompts), the summary says so: such pairs keep little more than the template's tail.
The counts come back in `TokenizeStats`; drops also go to a LoadReport (minialign.data).

A TokenizedPair becomes a batch of either layout in packing.py. Prompts for generation are
left-padded here (collate_prompts).

Shape legend: B pairs in a batch, T padded sequence length, P padded prompt length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UserError

TRUNCATION_MODES = ("keep_end", "drop")
# A pair that keeps less than this share of its prompt's tokens counts as "prompt mostly cut".
MOSTLY_CUT_SHARE = 0.25
# tokenize_pairs encodes this many pairs per call: big enough for the Rust tokenizer's parallelism,
# small enough that the full-conversation token lists of a large data set never coexist in memory.
ENCODE_CHUNK_PAIRS = 512


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]    # answer tokens, all labelled, ending with the end-of-turn token
    rejected_ids: list[int]
    line: int | None = None  # the pair's line in its source file, for error messages
    prompt_truncated: bool = False
    prompt_mostly_cut: bool = False  # kept less than MOSTLY_CUT_SHARE of the prompt

    @property
    def length(self) -> int:
        """Padded length this pair needs: both rows of a pair share the batch's T."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizeStats:
    pairs: int = 0                 # pairs given
    kept: int = 0
    prompt_truncated: int = 0      # among kept
    prompt_mostly_cut: int = 0     # among kept: less than MOSTLY_CUT_SHARE of the prompt left
    from_generation_prompt: int = 0  # among kept: built as prompt text + answer + end of turn (see above)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count ("over_length", "not_prefix")
    template: str = ""             # the chat template's name (Tokenizer.template_name), for the report

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        built = (f"; {self.from_generation_prompt} built as generation prompt + answer + end of turn, since "
                 f"{self.template} does not render them as a continuation of the prompt"
                 if self.from_generation_prompt else "")
        text = (f"tokenized {self.pairs} pairs: kept {self.kept} (prompt truncated {self.prompt_truncated}), "
                f"dropped: {drops}{built}")
        if self.kept and self.prompt_mostly_cut > self.kept / 2:
            text += (f"\nwarning: {self.prompt_mostly_cut} of {self.kept} pairs kept less than a quarter of their "
                     f"prompt (little more than the chat template's tail); raise --max_length or --max_prompt_length")
        return text


class PairSkipped(ValueError):
    """A pair that cannot be used; `reason` is a LoadReport skip reason."""

    def __init__(self, reason: str, line: int | None, detail: str):
        super().__init__(f"line {line}: {reason}: {detail}")
        self.reason, self.line, self.detail = reason, line, detail


def conversation_text(tokenizer, prompt: list[dict], answer: str, prompt_text: str | None = None) -> tuple[str, bool]:
    """prompt + answer as one string that starts with the rendered prompt (generation prompt
    included), and whether it had to be built as prompt text + answer + end of turn because the
    template renders the answered conversation differently (see the module docstring)."""
    if prompt_text is None:
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}])
    if full.startswith(prompt_text):
        return full, False
    return prompt_text + answer + tokenizer.end_of_turn_text, True


def _pair_texts(tokenizer, pair) -> tuple[list[str], bool]:
    """[prompt with generation prompt, prompt + chosen, prompt + rejected] as strings, and whether
    either answer had to be built after the generation prompt."""
    try:
        prompt_text = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True)
        chosen, built_chosen = conversation_text(tokenizer, pair.prompt, pair.chosen, prompt_text)
        rejected, built_rejected = conversation_text(tokenizer, pair.prompt, pair.rejected, prompt_text)
    except UserError as e:  # the template refused this conversation: say which pair
        raise UserError(f"line {pair.line}: {e}") from None
    return [prompt_text, chosen, rejected], built_chosen or built_rejected


def _answer_ids(tokenizer, prompt_ids: list[int], full_ids: list[int], which: str, line) -> list[int]:
    """The tokens after the prompt, up to and including the last end of turn."""
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids:
        k = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(n, len(full_ids)))
        raise PairSkipped("not_prefix", line, (
            f"with {tokenizer.template_name}, the prompt's tokens are not a prefix of prompt + {which}'s "
            f"tokens; they differ at token {k}: {tokenizer.decode(prompt_ids[k:k + 3])!r} vs "
            f"{tokenizer.decode(full_ids[k:k + 3])!r} (an answer starting with text that merges with the "
            f"prompt's end, such as a newline?)"))
    answer = full_ids[n:]
    if end_of_turn_end(answer, tokenizer.end_of_turn_ids) is None:
        raise UserError(f"line {line}: {tokenizer.template_name} did not end the {which} answer with its "
                        f"end of turn {tokenizer.end_of_turn_text!r}")
    return through_last_end_of_turn(answer, tokenizer.end_of_turn_ids)


def end_of_turn_end(ids: list[int], end_of_turn: list[int]) -> int | None:
    """The index just after the last occurrence of the end-of-turn tokens in ids; None if absent."""
    k = len(end_of_turn)
    for start in range(len(ids) - k, -1, -1) if k else ():
        if ids[start:start + k] == end_of_turn:
            return start + k
    return None


def through_last_end_of_turn(ids: list[int], end_of_turn: list[int]) -> list[int]:
    """ids up to and including the last end-of-turn tokens (what the template writes after them,
    such as ChatML's "\n", is cut); unchanged when there are none."""
    end = end_of_turn_end(ids, end_of_turn)
    return ids if end is None else ids[:end]


def _tokenized(tokenizer, pair, ids: list[list[int]], max_length, max_prompt_length, truncation) -> TokenizedPair:
    prompt_ids, full_chosen, full_rejected = ids
    chosen = _answer_ids(tokenizer, prompt_ids, full_chosen, "chosen", pair.line)
    rejected = _answer_ids(tokenizer, prompt_ids, full_rejected, "rejected", pair.line)
    keep = len(prompt_ids) if max_prompt_length is None else min(len(prompt_ids), max_prompt_length)
    longer = max(len(chosen), len(rejected))
    if max_length is not None and keep + longer > max_length:
        room = max_length - longer  # prompt tokens that fit beside the longer answer
        if truncation == "drop" or room < 1:
            raise PairSkipped("over_length", pair.line, f"{keep + longer} tokens > max_length={max_length} "
                                                        f"(prompt {keep}, longer answer {longer})")
        keep = room
    out = TokenizedPair(prompt_ids[len(prompt_ids) - keep:], chosen, rejected, pair.line)  # the prompt's END
    out.prompt_truncated = keep < len(prompt_ids)
    out.prompt_mostly_cut = keep < MOSTLY_CUT_SHARE * len(prompt_ids)
    return out


def _check_options(max_length, max_prompt_length, truncation) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation={truncation!r}: expected one of {TRUNCATION_MODES}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be below max_length={max_length}")


def tokenize_pairs(tokenizer, pairs, max_length: int | None = None, max_prompt_length: int | None = None,
                   truncation: str = "keep_end", report=None, strict: bool = False
                   ) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize many pairs. Unusable pairs are dropped and counted in the returned stats and,
    when given, in `report` (a minialign.data.LoadReport, via add_skip); strict=True raises instead."""
    _check_options(max_length, max_prompt_length, truncation)
    pairs = list(pairs)
    stats, kept = TokenizeStats(pairs=len(pairs), template=tokenizer.template_name), []
    for i, pair in enumerate(pairs):
        if i % ENCODE_CHUNK_PAIRS == 0:
            rendered = [_pair_texts(tokenizer, p) for p in pairs[i:i + ENCODE_CHUNK_PAIRS]]
            ids = tokenizer.encode_batch([t for texts, _ in rendered for t in texts])
        j = 3 * (i % ENCODE_CHUNK_PAIRS)  # this pair's [prompt, prompt + chosen, prompt + rejected]
        try:
            tp = _tokenized(tokenizer, pair, ids[j:j + 3], max_length, max_prompt_length, truncation)
        except PairSkipped as e:
            if strict:
                raise
            stats.dropped[e.reason] = stats.dropped.get(e.reason, 0) + 1
            if report is not None:
                report.add_skip(e.reason, e.line, e.detail)
            continue
        kept.append(tp)
        stats.from_generation_prompt += rendered[i % ENCODE_CHUNK_PAIRS][1]
        stats.prompt_truncated += tp.prompt_truncated
        stats.prompt_mostly_cut += tp.prompt_mostly_cut
    stats.kept = len(kept)
    return kept, stats


def collate_prompts(prompts: list[list[int]], pad_token_id: int) -> dict:
    """Left-pad prompts for generation, so every row's next token goes in the same column.

    Returns input_ids [B, P] and attention_mask [B, P] (0 on the left padding), long.
    """
    if not prompts:
        raise ValueError("collate_prompts: no prompts to collate")
    P = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((len(prompts), P), dtype=torch.long)          # (B, P)
    for r, p in enumerate(prompts):
        if p:
            input_ids[r, P - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[r, P - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
