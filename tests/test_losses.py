"""Preference losses checked against values and gradients derived by hand.

Shared DPO vector (torchtune's test case):
    policy chosen   [-0.5, -10.0, -1.0]    policy rejected [-0.1, -30.0, -21.0]
    ref chosen      [-0.5, -10.1, -0.1]    ref rejected    [-0.1, -20.1, -0.1]
    policy log-ratio  pc - pr = [-0.4, 20, 20];  reference log-ratio rc - rr = [-0.4, 10, 0]
    z = [0, 10, 20];  with beta = 0.1, x = beta z = [0, 1, 2]
    softplus(-x) = -log sigmoid(x) = [ln 2, ln(1 + e^-1), ln(1 + e^-2)]
                                   = [0.6931472, 0.3132617, 0.1269280]
    -log sigmoid(-x) = softplus(x) = softplus(-x) + x = [0.6931472, 1.3132617, 2.1269280]
"""
import math

import pytest
import torch

from minialign.dpo import DPO_LOSS_TYPES, dpo_loss, simpo_loss
from minialign.reward import RewardObjective, bradley_terry_loss
from minialign.train import preference_sums

POLICY_CHOSEN = [-0.5, -10.0, -1.0]
POLICY_REJECTED = [-0.1, -30.0, -21.0]
REF_CHOSEN = [-0.5, -10.1, -0.1]
REF_REJECTED = [-0.1, -20.1, -0.1]


def dpo_inputs(requires_grad=False):
    tensors = [torch.tensor(v, requires_grad=requires_grad) for v in (POLICY_CHOSEN, POLICY_REJECTED)]
    return tensors + [torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED)]


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


