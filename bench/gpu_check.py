"""Everything a CPU cannot show, in one command, on any machine with a CUDA GPU (more with two).

    python bench/gpu_check.py                      # estimated 4-6 minutes on one H200 (never run on a GPU yet)
    python bench/gpu_check.py --device cpu         # a dry run of the same checks on the CPU (gloo, 2 ranks)
    python bench/gpu_check.py --only "golden fp32,ddp 2 ranks"     # some checks only

Checks, in this order (a check that needs 2 GPUs is skipped on a machine with one):
  environment         torch, CUDA, the GPUs, bf16 support
  golden fp32 / bf16  logits and reward scores of tests/fixtures/golden on the device against
                      transformers' recorded fp32 numbers (fp32: 1e-4; bf16 autocast: 0.25, where
                      the CPU's bf16 misses by at most 0.092)
  rm / dpo bf16       train_rm.py / train_dpo.py --dtype bf16: killed after the step-4 checkpoint and
  kill + resume       resumed, against the uninterrupted run, within 10x the difference between two
                      uninterrupted runs (GPU kernels such as attention's backward may differ in the
                      last bits from run to run); DPO's first loss ln 2 (reference held in bf16)
  fsdp 1 process      --fsdp on a group of one: fp32 equals the run without it; killed under --fsdp
                      and resumed without it, equal again; bf16 DPO starts at ln 2 and learns
  ddp 2 ranks         torchrun on 2 GPUs (NCCL) equals one GPU (fp32, up to summation order: CLOSE)
  fsdp 2 ranks        torchrun --fsdp, accumulation 2, checkpointing: equals one GPU (fp32); bf16
                      DPO starts at ln 2
  all-reduce overlap  bench/bench_allreduce.py on NCCL: buckets launched during backward, share hidden
  evaluate.py         rm and dpo on the models trained above
  memory 1 rank       a Qwen2.5-0.5B-shaped reward model in bf16: the step's peak against the
                      README's formula (16 bytes per parameter + 2 per matmul weight)
  memory fsdp 2 ranks the same reward model sharded: its peak against 16 N / 2 + 2 per root parameter
  pytest -m cuda      the tests marked cuda

It prints one table (ok / FAILED / skipped, with the numbers) and writes it as OUTPUT/summary.json;
every command's output is in OUTPUT/logs/. Checks stop being started after --budget_s seconds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from safetensors.torch import load_file  # noqa: E402

import minialign  # noqa: E402
from minialign.config import ModelConfig  # noqa: E402
from minialign.model import CausalLM, RewardModel  # noqa: E402
from minialign.tokenizer import train_bpe_tokenizer  # noqa: E402

GOLDEN = REPO / "tests" / "fixtures" / "golden"
GOLDEN_NAMES = ["qwen2_tied", "qwen2_untied", "qwen3", "llama", "llama_bias", "llama_rope_linear", "llama_rope_llama3",
                "qwen2_reward"]
FP32_ATOL = 1e-4  # tests/test_golden.py's tolerance; PyTorch keeps TF32 off for fp32 matmuls by default
BF16_ATOL = 0.25  # bf16 keeps 8 significant bits; the CPU's bf16 autocast misses by at most 0.092 here
# Two fp32 runs of the same training on other ranks or kernels sum in another order. AdamW moves a
# weight by up to lr (1e-3 here) per step, also where the gradient is almost 0, so a few elements
# of such weights end up to ~1e-4 apart (measured on gloo: 2 of 196,608 in a tensor, after 8
# steps); a mistake (a missing average, a wrong shard) moves most elements by ~lr.
CLOSE = 1e-5  # most elements agree to this
MAX_FAR_SHARE = 1e-3  # share of elements allowed beyond CLOSE
MAX_DIFF = 2.5e-4  # a quarter of one step's largest move
NOISE_FACTOR = 10  # a resumed run may differ from the uninterrupted one by this many times the run-to-run noise
LN2_ATOL = 1e-5
STEPS, KILL_AT = 8, 5  # short runs, checkpoint every 2 steps: killed at step 5, the step-4 checkpoint resumes
# README, "Memory per GPU": bytes per parameter (weights, gradients, AdamW) and per matmul weight
# (autocast's bf16 copies), measured by bench/bench_memory.py.
STATE_BYTES, AUTOCAST_BYTES, GATHERED_ROOT_BYTES = 16.0, 2.0, 2.0
MEMORY_BOUNDS = (0.9, 1.35)  # measured peak / formula: the peak adds activations and allocator slack
RUN_TIMEOUT_S = 240


class Skip(Exception):
    """A check that cannot run here (its reason is shown)."""


class Failed(Exception):
    """A check that ran and missed (its numbers are shown)."""


# ------------------------------------------------------------------------ running commands

class Runner:
    def __init__(self, out: Path, device: str):
        self.out, self.device = out, device
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if device == "cpu" else "4")}
        if device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def command(self, script, *args, ranks: int = 1) -> list[str]:
        if ranks == 1:
            return [sys.executable, str(REPO / script), *map(str, args)]
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                f"--master_port={free_port()}", str(REPO / script), *map(str, args)]

    def run(self, name: str, cmd: list, timeout: float = RUN_TIMEOUT_S) -> str:
        """Run to the end; its output goes to logs/NAME.log; a failure shows the last lines."""
        cmd = [str(c) for c in cmd]
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n\n")
            f.flush()
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=self.env, timeout=timeout)
        text = log.read_text()
        if p.returncode != 0:
            raise Failed(f"{name} exited {p.returncode}: {tail(text)} (see {log})")
        return text

    def run_and_kill(self, name: str, cmd: list[str], at_step: int, total: int, timeout: float = RUN_TIMEOUT_S):
        """Run in its own process group and SIGKILL the group (torchrun and its workers) when rank 0
        prints `step {at_step}/{total}`."""
        cmd = [str(c) for c in cmd]
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=self.env, start_new_session=True)
        deadline, lines = time.time() + timeout, []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"step {at_step}/{total}") or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
        log.write_text(" ".join(cmd) + "\n\n" + "".join(lines))
        if proc.returncode != -signal.SIGKILL:
            raise Failed(f"{name} ended (exit {proc.returncode}) before it could be killed at step {at_step} "
                         f"(see {log})")


def tail(text: str, n: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ the world to train in

def write_preferences(path: Path, n: int = 160, seed: int = 0) -> Path:
    """A learnable preference set (as tests/conftest.py writes it): a correct, plain answer beats a
    wrong, hedged one; the better side is random per record."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            good, bad = f"The answer is {a + b}.", f"I think it is {a + b + rng.randint(1, 9)}, maybe."
            better = rng.choice([1, 2])
            r1, r2 = (good, bad) if better == 1 else (bad, good)
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "response_1": r1, "response_2": r2,
                                "overall_response": better}) + "\n")
    return path


