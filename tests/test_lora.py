"""LoRA (minialign/lora.py) against independent references:

- with B = 0 an adapted model is the base model exactly, and with its adapters off it is again;
- peft's own adapter files (tests/fixtures/peft_lora, written once by peft) load by their key
  names and give peft's outputs, before and after merging; our adapter_config.json says what
  peft's says;
- the adapters' gradients equal autograd through the dense re-parametrisation W0 + s * B A
  (Hu et al. 2021, eq. 3), for DPO with the adapter-off reference and for the reward model, with
  gradient checkpointing on;
- the trainers: DPO's first loss is ln 2 with the adapter-off reference (live and precomputed),
  the merged model/ equals the adapted forward, a killed-and-resumed run equals an uninterrupted
  one (dropout on: the RNG is restored too), 2 ranks equal 1 (hand-written data parallel, FSDP2).
"""
import copy
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minialign
from conftest import records
from minialign.config import ModelConfig
from minialign.distributed import DistEnv
from minialign.dpo import AdapterOffReference, DPOObjective, LiveReference
from minialign.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, adapter_config, adapter_state, adapters_disabled,
                            apply_lora, load_adapter, lora_modules, merged_state, minialign_name, peft_name, trained_names)
from minialign.model import CausalLM, RewardModel
from minialign.reducer import GradReducer
from minialign.reward import RewardObjective
from minialign.packing import make_batch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PEFT_RANK, PEFT_ALPHA = 4, 8  # what make_peft_lora.py gave peft
TINY = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
SMALL = ["--batch_size", "4", "--max_length", "64", "--max_prompt_length", "32", "--warmup_ratio", "0.1"]


def tiny(reward=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_hf_dict(TINY)
    return RewardModel(cfg) if reward else CausalLM(cfg)


@torch.no_grad()
def randomise_adapters(model, seed=1, std=0.3):
    """Nonzero B (and a new A): with B = 0 the adapters would be invisible in every output."""
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        m.lora_A.copy_(std * torch.randn(m.lora_A.shape, generator=g))
        m.lora_B.copy_(std * torch.randn(m.lora_B.shape, generator=g))


@pytest.mark.parametrize("reward", [False, True])
def test_zero_B_is_the_base_model_and_adapters_off_is_too(reward):
    base = tiny(reward).train()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, dropout=0.5)).train()  # dropout on
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # + (alpha/r) B A x with B = 0 adds exact zeros
        randomise_adapters(model)
        assert (model(ids) - base(ids)).abs().max() > 1e-2
        with adapters_disabled(model):
            assert torch.equal(model(ids), base(ids))
    # Trained: A (r, I) and B (O, r) of the 7 projections of each of the 2 layers, and the reward head.
    C, F, KD = 32, 48, 2 * 8
    per_layer = sum(4 * (i + o) for i, o in [(C, C), (C, KD), (C, KD), (C, C), (C, F), (C, F), (F, C)])
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trained == 2 * per_layer + (C if reward else 0)
    assert all(".lora_" in n or n == "score.weight" for n in trained_names(model))


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen2_reward"])
def test_peft_adapter_files_load_and_give_peft_outputs(name):
    """peft wrote these adapters and recorded its outputs (make_peft_lora.py): loading them by name
    into minialign's LoRA gives peft's outputs, and merging gives peft's merged outputs."""
    model = apply_lora(minialign.load_model(FIXTURES / "golden" / name), LoRAConfig(PEFT_RANK, PEFT_ALPHA))
    peft_file = FIXTURES / "peft_lora" / name / ADAPTER_WEIGHTS
    load_adapter(model, peft_file)
    expected = load_file(str(FIXTURES / "peft_lora" / name / "expected.safetensors"))
    field = "scores" if name == "qwen2_reward" else "logits"
    merged = minialign.load_model(FIXTURES / "golden" / name)
    merged.load_state_dict(merged_state(model, model.state_dict()))  # strict: exactly the plain model's keys
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]), expected[field], atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(expected["input_ids"]), expected["merged_" + field], atol=1e-5, rtol=0)
    # The names we write are peft's names, no more and no fewer.
    peft_keys = set(load_file(str(peft_file)))
    assert set(adapter_state(model, model.state_dict())) == peft_keys
    assert {peft_name(minialign_name(k)) for k in peft_keys} == peft_keys
    # adapter_config.json: every field we write is one of peft's, with peft's value for these settings.
    theirs = json.loads((FIXTURES / "peft_lora" / name / ADAPTER_CONFIG).read_text())
    ours = adapter_config(LoRAConfig(PEFT_RANK, PEFT_ALPHA), theirs["base_model_name_or_path"], reward=field == "scores")
    assert set(ours) <= set(theirs)
    for key, value in ours.items():
        if key == "target_modules":
            assert set(value) == set(theirs[key])
        elif key == "modules_to_save" and value:
            assert set(value) <= set(theirs[key])  # peft adds "classifier" for other architectures
        else:
            assert value == theirs[key], key


