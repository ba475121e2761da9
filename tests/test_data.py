"""Preference-file loading: every format from tiny hand-written files, every skip reason
with its line number, and the real data in ../shared (skipped when it is absent)."""
import gzip
import json
import os
from pathlib import Path

import pytest

from minialign.errors import MissingFileError, UserError
from minialign.data import FORMATS, PreferencePair, load_preferences, prompts_view, split_by_prompt

SHARED = Path(os.environ.get("MINIALIGN_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
HH_FILE = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ORCA_FILE = SHARED / "data" / "orca-dpo-pairs" / "validation.jsonl"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    """Records are dicts (written as JSON) or raw strings (written as they are)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_invariant(report):
    assert report.read == report.kept + sum(report.skipped.values())


# ----------------------------------------------------------------------------- formats

def test_align_anything(tmp_path):
    """overall_response 1 -> response_1 chosen; 2 (or the string "2") -> response_2 chosen."""
    path = write_jsonl(tmp_path / "aa.jsonl", [
        {"question": "q1", "response_1": "a", "response_2": "b", "overall_response": 1},
        {"question": "q2", "response_1": "a", "response_2": "b", "overall_response": 2},
        {"question": "q3", "response_1": "a", "response_2": "b", "overall_response": "2"},
        {"question": "q4", "response_1": "a", "response_2": "b", "overall_response": 3},
        {"question": "q5", "response_1": "a", "response_2": "b", "overall_response": True},
    ])
    pairs, report = load_preferences(path)
    assert report.format == "align_anything"
    assert [(p.prompt, p.chosen, p.rejected, p.line) for p in pairs] == [
        ([user("q1")], "a", "b", 1), ([user("q2")], "b", "a", 2), ([user("q3")], "b", "a", 3)]
    assert report.skipped == {"invalid_label": 2}
    assert [(line, reason) for line, reason, _ in report.examples] == [(4, "invalid_label"), (5, "invalid_label")]
    check_invariant(report)


def test_pku_saferlhf_label_key(tmp_path):
    """better_response_id picks helpfulness; pku_label_key="safer_response_id" picks safety."""
    path = write_jsonl(tmp_path / "pku.jsonl", [
        {"prompt": "p", "response_0": "r0", "response_1": "r1", "better_response_id": 1, "safer_response_id": 0},
    ])
    pairs, report = load_preferences(path)
    assert report.format == "pku_saferlhf"
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ([user("p")], "r1", "r0")
    pairs, _ = load_preferences(path, pku_label_key="safer_response_id")
    assert (pairs[0].chosen, pairs[0].rejected) == ("r0", "r1")
    with pytest.raises(ValueError, match="pku_label_key"):
        load_preferences(path, pku_label_key="worse_response_id")


def test_prompt_chosen_rejected(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}])
    pairs, report = load_preferences(path)
    assert report.format == "prompt_chosen_rejected"
    assert pairs == [PreferencePair(prompt=[user("Hi?")], chosen="Hello!", rejected="Go away.", line=1)]


def test_chat_messages_three_layouts(tmp_path):
    """(1) no prompt: the shared leading messages are the prompt; (2) prompt list + answer-only
    lists; (3) prompt string + whole conversations that repeat it. All give the same pair."""
    system = {"role": "system", "content": "Be brief."}
    history = [system, user("2+2?")]
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"chosen": history + [assistant("4")], "rejected": history + [assistant("5")]},
        {"prompt": history, "chosen": [assistant("4")], "rejected": [assistant("5")]},
        {"prompt": "2+2?", "chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
    ])
    pairs, report = load_preferences(path)
    assert report.format == "chat_messages"
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (history, "4", "5"), (history, "4", "5"), ([user("2+2?")], "4", "5")]


def test_preferred_output(tmp_path):
    path = write_jsonl(tmp_path / "po.jsonl", [
        {"input": {"messages": [user("Hi")]}, "preferred_output": [assistant("Hello")],
         "non_preferred_output": [assistant("...")]},
        {"input": {}, "preferred_output": [assistant("a")], "non_preferred_output": [assistant("b")]},
    ])
    pairs, report = load_preferences(path)
    assert report.format == "preferred_output"
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ([user("Hi")], "Hello", "...")
    assert report.skipped == {"missing_key": 1} and "input.messages" in report.examples[0][2]


def test_hh_rlhf_transcripts(tmp_path):
    """Split at the last '\\n\\nAssistant:'; earlier turns become stripped messages."""
    shared = "\n\nHuman: Hi there \n\nAssistant: Hello.\n\nHuman: Tell me a joke."
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": shared + "\n\nAssistant: A pun.", "rejected": shared + "\n\nAssistant: No."},
        {"chosen": shared + "\n\nAssistant: A pun.", "rejected": "\n\nHuman: Other\n\nAssistant: No."},
    ])
    pairs, report = load_preferences(path)
    assert report.format == "hh_rlhf"
    assert pairs[0].prompt == [user("Hi there"), assistant("Hello."), user("Tell me a joke.")]
    assert (pairs[0].chosen, pairs[0].rejected) == ("A pun.", "No.")
    assert report.skipped == {"prompt_mismatch": 1} and report.examples[0][:2] == (2, "prompt_mismatch")


# ----------------------------------------------------------------------------- skip reasons

def test_every_skip_reason_with_line_numbers(tmp_path):
    good = {"prompt": "p", "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        good,                                                    # 1 kept
        "{not json",                                             # 2 malformed_json
        {"prompt": "p", "chosen": "yes"},                        # 3 missing_key 'rejected'
        {"prompt": "p", "chosen": "  ", "rejected": "no"},       # 4 empty_response
        {"prompt": "p", "chosen": 3, "rejected": "no"},          # 5 non_string_response
        {"prompt": "p", "chosen": "same", "rejected": "same"},   # 6 identical_responses
        "",                                                      # 7 blank: not a record
        {"prompt": ["not a message"], "chosen": "a", "rejected": "b"},  # 8 invalid_messages
        "[1, 2]",                                                # 9 malformed_json (not an object)
    ])
    pairs, report = load_preferences(path)
    assert [p.line for p in pairs] == [1]
    assert report.read == 8 and report.kept == 1
    assert report.skipped == {"malformed_json": 2, "missing_key": 1, "empty_response": 1,
                              "non_string_response": 1, "identical_responses": 1, "invalid_messages": 1}
    assert [(line, reason) for line, reason, _ in report.examples] == [
        (2, "malformed_json"), (3, "missing_key"), (4, "empty_response"), (5, "non_string_response"),
        (6, "identical_responses"), (8, "invalid_messages"), (9, "malformed_json")]
    assert "'rejected'" in report.examples[1][2]               # the missing key is named
    summary = report.summary()
    assert "read 8, kept 1, skipped 7" in summary and "line 3: missing_key" in summary
    check_invariant(report)


def test_chat_skip_reasons(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},     # prompt_mismatch
        {"chosen": [user("a"), user("x")], "rejected": [user("a"), assistant("y")]},          # last not assistant
        {"chosen": [user("a"), {"role": "tool", "content": "x"}], "rejected": [user("a")]},   # bad role
        {"chosen": [assistant("x")], "rejected": [assistant("y")]},                           # empty prompt
        {"chosen": [user("a"), assistant(None)], "rejected": [user("a"), assistant("y")]},    # non-string answer
        {"chosen": [user("a"), assistant("x")], "rejected": [user("a"), assistant("y")]},     # kept
    ])
    pairs, report = load_preferences(path)
    assert [p.line for p in pairs] == [6]
    assert [(line, reason) for line, reason, _ in report.examples] == [
        (1, "prompt_mismatch"), (2, "invalid_messages"), (3, "invalid_messages"),
        (4, "invalid_messages"), (5, "non_string_response")]


def test_keep_empty_responses(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "chosen": "", "rejected": "no"},
                                               {"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert load_preferences(path)[1].skipped == {"empty_response": 1}
    pairs, report = load_preferences(path, keep_empty_responses=True)
    assert report.kept == 2 and pairs[0].chosen == ""


def test_strict_raises_at_first_skip(tmp_path):
    path = write_jsonl(tmp_path / "strict.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "a"}, "{oops"])
    with pytest.raises(ValueError, match=r"strict\.jsonl, line 3: identical_responses"):
        load_preferences(path, strict=True)


def test_add_skip_moves_a_kept_pair(tmp_path):
    """A later stage (collation) drops a kept pair: kept goes down, the reason is counted."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    _, report = load_preferences(path)
    report.add_skip("over_length", 2, "prompt + chosen is 900 tokens > 512")
    assert report.kept == 2 and report.skipped == {"over_length": 1}
    assert "line 2: over_length" in report.summary()
    check_invariant(report)


# ----------------------------------------------------------------------------- files and errors

def test_json_array_object_and_gzip(tmp_path):
    records = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": records}))
    gz_json = tmp_path / "array.json.gz"
    gz_json.write_bytes(gzip.compress(array.read_bytes()))
    gz_jsonl = tmp_path / "lines.jsonl.gz"
    gz_jsonl.write_bytes(gzip.compress(write_jsonl(tmp_path / "lines.jsonl", records).read_bytes()))
    for path in (array, wrapped, gz_json, gz_jsonl):
        pairs, report = load_preferences(path)
        assert [(p.chosen, p.line) for p in pairs] == [("a", 1), ("c", 2)], path
        assert report.read == 2
    ambiguous = tmp_path / "two_lists.json"
    ambiguous.write_text(json.dumps({"train": records, "test": records}))
    with pytest.raises(ValueError, match="exactly one list"):
        load_preferences(ambiguous)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_preferences(broken)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_preferences(tmp_path / "nowhere.jsonl")
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "x", "score": 1}])
    with pytest.raises(ValueError, match=r"\['score', 'text'\].*hh_rlhf"):
        load_preferences(unknown)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(ValueError, match="no usable preference pairs(.|\n)*identical_responses: 1"):
        load_preferences(all_bad)
    with pytest.raises(ValueError, match="data_format"):
        load_preferences(all_bad, data_format="csv")
    text = tmp_path / "data.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_preferences(text)


