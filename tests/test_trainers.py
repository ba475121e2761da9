"""train_rm.py and train_dpo.py run as a user runs them (subprocesses), checked against
invariants: accumulation equals a larger batch, a killed-and-resumed run equals an
uninterrupted one, DPO starts at ln 2 with zero margins, precomputed reference log-probs
equal the live reference, and a non-finite loss stops with a clear error."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import minialign
from conftest import records
from minialign.distributed import DistEnv
from minialign.reducer import GradReducer
from minialign.run_folder import RunFolder
from minialign.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch_size", "4", "--max_length", "64", "--max_prompt_length", "32", "--log_every", "1",
         "--warmup_ratio", "0.1"]


def run(script, world, out, *extra, check=True):
    cmd = [sys.executable, str(ROOT / script), "--model", str(world["model"]), "--data", str(world["data"]),
           "--output", str(out), *SMALL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed:\n{p.stdout}\n{p.stderr}")
    return p


def weights(out):
    return load_file(str(Path(out) / "model" / "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_reward_model_learns_and_writes_its_outputs(tiny_world, tmp_path):
    out = tmp_path / "rm"
    run("train_rm.py", tiny_world, out, "--max_steps", "30", "--batch_size", "8", "--lr", "2e-3",
        "--eval_every", "10")
    final = records(out, "eval")[-1]
    assert final["accuracy"] >= 0.9, final  # the correct, plain answer is easy to prefer
    assert [r["step"] for r in records(out, "eval")] == [10, 20, 30]
    for name in ("run_config.json", "metrics.jsonl", "curves.png", "model/config.json", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and cfg["pad_token_id"] is not None
    assert isinstance(minialign.load_model(out / "model"), minialign.RewardModel)
    rec = records(out)[-1]
    for key in ("loss", "accuracy", "lr", "tokens_per_s", "grad_norm", "elapsed_s"):
        assert key in rec


def test_grad_accumulation_equals_larger_batch(tiny_world, tmp_path):
    """batch 8 x accum 1 and batch 4 x accum 2 see the same 8 pairs per step, and the loss is
    divided by B * accum: same losses and the same weights up to float rounding."""
    run("train_rm.py", tiny_world, tmp_path / "a", "--max_steps", "4", "--batch_size", "8", "--lr", "1e-3")
    run("train_rm.py", tiny_world, tmp_path / "b", "--max_steps", "4", "--batch_size", "4", "--grad_accum", "2",
        "--lr", "1e-3")
    la = [r["loss"] for r in records(tmp_path / "a")]
    lb = [r["loss"] for r in records(tmp_path / "b")]
    assert la == pytest.approx(lb, abs=1e-5)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"), atol=1e-5)


def test_killed_and_resumed_run_equals_uninterrupted(tiny_world, tmp_path):
    """SIGKILL the run mid-training (after its step-4 checkpoint), resume: identical weights."""
    args = ["--max_steps", "12", "--save_every", "2", "--lr", "1e-3", "--eval_every", "5"]
    run("train_rm.py", tiny_world, tmp_path / "whole", *args)

    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_rm.py"), "--model", str(tiny_world["model"]), "--data",
           str(tiny_world["data"]), "--output", str(out), *SMALL, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step 5/12"):  # checkpoint 4 is complete; step 6 is being computed
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "model").exists()
    run("train_rm.py", tiny_world, out, *args, "--resume")
    # Two processes computed these weights: equal to rounding (torch does not promise bits across
    # model objects); the tolerance is far below what one training step moves a weight.
    assert_same_weights(weights(tmp_path / "whole"), weights(out), atol=1e-6)
    steps = [r["step"] for r in records(out)]
    assert steps == list(range(1, 13))  # no step logged twice after the resume


def test_dpo_starts_at_ln2_and_precomputed_reference_equals_live(tiny_world, tmp_path):
    live = run("train_dpo.py", tiny_world, tmp_path / "live", "--max_steps", "5", "--lr", "1e-3")
    first = records(tmp_path / "live")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    pre = run("train_dpo.py", tiny_world, tmp_path / "pre", "--max_steps", "5", "--lr", "1e-3", "--precompute_ref")
    assert "computed" in pre.stdout and "reused" not in pre.stdout
    # Only the 5 steps' 5 x 4 = 20 training pairs are computed, not the whole split (issue #26).
    assert "the run's steps use 20 of" in pre.stdout and "for train: computed 20 pairs" in pre.stdout
    for a, b in zip(records(tmp_path / "live"), records(tmp_path / "pre")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    # A new run in the same folder (--overwrite) finds the cached reference log-probs.
    again = run("train_dpo.py", tiny_world, tmp_path / "pre", "--max_steps", "5", "--lr", "1e-3", "--precompute_ref",
                "--overwrite")
    assert "reused" in again.stdout and "computed" not in again.stdout
    assert_same_weights(weights(tmp_path / "live"), weights(tmp_path / "pre"), atol=1e-5)
    assert live.returncode == 0


def test_simpo_loads_no_reference(tiny_world, tmp_path):
    """A reference path that does not exist is never opened by SimPO."""
    run("train_dpo.py", tiny_world, tmp_path / "simpo", "--max_steps", "2", "--loss_type", "simpo",
        "--ref_model", str(tmp_path / "no_such_model"), "--beta", "2.0")
    assert records(tmp_path / "simpo")[-1]["loss"] > 0


def train_in_process(model, objective, train_items, eval_items, out, tok, **settings):
    """train() in this process on one rank, with the SMALL settings, into run folder `out`."""
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    cfg = TrainConfig(**{"lr": 1e-3, "batch_size": 4, "warmup_ratio": 0.1, **settings})
    run = RunFolder(out, env)
    run.claim(resume=False, overwrite=False, run_config={})
    return train(model, objective, train_items, eval_items, cfg, env, tok, GradReducer(model, env), run)


def _tokenized(world):
    from minialign.collate import tokenize_pairs
    from minialign.data import load_preferences

    tok = minialign.load_tokenizer(world["model"])
    pairs, _ = load_preferences(world["data"])
    items, _ = tokenize_pairs(tok, pairs, max_length=64)
    return tok, items


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "simpo"])
def test_every_dpo_loss_moves_the_margin_up(tiny_world, tmp_path, loss_type):
    from minialign.dpo import DPOObjective, LiveReference

    tok, items = _tokenized(tiny_world)
    policy = minialign.load_model(tiny_world["model"])
    ref = None if loss_type == "simpo" else LiveReference(minialign.load_model(tiny_world["model"]).eval())
    smoothing = 0.1 if loss_type == "robust" else 0.0
    beta = 2.0 if loss_type == "simpo" else 0.1
    objective = DPOObjective(loss_type, beta=beta, label_smoothing=smoothing, simpo_gamma=0.5, reference=ref)
    _, recs = train_in_process(policy, objective, items[:128], items[128:], tmp_path, tok, max_steps=15, lr=3e-3)
    train_recs = [r for r in recs if r["split"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in train_recs)
    first_margin = train_recs[0]["rewards/margins"]
    assert recs[-1]["split"] == "eval" and recs[-1]["rewards/margins"] > first_margin + 0.05


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_world, tmp_path):
    from minialign.reward import RewardObjective

    tok, items = _tokenized(tiny_world)
    model = minialign.load_model(tiny_world["model"], reward=True)
    good = RewardObjective()
    calls = {"n": 0}

    def loss(m, batch):  # the 4th micro-batch returns NaN
        calls["n"] += 1
        losses, *rewards_and_sums = good.loss(m, batch)
        return (losses * float("nan") if calls["n"] == 4 else losses), *rewards_and_sums

    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 4.*step-000002"):
        objective = SimpleNamespace(loss=loss, summarize=good.summarize, headline=good.headline)
        train_in_process(model, objective, items, [], tmp_path, tok, max_steps=10, save_every=2)
    ckpt = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text()
    assert ckpt.name == "step-000002"
    reloaded = minialign.load_model(ckpt)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_bf16_run_holds_the_reference_in_bf16_and_still_starts_at_ln2(tiny_world, tmp_path):
    """Under --dtype bf16 the frozen reference keeps its linear weights in bf16 (precision.py); run
    under the same autocast it computes exactly what the fp32-master policy computes, so the first
    DPO loss is still ln 2 and the margins 0. RPO logs its two terms apart."""
    run("train_dpo.py", tiny_world, tmp_path / "bf16", "--max_steps", "2", "--dtype", "bf16", "--rpo_alpha", "0.5")
    first = records(tmp_path / "bf16")[0]
    assert first["loss/preference"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(first["loss/preference"] + 0.5 * first["loss/nll"], abs=1e-5)


def test_frozen_bf16_copy_equals_fp32_model_under_autocast(tiny_world):
    from minialign.packing import answer_logps, collate_pairs
    from minialign.precision import autocast_context, hold_frozen_in_bf16

    tok, items = _tokenized(tiny_world)
    batch = collate_pairs(items[:4], tok.pad_token_id)
    model = minialign.load_model(tiny_world["model"]).eval()
    frozen = hold_frozen_in_bf16(minialign.load_model(tiny_world["model"]).eval())
    assert frozen.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert frozen.model.embed_tokens.weight.dtype == torch.float32  # the (tied) embedding is no autocast matmul
    assert frozen.model.norm.weight.dtype == torch.float32
    with torch.no_grad(), autocast_context("bf16", torch.device("cpu")):
        a, b = torch.cat(answer_logps(model, batch)[:2]), torch.cat(answer_logps(frozen, batch)[:2])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("script,extra", [("train_rm.py", ()), ("train_dpo.py", ("--precompute_ref",)),
                                          ("train_dpo.py", ("--gradient_checkpointing", "--grad_accum", "2"))])
def test_prefix_sharing_trains_exactly_like_two_rows(tiny_world, tmp_path, script, extra):
    """The packed [prompt | chosen | rejected] layout (the default) and --no-prefix_sharing give the
    same step-by-step losses and the same final weights, to float rounding (the forward is exact:
    packing.py's docstring; tests/test_packing.py checks every gradient)."""
    args = ("--max_steps", "4", "--lr", "1e-3", *extra)
    packed = run(script, tiny_world, tmp_path / "packed", *args)
    run(script, tiny_world, tmp_path / "rows", *args, "--no-prefix_sharing")
    assert "one row [prompt | chosen | rejected] per pair" in packed.stdout
    for a, b in zip(records(tmp_path / "packed"), records(tmp_path / "rows"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert_same_weights(weights(tmp_path / "packed"), weights(tmp_path / "rows"), atol=1e-5)


def test_beta_default_is_each_losss_own():
    """SimPO's beta scales a per-token mean log-prob (Meng et al. 2024 use 2-10; 2.0 in their trainer),
    DPO's weighs a KL (Rafailov et al. 2023: 0.1): one default for both would make SimPO ~20x too weak."""
    import train_dpo

    assert train_dpo.parse_args([]).beta == 0.1
    assert train_dpo.parse_args(["--loss_type", "simpo"]).beta == 2.0
    assert train_dpo.parse_args(["--loss_type", "simpo", "--beta", "0.5"]).beta == 0.5


@pytest.mark.parametrize("max_steps", [1, 3, 7])
def test_pairs_used_are_the_pairs_the_steps_take(max_steps):
    """StepPlan.pairs_used (what --precompute_ref computes) is the union of the pairs that the run's
    steps take (micro_batches, step by step): 10 pairs, global batch 4, 2 steps per epoch, 1 to 4 epochs."""
    from minialign.sampler import StepPlan

    plan = StepPlan(10, batch_size=4, grad_accum=1, rank=0, world_size=1, seed=3, max_steps=max_steps,
                    lengths=[i % 4 for i in range(10)])
    taken = {i for step in range(max_steps) for mb in plan.micro_batches(step) for i in mb}
    assert plan.pairs_used() == sorted(taken)
    assert len(taken) == 4 if max_steps == 1 else len(taken) > 4
