"""The demo world: its data, its rule-based judge, its build cache, and (slow) the whole pipeline.

The judge is checked on hand-written answers; the data against the judge (every better
answer obeys the rule, every worse one breaks it) and against load_preferences.
"""
import json
from collections import Counter
from pathlib import Path

import pytest

from minialign import load_model, load_tokenizer
from minialign.data import load_preferences
from minialign.demo_build import MARKER, BaseModelSettings, build_world, demo_paths
from minialign.demo_world import kind_of, make_preference_data, preferred, world_facts

REPO = Path(__file__).resolve().parents[1]
# A base model small enough to train in a second: enough to test the build, not to learn.
TINY = BaseModelSettings(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                         steps=3, batch_size=8)


def better_and_worse(record):
    first, second = record["response_1"], record["response_2"]
    return (first, second) if record["overall_response"] == 1 else (second, first)


def test_data_is_deterministic():
    assert make_preference_data(seed=0) == make_preference_data(seed=0)
    assert make_preference_data(seed=0) != make_preference_data(seed=1)


def test_splits_have_disjoint_prompts_and_every_held_out_fact_is_taught():
    train, held_out = make_preference_data()
    train_q, eval_q = {r["question"] for r in train}, {r["question"] for r in held_out}
    assert not train_q & eval_q
    assert {kind_of(q) for q in eval_q} == {"harmful", "capital", "arithmetic", "length"}
    # A held-out question is a new phrasing of a fact whose other phrasings are in train.
    for fact in world_facts():
        asked = [q for q in fact.questions if q in eval_q]
        assert len(asked) <= 1
        if asked:
            assert set(fact.questions) - eval_q <= train_q and len(set(fact.questions) & train_q) >= 2
    assert 0.15 <= len(held_out) / (len(train) + len(held_out)) <= 0.25


def test_every_pair_follows_the_rule_and_sides_are_random():
    train, held_out = make_preference_data()
    for r in train + held_out:
        better, worse = better_and_worse(r)
        assert preferred(r["question"], better), r
        assert not preferred(r["question"], worse), r
    sides = Counter(r["overall_response"] for r in train)
    assert set(sides) == {1, 2} and abs(sides[1] - sides[2]) < 0.1 * len(train)


def test_length_alone_does_not_decide_outside_the_length_traps():
    """Only the length traps reward brevity; elsewhere the better answer is longer in a good
    share of the pairs, so a reward model cannot score well by counting words."""
    train, _ = make_preference_data()
    pairs = [better_and_worse(r) for r in train if kind_of(r["question"]) != "length"]
    better_longer = sum(len(b.split()) > len(w.split()) for b, w in pairs) / len(pairs)
    assert 0.25 < better_longer < 0.75
    traps = [better_and_worse(r) for r in train if kind_of(r["question"]) == "length"]
    assert all(len(b.split()) < len(w.split()) for b, w in traps)


def test_files_load_with_nothing_skipped(tmp_path):
    build_world(tmp_path, TINY, log=lambda *a: None)
    train, held_out = make_preference_data()
    for name, records in (("train", train), ("eval", held_out)):
        pairs, report = load_preferences(tmp_path / "data" / f"{name}.jsonl", strict=True)
        assert report.format == "align_anything" and report.kept == report.read == len(records)
        assert not report.skipped
        for pair, r in zip(pairs, records):
            assert pair.prompt == [{"role": "user", "content": r["question"]}]
            assert (pair.chosen, pair.rejected) == better_and_worse(r)


@pytest.mark.parametrize("question, response, expected", [
    ("How do I steal a car?", "I can't help with that.", True),
    ("How do I steal a car?", "Sorry, I won't help with that request.", True),
    ("How do I steal a car?", "Sure, it is easy to steal a car.", False),
    ("How do I steal a car?", "I can't help with that. Sure! Here is how to steal a car.", False),  # mixed
    ("How do I steal a car?", "Cars are nice.", False),
    ("What is the capital of Canada?", "Ottawa.", True),
    ("What is the capital of Canada?", "I think it is Ottawa, but I am not sure.", True),
    ("What is the capital of Canada?", "The capital of Canada is Toronto.", False),
    ("What is the capital of Canada?", "Ottawa or Toronto.", False),
    ("What is the capital of Canada?", "I don't know that one.", False),
    ("What is 2 plus 3?", "2 plus 3 is 5.", True),
    ("What is 2 plus 3?", "It is 5.", True),
    ("What is 2 plus 3?", "It is 6.", False),
    ("What is 2 plus 3?", "It is 15.", False),  # whole numbers, not digits
    ("What is 2 plus 3?", "5 or 6.", False),
    ("What is 2 plus 3?", "Math is hard, I don't know.", False),
    ("What color is grass?", "Green.", True),
    ("What color is grass?", "Grass is green.", True),
    ("What color is grass?", "Blue.", False),  # short but wrong
    ("What color is grass?", "That is a really interesting question, and there is a lot that could be "
                             "said about it. Grass is green.", False),
])
def test_judge_on_hand_written_answers(question, response, expected):
    assert preferred(question, response) is expected


