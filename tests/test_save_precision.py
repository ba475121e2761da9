"""What a run saves is what it trained (issue 25): the save dtype chosen by measuring what rounding
keeps (save_precision.py), checked against values derived by hand and against the run's own fp32
master weights; and the reward head, which reads in fp32 under bf16 autocast."""
import math

import pytest
import torch
from safetensors.torch import load_file

import minialign
import train_dpo
import train_rm
from minialign import launch
from minialign.model import last_token_index
from minialign.save_precision import choose_save_dtype, stored_dtype, update_kept

BF16 = torch.bfloat16


def test_update_kept_by_hand():
    """w0 = [1, 2] (exact in bf16). The update u = [2^-10, 2^-6]: at 1.0 a bf16 step is 2^-7, so
    1 + 2^-10 (under half a step) rounds back to 1; at 2.0 the step is 2^-6, so 2 + 2^-6 is exact.
    e = round(w) - w = [-2^-10, 0]; ||e|| / ||u|| = 2^-10 / sqrt(2^-20 + 2^-12) = 1 / sqrt(257):
    kept = 1 - 1/sqrt(257) = 0.93762. Saved update u + e = [0, 2^-6]: cosine with u =
    2^-6 / sqrt(2^-20 + 2^-12) = 1 / sqrt(1 + 2^-8) = 0.99805; norm ratio the same number;
    1 of the 2 changed weights survives."""
    w0 = {"a": torch.tensor([1.0, 2.0])}
    w = {"a": torch.tensor([1.0 + 2**-10, 2.0 + 2**-6])}
    m = update_kept(w, w0, "bf16")
    assert m["kept"] == pytest.approx(1 - 1 / math.sqrt(257), rel=1e-12)
    assert m["cosine"] == pytest.approx(1 / math.sqrt(1 + 2**-8), rel=1e-12)
    assert m["norm_ratio"] == pytest.approx(1 / math.sqrt(1 + 2**-8), rel=1e-12)
    assert (m["changed"], m["survived"]) == (2, 0.5)
    assert update_kept(w, w0, "fp32")["kept"] == 1.0  # an fp32 save changes nothing


def test_a_tensor_the_start_lacks_is_new_and_a_tied_head_counts_once():
    """A fresh reward head has w0 = 0: its whole value is update, which bf16 keeps to 2^-9.
    A tied lm_head (the embedding under a second name) is measured once: the result is the
    embedding's alone."""
    head = torch.tensor([[0.3, -0.7, 1.1]])
    m = update_kept({"score.weight": head}, {}, "bf16")
    assert m["kept"] > 1 - 2**-8 and m["changed"] == 3
    emb0 = torch.randn(5, 3).to(BF16).float()
    emb = emb0 + 1e-5
    alone = update_kept({"model.embed_tokens.weight": emb}, {"model.embed_tokens.weight": emb0}, "bf16")
    tied = update_kept({"model.embed_tokens.weight": emb, "lm_head.weight": emb},
                       {"model.embed_tokens.weight": emb0}, "bf16")
    assert tied == alone


def test_choose_save_dtype_decides_from_the_measure():
    """auto: fp32 from an fp32 start (no measure needed); from a bf16 start, bf16 when rounding
    keeps >= 99 % (w0 in [1, 2) moved by 100 * 2^-7 lands in [1.78, 2.78), where a bf16 step is at
    most 2^-6: the error is <= 2^-7 per weight, <= 1 % of the update), fp32
    with the reason when it keeps less (an update of a tenth of a step rounds away entirely).
    An explicit bf16 is obeyed and says what it loses."""
    g = torch.Generator().manual_seed(0)
    w0 = (torch.rand(1000, generator=g) + 1).to(BF16)  # in [1, 2): bf16 step 2^-7
    big, tiny = {"w": w0.float() + 100 * 2**-7}, {"w": w0.float() + 0.1 * 2**-7}
    assert choose_save_dtype(big, {"w": w0.float()}, "auto") == ("fp32", "saved fp32: the update is kept exactly")
    dtype, line = choose_save_dtype(big, {"w": w0}, "auto")
    assert dtype == "bf16" and line.startswith("saved bf16: keeps 99.") and "of the update" in line, line
    dtype, line = choose_save_dtype(tiny, {"w": w0}, "auto")
    assert dtype == "fp32" and "a bf16 save" in line and "would have kept only 0.0 %" in line, line
    dtype, line = choose_save_dtype(tiny, {"w": w0}, "bf16")
    assert dtype == "bf16" and "keeps 0.0 % of the update" in line and "--save_dtype fp32" in line, line
    assert choose_save_dtype(tiny, {"w": w0}, "fp32")[0] == "fp32"


