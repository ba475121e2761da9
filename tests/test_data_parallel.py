"""Both trainers under `torchrun --nproc_per_node 2` (gloo on CPU) equal one process:
2 ranks x batch B = 1 rank x batch 2B = 1 rank x batch B x accumulation 2, step by step
and in the final weights; evaluation over an odd number of pairs gives the same metrics."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, world, out, nproc, *extra):
    common = ["--model", str(world["model"]), "--data", str(world["data"]), "--eval_data", str(world["eval11"]),
              "--output", str(out), "--max_length", "64", "--max_prompt_length", "32", "--lr", "1e-3",
              "--max_steps", "4", "--warmup_ratio", "0.25", *extra]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / script), *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(ROOT / script), *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout}\n{p.stderr}"
    return p


def metrics(out, split):
    recs = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["split"] == split]


def same(a_out, b_out, keys):
    for ra, rb in zip(metrics(a_out, "train"), metrics(b_out, "train"), strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), (k, ra["step"])
    ea, eb = metrics(a_out, "eval")[-1], metrics(b_out, "eval")[-1]
    for k in keys:
        assert ea[k] == pytest.approx(eb[k], rel=1e-6, abs=1e-6), k  # fp32 sums in another order
    wa = load_file(str(Path(a_out) / "model" / "model.safetensors"))
    wb = load_file(str(Path(b_out) / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)


@pytest.fixture(scope="module")
def world(tiny_world):
    eval11 = tiny_world["root"] / "eval11.jsonl"  # an odd number of eval pairs: shards of 6 and 5
    eval11.write_text("".join(open(tiny_world["data"]).readlines()[:11]))
    return {**tiny_world, "eval11": eval11}


def test_reward_model_two_ranks_equal_one(world, tmp_path):
    launch("train_rm.py", world, tmp_path / "one", 1, "--batch_size", "8")
    launch("train_rm.py", world, tmp_path / "accum", 1, "--batch_size", "4", "--grad_accum", "2")
    two = launch("train_rm.py", world, tmp_path / "two", 2, "--batch_size", "4")
    assert two.stdout.count("step 4/4") == 1  # only rank 0 prints
    keys = ("loss", "accuracy", "margin")
    same(tmp_path / "one", tmp_path / "two", keys)
    same(tmp_path / "one", tmp_path / "accum", keys)
    assert metrics(tmp_path / "two", "eval")[-1]["accuracy"] * 11 == pytest.approx(
        round(metrics(tmp_path / "two", "eval")[-1]["accuracy"] * 11))  # counts over all 11 pairs


def test_dpo_two_ranks_equal_one_live_and_precomputed(world, tmp_path):
    launch("train_dpo.py", world, tmp_path / "one", 1, "--batch_size", "8")
    launch("train_dpo.py", world, tmp_path / "two", 2, "--batch_size", "4")
    two_pre = launch("train_dpo.py", world, tmp_path / "two_pre", 2, "--batch_size", "4", "--precompute_ref",
                     "--ref_cache_dir", str(tmp_path / "cache"))
    keys = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen")
    same(tmp_path / "one", tmp_path / "two", keys)
    same(tmp_path / "one", tmp_path / "two_pre", keys)
    assert "computed" in two_pre.stdout
    # the cache written by 2 ranks is complete: a 1-rank run reuses it and matches
    one_pre = launch("train_dpo.py", world, tmp_path / "one_pre", 1, "--batch_size", "8", "--precompute_ref",
                     "--ref_cache_dir", str(tmp_path / "cache"))
    assert "reused" in one_pre.stdout
    same(tmp_path / "one", tmp_path / "one_pre", keys)