def build_world(root: Path) -> dict:
    """Preferences, a BPE trained on them and a small random qwen2 model (untied head) in HF layout."""
    root.mkdir(parents=True, exist_ok=True)
    data = write_preferences(root / "prefs.jsonl")
    texts = [" ".join(str(v) for v in json.loads(line).values()) for line in open(data)]
    tok = train_bpe_tokenizer(texts, root / "tokenizer", vocab_size=400)
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False))
    minialign.save_model(CausalLM(cfg), root / "base", tok)
    return {"data": data, "model": root / "base", "tokenizer": tok}


def train_args(world, out, *extra, steps: int = STEPS) -> list:
    return ["--model", world["model"], "--data", world["data"], "--output", out, "--max_length", 64,
            "--max_prompt_length", 32, "--lr", "1e-3", "--warmup_ratio", 0.1, "--max_steps", steps, "--save_every", 2,
            "--save_total_limit", 0, "--log_every", 1, "--dist_timeout", 300, *extra]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise Failed(f"different tensors: {sorted(set(a) ^ set(b))[:3]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def same_training(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two fp32 runs trained the same weights up to summation order (see CLOSE), and the numbers."""
    wa, wb = weights(a), weights(b)
    worst = max_diff(wa, wb)
    far = sum(int(((wa[k] - wb[k]).abs() > CLOSE).sum()) for k in wa) / sum(v.numel() for v in wa.values())
    loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(records(a), records(b), strict=True))
    return worst <= MAX_DIFF and far <= MAX_FAR_SHARE, (f"max |dw| {worst:.1e}, share beyond {CLOSE:g} {far:.1e}, "
                                                          f"max |d loss| per step {loss:.1e}")


