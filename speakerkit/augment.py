"""Additive noise and reverberation, on the CPU in loader workers (`Augmenter`) or on the training device
batch by batch (`DeviceAugmenter`, --gpu_augment), with the same kinds, probabilities and SNR ranges.

  MUSAN_CATEGORIES  -> the one table of MUSAN categories: SNR range and how many files one draw adds
  AUGMENTATIONS     -> each kind drawn (uniformly) and the MUSAN categories it adds, in order
  SignalBank        -> MUSAN/RIR files decoded and resampled once, kept in a memory-mapped cache
  mix_at_snr, reverberate -> the two operations, on one signal (snr_gain: the scale both augmenters use)

A module of its own because both augmenters share the tables and banks, and dataLoader.py stays the path
from a list line to a crop.
"""

import glob
import hashlib
import json
import os
from typing import NamedTuple

import numpy as np
import scipy.fft
import torch

from speakerkit.checkpoints import atomic_json_save, atomic_write, remove_partial_writes
from speakerkit.dataLoader import audio_problem, random_crop, read_audio
from speakerkit.errors import UserError


class NoiseCategory(NamedTuple):
    snr_db: tuple       # (low, high) of the uniformly drawn SNR
    files_added: tuple  # (low, high) of how many of the category's files one draw adds


# In this order the device augmenter draws its categories' noise.
MUSAN_CATEGORIES = {'noise': NoiseCategory((0.0, 15.0), (1, 1)), 'speech': NoiseCategory((13.0, 20.0), (3, 8)),
                    'music': NoiseCategory((5.0, 15.0), (1, 1))}
AUGMENTATIONS = {'clean': (), 'reverb': (), 'noise': ('noise',), 'babble': ('speech',), 'music': ('music',),
                 'babble+music': ('speech', 'music')}


def default_cache_dir():
    return os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'ecapa-toolkit')


class SignalBank:
    """Many short files (noise, music, babble speech, impulse responses), decoded and resampled once into
    one float32 memory-mapped file under `cache_dir`. The file is named by a hash of the paths, their sizes
    and modification times and the rate, so a changed set is decoded again. Worker processes share the
    pages instead of each holding a copy. Files that cannot be used (unreadable, empty, NaN or infinite
    samples, all zeros) are left out and listed in `skipped` as (path, why); `source` names the set in errors."""

    VERSION = 2  # of the cached format: banks of version 1 kept unusable files

    def __init__(self, files, sampling_rate, cache_dir, source):
        if not files:
            raise ValueError("a signal bank needs at least one file")
        key = hashlib.sha1(json.dumps(
            [self.VERSION, sampling_rate] + [(p, os.path.getsize(p), os.path.getmtime(p)) for p in sorted(files)]
        ).encode()).hexdigest()[:16]
        base = os.path.join(cache_dir, f'bank-{key}')
        stored = self._stored(base)
        if stored is None:  # not built yet, or its files were damaged since
            if os.path.isdir(cache_dir):
                remove_partial_writes(cache_dir, ('bank-*.f32', 'bank-*.json'), idle_seconds=3600)
            self._build(sorted(files), base, sampling_rate)
            stored = self._stored(base)
        self.files, self.offsets, self.skipped = stored['files'], stored['offsets'], stored['skipped']
        if not self.files:
            raise UserError(f'{source}: none of its {len(self.skipped)} files is usable, e.g. '
                            + '; '.join(f'{path} ({why})' for path, why in self.skipped[:3]))
        self.path = base + '.f32'
        self.samples = np.memmap(self.path, dtype=np.float32, mode='r')

    def __getstate__(self):
        # Sent to a worker process as the file name; the worker maps the same pages.
        return {k: v for k, v in self.__dict__.items() if k != 'samples'}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.samples = np.memmap(self.path, dtype=np.float32, mode='r')

    @staticmethod
    def _stored(base):
        """The JSON of the bank at `base` when it and its samples file are whole, else None."""
        try:
            with open(base + '.json') as f:
                stored = json.load(f)
            whole = os.path.getsize(base + '.f32') == 4 * stored['offsets'][-1]
            return stored if whole and {'files', 'skipped'} <= stored.keys() else None
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    @staticmethod
    def _build(files, base, sampling_rate):
        """Decode every usable file into `base`.f32, then write `base`.json (the offsets, the files kept and
        those skipped): the JSON file appears last, so a bank whose JSON exists is complete."""
        offsets, kept, skipped = [0], [], []

        def write_samples(out):
            for path in files:
                try:
                    audio = read_audio(path, sampling_rate)
                except (OSError, RuntimeError, ValueError) as error:  # soundfile's errors are RuntimeErrors
                    skipped.append((path, f'unreadable: {error}'))
                    continue
                problem = audio_problem(audio)
                if problem:
                    skipped.append((path, problem))
                    continue
                out.write(audio.astype(np.float32).tobytes())
                offsets.append(offsets[-1] + len(audio))
                kept.append(path)
        atomic_write(base + '.f32', write_samples)
        atomic_json_save({'offsets': offsets, 'files': kept, 'skipped': skipped}, base + '.json')

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return np.asarray(self.samples[self.offsets[i]:self.offsets[i + 1]])


