"""From a list file to training examples: read, resample, crop, augment.

Stages, each usable alone:
  train_list_rows   -> (line, speaker, relative path) rows, with the line of any malformed entry named;
                       parse_train_list drops the line numbers
  read_audio        -> mono float32 at the target rate, reading only the frames asked for
  random_crop       -> a fixed-length window, wrap-padded when the file is short
  read_usable_crop  -> a crop, or `UnusableAudio` saying why the file cannot train (unreadable, empty,
                       shorter than a 25 ms window, non-finite samples, silent); datasets then use another
                       utterance and report the skipped file with the batch (`collate`)
  SignalBank        -> MUSAN/RIR files decoded and resampled once, kept in a memory-mapped cache
  Augmenter         -> clean / reverb / noise / babble / music / babble+music at drawn SNRs
  DeviceAugmenter   -> the same draws applied to a whole batch on the GPU (--gpu_augment)
  TrainDataset      -> (waveform, label) with randomness seeded by (seed, epoch, index)
Features are not computed here: the model computes them.
"""

import functools
import glob
import hashlib
import json
import math
import os

import numpy as np
import soundfile
import torch
import torchaudio
from scipy.signal import fftconvolve

from model import crop_samples

SNR_RANGES = {'noise': (0.0, 15.0), 'speech': (13.0, 20.0), 'music': (5.0, 15.0)}
NOISE_COUNTS = {'noise': (1, 1), 'speech': (3, 8), 'music': (1, 1)}
AUGMENTATIONS = ('clean', 'reverb', 'noise', 'babble', 'music', 'babble+music')
NOISE_CATEGORIES = {'noise': ('noise',), 'babble': ('speech',), 'music': ('music',),
                    'babble+music': ('speech', 'music')}  # kind -> MUSAN categories it adds, in order


