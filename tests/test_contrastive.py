import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from dataLoader import SpeakerPairSampler
from loss import InfoNCE, JointObjective, PairMatchingHead, sample_hard_negatives


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
    assert 0 <= accuracy.item() <= 100


def test_pair_sampler_gives_distinct_speakers_and_covers_the_list():
    labels = [0] * 7 + [1] * 4 + [2] * 1 + [3] * 6 + [4] * 5 + [5] * 3
    sampler = SpeakerPairSampler(labels, batch_size=3, seed=0)
    sampler.set_epoch(4)
    batches = list(sampler)
    used = []
    for batch in batches:
        assert len(batch) == 3 and len({labels[a] for a, _, _ in batch}) == 3
        for a, b, epoch in batch:
            assert labels[a] == labels[b] and epoch == 4
            assert a != b or labels.count(labels[a]) == 1
            used += [a, b]
    # Every utterance appears, except those of pairs left when fewer than 3 speakers had pairs.
    pairs_total = sum(math.ceil(labels.count(s) / 2) for s in set(labels))
    assert len(batches) * 3 >= pairs_total - 2 * 3
    assert len(set(used)) >= len(labels) - 2 * 2 * 3
    assert list(sampler) == batches
    sampler.set_epoch(5)
    assert list(sampler) != batches


def test_pair_sampler_needs_enough_speakers():
    with pytest.raises(ValueError, match='needs at least 3 speakers; the list has 2'):
        SpeakerPairSampler([0, 0, 1, 1], batch_size=3, seed=0)


def test_pair_sampler_shards_global_batches_of_distinct_speakers():
    labels = [s for s in range(12) for _ in range(5)]
    ranks = [SpeakerPairSampler(labels, batch_size=3, seed=4, world_size=2, rank=r) for r in range(2)]
    batches = [list(sampler) for sampler in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) > 0
    for part0, part1 in zip(*batches):
        assert len(part0) == len(part1) == 3
        speakers = [labels[a] for a, _, _ in part0 + part1]
        assert len(set(speakers)) == 6
        assert not {i for pair in part0 for i in pair[:2]} & {i for pair in part1 for i in pair[:2]}