def records(out: Path, split="train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


# ------------------------------------------------------------------------ the checks

class Checks:
    def __init__(self, runner: Runner, device: str, gpus: int):
        self.r, self.device, self.gpus = runner, device, gpus
        self.world = None
        self.ranks = 2 if device == "cpu" else min(gpus, 2)  # the dry run simulates 2 ranks on gloo

    def ensure_world(self):
        if self.world is None:
            self.world = build_world(self.r.out / "world")
        return self.world

    def need_two(self):
        if self.ranks < 2:
            raise Skip("needs 2 GPUs")

    def out(self, name) -> Path:
        path = self.r.out / "runs" / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    # --- environment and numerics
    def environment(self):
        info = f"torch {torch.__version__}"
        if self.device == "cuda":
            names = sorted({torch.cuda.get_device_name(i) for i in range(self.gpus)})
            nccl = torch.cuda.nccl.version()
            info += (f", CUDA {torch.version.cuda}, {self.gpus} x {'/'.join(names)}, bf16 "
                     f"{'yes' if torch.cuda.is_bf16_supported() else 'NO'}, NCCL "
                     f"{'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}")
        else:
            info += ", CPU dry run (gloo)"
        return info

    def golden(self, dtype: str):
        device = torch.device(self.device)
        worst = {}
        for name in GOLDEN_NAMES:
            model = minialign.load_model(GOLDEN / name, device=device).eval()
            ref = load_file(str(GOLDEN / name / "expected.safetensors"))
            cases = sorted({k.split(".")[0] for k in ref if k.endswith(".input_ids") and not k.startswith("greedy")})
            for case in cases:
                ids, mask = ref[f"{case}.input_ids"].to(device), ref[f"{case}.attention_mask"].to(device)
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    out = model(ids, mask).float().cpu()
                expected = ref.get(f"{case}.logits", ref.get(f"{case}.scores"))
                real = mask.bool().cpu() if out.dim() == 3 else slice(None)
                worst[name] = max(worst.get(name, 0.0), (out[real] - expected[real]).abs().max().item())
        atol = FP32_ATOL if dtype == "fp32" else BF16_ATOL
        name, diff = max(worst.items(), key=lambda kv: kv[1])
        detail = f"max |diff| {diff:.2e} ({name}), tolerance {atol:g}, {len(worst)} models"
        if diff > atol:
            raise Failed(detail)
        return detail

    # --- single process runs
    def kill_and_resume(self, script: str, extra: list):
        """Two uninterrupted runs (their difference is the noise), one killed and resumed."""
        w = self.ensure_world()
        kind = Path(script).stem
        a, b, k = self.out(f"{kind}_bf16_a"), self.out(f"{kind}_bf16_b"), self.out(f"{kind}_bf16_killed")
        args = ["--dtype", "bf16", "--batch_size", 8, *extra]
        self.r.run(f"{kind}_bf16_a", self.r.command(script, *train_args(w, a, *args)))
        self.r.run(f"{kind}_bf16_b", self.r.command(script, *train_args(w, b, *args)))
        self.r.run_and_kill(f"{kind}_bf16_killed", self.r.command(script, *train_args(w, k, *args)), KILL_AT, STEPS)
        text = self.r.run(f"{kind}_bf16_resumed", self.r.command(script, *train_args(w, k, *args, "--resume")))
        noise, resumed = max_diff(weights(a), weights(b)), max_diff(weights(a), weights(k))
        detail = (f"{'resumed at step 4' if 'resumed at step 4/' in text else 'NOT resumed at step 4'}; "
                  f"max |w_resumed - w| {resumed:.1e}, run-to-run {noise:.1e}")
        if kind == "train_dpo":
            first = records(a)[0]["loss"]
            detail += f"; first loss - ln 2 = {first - math.log(2):.1e}"
            if abs(first - math.log(2)) > LN2_ATOL:
                raise Failed(detail)
        if "resumed at step 4/" not in text or resumed > max(NOISE_FACTOR * noise, 1e-6):
            raise Failed(detail)
        return detail

    def fsdp_one_process(self):
        w = self.ensure_world()
        plain, sharded, killed = self.out("rm_fp32"), self.out("rm_fp32_fsdp"), self.out("rm_fp32_fsdp_killed")
        args = ["--dtype", "fp32", "--batch_size", 8]
        self.r.run("rm_fp32", self.r.command("train_rm.py", *train_args(w, plain, *args)))
        self.r.run("rm_fp32_fsdp", self.r.command("train_rm.py", *train_args(w, sharded, *args, "--fsdp")))
        self.r.run_and_kill("rm_fp32_fsdp_killed",
                            self.r.command("train_rm.py", *train_args(w, killed, *args, "--fsdp")), KILL_AT, STEPS)
        self.r.run("rm_fp32_resumed_plain", self.r.command("train_rm.py", *train_args(w, killed, *args, "--resume")))
        dpo = self.out("dpo_bf16_fsdp")
        self.r.run("dpo_bf16_fsdp",
                   self.r.command("train_dpo.py", *train_args(w, dpo, "--dtype", "bf16", "--batch_size", 8, "--fsdp")))
        same, same_detail = same_training(plain, sharded)
        across, across_detail = same_training(plain, killed)
        losses = [r["loss"] for r in records(dpo)]
        detail = (f"fp32 --fsdp vs without: {same_detail}; killed under --fsdp, resumed without: {across_detail}; "
                  f"bf16 DPO first loss - ln 2 = {losses[0] - math.log(2):.1e}, last {losses[-1]:.3f}")
        if not (same and across) or abs(losses[0] - math.log(2)) > LN2_ATOL or losses[-1] >= losses[0]:
            raise Failed(detail)
        return detail

    def evaluate(self):
        w = self.ensure_world()
        rm, dpo = self.r.out / "runs" / "train_rm_bf16_a", self.r.out / "runs" / "train_dpo_bf16_a"
        if not (rm / "model").is_dir() or not (dpo / "model").is_dir():
            raise Skip("needs the bf16 runs above")
        out_rm, out_dpo = self.out("eval_rm"), self.out("eval_dpo")
        dtype = ["--dtype", "bf16", "--device", self.device]
        self.r.run("evaluate_rm", self.r.command("evaluate.py", "rm", "--reward_model", rm / "model", "--data",
                                                 w["data"], "--num_pairs", 48, "--output", out_rm, *dtype))
        self.r.run("evaluate_dpo", self.r.command(
            "evaluate.py", "dpo", "--base", w["model"], "--policy", dpo / "model", "--reward_model", rm / "model",
            "--data", w["data"], "--num_prompts", 8, "--max_new_tokens", 16, "--samples_per_prompt", 1,
            "--output", out_dpo, *dtype))
        rm_summary = json.loads((out_rm / "summary.json").read_text())
        dpo_summary = json.loads((out_dpo / "summary.json").read_text())
        return (f"rm: {len(rm_summary)} summary keys, accuracy {find_number(rm_summary, 'accuracy')}; "
                f"dpo: {len(dpo_summary)} summary keys, win rate {find_number(dpo_summary, 'win_rate')}")

    def memory(self, ranks: int):
        """Peak of a training step of a reward model (bf16, checkpointing, 1 pair of 64 tokens: the
        activations are small) against the formula's weights + gradients + AdamW (+ autocast copies)."""
        if ranks > 1:
            self.need_two()
        w = self.ensure_world()
        shape = "qwen0.5b" if self.device == "cuda" else "small"
        sys.path.insert(0, str(REPO / "bench"))
        from common import SHAPES

        vocab = max(SHAPES[shape]["vocab_size"], len(w["tokenizer"]))
        cfg = ModelConfig.from_hf_dict({**SHAPES[shape], "vocab_size": vocab})
        ckpt = self.r.out / "world" / f"{shape}_model"
        if not (ckpt / "config.json").is_file():
            torch.manual_seed(0)
            minialign.save_model(CausalLM(cfg), ckpt, w["tokenizer"])
        with torch.device("meta"):
            model = RewardModel(cfg)  # what train_rm.py trains: the backbone and a 1 x C head
        n = sum(p.numel() for p in model.parameters())
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        root = n - sum(p.numel() for layer in model.model.layers for p in layer.parameters())
        if ranks == 1:
            predicted = STATE_BYTES * n + AUTOCAST_BYTES * matmul
            flags = []
        else:
            predicted = STATE_BYTES * n / ranks + GATHERED_ROOT_BYTES * root
            flags = ["--fsdp"]
        name = f"memory_{ranks}"
        out = self.out(name)
        self.r.run(name, self.r.command(
            "train_rm.py", "--model", ckpt, "--data", w["data"], "--output", out, "--max_length", 64,
            "--max_prompt_length", 32, "--batch_size", 1, "--max_steps", 3, "--dtype", "bf16", "--gradient_checkpointing",
            "--dist_timeout", 300, *flags, ranks=ranks))
        peak = max(r["peak_memory_mb"] for r in records(out)[1:]) * 2**20
        ratio = peak / predicted
        detail = (f"{shape}, {n / 1e6:.0f}M parameters, {ranks} rank(s): step peak {peak / 2**30:.2f} GiB, formula "
                  f"{predicted / 2**30:.2f} GiB, ratio {ratio:.2f}")
        if self.device == "cpu":
            return detail + " (CPU: the peak resident set, libraries included; not judged)"
        if not MEMORY_BOUNDS[0] <= ratio <= MEMORY_BOUNDS[1]:
            raise Failed(detail + f", expected within {MEMORY_BOUNDS}")
        return detail

    # --- two ranks
    def ddp_two(self):
        self.need_two()
        w = self.ensure_world()
        one, two = self.r.out / "runs" / "rm_fp32", self.out("rm_fp32_ddp2")
        if not (one / "model").is_dir():
            raise Skip("needs the fp32 run of the fsdp check")
        self.r.run("rm_fp32_ddp2",
                   self.r.command("train_rm.py", *train_args(w, two, "--dtype", "fp32", "--batch_size", 4), ranks=2))
        ok, detail = same_training(one, two)
        if not ok:
            raise Failed(detail)
        return detail

    def fsdp_two(self):
        self.need_two()
        w = self.ensure_world()
        one = self.r.out / "runs" / "rm_fp32"
        if not (one / "model").is_dir():
            raise Skip("needs the fp32 run of the fsdp check")
        rm, dpo = self.out("rm_fp32_fsdp2"), self.out("dpo_bf16_fsdp2")
        self.r.run("rm_fp32_fsdp2", self.r.command("train_rm.py", *train_args(
            w, rm, "--dtype", "fp32", "--batch_size", 2, "--grad_accum", 2, "--gradient_checkpointing", "--fsdp"),
            ranks=2))
        self.r.run("dpo_bf16_fsdp2", self.r.command("train_dpo.py", *train_args(
            w, dpo, "--dtype", "bf16", "--batch_size", 4, "--fsdp"), ranks=2))
        ok, same = same_training(one, rm)
        losses = [r["loss"] for r in records(dpo)]
        detail = (f"fp32, accumulation 2, checkpointing, vs 1 process: {same}; bf16 DPO first loss - ln 2 = "
                  f"{losses[0] - math.log(2):.1e}, last {losses[-1]:.3f}")
        if not ok or abs(losses[0] - math.log(2)) > LN2_ATOL or losses[-1] >= losses[0]:
            raise Failed(detail)
        return detail

    def allreduce(self):
        self.need_two()
        text = self.r.run("bench_allreduce", [sys.executable, str(REPO / "bench" / "bench_allreduce.py"), "--quick",
                                              "--bucket_mb", 4, "--rounds", 3, "--device", self.device])
        row = [json.loads(line) for line in text.splitlines() if line.startswith("{")][-1]
        detail = (f"{row['buckets']} buckets, {row['buckets_launched_in_backward']} launched in backward; wait "
                  f"{1e3 * row['wait_s']:.1f} ms vs {1e3 * row['wait_s_no_overlap']:.1f} ms without overlap "
                  f"(hidden {row['hidden']})")
        if not row["buckets_launched_in_backward"]:
            raise Failed(detail)
        return detail + (" (CPU: gloo shares the cores with backward; not judged)" if self.device == "cpu" else "")

    def pytest_cuda(self):
        if importlib.util.find_spec("pytest") is None:
            raise Skip("pytest is not installed (pip install -e '.[test]')")
        files = [str(p) for p in sorted((REPO / "tests").glob("test_*.py")) if "mark.cuda" in p.read_text()]
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *files]
        log = self.r.logs / "pytest_cuda.log"
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=self.r.env, timeout=RUN_TIMEOUT_S)
        log.write_text(p.stdout + p.stderr)
        summary = tail(p.stdout, 1)
        if p.returncode not in (0, 5):  # 5: nothing collected
            raise Failed(f"{summary} (see {log})")
        return summary


