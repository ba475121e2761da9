"""What a training run tells the user while it runs: the start-up lines, one progress line and one
metrics.jsonl record per step, eval lines, peak memory, and the message of a run that went
non-finite. Bookkeeping only: nothing here changes what is trained (train.py).
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from .distributed import DistEnv, print0
from .fsdp import is_sharded
from .packing import packed_length
from .progress import format_duration
from .reducer import all_reduce_max
from .run_folder import RunFolder
from .sampler import StepPlan, global_batches, padding_fraction, rank_micro_batches


class TrainingLog:
    """metrics.jsonl (MetricsLog), the progress line every log_every steps, the eval lines, and
    each record's time, throughput and peak memory (of its own phase: a step, an eval)."""

    def __init__(self, run: RunFolder, env: DistEnv, headline, plan: StepPlan, first_step: int, resumed: bool,
                 log_every: int):
        self.env, self.headline, self.plan, self.log_every = env, headline, plan, log_every
        self.metrics = MetricsLog(run.path, env.is_main, resume_step=first_step if resumed else None)
        self.clock = Clock(first_step, plan.total)

    @property
    def records(self) -> list[dict]:
        return self.metrics.records

    def step(self, step: int, metrics: dict, lr: float, grad_norm: float, tokens: float) -> None:
        record = {"step": step, "split": "train", **metrics, "lr": lr, "grad_norm": grad_norm,
                  "epoch": step / self.plan.steps_per_epoch, **self.clock.tick(step, tokens),
                  "peak_memory_mb": phase_peak_mb(self.env)}
        self.metrics.write(record)
        if (self.log_every and step % self.log_every == 0) or step == self.plan.total:
            print0(self.env, progress_line(record, self.headline, self.plan.total, self.clock))

    def eval(self, step: int, metrics: dict, final: bool = False) -> None:
        self.metrics.write({"step": step, "split": "eval", **metrics, "peak_memory_mb": phase_peak_mb(self.env)})
        print0(self.env, ("final eval  " if final else "eval  ") + format_metrics(metrics))


def describe_plan(plan: StepPlan, items, packed: bool) -> str:
    """One line: pairs, global batch, steps, and the share of batch slots that is padding."""
    first = global_batches(plan.n, plan.global_batch, plan.seed, 0, plan.lengths)

    def rows(i):  # the real lengths of the rows pair i fills: one packed row, or chosen and rejected
        it = items[i]
        if packed:
            return [packed_length(it)]
        return [len(it.prompt_ids) + len(it.chosen_ids), len(it.prompt_ids) + len(it.rejected_ids)]

    batches = [[n for i in mb for n in rows(i)] for b in first for r in range(plan.world_size)
               for mb in rank_micro_batches(b, r, plan.world_size, plan.grad_accum)]
    per_pair = sum(map(sum, batches)) / sum(len(b) for b in first)
    layout = "one row [prompt | chosen | rejected] per pair" if packed else "two rows per pair"
    return (f"{plan.n} training pairs, global batch {plan.global_batch}, {plan.steps_per_epoch} steps per epoch, "
            f"{plan.total} steps; {layout}, {per_pair:.0f} token positions per pair; padding "
            f"{100 * padding_fraction(batches):.1f}% of batch slots{' (grouped by length)' if plan.lengths else ''}")


# The objective's flags that scale the loss or its gradient: with --lr, the likely cause of a
# non-finite loss (--beta 1e300 overflows the sigmoid's argument), named with their values.
LOSS_SCALE_FLAGS = ("beta", "simpo_gamma", "rpo_alpha", "margin", "center_rewards_coef")


def nonfinite_message(what: str, step: int, run: RunFolder, lr: float, run_settings: dict) -> str:
    ckpt = run.latest_checkpoint_name()
    where = f"the last good checkpoint is {run.checkpoints / ckpt}" if ckpt else "no checkpoint was written yet"
    flags = [f"--lr {lr:g}"] + [f"--{k} {run_settings[k]:g}" for k in LOSS_SCALE_FLAGS
                                if isinstance(run_settings.get(k), (int, float))]
    return (f"non-finite {what} at step {step + 1} with {' '.join(flags)}; training stopped, {where}. A value "
            f"too large among these is the likely cause: lower it (or check the data)")


def describe_setup(model, env: DistEnv, dtype: str) -> str:
    """The start-up line: where the run runs, on what, in which precision."""
    n = sum(p.numel() for p in model.parameters())  # a sharded parameter counts its full size
    cfg = model.config
    ranks = f"{env.world_size} ranks ({'nccl' if env.device.type == 'cuda' else 'gloo'})" if env.world_size > 1 else "1 process"
    sharded = is_sharded(model)
    precision = {(False, "bf16"): " (autocast; fp32 master weights)",
                 (True, "bf16"): " (gathered in bf16; fp32 master shards)"}.get((sharded, dtype), "")
    return (f"{type(model).__name__.removeprefix('FSDP')} {cfg.model_type}, {cfg.num_hidden_layers} layers, "
            f"{n:,} parameters | device {env.device.type}, {ranks}{', FSDP2 sharded' if sharded else ''} | "
            f"dtype {dtype}{precision} | memory after loading {peak_memory_mb(env.device):.0f} MB")


CLEAR_PEAK_RSS = "/proc/self/clear_refs"  # writing "5" here resets Linux's peak resident set of this process


def peak_memory_mb(device, reset: bool = False) -> float:
    """Peak memory of this process since the last reset: the CUDA allocator's peak, or on CPU the
    peak resident set (reset through /proc on Linux; elsewhere it stays the peak since the start)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if reset:
        try:
            Path(CLEAR_PEAK_RSS).write_text("5")
        except OSError:
            pass
    return peak


def phase_peak_mb(env: DistEnv) -> float:
    """The peak since the previous call, max over ranks (the rank closest to its limit); resets it."""
    return all_reduce_max(peak_memory_mb(env.device, reset=True), env)


class Clock:
    """Elapsed time, tokens per second of the last step (all ranks) and the ETA."""

    def __init__(self, first_step: int, total: int):
        self.start = self.last = time.time()
        self.first_step, self.total = first_step, total

    def tick(self, step: int, tokens: float) -> dict:
        now = time.time()
        out = {"tokens_per_s": tokens / max(now - self.last, 1e-9), "elapsed_s": now - self.start,
               "eta_s": (now - self.start) / (step - self.first_step) * (self.total - step)}
        self.last = now
        return out


def format_metrics(metrics: dict) -> str:
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def progress_line(record: dict, headline, total: int, clock: Clock) -> str:
    heads = " | ".join(f"{k} {record[k]:.4f}" for k in headline if k in record)
    return (f"step {record['step']}/{total} | {heads} | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s"
            f" | {format_duration(record['elapsed_s'])} elapsed | ETA {format_duration(record['eta_s'])}")


class MetricsLog:
    """metrics.jsonl in the run folder: one JSON record per train step and per eval (rank 0 only).

    On resume, the records after the checkpoint's step are dropped (those steps are redone), and
    a last line cut short by a crash is dropped too."""

    def __init__(self, folder: Path, enabled: bool, resume_step: int | None):
        self.path = Path(folder) / "metrics.jsonl"
        self.enabled = enabled
        self.records = []
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self.records = [r for r in read_records(self.path) if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict):
        if self.enabled:
            self.records.append(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl; a line that is not JSON (a write cut short by a
    crash) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


__all__ = ["TrainingLog", "describe_plan", "nonfinite_message", "describe_setup", "peak_memory_mb", "phase_peak_mb",
           "Clock", "MetricsLog", "read_records"]
