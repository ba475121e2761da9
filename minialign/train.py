"""The training loop shared by train_rm.py and train_dpo.py.

What differs between reward modelling and DPO is one method, the objective's
`loss(model, batch)` (reward.RewardObjective, dpo.DPOObjective), which returns the loss of every
pair of a micro-batch and the two rewards of each pair. Everything else lives here once, and the
heart of it is `train_step`:

    for each of A micro-batches of this rank (B pairs each, packing.PairBatch):
        losses, ... = objective.loss(model, batch)        (B,)
        (losses.sum() / pairs_this_step).backward()        grads accumulate locally
    all-reduce gradients: SUM over W ranks, / W            (reducer.py; overlaps the last backward)
    clip, check finite on every rank at once, AdamW step

Why this is the global-batch mean: each rank divides by the pairs it sees in the step
(B * A), and the all-reduce averages over W ranks, so the gradient is
    (1 / W) * sum_r (1 / (B * A)) * sum of its losses = (1 / (W * A * B)) * sum of all losses,
the mean over the global batch of G = W * A * B pairs: accumulation equals a larger batch and
W ranks equal one process.

`train` around it is the loop: which pairs each step takes (sampler.StepPlan), the learning
rate, evaluation, checkpoints (resume.py); what it prints and logs is training_log.py's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .distributed import DistEnv, print0
from .dpo import DPOObjective
from .errors import NonFiniteError
from .fsdp import FSDPGradSync, is_sharded
from .packing import PairBatch, make_batch, row_length
from .precision import autocast_context
from .reducer import GradReducer, all_reduce_sums
from .resume import resume_step, save_training_checkpoint
from .reward import RewardObjective
from .run_folder import RunFolder
from .sampler import StepPlan, eval_shard
from .training_log import TrainingLog, describe_plan, nonfinite_message, phase_peak_mb

# What the loop accepts, named as the classes themselves, so that a reader's go-to-definition on
# objective.loss or grad_sync.wait lands in the code that runs.
Objective = DPOObjective | RewardObjective
GradSync = GradReducer | FSDPGradSync  # data parallel by hand (the default), or --fsdp


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


def preference_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Sums over B pairs of what both objectives log, from each pair's two rewards (a learned reward,
    or DPO's implicit reward beta * log(pi / pi_ref)); rewards (B,) each, detached here. Sums, never
    means, travel between ranks, so that a mean over the global batch is exact whatever the split.

    Accuracy is strict: a pair counts as correct only when chosen > rejected, so a model that
    scores every answer the same has accuracy 0 and ties 1, never a flattering 0.5."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "pairs": chosen.shape[0],
        "correct": (chosen > rejected).sum(),
        "ties": (chosen == rejected).sum(),
        "margin": (chosen - rejected).sum(),
        "chosen_reward": chosen.sum(),
        "rejected_reward": rejected.sum(),
        "reward_sq": chosen.pow(2).sum() + rejected.pow(2).sum(),  # for the std of all 2B rewards
    }


def batch_sums(objective: Objective, model, batch: PairBatch) -> tuple[torch.Tensor, dict]:
    """The objective on one micro-batch -> (losses (B,), metric sums: the loss, the tokens, the two
    rewards' preference_sums and the objective's own)."""
    losses, chosen_rewards, rejected_rewards, own = objective.loss(model, batch)  # (B,) each
    return losses, {"loss": losses.detach().sum(), "tokens": batch.num_tokens,
                    **preference_sums(chosen_rewards, rejected_rewards), **own}


def train_step(model, objective: Objective, micro_batches: list[PairBatch], optimizer, grad_sync: GradSync,
               lr: float, max_grad_norm: float, precision, env: DistEnv) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches (the module docstring's pseudo-code).

    grad_sync is the gradient synchronisation (reducer.GradReducer, or fsdp.FSDPGradSync); returns
    the metric sums over the global batch, with the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    pairs = sum(b.num_pairs for b in micro_batches)  # this rank's pairs in the step: B * A
    sums: dict = {}
    for i, batch in enumerate(micro_batches):
        grad_sync.set_sync(i == len(micro_batches) - 1)  # communicate once, after the last backward
        with precision:
            losses, metric_sums = batch_sums(objective, model, batch)  # (B,)
        (losses.sum() / pairs).backward()  # the mean over this rank's pairs (see module docstring)
        accumulate(sums, metric_sums)
    grad_sync.wait()  # gradients are now the global-batch mean on every rank
    grad_norm = grad_sync.clip_grad_norm(max_grad_norm)
    # One collective sums the metrics over ranks; the loss total and the gradient norm in it are
    # then the same on every rank, so all ranks agree to stop before a non-finite step.
    # This is the step's one wait for the GPU (the values must reach the host to be checked).
    sums = all_reduce_sums({**sums, "grad_norm": grad_norm / env.world_size}, env)
    if not (math.isfinite(sums["loss"]) and math.isfinite(sums["grad_norm"])):
        raise FloatingPointError("loss" if not math.isfinite(sums["loss"]) else "gradient norm")
    optimizer.step()
    grad_sync.zero_grad()
    return sums


def train(model, objective: Objective, train_items, eval_items, cfg: TrainConfig, env: DistEnv, tokenizer,
          grad_sync: GradSync, run: RunFolder, optimizer=None) -> tuple[dict | None, list[dict]]:
    """Train for cfg's steps, evaluating and checkpointing as configured; returns the final eval
    metrics (None without eval pairs) and every logged record. train_items / eval_items are
    collate.TokenizedPair lists; run is the claimed run folder (run_folder.py)."""
    optimizer = optimizer or build_optimizer(model, cfg.lr, cfg.weight_decay)
    # Sharded, FSDP's MixedPrecisionPolicy computes in bf16 already: autocast on top would keep a
    # bf16 copy of every gathered weight until backward (fsdp.py).
    precision = autocast_context("fp32" if is_sharded(model) else cfg.dtype, env.device)
    plan = step_plan(train_items, cfg, env)
    print0(env, describe_plan(plan, train_items, cfg.prefix_sharing))
    # Recorded in every checkpoint and compared on resume: what a resumed run must share with its start.
    settings = {**cfg.run_settings, "global_batch": plan.global_batch, "total_steps": plan.total}
    step = resume_step(run, model, optimizer, settings, cfg.resume_anyway, env) if cfg.resume else 0
    print0(env, f"setup peak memory {phase_peak_mb(env):.0f} MB (loading, reference, resume; max over ranks)")
    log = TrainingLog(run, env, objective.headline, plan, step, cfg.resume, cfg.log_every)
    eval_metrics = None
    while step < plan.total:
        batches = [make_batch(train_items, ids, tokenizer.pad_token_id, "train", env.device, cfg.prefix_sharing,
                              cfg.pad_to_multiple_of) for ids in plan.micro_batches(step)]
        lr = learning_rate(step, plan.total, cfg.lr, cfg.warmup_ratio)
        try:
            sums = train_step(model, objective, batches, optimizer, grad_sync, lr, cfg.max_grad_norm, precision, env)
        except FloatingPointError as what:
            raise NonFiniteError(nonfinite_message(str(what), step, run, cfg.lr, cfg.run_settings)) from None
        step += 1
        log.step(step, objective.summarize(sums), lr, sums["grad_norm"], sums["tokens"])
        if eval_items and cfg.eval_every and step % cfg.eval_every == 0 and step < plan.total:
            eval_metrics = evaluate(model, objective, eval_items, cfg, env, tokenizer.pad_token_id, precision)
            log.eval(step, eval_metrics)
        if cfg.save_every and step % cfg.save_every == 0 and step < plan.total:
            save_training_checkpoint(run, step, model, optimizer, tokenizer, settings, cfg.save_total_limit, env)
            phase_peak_mb(env)  # the save's peak (a sharded model's state gathered to rank 0) is not the next step's
    if eval_items:
        eval_metrics = evaluate(model, objective, eval_items, cfg, env, tokenizer.pad_token_id, precision)
        log.eval(step, eval_metrics, final=True)
    return eval_metrics, log.records


def step_plan(train_items, cfg: TrainConfig, env: DistEnv) -> StepPlan:
    """The run's StepPlan over these training pairs (length-grouped when cfg.group_by_length)."""
    lengths = [row_length(it, cfg.prefix_sharing) for it in train_items] if cfg.group_by_length else None
    return StepPlan(len(train_items), cfg.batch_size, cfg.grad_accum, env.rank, env.world_size, cfg.seed,
                    cfg.epochs, cfg.max_steps, lengths)


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
            _, metric_sums = batch_sums(objective, model, batch)
        accumulate(sums, {k: weight * v for k, v in metric_sums.items()})
    sums = all_reduce_sums(sums, env)
    model.train(was_training)
    return objective.summarize(sums)


def accumulate(sums: dict, values: dict):
    """sums[k] += values[k], keeping tensors on their device: no host sync per micro-step."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))


__all__ = ["TrainConfig", "Objective", "train", "train_step", "evaluate", "build_optimizer", "learning_rate",
           "preference_sums", "step_plan"]
