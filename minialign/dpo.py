"""DPO for the training loop: log-probabilities of chosen and rejected answers under the policy
and a frozen reference, fed to a loss from losses.py.

Direct Preference Optimization (Rafailov et al. 2023) needs four numbers per pair:
log pi(y_c|x), log pi(y_r|x) from the policy being trained, and the same two from the
reference (the initial policy, frozen). They come from one concatenated forward:
chosen and rejected rows stacked as one [2B, T] batch, so the model runs once per step
(one set of kernel launches, and the same padding for both halves).

The reference never changes, so its log-probs can be computed once before training, cached on
disk keyed by everything they depend on (reference_cache.py), and looked up per pair during
training (`PrecomputedReference`) instead of running the reference model (`LiveReference`).

Shape legend: B pairs, T padded length, C hidden size, N pairs of a split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .logprobs import CHECKPOINT_LOGITS_CHUNK, sequence_logprobs_from_hidden
from .lora import adapters_disabled
from .losses import dpo_loss, simpo_loss
from .objective import mean_metrics, preference_sums
from .packing import is_packed, packed_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


def concatenated_logps(model, batch):
    """One forward over the [2B, T] batch -> (logps_sum [2B], logps_mean [2B]) in fp32.

    Only positions that predict a label are projected onto the vocabulary (logprobs.py):
    the prompt and the padding never touch the largest matrix of the model."""
    # Right padding: causal attention alone is exact for every real token (padding comes after it),
    # so no mask: SDPA's flash kernel, and no host sync to check the padding (model.Backbone.forward).
    hidden = model.hidden_states(batch["input_ids"])  # (2B, T, C)
    chunk = CHECKPOINT_LOGITS_CHUNK if getattr(model, "gradient_checkpointing", False) else None
    labelled = (batch["label_rows"], batch["label_cols"]) if "label_rows" in batch else None  # collate_pairs'
    return sequence_logprobs_from_hidden(hidden, model.lm_head.weight, batch["labels"], chunk_size=chunk,
                                         labelled=labelled)


def answer_logps(model, batch):
    """(chosen_sum, rejected_sum, chosen_mean, rejected_mean), (B,) each in fp32, from either layout:
    one packed row per pair (packing.packed_logps, the prompt computed once) or chosen and
    rejected rows (concatenated_logps). The same numbers to rounding (tests/test_packing.py)."""
    if is_packed(batch):
        return packed_logps(model, batch)
    logps_sum, logps_mean = concatenated_logps(model, batch)  # (2B,) each
    return (*logps_sum.chunk(2), *logps_mean.chunk(2))


class LiveReference:
    """The reference as a forward of the frozen model, no graph: reference(batch) -> (chosen, rejected)
    log-probs, (B,) each."""

    def __init__(self, ref_model):
        self.model = ref_model

    def __call__(self, batch):
        with torch.no_grad():
            return answer_logps(self.model, batch)[:2]  # (B,) chosen, (B,) rejected


class AdapterOffReference:
    """LoRA (lora.py): the reference is the policy itself with its adapters switched off, which is
    the initial model exactly (W0 never trains), so no second copy of the model is held. No graph;
    gradient checkpointing and the adapters' dropout take no part without gradients and adapters."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, batch):
        with torch.no_grad(), adapters_disabled(self.policy):
            return answer_logps(self.policy, batch)[:2]  # (B,) chosen, (B,) rejected


class PrecomputedReference:
    """The reference as a lookup: tables[split] is (N, 2) [chosen, rejected] log-probs of that
    split's pairs; a batch names its split and its pairs' indices (train.make_batch). The tables
    move to `device` once here (8 bytes per pair), not once per micro-step."""

    def __init__(self, tables: dict[str, torch.Tensor], device="cpu"):
        self.tables = {name: t.to(device) for name, t in tables.items() if t is not None}

    def __call__(self, batch):
        rows = self.tables[batch["split"]][batch["pair_index"]]  # (B, 2)
        return rows.unbind(-1)


@dataclass
class DPOObjective:
    """What train() optimises for DPO and its variants: loss(model, batch) -> (losses (B,), metric
    sums), summarize(sums) -> the logged means. `reference(batch) -> (ref_chosen, ref_rejected)` is a
    LiveReference, AdapterOffReference or PrecomputedReference; SimPO needs none."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float | None = None
    reference: object = None
    headline = ("loss", "rewards/accuracies", "rewards/margins")  # metrics printed on the progress line

    def __post_init__(self):  # checks only: nothing is changed here
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if self.loss_type != "simpo" and self.reference is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs a reference (LiveReference, AdapterOffReference "
                             "or PrecomputedReference)")

    def loss(self, model, batch):
        chosen, rejected, chosen_mean, rejected_mean = answer_logps(model, batch)  # (B,) each
        if self.loss_type == "simpo":  # reference-free, on per-token averages (Meng et al. 2024 eq. 6)
            losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_mean, rejected_mean, self.beta,
                                                                  self.simpo_gamma)
        else:
            ref_chosen, ref_rejected = self.reference(batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                label_smoothing=self.label_smoothing)
        sums = {**preference_sums(chosen_rewards, rejected_rewards),
                "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
                "logps/chosen_per_token": chosen_mean.detach().sum(),
                "logps/rejected_per_token": rejected_mean.detach().sum()}
        if self.rpo_alpha:
            # RPO (Pang et al. 2024, eq. 3): add the per-token NLL of the chosen answer, so the
            # policy keeps (or gains) likelihood on what people preferred, not only the margin.
            nll = -chosen_mean  # (B,)
            sums.update({"loss/preference": losses.detach().sum(), "loss/nll": nll.detach().sum()})
            losses = losses + self.rpo_alpha * nll
        return losses, sums

    def summarize(self, sums: dict) -> dict[str, float]:
        return summarize_dpo(sums)


def summarize_dpo(s: dict) -> dict[str, float]:
    """Logged means, named as TRL names them, of the DPO objective's metric sums."""
    m = mean_metrics(s)
    out = {"loss": m.pop("loss"), "rewards/chosen": m.pop("chosen_reward"), "rewards/rejected": m.pop("rejected_reward"),
           "rewards/margins": m.pop("margin"), "rewards/accuracies": m.pop("correct"), "rewards/ties": m.pop("ties")}
    return {**out, **{k: v for k, v in m.items() if "/" in k}}


__all__ = ["LOSS_TYPES", "concatenated_logps", "answer_logps", "LiveReference", "AdapterOffReference",
           "PrecomputedReference", "DPOObjective", "summarize_dpo"]
