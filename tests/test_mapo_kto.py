"""MaPO and Diffusion-KTO: hand-derived numbers and parity with the reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.objectives import kto_loss, mapo_loss


def test_mapo_hand_derived():
    """e_w = 0.2, e_l = 0.4, gamma 0.5, T 1000, beta 0.1:
    f(0.2) = 0.1 / (e^0.1 - 1) = 0.1 / 0.1051709 = 0.9508331;  f(0.4) = 0.2 / (e^0.2 - 1) = 0.2 / 0.2214028 = 0.9033311
    log_odds = 0.0475020; T * log_odds = 47.502 -> logsigmoid ~ -2.3e-21 -> loss = 0.2 + ~0"""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    loss, log_odds = mapo_loss(t(0.2), t(0.4))
    assert log_odds.item() == pytest.approx(0.9508331 - 0.9033311, abs=1e-6)
    assert loss.item() == pytest.approx(0.2, abs=1e-12)
    # reversed errors: T*log_odds = -47.502, logsigmoid ~ -47.502 -> loss = 0.4 + 0.1 * 47.502 = 5.1502
    loss, _ = mapo_loss(t(0.4), t(0.2))
    assert loss.item() == pytest.approx(0.4 + 0.1 * 47.50199, abs=1e-4)


def _mapo_reference(model_losses_w, model_losses_l, snr_value=0.5, T=1000, beta_mapo=0.1):
    """mapo-t2i/mapo@374b3d3 utils.py compute_loss, restated."""
    log_odds = (snr_value * model_losses_w) / (torch.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l
    ) / (torch.exp(snr_value * model_losses_l) - 1)
    ratio = F.logsigmoid(log_odds * T)
    return model_losses_w.mean() - (beta_mapo * ratio).mean()


def test_mapo_parity():
    g = torch.Generator().manual_seed(0)
    w, lose = (torch.rand(32, generator=g, dtype=torch.float64) * 0.3 + 0.01 for _ in range(2))
    ours, _ = mapo_loss(w, lose)
    assert ours.mean().item() == pytest.approx(_mapo_reference(w, lose).item(), abs=1e-6)


def test_kto_hand_derived():
    """policy [[0.1, 0.3]], ref [[0.2, 0.2]]: g = [0.1, -0.1], z = clamp(mean 0, 0) = 0;
    beta 10: winner h = sigmoid(10*0.1) = sigmoid(1) = 0.7310586 -> loss 0.2689414;
    loser h = sigmoid(-10*(-0.1)) = sigmoid(1) -> loss 0.2689414"""
    loss, g, z = kto_loss(
        torch.tensor([[0.1, 0.3]]), torch.tensor([[0.2, 0.2]]), torch.tensor([[1.0, 0.0]]), beta=10.0
    )
    assert z.item() == 0.0
    assert torch.allclose(loss, torch.full((1, 2), 1 - 1 / (1 + math.exp(-1))))


def test_kto_reference_point_is_clamped_positive_mean():
    """g = [0.3, 0.1] -> z = 0.2; desirable winner: h = sigmoid(beta*(0.3-0.2))."""
    loss, g, z = kto_loss(
        torch.tensor([[0.0, 0.1]]), torch.tensor([[0.3, 0.2]]), torch.tensor([[1.0, 0.0]]), beta=10.0
    )
    assert z.item() == pytest.approx(0.2)
    assert loss[0, 0].item() == pytest.approx(1 - 1 / (1 + math.exp(-1.0)), abs=1e-6)
    assert loss[0, 1].item() == pytest.approx(1 - 1 / (1 + math.exp(-1.0)), abs=1e-6)  # -(0.1-0.2)*10 = 1
