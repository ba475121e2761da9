"""Everything a CPU cannot show, in one command, on any machine with a CUDA GPU (more with two).

    python bench/gpu_check.py                      # estimated 5-8 minutes on one H100 (never run on a GPU yet)
    python bench/gpu_check.py --device cpu         # a dry run of the same checks on the CPU (gloo, 2 ranks)
    python bench/gpu_check.py --only "golden fp32,ddp 2 ranks"     # some checks only

Checks, in this order (a check that needs 2 GPUs is skipped on a machine with one):
  environment         torch, CUDA, the GPUs, bf16 support
  golden fp32 / bf16  logits and reward scores of tests/fixtures/golden on the device against
                      transformers' recorded fp32 numbers (fp32: 1e-4; bf16 autocast: 0.25, where
                      the CPU's bf16 misses by at most 0.092)
  host syncs          one DPO step (packed, live reference, bf16, the reducer on a group of one)
                      under torch.cuda.set_sync_debug_mode("warn"): warnings counted in forward,
                      backward and the rest of the step (expected 0, 0 and 1: the metrics' fetch)
  dpo step speed      tokens/s of that step at the Qwen2.5-0.5B shape (24 layers), 4 pairs of
                      256 + 256 + 256 tokens per micro-step, bf16 autocast, live reference
  gqa decode          KV-cache decoding at that shape (14 query heads, 2 key/value heads): fp32 logits
                      equal the full forward's (1e-4); bf16 ms per token step at B=32 after 1,024 tokens
  rm / dpo bf16       train_rm.py / train_dpo.py --dtype bf16: killed after the step-4 checkpoint and
  kill + resume       resumed, against the uninterrupted run, within 10x the difference between two
                      uninterrupted runs (GPU kernels such as attention's backward may differ in the
                      last bits from run to run); DPO's first loss ln 2 (reference held in bf16)
  fsdp 1 process      --fsdp on a group of one: fp32 equals the run without it; killed under --fsdp
                      and resumed without it, equal again; bf16 DPO starts at ln 2 and learns
  precompute fsdp     train_dpo.load_reference --fsdp --precompute_ref under torchrun (2 ranks, or 1
                      on one GPU): memory_allocated after the tables are built is back to the policy's
  ddp 2 ranks         torchrun on 2 GPUs (NCCL) equals one GPU (fp32, up to summation order: CLOSE)
  fsdp 2 ranks        torchrun --fsdp, accumulation 2, checkpointing: equals one GPU (fp32); bf16
                      DPO starts at ln 2
  fsdp 2 ranks kill   the same 2-rank --fsdp run killed at step 5 and resumed from step 4 equals the
  + resume            uninterrupted one
  all-reduce overlap  bench/bench_allreduce.py on NCCL: buckets launched during backward, share hidden
  evaluate.py         rm and dpo on the models trained above
  evaluate.py 2 ranks evaluate.py dpo under torchrun on 2 GPUs: the same summary as on one
  memory 1 rank       a Qwen2.5-0.5B-shaped reward model in bf16, in this process with the reducer on
                      a group of one (as every rank of a data-parallel run holds it): the step's peak
                      against docs/memory.md's 16 N + 2 M (no checkpointing, which would recompute, and
                      so free, the autocast copies the 2 M term counts; 64 tokens of activations)
  memory fsdp 2 ranks the same reward model sharded: its peak against 16 N / 2 + 2 per root parameter
  pytest -m cuda      the tests marked cuda (tests/test_cuda.py, the packed attention kernel test)

It prints one table (ok / FAILED / skipped, with the numbers) and writes it as OUTPUT/summary.json;
every command's output is in OUTPUT/logs/. Checks stop being started after --budget_s seconds.
"""
from __future__ import annotations

import argparse
import gc
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
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # bench/common.py's model shapes

from safetensors.torch import load_file  # noqa: E402

