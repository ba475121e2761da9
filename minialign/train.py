"""The training loop shared by train_rm.py and train_dpo.py.

What differs between reward modelling and DPO is one function, the objective's
`loss(model, batch)`, which returns the loss of every pair of a micro-batch (objective.py).
Everything else lives here once, and the heart of it is `train_step`:

    for each of A micro-batches of this rank (B pairs each, chosen and rejected rows):
        losses = objective.loss(model, batch)             (B,)
        (losses.sum() / pairs_this_step).backward()        grads accumulate locally
    all-reduce gradients: SUM over W ranks, / W            (overlaps the last backward)
    clip, check finite on every rank at once, AdamW step

Why this is the global-batch mean: each rank divides by the pairs it sees in the step
(B * A), and the all-reduce averages over W ranks, so the gradient is
    (1 / W) * sum_r (1 / (B * A)) * sum of its losses = (1 / (W * A * B)) * sum of all losses,
the mean over the global batch of G = W * A * B pairs: accumulation equals a larger batch and
W ranks equal one process.

`train` around it is bookkeeping: which pairs each step takes (sampler.py), the learning
rate, logging, evaluation, checkpoints and resume (resume.py, run_folder.py).
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .collate import to_device
from .distributed import DistEnv, all_reduce_max, all_reduce_sums, print0
from .errors import NonFiniteError, UserError
from .fsdp import is_sharded, local_value
from .objective import Objective
from .packing import collate, packed_length, row_length
from .precision import autocast_context
from .progress import format_duration
from .resume import load_training_checkpoint, save_training_checkpoint
from .run_folder import RunFolder
from .sampler import eval_shard, global_batches, padding_fraction, rank_micro_batches


@dataclass
class TrainConfig:
    """Everything the loop needs, built once from the flags by the scripts (cli.train_config)."""

    lr: float
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    batch_size: int = 4  # pairs per rank per micro-step
    grad_accum: int = 1
    eval_batch_size: int | None = None
    group_by_length: bool = False
    prefix_sharing: bool = True  # one row [prompt | chosen | rejected] per pair (packing.py); the CLI's default too
    pad_to_multiple_of: int | None = None
    dtype: str = "fp32"  # "bf16": autocast, fp32 master weights
    seed: int = 0
    log_every: int = 1  # 0: only at the end
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: no intermediate checkpoint
    save_total_limit: int = 2
    resume: bool = False
    resume_anyway: bool = False  # resume although settings that must not change did
    # Settings a resumed run must share with the run it continues (data fingerprint, model,
    # seed, loss settings, ...): recorded in every checkpoint, compared on resume.
    run_settings: dict = field(default_factory=dict)


def build_optimizer(model, lr: float, weight_decay: float):
    """AdamW; 1-D parameters (norm weights, biases) get no weight decay, as is standard.

    The fused implementation updates each tensor in one pass, without parameter-sized
    temporaries. With a 152k-token vocabulary the embedding is a quarter of a 0.5B model, and
    on CPU the default per-tensor loop took ~1.8 s of a ~4.5 s reward-model step at the
    Qwen2.5-0.5B shape with 4 layers; fused takes ~0.35 s and 1 GB less peak memory (bench/).
    FSDP's sharded parameters (DTensors) take the fused kernel too: each rank updates its shards
    (tests/test_fsdp.py checks the result against one process)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def learning_rate(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up over the first warmup_ratio of steps, then cosine decay towards 0."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(model, objective: Objective, micro_batches: list[dict], optimizer, grad_sync, lr: float,
               max_grad_norm: float, precision, env: DistEnv) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches (the module docstring's pseudo-code).

    grad_sync is the gradient synchronisation (reducer.GradReducer, or FSDP's); returns the
    metric sums over the global batch, with the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    pairs = sum(len(b["pair_index"]) for b in micro_batches)  # this rank's pairs in the step: B * A
    sums: dict = {}
    for i, batch in enumerate(micro_batches):
        grad_sync.set_sync(i == len(micro_batches) - 1)  # communicate once, after the last backward
        with precision:
            losses, metric_sums = objective.loss(model, batch)  # (B,)
        (losses.sum() / pairs).backward()  # the mean over this rank's pairs (see module docstring)
        accumulate(sums, {"loss": losses.detach().sum(), "tokens": batch["num_tokens"], **metric_sums})
    grad_sync.wait()  # gradients are now the global-batch mean on every rank
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    # One collective sums the metrics over ranks; the loss total and the gradient norm in it are
    # then the same on every rank, so all ranks agree to stop before a non-finite step.
    # This is the step's one wait for the GPU (the values must reach the host to be checked).
    sums = all_reduce_sums({**sums, "grad_norm": local_value(grad_norm) / env.world_size}, env)
    if not (math.isfinite(sums["loss"]) and math.isfinite(sums["grad_norm"])):
        raise FloatingPointError("loss" if not math.isfinite(sums["loss"]) else "gradient norm")
    optimizer.step()
    grad_sync.zero_grad()
    return sums


def train(model, objective: Objective, train_items, eval_items, cfg: TrainConfig, env: DistEnv, tokenizer,
          grad_sync, run: RunFolder, optimizer=None) -> tuple[dict | None, list[dict]]:
    """Train for cfg's steps, evaluating and checkpointing as configured; returns the final eval
    metrics (None without eval pairs) and every logged record. train_items / eval_items are
    collate.TokenizedPair lists; grad_sync is reducer.GradReducer (or FSDP's); run is the
    claimed run folder (run_folder.py)."""
    optimizer = optimizer or build_optimizer(model, cfg.lr, cfg.weight_decay)
    # Sharded, FSDP's MixedPrecisionPolicy computes in bf16 already: autocast on top would keep a
    # bf16 copy of every gathered weight until backward (fsdp.py).
    precision = autocast_context("fp32" if is_sharded(model) else cfg.dtype, env.device)
    plan = step_plan(train_items, cfg, env)
    print0(env, plan.describe(train_items))
    step = resume_if_asked(run, model, optimizer, cfg, plan, env)
    # From here on each record's peak_memory_mb is the peak of its own phase (a step, an eval).
    print0(env, f"setup peak memory {phase_peak_mb(env):.0f} MB (loading, reference, resume; max over ranks)")
    log = MetricsLog(run.path, env.is_main, resume_step=step if cfg.resume else None)
    clock = Clock(step, plan.total)
    eval_metrics = None
    while step < plan.total:
        batches = [make_batch(train_items, ids, tokenizer.pad_token_id, "train", env.device, cfg.prefix_sharing,
                              cfg.pad_to_multiple_of) for ids in plan.micro_batches(step)]
        lr = learning_rate(step, plan.total, cfg.lr, cfg.warmup_ratio)
        try:
            sums = train_step(model, objective, batches, optimizer, grad_sync, lr, cfg.max_grad_norm, precision, env)
        except FloatingPointError as what:
            raise NonFiniteError(nonfinite_message(str(what), step, run, cfg)) from None
        step += 1
        record = {"step": step, "split": "train", **objective.summarize(sums), "lr": lr,
                  "grad_norm": sums["grad_norm"], "epoch": step / plan.steps_per_epoch, **clock.tick(step, sums["tokens"]),
                  "peak_memory_mb": phase_peak_mb(env)}
        log.write(record)
        if (cfg.log_every and step % cfg.log_every == 0) or step == plan.total:
            print0(env, progress_line(record, objective.headline, plan.total, clock))
        if eval_items and cfg.eval_every and step % cfg.eval_every == 0 and step < plan.total:
            eval_metrics = evaluate(model, objective, eval_items, cfg, env, tokenizer.pad_token_id, precision)
            log.write({"step": step, "split": "eval", **eval_metrics, "peak_memory_mb": phase_peak_mb(env)})
            print0(env, "eval  " + format_metrics(eval_metrics))
        if cfg.save_every and step % cfg.save_every == 0 and step < plan.total:
            save_checkpoint(run, step, model, optimizer, tokenizer, cfg, plan, env)
            phase_peak_mb(env)  # the save's peak (a sharded model's state gathered to rank 0) is not the next step's
    if eval_items:
        eval_metrics = evaluate(model, objective, eval_items, cfg, env, tokenizer.pad_token_id, precision)
        log.write({"step": step, "split": "eval", **eval_metrics, "peak_memory_mb": phase_peak_mb(env)})
        print0(env, "final eval  " + format_metrics(eval_metrics))
    return eval_metrics, log.records


# ------------------------------------------------------------------------- around the step

class StepPlan:
    """Which pairs every optimizer step takes: a function of (seed, epoch) (sampler.py), so the
    step number alone says where a run is, and a resumed run takes exactly the same batches."""

    def __init__(self, n_pairs: int, cfg: TrainConfig, env: DistEnv, lengths=None):
        self.n, self.cfg, self.env, self.lengths = n_pairs, cfg, env, lengths
        self.global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
        self.steps_per_epoch = n_pairs // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{n_pairs} training pairs do not fill one global batch of {self.global_batch} (--batch_size "
                f"{cfg.batch_size} x --grad_accum {cfg.grad_accum} x {env.world_size} ranks): lower --batch_size "
                f"or --grad_accum, or give more data")
        self.total = cfg.max_steps or max(1, int(cfg.epochs * self.steps_per_epoch))
        self._epoch, self._batches = None, None

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's grad_accum lists of pair indices for optimizer step `step`."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # the epoch's global batches, computed once per epoch
            self._epoch = epoch
            self._batches = global_batches(self.n, self.global_batch, self.cfg.seed, epoch, self.lengths)
        return rank_micro_batches(self._batches[in_epoch], self.env.rank, self.env.world_size, self.cfg.grad_accum)

    def pairs_used(self) -> list[int]:
        """Sorted indices of the training pairs that some step of the run takes: every pair of the
        first epochs the run covers, fewer when --max_steps ends it within an epoch (each epoch
        drops its n mod G tail, so a run may skip a few pairs even then). What must be precomputed
        per pair (DPO's reference log-probs) is needed for these alone."""
        used: set[int] = set()
        for epoch in range(math.ceil(self.total / self.steps_per_epoch)):
            steps = min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch)
            for batch in global_batches(self.n, self.global_batch, self.cfg.seed, epoch, self.lengths)[:steps]:
                used.update(batch)
            if len(used) == self.n:
                break
        return sorted(used)

    def describe(self, items) -> str:
        """One line: pairs, global batch, steps, and the share of batch slots that is padding."""
        first = global_batches(self.n, self.global_batch, self.cfg.seed, 0, self.lengths)
        def rows(i):  # the real lengths of the rows pair i fills: one packed row, or chosen and rejected
            it = items[i]
            if self.cfg.prefix_sharing:
                return [packed_length(it)]
            return [len(it.prompt_ids) + len(it.chosen_ids), len(it.prompt_ids) + len(it.rejected_ids)]

        batches = [[n for i in mb for n in rows(i)] for b in first for r in range(self.env.world_size)
                   for mb in rank_micro_batches(b, r, self.env.world_size, self.cfg.grad_accum)]
        per_pair = sum(map(sum, batches)) / sum(len(b) for b in first)
        layout = "one row [prompt | chosen | rejected] per pair" if self.cfg.prefix_sharing else "two rows per pair"
        return (f"{self.n} training pairs, global batch {self.global_batch}, {self.steps_per_epoch} steps per epoch, "
                f"{self.total} steps; {layout}, {per_pair:.0f} token positions per pair; padding "
                f"{100 * padding_fraction(batches):.1f}% of batch slots{' (grouped by length)' if self.lengths else ''}")