def test_starting_weights_read_from_the_checkpoint_folder_equal_the_dict(tiny_world, tmp_path):
    model = minialign.load_model(tiny_world["model"])
    minialign.save_model(model, tmp_path / "bf16", dtype="bf16")
    start = {k: v for k, v in load_file(str(tmp_path / "bf16" / "model.safetensors")).items()}
    assert stored_dtype(tmp_path / "bf16") == stored_dtype(start) == "bf16"
    state = {k: v.float() + 1e-3 for k, v in model.state_dict().items()}
    assert update_kept(state, tmp_path / "bf16", "bf16") == update_kept(state, start, "bf16")


@pytest.fixture(scope="module")
def bf16_world(tiny_world, tmp_path_factory):
    """The tiny world's model stored in bf16, as SmolLM2 and most Hub checkpoints are."""
    out = tmp_path_factory.mktemp("bf16_world") / "base"
    minialign.save_model(minialign.load_model(tiny_world["model"]), out, tiny_world["root"] / "tokenizer",
                         dtype="bf16")
    return {**tiny_world, "model": out}


@pytest.mark.parametrize("script, lr", [(train_rm, "1e-5"), (train_dpo, "5e-7")])
def test_run_from_bf16_checkpoint_saves_its_fp32_master_weights(bf16_world, tmp_path, capsys, monkeypatch,
                                                                 script, lr):
    """Default flags, a bf16 start and a small lr: the final model/ holds exactly the fp32 master
    weights the run ended with (the old bf16 save rounded most of the update away), and the save
    line says so. The master weights are the state the script hands to save_model, seen by a spy."""
    handed = {}

    def spy(model, path, tokenizer=None, dtype=None, state=None):
        handed.update({k: v.detach().clone() for k, v in state.items()})
        return minialign.save_model(model, path, tokenizer, dtype=dtype, state=state)

    monkeypatch.setattr(launch, "save_model", spy)  # the trainers save through launch.save_trained
    out = tmp_path / "run"
    script.main(["--model", str(bf16_world["model"]), "--data", str(bf16_world["data"]), "--output", str(out),
                 "--max_steps", "3", "--batch_size", "4", "--max_length", "64", "--lr", lr, "--log_every", "0"])
    assert "saved fp32: the update is kept exactly" in capsys.readouterr().out
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert handed["model.embed_tokens.weight"].dtype == torch.float32
    for k, v in saved.items():
        assert v.dtype == torch.float32 and torch.equal(v, handed[k]), k
    # It did train, and a bf16 save would have lost most of it: most changed weights round back.
    assert update_kept(handed, bf16_world["model"], "bf16")["kept"] < 0.99


def test_reward_head_reads_in_fp32_under_bf16_autocast(tiny_world):
    """Under autocast the backbone's matmuls run in bf16, but the head's dot product must not: a
    bf16 reward has 8 significant bits (0.03 apart near |r| = 4). The rewards equal the float64
    product of the same hidden state and head within 1e-6 relative (a bf16 head misses by ~2^-9)."""
    model = minialign.load_model(tiny_world["model"], reward=True).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 3.0)  # rewards of a few units, where bf16 steps are 2^-6 .. 2^-5
    ids = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        r = model(ids, mask)  # (4,)
        h = model.model(ids, mask, read_at=last_token_index(mask)[:, None])  # (4, 1, C)
    expected = (h.double() @ model.score.weight.double().T)[:, 0, 0]  # (4,)
    assert r.dtype == torch.float32 and expected.abs().min() > 0.5
    torch.testing.assert_close(r.double(), expected, rtol=1e-6, atol=0)


FSDP_HEAD_WORKER = r'''
import sys, torch, minialign
from minialign.distributed import DistEnv
from minialign.fsdp import shard
env = DistEnv(0, 1, 0, torch.device("cpu"))
model = shard(minialign.load_model(sys.argv[1], reward=True), env, "bf16")  # compute in bf16 from fp32 shards
seen = []
model.score.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, i[0].dtype, o.dtype)))
ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
r = model(ids, torch.ones_like(ids))
print("head", seen, "rewards", r.dtype)
assert seen == [(torch.float32, torch.float32, torch.float32)] and r.dtype == torch.float32
'''


@pytest.mark.distributed
@pytest.mark.slow
def test_reward_head_reads_in_fp32_under_fsdp_bf16(tiny_world, tmp_path):
    """Under FSDP's bf16 mixed precision every layer computes from bf16 copies of its weights; the
    head is its own unit with an fp32 policy (fsdp.shard), so its weight, input and output are fp32."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", FSDP_HEAD_WORKER, str(tiny_world["model"])], capture_output=True,
                       text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