def test_format_override(tmp_path):
    """A prompt key would make auto-detection pick prompt_chosen_rejected; forcing hh_rlhf
    parses the transcripts instead, and a wrong override reports missing keys."""
    record = {"prompt": "ignored", "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
              "rejected": "\n\nHuman: Hi\n\nAssistant: Bye"}
    path = write_jsonl(tmp_path / "o.jsonl", [record])
    assert load_preferences(path)[1].format == "prompt_chosen_rejected"
    pairs, report = load_preferences(path, data_format="hh_rlhf")
    assert report.format == "hh_rlhf" and pairs[0].prompt == [user("Hi")] and pairs[0].chosen == "Hello"
    with pytest.raises(ValueError, match="missing_key: 1"):
        load_preferences(path, data_format="align_anything")
    assert set(FORMATS) == {"align_anything", "pku_saferlhf", "prompt_chosen_rejected",
                            "chat_messages", "preferred_output", "hh_rlhf"}


# ----------------------------------------------------------------------------- prompts and splits

def make_pairs(n_prompts, per_prompt):
    return [PreferencePair([user(f"q{i}")], f"a{i}{j}", f"b{i}{j}", line=i * per_prompt + j + 1)
            for i in range(n_prompts) for j in range(per_prompt)]


def test_prompts_view_first_seen_order():
    pairs = make_pairs(3, 2)
    pairs = [pairs[2], pairs[0], pairs[3], pairs[5], pairs[1]]
    assert prompts_view(pairs) == [[user("q1")], [user("q0")], [user("q2")]]


