"""dataLoader.py: reading, resampling and cropping audio, unusable files, the training datasets and the
epoch samplers."""

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch

from augment import Augmenter
from dataLoader import (SPEED_PERTURBATION, EpochSampler, HardNegativeBatches, HardNegativePairBatches, PairDataset,
                        SpeakerPairSampler, TrainDataset, UnusableAudio, change_speed, collate, end_loader_workers,
                        leave_signals_to_parent, random_crop, read_audio, read_usable_crop, speaker_groups)
from errors import UserError
from lists import TrainEntry, TrainList, read_train_list
from model import crop_samples

RATE = 16000


def tone(freq, seconds, rate=RATE, amplitude=0.3):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_crop_length_matches_frames_and_window():
    assert crop_samples(200, 16000) == 200 * 160 + 240
    assert crop_samples(200, 8000) == 200 * 80 + 120


def test_random_crop_is_a_window_of_the_signal():
    rng = np.random.default_rng(0)
    audio = np.arange(1000, dtype=np.float32)
    for _ in range(20):
        crop = random_crop(audio, 300, rng)
        assert len(crop) == 300
        assert np.array_equal(crop, np.arange(crop[0], crop[0] + 300))


def test_short_signals_are_wrap_padded():
    audio = np.arange(100, dtype=np.float32)
    crop = random_crop(audio, 250, np.random.default_rng(0))
    assert np.array_equal(crop, np.concatenate([audio, audio, audio[:50]]))


def test_file_crop_reads_a_contiguous_window(tmp_path):
    audio = (np.random.default_rng(0).standard_normal(3 * RATE) * 0.1).astype(np.float32)
    path = str(tmp_path / 'a.wav')
    soundfile.write(path, audio, RATE, subtype='FLOAT')
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(10):
        crop = read_usable_crop(path, 8000, RATE, rng)
        start = int(np.flatnonzero(audio == crop[0])[0])
        assert np.array_equal(crop, audio[start:start + 8000])
        starts.add(start)
    assert len(starts) > 5
    short = read_usable_crop(path, 4 * RATE, RATE, rng)
    assert len(short) == 4 * RATE and np.array_equal(short[3 * RATE:], audio[:RATE])


@pytest.mark.parametrize('native_rate', [8000, 44100])
def test_resampling_keeps_pitch_and_duration(tmp_path, native_rate):
    path = str(tmp_path / 'tone.wav')
    soundfile.write(path, tone(440, 1.5, native_rate), native_rate)
    audio = read_audio(path, RATE)
    assert abs(len(audio) - 1.5 * RATE) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(len(audio), 1 / RATE)[np.argmax(spectrum)] == pytest.approx(440, abs=1)


@pytest.mark.parametrize('native_rate', [16001, 999983])
def test_rates_without_a_small_ratio_to_the_target_are_resampled_in_bounded_memory(tmp_path, native_rate):
    """A polyphase filter for 16001 -> 16000 Hz would hold 16000 x 16001 taps (8.8 GB were measured); the
    file is read in a process of its own whose peak memory is measured."""
    path = str(tmp_path / 'odd.wav')
    soundfile.write(path, tone(440, 2.0, native_rate), native_rate)
    script = ('import resource, sys, numpy as np; from dataLoader import read_audio; '
              f'audio = read_audio({path!r}, {RATE}); spectrum = np.abs(np.fft.rfft(audio)); '
              f'print(len(audio), np.fft.rfftfreq(len(audio), 1 / {RATE})[np.argmax(spectrum)], '
              'resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)')
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    length, peak_frequency, peak_bytes = done.stdout.split()
    assert abs(int(length) - 2 * RATE) <= 1 and float(peak_frequency) == pytest.approx(440, abs=1)
    assert int(peak_bytes) < 2 ** 31


def test_a_wav_header_claiming_terabytes_reads_as_the_samples_the_file_holds(tmp_path):
    path = tmp_path / 'claims.wav'
    soundfile.write(path, tone(440, 2.0), RATE, subtype='PCM_16', format='RF64')
    header = bytearray(path.read_bytes())
    at = header.find(b'ds64') + 8  # RF64's 64-bit RIFF size, data size and sample count
    header[at:at + 24] = (2 ** 42).to_bytes(8, 'little') * 2 + (2 ** 41).to_bytes(8, 'little')
    path.write_bytes(bytes(header))
    audio = read_audio(str(path), RATE)
    assert len(audio) == 2 * RATE and np.allclose(audio, tone(440, 2.0), atol=1e-4)


