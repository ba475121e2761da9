"""Nothing lost, nothing silent: bad flags answered in one line, run folders that keep the
user's files, resumes that refuse to continue a different run.

Flag checks run the scripts' own parse_args in this process (a SystemExit with status 2 and one
line on stderr); the run-folder rules run RunFolder directly; resume behaviour runs the scripts
as a user does (subprocesses) on the tiny world."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
import train_rm
from minialign.checkpoint import TEMP_MARKER
from minialign.cli import run_main
from minialign.distributed import DistEnv
from minialign.errors import UserError
from minialign.prepare import DataConfig
from minialign.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
ENV1 = DistEnv(0, 1, 0, torch.device("cpu"))
WORLD_FLAGS = ["--model", "M", "--data", "D"]


def one_line_error(capsys, main, argv) -> str:
    """Run a script's main on argv; it must exit 2 with exactly one stderr line starting 'error: '."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ flags, checked when parsed

BAD_TRAINING_FLAGS = [  # (flags, text the one line must contain)
    (["--max_grad_norm", "0"], "--max_grad_norm"), (["--max_grad_norm", "-1"], "--max_grad_norm"),
    (["--max_steps", "0"], "--max_steps"), (["--max_steps", "-1"], "--max_steps"),
    (["--epochs", "0"], "--epochs"), (["--warmup_ratio", "1.5"], "[0, 1)"),
    (["--weight_decay", "-0.1"], "--weight_decay"), (["--batch_size", "0"], "--batch_size"),
    (["--grad_accum", "0"], "--grad_accum"), (["--log_every", "-1"], "--log_every"),
    (["--dist_timeout", "0"], "--dist_timeout"), (["--save_total_limit", "-1"], "--save_total_limit"),
    (["--lr", "nan"], "finite"), (["--lr", "abc"], "not a number"), (["--eval_split", "1"], "--eval_split"),
    (["--dtype", "fp16"], "loss scaling"), (["--dtype", "int8"], "--dtype"),
    (["--max_length", "512", "--max_prompt_length", "600"], "below --max_length"),
    (["--resume", "--overwrite"], "contradict"), (["--resume_anyway"], "--resume"),
    (["--data_format", "csv"], "--data_format"),
]


@pytest.mark.parametrize("flags,expected", BAD_TRAINING_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAINING_FLAGS])
def test_bad_training_flag_is_one_line(capsys, flags, expected):
    for main in (train_rm.main, train_dpo.main):
        line = one_line_error(capsys, main, WORLD_FLAGS + flags)
        assert expected in line, line


@pytest.mark.parametrize("flags,expected", [
    (["--beta", "0"], "--beta"), (["--label_smoothing", "0.6"], "--label_smoothing"),
    (["--loss_type", "robust", "--label_smoothing", "0.5"], "below 0.5"),
    (["--loss_type", "ipo", "--label_smoothing", "0.1"], "not defined"), (["--rpo_alpha", "-1"], "--rpo_alpha"),
])
def test_bad_dpo_flag_is_one_line(capsys, flags, expected):
    assert expected in one_line_error(capsys, train_dpo.main, WORLD_FLAGS + flags)


def test_model_without_data_is_an_error_not_the_demo_world(capsys):
    assert "--data is missing" in one_line_error(capsys, train_rm.main, ["--model", "M"])
    assert "--model is missing" in one_line_error(capsys, train_dpo.main, ["--data", "D"])


def test_dtype_spellings_and_derived_prompt_budget():
    for spelling, dtype in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp32", "fp32"), ("float32", "fp32"),
                            ("auto", "auto")):
        assert train_rm.parse_args(WORLD_FLAGS + ["--dtype", spelling]).dtype == dtype
    args = train_rm.parse_args(WORLD_FLAGS + ["--max_length", "128"])  # no hidden 256 prompt default to trip on
    assert args.max_prompt_length is None and DataConfig(data="D", max_length=128).prompt_budget == 64


