"""loss.py: AAM-softmax, InfoNCE and AAM-InfoNCE, hard-negative sampling, the pair-matching head and the
joint objective."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from speakerkit.loss import (AAMsoftmax, InfoNCE, JointObjective, PairMatchingHead, additive_angular_margin,
                             sample_hard_negatives)


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


def angles(*thetas):
    return torch.tensor([[math.cos(t), math.sin(t)] for t in thetas])


def test_infonce_hand_computed():
    u, v = angles(0.0, math.pi / 2), angles(0.3, math.pi / 2 + 0.5)
    loss, logits = InfoNCE(scale=10.0)(u, v)
    cos = torch.tensor([[math.cos(0.3), math.cos(math.pi / 2 + 0.5)],
                        [math.cos(math.pi / 2 - 0.3), math.cos(0.5)]])
    torch.testing.assert_close(logits, 10 * cos)
    rows = -F.log_softmax(10 * cos, dim=1).diagonal().mean()
    columns = -F.log_softmax(10 * cos, dim=0).diagonal().mean()
    assert loss.item() == pytest.approx(((rows + columns) / 2).item(), rel=1e-6)


def test_learnable_scale_starts_at_one_over_0_07_and_is_clamped_at_100():
    head = InfoNCE()
    assert head.scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        head.log_scale.fill_(math.log(500))
    assert head.scale().item() == pytest.approx(100.0)
    loss, _ = head(torch.randn(4, 8), torch.randn(4, 8))
    loss.backward()
    assert head.log_scale.grad.item() == 0.0


def test_margin_moves_only_the_positives():
    u, v = torch.randn(5, 16), torch.randn(5, 16)
    _, plain = InfoNCE(scale=30.0)(u, v)
    _, margined = InfoNCE(margin=0.2, scale=30.0)(u, v)
    off = ~torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(margined[off], plain[off])
    theta = torch.acos(plain.diagonal() / 30)
    torch.testing.assert_close(margined.diagonal(), 30 * torch.cos(theta + 0.2), atol=1e-4, rtol=1e-4)


def test_hard_negatives_are_never_the_same_speaker():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    for _ in range(200):
        logits = torch.randn(6, 6) * 5
        chosen = sample_hard_negatives(logits, labels)
        assert torch.all(labels[chosen] != labels)
    logits = torch.randn(6, 6)
    chosen = sample_hard_negatives(logits, labels, argmax=True)
    masked = logits.masked_fill(labels[:, None] == labels[None, :], -1e9)
    assert torch.equal(chosen, masked.argmax(dim=1))


def test_hard_negatives_follow_the_softmax_of_similarity():
    torch.manual_seed(1)
    labels = torch.arange(5)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0]] * 5)
    row = np.zeros(5)
    for _ in range(4000):
        row[sample_hard_negatives(logits, labels)[1].item()] += 1
    assert row[1] == 0  # row 1's own speaker is never drawn
    expected = torch.softmax(torch.tensor([1.0, 0.0, -0.5, 2.0]), 0).numpy() * row.sum()
    assert chisquare(row[[0, 2, 3, 4]], expected).pvalue > 1e-3


def test_a_pairs_matching_logit_ignores_the_other_pairs():
    torch.manual_seed(0)
    head = PairMatchingHead(16).eval()
    anchors, candidates = torch.randn(6, 16), torch.randn(6, 16)
    before = head(anchors, candidates)[0]
    anchors[1:], candidates[1:] = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(head(anchors, candidates)[0], before)
    torch.testing.assert_close(head(anchors[:1], candidates[:1])[0], before)


def test_zero_weights_create_no_parameters():
    def joint(**weights):
        defaults = {'classifier_weight': 0.8, 'contrastive_weight': 0.2, 'matching_weight': 0.2}
        defaults.update(weights)
        return JointObjective(10, 16, 0.2, 30, loss='infonce', fixed_scale=False, **defaults)

    names = {n.split('.')[0] for n, _ in joint().named_parameters()}
    assert names == {'classifier', 'contrastive', 'matching'}
    assert {n.split('.')[0] for n, _ in joint(classifier_weight=0).named_parameters()} == {'contrastive', 'matching'}
    assert {n.split('.')[0] for n, _ in joint(matching_weight=0).named_parameters()} == {'classifier', 'contrastive'}
    fixed = JointObjective(10, 16, 0.2, 30, 0.8, 0.2, 'aam_infonce', fixed_scale=True)
    assert [n for n, _ in fixed.named_parameters()] == ['classifier.weight']


def test_joint_objective_is_the_weighted_sum():
    torch.manual_seed(0)
    head = JointObjective(4, 8, 0.2, 30, 0.8, 0.2, 'aam_infonce', fixed_scale=False)
    u, v, labels = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([3, 1, 0, 2])
    total, accuracy = head(u, v, labels)
    classification, class_accuracy = head.classifier(u, labels)
    contrastive, _ = head.contrastive(u, v)
    assert total.item() == pytest.approx((0.8 * classification + 0.2 * contrastive).item(), rel=1e-6)
    assert accuracy == class_accuracy


def test_matching_term_trains_the_head():
    torch.manual_seed(0)
    head = JointObjective(4, 8, 0.2, 30, 0.0, 0.2, 'infonce', fixed_scale=False, matching_weight=1.0)
    u, v = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    total, accuracy = head(u, v, torch.arange(4))
    total.backward()
    assert all(p.grad is not None for p in head.matching.parameters()) and u.grad is not None
    # Without a classifier the accuracy is how often u_i's most similar v is v_i.
    nearest = (F.normalize(u.detach()) @ F.normalize(v).T).argmax(dim=1)
    assert accuracy.item() == pytest.approx(100 * (nearest == torch.arange(4)).float().mean().item())
