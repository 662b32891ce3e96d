"""Each training epoch's batches, as a pure function of (seed, epoch[, speaker groups]), for torchrun's processes.

Every sampler here is a batch sampler (`DataLoader(batch_sampler=...)`) with the same three parts:
  set_epoch(epoch, steps_done)  the epoch to yield from now on, leaving out the steps a stopped run trained
  steps_in_epoch()              this process's steps in the whole epoch: what the schedules count in
  iteration                     the batches still to train, each a list of dataset items

  EpochSampler            --mode classifier: a random permutation in batches, each utterance at most once
  HardNegativeBatches     --mode classifier --sampler chns: the same utterances, part of each batch from one
                          group of speakers whose classifier weights lie close together
  SpeakerPairSampler      --mode clip|blip: batches of two views of distinct speakers; the count of batches
                          differs from epoch to epoch
  HardNegativePairBatches --mode clip|blip --sampler chns: those batches, part of each from one group
The hard-negative samplers are given a `SpeakerGroups` (`grouping`), whose `groups` the trainer sets at each
epoch's start from the classifier's weights (`SpeakerGroups.from_weights`); new groups make a new plan. The
tar-shard stream (shards.py) plans its own steps and answers `set_epoch` and `steps_in_epoch` the same way.
"""

import numpy as np
import torch

from speakerkit.errors import UserError


def speaker_groups(centres, size, rng):
    """Speakers in groups of `size` whose `centres` (rows: the classifier's weight of each speaker) lie close
    together: from a random speaker not yet grouped, its group is it and the `size` - 1 ungrouped speakers of
    highest cosine similarity to it, until every speaker has a group (the last may be smaller)."""
    unit = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    left = np.ones(len(unit), dtype=bool)
    groups = []
    for start in rng.permutation(len(unit)):
        if not left[start]:
            continue
        left[start] = False
        others = np.flatnonzero(left)
        nearest = others[np.argsort(-(unit[others] @ unit[start]), kind='stable')[:size - 1]]
        left[nearest] = False
        groups.append([int(start)] + [int(i) for i in nearest])
    return groups


HARD_ITEMS_PER_SPEAKER = 2  # at most this many of a batch's hard items from one speaker


class SpeakerGroups:
    """The speakers of a training list (labels 0..n-1) in `groups`, of which a hard-negative batch takes `hard`
    speakers from one; before the first `from_weights`, one group of everyone."""

    def __init__(self, labels, batch_size, hard_fraction):
        self.speakers = int(max(labels)) + 1
        self.hard = max(1, round(hard_fraction * batch_size))
        self.groups = [list(range(self.speakers))]

    def from_weights(self, weights, seed, epoch):
        """`speaker_groups` of `hard` speakers from the classifier's weights (a tensor [classes, D]; the first
        rows are the speakers'), drawn from (seed, epoch)."""
        centres = weights.detach()[:self.speakers].float().cpu().numpy()
        return speaker_groups(centres, self.hard, np.random.default_rng((seed, epoch, 1)))

    def group_of(self):
        """The group number of each speaker."""
        found = np.zeros(self.speakers, dtype=np.int64)
        for number, members in enumerate(self.groups):
            found[members] = number
        return found


class PlannedEpochs(torch.utils.data.Sampler):
    """What every sampler here shares: its epoch, this process's part under torchrun (`world_size`, `rank`),
    the steps a resumed run leaves out, and the epoch's plan kept while its `plan_key` stays the same. A
    subclass's `plan()` gives this process's batches of the epoch as an integer array [steps, batch, ...]."""

    def __init__(self, seed, world_size=1, rank=0):
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epoch = 1
        self.steps_done = 0
        self.planned = (None, None)

    def set_epoch(self, epoch, steps_done=0):
        self.epoch = epoch
        self.steps_done = steps_done

    def plan_key(self):
        return self.epoch

    def batches(self):
        if self.planned[0] != self.plan_key():
            self.planned = (self.plan_key(), self.plan())
        return self.planned[1]

    def steps_in_epoch(self):
        return len(self.batches())

    def __len__(self):
        return self.steps_in_epoch() - self.steps_done

    def __iter__(self):
        for batch in self.batches()[self.steps_done:]:
            yield [(*item, self.epoch) for item in batch.reshape(len(batch), -1).tolist()]


