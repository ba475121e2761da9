"""Resuming where users resume: optimizer state placed as torch's own loader places it (the fused
kernel on a GPU needs `step` on the parameter's device), and ranks on machines with their own
disks resuming from rank 0's checkpoint instead of silently from scratch."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minialign.config import ModelConfig
from minialign.model import CausalLM
from minialign.resume import load_optimizer_tensors, optimizer_tensors, restore_rng, rng_state

ROOT = Path(__file__).resolve().parents[1]


def tiny_config():
    return ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=True))


def test_optimizer_state_round_trip_is_exact():
    """Saved after two real steps, loaded into a fresh AdamW: every state tensor equal bit for bit
    (they are saved tensors), and the next step moves the weights identically."""
    torch.manual_seed(0)
    model = CausalLM(tiny_config())
    ids = torch.randint(0, 50, (2, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        model(ids).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    saved = optimizer_tensors(model, opt)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    load_optimizer_tensors(model, fresh, saved, "test")
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(fresh.state[p][k], v) and fresh.state[p][k].device == v.device, k


def test_optimizer_state_lands_on_the_parameters_device():
    """Parameters on the `meta` device stand in for a GPU: with the fused kernel (which
    build_optimizer picks on CUDA) every state tensor, `step` included, must be on the
    parameter's device, as torch's Optimizer.load_state_dict puts it. (Before: `step` stayed on
    the CPU, and every resume on a GPU failed at its first step, pytorch#104767.)"""
    with torch.device("meta"):
        model = CausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    tensors = {}
    for name, p in model.named_parameters():
        tensors[f"{name}.step"] = torch.tensor(3.0)
        tensors[f"{name}.exp_avg"] = torch.zeros(p.shape)
        tensors[f"{name}.exp_avg_sq"] = torch.zeros(p.shape)
    load_optimizer_tensors(model, opt, tensors, "test")
    for p in model.parameters():
        state = opt.state[p]
        assert {k: v.device.type for k, v in state.items()} == {"step": "meta", "exp_avg": "meta", "exp_avg_sq": "meta"}
        assert state["step"].dtype == torch.float32


def test_incomplete_optimizer_state_is_refused():
    model = CausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="no optimizer state 'model.embed_tokens.weight.step'"):
        load_optimizer_tensors(model, opt, {}, "ckpt/optimizer.safetensors")


def test_rng_state_is_this_devices_only():
    """The CPU generator alone on a CPU run (no per-GPU list that a node with fewer GPUs could not
    restore); restoring gives back the same random numbers."""
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch"}
    a = torch.rand(3)
    restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_cuda_rng_state_of_the_current_device_only():
    device = torch.device("cuda", 0)
    state = rng_state(device)
    assert isinstance(state["cuda"][0], int)  # one device's state, not one per visible GPU
    a = torch.rand(3, device=device)
    restore_rng(state, device)
    assert torch.equal(torch.rand(3, device=device), a)


# ------------------------------------------------------------- two ranks, two disks

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_on_own_disks(world, disks, *extra):
    """2 ranks of train_rm.py, each in its own working directory (a node-local disk): the relative
    --output runs/rm is a different folder for each rank."""
    port = free_port()
    procs = []
    for rank, disk in enumerate(disks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, str(ROOT / "train_rm.py"), "--model", str(world["model"]), "--data", str(world["data"]),
               "--output", "runs/rm", "--batch_size", "4", "--max_length", "64", "--lr", "1e-3", "--max_steps", "6",
               "--save_every", "2", "--warmup_ratio", "0.1", "--dist_timeout", "60", *extra]
        procs.append(subprocess.Popen(cmd, cwd=disk, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(outs)
    return outs


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_on_their_own_disks_resume_from_rank_0s_checkpoint(tiny_world, tmp_path):
    """Only rank 0 writes checkpoints, so rank 1's disk has none. On --resume rank 0 reads its
    latest checkpoint (step 4) and sends it: both ranks redo steps 5-6 and end with the weights of
    the uninterrupted run. (Before: rank 1 restarted from step 0 and the ranks' collectives no
    longer matched.)"""
    disks = [tmp_path / "node0", tmp_path / "node1"]
    for d in disks:
        d.mkdir()
    launch_on_own_disks(tiny_world, disks)
    assert not (disks[1] / "runs").exists()  # nothing is written on rank 1's disk
    first = load_file(str(disks[0] / "runs/rm/model/model.safetensors"))
    shutil.rmtree(disks[0] / "runs/rm/model")
    record = disks[0] / "runs/rm/run.json"  # as if stopped after its step-4 checkpoint (a finished run is not redone)
    record.write_text(json.dumps({**json.loads(record.read_text()), "finished": False}))
    outs = launch_on_own_disks(tiny_world, disks, "--resume")
    assert "resumed at step 4/6" in outs[0]
    resumed = load_file(str(disks[0] / "runs/rm/model/model.safetensors"))
    for k, v in first.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=0, msg=k)