def train_list_rows(path):
    """Lines `<speaker> <relative path>` as (line number, speaker, relative path); raises naming a malformed
    line, or an empty list."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected '<speaker> <relative path>', got {line.strip()!r}")
            rows.append((number, fields[0], fields[1]))
    if not rows:
        raise ValueError(f"{path}: the training list is empty")
    return rows


def parse_train_list(path):
    """The (speaker, relative path) pairs of a training list (`train_list_rows` without the line numbers)."""
    return [(speaker, rel) for _, speaker, rel in train_list_rows(path)]


def speaker_labels(entries):
    """Speaker name -> class index, in sorted order of the names (as the original assigns them)."""
    return {name: i for i, name in enumerate(sorted({speaker for speaker, _ in entries}))}


@functools.lru_cache(maxsize=None)
def resampler(orig_rate, new_rate):
    """One resampler per rate pair, built on first use and kept (its filter is the costly part)."""
    return torchaudio.transforms.Resample(orig_rate, new_rate)


def resample(audio, orig_rate, new_rate):
    if orig_rate == new_rate:
        return audio
    with torch.no_grad():
        return resampler(orig_rate, new_rate)(torch.from_numpy(np.ascontiguousarray(audio))).numpy()


def read_audio(path, sampling_rate, start=0.0, seconds=None):
    """Mono float32 audio of `path` at `sampling_rate`, from `start` seconds for `seconds` (None: to the
    end). Only the frames needed are decoded; channels are averaged."""
    with soundfile.SoundFile(path) as f:
        native_rate = f.samplerate
        first = int(start * native_rate)
        count = -1 if seconds is None else int(math.ceil(seconds * native_rate)) + 1
        f.seek(min(first, f.frames))
        audio = f.read(count, dtype='float32', always_2d=True)
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    audio = resample(audio, native_rate, sampling_rate)
    if seconds is not None:
        audio = audio[:int(round(seconds * sampling_rate))]
    return audio


def audio_duration(path):
    info = soundfile.info(path)
    return info.frames / info.samplerate


def wrap_pad(audio, length):
    """Repeat `audio` cyclically until it is `length` samples long (unchanged when already longer)."""
    if len(audio) == 0:
        raise ValueError("cannot pad an empty signal")
    if len(audio) >= length:
        return audio
    return np.pad(audio, (0, length - len(audio)), mode='wrap')


def random_crop(audio, length, rng):
    """A random `length`-sample window of `audio`, which is wrap-padded first when too short."""
    audio = wrap_pad(audio, length)
    start = int(rng.integers(0, len(audio) - length + 1))
    return audio[start:start + length]


def read_random_crop(path, length, sampling_rate, rng):
    """`random_crop` of a file, decoding only about `length` samples of it."""
    duration = audio_duration(path)
    seconds = length / sampling_rate
    if duration <= seconds:
        return wrap_pad(read_audio(path, sampling_rate), length)
    start = rng.uniform(0.0, duration - seconds)
    return wrap_pad(read_audio(path, sampling_rate, start, seconds), length)


MIN_SECONDS = 0.025  # one analysis window of the front-end: a shorter file has no frame of its own


class UnusableAudio(Exception):
    """A file that training skips; the message says why."""


def audio_problem(audio, skip_silent=True):
    """Why decoded audio cannot be trained on (no samples, NaN or infinite samples, all zeros when
    `skip_silent`), or None."""
    if audio.size == 0:
        return 'empty: no samples'
    if not np.all(np.isfinite(audio)):
        return 'NaN or infinite samples'
    if skip_silent and not np.any(audio):
        return 'silent: every sample read is zero'
    return None


def read_usable_crop(path, length, sampling_rate, rng, skip_silent=True):
    """`read_random_crop`, or `UnusableAudio` when the file does not decode, is shorter than MIN_SECONDS, or
    the crop has an `audio_problem`. Multichannel files are averaged to mono, as everywhere."""
    try:
        duration = audio_duration(path)
        if duration < MIN_SECONDS:
            raise UnusableAudio(f'{duration * 1000:.1f} ms long, shorter than a {MIN_SECONDS * 1000:.0f} ms window')
        audio = read_random_crop(path, length, sampling_rate, rng)
    except (OSError, RuntimeError, ValueError) as error:  # soundfile's errors are RuntimeErrors
        raise UnusableAudio(f'unreadable: {error}') from error
    problem = audio_problem(audio, skip_silent)
    if problem:
        raise UnusableAudio(problem)
    return audio


def default_cache_dir():
    return os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'ecapa-toolkit')


class SignalBank:
    """Many short files (noise, music, babble speech, impulse responses), decoded and resampled once into
    one float32 memory-mapped file under `cache_dir`. The file is named by a hash of the paths, their sizes
    and modification times and the rate, so a changed set is decoded again. Worker processes share the
    pages instead of each holding a copy."""

    def __init__(self, files, sampling_rate, cache_dir):
        if not files:
            raise ValueError("a signal bank needs at least one file")
        self.files = sorted(files)
        key = hashlib.sha1(json.dumps(
            [sampling_rate] + [(p, os.path.getsize(p), os.path.getmtime(p)) for p in self.files]
        ).encode()).hexdigest()[:16]
        base = os.path.join(cache_dir, f'bank-{key}')
        if not os.path.exists(base + '.json'):
            self._build(base, sampling_rate)
        with open(base + '.json') as f:
            self.offsets = json.load(f)['offsets']
        self.path = base + '.f32'
        self.samples = np.memmap(self.path, dtype=np.float32, mode='r')

    def __getstate__(self):
        # Sent to a worker process as the file name; the worker maps the same pages.
        return {k: v for k, v in self.__dict__.items() if k != 'samples'}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.samples = np.memmap(self.path, dtype=np.float32, mode='r')

    def _build(self, base, sampling_rate):
        os.makedirs(os.path.dirname(base), exist_ok=True)
        offsets = [0]
        tmp = f'{base}.{os.getpid()}.tmp'
        with open(tmp + '.f32', 'wb') as out:
            for path in self.files:
                audio = read_audio(path, sampling_rate)
                out.write(audio.astype(np.float32).tobytes())
                offsets.append(offsets[-1] + len(audio))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp + '.f32', base + '.f32')
        with open(tmp + '.json', 'w') as f:
            json.dump({'offsets': offsets, 'files': self.files}, f)
        os.replace(tmp + '.json', base + '.json')

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return np.asarray(self.samples[self.offsets[i]:self.offsets[i + 1]])


def mix_at_snr(speech, noise, snr_db):
    """`noise` scaled so that 10 log10(P_speech / P_noise) = `snr_db`; a silent noise adds nothing."""
    speech_power = np.mean(speech.astype(np.float64) ** 2)
    noise_power = np.mean(noise.astype(np.float64) ** 2)
    if noise_power == 0.0:
        return np.zeros_like(noise)
    return (noise * np.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))).astype(np.float32)


def normalised_rir(rir):
    """The impulse response scaled to unit energy (float32) and its direct-path delay, the position of its
    largest tap."""
    rir = rir.astype(np.float64)
    return (rir / np.sqrt(np.sum(rir ** 2))).astype(np.float32), int(np.argmax(np.abs(rir)))


def reverberate(audio, rir):
    """Convolve with the energy-normalised impulse response, keeping the result aligned with the dry
    signal (shifted back by the direct-path delay)."""
    rir, delay = normalised_rir(rir)
    wet = fftconvolve(audio, rir, mode='full')
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
    kinds that would need them are then not drawn."""

    def __init__(self, musan_path, rir_path, sampling_rate, cache_dir):
        self.noise_banks = {}
        if musan_path:
            found = musan_files(musan_path)
            missing = [c for c in NOISE_COUNTS if c not in found]
            if missing:
                raise FileNotFoundError(
                    f"--musan_path {musan_path}: no <category>/<subset>/<stem>/*.wav files for {missing}")
            self.noise_banks = {c: SignalBank(found[c], sampling_rate, cache_dir) for c in NOISE_COUNTS}
        self.rir_bank = None
        if rir_path:
            files = rir_files(rir_path)
            if not files:
                raise FileNotFoundError(f"--rir_path {rir_path}: no <room type>/<room>/*.wav files")
            self.rir_bank = SignalBank(files, sampling_rate, cache_dir)
        self.kinds = [k for k in AUGMENTATIONS if self._available(k)]

    def _available(self, kind):
        if kind == 'reverb':
            return self.rir_bank is not None
        return kind == 'clean' or bool(self.noise_banks)

    def reverb(self, audio, rng):
        return reverberate(audio, self.rir_bank[int(rng.integers(len(self.rir_bank)))])

    def add_noise(self, audio, category, rng):
        """Add `category` noise; returns the mixture and the SNR drawn for each added file."""
        bank = self.noise_banks[category]
        low, high = NOISE_COUNTS[category]
        count = min(int(rng.integers(low, high + 1)), len(bank))
        noise = np.zeros_like(audio)
        snrs = []
        for i in rng.choice(len(bank), size=count, replace=False):
            snr = float(rng.uniform(*SNR_RANGES[category]))
            noise += mix_at_snr(audio, random_crop(bank[int(i)], len(audio), rng), snr)
            snrs.append(snr)
        return audio + noise, snrs

    def apply(self, audio, kind, rng):
        if kind == 'clean':
            return audio
        if kind == 'reverb':
            return self.reverb(audio, rng)
        for category in NOISE_CATEGORIES[kind]:
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
        for category in NOISE_COUNTS:
            rows = [i for i, kind in enumerate(kinds) if category in NOISE_CATEGORIES.get(kind, ())]
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
        """Each row plus `category` noise: NOISE_COUNTS files drawn without replacement, each a random
        (wrap-padded) crop scaled to its own SNR from SNR_RANGES against the row's power."""
        bank = self.banks[category]
        files = len(bank['lengths'])
        low, high = NOISE_COUNTS[category]
        counts = np.minimum(rng.integers(low, high + 1, size=len(audio)), files)
        chosen = [rng.choice(files, size=count, replace=False) for count in counts]
        drawn = [rng.uniform(*SNR_RANGES[category], size=count) for count in counts]
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
            scale = torch.sqrt(speech_power[index] / (noise_power * 10 ** (snr.float() / 10)))
            noise[index] += crops * torch.where(noise_power > 0, scale, torch.zeros_like(scale))[:, None]
        return audio + noise, [list(map(float, d)) for d in drawn]


