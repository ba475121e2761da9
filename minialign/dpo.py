"""Direct Preference Optimization: the loss, and where its four numbers come from in training.

DPO (Rafailov et al. 2023) trains the policy pi directly on preference pairs, with no reward
model: with z = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)), the difference of the
two answers' log-ratios against a frozen reference (the initial policy), the loss is
-log sigmoid(beta z) (eq. 7). beta * (log pi - log ref) is the answer's implicit reward (eq. 5).

The loss needs four numbers per pair: log pi(y_c|x), log pi(y_r|x) from the policy being trained,
and the same two from the reference. The policy's come from one forward over the batch
(packing.answer_logps, either layout). The reference's come from a no-grad forward of the frozen
model (LiveReference), or of the policy with its LoRA adapters off (AdapterOffReference), or, as
the reference never changes, from a table computed once before training and cached on disk
(reference_cache.py) and looked up per pair (PrecomputedReference).

The losses are pure functions of those log-probs. Each returns the per-pair losses [B] (the
caller takes the mean, which keeps data-parallel averaging explicit) and the detached rewards
of both answers, (losses, chosen_rewards, rejected_rewards):

  DPO (sigmoid)   -log sigmoid(beta * z)
  IPO             (z - 1 / (2 beta))^2
  hinge (SLiC)    max(0, 1 - beta * z)
  robust DPO      unbiased loss under a known rate of flipped labels
  SimPO           -log sigmoid(beta * avg_c - beta * avg_r - gamma), reference-free

Precision: these are differences of large, nearly equal numbers (sequence log-probs of -500
and -501), which bf16 cannot hold, so bf16 and fp16 inputs are computed in float32; float32
and float64 inputs keep their precision (a float64 unit test gets the float64 formula).
-log sigmoid(x) is computed as -F.logsigmoid(x), which is exact for |x| in the thousands
(it never forms sigmoid(x) itself, which rounds to 0 or 1).

Shape legend: B pairs in a batch, N pairs of a split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .lora import adapters_disabled
from .packing import PairBatch, answer_logps

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LOSS_TYPES = DPO_LOSS_TYPES + ("simpo",)


# ------------------------------------------------------------------------------- the losses

def _precise(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: bf16/fp16 are promoted, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and its close relatives, from sequence log-probs of policy and reference.

    With z = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)):
      "sigmoid": -(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z)
                 Rafailov et al. 2023 eq. 7 at ls = 0; with ls > 0 the conservative DPO of
                 Mitchell 2023 ("A note on DPO with noisy preferences", eq. 3): the label is
                 trusted with probability 1 - ls. Needs 0 <= ls <= 0.5.
      "ipo":     (z - 1 / (2 beta))^2                      Azar et al. 2023 eq. 17
      "hinge":   max(0, 1 - beta z)                        SLiC-HF, Zhao et al. 2023: the rank
                 calibration loss max(0, delta - log P(y_c) + log P(y_r)) with delta = 1,
                 applied to the beta-scaled log-ratio z (as in TRL), no cross-entropy term
      "robust":  ((1 - ls)(-log sigmoid(beta z)) - ls(-log sigmoid(-beta z))) / (1 - 2 ls)
                 rDPO, Chowdhury et al. 2024: an unbiased estimate of the clean-label DPO
                 loss when labels are flipped with probability ls. Needs 0 <= ls < 0.5.
    IPO's paper uses whole-sequence log-probs; TRL feeds it per-token means. This function
    takes whatever it is given, so that choice belongs to the caller.

    Args:
        the four log-probs: [B] sequence log-probs (sum over response tokens).
        beta: > 0, strength of the implicit KL penalty toward the reference.
        loss_type: one of DPO_LOSS_TYPES.
        label_smoothing: assumed label-noise rate ls (sigmoid and robust only).
    Returns:
        losses [B] (float32, or float64 for float64 inputs), chosen_rewards [B],
        rejected_rewards [B] where reward = beta * (log pi - log ref) (the implicit reward,
        eq. 5), detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing for loss_type 'sigmoid' must be in [0, 0.5], got {label_smoothing}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing for loss_type 'robust' must be in [0, 0.5) (it divides by 1 - 2*ls), got {label_smoothing}")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing is not defined for loss_type {loss_type!r}; got {label_smoothing}, use 0")

    chosen_logratios = _precise(policy_chosen_logps) - _precise(ref_chosen_logps)        # (B,) log pi/ref, chosen
    rejected_logratios = _precise(policy_rejected_logps) - _precise(ref_rejected_logps)  # (B,) log pi/ref, rejected
    z = chosen_logratios - rejected_logratios                                        # (B,)
    ls = label_smoothing

    if loss_type == "sigmoid":
        # Rafailov et al. 2023 eq. 7 (ls = 0); Mitchell 2023 cDPO eq. 3 (ls > 0)
        losses = -(1 - ls) * F.logsigmoid(beta * z) - ls * F.logsigmoid(-beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2                                           # Azar et al. 2023 eq. 17
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)                                            # Zhao et al. 2023, rank calibration
    else:  # "robust"
        # Chowdhury et al. 2024 rDPO: (1-ls) L(beta z) - ls L(-beta z), rescaled by 1/(1-2ls)
        losses = (-(1 - ls) * F.logsigmoid(beta * z) + ls * F.logsigmoid(-beta * z)) / (1 - 2 * ls)

    chosen_rewards = beta * chosen_logratios.detach()                                # Rafailov et al. 2023 eq. 5
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: reference-free, length-normalised preference loss (Meng et al. 2024 eq. 6).

    loss = -log sigmoid(beta * avg_c - beta * avg_r - gamma), where avg is the mean
    log-prob per response token (packing.answer_logps' means) and gamma is the target
    reward margin, in the paper's form. TRL's `simpo_gamma` is this gamma itself (its CPO
    trainer subtracts simpo_gamma / beta inside the beta-scaled logit); the SimPO authors'
    own code takes `gamma_beta_ratio` = gamma / beta instead.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] per-token MEAN log-probs.
        beta: reward scale (> 0; the paper uses about 2 to 10).
        gamma: target reward margin, in the units of beta * avg (0 gives no margin).
    Returns:
        losses [B] (float32, or float64 for float64 inputs), chosen_rewards = beta * avg_c [B],
        rejected_rewards = beta * avg_r [B] (rewards detached; Meng et al. 2024 eq. 4).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_rewards = beta * _precise(policy_chosen_logps)               # (B,) eq. 4
    rejected_rewards = beta * _precise(policy_rejected_logps)           # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)   # Meng et al. 2024 eq. 6
    return losses, chosen_rewards.detach(), rejected_rewards.detach()

# ---------------------------------------------------------------------- the reference's numbers

class LiveReference:
    """The reference as a forward of the frozen model, no graph: reference(batch) -> (chosen, rejected)
    log-probs, (B,) each."""

    def __init__(self, ref_model):
        self.model = ref_model

    def __call__(self, batch: PairBatch):
        with torch.no_grad():
            return answer_logps(self.model, batch)[:2]  # (B,) chosen, (B,) rejected


class AdapterOffReference:
    """LoRA (lora.py): the reference is the policy itself with its adapters switched off, which is
    the initial model exactly (W0 never trains), so no second copy of the model is held. No graph;
    gradient checkpointing and the adapters' dropout take no part without gradients and adapters."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, batch: PairBatch):
        with torch.no_grad(), adapters_disabled(self.policy):
            return answer_logps(self.policy, batch)[:2]  # (B,) chosen, (B,) rejected


