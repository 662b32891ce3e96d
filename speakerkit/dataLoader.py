"""From a training list's entries to batches: read, resample, crop (augmentation is `augment.py`'s).

Stages, each usable alone:
  read_audio        -> mono float32 at the target rate, reading only the frames asked for (wav, flac, ...
                       through libsndfile; .m4a and other FFmpeg formats through PyAV)
  random_crop       -> a fixed-length window, wrap-padded when the file is short
  read_usable_crop  -> a crop, or `UnusableAudio` saying why the file cannot train (unreadable, empty,
                       shorter than a 25 ms window, non-finite samples, silent); datasets then use another
                       utterance and report the skipped file with the batch (`collate`)
  CropMaker         -> an item's crop at its speed, augmented: from a file or a tar shard's member alike
  TrainDataset      -> (waveform, label) of a `lists.TrainList` with randomness seeded by (seed, epoch, index);
                       PairDataset -> two views of one speaker (tar shards stream instead: shards.py)
  EvalDataset       -> whole utterances for embedding, with what is wrong with each (unreadable, near-silent)
Features are not computed here: the model computes them.
"""

import concurrent.futures
import dataclasses
import errno
import functools
import math
import multiprocessing
import os
import signal
from typing import NamedTuple

import numpy as np
import soundfile
import torch
import torchaudio

from speakerkit.errors import UserError
from speakerkit.model import crop_samples


@functools.cache
def resampler(orig_rate, new_rate):
    """One resampler per rate pair, built on first use and kept (its filter is the costly part)."""
    return torchaudio.transforms.Resample(orig_rate, new_rate)


LOWEST_FILE_RATE = 1000  # Hz; a header giving less is broken (resampled, one second would fill an hour)
POLYPHASE_LIMIT = 1 << 22  # filter taps (float32) that a polyphase resampler may hold: 16 MiB


def resample(audio, orig_rate, new_rate):
    """`audio` (float32, 1-D) at `new_rate`: by a band-limited polyphase filter (torchaudio's, kept per rate pair)
    when the rates reduce to a small ratio (44100 -> 16000 is 441:160); otherwise (16001 Hz, say, whose filter
    would hold 16000 x 16001 taps) by discarding or adding frequencies of the whole signal's spectrum, which takes
    memory in proportion to the audio alone."""
    if orig_rate == new_rate:
        return audio
    common = math.gcd(orig_rate, new_rate)
    with torch.no_grad():
        samples = torch.from_numpy(np.ascontiguousarray(audio))
        if (orig_rate // common) * (new_rate // common) <= POLYPHASE_LIMIT:
            return resampler(orig_rate, new_rate)(samples).numpy()
        return spectral_resample(samples, orig_rate, new_rate).numpy()


def spectral_resample(samples, orig_rate, new_rate):
    """`samples` at `new_rate` by truncating or zero-padding their spectrum (frequencies above the lower
    Nyquist frequency dropped, the result's length in proportion to the rates)."""
    length = int(round(len(samples) * new_rate / orig_rate))
    if length == 0:
        return samples[:0]
    spectrum = torch.fft.rfft(samples.double())
    kept = min(len(spectrum), length // 2 + 1)
    result = torch.fft.irfft(spectrum[:kept], n=length) * (length / len(samples))
    return result.to(samples.dtype)


SPEED_PERTURBATION = (1.0, 0.9, 1.1)  # --speed_perturb on: the speeds drawn, in the order of their label offsets


def change_speed(audio, speed):
    """`audio` played `speed` times faster, pitch and tempo together (sox's `speed`): resampled by 1/speed,
    so that it is len(audio) / speed samples long. `speed` has at most two decimals."""
    return resample(audio, round(speed * 100), 100)


def decode_with_av(path, until=None):
    """(float32 samples [channels, frames], rate) of a file libsndfile does not read (AAC in .m4a, what FFmpeg
    reads), decoded by PyAV whole or up to `until` seconds; samples as the codec gives them, no resampling or
    mixing. `path` may be a file object (a tar shard's member), read from its start."""
    import av  # FFmpeg is needed only for these formats
    if hasattr(path, 'seek'):
        path.seek(0)
    try:
        with av.open(path if hasattr(path, 'read') else os.fspath(path)) as container:
            stream = container.streams.audio[0]
            to_float = av.AudioResampler(format='fltp')
            rate, planes, decoded = stream.rate, [], 0
            for frame in container.decode(stream):
                planes += [out.to_ndarray() for out in to_float.resample(frame)]
                decoded += frame.samples
                if until is not None and decoded > until * rate:
                    break
            planes += [out.to_ndarray() for out in to_float.resample(None)]
    except (av.FFmpegError, IndexError) as error:  # IndexError: no audio stream
        raise ValueError(f'{named(path)}neither libsndfile nor FFmpeg reads it as audio ({error})') from None
    if not planes:
        raise ValueError(f'{named(path)}no audio decoded')
    return np.concatenate(planes, axis=1), rate


def named(path):
    """'path: ' to begin a message about a file; nothing for a file object, which its reader names."""
    return '' if hasattr(path, 'read') else f'{path}: '


def not_for_libsndfile(path, error):
    """Whether soundfile's `error` opening `path` (or a file object) says only that libsndfile does not know its
    format; a missing file raises FileNotFoundError here (libsndfile says "System error")."""
    if not hasattr(path, 'read') and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path)) from None
    return isinstance(error, soundfile.LibsndfileError) and 'Format not recognised' in str(error)


