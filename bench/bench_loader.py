"""Training-loader throughput: augmented 2 s crops per second, ours beside the original's, 1 and N workers.

  python bench/bench_loader.py [--reference DIR] [--workers N] [--seconds 6] [--device cuda] [--json FILE]

Data: a generated VoxCeleb-like set (64 files of 8 s at 16 kHz, synthetic MUSAN and RIRs), and, when
../shared/data is beside the checkout, 64 LibriSpeech files as FLAC and as 16-bit WAV, with musan_mini and
rirs_mini. Loaders:

  ours        TrainDataset + Augmenter: crops read with soundfile start/frames, noise and RIR banks decoded
              once into a memory-mapped cache, FFT reverberation, one resampler per rate pair.
  ours, read  the same dataset without augmentation: what the workers do under --gpu_augment.
  ours, shards (, read)  the same crops from the set packed into tar shards of 16 (`--train_shards`).
  original    with --reference DIR (a checkout of TaoRuijie/ECAPA-TDNN, see bench/reference.py): its own
              `dataLoader.train_loader`, imported from DIR.
  original's way  the same data path written here (OriginalWay): the whole file read by soundfile for every
              crop, noise and RIR files read from disk for every example, scipy.signal.convolve (which picks
              FFT for long inputs), SNRs against power + 1e-4, float64, nothing resampled at 16 kHz.

Each loader runs for about `--seconds` after its first batch (batch 32). The original's loaders run with one
worker only: the speed-up column divides each loader's rate per worker by the original's (by the rewrite's
without --reference). The last row per set times DeviceAugmenter on `--device` alone, on batches already in
memory.
"""

import argparse
import glob
import os
import random
import tempfile
import time

import numpy as np
import soundfile
import torch
import torchaudio
from scipy import signal

import reference
from common import SHARED_DATA, environment, synchronize, write_json
from speakerkit import demo
from speakerkit.augment import Augmenter, DeviceAugmenter
from speakerkit.dataLoader import CropMaker, TrainDataset
from speakerkit.lists import read_shard_list, read_train_list
from speakerkit.shards import ShardDataset, pack_shards
from speakerkit.model import crop_samples

BATCH = 32


class OriginalWay(torch.utils.data.Dataset):
    """The original loader's data path, written here as the baseline when no checkout of it is given."""

    def __init__(self, paths, musan_path, rir_path, length, sampling_rate):
        self.paths = paths
        self.length = length
        self.sampling_rate = sampling_rate
        self.noise_files = {}
        for path in glob.glob(os.path.join(musan_path, '*', '*', '*', '*.wav')):
            self.noise_files.setdefault(path.split(os.sep)[-4], []).append(path)
        self.rir_files = glob.glob(os.path.join(rir_path, '*', '*', '*.wav'))

    def __len__(self):
        return len(self.paths)

    def read(self, path):
        audio, rate = soundfile.read(path)
        if rate == self.sampling_rate:
            return audio
        return torchaudio.functional.resample(torch.from_numpy(audio), rate, self.sampling_rate).numpy()

    def crop(self, audio):
        if len(audio) <= self.length:
            audio = np.pad(audio, (0, self.length - len(audio)), 'wrap')
        start = int(random.random() * (len(audio) - self.length))
        return audio[start:start + self.length]

    def add_noise(self, audio, category):
        snr_range = {'noise': (0, 15), 'speech': (13, 20), 'music': (5, 15)}[category]
        count = random.randint(*{'noise': (1, 1), 'speech': (3, 8), 'music': (1, 1)}[category])
        clean_db = 10 * np.log10(np.mean(audio ** 2) + 1e-4)
        total = np.zeros_like(audio)
        for path in random.sample(self.noise_files[category], min(count, len(self.noise_files[category]))):
            noise = self.crop(self.read(path))
            noise_db = 10 * np.log10(np.mean(noise ** 2) + 1e-4)
            total += np.sqrt(10 ** ((clean_db - noise_db - random.uniform(*snr_range)) / 10)) * noise
        return audio + total

    def reverb(self, audio):
        rir = self.read(random.choice(self.rir_files))
        rir = rir / np.sqrt(np.sum(rir ** 2))
        return signal.convolve(audio, rir, mode='full')[:self.length]

    def __getitem__(self, index):
        audio = self.crop(self.read(self.paths[index]))
        kind = random.randint(0, 5)
        if kind == 1:
            audio = self.reverb(audio)
        elif kind in (2, 3, 4):
            audio = self.add_noise(audio, {2: 'speech', 3: 'music', 4: 'noise'}[kind])
        elif kind == 5:
            audio = self.add_noise(self.add_noise(audio, 'speech'), 'music')
        return torch.FloatTensor(audio), 0


