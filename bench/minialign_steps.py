"""minialign's training step, as minialign.train.train() runs it, for the benchmark workers.

One step = objective.compute -> backward -> clip -> AdamW step -> zero_grad, with the
optimizer from build_optimizer and the schedule from learning_rate: exactly the body of
train()'s loop, minus collation (the batches arrive collated: data preprocessing is
excluded from the timings of every implementation alike).
"""
from __future__ import annotations

import torch

from common import serve_steps
from minialign import load_model
from minialign.dpo import concatenated_logps, dpo_objective
from minialign.reward import reward_objective
from minialign.train import accumulate, autocast_context, build_optimizer, learning_rate, move

LR = 1e-6  # any small value: it does not change the cost of a step
TOTAL_STEPS = 1000  # the schedule's horizon (warm-up 0: pure cosine, as the references are set up)
MAX_GRAD_NORM = 1.0
BETA = 0.1


def make_step(model, objective, batches, dtype, device):
    """step() -> non-pad tokens, running train()'s loop body on batches[i % len(batches)]."""
    optimizer = build_optimizer(model, LR, weight_decay=0.0)
    state = {"step": 0}
    model.train()

    def step():
        i = state["step"]
        batch = batches[i % len(batches)]
        pairs = batch["input_ids"].shape[0] // 2
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, TOTAL_STEPS, LR, 0.0)
        with autocast_context(dtype, device):
            loss_sum, metric_sums = objective.compute(model, batch)
        (loss_sum / pairs).backward()
        accumulate({}, {"loss": loss_sum, "tokens": batch["attention_mask"].sum(), **metric_sums})
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        return int(batch["attention_mask"].sum())

    return step


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
    ref = None
    if kind == "rm":
        objective = reward_objective()
    else:
        ref = load_model(checkpoint, device=device).eval().requires_grad_(False)
        if precompute_reference:  # score every pair once, then drop the reference
            with torch.no_grad(), autocast_context(dtype, device):
                for b in batches:
                    b["ref_logps"] = torch.stack(concatenated_logps(ref, b)[0].float().chunk(2), dim=-1)  # (B, 2)
            ref = None
        objective = dpo_objective("sigmoid", BETA, ref_model=ref)
    return make_step(model, objective, batches, dtype, device), model_state_mb(model, ref)


def dpo_worker(conn, checkpoint, batches, dtype, device, **options):
    device = torch.device(device)
    step, state_mb = build_step("dpo", checkpoint, [move(b, device) for b in batches], dtype, device, **options)
    serve_steps(conn, step, device, state_mb=state_mb)


def rm_worker(conn, checkpoint, batches, dtype, device, **options):
    device = torch.device(device)
    step, state_mb = build_step("rm", checkpoint, [move(b, device) for b in batches], dtype, device, **options)
    serve_steps(conn, step, device, state_mb=state_mb)