def frame_window(start, seconds, rate, frames):
    """(first frame, frame count or -1 for the rest) that `read_audio` decodes of a file of `frames` frames at
    `rate`: from `start` (seconds, or a function of the duration) for `seconds` and one frame more."""
    if callable(start):
        start = start(frames / rate)
    return min(int(start * rate), frames), -1 if seconds is None else int(math.ceil(seconds * rate)) + 1


def read_audio(path, sampling_rate, start=0.0, seconds=None):
    """Mono float32 audio of `path` (or of a file object holding a file's bytes) at `sampling_rate`, from
    `start` seconds for `seconds` (None: to the end); `start` may be a function of the file's duration in
    seconds, called once the file is open. Only the frames needed are decoded (formats libsndfile does not
    read, such as .m4a, are decoded whole by PyAV); channels are averaged."""
    try:
        with soundfile.SoundFile(path) as f:
            native_rate = f.samplerate
            first, count = frame_window(start, seconds, native_rate, f.frames)
            f.seek(first)
            audio = f.read(count, dtype='float32', always_2d=True).T
    except RuntimeError as error:
        if not not_for_libsndfile(path, error):
            raise
        until = None if callable(start) or seconds is None else start + seconds
        audio, native_rate = decode_with_av(path, until)
        first, count = frame_window(start, seconds, native_rate, audio.shape[1])
        audio = audio[:, first:None if count < 0 else first + count]
    usable_rate(path, native_rate)
    audio = audio.mean(axis=0) if len(audio) > 1 else audio[0]
    audio = resample(np.ascontiguousarray(audio, dtype=np.float32), native_rate, sampling_rate)
    if seconds is not None:
        audio = audio[:int(round(seconds * sampling_rate))]
    return audio


def usable_rate(path, rate):
    """`rate`, or a ValueError naming `path` when it is below any audio a speaker model can use."""
    if rate < LOWEST_FILE_RATE:
        raise ValueError(f'{named(path)}its header gives a sample rate of {rate} Hz, below the {LOWEST_FILE_RATE} Hz '
                         f'of any audio a speaker model can use')
    return rate


def audio_info(path):
    """(frames, sample rate, channels) of a file as `read_audio` reads it: from its header, or, for the formats
    libsndfile does not read (m4a), by decoding it whole with PyAV."""
    try:
        info = soundfile.info(path)
    except RuntimeError as error:
        if not not_for_libsndfile(path, error):
            raise
        audio, rate = decode_with_av(path)
        return audio.shape[1], usable_rate(path, rate), audio.shape[0]
    return info.frames, usable_rate(path, info.samplerate), info.channels