def test_a_header_rate_below_any_usable_audio_is_refused(tmp_path):
    path = str(tmp_path / 'slow.wav')
    soundfile.write(path, tone(100, 2.0, 16000), 8)
    with pytest.raises(ValueError, match='slow.wav: its header gives a sample rate of 8 Hz'):
        read_audio(path, RATE)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(300, 1.0), tone(500, 1.0, amplitude=0.1)
    path = str(tmp_path / 'stereo.wav')
    soundfile.write(path, np.stack([left, right], axis=1), RATE, subtype='FLOAT')
    np.testing.assert_allclose(read_audio(path, RATE), (left + right) / 2, atol=1e-6)


def test_each_kind_of_unusable_file_is_refused_with_its_reason(tmp_path, broken_audio):
    rng = np.random.default_rng(0)
    for name, (write, reason) in broken_audio.items():
        write(str(tmp_path / name))
        with pytest.raises(UnusableAudio, match=reason):
            read_usable_crop(str(tmp_path / name), 8000, 16000, rng)
    silent = read_usable_crop(str(tmp_path / 'silent.wav'), 8000, 16000, rng, skip_silent=False)
    assert silent.shape == (8000,) and not silent.any()


def test_real_odd_files_silence_is_refused_and_other_formats_read_as_mono(shared_data):
    folder = shared_data('odd_audio')
    rng = np.random.default_rng(0)
    with pytest.raises(UnusableAudio, match='silent'):
        read_usable_crop(os.path.join(folder, 'digital_silence.wav'), 16000, 16000, rng)
    for name in ('mono_float64.wav', 'mono_int24.wav', 'mono_int32.wav'):  # a few samples each
        with pytest.raises(UnusableAudio, match='shorter than a 25 ms window'):
            read_usable_crop(os.path.join(folder, name), 16000, 16000, rng)
    for name in ('stereo_16bit.wav', 'stereo_24bit.WAV', 'ms_adpcm.wav', 'signed_24bit.wav', 'p286_011.wav',
                 'testing.m4a', 'bus.opus'):  # AAC through PyAV, decoded whole
        audio = read_usable_crop(os.path.join(folder, name), 16000, 16000, rng)
        assert audio.shape == (16000,) and np.all(np.isfinite(audio)) and audio.any(), name


def test_training_items_replace_unusable_files_by_their_speakers_other_utterances(broken_corpus, broken_audio):
    corpus, _ = broken_corpus
    entries = read_train_list(corpus['train_list'])
    dataset = TrainDataset(entries, corpus['train_path'], 40, 16000, None, seed=3)
    for index, (_, rel, _) in enumerate(entries):
        if rel.startswith('bad/') and rel != 'bad/stereo.wav':
            audio, label, skipped = dataset[(index, 1)]
            name = rel[4:]
            assert label == dataset.labels[index] and np.all(np.isfinite(audio.numpy())) and audio.abs().sum() > 0
            assert skipped[0][0].endswith(rel) and broken_audio[name][1] in skipped[0][1]
    stereo = [e.path for e in entries].index('bad/stereo.wav')
    audio, _, skipped = dataset[(stereo, 1)]
    assert skipped == []
    mono = soundfile.read(os.path.join(corpus['train_path'], 'bad', 'stereo.wav'))[0].mean(axis=1)
    assert np.min(np.abs(np.subtract.outer(audio.numpy()[:5], mono).astype(np.float32)), axis=1).max() < 1e-6
    batch = collate([dataset[(i, 1)] for i in range(len(entries))])
    assert batch[0].shape == (len(entries), dataset.crops.length) and len(batch[1]) == len(entries)
    assert {os.path.basename(path) for path, _ in batch[2]} == set(broken_audio)  # substitutes may be bad too


def test_a_pair_speaker_without_any_usable_utterance_is_an_error_naming_it(tmp_path, broken_audio):
    for name in ('silent.wav', 'nan.wav'):
        broken_audio[name][0](str(tmp_path / name))
    soundfile.write(tmp_path / 'good.wav', np.random.default_rng(0).standard_normal(16000) * 0.1, 16000)
    entries = TrainList.of([TrainEntry('a', 'silent.wav'), TrainEntry('a', 'nan.wav'), TrainEntry('b', 'good.wav')])
    dataset = PairDataset(entries, str(tmp_path), 40, 16000,
                          None, seed=0)
    with pytest.raises(UserError, match="silent.wav: no usable audio among its speaker's utterances"):
        dataset[(0, 1, 1)]
    view_a, view_b, label, skipped = dataset[(2, 2, 1)]
    assert label == 1 and skipped == []