def loader_rate(dataset, sampler, workers, seconds):
    """Crops per second after the first batch, over about `seconds`. The sets are small (64 files: two batches
    an epoch), so workers persist across epochs, as over a real epoch of a million files their start is
    nothing; otherwise the rate would be mostly worker starts. `sampler` None: `dataset` is a stream (shards)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
                                         prefetch_factor=4 if workers else None, drop_last=True,
                                         persistent_workers=workers > 0)
    done, start = 0, None
    while start is None or time.perf_counter() - start < seconds:
        for batch in loader:
            if start is None:
                start = time.perf_counter()
                continue
            done += len(batch[0])
            if time.perf_counter() - start >= seconds:
                break
    return done / (time.perf_counter() - start)


def device_augment_rate(augmenter, device, length, seconds):
    device_augmenter = DeviceAugmenter(augmenter, device)
    batch = 0.1 * torch.randn(BATCH * 4, length, device=device)
    rng = np.random.default_rng(0)
    device_augmenter(batch, rng)
    synchronize(device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        device_augmenter(batch, rng)
        synchronize(device)
        done += len(batch)
    return done / (time.perf_counter() - start)


def generated_set(root):
    rng = np.random.default_rng(0)
    entries = demo.write_speakers(os.path.join(root, 'wav'), 1, 8, 8, rng, seconds=(8.0, 8.0))
    with open(os.path.join(root, 'train_list.txt'), 'w') as f:
        f.writelines(f'{speaker} {path}\n' for speaker, path in entries)
    demo.write_musan(os.path.join(root, 'musan'), rng)
    demo.write_rirs(os.path.join(root, 'rirs'), rng)
    return {'name': 'generated, 64 x 8 s', 'train_list': os.path.join(root, 'train_list.txt'),
            'train_path': os.path.join(root, 'wav'), 'musan_path': os.path.join(root, 'musan'),
            'rir_path': os.path.join(root, 'rirs')}


def shared_set(root):
    librispeech = os.path.join(SHARED_DATA, 'librispeech_251')
    files = sorted(glob.glob(os.path.join(librispeech, '*', '*', '*.flac')))[:64]
    with open(os.path.join(root, 'shared_list.txt'), 'w') as f:
        f.writelines(f'{os.path.relpath(p, librispeech).split(os.sep)[0]} {os.path.relpath(p, librispeech)}\n'
                     for p in files)
    return {'name': 'LibriSpeech 64 FLAC files, musan_mini, rirs_mini',
            'train_list': os.path.join(root, 'shared_list.txt'), 'train_path': librispeech,
            'musan_path': os.path.join(SHARED_DATA, 'musan_mini'),
            'rir_path': os.path.join(SHARED_DATA, 'rirs_mini', 'simulated_rirs')}


def shared_wav_set(root, flac_set):
    """The same LibriSpeech files as 16-bit WAV (VoxCeleb2 after `prepare.py m4a`)."""
    wav_root = os.path.join(root, 'librispeech_wav')
    lines = []
    for entry in read_train_list(flac_set['train_list']):
        relative = os.path.splitext(entry.path)[0] + '.wav'
        audio, rate = soundfile.read(os.path.join(flac_set['train_path'], entry.path))
        os.makedirs(os.path.dirname(os.path.join(wav_root, relative)), exist_ok=True)
        soundfile.write(os.path.join(wav_root, relative), audio, rate, subtype='PCM_16')
        lines.append(f'{entry.speaker} {relative}\n')
    with open(os.path.join(root, 'shared_wav_list.txt'), 'w') as f:
        f.writelines(lines)
    return flac_set | {'name': 'LibriSpeech 64 WAV files, musan_mini, rirs_mini',
                       'train_list': os.path.join(root, 'shared_wav_list.txt'), 'train_path': wav_root}


def shard_stream(data, root, augmenter, length):
    """A ShardDataset over the set packed in shards of 16 (four shards), long enough never to end here."""
    out = os.path.join(root, 'shards_' + os.path.basename(data['train_list']))
    train_list = read_train_list(data['train_list'])
    shard_list = read_shard_list(pack_shards(train_list, data['train_path'], out, per_shard=16))
    crops = CropMaker(length, 16000, augmenter, len(shard_list.speakers))
    return ShardDataset(shard_list, crops, 0, BATCH, steps=10 ** 6)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workers', type=int, default=len(os.sched_getaffinity(0)),
                        help='the N of the N-worker rows (default: the cores here)')
    parser.add_argument('--seconds', type=float, default=6.0, help='time per row')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='where the device-augmentation row runs')
    parser.add_argument('--json', help='also write the figures here')
    parser.add_argument('--reference', metavar='DIR', help='also time the original loader of this checkout')
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker's torch uses one thread
    length = crop_samples(200, 16000)
    rows = []
    original = reference.load(args.reference) if args.reference else None
    print(f'{"data":<44} {"loader":<16} {"workers":>7} {"crops/s":>9} {"per worker":>10} {"÷ original":>10}')
    with tempfile.TemporaryDirectory() as root:
        sets = [generated_set(root)]
        if os.path.isdir(SHARED_DATA):
            sets += [shared_set(root), shared_wav_set(root, shared_set(root))]
        for data in sets:
            entries = read_train_list(data['train_list'])
            paths = [os.path.join(data['train_path'], entry.path) for entry in entries]
            augmenter = Augmenter(data['musan_path'], data['rir_path'], 16000, os.path.join(root, 'cache'))
            every = list(range(len(paths)))
            runs = [("original's way", OriginalWay(paths, data['musan_path'], data['rir_path'], length, 16000),
                     every, 1)]
            if original:
                with reference.cpu_patches():
                    runs.insert(0, ('original', original['dataLoader'].train_loader(
                        data['train_list'], data['train_path'], data['musan_path'], data['rir_path'], 200), every, 1))
            epoch_items = [(int(i), 1) for i in np.random.default_rng(0).permutation(len(paths))]
            runs += [(name, TrainDataset(entries, data['train_path'], 200, 16000, aug, 0), epoch_items, workers)
                     for workers in sorted({1, args.workers})
                     for name, aug in (('ours', augmenter), ('ours, read', None))]
            runs += [(name, shard_stream(data, root, aug, length), None, workers)
                     for workers in sorted({1, args.workers})
                     for name, aug in (('ours, shards', augmenter), ('ours, shards, read', None))]
            baseline = None
            for name, dataset, sampler, workers in runs:
                with reference.cpu_patches():  # numpy.float, which the original's reverberation uses
                    rate = loader_rate(dataset, sampler, workers, args.seconds)
                baseline = baseline or rate
                rows.append({'data': data['name'], 'loader': name, 'workers': workers, 'crops_per_s': rate,
                             'per_worker': rate / workers, 'per_worker_vs_original': rate / workers / baseline})
                print(f'{data["name"]:<44} {name:<16} {workers:>7} {rate:>9.1f} {rate / workers:>10.1f} '
                      f'{rate / workers / baseline:>9.2f}x', flush=True)
            rate = device_augment_rate(augmenter, args.device, length, args.seconds)
            rows.append({'data': data['name'], 'loader': f'device augmentation on {args.device}', 'workers': 0,
                         'crops_per_s': rate})
            print(f'{data["name"]:<44} {"DeviceAugmenter on " + args.device:<24} {rate:>9.1f}', flush=True)
    write_json(args.json, {**environment(args.device), 'batch': BATCH, 'crop_samples': length,
                           'reference': args.reference, 'rows': rows})


if __name__ == '__main__':
    main()
