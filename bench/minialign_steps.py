"""minialign's training step, as minialign.train.train() runs it, for the benchmark workers.

One step is minialign.train.train_step itself (objective -> backward -> reduce -> clip -> finite
check -> AdamW step -> zero_grad), with the optimizer from build_optimizer, the schedule from
learning_rate and the batches from packing.make_batch, in either layout: one packed row per pair
(--prefix_sharing, the trainers' default) or two rows per pair (--no-prefix_sharing). Collation
runs before timing (data preprocessing is excluded from the timings of every implementation alike).
"""
from __future__ import annotations

import torch

from common import serve_steps, two_row_tokens
from minialign import load_model
from minialign.distributed import DistEnv
from minialign.dpo import AdapterOffReference, DPOObjective, LiveReference, PrecomputedReference
from minialign.lora import LoRAConfig, apply_lora, hold_base_in_bf16
from minialign.precision import autocast_context
from minialign.reducer import GradReducer
from minialign.reward import RewardObjective
from minialign.packing import make_batch
from minialign.train import build_optimizer, learning_rate, train_step

LR = 1e-6  # any small value: it does not change the cost of a step
TOTAL_STEPS = 1000  # the schedule's horizon (warm-up 0: pure cosine, as the references are set up)
MAX_GRAD_NORM = 1.0
BETA = 0.1


def make_step(model, objective, batches, work, dtype, device):
    """step() -> (pairs, two-row tokens) of batches[i % len(batches)], running train()'s train_step
    on it; work[i] is that batch's (pairs, two-row tokens)."""
    optimizer = build_optimizer(model, LR, weight_decay=0.0)
    env = DistEnv(0, 1, 0, device)
    grad_sync, precision = GradReducer(model, env), autocast_context(dtype, device)
    state = {"step": 0}
    model.train()

    def step():
        i = state["step"] % len(batches)
        train_step(model, objective, [batches[i]], optimizer, grad_sync,
                   learning_rate(state["step"], TOTAL_STEPS, LR, 0.0), MAX_GRAD_NORM, precision, env)
        state["step"] += 1
        return work[i]

    return step


def model_state_mb(trained, frozen=None) -> float:
    """Memory that does not depend on the batch: the trained weights with their gradients and
    AdamW's two moments (4 fp32 copies), the model's frozen tensors (a LoRA base), plus a frozen
    reference's weights."""
    mb = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in trained.parameters()) / 2**20
    if frozen is not None:
        mb += sum(p.numel() * p.element_size() for p in frozen.parameters()) / 2**20
    return mb


def build_step(kind, checkpoint, items, order, pad_id, dtype, device, packed=True, gradient_checkpointing=False,
               precompute_reference=False, lora_rank=0):
    """(step, state_mb) for "rm" (Bradley-Terry) or "dpo" (sigmoid loss, with the reference live
    every step, or precomputed once beforehand as train_dpo.py --precompute_ref does), training
    on the pairs items[i] in the batches `order` (lists of indices), collated as train() collates
    them (packing.make_batch: packed, or chosen and rejected rows). lora_rank > 0: LoRA on the seven
    projections as the trainers apply it, and for DPO the live reference is the adapter-off policy."""
    model = load_model(checkpoint, device=device)
    if lora_rank:
        apply_lora(model, LoRAConfig(rank=lora_rank))
        if dtype == "bf16":
            hold_base_in_bf16(model)
    model.gradient_checkpointing = gradient_checkpointing
    batches = [make_batch(items, idx, pad_id, "train", device, packed) for idx in order]
    work = [(len(idx), two_row_tokens([items[i] for i in idx])) for idx in order]
    ref = None
    if kind == "rm":
        objective = RewardObjective()
    elif lora_rank and not precompute_reference:
        objective = DPOObjective("sigmoid", BETA, reference=AdapterOffReference(model))
    else:
        ref = load_model(checkpoint, device=device).eval().requires_grad_(False)
        reference = LiveReference(ref)
        if precompute_reference:  # score every pair once into an (N, 2) table, then drop the reference
            table = torch.zeros(len(items), 2)
            for b in batches:
                with autocast_context(dtype, device):
                    table[b.pair_index.cpu()] = torch.stack(reference(b), dim=-1).float().cpu()  # (B, 2)
            reference, ref = PrecomputedReference({"train": table}, device), None
        objective = DPOObjective("sigmoid", BETA, reference=reference)
    return make_step(model, objective, batches, work, dtype, device), model_state_mb(model, ref)


def dpo_worker(conn, checkpoint, items, order, pad_id, dtype, device, **options):
    device = torch.device(device)
    step, state_mb = build_step("dpo", checkpoint, items, order, pad_id, dtype, device, **options)
    serve_steps(conn, step, device, state_mb=state_mb)


def rm_worker(conn, checkpoint, items, order, pad_id, dtype, device, **options):
    device = torch.device(device)
    step, state_mb = build_step("rm", checkpoint, items, order, pad_id, dtype, device, **options)
    serve_steps(conn, step, device, state_mb=state_mb)