CUDA_PAD_MULTIPLE = 8  # bf16 tensor cores work on multiples of 8 (and the mask's rows are then aligned already)


def pad_multiple(asked: int | None, device) -> int | None:
    """The multiple batches are padded to: --pad_to_multiple_of if given, else 8 on CUDA (a packed
    row's mask would otherwise be padded to it inside SDPA, again in every layer), else none."""
    return asked or (CUDA_PAD_MULTIPLE if torch.device(device).type == "cuda" else None)


def step_plan(train_items, cfg: TrainConfig, env: DistEnv) -> StepPlan:
    """The run's StepPlan over these training pairs (length-grouped when cfg.group_by_length)."""
    lengths = [row_length(it, cfg.prefix_sharing) for it in train_items] if cfg.group_by_length else None
    return StepPlan(len(train_items), cfg, env, lengths)


def make_batch(items, indices: list[int], pad_id: int, split: str, device, packed: bool = False,
               pad_to_multiple_of=None) -> dict:
    """Collate the tokenized pairs `indices` of a split into one batch on the device: one row per
    pair with prefix sharing (packing.collate_packed), else chosen and rejected rows
    (collate.collate_pairs). Besides the tensors, the batch says where its pairs come from —
    `split` and `pair_index` (B,) — so that an objective can look up values computed per pair
    beforehand (DPO's precomputed reference log-probs), and how many real tokens it holds. The
    length is rounded up to pad_to_multiple_of, by default 8 on CUDA (pad_multiple)."""
    batch = collate([items[i] for i in indices], pad_id, packed, pad_multiple(pad_to_multiple_of, device))
    batch["pair_index"] = torch.tensor(indices, dtype=torch.long)
    batch["num_tokens"] = batch["lengths"].sum()
    batch = to_device(batch, device)
    batch["split"] = split
    return batch