def test_training_items_are_reproducible_per_epoch(tiny_corpus, cache_dir):
    entries = read_train_list(tiny_corpus['train_list'])
    augmenter = Augmenter(tiny_corpus['musan_path'], tiny_corpus['rir_path'], RATE, cache_dir)
    dataset = TrainDataset(entries, tiny_corpus['train_path'], 100, RATE, augmenter, seed=3)
    first, label, skipped = dataset[(4, 1)]
    assert first.shape == (crop_samples(100, RATE),) and label == dataset.labels[4] and skipped == []
    assert np.array_equal(first, dataset[(4, 1)][0])
    assert not np.array_equal(first, dataset[(4, 2)][0])


def test_epoch_sampler_shards_are_disjoint_and_equally_long():
    whole = [i for i, _ in EpochSampler(11, seed=3)]
    shards = [[i for i, _ in EpochSampler(11, seed=3, world_size=3, rank=r)] for r in range(3)]
    assert sorted(whole) == list(range(11))
    assert [len(s) for s in shards] == [3, 3, 3]
    assert sorted(sum(shards, [])) == sorted(whole[:9])


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


@pytest.mark.parametrize('name', ['stereo_24bit.WAV', 'stereo_16bit.wav', 'mono_int24.wav', 'mono_int32.wav',
                                  'mono_float64.wav', 'signed_24bit.wav'])
def test_real_files_of_every_depth_and_layout_read_as_mono(shared_data, name):
    path = shared_data('odd_audio', name)
    audio = read_audio(path, 16000)
    info = soundfile.info(path)
    assert audio.ndim == 1 and audio.dtype == np.float32 and np.all(np.isfinite(audio))
    assert abs(len(audio) - info.frames * 16000 / info.samplerate) <= 1


def test_real_eight_kilohertz_digits_are_resampled(shared_data):
    path = shared_data('fsdd', 'recordings', '0_george_0.wav')
    assert soundfile.info(path).samplerate == 8000
    audio = read_audio(path, 16000)
    assert len(audio) == pytest.approx(2 * soundfile.info(path).frames, abs=1)


