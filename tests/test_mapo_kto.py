"""MaPO and Diffusion-KTO: hand-derived numbers and parity with the reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.objectives import DiffusionKTO, kto_loss, mapo_loss


def test_mapo_hand_derived():
    """e_w = 0.2, e_l = 0.4, gamma 0.5, T 1000, beta 0.1:
    f(0.2) = 0.1 / (e^0.1 - 1) = 0.1 / 0.1051709 = 0.9508331;
    f(0.4) = 0.2 / (e^0.2 - 1) = 0.2 / 0.2214028 = 0.9033311
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


def test_kto_lambda_weights_hand_derived():
    """policy [[0.1, 0.3]], ref [[0.2, 0.2]], beta 10: g = [0.1, -0.1], z = 0,
    both h = sigmoid(1) = 0.7310586;
    lambda_desirable 2 -> winner 2 * 0.2689414 = 0.5378828; lambda_undesirable 0.5 -> loser 0.1344707;
    the objective's per-pair loss is their mean, 0.3361767."""
    loss, _, _ = kto_loss(
        torch.tensor([[0.1, 0.3]]), torch.tensor([[0.2, 0.2]]), torch.tensor([[1.0, 0.0]]), 10.0, 2.0, 0.5
    )
    torch.testing.assert_close(loss, torch.tensor([[0.5378828, 0.1344707]]), atol=1e-6, rtol=0)
    obj = DiffusionKTO(beta=10.0, lambda_desirable=2.0, lambda_undesirable=0.5)
    out = obj(torch.tensor([[0.1, 0.3]]), torch.tensor([[0.2, 0.2]]), {})
    assert out.loss.item() == pytest.approx(0.3361767, abs=1e-6)


def test_kto_gradient_hand_derived():
    """policy [[0.0, 0.1]], ref [[0.3, 0.2]]: g = [0.3, 0.1], z = 0.2. Beta 10: x_w = 10 (0.3 - 0.2) = 1,
    x_l = -10 (0.1 - 0.2) = 1; d loss_i / d policy_i = lambda * sign_i * beta * sigmoid(x)(1 - sigmoid(x))
    = +-10 * 0.1966119, and the objective averages the two images: grad = [0.9830597, -0.9830597].
    (Symmetric, so a z with gradient would cancel here; the next test tells them apart.)"""
    policy = torch.tensor([[0.0, 0.1]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.3, 0.2]], dtype=torch.float64)
    out = DiffusionKTO(beta=10.0)(policy, ref, {})
    out.loss.sum().backward()
    s = 1 / (1 + math.exp(-1.0))
    want = torch.tensor([[0.5 * 10 * s * (1 - s), -0.5 * 10 * s * (1 - s)]], dtype=torch.float64)
    torch.testing.assert_close(policy.grad, want)
    assert want[0, 0].item() == pytest.approx(0.9830597, abs=1e-6)
    assert out.metrics["kto/z"].item() == pytest.approx(0.2)


def test_kto_reference_point_carries_no_gradient():
    """Three images, one desirable: g = [0.3, 0.1, 0.2] (policy 0, ref g), z = 0.2. With z constant only
    each image's own term has a gradient: image 2 sits at z (x = 0: sigmoid' = 0.25), so its gradient is
    -(1/3) * 10 * 0.25 = -0.8333333. A z with gradient (not detached) gives [0.9332, -0.3776, -0.5556]
    instead of the expected [0.6554, -0.6554, -0.8333]."""
    policy = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.3, 0.1, 0.2]], dtype=torch.float64)
    out = DiffusionKTO(beta=10.0)(policy, ref, {"labels": torch.tensor([[1.0, 0.0, 0.0]])})
    out.loss.sum().backward()
    s = 1 / (1 + math.exp(-1.0))
    d = s * (1 - s)
    want = torch.tensor([[10 * d / 3, -10 * d / 3, -10 * 0.25 / 3]], dtype=torch.float64)
    torch.testing.assert_close(policy.grad, want)


def test_kto_reports_margin_and_loser_errors():
    """Pairs (winner desirable): policy [[0.10, 0.30], [0.30, 0.10]], ref 0.2 everywhere, beta 10:
    g = [[0.1, -0.1], [-0.1, 0.1]] -> margin = beta * (g_w - g_l) = [2, -2], accuracy [1, 0];
    errors are batch means over winners / losers: policy_w = 0.2, policy_l = 0.2, ref_w = ref_l = 0.2."""
    pol = torch.tensor([[0.10, 0.30], [0.30, 0.10]])
    ref = torch.full((2, 2), 0.2)
    m = DiffusionKTO(beta=10.0)(pol, ref, {}).metrics
    torch.testing.assert_close(m["margin"], torch.tensor([2.0, -2.0]))
    assert m["implicit_acc"].tolist() == [1.0, 0.0]
    for key in ("err/policy_w", "err/policy_l", "err/ref_w", "err/ref_l"):
        assert m[key].item() == pytest.approx(0.2)
    # k = 3 with the loser mean: g = [0.1, -0.1, 0.0] -> margin = 10 * (0.1 - (-0.05)) = 1.5
    m = DiffusionKTO(beta=10.0)(torch.tensor([[0.1, 0.3, 0.2]]), torch.full((1, 3), 0.2), {}).metrics
    assert m["margin"].item() == pytest.approx(1.5)
    assert m["err/policy_l"].item() == pytest.approx(0.25)
