"""augment.py: noise at the drawn SNRs, babble, reverberation, the signal banks, and the device augmenter's
agreement with the CPU one."""

import os
import pickle

import numpy as np
import pytest
import soundfile
import torch

from speakerkit import augment
from speakerkit.augment import (MUSAN_CATEGORIES, Augmenter, DeviceAugmenter, SignalBank, fft_convolve, mix_at_snr,
                                reverberate, snr_gain)
from speakerkit.dataLoader import read_audio
from speakerkit.errors import UserError

RATE = 16000


def snr_db(clean, mixed):
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((mixed - clean).astype(np.float64) ** 2))


def tone(freq, seconds, rate=RATE, amplitude=0.3):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture
def banks(tmp_path):
    """A MUSAN-style tree (white noise, tones as music, tones at distinct pitches as babble) and RIRs."""
    rng = np.random.default_rng(0)
    musan = tmp_path / 'musan'
    for k in range(3):
        for category, audio in (('noise', 0.1 * rng.standard_normal(5 * RATE).astype(np.float32)),
                                ('music', tone(220 * (k + 1), 5)),):
            path = musan / category / 'sub' / f'{category}{k}' / '00000.wav'
            path.parent.mkdir(parents=True)
            soundfile.write(path, audio, RATE, subtype='FLOAT')
    for k in range(10):
        path = musan / 'speech' / 'sub' / f'speech{k}' / '00000.wav'
        path.parent.mkdir(parents=True)
        soundfile.write(path, tone(1000 + 137 * k, 5), RATE, subtype='FLOAT')
    rirs = tmp_path / 'rirs'
    for k in range(2):
        rir = np.zeros(4000, dtype=np.float32)
        rir[40 + k] = 1.0
        rir[41 + k:] = 0.2 * rng.standard_normal(4000 - 41 - k) * np.exp(-np.arange(4000 - 41 - k) / 600)
        path = rirs / 'smallroom' / f'Room{k}' / 'rir.wav'
        path.parent.mkdir(parents=True)
        soundfile.write(path, rir, RATE, subtype='FLOAT')
    return str(musan), str(rirs)


def speech_like(seconds=2.0, seed=1):
    rng = np.random.default_rng(seed)
    return (tone(150, seconds) * (1 + 0.5 * np.sin(np.arange(int(seconds * RATE)) / 800))
            + 0.01 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def test_noise_and_music_are_added_at_the_drawn_snr(banks, cache_dir):
    augmenter = Augmenter(*banks, RATE, cache_dir)
    speech = speech_like()
    for category in ('noise', 'music'):
        for seed in range(10):
            mixed, snrs = augmenter.add_noise(speech, category, np.random.default_rng(seed))
            low, high = MUSAN_CATEGORIES[category].snr_db
            assert len(snrs) == 1 and low <= snrs[0] <= high
            assert snr_db(speech, mixed) == pytest.approx(snrs[0], abs=0.5)


def test_babble_mixes_several_speakers_each_at_its_snr(banks, cache_dir):
    augmenter = Augmenter(*banks, RATE, cache_dir)
    speech = speech_like()
    counts = set()
    for seed in range(10):
        mixed, snrs = augmenter.add_noise(speech, 'speech', np.random.default_rng(seed))
        low, high = MUSAN_CATEGORIES['speech'].files_added
        assert low <= len(snrs) <= high
        assert all(13 <= s <= 20 for s in snrs)
        counts.add(len(snrs))
        # The babble files are tones at distinct pitches, so their powers add up.
        expected_noise_power = sum(np.mean(speech.astype(np.float64) ** 2) * 10 ** (-s / 10) for s in snrs)
        expected = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / expected_noise_power)
        assert snr_db(speech, mixed) == pytest.approx(expected, abs=0.5)
    assert len(counts) > 1


def test_fft_convolution_is_the_direct_convolution():
    rng = np.random.default_rng(3)
    for n, m in [(1000, 7), (3001, 2000), (1, 1)]:
        a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(m).astype(np.float32)
        np.testing.assert_allclose(fft_convolve(a, b), np.convolve(a.astype(np.float64), b), atol=1e-4)


