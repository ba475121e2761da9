"""Read preference data from the common public layouts into one shape.

A preference pair is a conversation so far (the prompt, ending with a user turn), and
two candidate final assistant turns, one judged better (chosen) than the other
(rejected). Public data sets spell this six ways; `load_preferences` detects which from
the keys of the first record (or takes `data_format` explicitly) and converts each
record, or skips it with a named reason:

  format name               keys of one record
  align_anything            question, response_1, response_2, overall_response (1 or 2)
  pku_saferlhf              prompt, response_0, response_1, better_response_id (0 or 1)
  prompt_chosen_rejected    prompt, chosen, rejected            (strings)
  chat_messages             chosen, rejected (message lists), optional prompt (list or str)
  preferred_output          input.messages, preferred_output, non_preferred_output
  hh_rlhf                   chosen, rejected  (whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts)

Nothing is dropped silently: every skipped record is counted in a LoadReport under one
of SKIP_REASONS, with its line number, so a script can print what happened.
Files: .json (an array, or an object holding one list), .jsonl, and either one gzipped (.gz).
"""
from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MissingFileError, UserError

FORMATS = ("align_anything", "pku_saferlhf", "prompt_chosen_rejected", "chat_messages", "preferred_output", "hh_rlhf")
SKIP_REASONS = (
    "malformed_json",       # the line is not JSON, or not a JSON object
    "missing_key",          # a key the format needs is absent (the detail names it)
    "invalid_label",        # the preference label is not one of the allowed values
    "invalid_text",         # a string cannot be encoded as UTF-8 (a lone surrogate such as "\ud800")
    "invalid_messages",     # a prompt or message list is malformed (role, shape, last turn)
    "empty_response",       # a response is empty or whitespace only
    "non_string_response",  # a response is not a string
    "identical_responses",  # chosen == rejected, no preference to learn
    "prompt_mismatch",      # chosen and rejected continue different conversations
    "over_length",          # added later by collation, when a pair cannot fit max_length
    "not_prefix",           # added later by collation: prompt tokens are not a prefix of prompt + answer
)
# The keys each format needs, for the message that asks the user to choose a format.
FORMAT_KEYS = {
    "align_anything": "question, response_1, response_2, overall_response",
    "pku_saferlhf": "prompt, response_0, response_1, better_response_id",
    "prompt_chosen_rejected": "prompt, chosen, rejected (strings)",
    "chat_messages": "chosen, rejected (message lists)",
    "preferred_output": "input.messages, preferred_output, non_preferred_output",
    "hh_rlhf": "chosen, rejected (Human/Assistant transcripts)",
}
ROLES = ("system", "user", "assistant")
PKU_LABEL_KEYS = ("better_response_id", "safer_response_id")
MAX_EXAMPLES = 10            # how many skipped records a LoadReport keeps for its summary
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferencePair:
    prompt: list[dict]     # message history ending with a user turn (system turn optional)
    chosen: str            # content of the better final assistant turn
    rejected: str
    line: int | None = None  # 1-based line (JSONL) or 1-based record index (JSON array) in the source