def test_missing_data_file_is_one_line_through_the_script(tmp_path, tiny_world):
    """A library error (a file that does not exist) reaches the user as one line, exit 2, and the
    run folder is not created."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "train_rm.py"), "--model", str(tiny_world["model"]),
                        "--data", str(tmp_path / "nope.jsonl"), "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "nope.jsonl" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not out.exists()


# ------------------------------------------------------------------------- the run folder

def make_old_run(folder: Path, steps=(2, 4)):
    """A run's leftovers: run.json, metrics.jsonl, model/, curves.png and checkpoints listed in the record."""
    (folder / "checkpoints").mkdir(parents=True)
    for s in steps:
        (folder / "checkpoints" / f"step-{s:06d}").mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"the only copy")
    (folder / "curves.png").write_bytes(b"png")
    (folder / "run.json").write_text(json.dumps({"run_id": "old", "checkpoints": [f"step-{s:06d}" for s in steps]}))


def test_new_run_refuses_an_old_runs_folder_and_overwrite_moves_the_whole_run_aside(tmp_path, capsys):
    """--overwrite moves run.json, metrics, figure, model and checkpoints into one previous-<time>/
    (only checkpoints/ was moved before, and the model deleted: issue #26, item 2)."""
    make_old_run(tmp_path)
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        RunFolder(tmp_path, ENV1).check(resume=False, overwrite=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    run = RunFolder(tmp_path, ENV1)
    run.check(resume=False, overwrite=True)
    run.claim(resume=False, overwrite=True, run_config={})
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1
    moved = sorted(p.name for p in aside[0].iterdir())
    assert moved == ["checkpoints", "curves.png", "metrics.jsonl", "model", "run.json"]
    assert sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (aside[0] / "model" / "model.safetensors").read_bytes() == b"the only copy"
    assert json.loads((aside[0] / "run.json").read_text())["run_id"] == "old"
    assert run.record["checkpoints"] == [] and run.run_id != "old"
    assert "moved to" in capsys.readouterr().out
    run.release()


def test_pruning_deletes_only_this_runs_checkpoints(tmp_path):
    """A user's step-000001-best and an older run's step-000050 inside checkpoints/ survive any
    --save_total_limit; this run's own older checkpoints are pruned."""
    run = RunFolder(tmp_path, ENV1)
    run.claim(resume=False, overwrite=False, run_config={})
    (tmp_path / "checkpoints").mkdir()
    for name in ("step-000001-best", "step-000050"):
        (tmp_path / "checkpoints" / name).mkdir()
    for step in (2, 4, 6):
        name = f"step-{step:06d}"
        (tmp_path / "checkpoints" / name).mkdir()
        run.add_checkpoint(name, keep=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert left == ["step-000001-best", "step-000006", "step-000050"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000006"
    assert json.loads((tmp_path / "run.json").read_text())["checkpoints"] == ["step-000006"]
    run.release()


def test_lock_stops_a_second_run_and_a_stale_lock_is_taken(tmp_path):
    first = RunFolder(tmp_path, ENV1)
    first.claim(resume=False, overwrite=False, run_config={})
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()}"):
        RunFolder(tmp_path, ENV1).claim(resume=True, overwrite=False, run_config={})
    first.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    second = RunFolder(tmp_path, ENV1)
    second.claim(resume=False, overwrite=True, run_config={})  # the stale lock is replaced
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    second.release()
    assert not (tmp_path / ".lock").exists()


def test_stale_temp_folders_are_removed_at_start(tmp_path):
    """Removed: a dead writer's temp folder, named and marked as atomic_directory makes them. Kept: a
    live writer's, and a user's folder that only looks like one (no marker; issue #26, item 6)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "checkpoints" / f".step-000004.tmp-{dead.pid}"
    live = tmp_path / "checkpoints" / f".step-000008.tmp-{os.getpid()}"  # a writer that still runs
    users = tmp_path / f".model.tmp-{dead.pid}"  # named like a temp folder, but made by a user
    for d in (stale, live, users):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 100)
    for d in (stale, live):
        (d / TEMP_MARKER).write_text("")
    (tmp_path / "checkpoints" / "step-000002").mkdir()  # a checkpoint to resume from
    run = RunFolder(tmp_path, ENV1)
    run.claim(resume=True, overwrite=False, run_config={})
    assert not stale.exists() and live.exists() and (users / "model.safetensors").exists()
    run.release()


# ----------------------------------------------------------------------------- resuming

SMALL = ["--batch_size", "4", "--max_length", "64", "--max_prompt_length", "32", "--warmup_ratio", "0.1",
         "--lr", "1e-3", "--max_steps", "6", "--save_every", "2", "--save_total_limit", "0"]


def train(world, out, *extra, check=True):
    cmd = [sys.executable, str(ROOT / "train_rm.py"), "--model", str(world["model"]), "--data", str(world["data"]),
           "--output", str(out), *SMALL, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def weights(out):
    return load_file(str(Path(out) / "model" / "model.safetensors"))


def interrupted(out):
    """Make a finished run look like one killed after its last checkpoint (run.json: not finished)."""
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "finished": False}))


@pytest.mark.slow
def test_resume_checks_settings_falls_back_from_a_damaged_checkpoint_and_tolerates_a_cut_metrics_line(tiny_world, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "run"
    train(tiny_world, whole)
    train(tiny_world, out)
    interrupted(out)
    # A different seed re-splits the data: the resume is refused, naming the setting.
    p = train(tiny_world, out, "--resume", "--seed", "1", check=False)
    assert p.returncode == 2 and "seed: 0 then, 1 now" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    # Another chat format, precision, or weights under the same --model path: refused too, each
    # named (all three were accepted silently: issue #26, item 5).
    weights_file = Path(tiny_world["model"]) / "model.safetensors"
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "replaced" a second later
    try:
        p = train(tiny_world, out, "--resume", "--chat_format", "qwen2", "--dtype", "bf16", check=False)
    finally:
        os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "chat_format: 'chatml' then, 'qwen2' now" in p.stderr and "dtype: 'fp32' then, 'bf16' now" in p.stderr
    assert "model_weights: 'model.safetensors" in p.stderr
    # Damage the latest checkpoint (step 4: an empty optimizer file) and cut the last metrics line.
    (out / "checkpoints" / "step-000004" / "optimizer.safetensors").write_bytes(b"")
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])
    p = train(tiny_world, out, "--resume")
    assert "cannot resume from" in p.stdout and "step-000004" in p.stdout and "resumed at step 2/6" in p.stdout
    for k, v in weights(whole).items():  # steps 3-6 redone: the same weights as the uninterrupted run
        torch.testing.assert_close(weights(out)[k], v, atol=1e-6, rtol=0, msg=k)
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"train"' in l]
    assert steps == [1, 2, 3, 4, 5, 6]
    # --resume_anyway continues although a setting changed, and says so.
    interrupted(out)
    p = train(tiny_world, out, "--resume", "--resume_anyway", "--lr", "2e-3")
    assert "warning: resuming despite changed settings (lr: 0.001 then, 0.002 now)" in p.stdout


def test_final_model_in_the_checkpoints_dtype_and_readable_by_others(tiny_world, tmp_path):
    """--save_dtype bf16 on request (with what it keeps printed; save_precision.py and its tests for
    auto), and model.safetensors gets the umask's permissions, not 0600."""
    p = train(tiny_world, tmp_path / "bf16", "--max_steps", "2", "--save_dtype", "bf16")
    assert "saved bf16 as asked: keeps" in p.stdout
    w = weights(tmp_path / "bf16")
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    assert json.loads((tmp_path / "bf16" / "model" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    mode = (tmp_path / "bf16" / "model" / "model.safetensors").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
