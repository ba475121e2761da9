"""Preference losses as pure functions of rewards or sequence log-probabilities.

Every loss here is a function of a scalar per pair that says how much more the model
prefers the chosen response than the rejected one. Each returns the per-pair losses [B]
(the caller takes the mean, which keeps data-parallel averaging explicit) and the detached
rewards of both answers, (losses, chosen_rewards, rejected_rewards); what to log from
them is objective.preference_sums.

Precision: these are differences of large, nearly equal numbers (sequence log-probs of -500
and -501), which bf16 cannot hold, so bf16 and fp16 inputs are computed in float32; float32
and float64 inputs keep their precision (a float64 unit test gets the float64 formula).

  Bradley-Terry reward model   -log sigmoid(r_c - r_r - m)
  DPO (sigmoid)                -log sigmoid(beta * z),  z = (pi_c - ref_c) - (pi_r - ref_r)
  IPO                          (z - 1 / (2 beta))^2
  hinge (SLiC)                 max(0, 1 - beta * z)
  robust DPO                   unbiased loss under a known rate of flipped labels
  SimPO                        -log sigmoid(beta * avg_c - beta * avg_r - gamma)

-log sigmoid(x) is computed as -F.logsigmoid(x), which is exact for |x| in the thousands
(it never forms sigmoid(x) itself, which rounds to 0 or 1).

Shape legend: B number of preference pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _precise(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: bf16/fp16 are promoted, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reward-model loss: negative log-likelihood of the human choice under Bradley-Terry.

    Bradley & Terry 1952; Ouyang et al. 2022 eq. 1:  P(c > r) = sigmoid(r_c - r_r),
    loss = -log sigmoid(r_c - r_r). With a margin m (Touvron et al. 2023, Llama 2, eq. 2):
    -log sigmoid(r_c - r_r - m), asking the chosen reward to lead by at least about m.

    Centering (Eisenstein et al. 2023, as in TRL's `center_rewards_coefficient`): BT only
    sees reward differences, so the reward's offset drifts freely; the penalty
    coef * (r_c + r_r)^2 pulls the rewards of each pair toward zero mean. It is added
    PER PAIR, so losses.mean() = mean(-log sigmoid(...)) + coef * mean((r_c + r_r)^2),
    which is exactly TRL's batch formula.

    Args:
        chosen_rewards, rejected_rewards: [B] scalar rewards.
        margin: None, a float, or [B] per-pair margins.
        center_rewards_coef: weight of the centering penalty (0 disables it).
    Returns:
        losses [B] (float32, or float64 for float64 inputs), and the two rewards, detached.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(chosen_rewards.shape)} vs {tuple(rejected_rewards.shape)}")
    chosen, rejected = _precise(chosen_rewards), _precise(rejected_rewards)  # (B,) each
    difference = chosen - rejected                                         # (B,)
    if margin is not None:
        difference = difference - torch.as_tensor(margin, dtype=difference.dtype, device=difference.device)
    losses = -F.logsigmoid(difference)                                     # Ouyang et al. 2022 eq. 1
    if center_rewards_coef != 0.0:
        losses = losses + center_rewards_coef * (chosen + rejected) ** 2   # per-pair centering penalty
    return losses, chosen.detach(), rejected.detach()


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
    log-prob per response token (logps_mean from logprobs.py) and gamma is the target
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