class PrecomputedReference:
    """The reference as a lookup: tables[split] is (N, 2) [chosen, rejected] log-probs of that
    split's pairs; a batch names its split and its pairs' indices (packing.make_batch). The tables
    move to `device` once here (8 bytes per pair), not once per micro-step."""

    def __init__(self, tables: dict[str, torch.Tensor], device="cpu"):
        self.tables = {name: t.to(device) for name, t in tables.items() if t is not None}

    def __call__(self, batch: PairBatch):
        rows = self.tables[batch.split][batch.pair_index]  # (B, 2)
        return rows.unbind(-1)


# ------------------------------------------------------------------------- the objective

@dataclass
class DPOObjective:
    """What train() optimises for DPO and its variants, one micro-batch at a time (loss), and the
    means it logs (summarize). SimPO needs no reference; the others one of the three above."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float | None = None
    reference: LiveReference | AdapterOffReference | PrecomputedReference | None = None
    headline = ("loss", "rewards/accuracies", "rewards/margins")  # metrics printed on the progress line

    def __post_init__(self):  # checks only: nothing is changed here
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if self.loss_type != "simpo" and self.reference is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs a reference (LiveReference, AdapterOffReference "
                             "or PrecomputedReference)")

    def loss(self, model, batch: PairBatch):
        """-> (losses (B,), chosen_rewards (B,), rejected_rewards (B,), metric sums): the policy's
        four log-probs from one forward, the reference's two, the loss. The loop logs accuracy,
        margin and ties from the two implicit rewards (train.preference_sums)."""
        chosen, rejected, chosen_mean, rejected_mean = answer_logps(model, batch)  # (B,) each
        if self.loss_type == "simpo":  # reference-free, on per-token averages (Meng et al. 2024 eq. 6)
            losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_mean, rejected_mean, self.beta,
                                                                  self.simpo_gamma)
        else:
            ref_chosen, ref_rejected = self.reference(batch)  # (B,) each, no graph
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                label_smoothing=self.label_smoothing)
        sums = {"logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
                "logps/chosen_per_token": chosen_mean.detach().sum(),
                "logps/rejected_per_token": rejected_mean.detach().sum()}
        if self.rpo_alpha:
            # RPO (Pang et al. 2024, eq. 3): add the per-token NLL of the chosen answer, so the
            # policy keeps (or gains) likelihood on what people preferred, not only the margin.
            nll = -chosen_mean  # (B,)
            sums.update({"loss/preference": losses.detach().sum(), "loss/nll": nll.detach().sum()})
            losses = losses + self.rpo_alpha * nll
        return losses, chosen_rewards, rejected_rewards, sums

    def summarize(self, sums: dict) -> dict[str, float]:
        """Logged means, named as TRL names them, of the metric sums over the global batch."""
        n = max(sums["pairs"], 1)
        out = {"loss": sums["loss"] / n, "rewards/chosen": sums["chosen_reward"] / n,
               "rewards/rejected": sums["rejected_reward"] / n, "rewards/margins": sums["margin"] / n,
               "rewards/accuracies": sums["correct"] / n, "rewards/ties": sums["ties"] / n}
        return {**out, **{k: v / n for k, v in sums.items() if "/" in k}}


__all__ = ["DPO_LOSS_TYPES", "LOSS_TYPES", "dpo_loss", "simpo_loss", "LiveReference", "AdapterOffReference",
           "PrecomputedReference", "DPOObjective"]
