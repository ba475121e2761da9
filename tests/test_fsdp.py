"""--fsdp (torch's FSDP2, minialign/fsdp.py) under `torchrun --nproc_per_node 2` on gloo equals one
process without it: 2 ranks x batch 2 x accumulation 2 = 1 rank x batch 8, step by step and in the
final weights (within 1e-5), for both trainers, with gradient checkpointing on and off. Its
checkpoints are the same files as without --fsdp: a run killed at a random step resumes in either
mode and ends with the uninterrupted run's weights. The saved models load in minialign."""
import math
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import minialign
from conftest import records
from minialign.config import ModelConfig
from minialign.model import CausalLM

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WEIGHTS_ATOL = 1e-5  # fp32 sums in another order (reduce-scatter, accumulation); a step moves weights ~1e-3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(script, world, out, nproc, *extra, model=None):
    common = ["--model", str(model or world["model"]), "--data", str(world["data"]), "--eval_data",
              str(world["eval11"]), "--eval_batch_size", "5", "--output", str(out), "--max_length", "64",
              "--max_prompt_length", "32", "--lr", "1e-3", "--warmup_ratio", "0.25", "--dist_timeout", "120", *extra]
    if nproc == 1:
        return [sys.executable, str(ROOT / script), *common]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            str(ROOT / script), *common]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def launch(script, world, out, nproc, *extra, model=None):
    cmd = command(script, world, out, nproc, *extra, model=model)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout}\n{p.stderr}"
    return p


def weights(out, sub="model"):
    return load_file(str(Path(out) / sub / "model.safetensors"))


def assert_same_run(a_out, b_out, keys):
    for ra, rb in zip(records(a_out), records(b_out), strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), (k, ra["step"])
    ea, eb = records(a_out, "eval")[-1], records(b_out, "eval")[-1]
    for k in keys:
        if k in ea:
            assert ea[k] == pytest.approx(eb[k], rel=1e-6, abs=1e-6), k
    wa, wb = weights(a_out), weights(b_out)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=WEIGHTS_ATOL, rtol=0, msg=k)


@pytest.fixture(scope="module")
def world(tiny_world):
    """tiny_world plus 11 eval pairs (shards of 6 and 5: with --eval_batch_size 5 the ranks have 2
    and 1 batches of their own, and a sharded model must still run the same forwards on both)
    and an untied copy of the model (its lm_head is a parameter of its own, as in Qwen2.5-7B)."""
    eval11 = tiny_world["root"] / "eval11.jsonl"
    eval11.write_text("".join(open(tiny_world["data"]).readlines()[:11]))
    untied = tiny_world["root"] / "untied"
    if not untied.exists():
        base = minialign.load_model(tiny_world["model"])
        torch.manual_seed(1)
        cfg = ModelConfig.from_hf_dict({**base.config.raw, "tie_word_embeddings": False})
        minialign.save_model(CausalLM(cfg), untied, minialign.load_tokenizer(tiny_world["model"]))
    return {**tiny_world, "eval11": eval11, "untied": untied}


def test_reward_model_fsdp_equals_one_process(world, tmp_path):
    launch("train_rm.py", world, tmp_path / "one", 1, "--max_steps", "3", "--batch_size", "8")
    for name, extra in (("fsdp", []), ("fsdp_ckpt", ["--gradient_checkpointing"])):
        two = launch("train_rm.py", world, tmp_path / name, 2, "--max_steps", "3", "--batch_size", "2",
                     "--grad_accum", "2", "--fsdp", *extra)
        assert "FSDP2 sharded" in two.stdout and two.stdout.count("step 3/3") == 1
        assert_same_run(tmp_path / "one", tmp_path / name, ("loss", "accuracy", "margin", "grad_norm"))
    assert max(r["grad_norm"] for r in records(tmp_path / "one")) > 1.0  # clipping at 1.0 took part
    model = minialign.load_model(tmp_path / "fsdp_ckpt" / "model")
    assert isinstance(model, minialign.RewardModel)
    for k, v in model.state_dict().items():  # the gathered weights, as written, load as they are
        assert torch.equal(v, weights(tmp_path / "fsdp_ckpt")[k]), k


def test_dpo_fsdp_equals_one_process(world, tmp_path):
    """Untied head (its own root parameter), live reference (sharded too), checkpointing off; tied
    head, reference log-probs precomputed by the sharded reference over uneven shards, checkpointing on."""
    runs = (("untied", []), ("model", ["--gradient_checkpointing", "--precompute_ref"]))
    for model_name, extra in runs:
        m, one, two = world[model_name], tmp_path / f"one_{model_name}", tmp_path / f"fsdp_{model_name}"
        launch("train_dpo.py", world, one, 1, "--max_steps", "3", "--batch_size", "8", model=m)
        launch("train_dpo.py", world, two, 2, "--max_steps", "3", "--batch_size", "2", "--grad_accum", "2", "--fsdp",
               *extra, model=m)
        assert_same_run(one, two, ("loss", "rewards/margins", "logps/chosen", "grad_norm"))
        model = minialign.load_model(two / "model")
        assert isinstance(model, CausalLM)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == (model_name == "model")


