"""evaluate.py end to end: tiny random models on a tiny preference file, every subcommand run as
a user would (a subprocess from the repository root). Checks that each output is written, that
figures are real PNGs, and that summary.json agrees with the per-item files it summarises; and
that under torchrun (2 gloo ranks) rm, dpo and implicit give what one process gives.
About 30 s on 2 CPU cores (most of it the interpreter and torch import of each subprocess), plus
about a minute for the slow 2-rank test and half a minute for the slow generation-cache test."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minialign import load_model, load_tokenizer, save_model
from minialign.collate import tokenize_pairs
from minialign.distributed import DistEnv
from minialign.data import load_preferences
from minialign.eval_models import implicit_rewards, map_batches
from minialign.packing import answer_logps, collate_pairs
from minialign.reward import conversation_ids, score_responses
from minialign.config import ModelConfig
from minialign.model import CausalLM, RewardModel

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIALIGN_SHARED", REPO.parent / "shared"))
HH_RLHF = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PROMPT_LENGTH = 16  # cuts 2 of the 4 QUESTIONS (rendered with ChatML: 17, 20, 16, 16 tokens)
MIN_FIGURE_BYTES = 10_000  # a blank 4-panel figure is already larger; an empty or failed save is not

QUESTIONS = ["What is the capital of France?", "Can you write a short poem about the sea?",
             "What is two plus two?", "How are you today?"]
ANSWERS = ["Paris.", "The capital of France is Paris, a large city.", "Four.", "Two plus two is four.",
           "The sea is blue and wide.", "I am fine, thank you.", "Sure.", "Hello!"]


def run_cli(*args, timeout=120, nproc=None):
    """evaluate.py as a user runs it; nproc: under torchrun with that many ranks (gloo on CPU).
    One thread per process either way, so that one process and each rank compute alike."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                         f"--master_port={free_port()}"]
    proc = subprocess.run([sys.executable, *launcher, "evaluate.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"evaluate.py {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > MIN_FIGURE_BYTES, f"{path} is only {len(data)} bytes"


def tiny_config(tok):
    return ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_dir):
    """base and policy (two random causal LMs), a random reward model, and 16 align-anything
    pairs over 4 prompts, where overall_response alternates between 1 and 2."""
    root = tmp_path_factory.mktemp("eval_world")
    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = tiny_config(tok)
    for name, seed, cls in (("base", 0, CausalLM), ("policy", 1, CausalLM), ("rm", 2, RewardModel)):
        torch.manual_seed(seed)
        save_model(cls(cfg), root / name, tok)
    records = [{"question": QUESTIONS[i % 4], "response_1": ANSWERS[i % 8], "response_2": ANSWERS[(i + 3) % 8],
                "overall_response": 1 + i % 2} for i in range(16)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "data": data, "records": records, "tok": tok}


def test_rm(world):
    out = world["root"] / "eval_rm"
    stdout = run_cli("rm", "--reward_model", world["root"] / "rm", "--data", world["data"], "--output", out,
                     "--batch_size", 5, "--n_resamples", 200)
    assert "accuracy" in stdout and str(out / "summary.json") in stdout
    summary = json.loads((out / "summary.json").read_text())
    pairs = json.loads((out / "pairs.json").read_text())
    check_png(out / "rm_eval.png")

    assert summary["n"] == len(pairs) == 16
    correct = [p["correct"] for p in pairs]
    assert summary["accuracy"] == pytest.approx(np.mean(correct))
    assert summary["ties"] == sum(p["tie"] for p in pairs)
    assert summary["correct"] + summary["ties"] + summary["wrong"] == summary["n"]
    lo, hi = summary["accuracy_ci95"]
    assert 0 <= lo <= summary["accuracy"] <= hi <= 1
    assert summary["mean_margin"] == pytest.approx(np.mean([p["better_reward"] - p["worse_reward"] for p in pairs]))
    for p in pairs:
        assert p["correct"] == (p["better_reward"] > p["worse_reward"])
    # "better" is the response that overall_response names (the file's label, read independently).
    for p, r in zip(pairs, world["records"]):
        assert p["better"] == r[f"response_{r['overall_response']}"]
    lb = summary["length_bias"]
    assert -1 <= lb["reward_length_pearson"] <= 1 and "tokens" in lb["length_unit"]
    assert lb["n_better_longer"] + lb["n_better_shorter"] + lb["n_equal_length"] == 16
    # Scored one packed row per pair, in length-grouped batches: each reward equals the two-row path
    # (every conversation its own right-padded row, batches in file order) within 1e-5, in file order.
    assert [p["line"] for p in pairs] == list(range(1, 17))
    model = load_model(world["root"] / "rm").eval()
    for side in ("better", "worse"):
        two_rows = score_responses(model, world["tok"], [p["prompt"] for p in pairs], [p[side] for p in pairs],
                                   batch_size=3, max_length=1024, max_prompt_length=512)
        assert [p[f"{side}_reward"] for p in pairs] == pytest.approx(two_rows, abs=1e-5, rel=0)


def test_scoring_truncates_as_training(world):
    """reward.conversation_ids cuts a conversation exactly as training tokenizes the pair
    (collate.tokenize_pairs with the same max_length and prompt budget): the prompt budget first,
    then what fits beside the answer, the answer never; and evaluate.py rm drops and reports a pair
    that training drops. The prompts here render to 17-20 tokens, the answers to 3-12."""
    tok = world["tok"]
    pairs = load_preferences(world["data"])[0]
    cut = 0
    for max_length, budget in ((24, 12), (20, 16), (40, 30), (1024, 512)):
        items, _ = tokenize_pairs(tok, pairs, max_length=max_length, max_prompt_length=budget)
        for it in items:
            pair = next(p for p in pairs if p.line == it.line)
            for answer, ids in ((pair.chosen, it.chosen_ids), (pair.rejected, it.rejected_ids)):
                got = conversation_ids(tok, pair.prompt, answer, max_length, budget)
                # Training keeps one prompt cut for both answers (room beside the longer one); alone,
                # an answer's conversation keeps as much prompt as fits beside it, within the budget.
                full_prompt = tok.encode(tok.apply_chat_template(pair.prompt, add_generation_prompt=True))
                keep = min(len(full_prompt), budget, max_length - len(ids))
                assert got == full_prompt[len(full_prompt) - keep:] + ids
                if len(ids) == max(len(it.chosen_ids), len(it.rejected_ids)):  # it set training's cut
                    assert got == it.prompt_ids + ids
                cut += keep < len(full_prompt)
    assert cut > 0  # the cases above do cut prompts
    # A pair whose longer answer alone fills --max_length: training drops it, so does evaluate.py rm.
    out = world["root"] / "eval_rm_short"
    stdout = run_cli("rm", "--reward_model", world["root"] / "rm", "--data", world["data"], "--output", out,
                     "--max_length", 12, "--n_resamples", 20)
    _, stats = tokenize_pairs(tok, pairs, max_length=12, max_prompt_length=6)
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < stats.dropped["over_length"] < 16 and summary["n"] == stats.kept
    assert summary["data_skipped"]["over_length"] == stats.dropped["over_length"] and "over_length" in stdout


def test_dpo(world):
    out = world["root"] / "eval_dpo"
    root = world["root"]
    stdout = run_cli("dpo", "--base", root / "base", "--policy", root / "policy", "--reward_model", root / "rm",
                     "--data", world["data"], "--output", out, "--num_prompts", 10, "--max_new_tokens", 12,
                     "--temperature", 1.0, "--top_p", 0.95, "--batch_size", 3, "--top_k_report", 2,
                     "--n_resamples", 200, "--max_prompt_length", MAX_PROMPT_LENGTH)
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "generations.json").read_text())
    check_png(out / "dpo_eval.png")
    report = (out / "report.md").read_text()

    assert summary["n"] == len(rows) == 4  # 16 pairs share 4 distinct prompts; --num_prompts 10 caps nothing
    base = np.array([r["base"]["reward"] for r in rows])
    pol = np.array([r["policy"]["reward"] for r in rows])
    assert summary["win_rate"] == pytest.approx(np.mean(pol > base))
    assert summary["ties"] == int(np.sum(pol == base))
    assert summary["wins"] + summary["ties"] + summary["losses"] == 4
    assert summary["mean_gain"] == pytest.approx(np.mean(pol - base))
    lo, hi = summary["win_rate_ci95"]
    assert 0 <= lo <= summary["win_rate"] <= hi <= 1
    for who in ("base", "policy"):
        answers = [a for r in rows for a in r[who]["samples"]]
        assert len(answers) == 4 and all(r[who]["reward"] == r[who]["samples"][0]["reward"] for r in rows)
        lengths = [a["length_tokens"] for a in answers]
        assert all(0 <= n <= 12 for n in lengths)
        assert summary[who]["mean_length_tokens"] == pytest.approx(np.mean(lengths))
        assert summary[who]["stop_rate"] == pytest.approx(np.mean([a["finished"] for a in answers]))
        assert 0 <= summary[who]["repetition_3gram"] <= 1
        # An unfinished response used its whole budget.
        assert all(a["length_tokens"] == 12 for a in answers if not a["finished"])
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": q}] for q in QUESTIONS]
    assert "2 largest gains" in report and "2 largest losses" in report and "| stopped with end of turn |" in report
    # Prompts longer than --max_prompt_length were cut for generation, counted independently here.
    tok = world["tok"]
    lengths = [len(tok.encode(tok.apply_chat_template(r["prompt"], add_generation_prompt=True))) for r in rows]
    cut = [n > MAX_PROMPT_LENGTH for n in lengths]
    assert 0 < sum(cut) < len(cut)  # the test exercises both kinds
    assert [r["prompt_truncated"] for r in rows] == cut and summary["prompts_truncated"] == sum(cut)
    assert f"{sum(cut)} prompt(s) longer than max_prompt_length {MAX_PROMPT_LENGTH}" in report
    assert "generating base answers: 4/4 answers" in stdout and "scoring policy answers: 4/4" in stdout

    # Ties as 1/2, from the per-prompt rewards; the length-controlled view is present and sane.
    outcome = np.where(pol > base, 1.0, np.where(pol == base, 0.5, 0.0))
    assert summary["win_rate_ties_half"] == pytest.approx(outcome.mean())
    lo, hi = summary["win_rate_ties_half_ci95"]
    assert 0 <= lo <= summary["win_rate_ties_half"] <= hi <= 1
    diffs = [np.mean([a["length_tokens"] for a in r["policy"]["samples"]])
             - np.mean([a["length_tokens"] for a in r["base"]["samples"]]) for r in rows]
    assert [r["length_diff_tokens"] for r in rows] == pytest.approx(diffs)
    assert summary["mean_length_diff_tokens"] == pytest.approx(np.mean(diffs))
    assert 0 <= summary["length_controlled"]["win_rate"] <= 1
    assert sum(summary["length_buckets"][b]["n"] for b in ("shorter", "similar", "longer")) == 4
    # The KL: each policy answer's log-ratio, its tokens counting the stop token when it stopped.
    answers = [a for r in rows for a in r["policy"]["samples"]]
    ratios = [a["log_ratio"] for a in answers]
    tokens = [a["length_tokens"] + a["finished"] for a in answers]
    assert summary["kl"]["kl_per_answer"] == pytest.approx(np.mean(ratios))
    assert summary["kl"]["kl_per_token"] == pytest.approx(np.sum(ratios) / np.sum(tokens))
    assert summary["kl"]["tokens"] == sum(tokens) and "log_ratio" not in rows[0]["base"]["samples"][0]
    assert "length-controlled win rate" in stdout and "KL per token" in stdout
    assert "Length-controlled win rate" in report and "KL from the base" in report


