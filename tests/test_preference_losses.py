"""Preference losses against hand-computed values (DPO, cDPO, IPO, hinge, Bradley-Terry)."""

from __future__ import annotations

import math

import pytest
import torch

from rlft_ray.algorithms.preference import bradley_terry_losses, dpo_losses, sequence_logps

# two pairs: log pi(y_w), log pi(y_l), log pi_ref(y_w), log pi_ref(y_l)
PC = torch.tensor([-1.0, -4.0])
PR = torch.tensor([-3.0, -2.0])
RC = torch.tensor([-2.0, -3.0])
RR = torch.tensor([-2.0, -2.0])
# h = (pc - rc) - (pr - rr) = [1 - (-1), -1 - 0] = [2, -1]
H = [2.0, -1.0]


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_dpo_and_implicit_rewards() -> None:
    losses, rc, rr = dpo_losses(PC, PR, RC, RR, beta=0.5)
    assert losses.tolist() == pytest.approx([-_logsig(0.5 * h) for h in H])
    assert rc.tolist() == pytest.approx([0.5, -0.5]) and rr.tolist() == pytest.approx([-0.5, 0.0])


def test_cdpo_label_smoothing() -> None:
    losses, _, _ = dpo_losses(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    want = [-0.9 * _logsig(0.5 * h) - 0.1 * _logsig(-0.5 * h) for h in H]
    assert losses.tolist() == pytest.approx(want)


def test_ipo_and_hinge() -> None:
    ipo, _, _ = dpo_losses(PC, PR, RC, RR, beta=0.25, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(h - 2.0) ** 2 for h in H])  # 1 / (2 beta) = 2
    hinge, _, _ = dpo_losses(PC, PR, RC, RR, beta=0.25, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - 0.25 * h) for h in H])


def test_gradient_pushes_chosen_up_and_rejected_down() -> None:
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, _, _ = dpo_losses(pc, pr, RC, RR, beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="unknown preference loss"):
        dpo_losses(PC, PR, RC, RR, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_losses(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_losses(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)


def test_bradley_terry_with_margin() -> None:
    out = bradley_terry_losses(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), margin=0.5)
    assert out.tolist() == pytest.approx([-_logsig(0.5), -_logsig(-1.5)])


def test_sequence_logps_sum_and_mean_over_real_tokens() -> None:
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert sequence_logps(lp, mask).tolist() == pytest.approx([-3.0, -1.5])
    assert sequence_logps(lp, mask, average=True).tolist() == pytest.approx([-1.5, -0.5])


def test_grm_regularizer_and_total_loss_by_hand() -> None:
    from rlft_ray.algorithms.preference import grm_losses, grm_sft_regularizer

    logps = torch.tensor([-10.0, -2.0])  # summed log pi(y_w | x)
    reg = grm_sft_regularizer(logps, beta=0.1)
    # -log sigma(-1) = log(1 + e) and -log sigma(-0.2) = log(1 + e^0.2)
    assert reg.tolist() == pytest.approx([1.3132616875, 0.7981388693], rel=1e-6)
    bt = torch.tensor([0.5, 1.0])
    total = grm_losses(bt, reg, alpha=0.01)
    assert total.tolist() == pytest.approx(
        [0.99 * 0.5 + 0.01 * 1.3132616875, 0.99 * 1.0 + 0.01 * 0.7981388693], rel=1e-6
    )
    with pytest.raises(ValueError, match="beta must be > 0"):
        grm_sft_regularizer(logps, beta=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        grm_losses(bt, reg, alpha=1.0)
