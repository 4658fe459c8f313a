"""SSO's weighted loss against values worked out by hand, with the gradient through W."""

import math

import pytest
import torch

from trl_sgpo.trainers.sgpo_loss import preference_loss
from trl_sgpo.trainers.sso_loss import sso_loss, sso_weight


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def test_base_losses():
    # IPO, beta = 0.25: (logits - 2)^2. Sigmoid, beta = 0.5: -log sigmoid(0.5 * logits).
    assert preference_loss(torch.tensor([3.0, 0.0]), 0.25, "ipo").tolist() == pytest.approx([1.0, 4.0])
    assert preference_loss(torch.tensor([0.0, 2.0]), 0.5, "sigmoid").tolist() == pytest.approx(
        [math.log(2.0), -math.log(sigmoid(1.0))]
    )
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(torch.tensor([0.0]), 0.1, "hinge")


def test_weight_by_hand():
    # alpha = 0.66, m+ = -1, m- = -2: W = sigmoid(0.66 + 0.68) = sigmoid(1.34).
    w = sso_weight(torch.tensor([-1.0]), torch.tensor([-2.0]), alpha=0.66)
    assert w.item() == pytest.approx(sigmoid(1.34))


def test_ipo_loss_value_by_hand():
    # beta = 0.25 -> IPO target 2. Main: (3 - 2)^2 = 1. G = (0 - 2)^2 + (4 - 2)^2 = 8. theta = 0.5 -> bracket 5.
    # alpha = 0.5, m+ = -1, m- = -2 -> W = sigmoid(1.5).
    losses, weights = sso_loss(
        plain_logits=torch.tensor([3.0]),
        good_logits=torch.tensor([0.0]),
        bad_logits=torch.tensor([4.0]),
        mean_logp_chosen=torch.tensor([-1.0]),
        mean_logp_rejected=torch.tensor([-2.0]),
        beta=0.25,
        theta=0.5,
        alpha=0.5,
        loss_type="ipo",
    )
    assert weights.item() == pytest.approx(sigmoid(1.5))
    assert losses.item() == pytest.approx(5 * sigmoid(1.5))


def test_sigmoid_loss_value_by_hand():
    # beta = 1, all logits 0: each base loss ln 2; theta = 0.1 -> bracket 1.2 ln 2. alpha = 1, m+ = 0 -> W = 1/2.
    losses, _ = sso_loss(
        *(torch.zeros(1) for _ in range(3)),
        mean_logp_chosen=torch.tensor([0.0]),
        mean_logp_rejected=torch.tensor([-5.0]),
        beta=1.0,
        theta=0.1,
        alpha=1.0,
        loss_type="sigmoid",
    )
    assert losses.item() == pytest.approx(0.5 * 1.2 * math.log(2.0))


def test_gradient_flows_through_w():
    # d loss / d m+ = bracket * dW/dm+ = bracket * (-alpha) * W * (1 - W); d loss / d m- uses (1 - alpha).
    m_chosen = torch.tensor([-1.0], requires_grad=True)
    m_rejected = torch.tensor([-2.0], requires_grad=True)
    plain = torch.tensor([3.0], requires_grad=True)
    losses, _ = sso_loss(
        plain,
        torch.tensor([0.0]),
        torch.tensor([4.0]),
        m_chosen,
        m_rejected,
        beta=0.25,
        theta=0.5,
        alpha=0.66,
        loss_type="ipo",
    )
    losses.sum().backward()
    w = sigmoid(0.66 * 1 + 0.34 * 2)
    assert m_chosen.grad.item() == pytest.approx(5 * -0.66 * w * (1 - w))
    assert m_rejected.grad.item() == pytest.approx(5 * -0.34 * w * (1 - w))
    # And through the pair loss, scaled by W: d/d logits (logits - 2)^2 = 2 * (3 - 2).
    assert plain.grad.item() == pytest.approx(w * 2.0)