@torch.no_grad()
def evaluate(model, objective: Objective, items, cfg: TrainConfig, env: DistEnv, pad_id: int, precision) -> dict:
    """Metrics over all held-out pairs; each rank takes a disjoint shard and sums are all-reduced,
    so the result equals the single-process one whatever the world size."""
    was_training = model.training
    model.eval()
    mine = eval_shard(len(items), env.rank, env.world_size)
    bs = cfg.eval_batch_size or cfg.batch_size
    # Every rank runs as many batches as the largest shard needs (a sharded model all-gathers inside
    # each forward, so the ranks' forwards must pair up); a batch with no pair of this rank's
    # scores pair 0 with weight 0, so that every rank also reduces the same metric names.
    largest_shard = math.ceil(len(items) / env.world_size)
    sums: dict = {}
    for start in range(0, max(largest_shard, 1), bs):
        ids = mine[start:start + bs]
        weight = 1.0 if ids else 0.0
        batch = make_batch(items, ids or [0], pad_id, "eval", env.device, cfg.prefix_sharing, cfg.pad_to_multiple_of)
        with precision:
            losses, metric_sums = objective.loss(model, batch)
        accumulate(sums, {k: weight * v for k, v in {"loss": losses.sum(), **metric_sums}.items()})
    sums = all_reduce_sums(sums, env)
    model.train(was_training)
    return objective.summarize(sums)


