"""dataLoader.py: reading, resampling and cropping audio, unusable files, the training datasets and the
epoch samplers."""

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

from speakerkit.augment import Augmenter
from speakerkit.dataLoader import (SPEED_PERTURBATION, PairDataset, TrainDataset, UnusableAudio, change_speed, collate,
                                   end_loader_workers, leave_signals_to_parent, random_crop, read_audio,
                                   read_usable_crop)
from speakerkit.errors import UserError
from speakerkit.lists import TrainEntry, TrainList, read_train_list
from speakerkit.model import crop_samples

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
    assert batch.views[0].shape == (len(entries), dataset.crops.length) and len(batch.labels) == len(entries)
    assert {os.path.basename(path) for path, _ in batch.skipped} == set(broken_audio)  # substitutes may be bad too


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