def pairs(n=4, seed=0):
    from minialign.collate import TokenizedPair
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, 64, (k,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(5 + i), ids(3 + i) + [2], ids(6 - i) + [2]) for i in range(n)]


def dense_loss(base, model, objective_of, batch):
    """The same loss through the plain model with every adapted weight replaced by the dense
    W0 + s * B A built from leaf copies of A and B: autograd's gradients for A and B there are
    the reference. Returns (loss, {name of A or B: leaf})."""
    leaves, weights = {}, {}
    for name, m in lora_modules(model).items():
        A = leaves[f"{name}.lora_A"] = m.lora_A.detach().clone().requires_grad_(True)
        B = leaves[f"{name}.lora_B"] = m.lora_B.detach().clone().requires_grad_(True)
        weights[f"{name}.weight"] = m.weight.detach() + m.scale * B @ A  # (O, r) @ (r, I)
    if isinstance(base, RewardModel):
        leaves["score.weight"] = weights["score.weight"] = model.score.weight.detach().clone().requires_grad_(True)

    class LossOf(torch.nn.Module):  # functional_call swaps parameters for the duration of forward
        def __init__(self):
            super().__init__()
            self.model = base

        def forward(self, b):
            return objective_of(self.model).loss(self.model, b)[0].sum()

    return torch.func.functional_call(LossOf(), {f"model.{k}": v for k, v in weights.items()}, (batch,)), leaves


@pytest.mark.parametrize("reward", [False, True])
def test_adapter_gradients_equal_autograd_on_the_dense_reparametrisation(reward):
    """In float64: in fp32 the two association orders, W0 x + s B (A x) and (W0 + s B A) x, round
    differently by up to ~6e-6 on gradients of ~0.3 here (measured); in float64 they agree to ~1e-16,
    so the 1e-6 tolerance leaves no room for a wrong formula."""
    base = tiny(reward).double().eval()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8))
    randomise_adapters(model)
    model.train()
    model.gradient_checkpointing = True  # recomputed in backward: the same gradients
    if reward:
        objective_of = lambda m: RewardObjective()  # noqa: E731
        lora_objective = RewardObjective()
    else:  # the LoRA side's reference is the adapter-off policy, the dense side's a copy of the base model
        reference = LiveReference(copy.deepcopy(base))
        objective_of = lambda m: DPOObjective(reference=reference)  # noqa: E731
        lora_objective = DPOObjective(reference=AdapterOffReference(model))
    batch = make_batch(pairs(), [0, 1, 2, 3], 0, "train", torch.device("cpu"), packed=not reward)
    lora_objective.loss(model, batch)[0].sum().backward()
    loss, leaves = dense_loss(base, model, objective_of, batch)
    loss.backward()
    params = dict(model.named_parameters())
    assert set(leaves) == set(trained_names(model))
    for name, leaf in leaves.items():
        assert leaf.grad.abs().max() > 1e-4, name  # a gradient that says something
        torch.testing.assert_close(params[name].grad, leaf.grad, atol=1e-6, rtol=0, msg=name)
    assert all(p.grad is None for n, p in params.items() if not p.requires_grad)  # the base is frozen


