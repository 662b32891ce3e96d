"""Tar shards: a training list packed into WebDataset tar files, and read back as a stream.

Opening a million small files is what starves a GPU on shared storage; a few thousand tar files read from
start to end are not. The tar layout is WebDataset's (the `webdataset` package writes and reads them; see
docs/guide.md for why that library): the members of one utterance share a key, its index in the training list.

  {index:09d}.<ext>   the audio file's bytes as they were (wav, flac, m4a, ...)
  {index:09d}.spk     its speaker's name (UTF-8)
  {index:09d}.path    its path relative to --train_path (UTF-8)

  pack_shards        a TrainList -> shard-NNNNNN.tar files of `per_shard` utterances in a seeded random order,
                     shards.txt (`<tar file> <utterances>` per line) and speakers.txt (label k on line k + 1)
  epoch_shards       which shards loader worker k of process r reads in an epoch: a seeded permutation of the
                     shards each epoch, split over the processes, then over the workers; disjoint, and together
                     every shard once
  ShardDataset       the stream of one loader worker: its shards through a shuffle buffer, `CropMaker` crops,
                     `steps_per_epoch` batches on every process; exact resume inside an epoch
"""

import io
import itertools
import multiprocessing
import os
import zlib

import numpy as np
import torch
import webdataset

from speakerkit.checkpoints import atomic_write
from speakerkit.dataLoader import UnusableAudio
from speakerkit.errors import UserError
from speakerkit.lists import require_files

SHUFFLE_BUFFER = 500  # samples (the audio files' bytes) each loader worker shuffles among: ~125 MB of VoxCeleb2


def shard_name(number):
    return f'shard-{number:06d}.tar'


def write_shard(job):
    """Write one shard (atomically: a shard file is there only when whole); skipped when already there."""
    path, members = job
    if os.path.exists(path):
        return
    def write(f):
        writer = webdataset.TarWriter(f)
        for index, speaker, relative, source in members:
            with open(source, 'rb') as audio:
                data = audio.read()
            extension = os.path.splitext(relative)[1].lstrip('.').lower() or 'wav'
            writer.write({'__key__': f'{index:09d}', extension: data, 'spk': speaker.encode(),
                          'path': relative.encode()})
        writer.close()
    atomic_write(path, write)


def pack_shards(train_list, train_path, out, per_shard=1000, seed=0, workers=1):
    """Pack every utterance of `train_list` (a TrainList whose files are under `train_path`) into shards of
    `per_shard` under `out`, in an order drawn from `seed`; returns the shard list's path. Shards already
    written are kept, so an interrupted packing continues where it stopped."""
    require_files(train_list.paths, train_list.lines, train_path, train_list.source)
    os.makedirs(out, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(train_list))
    jobs = []
    for number, start in enumerate(range(0, len(order), per_shard)):
        members = [(int(i), train_list.speaker(i), train_list.path(i), os.path.join(train_path, train_list.path(i)))
                   for i in order[start:start + per_shard]]
        jobs.append((os.path.join(out, shard_name(number)), members))
    if workers > 1:
        with multiprocessing.get_context('spawn').Pool(workers) as pool:
            for _ in pool.imap_unordered(write_shard, jobs):
                pass
    else:
        for job in jobs:
            write_shard(job)
    atomic_write(os.path.join(out, 'speakers.txt'),
                 lambda f: f.write(''.join(f'{name}\n' for name in train_list.speakers).encode()))
    shard_list = os.path.join(out, 'shards.txt')
    atomic_write(shard_list, lambda f: f.write(''.join(
        f'{os.path.basename(path)} {len(members)}\n' for path, members in jobs).encode()))
    return shard_list


def epoch_shards(shards, epoch, seed, world_size, rank, workers):
    """[shard indices of loader worker 0, of worker 1, ...] of process `rank` in `epoch`: a permutation of the
    `shards` drawn from (seed, epoch), every world_size-th shard to each process, then every workers-th to each
    of its workers."""
    mine = np.random.default_rng((seed, epoch)).permutation(shards)[rank::world_size]
    return [mine[k::workers] for k in range(workers)]


def steps_per_epoch(shard_list, batch_size, world_size):
    """Batches each process trains on per epoch: those of the file loader for the same list, so that every
    process takes the same number of steps whatever its shards hold."""
    return int(shard_list.counts.sum()) // world_size // batch_size