def test_reverb_with_a_delayed_impulse_is_the_dry_signal():
    audio = speech_like()
    rir = np.zeros(500, dtype=np.float32)
    rir[123] = 0.5
    np.testing.assert_allclose(reverberate(audio, rir), audio, atol=1e-6)


def test_reverb_is_aligned_and_energy_normalised(banks, cache_dir):
    augmenter = Augmenter(*banks, RATE, cache_dir)
    audio = (0.1 * np.random.default_rng(5).standard_normal(2 * RATE)).astype(np.float32)
    wet = augmenter.reverb(audio, np.random.default_rng(0))
    assert len(wet) == len(audio) and not np.allclose(wet, audio)
    lags = range(-60, 61)
    correlation = [np.dot(np.roll(wet, -lag), audio) for lag in lags]
    assert list(lags)[int(np.argmax(correlation))] == 0
    # Unit-energy RIR with a dominant direct path: the level stays within a few dB.
    assert abs(10 * np.log10(np.mean(wet ** 2) / np.mean(audio ** 2))) < 3


def test_every_augmentation_kind_changes_the_signal(banks, cache_dir):
    augmenter = Augmenter(*banks, RATE, cache_dir)
    assert augmenter.kinds == ['clean', 'reverb', 'noise', 'babble', 'music', 'babble+music']
    audio = speech_like()
    for kind in augmenter.kinds:
        out = augmenter.apply(audio, kind, np.random.default_rng(0))
        assert out.shape == audio.shape and out.dtype == np.float32 and np.all(np.isfinite(out))
        assert np.array_equal(out, audio) == (kind == 'clean')


def speech_batch(rows, seconds=2.0):
    return torch.from_numpy(np.stack([speech_like(seconds, seed) * (1 + seed % 3) for seed in range(rows)]))


def batch_snr_db(clean, mixed):
    return [snr_db(c, m) for c, m in zip(clean.numpy(), mixed.numpy())]


@pytest.mark.parametrize('seconds', [2.0, 6.0])  # 6 s crops wrap the 5 s noise files
def test_device_noise_and_music_are_added_at_the_drawn_snr(banks, cache_dir, seconds):
    device_augmenter = DeviceAugmenter(Augmenter(*banks, RATE, cache_dir), 'cpu')
    clean = speech_batch(12, seconds)
    for category in ('noise', 'music'):
        mixed, snrs = device_augmenter.add_noise(clean, category, np.random.default_rng(3))
        low, high = MUSAN_CATEGORIES[category].snr_db
        assert all(len(s) == 1 and low <= s[0] <= high for s in snrs)
        assert len({round(s[0], 3) for s in snrs}) == len(snrs)
        np.testing.assert_allclose(batch_snr_db(clean, mixed), [s[0] for s in snrs], atol=0.05)


def test_device_babble_mixes_several_speakers_each_at_its_snr(banks, cache_dir):
    device_augmenter = DeviceAugmenter(Augmenter(*banks, RATE, cache_dir), 'cpu')
    clean = speech_batch(16)
    mixed, snrs = device_augmenter.add_noise(clean, 'speech', np.random.default_rng(4))
    low, high = MUSAN_CATEGORIES['speech'].files_added
    assert all(low <= len(s) <= high for s in snrs) and len({len(s) for s in snrs}) > 1
    for row, row_snrs in enumerate(snrs):
        assert all(13 <= s <= 20 for s in row_snrs)
        power = np.mean(clean[row].double().numpy() ** 2)
        expected = 10 * np.log10(power / sum(power * 10 ** (-s / 10) for s in row_snrs))
        assert snr_db(clean[row].numpy(), mixed[row].numpy()) == pytest.approx(expected, abs=0.5)


def test_device_reverb_equals_the_cpu_reverb(banks, cache_dir):
    augmenter = Augmenter(*banks, RATE, cache_dir)
    clean = speech_batch(6)
    wet = DeviceAugmenter(augmenter, 'cpu').reverberate(clean, np.random.default_rng(7))
    chosen = np.random.default_rng(7).integers(len(augmenter.rir_bank), size=len(clean))
    for row, rir in enumerate(chosen):
        np.testing.assert_allclose(wet[row].numpy(), reverberate(clean[row].numpy(), augmenter.rir_bank[int(rir)]),
                                   atol=1e-5)


