import math

import pytest
import torch
import torch.nn.functional as F

from loss import AAMsoftmax, additive_angular_margin


def test_margin_is_cos_theta_plus_m():
    theta = torch.tensor([0.1, 0.7, 1.5])
    torch.testing.assert_close(additive_angular_margin(torch.cos(theta), 0.2), torch.cos(theta + 0.2))


def test_margin_past_pi_keeps_decreasing():
    theta = torch.linspace(2.9, math.pi, 20)
    out = additive_angular_margin(torch.cos(theta), 0.3)
    assert torch.all(out[1:] <= out[:-1]) and torch.all(out <= torch.cos(theta))


def test_aam_softmax_hand_computed():
    head = AAMsoftmax(n_class=3, m=0.2, s=30, embedding_dim=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    x = torch.tensor([[math.cos(0.3), math.sin(0.3)]])  # 0.3 rad from class 0
    loss, accuracy = head(x, torch.tensor([0]))
    logits = 30 * torch.tensor([math.cos(0.5), math.cos(math.pi / 2 - 0.3), math.cos(math.pi - 0.3)])
    assert loss.item() == pytest.approx(-F.log_softmax(logits, 0)[0].item(), rel=1e-5)
    assert accuracy.item() == 100.0


def test_accuracy_counts_the_plain_cosine_decision():
    head = AAMsoftmax(n_class=2, m=0.2, s=30, embedding_dim=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.2], [0.3, 1.0]])
    _, accuracy = head(x, torch.tensor([0, 1, 1, 1]))
    assert accuracy.item() == 75.0