def accumulate(sums: dict, values: dict):
    """sums[k] += values[k], keeping tensors on their device: no host sync per micro-step."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))


def resume_if_asked(run: RunFolder, model, optimizer, cfg: TrainConfig, plan: StepPlan, env: DistEnv) -> int:
    """The step to start from: 0, or the latest good checkpoint's step under --resume. Rank 0
    chooses and reads the checkpoint and every rank receives its state (resume.py), so ranks
    on machines with their own disks cannot start from different steps."""
    if not cfg.resume:
        return 0
    settings = {**cfg.run_settings, "global_batch": plan.global_batch, "total_steps": plan.total}
    step = load_training_checkpoint(run, model, optimizer, settings, cfg.resume_anyway, env)
    if step is None:  # claim() refuses such a run already; never train it again from scratch over its files
        raise UserError(f"--resume: no checkpoint of this run in {run.checkpoints}; start it again with --overwrite")
    print0(env, f"resumed at step {step}/{plan.total}")
    return step


def save_checkpoint(run: RunFolder, step: int, model, optimizer, tokenizer, cfg: TrainConfig, plan: StepPlan, env):
    settings = {**cfg.run_settings, "global_batch": plan.global_batch, "total_steps": plan.total}
    save_training_checkpoint(run, step, model, optimizer, tokenizer, settings, cfg.save_total_limit, env)


# The objective's flags that scale the loss or its gradient: with --lr, the likely cause of a
# non-finite loss (--beta 1e300 overflows the sigmoid's argument), named with their values.
LOSS_SCALE_FLAGS = ("beta", "simpo_gamma", "rpo_alpha", "margin", "center_rewards_coef")


def nonfinite_message(what: str, step: int, run: RunFolder, cfg: TrainConfig) -> str:
    ckpt = run.latest_checkpoint_name()
    where = f"the last good checkpoint is {run.checkpoints / ckpt}" if ckpt else "no checkpoint was written yet"
    flags = [f"--lr {cfg.lr:g}"] + [f"--{k} {cfg.run_settings[k]:g}" for k in LOSS_SCALE_FLAGS
                                     if isinstance(cfg.run_settings.get(k), (int, float))]
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


__all__ = ["TrainConfig", "train", "train_step", "describe_setup", "evaluate", "build_optimizer", "learning_rate", "make_batch",
           "MetricsLog", "read_records"]