def power(signal):
    """Mean square, accumulated in float64."""
    return np.mean(np.square(signal, dtype=np.float64))


def snr_gain(speech_power, noise_power, snr_db, power_floor=0.0):
    """The power gain that puts noise `snr_db` below speech: (P_speech + floor) / ((P_noise + floor) 10^(snr/10)),
    the true SNR with `power_floor` 0 (the original code adds 1e-4). Numbers or tensors, for both augmenters."""
    return (speech_power + power_floor) / ((noise_power + power_floor) * 10 ** (snr_db / 10))


def mix_at_snr(speech, noise, snr_db, speech_power=None, power_floor=0.0):
    """`noise` scaled by `snr_gain`; a silent noise adds nothing. `speech_power`: P_speech when already known."""
    speech_power = power(speech) if speech_power is None else speech_power
    noise_power = power(noise)
    if noise_power == 0.0:
        return np.zeros_like(noise)
    return (noise * np.sqrt(snr_gain(speech_power, noise_power, snr_db, power_floor))).astype(np.float32)


def normalised_rir(rir):
    """The impulse response scaled to unit energy (float32) and its direct-path delay, the position of its
    largest tap."""
    rir = rir.astype(np.float64)
    return (rir / np.sqrt(np.sum(rir ** 2))).astype(np.float32), int(np.argmax(np.abs(rir)))


def fft_convolve(a, b):
    """The full linear convolution of two 1-D signals through real FFTs of a fast length (what scipy.signal's
    fftconvolve computes, to the bit; scipy.signal itself takes 2 s to import)."""
    full = len(a) + len(b) - 1
    size = scipy.fft.next_fast_len(full, real=True)
    return scipy.fft.irfft(scipy.fft.rfft(a, size) * scipy.fft.rfft(b, size), size)[:full]


def reverberate(audio, rir):
    """Convolve with the energy-normalised impulse response, keeping the result aligned with the dry
    signal (shifted back by the direct-path delay)."""
    rir, delay = normalised_rir(rir)
    wet = fft_convolve(audio, rir)
    return wet[delay:delay + len(audio)].astype(np.float32)


def musan_files(musan_path):
    """MUSAN split layout `<category>/<subset>/<stem>/*.wav` -> {category: [files]}."""
    files = {}
    for path in sorted(glob.glob(os.path.join(musan_path, '*', '*', '*', '*.wav'))):
        files.setdefault(os.path.relpath(path, musan_path).split(os.sep)[0], []).append(path)
    return files


def rir_files(rir_path):
    """RIRS_NOISES layout `<room type>/<room>/*.wav` below `rir_path`."""
    return sorted(glob.glob(os.path.join(rir_path, '*', '*', '*.wav')))