class TrainDataset(torch.utils.data.Dataset):
    """One augmented random crop per item. Items are `(index, epoch)` pairs from `EpochSampler`; all
    randomness of an item comes from a generator seeded by (seed, epoch, index), so an epoch is the same
    whatever the number of workers and whether or not the run was resumed.

    An unusable file (`read_usable_crop`) is replaced by another utterance of its speaker drawn with the same
    generator, or, when none of the speaker's is usable, by any utterance (its label with it); the item
    carries the (path, reason) of every file it skipped, which `collate` gathers per batch. Batches therefore
    keep their size and their speakers."""

    SUBSTITUTE_ATTEMPTS = 20  # random utterances of other speakers tried before giving up

    def __init__(self, entries, train_path, num_frames, sampling_rate, augmenter, seed, skip_silent=True):
        labels = speaker_labels(entries)
        self.paths = [os.path.join(train_path, rel) for _, rel in entries]
        self.labels = [labels[speaker] for speaker, _ in entries]
        self.by_label = {}
        for index, label in enumerate(self.labels):
            self.by_label.setdefault(label, []).append(index)
        self.length = crop_samples(num_frames, sampling_rate)
        self.sampling_rate = sampling_rate
        self.augmenter = augmenter
        self.seed = seed
        self.skip_silent = skip_silent

    def __len__(self):
        return len(self.paths)

    def crop(self, index, rng):
        """An augmented random crop of utterance `index`, drawn with `rng`, as a float32 tensor."""
        audio = read_usable_crop(self.paths[index], self.length, self.sampling_rate, rng, self.skip_silent)
        if self.augmenter is not None:
            audio = self.augmenter(audio, rng)
        return torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))

    def candidates(self, index, rng, same_speaker_only):
        """`index`, then the other utterances of its speaker in random order, then (unless
        `same_speaker_only`) random utterances of the whole list."""
        yield index
        yield from (int(i) for i in rng.permutation(self.by_label[self.labels[index]]) if i != index)
        if not same_speaker_only:
            yield from (int(i) for i in rng.integers(len(self.paths), size=self.SUBSTITUTE_ATTEMPTS))

    def usable_crop(self, index, rng, skipped, same_speaker_only=False):
        """(crop, label) of the first usable candidate of `index`; appends (path, reason) of each unusable
        file met to `skipped`."""
        for candidate in self.candidates(index, rng, same_speaker_only):
            try:
                return self.crop(candidate, rng), self.labels[candidate]
            except UnusableAudio as problem:
                skipped.append((self.paths[candidate], str(problem)))
        scope = 'its speaker\'s utterances' if same_speaker_only else 'the substitutes tried'
        raise RuntimeError(f'{self.paths[index]}: no usable audio among {scope}; first problems: {skipped[:3]} '
                           f'(--check_data lists every unusable file)')

    def __getitem__(self, item):
        index, epoch = item
        skipped = []
        audio, label = self.usable_crop(index, np.random.default_rng((self.seed, epoch, index)), skipped)
        return audio, label, skipped


