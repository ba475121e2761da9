"""minialign's training step, as minialign.train.train() runs it, for the benchmark workers.

One step is minialign.train.train_step itself (objective -> backward -> reduce -> clip -> finite
check -> AdamW step -> zero_grad), with the optimizer from build_optimizer and the schedule from
learning_rate, minus collation (the batches arrive collated: data preprocessing is excluded
from the timings of every implementation alike).
"""
from __future__ import annotations

import torch

from common import serve_steps
from minialign import load_model
from minialign.collate import to_device
from minialign.distributed import DistEnv
from minialign.reducer import GradReducer
from minialign.dpo import dpo_objective, live_reference, precomputed_reference
from minialign.precision import autocast_context
from minialign.reward import reward_objective
from minialign.train import build_optimizer, learning_rate, train_step

LR = 1e-6  # any small value: it does not change the cost of a step
TOTAL_STEPS = 1000  # the schedule's horizon (warm-up 0: pure cosine, as the references are set up)
MAX_GRAD_NORM = 1.0
BETA = 0.1


def make_step(model, objective, batches, dtype, device):
    """step() -> non-pad tokens, running train()'s train_step on batches[i % len(batches)]."""
    optimizer = build_optimizer(model, LR, weight_decay=0.0)
    env = DistEnv(0, 1, 0, device)
    grad_sync, precision = GradReducer(model, env), autocast_context(dtype, device)
    state = {"step": 0}
    model.train()

    def step():
        i = state["step"]
        batch = batches[i % len(batches)]
        train_step(model, objective, [batch], optimizer, grad_sync, learning_rate(i, TOTAL_STEPS, LR, 0.0),
                   MAX_GRAD_NORM, precision, env)
        state["step"] += 1
        return int(batch["num_tokens"])

    return step


def as_train_batches(batches, device):
    """Collated batches as train.make_batch labels them: on the device, with their pairs' indices
    in one "train" split (consecutive per batch) and their real-token count."""
    out, start = [], 0
    for b in batches:
        pairs = b["input_ids"].shape[0] // 2
        b = to_device({**b, "pair_index": torch.arange(start, start + pairs), "num_tokens": b["attention_mask"].sum()},
                      device)
        out.append({**b, "split": "train"})
        start += pairs
    return out


def model_state_mb(trained, frozen=None) -> float:
    """Memory that does not depend on the batch: the trained weights with their gradients and
    AdamW's two moments (4 fp32 copies), plus a frozen reference's weights."""
    mb = 4 * sum(p.numel() * p.element_size() for p in trained.parameters()) / 2**20
    if frozen is not None:
        mb += sum(p.numel() * p.element_size() for p in frozen.parameters()) / 2**20
    return mb


def build_step(kind, checkpoint, batches, dtype, device, gradient_checkpointing=False, precompute_reference=False):
    """(step, state_mb) for "rm" (Bradley-Terry) or "dpo" (sigmoid loss, with the reference live
    every step, or precomputed once beforehand as train_dpo.py --precompute_ref does)."""
    model = load_model(checkpoint, device=device)
    model.gradient_checkpointing = gradient_checkpointing
    batches = as_train_batches(batches, device)
    ref = None
    if kind == "rm":
        objective = reward_objective()
    else:
        ref = load_model(checkpoint, device=device).eval().requires_grad_(False)
        reference = live_reference(ref)
        if precompute_reference:  # score every pair once into an (N, 2) table, then drop the reference
            rows = []
            for b in batches:
                with autocast_context(dtype, device):
                    rows.append(torch.stack(reference(b), dim=-1))  # (B, 2)
            reference, ref = precomputed_reference({"train": torch.cat(rows).float()}), None
        objective = dpo_objective("sigmoid", BETA, reference=reference)
    return make_step(model, objective, batches, dtype, device), model_state_mb(model, ref)


def dpo_worker(conn, checkpoint, batches, dtype, device, **options):
    device = torch.device(device)
    step, state_mb = build_step("dpo", checkpoint, batches, dtype, device, **options)
    serve_steps(conn, step, device, state_mb=state_mb)


def rm_worker(conn, checkpoint, batches, dtype, device, **options):
    device = torch.device(device)
    step, state_mb = build_step("rm", checkpoint, batches, dtype, device, **options)
    serve_steps(conn, step, device, state_mb=state_mb)