def audio_duration(path):
    frames, rate, _ = audio_info(path)
    return frames / rate


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


def read_random_window(path, length, sampling_rate, rng):
    """A random `length`-sample window of a file (the whole file when it is not longer), unpadded: the file is
    opened once and only the window decoded."""
    seconds = length / sampling_rate
    return read_audio(path, sampling_rate, lambda duration: rng.uniform(0.0, duration - seconds)
                      if duration > seconds else 0.0, seconds)


MIN_SECONDS = 0.025  # one analysis window of the front-end: a shorter file has no frame of its own


class UnusableAudio(Exception):
    """A file that training skips; the message says why."""


def duration_problem(seconds):
    """Why a file of this duration cannot be used (no samples, shorter than one analysis window), or None."""
    if seconds == 0:
        return 'empty: no samples'
    if seconds < MIN_SECONDS:
        return f'{seconds * 1000:.1f} ms long, shorter than a {MIN_SECONDS * 1000:.0f} ms window'
    return None


def unreadable_headers(root, relative_paths, threads=8):
    """[(relative path, why)] of the files under `root` whose header does not decode or that are too short to
    embed. Reads headers only, on a few threads: a cluster's file system answers slowly one file at a time."""
    def problem(relative_path):
        try:
            return duration_problem(audio_duration(os.path.join(root, relative_path)))
        except (OSError, RuntimeError, ValueError) as error:  # soundfile's errors are RuntimeErrors
            return f'unreadable: {error}'
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [(path, why) for path, why in zip(relative_paths, pool.map(problem, relative_paths)) if why]


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


# Below -80 dBFS RMS an utterance holds next to nothing of a speaker; all-zero ones all get the same embedding,
# so two of them score 1.0 against each other (and the fainter a file, the closer it comes to that one).
SILENCE_RMS = 1e-4
NEAR_SILENT = 'silent or nearly (RMS below -80 dBFS)'
# Evaluation reads at most this much of a recording, so that memory stays bounded whatever a file holds
# (VoxCeleb's longest test utterance is under 2.5 minutes); longer files are embedded from their start.
EVAL_MAX_SECONDS = 600.0
CUT_SHORT = f'longer than {EVAL_MAX_SECONDS:.0f} s: its first {EVAL_MAX_SECONDS:.0f} s embedded'


def near_silent(audio):
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS


def read_usable_crop(path, length, sampling_rate, rng, skip_silent=True):
    """`random_crop` of a file (`read_random_window`, wrap-padded), or `UnusableAudio` when the file does not
    decode, is shorter than MIN_SECONDS, or the crop has an `audio_problem`. Multichannel files are averaged to
    mono, as everywhere."""
    try:
        audio = read_random_window(path, length, sampling_rate, rng)
    except (OSError, RuntimeError, ValueError) as error:  # soundfile's errors are RuntimeErrors
        raise UnusableAudio(f'unreadable: {error}') from error
    problem = (duration_problem(len(audio) / sampling_rate) if len(audio) < length else None) or \
        audio_problem(audio, skip_silent)
    if problem:
        raise UnusableAudio(problem)
    return wrap_pad(audio, length)