def test_dpo_sigmoid_hand_values():
    """Rafailov eq. 7: softplus(-x) = [0.6931472, 0.3132617, 0.1269280] (module docstring).

    Rewards beta (logpi - logref): chosen 0.1 * [0, 0.1, -0.9] = [0, 0.01, -0.09],
    rejected 0.1 * [0, -9.9, -20.9] = [0, -0.99, -2.09].
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(*dpo_inputs(), beta=0.1)
    close(losses, [0.6931472, 0.3132617, 0.1269280])
    close(chosen_rewards, [0.0, 0.01, -0.09])
    close(rejected_rewards, [0.0, -0.99, -2.09])
    assert not chosen_rewards.requires_grad


def test_dpo_ipo_hand_values():
    """Azar eq. 17: (z - 1/(2 beta))^2 = ([0, 10, 20] - 5)^2 = [25, 25, 225]."""
    losses, _, _ = dpo_loss(*dpo_inputs(), beta=0.1, loss_type="ipo")
    close(losses, [25.0, 25.0, 225.0], atol=1e-3)


def test_dpo_hinge_hand_values():
    """SLiC hinge: max(0, 1 - x) with x = [0, 1, 2] gives [1, 0, 0]."""
    losses, _, _ = dpo_loss(*dpo_inputs(), beta=0.1, loss_type="hinge")
    close(losses, [1.0, 0.0, 0.0])


def test_dpo_label_smoothing_hand_values():
    """cDPO, ls = 0.1: 0.9 softplus(-x) + 0.1 softplus(x) = softplus(-x) + 0.1 x
    = [0.6931472, 0.4132617, 0.3269280]."""
    losses, _, _ = dpo_loss(*dpo_inputs(), beta=0.1, label_smoothing=0.1)
    close(losses, [0.6931472, 0.4132617, 0.3269280])


def test_dpo_robust_hand_values():
    """rDPO, ls = 0.1: (0.9 softplus(-x) - 0.1 softplus(x)) / 0.8
    = ((1 - 2 ls) softplus(-x) - ls x) / (1 - 2 ls) = softplus(-x) - x / 8
    = [0.6931472, 0.1882617, -0.1230720] (negative is allowed: it is an unbiased estimate)."""
    losses, _, _ = dpo_loss(*dpo_inputs(), beta=0.1, loss_type="robust", label_smoothing=0.1)
    close(losses, [0.6931472, 0.1882617, -0.1230720])


def test_simpo_hand_values():
    """Meng eq. 6 with beta 2, gamma 1 on mean log-probs c = [-0.5, -1, -2], r = [-1, -1, -0.5]:
    beta c - beta r - gamma = [1 - 1, 0 - 1, -3 - 1] = [0, -1, -4]
    softplus(-x) = [ln 2, ln(1 + e), ln(1 + e^4)] = [0.6931472, 1.3132617, 4.0181499];
    rewards beta c = [-1, -2, -4], beta r = [-2, -2, -1]."""
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([-1.0, -1.0, -0.5]), beta=2.0, gamma=1.0)
    close(losses, [0.6931472, 1.3132617, 4.0181499])
    close(chosen_rewards, [-1.0, -2.0, -4.0])
    close(rejected_rewards, [-2.0, -2.0, -1.0])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradients_closed_form(loss_type):
    """d loss / d z in closed form; z grows with policy chosen and falls with policy rejected,
    so d/d pc = dL/dz and d/d pr = -dL/dz.
      sigmoid (ls): -beta (1 - ls) sigmoid(-x) + beta ls sigmoid(x)
      robust  (ls): (-beta (1 - ls) sigmoid(-x) - beta ls sigmoid(x)) / (1 - 2 ls)
      ipo:           2 (z - 1/(2 beta))
      hinge:         -beta where x < 1, else 0 (x = 1 sits on the kink: no test point there)"""
    beta, ls = 0.1, (0.1 if loss_type in ("sigmoid", "robust") else 0.0)
    pc, pr, rc, rr = dpo_inputs(requires_grad=True)
    pr = pr.detach().clone()
    pr[1] = -29.0                         # move z[1] off the hinge's kink: z = [0, 9, 20]
    pr.requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
    losses.sum().backward()
    z = torch.tensor([0.0, 9.0, 20.0])
    x = beta * z
    if loss_type == "sigmoid":
        want = -beta * (1 - ls) * torch.sigmoid(-x) + beta * ls * torch.sigmoid(x)
    elif loss_type == "robust":
        want = (-beta * (1 - ls) * torch.sigmoid(-x) - beta * ls * torch.sigmoid(x)) / (1 - 2 * ls)
    elif loss_type == "ipo":
        want = 2 * (z - 1 / (2 * beta))
    else:
        want = torch.where(x < 1, torch.tensor(-beta), torch.tensor(0.0))
    torch.testing.assert_close(pc.grad, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pr.grad, -want, atol=1e-4, rtol=1e-5)


def test_simpo_gradient_closed_form():
    """d/dc of softplus(-(beta c - beta r - gamma)) = -beta sigmoid(-(beta c - beta r - gamma))."""
    c = torch.tensor([-0.5, -1.0, -2.0], requires_grad=True)
    r = torch.tensor([-1.0, -1.0, -0.5], requires_grad=True)
    simpo_loss(c, r, beta=2.0, gamma=1.0)[0].sum().backward()
    want = -2.0 * torch.sigmoid(-torch.tensor([0.0, -1.0, -4.0]))
    torch.testing.assert_close(c.grad, want)
    torch.testing.assert_close(r.grad, -want)


def test_dpo_is_ln2_when_policy_equals_reference():
    """z = 0 whatever the log-probs are, so -log sigmoid(0) = ln 2 for every pair."""
    logps = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)) * 50 - 200
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=0.3)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2)))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_dpo_finite_for_huge_logps(loss_type, sign):
    """Log-probs in the thousands (beta z = +-499.9) must not overflow sigmoid/exp."""
    ls = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    pc = torch.tensor([-1.0 if sign > 0 else -5000.0], requires_grad=True)
    pr = torch.tensor([-5000.0 if sign > 0 else -1.0], requires_grad=True)
    ref = torch.tensor([-2500.0])
    losses, _, _ = dpo_loss(pc, pr, ref, ref, beta=0.1, loss_type=loss_type, label_smoothing=ls)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    if loss_type == "sigmoid" and sign < 0:
        # x = -499.9: softplus(-x) = 499.9 to fp32 precision; cDPO adds ls * x = -49.99
        assert losses.item() == pytest.approx(499.9 - 49.99, rel=1e-5)


def test_simpo_and_bt_finite_for_huge_inputs():
    losses, _, _ = simpo_loss(torch.tensor([-5000.0]), torch.tensor([-1.0]), beta=2.5, gamma=1.0)
    assert losses.item() == pytest.approx(2.5 * 4999 + 1.0, rel=1e-6)
    bt, _, _ = bradley_terry_loss(torch.tensor([-3000.0, 3000.0]), torch.tensor([3000.0, -3000.0]))
    assert torch.isfinite(bt).all() and bt[0].item() == pytest.approx(6000.0) and bt[1].item() == 0.0


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_zero_smoothing_reduces_to_plain(loss_type):
    """label_smoothing = 0 is the unsmoothed loss, and robust(0) is exactly sigmoid DPO."""
    inputs = dpo_inputs()
    plain, _, _ = dpo_loss(*inputs, loss_type=loss_type)
    explicit, _, _ = dpo_loss(*inputs, loss_type=loss_type, label_smoothing=0.0)
    torch.testing.assert_close(plain, explicit)
    if loss_type == "robust":
        torch.testing.assert_close(plain, dpo_loss(*inputs, loss_type="sigmoid")[0])


def test_dpo_rejects_bad_arguments():
    inputs = dpo_inputs()
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        dpo_loss(*inputs, loss_type="kto")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(*inputs, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*inputs, loss_type="sigmoid", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*inputs, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*inputs, beta=0.0)


def test_bradley_terry_hand_values_and_metrics():
    """r_c = [2, 0, -1], r_r = [1, 0, 1] -> d = [1, 0, -2]
    losses softplus(-d) = [0.3132617, ln 2 = 0.6931472, ln(1 + e^2) = 2.1269280];
    accuracy (strict >) 1/3, ties 1/3, margin mean(d) = -1/3,
    chosen_reward mean 1/3, rejected_reward mean 2/3."""
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    losses, c, r = bradley_terry_loss(chosen, rejected)
    close(losses, [0.3132617, 0.6931472, 2.1269280])
    assert torch.equal(c, chosen) and torch.equal(r, rejected) and not c.requires_grad
    sums = preference_sums(c, r)
    assert sums["pairs"] == 3 and sums["correct"].item() == 1 and sums["ties"].item() == 1
    metrics = RewardObjective().summarize({"loss": float(losses.sum()), **{k: float(v) for k, v in sums.items()}})
    assert metrics["loss"] == pytest.approx((0.3132617 + 0.6931472 + 2.1269280) / 3)
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["ties"] == pytest.approx(1 / 3)
    assert metrics["margin"] == pytest.approx(-1 / 3)
    assert metrics["chosen_reward"] == pytest.approx(1 / 3)
    assert metrics["rejected_reward"] == pytest.approx(2 / 3)


def test_bradley_terry_margin_and_centering():
    """margin m = [1, -1, 0]: d - m = [0, 1, -2] -> [ln 2, 0.3132617, 2.1269280].
    Centering coef 0.01 adds 0.01 (r_c + r_r)^2 = 0.01 [9, 0, 0] per pair, so the batch mean
    equals TRL's mean(BT) + coef * mean((r_c + r_r)^2)."""
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    losses, _, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, -1.0, 0.0]))
    close(losses, [0.6931472, 0.3132617, 2.1269280])
    centred, _, _ = bradley_terry_loss(chosen, rejected, center_rewards_coef=0.01)
    close(centred, [0.3132617 + 0.09, 0.6931472, 2.1269280])
    trl_mean = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + 0.01 * ((chosen + rejected) ** 2).mean()
    torch.testing.assert_close(centred.mean(), trl_mean)
    scalar, _, _ = bradley_terry_loss(chosen, rejected, margin=1.0)
    close(scalar, [0.6931472, 1.3132617, 3.0485874])   # softplus(-(d - 1)), d - 1 = [0, -1, -3]