class ShardDataset(torch.utils.data.IterableDataset):
    """The training stream from tar shards, for --mode classifier. Yields (crop, label, skipped) items as
    `TrainDataset` does, `batch_size` at a time per loader worker; each process gets `steps` batches an epoch.

    Loader worker k of n (or the process itself without workers) plays role k of `epoch_shards`, and of the
    epoch's batches 0..steps-1 it makes those whose number is k modulo n: PyTorch's loader takes batches from
    its workers in turn, so they arrive in that order. A role reads its shards in order through a shuffle
    buffer drawn from (seed, epoch, rank, role); when its quota of batches outlasts its shards it reads them
    again (a second pass: those utterances twice in the epoch, with other crops), and what it has left at the
    quota waits for the next epoch's draw. An utterance's crop and augmentation are drawn from (seed, epoch,
    index) on a first pass, as the file loader draws them, so the same utterance gives the same crop either way.

    Resume: `set_epoch(epoch, steps_done)` after `steps_done` batches of the epoch gives exactly the batches
    an uninterrupted run would have trained next, as long as the number of loader workers is the same: the
    roles turn so that the worker asked first makes batch steps_done, and the samples of the batches
    already trained are read from the shards and dropped, not decoded. A different number of workers gives a
    different stream (each shard still read once an epoch).

    Bad data, as the file loader reports it (path, reason), the path being `<shard>:<member>`: a member that is
    not usable audio (`UnusableAudio`'s reasons), a sample without a speaker (`.spk`) or with a speaker missing
    from speakers.txt, a sample without audio; a truncated or unreadable tar file is reported once and the rest
    of that shard is skipped. The next sample of the stream takes the place of a skipped one."""

    def __init__(self, shard_list, crops, seed, batch_size, steps, world_size=1, rank=0):
        super().__init__()
        self.shard_list = shard_list
        self.crops = crops
        self.seed = seed
        self.batch_size = batch_size
        self.steps = steps
        self.world_size = world_size
        self.rank = rank
        self.label_of = {name: label for label, name in enumerate(shard_list.speakers.tolist())}
        self.epoch = 1
        self.steps_done = 0

    def set_epoch(self, epoch, steps_done=0):
        """Yield epoch `epoch`'s batches from now on, leaving out its first `steps_done` batches."""
        self.epoch = epoch
        self.steps_done = steps_done

    def steps_in_epoch(self):
        return self.steps

    def __len__(self):
        return (self.steps - self.steps_done) * self.batch_size

    def samples(self, shards, problems, bad_shards):
        """The raw samples of `shards`, in order. A tar file that cannot be read on is skipped from there, and
        appended to `problems` with why the first time (it joins the set `bad_shards`)."""
        for i in shards:
            path, failed = self.shard_list.shards[i], []

            def stop_reading(error, failed=failed):
                failed.append(str(error.args[0] if error.args else '').split(' @ ')[0] or type(error).__name__)
                return False  # webdataset's handler: False ends this tar file
            yield from webdataset.tarfile_samples([{'url': path}], handler=stop_reading)
            if failed and path not in bad_shards:
                bad_shards.add(path)
                problems.append((path, f'unreadable tar file: {failed[0]}'))

    def shuffled(self, shards, rng, problems):
        """Samples of `shards` through the shuffle buffer, with their pass number, pass after pass without end;
        each pass empties the buffer before the next begins, so that a pass gives each sample once."""
        bad_shards = set()
        for number in itertools.count():
            buffer, found = [], 0
            for sample in self.samples(shards, problems, bad_shards):
                found += 1
                buffer.append((sample, number))
                if len(buffer) >= SHUFFLE_BUFFER:
                    yield buffer.pop(int(rng.integers(len(buffer))))
            if not found:
                raise UserError(f'{self.shard_list.path}: no sample could be read from the shards '
                                f'{[self.shard_list.shards[i] for i in shards[:3]]}: {problems[:3]}')
            while buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))

    def item(self, sample, number, skipped):
        """(crop, label) of a raw sample; None (after appending to `skipped`) when it cannot be trained on."""
        name = f'{sample["__url__"]}:{sample.get("path", sample["__key__"].encode()).decode(errors="replace")}'
        audio = [key for key in sample if not key.startswith('__') and key not in ('spk', 'path')]
        if 'spk' not in sample:
            skipped.append((name, 'no speaker label (.spk member)'))
            return None
        label = self.label_of.get(sample['spk'].decode(errors='replace'))
        if label is None:
            skipped.append((name, f'speaker {sample["spk"].decode(errors="replace")!r} is not in speakers.txt'))
            return None
        if len(audio) != 1:
            skipped.append((name, f'expected one audio member, found {audio or "none"}'))
            return None
        key = sample['__key__']
        index = int(key) if key.isdigit() else zlib.crc32(key.encode())  # another packer's keys: seeded by name
        rng = np.random.default_rng((self.seed, self.epoch, index) + ((number,) if number else ()))
        speed, offset = self.crops.draw_speed(rng)
        try:
            return self.crops(io.BytesIO(sample[audio[0]]), rng, speed), label + offset
        except UnusableAudio as problem:
            skipped.append((name, str(problem)))
            return None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        done = self.steps_done
        role = (worker + done) % workers
        shards = epoch_shards(len(self.shard_list.shards), self.epoch, self.seed, self.world_size, self.rank,
                              workers)[role]
        if len(shards) == 0:
            raise UserError(f'{self.shard_list.path}: {len(self.shard_list.shards)} shards cannot feed '
                            f'{self.world_size} processes x {workers} loader workers: pack smaller shards or use '
                            f'fewer --n_cpu')
        quota = len(range(role, self.steps, workers)) * self.batch_size
        dropped = len(range(role, done, workers)) * self.batch_size
        problems = []  # (path, reason) of what was skipped since the last item
        stream = self.shuffled(shards, np.random.default_rng((self.seed, self.epoch, self.rank, role)), problems)
        for _ in range(dropped):
            next(stream)
        problems.clear()  # reported before the run stopped
        patience = int(self.shard_list.counts[shards].sum()) + SHUFFLE_BUFFER  # a whole pass of unusable samples
        for _ in range(quota - dropped):
            made, tried = None, 0
            while made is None:
                if tried == patience:
                    named = [self.shard_list.shards[i] for i in shards[:3]]
                    raise UserError(f'{self.shard_list.path}: no usable audio in a whole pass over the shards '
                                    f'{named}; first problems: {problems[:3]}')
                made, tried = self.item(*next(stream), problems), tried + 1
            skipped = problems[:]
            problems.clear()
            yield made[0], made[1], skipped