@dataclasses.dataclass(frozen=True)
class CropMaker:
    """What a training item does to an utterance, from files or from tar shards alike: a random crop of
    `length` samples at `sampling_rate` (`read_usable_crop`), played at a speed, then augmented.

    `speeds` other than (1.0,): speed perturbation as wespeaker and 3D-Speaker do it. Each item draws one of
    `speeds` (uniformly, first from its generator), its crop is read `speed` times as long and resampled to the
    crop length, so that it plays `speed` times faster, pitch included; and its label becomes
    `label + k * speakers` for the k-th speed, a new speaker per speed (so the classifier needs
    `len(speeds) * speakers` classes). With (1.0,) nothing is drawn: items are those of a run without it."""
    length: int
    sampling_rate: int
    augmenter: object | None
    speakers: int
    speeds: tuple = (1.0,)
    skip_silent: bool = True

    def draw_speed(self, rng):
        """(speed, label offset) of an item: drawn from `speeds` when there is more than one."""
        if len(self.speeds) == 1:
            return self.speeds[0], 0
        k = int(rng.integers(len(self.speeds)))
        return self.speeds[k], k * self.speakers

    def __call__(self, source, rng, speed=1.0):
        """An augmented random crop of `source` (a path or a file object) at `speed`, drawn with `rng`, as a
        float32 tensor; `UnusableAudio` when it cannot be trained on."""
        if speed == 1.0:
            audio = read_usable_crop(source, self.length, self.sampling_rate, rng, self.skip_silent)
        else:
            audio = read_usable_crop(source, math.ceil(self.length * speed), self.sampling_rate, rng,
                                     self.skip_silent)
            audio = change_speed(audio, speed)[:self.length]
        if self.augmenter is not None:
            audio = self.augmenter(audio, rng)
        return torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))


class TrainDataset(torch.utils.data.Dataset):
    """One augmented random crop (`CropMaker`) per item. Items are `(index, epoch)` pairs (samplers.py);
    all randomness of an item comes from a generator seeded by (seed, epoch, index), so an epoch is the same
    whatever the number of workers and whether or not the run was resumed.

    An unusable file (`read_usable_crop`) is replaced by another utterance of its speaker drawn with the same
    generator, or, when none of the speaker's is usable, by any utterance (its label with it); the item
    carries the (path, reason) of every file it skipped, which `collate` gathers per batch. Batches therefore
    keep their size and their speakers."""

    SUBSTITUTE_ATTEMPTS = 20  # random utterances of other speakers tried before giving up

    def __init__(self, train_list, train_path, num_frames, sampling_rate, augmenter, seed, skip_silent=True,
                 speeds=(1.0,)):
        self.train_list = train_list  # a lists.TrainList: numpy arrays, which forked workers share
        self.train_path = train_path
        self.labels = train_list.labels
        self.label_order, self.label_starts = train_list.by_label()
        self.crops = CropMaker(crop_samples(num_frames, sampling_rate), sampling_rate, augmenter,
                               len(train_list.speakers), speeds, skip_silent)
        self.seed = seed

    def __len__(self):
        return len(self.train_list)

    def path(self, index):
        return os.path.join(self.train_path, self.train_list.path(index))

    def candidates(self, index, rng, same_speaker_only):
        """`index`, then the other utterances of its speaker in random order, then (unless
        `same_speaker_only`) random utterances of the whole list."""
        yield index
        label = self.labels[index]
        same_speaker = self.label_order[self.label_starts[label]:self.label_starts[label + 1]]
        yield from (int(i) for i in rng.permutation(same_speaker) if i != index)
        if not same_speaker_only:
            yield from (int(i) for i in rng.integers(len(self), size=self.SUBSTITUTE_ATTEMPTS))

    def usable_crop(self, index, rng, skipped, same_speaker_only=False, speed=1.0):
        """(crop, label) of the first usable candidate of `index`; appends (path, reason) of each unusable
        file met to `skipped`."""
        for candidate in self.candidates(index, rng, same_speaker_only):
            try:
                return self.crops(self.path(candidate), rng, speed), int(self.labels[candidate])
            except UnusableAudio as problem:
                skipped.append((self.path(candidate), str(problem)))
        scope = 'its speaker\'s utterances' if same_speaker_only else 'the substitutes tried'
        raise UserError(f'{self.path(index)}: no usable audio among {scope}; first problems: {skipped[:3]} '
                           f'(--check_data lists every unusable file)')

    def __getitem__(self, item):
        index, epoch = item
        skipped = []
        rng = np.random.default_rng((self.seed, epoch, index))
        speed, offset = self.crops.draw_speed(rng)
        audio, label = self.usable_crop(index, rng, skipped, speed=speed)
        return audio, label + offset, skipped