def test_dpo_policy_equal_to_base(world):
    """Invariant through the whole command: a policy that is the base (same folder, same seeds)
    writes the base's answers, so every prompt ties: strict win rate 0, ties as 1/2 exactly 0.5,
    length-controlled 0.5 (no length difference, outcome 1/2 everywhere), KL 0 (two loads of the
    same weights: equal within 1e-6)."""
    out = world["root"] / "eval_dpo_same"
    root = world["root"]
    proc = run_cli("dpo", "--base", root / "base", "--policy", root / "base", "--reward_model", root / "rm",
                   "--data", world["data"], "--output", out, "--samples_per_prompt", 2, "--max_new_tokens", 8,
                   "--temperature", 1.0, "--n_resamples", 50)
    summary = json.loads((out / "summary.json").read_text())
    # Said, not left to the reader of "win rate 0.0" (issue #26, item 10); no "tanh(length difference / 0.0)".
    report = (out / "report.md").read_text()
    assert "--policy and --base are the same model" in proc and summary["same_model"] is True
    assert "the same model (identical weight files)" in report and "/ 0.0)" not in report
    assert (summary["win_rate"], summary["ties"], summary["win_rate_ties_half"]) == (0.0, 4, 0.5)
    assert summary["mean_length_diff_tokens"] == 0 and summary["length_controlled"]["win_rate"] == pytest.approx(0.5)
    assert abs(summary["kl"]["kl_per_token"]) < 1e-6 and abs(summary["kl"]["kl_per_answer"]) < 1e-6