def test_split_by_prompt_disjoint_and_deterministic():
    pairs = make_pairs(20, 3)
    train, evaluation = split_by_prompt(pairs, eval_fraction=0.25, seed=7)
    train_prompts = {p.prompt[0]["content"] for p in train}
    eval_prompts = {p.prompt[0]["content"] for p in evaluation}
    assert len(eval_prompts) == 5 and len(evaluation) == 15 and not train_prompts & eval_prompts
    assert sorted(p.line for p in train + evaluation) == list(range(1, 61))   # nothing lost or doubled
    assert [p.line for p in train] == sorted(p.line for p in train)          # input order kept
    assert split_by_prompt(pairs, eval_fraction=0.25, seed=7) == (train, evaluation)
    assert split_by_prompt(pairs, eval_fraction=0.25, seed=8) != (train, evaluation)
    _, by_size = split_by_prompt(pairs, eval_size=2, seed=0)
    assert len({p.prompt[0]["content"] for p in by_size}) == 2              # eval_size counts prompts
    with pytest.raises(ValueError, match="exactly one"):
        split_by_prompt(pairs)
    # The message speaks of prompts and flags, not of the Python argument (issue 16).
    with pytest.raises(UserError, match="cannot hold out 20 of the data's 20 distinct prompt.*--eval_data"):
        split_by_prompt(pairs, eval_size=20)


# ----------------------------------------------------------------------------- real data

@pytest.mark.skipif(not HH_FILE.exists(), reason=f"shared data not found at {HH_FILE}")
def test_real_hh_rlhf():
    """2,312 pairs; 5 continue different conversations (README of shared/); 4 more have an
    empty chosen answer, skipped by default and kept with keep_empty_responses=True."""
    pairs, report = load_preferences(HH_FILE)
    assert report.format == "hh_rlhf" and report.read == 2312 and report.kept == 2303
    assert report.skipped == {"prompt_mismatch": 5, "empty_response": 4}
    mismatched = sorted(line for line, reason, _ in report.examples if reason == "prompt_mismatch")
    assert mismatched == [1255, 1689, 1951, 1953, 2037]
    assert all(p.prompt[-1]["role"] == "user" for p in pairs)
    pairs, report = load_preferences(HH_FILE, keep_empty_responses=True)
    assert report.kept == 2307 and report.skipped == {"prompt_mismatch": 5}