def test_bradley_terry_antisymmetry_and_gradient():
    """Swapping chosen and rejected turns loss(d) into loss(-d) = loss(d) + d,
    since softplus(x) - softplus(-x) = x; and d/d r_c of softplus(-d) = -sigmoid(-d)."""
    g = torch.Generator().manual_seed(0)
    chosen = (torch.randn(6, generator=g) * 3).requires_grad_(True)
    rejected = torch.randn(6, generator=g) * 3
    forward, _, _ = bradley_terry_loss(chosen, rejected)
    swapped, _, _ = bradley_terry_loss(rejected, chosen)
    d = (chosen - rejected).detach()
    torch.testing.assert_close(swapped, forward.detach() + d)
    forward.sum().backward()
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(-d))


def test_bf16_inputs_give_fp32_losses():
    c, r = torch.tensor([-100.0, -3.0]).bfloat16(), torch.tensor([-101.0, -2.0]).bfloat16()
    losses, chosen_rewards, _ = dpo_loss(c, r, r, c)
    assert losses.dtype == torch.float32 and chosen_rewards.dtype == torch.float32
    assert bradley_terry_loss(c, r)[0].dtype == torch.float32


def test_float64_inputs_keep_float64_precision():
    """Users unit-test the losses in float64: at sequence log-probs of -1e4 the result must be the
    float64 formula to 1e-12 relative (a float32 detour loses ~1e-5). Hand values: z = (-1e4 + 0.3
    - (-1e4)) - (-1e4 - 0.2 - (-1e4)) = 0.5, so sigmoid DPO at beta 0.1 is softplus(-0.05)."""
    pc, pr = torch.tensor([-1e4 + 0.3], dtype=torch.float64), torch.tensor([-1e4 - 0.2], dtype=torch.float64)
    ref = torch.tensor([-1e4], dtype=torch.float64)
    losses, c, r = dpo_loss(pc, pr, ref, ref, beta=0.1)
    z = (pc - ref) - (pr - ref)  # the formula, in float64, with the same rounding of the inputs
    want = torch.nn.functional.softplus(-0.1 * z)
    assert losses.dtype == torch.float64 and c.dtype == torch.float64
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=0)
    assert abs(z.item() - 0.5) < 1e-11
    bt, _, _ = bradley_terry_loss(pc, pr)
    assert bt.dtype == torch.float64
    torch.testing.assert_close(bt, torch.nn.functional.softplus(-(pc - pr)), rtol=1e-12, atol=0)
    s, _, _ = simpo_loss(pc, pr, beta=2.0, gamma=0.5)
    assert s.dtype == torch.float64