@pytest.mark.slow
def test_dpo_generation_cache_reuses_only_identical_settings(world):
    """--generation_cache: a second evaluation with the same base, prompts and sampling reads the
    base's answers and their rewards back (the same texts, no regeneration); one with another
    max_new_tokens, or another seed, makes new ones. --skip_kl leaves the KL out."""
    root, cache = world["root"], world["root"] / "gen_cache"
    argv = ["dpo", "--base", root / "base", "--policy", root / "policy", "--reward_model", root / "rm",
            "--data", world["data"], "--samples_per_prompt", 2, "--temperature", 1.0, "--n_resamples", 50,
            "--generation_cache", cache]
    first = run_cli(*argv, "--max_new_tokens", 8, "--output", root / "cache_a")
    again = run_cli(*argv, "--max_new_tokens", 8, "--output", root / "cache_b", "--skip_kl")
    other = run_cli(*argv, "--max_new_tokens", 6, "--output", root / "cache_c", "--seed", 1)
    assert "base_answers: stored" in first and "base_rewards: stored" in first
    assert "base_answers: reused" in again and "base_rewards: reused" in again
    assert "generating base answers" not in again and "generating policy answers" in again
    assert "reused" not in other and "generating base answers" in other
    a, b, c = (json.loads((root / f"cache_{x}" / "generations.json").read_text()) for x in "abc")
    assert [r["base"] for r in a] == [r["base"] for r in b]  # texts, rewards, lengths: all read back
    assert max(s["length_tokens"] for r in c for s in r["base"]["samples"]) <= 6
    sa, sb = (json.loads((root / f"cache_{x}" / "summary.json").read_text()) for x in "ab")
    assert not sa["base_answers_reused"] and sb["base_answers_reused"] and "kl" in sa and "kl" not in sb
    assert len(list(cache.glob("base_answers-*.json"))) == 2 and len(list(cache.glob("base_rewards-*.json"))) == 2