class Augmenter:
    """Picks one of `AUGMENTATIONS` uniformly and applies it. `musan_path`/`rir_path` may be None; the
    kinds that would need them are then not drawn. `skipped`: the (path, why) of the banks' unusable files.
    `power_floor` (--noise_power_floor): added to both powers of each SNR, as the original code adds 1e-4."""

    def __init__(self, musan_path, rir_path, sampling_rate, cache_dir, power_floor=0.0):
        self.power_floor = power_floor
        self.noise_banks = {}
        if musan_path:
            found = musan_files(musan_path)
            missing = [c for c in MUSAN_CATEGORIES if c not in found]
            if missing:
                raise UserError(
                    f"--musan_path {musan_path}: no <category>/<subset>/<stem>/*.wav files for {missing}")
            self.noise_banks = {category: SignalBank(found[category], sampling_rate, cache_dir,
                                                     f'--musan_path {musan_path} ({category})')
                                for category in MUSAN_CATEGORIES}
        self.rir_bank = None
        if rir_path:
            files = rir_files(rir_path)
            if not files:
                raise UserError(f"--rir_path {rir_path}: no <room type>/<room>/*.wav files")
            self.rir_bank = SignalBank(files, sampling_rate, cache_dir, f'--rir_path {rir_path}')
        self.kinds = [k for k in AUGMENTATIONS if self._available(k)]
        self.skipped = [problem for bank in (*self.noise_banks.values(), self.rir_bank) if bank
                        for problem in bank.skipped]

    def _available(self, kind):
        if kind == 'reverb':
            return self.rir_bank is not None
        return kind == 'clean' or bool(self.noise_banks)

    def reverb(self, audio, rng):
        return reverberate(audio, self.rir_bank[int(rng.integers(len(self.rir_bank)))])

    def add_noise(self, audio, category, rng):
        """Add `category` noise; returns the mixture and the SNR drawn for each added file."""
        bank = self.noise_banks[category]
        low, high = MUSAN_CATEGORIES[category].files_added
        count = min(int(rng.integers(low, high + 1)), len(bank))
        noise = np.zeros_like(audio)
        snrs = []
        speech_power = power(audio)
        for i in rng.choice(len(bank), size=count, replace=False):
            snr = float(rng.uniform(*MUSAN_CATEGORIES[category].snr_db))
            noise += mix_at_snr(audio, random_crop(bank[int(i)], len(audio), rng), snr, speech_power,
                                self.power_floor)
            snrs.append(snr)
        return audio + noise, snrs

    def apply(self, audio, kind, rng):
        if kind == 'clean':
            return audio
        if kind == 'reverb':
            return self.reverb(audio, rng)
        for category in AUGMENTATIONS[kind]:
            audio = self.add_noise(audio, category, rng)[0]
        return audio

    def __call__(self, audio, rng):
        return self.apply(audio, self.kinds[int(rng.integers(len(self.kinds)))], rng)