def test_dpo_fsdp_bf16_starts_at_ln2(world, tmp_path):
    """Under bf16 the policy computes from its fp32 shards gathered in bf16, the reference is stored
    in bf16: the same bf16 numbers, so the first loss is ln 2 exactly as without --fsdp."""
    launch("train_dpo.py", world, tmp_path / "bf16", 2, "--max_steps", "3", "--batch_size", "4", "--fsdp",
           "--dtype", "bf16", model=world["untied"])
    steps = records(tmp_path / "bf16")
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(w.dtype == torch.float32 for w in weights(tmp_path / "bf16").values())  # fp32 masters saved
    assert records(tmp_path / "bf16", "eval")[-1]["peak_memory_mb"] > 0


def kill_at(cmd, step, total):
    """Start cmd in its own process group and SIGKILL the whole group (torchrun and its workers)
    when rank 0 prints `step {step}/{total}`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=ENV,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/{total}"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed:\n" + "".join(seen)


def test_fsdp_checkpoints_resume_in_either_mode(world, tmp_path):
    """One run, killed twice at random steps: first under --fsdp on 2 ranks, resumed in one process
    without it, killed again, resumed under --fsdp to the end. The checkpoints hold the same files
    either way, so the result is the uninterrupted run's weights (one process, no --fsdp)."""
    total = 10
    args = ["--max_steps", str(total), "--save_every", "2", "--save_total_limit", "0"]
    launch("train_rm.py", world, tmp_path / "whole", 1, *args, "--batch_size", "8")
    first = random.randint(3, 6)
    second = random.randint(first + 2, total - 1)
    out = tmp_path / "interrupted"
    fsdp = ["--batch_size", "4", "--fsdp"]
    kill_at(command("train_rm.py", world, out, 2, *args, *fsdp), first, total)
    kill_at(command("train_rm.py", world, out, 1, *args, "--batch_size", "8", "--resume"), second, total)
    launch("train_rm.py", world, out, 2, *args, *fsdp, "--resume")
    where = f"killed at steps {first} and {second}"
    for k, v in weights(tmp_path / "whole").items():
        torch.testing.assert_close(weights(out)[k], v, atol=WEIGHTS_ATOL, rtol=0, msg=f"{k} ({where})")
    assert [r["step"] for r in records(out)] == list(range(1, total + 1)), where
    # A checkpoint written under --fsdp holds what one written without it holds: the same
    # tensor names, shapes and dtypes in model.safetensors and optimizer.safetensors.
    written_sharded = out / "checkpoints" / f"step-{total - 2:06d}"
    written_plain = tmp_path / "whole" / "checkpoints" / f"step-{total - 2:06d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        with safe_open(str(written_sharded / name), "pt") as a, safe_open(str(written_plain / name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()), name
            for k in a.keys():
                ta, tb = a.get_tensor(k), b.get_tensor(k)
                assert (ta.shape, ta.dtype) == (tb.shape, tb.dtype), k


def test_grad_sync_accumulates_sharded_and_unsharded_alike(tmp_path):
    """FSDPGradSync on 2 ranks, 2 micro-steps: reduce-scattering every micro-step (the default)
    and only the last (accumulate_unsharded) both give each rank its shard of the one-process
    gradient of the mean loss over all 4 micro-batches."""
    worker = tmp_path / "worker.py"
    worker.write_text(GRAD_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(worker)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)},
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("max |diff|") == 2, p.stdout


GRAD_WORKER = r'''
import torch
from minialign.config import ModelConfig
from minialign.distributed import destroy_distributed, init_distributed
from minialign.fsdp import FSDPGradSync, shard
from minialign.model import CausalLM

env = init_distributed(device="cpu")
cfg = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
ids = torch.randint(0, 64, (4, 2, 6), generator=torch.Generator().manual_seed(0))  # (micro-batches, B, T)
mine = [ids[2 * m + env.rank] for m in range(2)]  # this rank's two micro-batches


def loss(model, x):
    return model(x).logsumexp(-1).mean()


torch.manual_seed(0)
plain = CausalLM(cfg)
(sum(loss(plain, x) for x in ids) / len(ids)).backward()  # the mean over all 4 micro-batches
for unsharded in (False, True):
    torch.manual_seed(0)
    model = shard(CausalLM(cfg), env, "fp32")
    sync = FSDPGradSync(model, accumulate_unsharded=unsharded)
    for m, x in enumerate(mine):
        sync.set_sync(m == len(mine) - 1)
        (loss(model, x) / len(mine)).backward()  # this rank's mean; FSDP averages over the 2 ranks
    sync.wait()
    diff = max((p.grad.full_tensor() - q.grad).abs().max().item()
               for p, q in zip(model.parameters(), plain.parameters()))
    assert diff < 1e-6, (unsharded, diff)
    if env.rank == 0:
        print(f"accumulate_unsharded={unsharded}: max |diff| {diff:.1e}", flush=True)
destroy_distributed()
'''