def test_dpo_several_answers_per_prompt(world):
    """With k answers per prompt, a prompt's reward is the mean over its k answers, and wins
    and gains compare those means; per-model statistics run over all N * k answers."""
    out = world["root"] / "eval_dpo_k3"
    root = world["root"]
    run_cli("dpo", "--base", root / "base", "--policy", root / "policy", "--reward_model", root / "rm",
            "--data", world["data"], "--output", out, "--samples_per_prompt", 3, "--max_new_tokens", 10,
            "--temperature", 1.0, "--top_p", 1.0, "--batch_size", 5, "--n_resamples", 100)
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "generations.json").read_text())
    assert summary["n"] == len(rows) == 4 and summary["samples_per_prompt"] == 3
    for r in rows:
        for who in ("base", "policy"):
            assert len(r[who]["samples"]) == 3
            assert r[who]["reward"] == pytest.approx(np.mean([a["reward"] for a in r[who]["samples"]]))
        assert r["gain"] == pytest.approx(r["policy"]["reward"] - r["base"]["reward"])
    base = np.array([r["base"]["reward"] for r in rows])
    pol = np.array([r["policy"]["reward"] for r in rows])
    assert summary["win_rate"] == pytest.approx(np.mean(pol > base))
    assert summary["mean_gain"] == pytest.approx(np.mean(pol - base))
    answers = [a for r in rows for a in r["base"]["samples"]]
    assert summary["base"]["reward_mean"] == pytest.approx(np.mean([a["reward"] for a in answers]))
    assert summary["base"]["stop_rate"] == pytest.approx(np.mean([a["finished"] for a in answers]))
    # Sampling at temperature 1 gives the same prompt different answers.
    assert any(len({a["response"] for a in r["base"]["samples"]}) > 1 for r in rows)
    assert "answer 3 of 3" in (out / "report.md").read_text()
    check_png(out / "dpo_eval.png")