def test_device_augmentation_draws_kinds_as_the_cpu_path(banks, cache_dir):
    device_augmenter = DeviceAugmenter(Augmenter(*banks, RATE, cache_dir), 'cpu')
    clean = speech_batch(600, seconds=0.5)
    mixed, drawn = device_augmenter.augment(clean, np.random.default_rng(5))
    counts = {kind: drawn['kinds'].count(kind) for kind in device_augmenter.kinds}
    assert all(60 <= c <= 140 for c in counts.values()), counts  # 100 expected each; binomial sd about 9
    expected_snrs = {'clean': (0, 0), 'reverb': (0, 0), 'noise': (1, 1), 'music': (1, 1), 'babble': (3, 8),
                     'babble+music': (4, 9)}
    for row, (kind, snrs) in enumerate(zip(drawn['kinds'], drawn['snrs'])):
        assert expected_snrs[kind][0] <= len(snrs) <= expected_snrs[kind][1]
        assert torch.equal(mixed[row], clean[row]) == (kind == 'clean')
        assert torch.isfinite(mixed[row]).all()
    again, _ = device_augmenter.augment(clean, np.random.default_rng(5))
    assert torch.equal(mixed, again)


def test_banks_decode_once_and_match_the_files(banks, cache_dir, monkeypatch):
    musan, _ = banks
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(musan, 'music')) for f in fs)
    bank = SignalBank(files, 8000, cache_dir, 'test files')
    for i, path in enumerate(files):
        np.testing.assert_array_equal(bank[i], read_audio(path, 8000))
    monkeypatch.setattr(SignalBank, '_build', lambda *a: pytest.fail('decoded again'))
    again = SignalBank(files, 8000, cache_dir, 'test files')
    np.testing.assert_array_equal(again[1], bank[1])
    # Workers receive the file name, not a copy of the samples.
    shipped = pickle.dumps(bank)
    assert len(shipped) < bank.samples.nbytes / 10
    np.testing.assert_array_equal(pickle.loads(shipped)[2], bank[2])


def test_missing_musan_categories_are_reported(tmp_path, cache_dir):
    (tmp_path / 'noise' / 'a' / 'b').mkdir(parents=True)
    soundfile.write(tmp_path / 'noise' / 'a' / 'b' / 'x.wav', tone(100, 0.5), RATE)
    with pytest.raises(UserError, match=r"--musan_path .*: no <category>/<subset>/<stem>/\*.wav files for "
                                        r"\['speech', 'music'\]"):
        Augmenter(str(tmp_path), None, RATE, cache_dir)
    (tmp_path / 'rirs').mkdir()
    with pytest.raises(UserError, match='--rir_path .*rirs: no <room type>/<room>/'):
        Augmenter(None, str(tmp_path / 'rirs'), RATE, cache_dir)


def test_unusable_noise_and_impulse_response_files_are_named_and_left_out_of_their_banks(banks, cache_dir):
    musan, rirs = banks
    broken = {os.path.join(musan, 'noise', 'sub', 'noise0', '00001.wav'): np.full(RATE, np.nan, np.float32),
              os.path.join(musan, 'music', 'sub', 'music0', '00001.wav'): np.zeros(RATE, np.float32),
              os.path.join(rirs, 'smallroom', 'Room0', 'zero.wav'): np.zeros(4000, np.float32)}
    for path, audio in broken.items():
        soundfile.write(path, audio, RATE, subtype='FLOAT')
    undecodable = os.path.join(rirs, 'smallroom', 'Room1', 'bad.wav')
    with open(undecodable, 'wb') as f:
        f.write(b'RIFF not really a wave file')
    augmenter = Augmenter(musan, rirs, RATE, cache_dir)
    reasons = dict(augmenter.skipped)
    assert sorted(reasons) == sorted([*broken, undecodable])
    assert reasons[os.path.join(musan, 'noise', 'sub', 'noise0', '00001.wav')] == 'NaN or infinite samples'
    assert reasons[os.path.join(rirs, 'smallroom', 'Room0', 'zero.wav')].startswith('silent')
    assert reasons[undecodable].startswith('unreadable')
    assert len(augmenter.noise_banks['noise']) == 3 and len(augmenter.rir_bank) == 2
    rng = np.random.default_rng(0)
    for _ in range(20):  # every kind draws only usable files now
        assert np.isfinite(augmenter(speech_like(), rng)).all()
    for path in rir_files_of(rirs):
        if path not in broken and path != undecodable:
            os.remove(path)
    with pytest.raises(UserError, match=r'--rir_path .*rirs: none of its 2 files is usable, e\.g\. .*bad\.wav'):
        Augmenter(None, rirs, RATE, cache_dir)


