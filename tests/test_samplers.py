"""The training samplers: each epoch's batches a pure function of (seed, epoch[, groups]), the steps each
declares, resuming after some steps, and torchrun's parts."""

import math

import numpy as np
import pytest
import torch

from speakerkit import samplers
from speakerkit.errors import UserError
from speakerkit.samplers import (EpochSampler, HardNegativeBatches, HardNegativePairBatches, SpeakerGroups,
                                 SpeakerPairSampler, speaker_groups)


def items(sampler):
    """The dataset items of the batches a sampler yields, in order."""
    return [item for batch in sampler for item in batch]


def test_epoch_sampler_batches_a_permutation_and_shards_it_into_disjoint_equal_parts():
    whole = list(EpochSampler(11, 2, seed=3))
    assert [len(batch) for batch in whole] == [2] * 5 and {epoch for _, epoch in items(whole)} == {1}
    assert len(set(i for i, _ in items(whole))) == 10 and set(i for i, _ in items(whole)) <= set(range(11))
    ranks = [EpochSampler(11, 1, seed=3, world_size=3, rank=r) for r in range(3)]
    parts = [[i for i, _ in items(sampler)] for sampler in ranks]
    assert [len(p) for p in parts] == [r.steps_in_epoch() for r in ranks] == [3, 3, 3]
    assert sorted(sum(parts, [])) == sorted(i for i, _ in items(EpochSampler(11, 1, seed=3))[:9])


@pytest.mark.parametrize('sampler_of', [
    lambda labels: EpochSampler(len(labels), 4, seed=1),
    lambda labels: HardNegativeBatches(labels, 4, SpeakerGroups(labels, 4, 0.5), seed=1),
    lambda labels: SpeakerPairSampler(labels, 4, seed=1),
    lambda labels: HardNegativePairBatches(labels, 4, SpeakerGroups(labels, 4, 0.5), seed=1),
])
def test_every_sampler_declares_its_steps_and_resumes_after_some_of_them(sampler_of):
    labels = [s for s in range(9) for _ in range(3 + s % 4)]
    sampler = sampler_of(labels)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        whole = list(sampler)
        assert sampler.steps_in_epoch() == len(whole) == len(sampler) > 1
        assert {item[-1] for item in items(whole)} == {epoch}
        sampler.set_epoch(epoch, steps_done=1)
        assert list(sampler) == whole[1:] and len(sampler) == len(whole) - 1
        assert sampler.steps_in_epoch() == len(whole)  # the whole epoch's, which the schedules count in


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
    with pytest.raises(UserError, match='needs at least 3 speakers; the list has 2'):
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