@pytest.mark.skipif(not ORCA_FILE.exists(), reason=f"shared data not found at {ORCA_FILE}")
def test_real_orca_pairs():
    pairs, report = load_preferences(ORCA_FILE)
    assert report.format == "preferred_output" and report.read == 284 and report.kept == 284
    assert all([m["role"] for m in p.prompt] == ["system", "user"] for p in pairs)


# ----------------------------------------------------------------------------- damaged input (issue 16)

def test_damaged_records_are_skipped_with_their_line(tmp_path, tiny_tokenizer_dir):
    """A lone surrogate anywhere (prompt, chosen, rejected, an earlier turn) is `invalid_text`, a
    100,000-deep nesting is `malformed_json` (RecursionError, not an abort): each skipped with its
    line, the rest kept. The kept pairs then tokenize; a surrogate would not have (shown below)."""
    from minialign import load_tokenizer
    from minialign.collate import tokenize_pairs

    good = {"prompt": "p", "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "damaged.jsonl", [
        good,                                                            # 1 kept
        {"prompt": "p\ud800", "chosen": "yes", "rejected": "no"},        # 2 invalid_text (prompt)
        "[" * 100_000 + "]" * 100_000,                                   # 3 malformed_json (too deep)
        {"prompt": "p", "chosen": "yes\udfff", "rejected": "no"},        # 4 invalid_text (chosen)
        {"prompt": [user("a\ud83d"), assistant("b"), user("c")], "chosen": "x", "rejected": "y"},  # 5
        good,                                                            # 6 kept
    ])
    pairs, report = load_preferences(path)
    assert [p.line for p in pairs] == [1, 6]
    assert report.skipped == {"invalid_text": 3, "malformed_json": 1}
    assert [(line, reason) for line, reason, _ in report.examples] == [
        (2, "invalid_text"), (3, "malformed_json"), (4, "invalid_text"), (5, "invalid_text")]
    assert "prompt[0].content" in report.examples[0][2] and "chosen" in report.examples[2][2]
    assert "prompt[0].content" in report.examples[3][2]
    check_invariant(report)
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert tokenize_pairs(tok, pairs)[1].kept == 2
    with pytest.raises(Exception):  # why the loader checks: the Rust tokenizer refuses such a string
        tok.encode("p\ud800")


def test_labels_only_ascii_digits(tmp_path):
    """'²' and '١' (Arabic-Indic one) are digits to str.isdigit(); '²' is no number to int(). Both
    are invalid labels, skipped, never a crash; ' 2 ' (spaces) is still the label 2."""
    rows = [{"question": "q", "response_1": "a", "response_2": "b", "overall_response": label}
            for label in ("\u00b2", "\u0661", " 2 ", 1)]
    pairs, report = load_preferences(write_jsonl(tmp_path / "labels.jsonl", rows))
    assert [(p.line, p.chosen) for p in pairs] == [(3, "b"), (4, "a")]
    assert report.skipped == {"invalid_label": 2}
    assert [line for line, _, _ in report.examples] == [1, 2]


@pytest.mark.parametrize("name,content,message", [
    ("nowhere.jsonl", None, "preference data file not found: .*nowhere.jsonl"),
    ("plain.jsonl.gz", b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n', "plain.jsonl.gz: not a gzip file"),
    ("cut.jsonl.gz", "truncated-jsonl", r"cut.jsonl.gz: the compressed file is truncated after line \d+"),
    ("cut.json.gz", "truncated-json", "cut.json.gz: the compressed file is truncated"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "deep.json: not valid JSON"),
    ("unknown.jsonl", b'{"text": "x"}\n', r"unknown.jsonl, line 1: cannot detect .*align_anything: question, "
                                           r"response_1.*hh_rlhf: chosen, rejected.*--data_format"),
], ids=["missing", "not gzip", "truncated jsonl.gz", "truncated json.gz", "nested too deeply", "unknown format"])
def test_damaged_files_are_one_user_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "truncated-jsonl":
        data = gzip.compress(b"".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}).encode() + b"\n"
                                      for i in range(200)))
        content = data[: len(data) // 2]
    elif content == "truncated-json":
        data = gzip.compress(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 200).encode())
        content = data[: len(data) // 2]
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as caught:
        load_preferences(path)
    assert "\n" not in str(caught.value)
    if content is None:
        assert isinstance(caught.value, MissingFileError) and isinstance(caught.value, FileNotFoundError)