def rir_files_of(rirs):
    return [os.path.join(d, f) for d, _, fs in os.walk(rirs) for f in fs]


def test_a_bank_build_cut_short_leaves_nothing_after_the_next_build(banks, cache_dir):
    musan, _ = banks
    Augmenter(musan, None, RATE, cache_dir)
    stale = os.path.join(cache_dir, '.bank-0123456789abcdef.f32.k2j3h4')  # as a killed build leaves it
    live = os.path.join(cache_dir, '.bank-fedcba9876543210.f32.a1b2c3')   # another run building right now
    for path in (stale, live):
        with open(path, 'wb') as f:
            f.write(b'\0' * 1024)
    os.utime(stale, (0, 0))
    new_noise = os.path.join(musan, 'noise', 'sub', 'noise9', '00000.wav')
    os.makedirs(os.path.dirname(new_noise))
    soundfile.write(new_noise, speech_like(), RATE)  # a changed set: its bank is built
    Augmenter(musan, None, RATE, cache_dir)
    assert not os.path.exists(stale) and os.path.exists(live)


@pytest.mark.parametrize('damage', ['truncated samples', 'corrupt JSON'])
def test_a_damaged_bank_in_the_cache_is_built_again(banks, cache_dir, damage):
    musan, _ = banks
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(musan, 'music')) for f in fs)
    bank = SignalBank(files, RATE, cache_dir, 'test files')
    if damage == 'truncated samples':
        os.truncate(bank.path, os.path.getsize(bank.path) // 2)
    else:
        with open(bank.path[:-len('.f32')] + '.json', 'w') as f:
            f.write('{"offsets": [0, ')
    again = SignalBank(files, RATE, cache_dir, 'test files')
    for i, path in enumerate(files):
        np.testing.assert_array_equal(again[i], read_audio(path, RATE))


def test_a_power_floor_mixes_quiet_noise_below_the_drawn_snr_as_the_original_code_does(banks, cache_dir,
                                                                                        monkeypatch):
    rng = np.random.default_rng(0)
    speech = (0.05 * rng.standard_normal(32000)).astype(np.float32)
    noise = (0.003 * rng.standard_normal(32000)).astype(np.float32)  # power 9e-6, under the original's 1e-4
    assert abs(snr_db(speech, speech + mix_at_snr(speech, noise, 15.0)) - 15.0) < 0.01
    floored = mix_at_snr(speech, noise, 15.0, power_floor=1e-4)
    clean_db = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) + 1e-4)  # the original's formula
    noise_db = 10 * np.log10(np.mean(noise.astype(np.float64) ** 2) + 1e-4)
    np.testing.assert_allclose(floored, np.sqrt(10 ** ((clean_db - noise_db - 15.0) / 10)) * noise, rtol=1e-5)
    assert snr_db(speech, speech + floored) > 25.0
    gains = snr_gain(torch.tensor([2.5e-3]), torch.tensor([9e-6]), torch.tensor([15.0]), 1e-4)
    torch.testing.assert_close(gains, torch.tensor([snr_gain(2.5e-3, 9e-6, 15.0, 1e-4)]))
    floors = []
    monkeypatch.setattr(augment, 'snr_gain', lambda *args: floors.append(args[3]) or snr_gain(*args))
    device = DeviceAugmenter(Augmenter(*banks, RATE, cache_dir, power_floor=1e-4), 'cpu')
    device.add_noise(speech_batch(6), 'speech', np.random.default_rng(1))
    assert floors and set(floors) == {1e-4}  # the device augmenter scales with the same floor