def test_implicit(world):
    out = world["root"] / "eval_implicit"
    root = world["root"]
    run_cli("implicit", "--policy", root / "policy", "--ref_model", root / "base", "--data", world["data"],
            "--output", out, "--beta", 0.5, "--batch_size", 4, "--n_resamples", 200)
    summary = json.loads((out / "summary.json").read_text())
    pairs = json.loads((out / "pairs.json").read_text())
    assert summary["n"] == len(pairs) == 16
    assert summary["accuracy"] == pytest.approx(np.mean([p["correct"] for p in pairs]))
    lo, hi = summary["accuracy_ci95"]
    assert 0 <= lo <= summary["accuracy"] <= hi <= 1
    for p in pairs:  # r = beta * (log pi - log ref), DPO eq. 5
        assert p["chosen_reward"] == pytest.approx(0.5 * (p["policy_logps"][0] - p["ref_logps"][0]), abs=1e-6)
        assert p["rejected_reward"] == pytest.approx(0.5 * (p["policy_logps"][1] - p["ref_logps"][1]), abs=1e-6)


def test_implicit_reward_is_zero_when_policy_is_reference(world):
    """Invariant: a policy equal to its reference has implicit reward 0 on every answer, so every
    pair ties (accuracy 0, tie rate 1) whatever the data."""
    tok = world["tok"]
    model = load_model(world["root"] / "base").eval()
    items, _ = tokenize_pairs(tok, load_preferences(world["data"])[0])
    chosen, rejected, _, _ = implicit_rewards(model, model, items, beta=0.1, batch_size=5,
                                              pad_token_id=tok.pad_token_id)
    assert chosen == [0.0] * 16 and rejected == [0.0] * 16


def test_implicit_rewards_packed_equal_two_rows(world):
    """implicit_rewards scores one packed row per pair; the two-row layout (packing.answer_logps on
    collate_pairs' [2B, T] batch, all 16 pairs at once) gives the same log-probs within 1e-5."""
    tok = world["tok"]
    policy, ref = (load_model(world["root"] / name).eval() for name in ("policy", "base"))
    items, _ = tokenize_pairs(tok, load_preferences(world["data"])[0])
    chosen, rejected, pol_lp, _ = implicit_rewards(policy, ref, items, beta=0.5, batch_size=5,
                                                   pad_token_id=tok.pad_token_id)
    batch = collate_pairs(items, tok.pad_token_id)
    with torch.no_grad():
        pc, pr = (t.double() for t in answer_logps(policy, batch)[:2])
        rc, rr = (t.double() for t in answer_logps(ref, batch)[:2])
    assert [c for c, _ in pol_lp] == pytest.approx(pc.tolist(), abs=1e-5, rel=0)
    assert chosen == pytest.approx((0.5 * (pc - rc)).tolist(), abs=1e-5, rel=0)
    assert rejected == pytest.approx((0.5 * (pr - rr)).tolist(), abs=1e-5, rel=0)


def test_length_grouped_batches_come_back_in_item_order():
    """map_batches with lengths: batches cut from the items sorted by length (ties in item order),
    results in item order. Lengths 5 1 4 1 9 2 7 sort to items 1 3 5 | 2 0 6 | 4."""
    seen = []

    def fn(idx):
        seen.append(list(idx))
        return [10 * i for i in idx]

    out = map_batches(fn, 7, 3, DistEnv(0, 1, 0, torch.device("cpu")), "test", "items", lengths=[5, 1, 4, 1, 9, 2, 7])
    assert seen == [[1, 3, 5], [2, 0, 6], [4]] and out == [0, 10, 20, 30, 40, 50, 60]


def test_curves(world, tmp_path):
    runs = []
    for name, lr in (("run_a", 1e-5), ("run_b", 3e-5)):
        d = tmp_path / name
        d.mkdir()
        recs = [{"step": s, "split": "train", "loss": 0.7 / s, "accuracy": 0.5 + s / 100, "lr": lr}
                for s in range(1, 31)] + [{"step": 30, "split": "eval", "loss": 0.05, "accuracy": 0.7}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "run_config.json").write_text(json.dumps({"lr": lr}))
        runs.append(d)
    out = tmp_path / "cmp"
    stdout = run_cli("curves", *runs, "--output", out, "--metrics", "loss", "accuracy", "rewards/margins")
    check_png(out / "curves.png")
    assert "run_a (lr 1e-05)" in stdout and "run_b (lr 3e-05)" in stdout