def clustered_centres(clusters, per_cluster, seed=0):
    """Speaker centres in `clusters` tight clusters of `per_cluster` speakers, cluster c holding speakers
    c, c + clusters, c + 2 * clusters, ... (so that neighbours by number are in different clusters)."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((16, clusters)))[0].T
    speakers = clusters * per_cluster
    return np.stack([directions[s % clusters] + 0.05 * rng.standard_normal(16) for s in range(speakers)])


def test_speaker_groups_gather_speakers_whose_centres_lie_close_together():
    centres = clustered_centres(4, 5)
    groups = speaker_groups(centres, 5, np.random.default_rng(1))
    assert sorted(sorted(g) for g in groups) == [[c + 4 * k for k in range(5)] for c in range(4)]
    assert sorted(s for g in speaker_groups(centres, 3, np.random.default_rng(1)) for s in g) == list(range(20))


def test_hard_negative_batches_fill_each_batch_with_one_group_and_use_each_utterance_as_the_plain_sampler():
    speakers, utterances, batch = 20, 6, 10
    labels = [s for s in range(speakers) for _ in range(utterances)]
    grouping = SpeakerGroups(labels, batch, 0.5)
    sampler = HardNegativeBatches(labels, batch, grouping, seed=3)
    sampler.set_epoch(2)
    before = list(sampler)
    grouping.groups = grouping.from_weights(torch.from_numpy(clustered_centres(4, 5)), 3, 2)
    batches = list(sampler)
    assert batches != before  # new groups, a new plan
    plain = EpochSampler(len(labels), batch, seed=3)
    plain.set_epoch(2)
    assert sorted(items(batches)) == sorted(items(plain)) == [(i, 2) for i in range(len(labels))]  # each once
    group_of = {s: g for g, members in enumerate(grouping.groups) for s in members}
    within_one_group, distinct = 0, 0
    for each in batches:
        hard = [labels[i] for i, _ in each[:grouping.hard]]
        assert len({group_of[s] for s in hard}) <= 2  # random batches of 5 from 4 groups span 3 on average
        within_one_group += len({group_of[s] for s in hard}) == 1
        distinct += len(set(hard))
    assert within_one_group >= len(batches) // 2
    assert distinct >= 0.7 * grouping.hard * len(batches)  # speakers take turns within a group
    assert list(sampler) == batches  # a pure function of (seed, epoch, groups)
    sampler.set_epoch(3)
    assert list(sampler) != batches


def test_hard_negative_batches_bound_the_crops_of_one_speaker(monkeypatch):
    """Four speakers of 120 utterances among 196 of 10, one in each of four groups: each such group's last turns
    would fill whole hard parts with its large speaker."""
    labels = np.repeat(np.arange(200), [120] * 4 + [10] * 196)

    def most_of_one_speaker():
        grouping = SpeakerGroups(labels, 40, 0.5)
        grouping.groups = [list(range(g, 200, 10)) for g in range(10)]
        sampler = HardNegativeBatches(labels, 40, grouping, seed=4)
        sampler.set_epoch(1)
        batches = sampler.batches()
        assert len(np.unique(batches)) == batches.size == len(labels) // 40 * 40  # each utterance at most once
        return max(np.bincount(labels[row]).max() for row in batches)

    assert most_of_one_speaker() <= 9  # the most random batches of 40 held: 9 in 50 epochs
    monkeypatch.setattr(samplers, 'HARD_ITEMS_PER_SPEAKER', 10 ** 6)
    assert most_of_one_speaker() >= 18  # without the bound


def test_hard_negative_batches_of_torchrun_ranks_are_disjoint_and_equally_long():
    labels = [s for s in range(12) for _ in range(5)]
    ranks = [HardNegativeBatches(labels, 4, SpeakerGroups(labels, 4, 0.5), seed=1, world_size=2, rank=r)
             for r in range(2)]
    parts = [[i for i, _ in items(sampler)] for sampler in ranks]
    assert len(parts[0]) == len(parts[1]) == ranks[0].steps_in_epoch() * 4 == 60 // 2 // 4 * 4
    assert not set(parts[0]) & set(parts[1])


def test_hard_negative_pair_batches_take_part_of_each_batch_from_one_group_of_distinct_speakers():
    speakers, utterances, batch = 20, 8, 6
    labels = [s for s in range(speakers) for _ in range(utterances)]
    plain = SpeakerPairSampler(labels, batch, seed=2)
    grouping = SpeakerGroups(labels, batch, 0.5)
    sampler = HardNegativePairBatches(labels, batch, grouping, seed=2)
    for epoch in (1, 2):
        for each in (plain, sampler):
            each.set_epoch(epoch)
        grouping.groups = grouping.from_weights(torch.from_numpy(clustered_centres(4, 5)), 2, epoch)
        group_of = {s: g for g, members in enumerate(grouping.groups) for s in members}
        batches = list(sampler)
        used = [pair[:2] for b in batches for pair in b]
        assert len(set(used)) == len(used)  # each pair at most once
        per_speaker = np.bincount([labels[a] for a, _ in used], minlength=speakers)
        plain_per_speaker = np.bincount([labels[a] for a, _, _ in items(plain)], minlength=speakers)
        assert abs(len(batches) - len(list(plain))) <= 1 and np.abs(per_speaker - plain_per_speaker).max() <= 1
        one_group = 0
        for b in batches:
            speakers_of = [labels[a] for a, _, _ in b]
            assert len(set(speakers_of)) == batch and all(labels[a] == labels[c] for a, c, _ in b)
            one_group += len({group_of[s] for s in speakers_of[:grouping.hard]}) == 1
        assert one_group >= len(batches) // 2  # random batches: almost never (groups of 3 among 20 speakers)
        assert list(sampler) == batches
    ranks = [HardNegativePairBatches(labels, 3, SpeakerGroups(labels, 3, 0.5), seed=2, world_size=2, rank=r)
             for r in range(2)]
    for rank_batches in zip(*[list(r) for r in ranks]):
        assert len({labels[a] for b in rank_batches for a, _, _ in b}) == 6  # no speaker twice in a step