def collate(items):
    """Items (view, ..., label, skipped files) -> (stacked views, ..., labels, every skipped (path, reason))."""
    *views, labels, skipped = zip(*items)
    return (*(torch.stack(v) for v in views), torch.tensor(labels), [s for item in skipped for s in item])


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of the dataset that is a pure function of (seed, epoch); yields (index, epoch). With
    `world_size` > 1 (torchrun), rank `rank` takes every world_size-th item of it, after the tail that
    would give ranks unequal counts is dropped: the ranks' parts are disjoint and equally long.
    `set_epoch(epoch, skip)` leaves out the first `skip` items of this rank's part (a run resumed mid-epoch)."""

    def __init__(self, size, seed, world_size=1, rank=0):
        self.size = size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epoch = 1
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        self.epoch = epoch
        self.skip = skip

    def __len__(self):
        return self.size // self.world_size - self.skip

    def __iter__(self):
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.size)
        order = order[:self.size // self.world_size * self.world_size][self.rank::self.world_size]
        return iter([(int(i), self.epoch) for i in order[self.skip:]])


class PairDataset(TrainDataset):
    """Two views of one speaker per item: items are (index_a, index_b, epoch) from `SpeakerPairSampler`,
    each view cropped and augmented with its own generator; returns (view a, view b, label, skipped files).
    An unusable file is replaced by another utterance of the same speaker only, so the batch's speakers stay
    distinct; a speaker with no usable utterance at all stops training with an error naming it."""

    def __getitem__(self, item):
        index_a, index_b, epoch = item
        skipped = []
        view_a, label = self.usable_crop(index_a, np.random.default_rng((self.seed, epoch, index_a, 0)), skipped,
                                         same_speaker_only=True)
        view_b, _ = self.usable_crop(index_b, np.random.default_rng((self.seed, epoch, index_b, 1)), skipped,
                                     same_speaker_only=True)
        return view_a, view_b, label, skipped


class SpeakerPairSampler(torch.utils.data.Sampler):
    """Batches of `batch_size` pairs from `batch_size` distinct speakers, as a pure function of (seed, epoch).

    Each epoch, every speaker's utterances are shuffled and paired off two by two (an odd one out is paired
    with another utterance of its speaker, a single utterance with itself), so every utterance is used once.
    Batches then draw distinct speakers with probability proportional to their remaining pairs, until fewer
    than `batch_size` speakers have pairs left; those leftover pairs are the only ones an epoch skips.
    Yields lists of (index_a, index_b, epoch). With `world_size` > 1 (torchrun) the plan is of global batches
    of batch_size * world_size distinct speakers, and rank `rank` takes its `batch_size` slice of each: no
    speaker appears twice across the ranks' batches of a step, so gathered negatives are all negatives.
    `set_epoch(epoch, skip)` leaves out the epoch's first `skip` batches (a run resumed mid-epoch)."""

    def __init__(self, labels, batch_size, seed, world_size=1, rank=0):
        self.by_speaker = {}
        for index, label in enumerate(labels):
            self.by_speaker.setdefault(label, []).append(index)
        if len(self.by_speaker) < batch_size * world_size:
            raise ValueError(f'a batch of {batch_size} distinct speakers on each of {world_size} processes needs '
                             f'at least {batch_size * world_size} speakers; the list has {len(self.by_speaker)}')
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 1
        self.skip = 0
        self.planned = (None, [])

    def set_epoch(self, epoch, skip=0):
        self.epoch = epoch
        self.skip = skip

    def pairs(self, rng):
        pairs = {}
        for speaker, indices in self.by_speaker.items():
            order = [int(i) for i in rng.permutation(indices)]
            if len(order) % 2:
                order.append(order[0] if len(order) == 1 else int(rng.choice(order[:-1])))
            pairs[speaker] = [(order[i], order[i + 1]) for i in range(0, len(order), 2)]
        return pairs

    def batches(self):
        if self.planned[0] != self.epoch:
            self.planned = (self.epoch, self.plan())
        return self.planned[1]

    def plan(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        pairs = self.pairs(rng)
        speakers = sorted(pairs)
        remaining = np.array([len(pairs[s]) for s in speakers], dtype=np.float64)
        batches = []
        size = self.batch_size * self.world_size
        while np.count_nonzero(remaining) >= size:
            chosen = rng.choice(len(speakers), size=size, replace=False, p=remaining / remaining.sum())
            batch = []
            for k in chosen:
                remaining[k] -= 1
                batch.append(pairs[speakers[k]][int(remaining[k])] + (self.epoch,))
            batches.append(batch)
        return batches

    def __iter__(self):
        part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return iter([batch[part] for batch in self.batches()[self.skip:]])

    def __len__(self):
        return len(self.batches()) - self.skip


class EvalDataset(torch.utils.data.Dataset):
    """Whole utterances for embedding: (relative path, mono float32 waveform at `sampling_rate`)."""

    def __init__(self, relative_paths, eval_path, sampling_rate):
        self.relative_paths = relative_paths
        self.eval_path = eval_path
        self.sampling_rate = sampling_rate

    def __len__(self):
        return len(self.relative_paths)

    def __getitem__(self, i):
        path = os.path.join(self.eval_path, self.relative_paths[i])
        return self.relative_paths[i], torch.from_numpy(read_audio(path, self.sampling_rate))