def test_only_the_trained_tensors_are_reduced_and_optimised():
    from minialign.train import build_optimizer
    model = apply_lora(tiny(reward=True), LoRAConfig(rank=2))
    reducer = GradReducer(model, DistEnv(0, 1, 0, torch.device("cpu")))
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in reducer.params} == trained
    optimizer = build_optimizer(model, 1e-3, 0.0)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trained


def test_lora_flags_mistakes_are_one_line(capsys):
    import train_dpo
    for argv, says in ((["--lora_alpha", "32"], "--lora_alpha needs --lora_rank > 0"),
                       (["--lora_rank", "4", "--lora_targets", "q_proj,qkv"], "qkv: not a projection name"),
                       (["--lora_rank", "-1"], "--lora_rank")):
        with pytest.raises(SystemExit) as e:
            train_dpo.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------ the trainers

def run(script, world, out, *extra):
    cmd = [sys.executable, str(ROOT / script), "--model", str(world["model"]), "--data", str(world["data"]),
           "--output", str(out), *SMALL, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout}\n{p.stderr}"
    return p


def adapted_model(base_dir, out, reward, rank):
    """The base model with the run's adapter file loaded: the forward the run trained."""
    model = apply_lora(minialign.load_model(base_dir, reward=reward), LoRAConfig(rank=rank))
    load_adapter(model, Path(out) / "adapter" / ADAPTER_WEIGHTS)
    return model.eval()