class DeviceAugmenter:
    """`Augmenter`'s kinds, probabilities, SNR ranges and noise counts applied to a whole batch on the
    batch's device (--gpu_augment), from copies of its noise and impulse-response banks held there.
    Draws come from a numpy generator on the host; the mixing, cropping and FFT reverberation run as a few
    batched tensor operations, so CPU workers only read and crop. `__call__(audio [B, T], rng)` returns the
    augmented batch; `augment` also returns what was drawn (kinds and each row's SNRs)."""

    def __init__(self, augmenter, device):
        self.kinds = augmenter.kinds
        self.power_floor = augmenter.power_floor
        self.device = torch.device(device)
        self.banks = {category: self._upload(bank) for category, bank in augmenter.noise_banks.items()}
        self.rirs = None
        if augmenter.rir_bank is not None:
            rirs, delays = zip(*(normalised_rir(augmenter.rir_bank[i]) for i in range(len(augmenter.rir_bank))))
            stacked = np.zeros((len(rirs), max(len(r) for r in rirs)), dtype=np.float32)
            for i, rir in enumerate(rirs):
                stacked[i, :len(rir)] = rir
            self.rirs = torch.from_numpy(stacked).to(self.device)
            self.rir_delays = torch.tensor(delays, device=self.device)

    def _upload(self, bank):
        offsets = np.asarray(bank.offsets, dtype=np.int64)
        return {'samples': torch.from_numpy(np.array(bank.samples[:offsets[-1]])).to(self.device),
                'offsets': offsets[:-1], 'lengths': np.diff(offsets)}

    def __call__(self, audio, rng):
        return self.augment(audio, rng)[0]

    def augment(self, audio, rng):
        kinds = [self.kinds[i] for i in rng.integers(len(self.kinds), size=len(audio))]
        snrs = [[] for _ in kinds]
        audio = audio.float()
        rows = [i for i, kind in enumerate(kinds) if kind == 'reverb']
        if rows:
            audio = audio.index_copy(0, self._rows(rows), self.reverberate(audio[rows], rng))
        for category in MUSAN_CATEGORIES:
            rows = [i for i, kind in enumerate(kinds) if category in AUGMENTATIONS[kind]]
            if rows:
                mixed, drawn = self.add_noise(audio[rows], category, rng)
                audio = audio.index_copy(0, self._rows(rows), mixed)
                for row, row_snrs in zip(rows, drawn):
                    snrs[row].extend(row_snrs)
        return audio, {'kinds': kinds, 'snrs': snrs}

    def _rows(self, rows):
        return torch.tensor(rows, device=self.device)

    def reverberate(self, audio, rng):
        """Each row convolved (FFT) with a random normalised RIR, aligned at its largest tap as `reverberate`."""
        chosen = self._rows(rng.integers(len(self.rirs), size=len(audio)).tolist())
        rirs, delays = self.rirs[chosen], self.rir_delays[chosen]
        size = audio.shape[1] + rirs.shape[1] - 1
        wet = torch.fft.irfft(torch.fft.rfft(audio, n=size) * torch.fft.rfft(rirs, n=size), n=size)
        positions = delays[:, None] + torch.arange(audio.shape[1], device=self.device)[None, :]
        return wet.gather(1, positions)

    def add_noise(self, audio, category, rng):
        """Each row plus `category` noise: as many files as MUSAN_CATEGORIES says, drawn without replacement,
        each a random (wrap-padded) crop scaled to its own SNR from the category's range against the row's
        power."""
        bank = self.banks[category]
        files = len(bank['lengths'])
        low, high = MUSAN_CATEGORIES[category].files_added
        counts = np.minimum(rng.integers(low, high + 1, size=len(audio)), files)
        chosen = [rng.choice(files, size=count, replace=False) for count in counts]
        drawn = [rng.uniform(*MUSAN_CATEGORIES[category].snr_db, size=count) for count in counts]
        length = audio.shape[1]
        steps = torch.arange(length, device=self.device)[None, :]
        speech_power = audio.pow(2).mean(dim=1)
        noise = torch.zeros_like(audio)
        for slot in range(int(counts.max())):
            rows = np.flatnonzero(counts > slot)
            picked = np.array([chosen[r][slot] for r in rows])
            index = torch.from_numpy(rows).to(self.device)
            lengths = bank['lengths'][picked]
            starts = np.array([rng.integers(0, max(n, length) - length + 1) for n in lengths])
            offsets, lengths, starts, snr = (torch.from_numpy(a).to(self.device) for a in (
                bank['offsets'][picked], lengths, starts, np.array([drawn[r][slot] for r in rows])))
            crops = bank['samples'][offsets[:, None] + (starts[:, None] + steps) % lengths[:, None]]
            noise_power = crops.pow(2).mean(dim=1)
            scale = torch.sqrt(snr_gain(speech_power[index], noise_power, snr.float(), self.power_floor))
            noise[index] += crops * torch.where(noise_power > 0, scale, torch.zeros_like(scale))[:, None]
        return audio + noise, [list(map(float, d)) for d in drawn]