def leave_signals_to_parent(_worker_id):
    """A loader worker's start: Ctrl-C and SIGTERM are the training process's to handle (it finishes the step,
    saves and exits 0); a scheduler that signals the whole process group must not kill the workers first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_loader_workers():
    """Kill (SIGKILL) the loader workers still alive when a command ends, say after an error left a loader
    unfinished. They ignore SIGTERM, so the exit's terminate-and-join would wait forever for one that does not
    end by itself (one stuck reading a file); workers hold nothing that needs saving."""
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


class Batch(NamedTuple):
    """A training batch: `views`, one [B, samples] tensor of crops or, in the pair modes, two (view a and view b
    of each pair, row for row); `labels` [B]; `skipped`, the (path, reason) of every file left out to make it."""
    views: tuple
    labels: torch.Tensor
    skipped: list


def collate(items):
    """Items (view, ..., label, skipped files) -> a `Batch`. In a loader worker the views are stacked straight
    into shared memory (`default_collate`), saving the copy that sending the batch to the training process
    would otherwise make."""
    *views, labels, skipped = zip(*items)
    return Batch(tuple(torch.utils.data.default_collate(v) for v in views), torch.tensor(labels),
                 [s for item in skipped for s in item])


class PairDataset(TrainDataset):
    """Two views of one speaker per item: items are (index_a, index_b, epoch) (samplers.py),
    each view cropped and augmented with its own generator; returns (view a, view b, label, skipped files).
    An unusable file is replaced by another utterance of the same speaker only, so the batch's speakers stay
    distinct; a speaker with no usable utterance at all stops training with an error naming it. Under speed
    perturbation both views take the speed view a draws, so that they share their label."""

    def __getitem__(self, item):
        index_a, index_b, epoch = item
        skipped = []
        rng_a = np.random.default_rng((self.seed, epoch, index_a, 0))
        speed, offset = self.crops.draw_speed(rng_a)
        view_a, label = self.usable_crop(index_a, rng_a, skipped, same_speaker_only=True, speed=speed)
        view_b, _ = self.usable_crop(index_b, np.random.default_rng((self.seed, epoch, index_b, 1)), skipped,
                                     same_speaker_only=True, speed=speed)
        return view_a, view_b, label + offset, skipped


class EvalDataset(torch.utils.data.Dataset):
    """Whole utterances for embedding: (relative path, mono float32 waveform at `sampling_rate`, problem).
    The problem is None, `NEAR_SILENT` or `CUT_SHORT` (embedded all the same, and reported), or why the file
    cannot be embedded (unreadable, too short, NaN samples; the waveform is then empty). At most
    EVAL_MAX_SECONDS of a file are read."""

    def __init__(self, relative_paths, eval_path, sampling_rate):
        self.relative_paths = relative_paths
        self.eval_path = eval_path
        self.sampling_rate = sampling_rate

    def __len__(self):
        return len(self.relative_paths)

    def __getitem__(self, i):
        name = self.relative_paths[i]
        try:
            audio = read_audio(os.path.join(self.eval_path, name), self.sampling_rate,
                               seconds=EVAL_MAX_SECONDS + 1.0)
        except (OSError, RuntimeError, ValueError) as error:  # soundfile's errors are RuntimeErrors
            return name, torch.zeros(0), f'unreadable: {error}'
        kept = int(EVAL_MAX_SECONDS * self.sampling_rate)
        cut, audio = len(audio) > kept, audio[:kept]
        problem = duration_problem(len(audio) / self.sampling_rate) or audio_problem(audio, skip_silent=False)
        if problem:
            return name, torch.zeros(0), problem
        return name, torch.from_numpy(audio), NEAR_SILENT if near_silent(audio) else CUT_SHORT if cut else None
