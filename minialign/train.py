"""The training loop shared by train_rm.py and train_dpo.py.

What differs between reward modelling and DPO is one function, `Objective.compute(model, batch)`,
returning the summed loss of the micro-batch and summed metrics; everything else lives here once:
data order, gradient accumulation, data-parallel gradient reduction, AdamW with warm-up and
cosine decay, clipping, evaluation, logging, checkpoints and resume.

One optimizer step, for every rank:
    for each of grad_accum micro-batches (B pairs = 2B sequences):
        loss_sum / (B * grad_accum) -> backward          (grads accumulate locally)
    all-reduce gradients (SUM / world_size)               (buckets overlap the last backward)
    clip, AdamW step with lr(step), zero grads
Dividing by B * grad_accum, then averaging over ranks, makes every step the mean over the
global batch of B * grad_accum * world_size pairs: accumulation equals a larger batch.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .collate import collate_pairs, tokenize_pairs
from .data import load_preferences, split_by_prompt
from .distributed import GradReducer, all_reduce_sums, barrier, print0
from .resume import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from .sampler import eval_shard, global_batches, padding_fraction, rank_micro_batches
from .tokenizer import CHAT_FORMAT_CHOICES


def add_training_args(parser: argparse.ArgumentParser):
    """The flags both trainers share. --batch_size is per rank: the global batch is
    batch_size x grad_accum x world_size pairs."""
    a = parser.add_argument
    a("--model", help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer); default: the demo base model")
    a("--data", help="training preferences (.json, .jsonl, .gz); default: the demo train split")
    a("--data_format", default="auto", help="auto, or one of the formats in minialign.data (see README)")
    a("--chat_format", default="auto", choices=CHAT_FORMAT_CHOICES,
      help="chat template renderer: auto (a known family in Python, any other template with Jinja), a family, or jinja")
    a("--eval_data", help="held-out preferences; default: --eval_split of --data")
    a("--eval_split", type=float, default=0.1, help="fraction of --data prompts held out when --eval_data is absent")
    a("--strict", action="store_true", help="any skipped record is an error instead of a counted skip")
    a("--pku_label_key", default="better_response_id", choices=["better_response_id", "safer_response_id"],
      help="PKU-SafeRLHF: which label decides the chosen response")
    a("--output", help="run folder: metrics.jsonl, curves, checkpoints/, model/")
    a("--epochs", type=float, default=1.0, help="passes over the training pairs")
    a("--max_steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    a("--lr", type=float, default=1e-5, help="peak learning rate")
    a("--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay (never on norms and biases)")
    a("--warmup_ratio", type=float, default=0.03, help="fraction of steps of linear warm-up before cosine decay")
    a("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm to this")
    a("--batch_size", type=int, default=4, help="pairs per rank per micro-step")
    a("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--eval_batch_size", type=int, default=None, help="pairs per rank per eval step (default: --batch_size)")
    a("--max_length", type=int, default=512, help="max tokens of prompt + response")
    a("--max_prompt_length", type=int, default=256, help="max prompt tokens (the end of the prompt is kept)")
    a("--truncation", default="keep_end", choices=["keep_end", "drop"], help="over-long pairs: truncate or drop")
    a("--group_by_length", action="store_true", help="batch pairs of similar length to cut padding")
    a("--pad_to_multiple_of", type=int, default=None, help="round each batch's length up (e.g. 8 for tensor cores)")
    a("--gradient_checkpointing", action="store_true", help="recompute each layer in backward: less memory, ~30%% more time")
    a("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast matmuls, fp32 master weights")
    a("--seed", type=int, default=0, help="seeds initialisation, data order and split")
    a("--log_every", type=int, default=1, help="print a progress line every N steps")
    a("--eval_every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    a("--save_every", type=int, default=0, help="write a resumable checkpoint every N steps (0: only at the end)")
    a("--save_total_limit", type=int, default=2, help="keep this many newest checkpoints")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    a("--bucket_mb", type=float, default=25.0, help="data parallel: gradient bucket size in MB")
    a("--dist_timeout", type=int, default=1800, help="data parallel: seconds before a stuck collective fails")
    return parser


def resolve_data_defaults(args, env):
    """No --model / --data: use the demo world (built under runs/demo/ on first use)."""
    if args.model is None or args.data is None:
        from .demo import demo_paths

        demo = demo_paths(env)
        args.model = args.model or str(demo.base_model)
        if args.data is None:
            args.data, args.eval_data = str(demo.train_data), args.eval_data or str(demo.eval_data)


def write_run_config(args, env):
    """The resolved arguments, so a run folder says exactly how it was made."""
    if env.is_main:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        config = {**vars(args), "world_size": env.world_size}
        (Path(args.output) / "run_config.json").write_text(json.dumps(config, indent=2))


def prepare_pairs(args, env, tokenizer):
    """Load, report, split by prompt (unless --eval_data) and tokenize -> (train_items, eval_items)."""
    load = dict(data_format=args.data_format, strict=args.strict, pku_label_key=args.pku_label_key)
    pairs, report = load_preferences(args.data, **load)
    if args.eval_data:
        train_pairs = pairs
        eval_pairs, eval_report = load_preferences(args.eval_data, **load)
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, eval_fraction=args.eval_split, seed=args.seed)
        eval_report = None
    tok = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
               truncation=args.truncation, strict=args.strict)
    train_items, train_stats = tokenize_pairs(tokenizer, train_pairs, report=report, **tok)
    eval_items, eval_stats = tokenize_pairs(tokenizer, eval_pairs, report=eval_report, **tok)
    print0(env, report.summary())
    if eval_report is not None:
        print0(env, eval_report.summary())
    print0(env, f"train: {train_stats.summary()}\neval:  {eval_stats.summary()}")
    return train_items, eval_items


@dataclass
class Objective:
    """What a trainer optimises. compute(model, batch) -> (loss summed over the micro-batch's
    pairs, dict of metric sums incl. 'pairs'); summarize(sums) -> metrics to log."""

    compute: Callable
    summarize: Callable
    headline: tuple = ("loss", "accuracy")  # metrics on the progress line


def build_optimizer(model, lr: float, weight_decay: float):
    """AdamW; 1-D parameters (norm weights, biases) get no weight decay, as is standard.

    The fused implementation updates each tensor in one pass, without parameter-sized
    temporaries. With a 152k-token vocabulary the embedding is a quarter of a 0.5B model, and
    on CPU the default per-tensor loop took ~1.8 s of a ~4.5 s reward-model step at the
    Qwen2.5-0.5B shape with 4 layers; fused takes ~0.35 s and 1 GB less peak memory (bench/)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def learning_rate(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up over the first warmup_ratio of steps, then cosine decay towards 0."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def autocast_context(dtype: str, device):
    """bf16 autocast: matmuls in bf16, weights, grads and optimizer state stay fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


class MetricsLog:
    """metrics.jsonl in the run folder: one JSON record per train step and per eval (rank 0 only)."""

    def __init__(self, output, enabled: bool, resume_step: int | None):
        self.path = Path(output) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            # Steps after the checkpoint will be redone: drop their records so none is doubled.
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif enabled:
            self.path.write_text("")
        self.records = [json.loads(l) for l in self.path.read_text().splitlines() if l] if enabled else []

    def write(self, record: dict):
        if self.enabled:
            self.records.append(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def accumulate(sums: dict, values: dict):
    """sums[k] += values[k], keeping tensors where they are: no host sync per metric."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))


def as_floats(sums: dict) -> dict[str, float]:
    """Accumulated sums as Python floats, fetched from the device in one transfer."""
    keys = sorted(sums)
    device = next((v.device for v in sums.values() if torch.is_tensor(v)), "cpu")
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    return dict(zip(keys, values.tolist()))


def move(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_batch(items, indices, pad_id, pad_to_multiple_of=None):
    """Collate the tokenized pairs `indices` into one [2B, T] batch (collate.collate_pairs)."""
    batch = collate_pairs([items[i] for i in indices], pad_id, pad_to_multiple_of)
    if items[indices[0]].ref_logps is not None:  # precomputed reference log-probs (DPO)
        batch["ref_logps"] = torch.tensor([items[i].ref_logps for i in indices], dtype=torch.float32)  # (B, 2)
    return batch


@torch.no_grad()
def evaluate(model, objective: Objective, items, args, env, pad_id) -> dict:
    """Metrics over all held-out pairs; each rank takes a disjoint shard and sums are all-reduced,
    so the result equals the single-process one whatever the world size."""
    was_training = model.training
    model.eval()
    mine = eval_shard(len(items), env.rank, env.world_size)
    bs = args.eval_batch_size or args.batch_size
    sums: dict = {}
    # A rank with no eval pair (fewer pairs than ranks) scores pair 0 with weight 0, so that
    # every rank reduces the same metric names in the same order.
    weight = 1.0 if mine else 0.0
    for start in range(0, max(len(mine), 1), bs):
        batch = move(make_batch(items, mine[start : start + bs] or [0], pad_id), env.device)
        with autocast_context(args.dtype, env.device):
            loss_sum, metric_sums = objective.compute(model, batch)
        accumulate(sums, {k: weight * v for k, v in {"loss": loss_sum, **metric_sums}.items()})
    sums = all_reduce_sums(as_floats(sums), env)
    model.train(was_training)
    return objective.summarize(sums)


def train(model, objective: Objective, train_items, eval_items, args, env, tokenizer, pad_id, on_step=None):
    """Run the optimisation described in the module docstring; returns the final eval metrics.

    train_items / eval_items: tokenized pairs (collate.TokenizedPair). on_step(step) is called
    after each optimizer step (DPO uses it for nothing; tests use it to observe)."""
    output = Path(args.output)
    global_batch = args.batch_size * args.grad_accum * env.world_size
    lengths = [it.length for it in train_items] if args.group_by_length else None  # padded length of each pair
    steps_per_epoch = len(train_items) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_items)} training pairs do not fill one global batch of {global_batch} "
            f"(batch_size {args.batch_size} x grad_accum {args.grad_accum} x world_size {env.world_size})"
        )
    total = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    first_epoch = global_batches(len(train_items), global_batch, args.seed, 0, lengths)
    def row_lengths(i):  # a pair is two rows of the [2B, T] batch
        it = train_items[i]
        return [len(it.prompt_ids) + len(it.chosen_ids), len(it.prompt_ids) + len(it.rejected_ids)]

    micro_lengths = [sum((row_lengths(i) for i in mb), []) for b in first_epoch for r in range(env.world_size)
                     for mb in rank_micro_batches(b, r, env.world_size, args.grad_accum)]
    print0(env, f"{len(train_items)} training pairs, global batch {global_batch}, {steps_per_epoch} steps per epoch, "
                f"{total} steps; padding {100 * padding_fraction(micro_lengths):.1f}% of batch slots"
                f"{' (grouped by length)' if lengths else ''}")
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    reducer = GradReducer(model, env, bucket_mb=args.bucket_mb)

    step = 0
    ckpt = latest_checkpoint(output) if args.resume else None
    if ckpt is not None:
        state = load_training_checkpoint(ckpt, model, optimizer)
        if state["global_batch"] != global_batch:
            raise ValueError(f"{ckpt}: saved with global batch {state['global_batch']}, now {global_batch}")
        step = state["step"]
        print0(env, f"resumed from {ckpt} at step {step}/{total}")
    elif args.resume:
        print0(env, f"--resume: no checkpoint in {output / 'checkpoints'}, starting from scratch")
    log = MetricsLog(output, env.is_main, step if ckpt is not None else None)

    def checkpoint_now(at_step):
        if env.is_main:
            save_training_checkpoint(output, at_step, model, optimizer, tokenizer,
                                     {"global_batch": global_batch, "args": vars(args)}, keep=args.save_total_limit)
        barrier(env)

    model.train()
    start_time, first_step = time.time(), step
    eval_metrics = None
    epoch_batches = {0: first_epoch}  # the current epoch's global batches: a function of (seed, epoch)
    while step < total:
        t_step = time.time()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: global_batches(len(train_items), global_batch, args.seed, epoch, lengths)}
        batch_ids = epoch_batches[epoch][in_epoch]
        micro = rank_micro_batches(batch_ids, env.rank, env.world_size, args.grad_accum)
        lr = learning_rate(step, total, args.lr, args.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict = {}
        for m, indices in enumerate(micro):
            batch = move(make_batch(train_items, indices, pad_id, args.pad_to_multiple_of), env.device)
            reducer.set_sync(m == len(micro) - 1)  # communicate only after the last micro-step
            with autocast_context(args.dtype, env.device):
                loss_sum, metric_sums = objective.compute(model, batch)
            if not torch.isfinite(loss_sum):
                raise FloatingPointError(_nonfinite_message("loss", step, output))
            (loss_sum / (args.batch_size * args.grad_accum)).backward()
            accumulate(sums, {"loss": loss_sum, "tokens": batch["attention_mask"].sum(), **metric_sums})
        reducer.wait()  # gradients are now the global-batch mean on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(_nonfinite_message("gradient norm", step, output))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        sums = all_reduce_sums(as_floats(sums), env)
        now = time.time()
        record = {"step": step, "split": "train", **objective.summarize(sums), "lr": lr,
                  "grad_norm": float(grad_norm), "tokens_per_s": sums["tokens"] / max(now - t_step, 1e-9),
                  "epoch": step / steps_per_epoch, "elapsed_s": now - start_time,
                  "peak_memory_mb": peak_memory_mb(env.device)}
        log.write(record)
        if step % args.log_every == 0 or step == total:
            eta = (now - start_time) / (step - first_step) * (total - step)
            heads = " | ".join(f"{k} {record[k]:.4f}" for k in objective.headline if k in record)
            print0(env, f"step {step}/{total} | {heads} | lr {lr:.2e} | {record['tokens_per_s']:.0f} tok/s"
                        f" | {_fmt_time(now - start_time)} elapsed | ETA {_fmt_time(eta)}")
        if on_step is not None:
            on_step(step)
        if eval_items and args.eval_every and step % args.eval_every == 0 and step < total:
            eval_metrics = evaluate(model, objective, eval_items, args, env, pad_id)
            log.write({"step": step, "split": "eval", **eval_metrics})
            print0(env, "eval  " + " | ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        if args.save_every and step % args.save_every == 0 and step < total:
            checkpoint_now(step)

    if eval_items:
        eval_metrics = evaluate(model, objective, eval_items, args, env, pad_id)
        log.write({"step": step, "split": "eval", **eval_metrics})
        print0(env, "final eval  " + " | ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    checkpoint_now(step)
    return eval_metrics, log.records


def _nonfinite_message(what, step, output):
    ckpt = latest_checkpoint(output)
    where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
    return f"non-finite {what} at step {step + 1}; training stopped, {where} (lower --lr or check the data)"