@dataclass
class LoadReport:
    """What a load read, kept and skipped. Invariant: read == kept + sum(skipped.values())."""
    path: str
    format: str
    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int | None, str, str]] = field(default_factory=list)  # (line, reason, detail)

    def _record(self, reason: str, line: int | None, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((line, reason, detail))

    def add_skip(self, reason: str, line: int | None, detail: str = "") -> None:
        """Drop a pair that was already counted as kept (e.g. "over_length" at collation)."""
        self._record(reason, line, detail)
        self.kept -= 1

    def summary(self) -> str:
        """A few readable lines for a script to print."""
        lines = [f"{self.path}: format {self.format}, read {self.read}, kept {self.kept}, "
                 f"skipped {sum(self.skipped.values())}"]
        lines += [f"  {reason}: {count}" for reason, count in sorted(self.skipped.items())]
        if self.examples:
            lines.append("  first skipped:")
            lines += [f"    line {line}: {reason} ({detail})" for line, reason, detail in self.examples]
        return "\n".join(lines)


class _Skip(Exception):
    """Raised by a record parser; the loader counts it (or re-raises it in strict mode)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- reading

def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


# What reading a damaged file raises: a .gz that is not gzip (BadGzipFile, an OSError), one cut
# short (EOFError), corrupt compressed data (zlib.error), or a file that cannot be read (OSError).
READ_ERRORS = (OSError, EOFError, zlib.error)


def _unreadable(path: Path, error: Exception, line: int | None = None) -> UserError:
    where = f" after line {line}" if line else ""
    if isinstance(error, gzip.BadGzipFile):
        return UserError(f"{path}: not a gzip file ({error}), though its name ends in .gz")
    if isinstance(error, EOFError):
        return UserError(f"{path}: the compressed file is truncated{where} ({error}); was it copied completely?")
    if isinstance(error, zlib.error):
        return UserError(f"{path}: the compressed data is corrupt{where} ({error})")
    return UserError(f"{path}: cannot be read{where} ({getattr(error, 'strerror', None) or error})")


def _read_records(path: Path):
    """Yield (line, record) pairs; a record that cannot be decoded is yielded as a _Skip."""
    kind = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix   # "data.jsonl.gz" -> ".jsonl"
    if kind == ".jsonl":
        line = 0
        try:
            with _open(path) as f:
                for line, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue                       # blank lines (often a trailing one) are not records
                    try:
                        record = json.loads(raw)       # bytes in: also reports bad UTF-8 as ValueError
                    except (ValueError, RecursionError) as e:   # RecursionError: nested too deeply to decode
                        record = _Skip("malformed_json", str(e))
                    yield line, record
        except READ_ERRORS as e:
            raise _unreadable(path, e, line) from None
    elif kind == ".json":
        try:
            with _open(path) as f:
                document = json.load(f)
        except READ_ERRORS as e:
            raise _unreadable(path, e) from None
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
        if isinstance(document, dict):
            # {"data": [...], "version": ...}: accept exactly one list-valued key, else ambiguous.
            lists = [key for key, value in document.items() if isinstance(value, list)]
            if len(lists) != 1:
                raise UserError(f"{path}: expected a JSON array, or an object with exactly one list "
                                f"of records; found list keys {lists} among {sorted(document)}")
            document = document[lists[0]]
        if not isinstance(document, list):
            raise UserError(f"{path}: expected a JSON array of records, got {type(document).__name__}")
        yield from enumerate(document, start=1)
    else:
        raise UserError(f"{path}: unsupported file type {path.name!r}; expected .json, .jsonl, .json.gz or .jsonl.gz")


def _detect(record: dict, path: Path, line: int) -> str:
    """Name the format from the keys of one record (see the module docstring)."""
    keys = set(record)
    if {"question", "response_1", "response_2"} <= keys or "overall_response" in keys:
        return "align_anything"
    if {"response_0", "response_1"} <= keys:
        return "pku_saferlhf"
    if "preferred_output" in keys or "non_preferred_output" in keys:
        return "preferred_output"
    if {"chosen", "rejected"} <= keys:
        if isinstance(record["chosen"], list):
            return "chat_messages"
        return "prompt_chosen_rejected" if "prompt" in keys else "hh_rlhf"
    needs = "; ".join(f"{name}: {keys}" for name, keys in FORMAT_KEYS.items())
    raise UserError(f"{path}, line {line}: cannot detect the data format from keys {sorted(keys)}; "
                    f"the formats and the keys they need are {needs}; choose one with --data_format")


# ----------------------------------------------------------------------------- one record

def _get(record: dict, key: str):
    if key not in record:
        raise _Skip("missing_key", f"missing key {key!r}")
    return record[key]


def _label(record: dict, key: str, allowed: tuple[int, int]) -> int:
    """A 0/1 or 1/2 label. Digit strings ("1") are accepted: some exports write labels as text.
    Only ASCII digits: "²" is a digit to str.isdigit() but not a number to int()."""
    value = _get(record, key)
    number = value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value)
    if isinstance(number, bool) or number not in allowed:   # bool is an int subclass: True == 1
        raise _Skip("invalid_label", f"{key}={value!r}, expected one of {allowed}")
    return number


def _messages(value, name: str) -> list[dict]:
    """Validate a message list and copy it as [{"role", "content"}] (other keys are dropped)."""
    if not isinstance(value, list) or not value:
        raise _Skip("invalid_messages", f"{name} is {type(value).__name__}, expected a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _Skip("invalid_messages", f"{name}[{i}] is not a {{'role', 'content'}} message")
        if message["role"] not in ROLES:
            raise _Skip("invalid_messages", f"{name}[{i}] has role {message['role']!r}, expected one of {ROLES}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _prompt(value, name: str = "prompt") -> list[dict]:
    """A prompt given as a string (one user turn) or as a message list."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value, name)


def _split_conversations(prompt, chosen, rejected) -> tuple[list[dict], object, object]:
    """Chat form: the shared history, and the content of each final assistant turn.

    With a separate prompt, chosen/rejected may be just the answer ([assistant]) or the
    whole conversation (prompt + [assistant]); both are accepted.
    """
    conversations = []
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        messages = _messages(value, name)
        if prompt is not None and messages[:len(prompt)] != prompt:
            messages = prompt + messages
        conversations.append(messages)
    (*history_c, last_c), (*history_r, last_r) = conversations
    if history_c != history_r:
        raise _Skip("prompt_mismatch", "chosen and rejected differ before their final message")
    for name, last in (("chosen", last_c), ("rejected", last_r)):
        if last["role"] != "assistant":
            raise _Skip("invalid_messages", f"final {name} message has role {last['role']!r}, expected 'assistant'")
    return history_c, last_c["content"], last_r["content"]


def _hh_history(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> user/assistant messages, contents stripped.

    Consecutive turns of the same role (a few exist in hh-rlhf) are kept as they are.
    """
    parts = HH_TURN.split(text)        # [before, role, content, role, content, ...]
    if parts[0].strip():
        raise _Skip("invalid_messages", f"transcript does not start with {HH_HUMAN!r}")
    roles, contents = parts[1::2], parts[2::2]
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(roles, contents)]


def _parse_hh(record: dict) -> tuple[list[dict], object, object]:
    chosen, rejected = _get(record, "chosen"), _get(record, "rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise _Skip("non_string_response", "hh_rlhf needs chosen and rejected transcripts as strings")
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise _Skip("invalid_messages", f"transcript has no {HH_ASSISTANT!r} turn")
    if chosen[:cut_c] != rejected[:cut_r]:
        # The two transcripts must share everything before the last assistant turn;
        # otherwise the pair compares answers to different conversations.
        raise _Skip("prompt_mismatch", f"chosen and rejected differ before the last {HH_ASSISTANT!r}")
    response_c = chosen[cut_c + len(HH_ASSISTANT):].strip()
    response_r = rejected[cut_r + len(HH_ASSISTANT):].strip()
    return _hh_history(chosen[:cut_c]), response_c, response_r


def _parse(record: dict, data_format: str, pku_label_key: str) -> tuple[list[dict], object, object]:
    """(prompt messages, chosen, rejected) for one record of the given format."""
    if data_format == "align_anything":
        question = _get(record, "question")
        first, second = _get(record, "response_1"), _get(record, "response_2")
        better = _label(record, "overall_response", (1, 2))          # 1: response_1 is better
        chosen, rejected = (first, second) if better == 1 else (second, first)
        return _prompt(question, "question"), chosen, rejected
    if data_format == "pku_saferlhf":
        prompt = _get(record, "prompt")
        responses = (_get(record, "response_0"), _get(record, "response_1"))
        better = _label(record, pku_label_key, (0, 1))               # index of the better response
        return _prompt(prompt), responses[better], responses[1 - better]
    if data_format == "prompt_chosen_rejected":
        return _prompt(_get(record, "prompt")), _get(record, "chosen"), _get(record, "rejected")
    if data_format == "chat_messages":
        prompt = _prompt(record["prompt"]) if "prompt" in record else None
        return _split_conversations(prompt, _get(record, "chosen"), _get(record, "rejected"))
    if data_format == "preferred_output":
        source = _get(record, "input")
        if not isinstance(source, dict) or "messages" not in source:
            raise _Skip("missing_key", "missing key 'input.messages'")
        prompt = _prompt(source["messages"], "input.messages")
        return _split_conversations(prompt, _get(record, "preferred_output"), _get(record, "non_preferred_output"))
    return _parse_hh(record)                                          # "hh_rlhf"


def _check_pair(prompt: list[dict], chosen, rejected, keep_empty: bool) -> None:
    """Checks shared by every format, after the format-specific parsing."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise _Skip("non_string_response", f"chosen is {type(chosen).__name__}, rejected is {type(rejected).__name__}")
    if not keep_empty and (not chosen.strip() or not rejected.strip()):
        which = "chosen" if not chosen.strip() else "rejected"
        raise _Skip("empty_response", f"{which} response is empty")
    if chosen == rejected:
        raise _Skip("identical_responses", "chosen and rejected are the same text")
    for i, message in enumerate(prompt):
        if not isinstance(message["content"], str):
            raise _Skip("invalid_messages", f"prompt[{i}].content is {type(message['content']).__name__}, expected str")
    if not prompt:
        raise _Skip("invalid_messages", "the prompt is empty (no turn before the final answer)")
    if prompt[-1]["role"] != "user":
        raise _Skip("invalid_messages", f"prompt ends with a {prompt[-1]['role']!r} turn, expected 'user'")
    texts = [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(prompt)]
    for name, text in texts + [("chosen", chosen), ("rejected", rejected)]:
        # JSON can spell a lone surrogate ("\ud800"), which no UTF-8 text contains: the tokenizer
        # would raise on it, aborting the whole load, so the record is skipped here instead.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Skip("invalid_text", f"{name} cannot be encoded as UTF-8 ({e.reason} at character {e.start})")


# ----------------------------------------------------------------------------- public API

def load_preferences(
    path: str | Path,
    data_format: str = "auto",
    strict: bool = False,
    pku_label_key: str = "better_response_id",
    keep_empty_responses: bool = False,
) -> tuple[list[PreferencePair], LoadReport]:
    """Read a preference file into PreferencePairs, and report what was skipped and why.

    Args:
        path: a .json, .jsonl, .json.gz or .jsonl.gz file.
        data_format: "auto" (detect from the first record's keys) or one of FORMATS.
        strict: raise UserError (naming file, line and reason) at the first skipped record.
        pku_label_key: which PKU-SafeRLHF label decides "chosen": better_response_id
            (helpfulness) or safer_response_id.
        keep_empty_responses: keep pairs whose chosen or rejected answer is empty; off by
            default (hh-rlhf has a few pairs where the preferred answer is empty).
    Raises:
        MissingFileError (a FileNotFoundError) if path does not exist; UserError (a ValueError)
        for an unreadable or damaged file, an undetectable format, or when no record survives
        (the message has the summary).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise MissingFileError(f"preference data file {what}: {path}")
    if data_format != "auto" and data_format not in FORMATS:
        raise UserError(f"unknown data format {data_format!r} (--data_format); expected 'auto' or one of {', '.join(FORMATS)}")
    if pku_label_key not in PKU_LABEL_KEYS:
        raise UserError(f"unknown pku_label_key {pku_label_key!r}; expected one of {', '.join(PKU_LABEL_KEYS)}")

    report = LoadReport(path=str(path), format=data_format)
    pairs: list[PreferencePair] = []
    for line, record in _read_records(path):
        report.read += 1
        try:
            if isinstance(record, _Skip):
                raise record
            if not isinstance(record, dict):
                raise _Skip("malformed_json", f"expected a JSON object, got {type(record).__name__}")
            if report.format == "auto":
                report.format = _detect(record, path, line)
            prompt, chosen, rejected = _parse(record, report.format, pku_label_key)
            _check_pair(prompt, chosen, rejected, keep_empty_responses)
        except _Skip as skip:
            if strict:
                raise UserError(f"{path}, line {line}: {skip.reason}: {skip.detail}") from None
            report._record(skip.reason, line, skip.detail)
            continue
        pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, line=line))
    report.kept = len(pairs)
    if not pairs:
        raise UserError(f"no usable preference pairs in {path}\n{report.summary()}")
    return pairs, report


def _prompt_key(prompt: list[dict]) -> str:
    """A hashable identity for a prompt (message lists are not hashable)."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def prompts_view(pairs: list[PreferencePair]) -> list[list[dict]]:
    """The distinct prompts, in first-seen order (e.g. to generate from each once)."""
    seen: dict[str, list[dict]] = {}
    for pair in pairs:
        seen.setdefault(_prompt_key(pair.prompt), pair.prompt)
    return list(seen.values())


def split_by_prompt(
    pairs: list[PreferencePair],
    eval_fraction: float | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split into (train, eval) so that no prompt appears in both.

    Pairs sharing a prompt go to the same side, so eval never scores a prompt the model
    trained on. Give exactly one of eval_fraction (of distinct prompts; at least one prompt
    goes to eval) or eval_size (a number of distinct PROMPTS, not pairs). The choice of
    prompts depends only on the prompts, their first-seen order and seed; both sides keep
    the input order.
    """
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction or eval_size")  # a caller's mistake, not a user's
    keys = list(dict.fromkeys(_prompt_key(pair.prompt) for pair in pairs))   # distinct, first-seen order
    if eval_fraction is not None:
        if not 0.0 < eval_fraction < 1.0:
            raise UserError(f"the held-out fraction of prompts must be in (0, 1), got {eval_fraction}")
        eval_size = max(1, round(eval_fraction * len(keys)))
    if not 1 <= eval_size < len(keys):
        raise UserError(
            f"cannot hold out {eval_size} of the data's {len(keys)} distinct prompt(s) for evaluation and keep "
            f"at least one for training; use more data, or give a separate evaluation file (--eval_data)")
    random.Random(seed).shuffle(keys)
    eval_keys = set(keys[:eval_size])
    train = [pair for pair in pairs if _prompt_key(pair.prompt) not in eval_keys]
    evaluation = [pair for pair in pairs if _prompt_key(pair.prompt) in eval_keys]
    return train, evaluation