import minialign  # noqa: E402
from minialign.collate import TokenizedPair  # noqa: E402
from minialign.config import ModelConfig  # noqa: E402
from minialign.distributed import DistEnv  # noqa: E402
from minialign.dpo import DPOObjective, LiveReference  # noqa: E402
from minialign.model import CausalLM, RewardModel  # noqa: E402
from minialign.packing import make_batch  # noqa: E402
from minialign.precision import autocast_context, hold_frozen_in_bf16  # noqa: E402
from minialign.reducer import GradReducer  # noqa: E402
from minialign.reward import RewardObjective  # noqa: E402
from minialign.tokenizer import train_bpe_tokenizer  # noqa: E402
from minialign.train import build_optimizer, train_step  # noqa: E402
from common import SHAPES  # noqa: E402

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
# One step's largest move: the CPU dry run's "ddp 2 ranks" (gloo, before and after issue #27) ends
# with a few elements 3.1e-4 apart (a share of 1.1e-5), which a quarter of it (2.5e-4) refused.
MAX_DIFF = 1e-3
NOISE_FACTOR = 10  # a resumed run may differ from the uninterrupted one by this many times the run-to-run noise
LN2_ATOL = 1e-5
STEPS, KILL_AT = 8, 5  # short runs, checkpoint every 2 steps: killed at step 5, the step-4 checkpoint resumes
# fsdp 2 ranks (and its kill + resume): accumulation and checkpointing under --fsdp, in fp32
FSDP2_RM_ARGS = ("--dtype", "fp32", "--batch_size", 2, "--grad_accum", 2, "--gradient_checkpointing", "--fsdp")
# docs/memory.md: bytes per parameter (weights, gradients, AdamW) and per matmul weight
# (autocast's bf16 copies), measured by bench/bench_memory.py.
STATE_BYTES, AUTOCAST_BYTES, GATHERED_ROOT_BYTES = 16.0, 2.0, 2.0
# Measured peak / formula. One rank: 64 tokens of activations are ~1 % of 16 N + 2 M at 0.5B; the
# allocator rounds each block up by at most 2 MB. Two ranks: layers in flight and the fp32
# reduce-scatter input (docs/memory.md) are not in 16 N / W + 2 R.
MEMORY_BOUNDS = {1: (0.97, 1.10), 2: (0.9, 1.35)}
# The speed check's shape (stated in the table): Qwen2.5-0.5B, 4 pairs per micro-step.
SPEED_SHAPE, SPEED_PAIRS, SPEED_LEN, SPEED_STEPS = "qwen0.5b", 4, 256, 5
DECODE_SHAPE = (32, 1024, 32)  # the decode check's batch, prompt tokens and new tokens
MAX_SYNCS = {"forward": 0, "backward": 0, "step": 1}  # the step's one: its metrics reach the host
REF_FREED_SLACK = 2**20  # bytes memory_allocated may stay above the policy's once the reference is gone
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