class EpochSampler(PlannedEpochs):
    """A permutation of the dataset's `size` items drawn from (seed, epoch), in batches of `batch_size` items
    (index, epoch). With `world_size` > 1 (torchrun), rank `rank` takes every world_size-th item of it, after
    the tail that would give ranks unequal counts is dropped: the ranks' parts are disjoint and equally long;
    the part's last incomplete batch is dropped."""

    def __init__(self, size, batch_size, seed, world_size=1, rank=0):
        super().__init__(seed, world_size, rank)
        self.size = size
        self.batch_size = batch_size

    def plan(self):
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.size)
        mine = order[:self.size // self.world_size * self.world_size][self.rank::self.world_size]
        steps = len(mine) // self.batch_size
        return mine[:steps * self.batch_size].reshape(steps, self.batch_size)


class HardNegativeBatches(EpochSampler):
    """--sampler chns (classifier mode): clustering-based hard-negative batches (after Masztalski et al.,
    arXiv 2507.17540). Each epoch uses the utterances EpochSampler's would (a random `size // batch_size`
    batches' worth: each utterance at most once), but `hard` items of every batch are utterances of speakers
    in one of the `groups` (speakers whose classifier weights lie close together), one per speaker while the
    group has speakers left, and the other items are drawn at random. Where a group's last turns fall to a few
    speakers of many utterances, a speaker's items past its HARD_ITEMS_PER_SPEAKER-th in a batch's hard part
    trade places with random items of the random parts: on VoxCeleb2-like labels (5,994 speakers, batch 400)
    the most crops of one speaker in a batch fell from 197 to 5, the random sampler's figure. A pure function
    of (seed, epoch, groups). Under torchrun, rank r takes batches r, r + world_size, ...

    In classifier mode every speaker's weight enters every example's loss, so batch composition cannot add hard
    negatives to the loss itself; it acts through batch-norm statistics and which utterances share a step."""

    def __init__(self, labels, batch_size, grouping, seed, world_size=1, rank=0):
        super().__init__(len(labels), batch_size, seed, world_size, rank)
        self.labels = np.asarray(labels)
        self.grouping = grouping

    def plan_key(self):
        return self.epoch, self.grouping.groups

    def plan(self):
        count = self.size // self.world_size // self.batch_size * self.world_size
        rng = np.random.default_rng((self.seed, self.epoch))
        chosen = rng.permutation(self.size)[:count * self.batch_size]
        hard_size = self.grouping.hard
        hard, easy = chosen[:count * hard_size], chosen[count * hard_size:]
        group_of = self.grouping.group_of()
        group_rank = rng.permutation(len(self.grouping.groups))
        speaker_rank = rng.permutation(self.grouping.speakers)
        speaker = self.labels[hard]
        turn = occurrences(speaker)  # the k-th of its speaker's hard items takes turn k
        hard = hard[np.lexsort((speaker_rank[speaker], turn, group_rank[group_of[speaker]]))].reshape(count, hard_size)
        bounded(hard, easy, self.labels, np.random.default_rng((self.seed, self.epoch, 2)))
        batches = np.concatenate([hard, easy.reshape(count, self.batch_size - hard_size)], axis=1)
        return batches[rng.permutation(count)][self.rank::self.world_size]


def occurrences(keys):
    """For each element of the 1-D array `keys`, how many equal keys come before it (0 for the first)."""
    order = np.argsort(keys, kind='stable')
    ordered = keys[order]
    found = np.empty(len(keys), dtype=np.int64)
    found[order] = np.arange(len(keys)) - np.searchsorted(ordered, ordered)
    return found


def bounded(hard, easy, labels, rng):
    """In place: items of `hard` (one row a batch) past the HARD_ITEMS_PER_SPEAKER-th of their speaker in their
    row trade places with items of `easy` at random positions (as many as `easy` has)."""
    row_speaker = np.arange(len(hard))[:, None] * (int(labels.max()) + 1) + labels[hard]  # a key per row and speaker
    over = np.flatnonzero(occurrences(row_speaker.ravel()) >= HARD_ITEMS_PER_SPEAKER)[:len(easy)]
    if len(over):
        places = rng.choice(len(easy), len(over), replace=False)
        flat = hard.reshape(-1)
        flat[over], easy[places] = easy[places], flat[over].copy()


class SpeakerPairSampler(PlannedEpochs):
    """Batches of `batch_size` pairs (index_a, index_b, epoch) from `batch_size` distinct speakers.

    Each epoch, every speaker's utterances are shuffled and paired off two by two (an odd one out is paired
    with another utterance of its speaker, a single utterance with itself), so every utterance is used once.
    Batches then draw distinct speakers with probability proportional to their remaining pairs, until fewer
    than `batch_size` speakers have pairs left; those leftover pairs are the only ones an epoch skips, so the
    number of batches differs from epoch to epoch. With `world_size` > 1 (torchrun) the plan is of global
    batches of batch_size * world_size distinct speakers, and rank `rank` takes its `batch_size` slice of each:
    no speaker appears twice across the ranks' batches of a step, so gathered negatives are all negatives."""

    def __init__(self, labels, batch_size, seed, world_size=1, rank=0):
        super().__init__(seed, world_size, rank)
        self.by_speaker = {}
        for index, label in enumerate(np.asarray(labels).tolist()):
            self.by_speaker.setdefault(label, []).append(index)
        if len(self.by_speaker) < batch_size * world_size:
            raise UserError(f'a batch of {batch_size} distinct speakers on each of {world_size} processes needs '
                            f'at least {batch_size * world_size} speakers; the list has {len(self.by_speaker)} '
                            f'(lower --batch_size)')
        self.batch_size = batch_size

    def pairs(self, rng):
        pairs = {}
        for speaker, indices in self.by_speaker.items():
            order = [int(i) for i in rng.permutation(indices)]
            if len(order) % 2:
                order.append(order[0] if len(order) == 1 else int(rng.choice(order[:-1])))
            pairs[speaker] = [(order[i], order[i + 1]) for i in range(0, len(order), 2)]
        return pairs

    def speaker_draws(self, rng, remaining):
        """One global batch's speakers (positions in `remaining`, the pairs each has left)."""
        size = self.batch_size * self.world_size
        return rng.choice(len(remaining), size=size, replace=False, p=remaining / remaining.sum())

    def plan(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        pairs = self.pairs(rng)
        speakers = sorted(pairs)
        remaining = np.array([len(pairs[s]) for s in speakers], dtype=np.float64)
        batches = []
        while np.count_nonzero(remaining) >= self.batch_size * self.world_size:
            batch = []
            for k in self.speaker_draws(rng, remaining):
                remaining[k] -= 1
                batch.append(pairs[speakers[k]][int(remaining[k])])
            batches.append(batch)
        part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return np.array(batches, dtype=np.int64).reshape(len(batches), self.batch_size * self.world_size, 2)[:, part]


class HardNegativePairBatches(SpeakerPairSampler):
    """--sampler chns in --mode clip|blip: SpeakerPairSampler's batches of distinct speakers, each pair used
    at most once, but each process's batch takes `hard` of its speakers from one of the `groups` (speakers
    whose classifier weights lie close together; the group drawn in proportion to its pairs left, its speakers
    in proportion to theirs), then the rest as SpeakerPairSampler draws them. The InfoNCE negatives of those
    speakers are then each other: hard negatives, the paper's setting. A pure function of (seed, epoch, groups)."""

    def __init__(self, labels, batch_size, grouping, seed, world_size=1, rank=0):
        super().__init__(labels, batch_size, seed, world_size, rank)
        self.grouping = grouping
        self.group_numbers = None

    def plan_key(self):
        return self.epoch, self.grouping.groups

    def plan(self):
        self.group_numbers = self.grouping.group_of()
        return super().plan()

    def speaker_draws(self, rng, remaining):
        """Each process's `hard` speakers from one group, then the rest, none taken twice in the step."""
        taken = np.zeros(len(remaining), dtype=bool)
        order = []
        for _ in range(self.world_size):
            open_ = (remaining > 0) & ~taken
            groups = len(self.grouping.groups)
            per_group = np.bincount(self.group_numbers, weights=remaining * open_, minlength=groups)
            group = rng.choice(groups, p=per_group / per_group.sum())
            members = np.flatnonzero(open_ & (self.group_numbers == group))
            hard = self.draw(rng, members, min(self.grouping.hard, len(members)), remaining)
            taken[hard] = True
            easy = self.draw(rng, np.flatnonzero((remaining > 0) & ~taken), self.batch_size - len(hard), remaining)
            taken[easy] = True
            order += [int(k) for k in hard] + [int(k) for k in easy]
        return order

    @staticmethod
    def draw(rng, candidates, count, remaining):
        weights = remaining[candidates]
        return rng.choice(candidates, size=count, replace=False, p=weights / weights.sum())