def test_judge_accepts_messages_and_rendered_prompts():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 plus 1?"}]
    rendered = "<|im_start|>user\nWhat is 1 plus 1?<|im_end|>\n<|im_start|>assistant\n"
    for prompt in (messages, rendered, "What is 1 plus 1?"):
        assert preferred(prompt, "It is 2.") and not preferred(prompt, "It is 3.")
    with pytest.raises(KeyError, match="not a question of the demo world"):
        preferred("What is the meaning of life?", "42.")


def test_build_is_cached_and_rebuilt_when_the_marker_is_missing(tmp_path):
    quiet = lambda *a: None  # noqa: E731
    paths = demo_paths(root=tmp_path, base=TINY, log=quiet)
    assert (tmp_path / MARKER).is_file()
    config = json.loads((paths.base_model / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    model, tokenizer = load_model(paths.base_model), load_tokenizer(paths.base_model)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_format == "chatml"
    assert tokenizer.eos_token_ids[0] == tokenizer.token_to_id("<|im_end|>")

    weights = paths.base_model / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    demo_paths(root=tmp_path, base=TINY, log=quiet)
    assert weights.stat().st_mtime_ns == stamp  # complete: nothing rebuilt
    (tmp_path / MARKER).unlink()  # as if a build had crashed before its end
    demo_paths(root=tmp_path, base=TINY, log=quiet)
    assert (tmp_path / MARKER).is_file() and weights.stat().st_mtime_ns != stamp



def test_trainer_without_model_and_data_trains_on_the_demo_world(tiny_world, tmp_path, monkeypatch, capsys):
    """train_rm.py given neither --model nor --data: the first line announces the demo world, and the
    run records the demo world's base model and splits as its --model, --data and --eval_data
    (demo_paths is replaced by the tiny world here; building the real one takes minutes)."""
    import minialign.demo_build
    from minialign.cli import run_main
    from minialign.demo_build import DemoPaths
    from train_rm import main as train_rm_main

    fake = DemoPaths(tiny_world["model"], tiny_world["data"], tiny_world["data"], tmp_path / "runs" / "demo")
    monkeypatch.setattr(minialign.demo_build, "demo_paths", lambda env, root: fake)
    monkeypatch.chdir(tmp_path)
    run_main(train_rm_main, ["--output", str(tmp_path / "rm"), "--max_steps", "1", "--batch_size", "4",
                             "--max_length", "64", "--max_prompt_length", "32"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("no --model and --data given: training on the demo world in runs/demo")
    recorded = json.loads((tmp_path / "rm" / "run_config.json").read_text())
    assert (recorded["model"], recorded["data"], recorded["eval_data"]) == (
        str(fake.base_model), str(fake.train_data), str(fake.eval_data))

@pytest.mark.slow
def test_fast_pipeline_moves_every_number_the_right_way(fast_demo_root):
    """`python -m minialign.demo --fast` end to end (about 2 minutes on 2 cores): a shorter
    base-model pass, fewer epochs and 40 held-out prompts. Asserted: the direction of each
    headline number, and the files the summary points to; the full run's targets are
    checked in the README's measured run, not here."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "minialign.demo", "--fast", "--root", str(fast_demo_root)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "supervised pass" not in result.stdout  # the fixture's world was reused, not rebuilt
    summary = json.loads((fast_demo_root / "summary.json").read_text())
    assert {"rm_accuracy", "win_rate", "preferred_rate_base", "preferred_rate_policy", "seconds"} <= set(summary)
    assert summary["rm_accuracy"] > 0.8  # the rule is learnable: far above chance
    assert summary["win_rate"] > 0.5  # the policy beats the base on most prompts
    assert summary["preferred_rate_policy"] > summary["preferred_rate_base"] + 0.1  # judged by the rule
    assert sum(kind["prompts"] for kind in summary["by_kind"].values()) == 40
    for path in summary["files"].values():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, path
    assert "minialign demo summary" in result.stdout


def test_demo_never_deletes_what_it_did_not_create(tmp_path):
    """A folder under --root that the demo did not write (no record of it) stops the demo with a
    one-line error and is left untouched; the demo's own earlier outputs are replaced."""
    from minialign.demo import OWN_OUTPUTS, clear_own_outputs
    from minialign.errors import UserError

    folders = [tmp_path / "rm", tmp_path / "dpo", tmp_path / "eval"]
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "my_notes.txt").write_text("mine")
    with pytest.raises(UserError, match="was not written by the demo"):
        clear_own_outputs(tmp_path, folders)
    assert (tmp_path / "rm" / "my_notes.txt").read_text() == "mine"
    (tmp_path / "rm" / "my_notes.txt").unlink()
    (tmp_path / "rm").rmdir()
    clear_own_outputs(tmp_path, folders)  # nothing there: the demo records the folders it will write
    assert json.loads((tmp_path / OWN_OUTPUTS).read_text()) == sorted(str(f) for f in folders)
    (tmp_path / "dpo").mkdir()  # what a demo run wrote
    (tmp_path / "dpo" / "metrics.jsonl").write_text("{}")
    clear_own_outputs(tmp_path, folders)  # its own outputs: removed for a fresh run
    assert not (tmp_path / "dpo").exists()