TINY = dict(model_type="qwen2", vocab_size=400, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def build_world(root: Path) -> dict:
    """Preferences, a BPE trained on them and a small random qwen2 model (untied head) in HF layout."""
    root.mkdir(parents=True, exist_ok=True)
    data = write_preferences(root / "prefs.jsonl")
    texts = [" ".join(str(v) for v in json.loads(line).values()) for line in open(data)]
    tok = train_bpe_tokenizer(texts, root / "tokenizer", vocab_size=400)
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict({**TINY, "vocab_size": len(tok)})
    minialign.save_model(CausalLM(cfg), root / "base", tok)
    return {"data": data, "model": root / "base", "tokenizer": tok}


def random_items(vocab: int, n: int, length: int, seed: int = 0) -> list[TokenizedPair]:
    """n pairs of random ordinary tokens (ids 3 and up), prompt and both answers `length` tokens each."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda: torch.randint(3, vocab, (length,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(), ids(), ids(), line=i + 1) for i in range(n)]


# The --precompute_ref --fsdp check's worker, run under torchrun: memory_allocated with the sharded
# policy loaded, then again once train_dpo.load_reference has built the tables and returned.
PRECOMPUTE_WORKER = r'''
import json, sys
import torch
import train_dpo
from minialign import load_tokenizer
from minialign.cli import data_config
from minialign.distributed import finish_distributed, init_distributed
from minialign.fsdp import load_sharded
from minialign.prepare import prepare_pairs

args = train_dpo.parse_args(sys.argv[1:])
env = init_distributed(args.dist_timeout)
tokenizer = load_tokenizer(args.model)
train_items, eval_items = prepare_pairs(tokenizer, data_config(args), env)
policy = load_sharded(args.model, env, args.dtype)
cuda = env.device.type == "cuda"
before = torch.cuda.memory_allocated(env.device) if cuda else 0
reference = train_dpo.load_reference(args, env, args.dtype, tokenizer, train_items, eval_items)
after = torch.cuda.memory_allocated(env.device) if cuda else 0
tables = 8 * (len(train_items) + len(eval_items))  # (N, 2) fp32 per split, on the device now
if env.is_main:
    print("RESULT " + json.dumps({"before": before, "after": after, "tables": tables, "ranks": env.world_size}), flush=True)
finish_distributed(env)
'''


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

    def earlier_run(self, name: str, check: str) -> Path:
        """runs/NAME, the model an earlier check trained; Skip when that check did not run."""
        path = self.r.out / "runs" / name
        if not (path / "model").is_dir():
            raise Skip(f"needs the {check} check's run {name}")
        return path

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
        rm = self.earlier_run("train_rm_bf16_a", "rm bf16 kill + resume")
        dpo = self.earlier_run("train_dpo_bf16_a", "dpo bf16 kill + resume")
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

    # --- in this process, on a group of one
    def env_of_one(self) -> DistEnv:
        """A process group of one in this process (NCCL on cuda:0, gloo on the CPU): the reducer then
        runs its hooks, flags and all-reduces as on every rank of a data-parallel run."""
        cuda = self.device == "cuda"
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device if cuda else None)
        return DistEnv(0, 1, 0, device)

    def dpo_setup(self, shape: dict, pairs: int, length: int):
        """Policy, its bf16-held reference, the DPO objective, the reducer, AdamW and two packed
        micro-batches of `pairs` random pairs (prompt, chosen and rejected of `length` tokens each)."""
        env = self.env_of_one()
        torch.manual_seed(0)
        cfg = ModelConfig.from_hf_dict(shape)
        with env.device:
            policy, reference = CausalLM(cfg), CausalLM(cfg)
        reference.load_state_dict(policy.state_dict())
        hold_frozen_in_bf16(reference.eval().requires_grad_(False))
        items = random_items(cfg.vocab_size, 2 * pairs, length)
        batches = [make_batch(items, list(range(i * pairs, (i + 1) * pairs)), 0, "train", env.device, True)
                   for i in range(2)]  # padded to 8 on CUDA by make_batch
        return (env, policy, DPOObjective(reference=LiveReference(reference)), GradReducer(policy, env),
                build_optimizer(policy, 1e-6, 0.0), batches)

    def host_syncs(self):
        """Warnings of torch.cuda.set_sync_debug_mode("warn") in one DPO step, by phase."""
        env, policy, objective, reducer, optimizer, batches = self.dpo_setup(TINY, 4, 32)
        precision = autocast_context("bf16", env.device)  # the reference is held in bf16 for it
        for _ in range(2):  # warm-up: first calls (cuBLAS handles, NCCL's communicator) may wait once
            train_step(policy, objective, batches, optimizer, reducer, 1e-6, 1.0, precision, env)
        counts, phase = {"forward": 0, "backward": 0, "step": 0}, ["step"]

        def loss(model, batch):
            phase[0] = "forward"
            out = objective.loss(model, batch)
            phase[0] = "backward"  # train_step's next line is the backward
            return out

        real_wait = reducer.wait

        def wait():
            phase[0] = "step"
            real_wait()

        def count(message, *args, **kwargs):
            if "synchroniz" in str(message).lower():
                counts[phase[0]] += 1

        reducer.wait = wait
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = count
            if self.device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                phased = SimpleNamespace(loss=loss, summarize=objective.summarize, headline=objective.headline)
                train_step(policy, phased, batches, optimizer, reducer, 1e-6, 1.0, precision, env)
            finally:
                if self.device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        detail = (f"warnings in forward {counts['forward']}, backward {counts['backward']}, rest of the step "
                  f"{counts['step']} (at most {MAX_SYNCS})")
        if self.device == "cpu":
            return detail + " (CPU: no sync warnings exist; the step ran)"
        if any(counts[k] > MAX_SYNCS[k] for k in counts):
            raise Failed(detail)
        return detail

    def step_speed(self):
        """Tokens/s of the DPO step at SPEED_SHAPE (the CPU dry run: the small shape, 32 tokens)."""
        cuda = self.device == "cuda"
        name, length = (SPEED_SHAPE, SPEED_LEN) if cuda else ("small", 32)
        env, policy, objective, reducer, optimizer, batches = self.dpo_setup(SHAPES[name], SPEED_PAIRS, length)
        precision = autocast_context("bf16", env.device)  # the reference is held in bf16 for it
        step = lambda: train_step(policy, objective, batches, optimizer, reducer, 1e-6, 1.0, precision, env)  # noqa: E731
        step()  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        steps = SPEED_STEPS if cuda else 1
        t0 = time.perf_counter()
        for _ in range(steps):
            sums = step()  # each ends by fetching its metrics: the GPU has finished the step
        seconds = (time.perf_counter() - t0) / steps
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        del policy, objective, reducer, optimizer, batches
        release_memory()
        return (f"{name}, 2 micro-steps x {SPEED_PAIRS} packed pairs of {length} + {length} + {length} tokens, "
                f"bf16 autocast, live reference: {sums['tokens'] / seconds:,.0f} tokens/s, "
                f"{1e3 * seconds:.0f} ms per step{peak}")

    @torch.no_grad()
    def gqa_decode(self):
        """KV-cache decoding of a grouped-query model (Qwen2.5-0.5B's 14 query and 2 key/value heads)
        on the device: every decoded token's fp32 logits against one full forward, then the bf16
        decode speed at DECODE_SHAPE (issue #27's item 7: key/value heads shared, not repeated)."""
        from minialign.model import KVCache

        cuda = self.device == "cuda"
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        cfg = ModelConfig.from_hf_dict(SHAPES["qwen0.5b" if cuda else "small"])
        torch.manual_seed(0)
        with device:
            model = CausalLM(cfg).eval()
        ids = torch.randint(3, 1000, (2, 24), device=device)
        mask = torch.ones(2, 24, dtype=torch.long, device=device)
        mask[1, :5] = 0  # a left-padded row, as generation pads
        full = model(ids, mask)  # (2, 24, V)
        cache, P = KVCache(cfg, 2, 24, device, torch.float32), 16
        worst = (model(ids[:, :P], mask[:, :P], kv_cache=cache) - full[:, :P]).abs().max().item()
        for t in range(P, 24):
            step = model(ids[:, t:t + 1], mask[:, :t + 1], kv_cache=cache)  # (2, 1, V)
            worst = max(worst, (step[:, 0] - full[:, t]).abs().max().item())
        B, S, new = DECODE_SHAPE if cuda else (2, 64, 4)
        model.to(torch.bfloat16)
        ids = torch.randint(3, 1000, (B, S), device=device)
        mask = torch.ones(B, S + new, dtype=torch.long, device=device)
        cache = KVCache(cfg, B, S + new, device, torch.bfloat16)
        token = model(ids, mask[:, :S], kv_cache=cache)[:, -1:].argmax(-1)  # prefill: (B, 1)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in range(new):
            token = model(token, mask[:, :S + t + 1], kv_cache=cache)[:, -1:].argmax(-1)  # (B, 1)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        del model, cache
        release_memory()
        detail = (f"fp32 max |decoded - full forward| {worst:.1e} (tolerance {FP32_ATOL:g}); bf16 decode, B={B} after "
                  f"{S} tokens: {1e3 * seconds / new:.1f} ms per token step, {B * new / seconds:,.0f} tokens/s")
        if worst > FP32_ATOL:
            raise Failed(detail)
        return detail

    def memory_one(self):
        """Peak of a reward-model step in this process, the reducer on a group of one, against 16 N + 2 M."""
        cuda = self.device == "cuda"
        shape = "qwen0.5b" if cuda else "small"
        release_memory()
        env = self.env_of_one()
        base = torch.cuda.memory_allocated() if cuda else 0
        cfg = ModelConfig.from_hf_dict(SHAPES[shape])
        torch.manual_seed(0)
        with env.device:
            model = RewardModel(cfg)
        n = sum(p.numel() for p in model.parameters())
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        reducer, optimizer = GradReducer(model, env), build_optimizer(model, 1e-5, 0.0)
        batches = [make_batch(random_items(cfg.vocab_size, 1, 21), [0], 0, "train", env.device, True)]  # 64 tokens
        precision = autocast_context("bf16" if cuda else "fp32", env.device)
        for i in range(3):  # AdamW's state exists from the first step on: measure the third
            if cuda and i == 2:
                torch.cuda.reset_peak_memory_stats()
            train_step(model, RewardObjective(), batches, optimizer, reducer, 1e-5, 1.0, precision, env)
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
        predicted = STATE_BYTES * n + AUTOCAST_BYTES * matmul
        del model, reducer, optimizer, batches
        release_memory()
        detail = (f"{shape}, {n / 1e6:.0f}M parameters: step peak {peak / 2**30:.2f} GiB, 16 N + 2 M = "
                  f"{predicted / 2**30:.2f} GiB, ratio {peak / predicted:.3f}")
        if not cuda:
            return detail + " (CPU: memory_allocated is CUDA's; the step ran, not judged)"
        if not MEMORY_BOUNDS[1][0] <= peak / predicted <= MEMORY_BOUNDS[1][1]:
            raise Failed(detail + f", expected within {MEMORY_BOUNDS[1]}")
        return detail

    def memory_fsdp_two(self):
        """Peak of a sharded reward-model step on 2 ranks (train_rm.py --fsdp) against 16 N / 2 + 2 R."""
        self.need_two()
        w = self.ensure_world()
        shape = "qwen0.5b" if self.device == "cuda" else "small"
        vocab = max(SHAPES[shape]["vocab_size"], len(w["tokenizer"]))
        cfg = ModelConfig.from_hf_dict({**SHAPES[shape], "vocab_size": vocab})
        ckpt = self.r.out / "world" / f"{shape}_model"
        if not (ckpt / "config.json").is_file():
            torch.manual_seed(0)
            minialign.save_model(CausalLM(cfg), ckpt, w["tokenizer"])
        with torch.device("meta"):
            model = RewardModel(cfg)  # what train_rm.py trains: the backbone and a 1 x C head
        n = sum(p.numel() for p in model.parameters())
        root = n - sum(p.numel() for layer in model.model.layers for p in layer.parameters())
        predicted = STATE_BYTES * n / 2 + GATHERED_ROOT_BYTES * root
        out = self.out("memory_2")
        self.r.run("memory_2", self.r.command(
            "train_rm.py", "--model", ckpt, "--data", w["data"], "--output", out, "--max_length", 64,
            "--max_prompt_length", 32, "--batch_size", 1, "--max_steps", 3, "--dtype", "bf16", "--gradient_checkpointing",
            "--dist_timeout", 300, "--fsdp", ranks=2))
        peak = max(r["peak_memory_mb"] for r in records(out)[1:]) * 2**20
        ratio = peak / predicted
        detail = (f"{shape}, {n / 1e6:.0f}M parameters, 2 ranks: step peak {peak / 2**30:.2f} GiB, formula "
                  f"{predicted / 2**30:.2f} GiB, ratio {ratio:.2f}")
        if self.device == "cpu":
            return detail + " (CPU: the peak resident set, libraries included; not judged)"
        if not MEMORY_BOUNDS[2][0] <= ratio <= MEMORY_BOUNDS[2][1]:
            raise Failed(detail + f", expected within {MEMORY_BOUNDS[2]}")
        return detail

    def precompute_fsdp(self):
        """--fsdp --precompute_ref: once load_reference returns, the sharded reference is gone."""
        w = self.ensure_world()
        ranks = 2 if self.device == "cpu" else min(self.gpus, 2)  # torchrun with 1 rank on one GPU
        out = self.out("precompute_fsdp")
        out.mkdir(parents=True)
        worker = out / "worker.py"
        worker.write_text(PRECOMPUTE_WORKER)
        dtype = "bf16" if self.device == "cuda" else "fp32"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
               worker, *train_args(w, out, "--dtype", dtype, "--batch_size", 4, "--fsdp", "--precompute_ref")]
        text = self.r.run("precompute_fsdp", cmd)
        row = json.loads([line for line in text.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
        left = row["after"] - row["before"] - row["tables"]
        detail = (f"{row['ranks']} rank(s), {dtype}: memory_allocated {row['before'] / 2**20:.1f} MiB with the policy, "
                  f"{row['after'] / 2**20:.1f} MiB after the reference's tables ({row['tables']} bytes) were built")
        if self.device == "cpu":
            return detail + " (CPU: memory_allocated is CUDA's; the path ran, not judged)"
        if left > REF_FREED_SLACK:
            raise Failed(detail + f": {left / 2**20:.1f} MiB of the reference still held")
        return detail

    # --- two ranks
    def ddp_two(self):
        self.need_two()
        w = self.ensure_world()
        one, two = self.earlier_run("rm_fp32", "fsdp 1 process"), self.out("rm_fp32_ddp2")
        self.r.run("rm_fp32_ddp2",
                   self.r.command("train_rm.py", *train_args(w, two, "--dtype", "fp32", "--batch_size", 4), ranks=2))
        ok, detail = same_training(one, two)
        if not ok:
            raise Failed(detail)
        return detail

    def fsdp_two(self):
        self.need_two()
        w = self.ensure_world()
        one = self.earlier_run("rm_fp32", "fsdp 1 process")
        rm, dpo = self.out("rm_fp32_fsdp2"), self.out("dpo_bf16_fsdp2")
        self.r.run("rm_fp32_fsdp2", self.r.command("train_rm.py", *train_args(w, rm, *FSDP2_RM_ARGS), ranks=2))
        self.r.run("dpo_bf16_fsdp2", self.r.command("train_dpo.py", *train_args(
            w, dpo, "--dtype", "bf16", "--batch_size", 4, "--fsdp"), ranks=2))
        ok, same = same_training(one, rm)
        losses = [r["loss"] for r in records(dpo)]
        detail = (f"fp32, accumulation 2, checkpointing, vs 1 process: {same}; bf16 DPO first loss - ln 2 = "
                  f"{losses[0] - math.log(2):.1e}, last {losses[-1]:.3f}")
        if not ok or abs(losses[0] - math.log(2)) > LN2_ATOL or losses[-1] >= losses[0]:
            raise Failed(detail)
        return detail

    def fsdp_two_kill_resume(self):
        """The 2-rank --fsdp run of fsdp_two, killed at step 5 and resumed from step 4 on 2 ranks."""
        self.need_two()
        w = self.ensure_world()
        whole = self.earlier_run("rm_fp32_fsdp2", "fsdp 2 ranks")
        killed = self.out("rm_fp32_fsdp2_killed")
        args = FSDP2_RM_ARGS
        self.r.run_and_kill("rm_fp32_fsdp2_killed", self.r.command("train_rm.py", *train_args(w, killed, *args), ranks=2),
                            KILL_AT, STEPS)
        text = self.r.run("rm_fp32_fsdp2_resumed",
                          self.r.command("train_rm.py", *train_args(w, killed, *args, "--resume"), ranks=2))
        ok, detail = same_training(whole, killed)
        resumed = "resumed at step 4/" in text
        detail = f"{'resumed at step 4' if resumed else 'NOT resumed at step 4'}; against the uninterrupted run: {detail}"
        if not (ok and resumed):
            raise Failed(detail)
        return detail

    def evaluate_two(self):
        """evaluate.py dpo under torchrun on 2 GPUs, beside the 1-GPU run of the evaluate.py check."""
        self.need_two()
        w = self.ensure_world()
        rm, dpo, one = (self.r.out / "runs" / n for n in ("train_rm_bf16_a", "train_dpo_bf16_a", "eval_dpo"))
        if not (one / "summary.json").is_file():
            raise Skip("needs the evaluate.py check's run")
        two = self.out("eval_dpo_2ranks")
        self.r.run("evaluate_dpo_2ranks", self.r.command(
            "evaluate.py", "dpo", "--base", w["model"], "--policy", dpo / "model", "--reward_model", rm / "model",
            "--data", w["data"], "--num_prompts", 8, "--max_new_tokens", 16, "--samples_per_prompt", 1,
            "--output", two, "--dtype", "bf16", "--device", self.device, ranks=2))
        a, b = (json.loads((o / "summary.json").read_text()) for o in (one, two))
        detail = (f"win rate {find_number(b, 'win_rate')} on 2 ranks, {find_number(a, 'win_rate')} on 1 "
                  f"(bf16 batches of other sizes may sample differently); summary keys "
                  f"{'the same' if a.keys() == b.keys() else 'DIFFERENT'}")
        if a.keys() != b.keys():
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


def release_memory():
    """Free what earlier in-process checks left (reducer hooks and models hold each other in cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    p.add_argument("--budget_s", type=float, default=480, help="start no new check after this many seconds "
                   "(at most one more check's time is spent after it: keep the whole under 10 minutes)")
    p.add_argument("--only", default=None, help="comma-separated check names to run (default: all)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; `--device cpu` runs the same checks' plumbing on the CPU", file=sys.stderr)
        return 2
    out = Path(args.output).resolve()  # each run folder in it is replaced when its check runs
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    c = Checks(Runner(out, args.device), args.device, gpus)
    plan = [("environment", c.environment), ("golden fp32", lambda: c.golden("fp32")),
            ("golden bf16", lambda: c.golden("bf16")), ("host syncs", c.host_syncs),
            ("memory 1 rank", c.memory_one), ("dpo step speed", c.step_speed),
            ("gqa decode", c.gqa_decode),
            ("rm bf16 kill + resume", lambda: c.kill_and_resume("train_rm.py", [])),
            ("dpo bf16 kill + resume", lambda: c.kill_and_resume("train_dpo.py", [])),
            ("fsdp 1 process", c.fsdp_one_process), ("precompute fsdp", c.precompute_fsdp),
            ("ddp 2 ranks", c.ddp_two), ("fsdp 2 ranks", c.fsdp_two),
            ("fsdp 2 ranks kill + resume", c.fsdp_two_kill_resume), ("all-reduce overlap", c.allreduce),
            ("evaluate.py", c.evaluate), ("evaluate.py 2 ranks", c.evaluate_two),
            ("memory fsdp 2 ranks", c.memory_fsdp_two), ("pytest -m cuda", c.pytest_cuda)]
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
    if dist.is_initialized():  # the group of one of the in-process checks
        dist.destroy_process_group()
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