def find_number(obj, key: str):
    """The first number stored under `key` anywhere in a nested summary (for the table only)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, (int, float)):
                return round(v, 3)
            found = find_number(v, key)
            if found is not None:
                return found
    if isinstance(obj, list):
        for v in obj:
            found = find_number(v, key)
            if found is not None:
                return found
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the plumbing")
    p.add_argument("--output", default="runs/gpu_check", help="logs, runs and summary.json")
    p.add_argument("--budget_s", type=float, default=480, help="start no new check after this many seconds")
    p.add_argument("--only", default=None, help="comma-separated check names to run (default: all)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; `--device cpu` runs the same checks' plumbing on the CPU", file=sys.stderr)
        return 2
    out = Path(args.output).resolve()  # each run folder in it is replaced when its check runs
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    c = Checks(Runner(out, args.device), args.device, gpus)
    plan = [("environment", c.environment), ("golden fp32", lambda: c.golden("fp32")),
            ("golden bf16", lambda: c.golden("bf16")),
            ("rm bf16 kill + resume", lambda: c.kill_and_resume("train_rm.py", [])),
            ("dpo bf16 kill + resume", lambda: c.kill_and_resume("train_dpo.py", [])),
            ("fsdp 1 process", c.fsdp_one_process), ("ddp 2 ranks", c.ddp_two), ("fsdp 2 ranks", c.fsdp_two),
            ("all-reduce overlap", c.allreduce), ("evaluate.py", c.evaluate), ("memory 1 rank", lambda: c.memory(1)),
            ("memory fsdp 2 ranks", lambda: c.memory(2)), ("pytest -m cuda", c.pytest_cuda)]
    only = set(args.only.split(",")) if args.only else None
    start, rows = time.time(), []
    for name, check in plan:
        t0 = time.time()
        if only and name not in only:
            continue
        if t0 - start > args.budget_s:
            status, detail = "skipped", f"out of time (--budget_s {args.budget_s:g})"
        else:
            try:
                status, detail = "ok", check()
            except Skip as e:
                status, detail = "skipped", str(e)
            except Failed as e:
                status, detail = "FAILED", str(e)
            except Exception as e:  # a bug in this script or in minialign: show where
                status, detail = "FAILED", f"{type(e).__name__}: {e} [{tail(traceback.format_exc(), 2)}]"
        rows.append({"check": name, "status": status, "seconds": round(time.time() - t0, 1), "detail": detail})
        print(f"{status:8} {name:24} {rows[-1]['seconds']:6.1f}s  {detail}", flush=True)
    width = max(len(r["check"]) for r in rows)
    print(f"\ngpu_check on {args.device} ({time.time() - start:.0f} s; logs in {out / 'logs'})")
    for r in rows:
        print(f"{r['check']:{width}}  {r['status']:8}  {r['detail']}")
    (out / "summary.json").write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