@pytest.mark.slow
def test_trainers_lora_ln2_merged_save_and_precomputed_reference(tiny_world, tmp_path):
    """DPO: the first loss is ln 2 against the adapter-off reference, live and precomputed, and the
    two runs agree; both trainers' merged model/ equals the base model + their adapter/ file."""
    lora = ["--lora_rank", "4", "--lr", "1e-2", "--max_steps", "4"]
    run("train_dpo.py", tiny_world, tmp_path / "live", *lora)
    pre = run("train_dpo.py", tiny_world, tmp_path / "pre", *lora, "--precompute_ref")
    assert "LoRA r 4" in pre.stdout and "computed" in pre.stdout
    for a, b in zip(records(tmp_path / "live"), records(tmp_path / "pre"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert records(tmp_path / "live")[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert records(tmp_path / "pre")[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert records(tmp_path / "live")[-1]["rewards/margins"] > 1e-3  # the adapters did learn
    # Under bf16 the frozen base is held in bf16 (lora.hold_base_in_bf16): autocast's own numbers.
    run("train_dpo.py", tiny_world, tmp_path / "bf16", *lora, "--dtype", "bf16")
    assert records(tmp_path / "bf16")[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    run("train_rm.py", tiny_world, tmp_path / "rm", *lora)
    ids = torch.randint(3, 300, (2, 11))
    base_state = minialign.load_model(tiny_world["model"]).state_dict()
    for out, reward in ((tmp_path / "live", False), (tmp_path / "rm", True)):
        merged = minialign.load_model(out / "model")  # a plain Hugging Face checkpoint
        assert isinstance(merged, RewardModel) == reward
        assert not any("lora" in k for k in load_file(str(out / "model" / "model.safetensors")))
        config = json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())
        assert config["task_type"] == ("SEQ_CLS" if reward else "CAUSAL_LM") and config["r"] == 4
        with torch.no_grad():
            torch.testing.assert_close(merged.eval()(ids), adapted_model(tiny_world["model"], out, reward, 4)(ids),
                                       atol=1e-5, rtol=0)
        for k, v in merged.state_dict().items():  # what LoRA does not train is the base model's, bit for bit
            if not k.endswith(("proj.weight", "score.weight")):
                assert torch.equal(v, base_state[k]), k
        assert not torch.equal(merged.state_dict()["model.layers.0.mlp.down_proj.weight"],
                               base_state["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.slow
def test_lora_killed_and_resumed_equals_uninterrupted(tiny_world, tmp_path):
    """SIGKILL a LoRA DPO run (dropout on) after its step-4 checkpoint, resume: the adapters and the
    merged model equal the uninterrupted run's, so the adapters, their AdamW state and the RNG came back."""
    args = ["--max_steps", "8", "--save_every", "2", "--lr", "1e-2", "--lora_rank", "4", "--lora_dropout", "0.2"]
    run("train_dpo.py", tiny_world, tmp_path / "whole", *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_dpo.py"), "--model", str(tiny_world["model"]), "--data",
           str(tiny_world["data"]), "--output", str(out), *SMALL, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=ENV)
    for line in proc.stdout:
        if line.startswith("step 5/8"):  # checkpoint 4 is complete
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (out / "checkpoints" / "step-000004" / ADAPTER_WEIGHTS).is_file()
    resumed = run("train_dpo.py", tiny_world, out, *args, "--resume")
    assert "resumed at step" in resumed.stdout
    for sub, name in (("adapter", ADAPTER_WEIGHTS), ("model", "model.safetensors")):
        a, b = load_file(str(tmp_path / "whole" / sub / name)), load_file(str(out / sub / name))
        assert a.keys() == b.keys()
        for k in a:  # two processes: equal to rounding, far below what one step moves a weight
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert [r["step"] for r in records(out)] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_two_ranks_equal_one_by_hand_and_fsdp(tiny_world, tmp_path):
    """2 ranks x batch 2 = 1 rank x batch 4, step by step and in the saved adapters: the hand-written
    data parallel (only adapter gradients all-reduced) and FSDP2 with gradient checkpointing and a
    precomputed adapter-off reference. The data-parallel run's step-2 checkpoint, resumed under
    --fsdp (the base gathered, the checkpoint's adapters scattered: resume.with_frozen_base), ends
    with the same adapters too."""
    eval11 = tmp_path / "eval11.jsonl"  # uneven eval shards of 6 and 5
    eval11.write_text("".join(open(tiny_world["data"]).readlines()[:11]))
    lora = ["--max_steps", "3", "--lora_rank", "4", "--lr", "1e-3", "--eval_data", str(eval11), "--dist_timeout", "120"]
    fsdp = ["--batch_size", "2", "--fsdp", "--gradient_checkpointing", "--precompute_ref"]
    runs = {"one": (1, ["--batch_size", "4"]), "dp": (2, ["--batch_size", "2", "--save_every", "2"]),
            "fsdp": (2, fsdp), "dp_resumed_fsdp": (2, fsdp + ["--save_every", "2", "--resume"])}
    for name, (nproc, extra) in runs.items():
        if name == "dp_resumed_fsdp":
            shutil.copytree(tmp_path / "dp", tmp_path / name)
            record = tmp_path / name / "run.json"  # as if stopped after its step-2 checkpoint (a finished run is not redone)
            record.write_text(json.dumps({**json.loads(record.read_text()), "finished": False}))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
        cmd = [sys.executable, *launcher, str(ROOT / "train_dpo.py"), "--model", str(tiny_world["model"]), "--data",
               str(tiny_world["data"]), "--output", str(tmp_path / name), *SMALL, *lora, *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout}\n{p.stderr}"
    one = tmp_path / "one"
    assert records(one)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert "resumed at step 2/3" in p.stdout
    for name in ("dp", "fsdp", "dp_resumed_fsdp"):
        for a, b in zip(records(one), records(tmp_path / name), strict=True):
            for k in ("loss", "rewards/margins", "grad_norm"):
                assert b[k] == pytest.approx(a[k], abs=1e-5), (name, k, a["step"])
        wa, wb = load_file(str(one / "adapter" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / name / "adapter" / ADAPTER_WEIGHTS))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=(name, k))