class Stuck(torch.utils.data.Dataset):
    """Item 0 at once; every other item only after an hour, as a read from a file system that stopped."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i:
            time.sleep(3600)
        return i


class StartMarked:
    """A worker start that leaves signals to the parent, then marks the start with a file: the test signals
    the workers only once both have set their handlers (a worker signalled sooner dies of the default one)."""

    def __init__(self, folder):
        self.folder = folder

    def __call__(self, worker_id):
        leave_signals_to_parent(worker_id)
        (self.folder / f'started{worker_id}').touch()


def test_loader_workers_left_stuck_are_ended_at_exit_though_they_ignore_sigterm(tmp_path):
    loader = torch.utils.data.DataLoader(Stuck(), num_workers=2, worker_init_fn=StartMarked(tmp_path))
    batches = iter(loader)
    assert next(batches).tolist() == [0]
    waited = time.time()
    while len(list(tmp_path.glob('started*'))) < 2 and time.time() - waited < 60:
        time.sleep(0.05)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)  # what terminate() sends: ignored
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    started = time.time()
    end_loader_workers()
    assert not multiprocessing.active_children() and time.time() - started < 30
    del batches


def dominant_frequency(audio, rate):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.argmax(spectrum) * rate / len(audio)


def test_change_speed_plays_faster_by_the_factor_in_pitch_and_duration():
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
    for speed in (0.9, 1.1):
        faster = change_speed(tone, speed)
        assert abs(len(faster) - 16000 / speed) <= 1
        assert abs(dominant_frequency(faster, 16000) - 500 * speed) < 3, speed


def test_speed_perturbed_items_have_the_crop_length_and_one_speaker_label_per_speed(tmp_path):
    """Speaker s at the k-th speed is class s + k * speakers; its crop is the utterance played k-th speed times
    faster (a 400 Hz tone of speaker 0 and 700 Hz of speaker 1 come out at 400 or 700 times that speed)."""
    t = np.arange(3 * 16000) / 16000
    entries = []
    for speaker, pitch in (('a', 400), ('b', 700)):
        for n in range(2):
            soundfile.write(tmp_path / f'{speaker}{n}.wav', 0.3 * np.sin(2 * np.pi * pitch * t), 16000)
            entries.append(TrainEntry(speaker, f'{speaker}{n}.wav'))
    entries = TrainList.of(entries)
    plain = TrainDataset(entries, str(tmp_path), 100, 16000, None, seed=5)
    perturbed = TrainDataset(entries, str(tmp_path), 100, 16000, None, seed=5, speeds=SPEED_PERTURBATION)
    seen = set()
    for epoch in range(1, 13):
        for index in range(len(entries)):
            audio, label, _ = perturbed[(index, epoch)]
            speaker, k = label % 2, label // 2
            assert speaker == plain.labels[index] and audio.shape == (plain.crops.length,)
            pitch = (400, 700)[speaker] * SPEED_PERTURBATION[k]
            assert abs(dominant_frequency(audio.numpy(), 16000) - pitch) < 4, (label, pitch)
            seen.add(label)
    assert seen == set(range(6))
    assert all(plain[(i, 1)][1] == plain.labels[i] for i in range(len(entries)))
    pair = PairDataset(entries, str(tmp_path), 100, 16000, None, seed=5, speeds=SPEED_PERTURBATION)
    for epoch in range(1, 7):
        view_a, view_b, label, _ = pair[(0, 1, epoch)]
        pitch = 400 * SPEED_PERTURBATION[label // 2]
        assert abs(dominant_frequency(view_a.numpy(), 16000) - pitch) < 4
        assert abs(dominant_frequency(view_b.numpy(), 16000) - pitch) < 4


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
    sampler = HardNegativeBatches(labels, batch, 0.5, seed=3)
    sampler.set_epoch(2)
    sampler.groups = sampler.group_speakers(torch.from_numpy(clustered_centres(4, 5)))
    items = [i for i, epoch in sampler]
    plain = [i for i, _ in EpochSampler(len(labels), seed=3)]
    assert sorted(items) == sorted(plain) == list(range(len(labels)))  # each utterance once, as plain
    group_of = {s: g for g, members in enumerate(sampler.groups) for s in members}
    within_one_group, distinct = 0, 0
    for start in range(0, len(items), batch):
        hard = [labels[i] for i in items[start:start + sampler.hard]]
        assert len({group_of[s] for s in hard}) <= 2  # random batches of 5 from 4 groups span 3 on average
        within_one_group += len({group_of[s] for s in hard}) == 1
        distinct += len(set(hard))
    assert within_one_group >= len(items) // batch // 2
    assert distinct >= 0.7 * sampler.hard * (len(items) // batch)  # speakers take turns within a group
    assert items == [i for i, _ in sampler]  # a pure function of (seed, epoch, groups)
    sampler.set_epoch(2, skip=2 * batch)
    assert [i for i, _ in sampler] == items[2 * batch:] and len(sampler) == len(items) - 2 * batch
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != items


def test_hard_negative_batches_of_torchrun_ranks_are_disjoint_and_equally_long():
    labels = [s for s in range(12) for _ in range(5)]
    ranks = [HardNegativeBatches(labels, 4, 0.5, seed=1, world_size=2, rank=r) for r in range(2)]
    parts = [[i for i, _ in sampler] for sampler in ranks]
    assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == 60 // 2 // 4 * 4
    assert not set(parts[0]) & set(parts[1])


def test_hard_negative_pair_batches_take_part_of_each_batch_from_one_group_of_distinct_speakers():
    speakers, utterances, batch = 20, 8, 6
    labels = [s for s in range(speakers) for _ in range(utterances)]
    plain = SpeakerPairSampler(labels, batch, seed=2)
    sampler = HardNegativePairBatches(labels, batch, 0.5, seed=2)
    for epoch in (1, 2):
        for each in (plain, sampler):
            each.set_epoch(epoch)
        sampler.groups = sampler.group_speakers(torch.from_numpy(clustered_centres(4, 5)))
        group_of = {s: g for g, members in enumerate(sampler.groups) for s in members}
        batches = list(sampler)
        used = [pair[:2] for b in batches for pair in b]
        assert len(set(used)) == len(used)  # each pair at most once
        per_speaker = np.bincount([labels[a] for a, _ in used], minlength=speakers)
        plain_per_speaker = np.bincount([labels[a] for b in plain for a, _, _ in b], minlength=speakers)
        assert abs(len(batches) - len(list(plain))) <= 1 and np.abs(per_speaker - plain_per_speaker).max() <= 1
        one_group = 0
        for b in batches:
            speakers_of = [labels[a] for a, _, _ in b]
            assert len(set(speakers_of)) == batch and all(labels[a] == labels[c] for a, c, _ in b)
            one_group += len({group_of[s] for s in speakers_of[:sampler.hard]}) == 1
        assert one_group >= len(batches) // 2  # random batches: almost never (groups of 3 among 20 speakers)
        assert list(sampler) == batches
    ranks = [HardNegativePairBatches(labels, 3, 0.5, seed=2, world_size=2, rank=r) for r in range(2)]
    for rank_batches in zip(*[list(r) for r in ranks]):
        assert len({labels[a] for b in rank_batches for a, _, _ in b}) == 6  # no speaker twice in a step