@pytest.mark.skipif(not HH_RLHF.is_file(), reason=f"shared data not found at {HH_RLHF} (set MINIALIGN_SHARED)")
def test_rm_on_real_hh_rlhf(world):
    """Real hh-rlhf transcripts (multi-turn prompts) through the tiny reward model, 12 sampled pairs."""
    out = world["root"] / "eval_rm_hh"
    run_cli("rm", "--reward_model", world["root"] / "rm", "--data", HH_RLHF, "--output", out,
            "--num_pairs", 12, "--max_length", 256, "--n_resamples", 200)
    summary = json.loads((out / "summary.json").read_text())
    pairs = json.loads((out / "pairs.json").read_text())
    check_png(out / "rm_eval.png")
    # Pairs whose longer answer alone fills --max_length are dropped, as training drops them (the
    # tiny tokenizer spends many tokens on a long hh-rlhf answer), and reported in summary.json.
    dropped = summary["data_skipped"].get("over_length", 0)
    assert summary["n"] == len(pairs) == 12 - dropped > 0 and summary["data_read"] == 2312
    assert summary["accuracy"] == pytest.approx(np.mean([p["correct"] for p in pairs]))
    lines = [p["line"] for p in pairs]
    assert lines == sorted(lines) and len(set(lines)) == len(pairs)  # a subset without repeats, in file order
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_process(world, tmp_path):
    """Under torchrun with 2 ranks each rank runs every other batch (here 4, 3 and 6 batches:
    uneven shares), exactly the batches one process runs, and rank 0 gathers and writes. So the
    sampled answers are identical (token for token: generation is seeded per prompt) and every
    score matches one process's to 1e-6 (the same arithmetic on the same rows; the tolerance
    covers a kernel that might order a sum differently in another process). Only rank 0 prints.
    For dpo the 2-rank run reads the base's answers that the one-process run stored in
    --generation_cache (rank 0 reads, every rank receives them), and their rewards; the policy's answers,
    their rewards and the KL log-ratios are computed anew by both ranks and match."""
    root = world["root"]
    commands = {
        "rm": ["rm", "--reward_model", root / "rm", "--data", world["data"], "--batch_size", 5],
        "implicit": ["implicit", "--policy", root / "policy", "--ref_model", root / "base", "--data", world["data"],
                     "--batch_size", 3],
        "dpo": ["dpo", "--base", root / "base", "--policy", root / "policy", "--reward_model", root / "rm",
                "--data", world["data"], "--samples_per_prompt", 2, "--batch_size", 3, "--max_new_tokens", 8,
                "--temperature", 1.0, "--max_prompt_length", MAX_PROMPT_LENGTH,
                "--generation_cache", tmp_path / "generation_cache"],
    }
    outputs = {}
    for name, argv in commands.items():
        for nproc in (None, 2):
            out = tmp_path / f"{name}_{nproc or 1}"
            stdout = run_cli(*argv, "--n_resamples", 50, "--output", out, "--device", "cpu", nproc=nproc,
                             timeout=300)
            assert stdout.count("wrote ") == 1
            outputs[name, nproc or 1] = out
            if name == "dpo" and nproc == 2:  # rank 0 read the one-process run's base answers; rank 1 got them
                assert "base_answers: reused" in stdout and "generating base answers" not in stdout

    def close(a, b):
        return a == pytest.approx(b, rel=1e-6, abs=1e-6)

    one, two = (json.loads((outputs["rm", n] / "pairs.json").read_text()) for n in (1, 2))
    assert [p["line"] for p in one] == [p["line"] for p in two] == list(range(1, 17))
    assert all(close(a["better_reward"], b["better_reward"]) and close(a["worse_reward"], b["worse_reward"])
               for a, b in zip(one, two, strict=True))
    one, two = (json.loads((outputs["implicit", n] / "pairs.json").read_text()) for n in (1, 2))
    assert all(a["line"] == b["line"] and close(a["chosen_reward"], b["chosen_reward"])
               and close(a["rejected_reward"], b["rejected_reward"]) for a, b in zip(one, two, strict=True))
    one, two = (json.loads((outputs["dpo", n] / "generations.json").read_text()) for n in (1, 2))
    for a, b in zip(one, two, strict=True):
        for who in ("base", "policy"):
            assert [s["response"] for s in a[who]["samples"]] == [s["response"] for s in b[who]["samples"]]
            assert [s["length_tokens"] for s in a[who]["samples"]] == [s["length_tokens"] for s in b[who]["samples"]]
            assert all(close(s["reward"], t["reward"]) for s, t in zip(a[who]["samples"], b[who]["samples"]))
        assert all(close(s["log_ratio"], t["log_ratio"]) for s, t in zip(a["policy"]["samples"], b["policy"]["samples"]))
    assert any(len({s["response"] for s in r["base"]["samples"]}) > 1 for r in one)  # really sampled
