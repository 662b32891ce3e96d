"""From downloaded archives to what training reads, and a check of it all before a long run.

A module of its own because these are one-off tools with their own command line, not steps of the data path
that dataLoader.py keeps short:

  python prepare.py m4a SRC DST          VoxCeleb2's .m4a (AAC) files -> 16 kHz mono 16-bit .wav, same tree;
                                         parallel, resumable, never a truncated file
  python prepare.py train_list ROOT OUT  a <speaker>/<video>/<utt>.wav tree -> "speaker relative/path" lines
  python prepare.py musan SRC DST        MUSAN -> 5 s chunks every 3 s, <category>/<subset>/<stem>/NNNNN.wav
                                         (what --musan_path expects)
  python prepare.py rirs SRC DST         RIRS_NOISES -> <room type>/<room>/*.wav (what --rir_path expects)
  python prepare.py shards LIST ROOT DST a training list -> tar shards of 1,000 utterances, DST/shards.txt and
                                         DST/speakers.txt (what --train_shards reads; shards.py); resumable

`check_data` is what `trainECAPAModel.py --check_data` runs. AAC is decoded by PyAV (the `av` package on
PyPI, FFmpeg's libraries built into its wheel); everything else is read with soundfile.
"""

import argparse
import collections
import concurrent.futures
import multiprocessing
import os
import shutil
import sys

import numpy as np
import soundfile
import tqdm

from speakerkit.augment import MUSAN_CATEGORIES, musan_files, rir_files
from speakerkit.checkpoints import atomic_write
from speakerkit.dataLoader import audio_info, audio_problem, duration_problem, read_audio
from speakerkit.errors import ArgumentParser, UserError, reported_as_exit
from speakerkit.lists import files_under, list_lines, malformed, read_train_list, read_trials, without_repeats
from speakerkit.shards import pack_shards

PROBLEMS_SHOWN = 20


def write_wav(path, audio, sampling_rate):
    """16-bit PCM wav written whole to a temporary file and renamed: `path` is complete or absent."""
    def write(f):
        soundfile.write(f, audio, sampling_rate, subtype='PCM_16', format='WAV')
    atomic_write(path, write)


def convert_one(job):
    """(source, target, rate): the source (AAC in .m4a above all) read as the training loader reads it
    (`read_audio`: PyAV for what libsndfile does not read, channels averaged, resampled) into a 16-bit wav."""
    source, target, sampling_rate = job
    try:
        write_wav(target, read_audio(source, sampling_rate), sampling_rate)
        return None
    except Exception as error:  # reported with its file; the other files go on
        return f'{source}: {type(error).__name__}: {error}'


def apply_to_chunk(function, jobs):
    return [function(job) for job in jobs]


def map_in_processes(function, jobs, workers, description, chunk=16, **progress):
    """[function(job) for job in jobs], computed in `workers` spawned processes (in this one for 1) with a
    progress bar (`progress`: tqdm's options). A worker that dies (the OOM killer, a crashing decoder) ends
    the map: a `UserError` naming the files (each job's first item) that were not processed."""
    if workers <= 1:
        return [function(job) for job in tqdm.tqdm(jobs, desc=description, unit='file', **progress)]
    results = [None] * len(jobs)
    finished = [False] * len(jobs)
    context = multiprocessing.get_context('spawn')
    with tqdm.tqdm(total=len(jobs), desc=description, unit='file', **progress) as bar, \
            concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(apply_to_chunk, function, jobs[start:start + chunk]): start
                   for start in range(0, len(jobs), chunk)}
        try:
            for future in concurrent.futures.as_completed(futures):
                start = futures[future]
                done = future.result()
                results[start:start + len(done)] = done
                finished[start:start + len(done)] = [True] * len(done)
                bar.update(len(done))
        except concurrent.futures.process.BrokenProcessPool:
            left = [job[0] for job, complete in zip(jobs, finished) if not complete]
            raise UserError(f'{description}: a worker process died (killed for memory?); {len(left)} files were '
                            f'not processed, e.g. {", ".join(map(str, left[:PROBLEMS_SHOWN]))}') from None
    return results


def run_jobs(function, jobs, workers, description):
    """`function` over `jobs` in `workers` processes with a progress bar; returns the non-None results."""
    return [failure for failure in map_in_processes(function, jobs, workers, description) if failure]


def convert_m4a(source_root, target_root, sampling_rate=16000, workers=1, extension='.m4a'):
    """Every `extension` file under `source_root` -> the same relative path under `target_root` with .wav.
    Files whose .wav exists are skipped (a .wav is only ever renamed into place complete), so an interrupted
    conversion continues where it stopped. Returns (converted, already there, failures)."""
    sources = files_under(source_root, (extension,))
    if not sources:
        raise UserError(f'{source_root}: no {extension} files')
    jobs = []
    for rel in sources:
        target = os.path.join(target_root, os.path.splitext(rel)[0] + '.wav')
        if not os.path.exists(target):
            jobs.append((os.path.join(source_root, rel), target, sampling_rate))
    failures = run_jobs(convert_one, jobs, workers, 'decode') if jobs else []
    return len(jobs) - len(failures), len(sources) - len(jobs), failures


def write_train_list(root, out):
    """`speaker relative/path` for every audio file below `root`, the speaker being its first folder, sorted.
    Returns (utterances, speakers)."""
    paths = files_under(root)
    if not paths:
        raise UserError(f'{root}: no .wav or .flac files')
    loose = [p for p in paths if os.sep not in p]
    if loose:
        raise UserError(f'{root}: {len(loose)} files are not inside a speaker folder, e.g. {loose[0]}')
    lines = [f'{p.split(os.sep)[0]} {p.replace(os.sep, "/")}\n' for p in paths]
    atomic_write(out, lambda f: f.write(''.join(lines).encode()))
    return len(lines), len({p.split(os.sep)[0] for p in paths})


def chunk_starts(length, chunk, hop):
    """Starts of the `chunk`-sample windows every `hop` samples that fit in `length`; [0] for a shorter file,
    which is kept whole."""
    return list(range(0, length - chunk + 1, hop)) if length >= chunk else [0]


def split_one(job):
    source, target_dir, chunk_seconds, hop_seconds = job
    try:
        audio, rate = soundfile.read(source, dtype='int16', always_2d=True)
        audio = audio[:, 0]
        chunk, hop = int(chunk_seconds * rate), int(hop_seconds * rate)
        partial = target_dir + '.partial'
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for i, start in enumerate(chunk_starts(len(audio), chunk, hop)):
            soundfile.write(os.path.join(partial, f'{i:05d}.wav'), audio[start:start + chunk], rate,
                            subtype='PCM_16')
        os.replace(partial, target_dir)  # a stem's folder appears complete or not at all
        return None
    except Exception as error:
        return f'{source}: {type(error).__name__}: {error}'


def split_musan(source_root, target_root, chunk_seconds=5.0, hop_seconds=3.0, workers=1):
    """MUSAN's <category>/<subset>/<file>.wav -> <category>/<subset>/<file stem>/NNNNN.wav chunks of
    `chunk_seconds` every `hop_seconds` (first channel; a file shorter than a chunk is kept whole). Stems
    already split are skipped. Returns (split, already there, failures)."""
    jobs, done = [], 0
    for category in sorted(MUSAN_CATEGORIES):
        for rel in files_under(os.path.join(source_root, category), ('.wav',)):
            parts = rel.split(os.sep)
            if len(parts) < 2:
                continue  # MUSAN's ANNOTATIONS/LICENSE sit beside the subsets, never audio
            target = os.path.join(target_root, category, os.path.dirname(rel), os.path.splitext(parts[-1])[0])
            if os.path.isdir(target):
                done += 1
            else:
                jobs.append((os.path.join(source_root, category, rel), target, chunk_seconds, hop_seconds))
    if not jobs and not done:
        raise UserError(f'{source_root}: no {"/".join(sorted(MUSAN_CATEGORIES))}/<subset>/*.wav files')
    failures = run_jobs(split_one, jobs, workers, 'split') if jobs else []
    return len(jobs) - len(failures), done, failures


def recorded_rirs(source_root):
    """(rir id, room id, file) of each recorded impulse response named in real_rirs_isotropic_noises/rir_list,
    whose lines read `--rir-id ID --room-id ROOM RIRS_NOISES/real_rirs_isotropic_noises/FILE.wav`."""
    listing = os.path.join(source_root, 'real_rirs_isotropic_noises', 'rir_list')
    found = []
    for line in list_lines(listing, 'RIR list'):
        options = dict(zip(line.fields[:-1:2], line.fields[1:-1:2]))
        if '--rir-id' not in options or '--room-id' not in options:
            raise malformed(listing, line, '"--rir-id ID --room-id ROOM PATH"')
        source = os.path.join(os.path.dirname(source_root.rstrip(os.sep)), line.fields[-1])
        if not os.path.exists(source):
            source = os.path.join(source_root, line.fields[-1].split('/', 1)[-1])
        found.append((options['--rir-id'], options['--room-id'], source))
    return found


def layout_rirs(source_root, target_root, real=False):
    """RIRS_NOISES -> `target_root`/<room type>/<room>/*.wav: the simulated rooms linked as they are and,
    with `real`, the recorded impulse responses named in real_rirs_isotropic_noises/rir_list (first channel
    written to real/<room id>/<rir id>.wav; the isotropic noises there are left out). Returns the count."""
    simulated = os.path.join(source_root, 'simulated_rirs')
    count = 0
    for rel in files_under(simulated, ('.wav',)):
        if len(rel.split(os.sep)) != 3:
            continue
        target = os.path.join(target_root, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.path.abspath(os.path.join(simulated, rel)), target)
        count += 1
    for rir_id, room_id, source in (recorded_rirs(source_root) if real else []):
        target = os.path.join(target_root, 'real', room_id, rir_id + '.wav')
        if not os.path.exists(target):
            audio, rate = soundfile.read(source, dtype='float32', always_2d=True)
            atomic_write(target, lambda f, audio=audio, rate=rate: soundfile.write(f, audio[:, 0], rate,
                                                                                   subtype='FLOAT', format='WAV'))
        count += 1
    if count == 0:
        raise UserError(f'{source_root}: no simulated_rirs/<room type>/<room>/*.wav files')
    return count


# ---------------------------------------------------------------- --check_data

def inspect_file(job):
    """(path, decode, skip_silent) -> {'seconds', 'rate', 'channels'} or {'problem'}, read as the training
    loader reads (`dataLoader.audio_info`, `read_audio`: libsndfile's formats, and m4a through PyAV), so that a
    file passes exactly when the loader can train on it."""
    path, decode, skip_silent = job
    try:
        frames, rate, channels = audio_info(path)
    except Exception as error:
        return {'problem': 'missing' if not os.path.exists(path) else f'unreadable: {error}'}
    found = {'seconds': frames / rate, 'rate': rate, 'channels': channels}
    problem = duration_problem(found['seconds'])
    if problem:
        return {'problem': problem}
    if decode:
        try:
            audio = read_audio(path, rate)
        except Exception as error:
            return {'problem': f'does not decode: {error}'}
        problem = audio_problem(audio, skip_silent)
        if problem:
            return {'problem': problem}
    return found


def data_sources(args):
    """[(name, {absolute path: (list, first line naming it) or None}, speakers or None)] for what `args`
    names."""
    sources = []
    if args.train_list:
        entries = read_train_list(args.train_list)
        references = {}
        for entry in entries:
            references.setdefault(os.path.join(args.train_path, entry.path), (args.train_list, entry.line))
        sources.append((f'train list {args.train_list}', references, {entry.speaker for entry in entries}))
    for trial_list in args.eval_list or []:
        references = read_trials(trial_list).references()
        sources.append((f'trial list {trial_list}', {
            os.path.join(args.eval_path, rel): (trial_list, line) for rel, line in references.items()},
            {rel.split('/')[0] for rel in references}))
    if args.musan_path:
        found = musan_files(args.musan_path)
        for category in sorted(MUSAN_CATEGORIES):
            sources.append((f'MUSAN {category} {args.musan_path}', dict.fromkeys(found.get(category, [])), None))
    if args.rir_path:
        sources.append((f'RIRs {args.rir_path}', dict.fromkeys(rir_files(args.rir_path)), None))
    return sources


def evenly_spread(count, chosen):
    """`chosen` indices spread evenly over range(count) (all when `chosen` is 0 or at least `count`)."""
    if chosen == 0 or chosen >= count:
        return set(range(count))
    return set(np.linspace(0, count - 1, chosen).round().astype(int).tolist())


def describe(name, results, speakers, decoded, sampling_rate):
    good = [r for r in results if 'problem' not in r]
    text = f'{name}: {len(results)} files'
    if speakers is not None:
        text += f', {len(speakers)} speakers'
    if good:
        seconds = np.array([r['seconds'] for r in good])
        rates = collections.Counter(r['rate'] for r in good)
        channels = collections.Counter(r['channels'] for r in good)
        text += (f', {seconds.sum() / 3600:.2f} h, {seconds.min():.2f}-{seconds.max():.2f} s per file (mean '
                 f'{seconds.mean():.2f}), rates ' + ', '.join(f'{rate} Hz x{n}' for rate, n in sorted(rates.items()))
                 + ', channels ' + ', '.join(f'{c} x{n}' for c, n in sorted(channels.items())))
        if set(rates) != {sampling_rate}:
            text += f' (resampled to {sampling_rate} Hz when read)'
    return text + ('; all decoded in full' if decoded == len(results) else
                   f'; {decoded} decoded in full, the others\' headers read')


def check_data(args, out=None):
    """Check every source `args` names: each file exists and has a readable header; `args.check_decode` of
    each source's files (spread evenly; 0: all) decode to finite, non-empty (and, with --skip_silent on,
    not silent) audio. Prints a summary per source and the first problems with the list line naming the
    file. Returns the problems, ['where: path: what', ...]."""
    out = out or sys.stdout
    problems = []
    skip_silent = args.skip_silent
    try:
        sources = data_sources(args)
    except UserError as error:
        sources, problems = [], [str(error)]
    for name, references, speakers in sources:
        paths = sorted(references)
        if not paths:
            problems.append(f'{name}: no audio files in the expected layout')
            continue
        decode = evenly_spread(len(paths), args.check_decode)
        jobs = [(path, i in decode, skip_silent) for i, path in enumerate(paths)]
        workers = max(1, args.n_cpu) if len(jobs) > 64 else 1
        results = map_in_processes(inspect_file, jobs, workers, 'check', chunk=32, file=out,
                                   disable=len(jobs) < 1000)
        found = sorted(((references[path] or ('', 0))[1], path, result['problem'])
                       for path, result in zip(paths, results) if 'problem' in result)
        for line, path, problem in found:
            where = f'{references[path][0]}:{line}: ' if references[path] else ''
            problems.append(f'{where}{path}: {problem}')
        print(describe(name, results, speakers, len(decode), args.sampling_rate), file=out)
    if problems:
        print(f'{len(problems)} problems' + (f', the first {PROBLEMS_SHOWN}' if len(problems) > PROBLEMS_SHOWN else '')
              + ':', file=out)
        for problem in problems[:PROBLEMS_SHOWN]:
            print(f'  {problem}', file=out)
    else:
        print('no problems found', file=out)
    return problems


def build_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    m4a = commands.add_parser('m4a', help='decode VoxCeleb2 .m4a files to 16-bit mono .wav (same tree)')
    m4a.add_argument('source', help='folder of .m4a files, e.g. vox2_dev_aac/aac')
    m4a.add_argument('target', help='folder for the .wav tree, e.g. voxceleb2/wav')
    m4a.add_argument('--sampling_rate', type=int, default=16000)
    m4a.add_argument('--extension', default='.m4a', help='which files to convert')
    listing = commands.add_parser('train_list', help='write a training list from a <speaker>/<video>/<utt> tree')
    listing.add_argument('root')
    listing.add_argument('out')
    musan = commands.add_parser('musan', help='split MUSAN into 5 s chunks every 3 s for --musan_path')
    musan.add_argument('source', help='the unpacked musan folder (music/, noise/, speech/)')
    musan.add_argument('target')
    musan.add_argument('--chunk_seconds', type=float, default=5.0)
    musan.add_argument('--hop_seconds', type=float, default=3.0)
    rirs = commands.add_parser('rirs', help='lay out RIRS_NOISES for --rir_path')
    rirs.add_argument('source', help='the unpacked RIRS_NOISES folder')
    rirs.add_argument('target')
    rirs.add_argument('--real', action='store_true', help='also the recorded impulse responses of rir_list')
    shards = commands.add_parser('shards', help='pack a training list into tar shards for --train_shards')
    shards.add_argument('train_list', help='lines "<speaker> <relative path>"')
    shards.add_argument('train_path', help='folder the list\'s paths are relative to')
    shards.add_argument('target', help='folder for shard-NNNNNN.tar, shards.txt and speakers.txt')
    shards.add_argument('--per_shard', type=int, default=1000, help='utterances per shard')
    shards.add_argument('--seed', type=int, default=0, help='seed of the order utterances are packed in')
    for command in (m4a, musan, shards):
        command.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='decoding processes')
    return parser


def run(args):
    """The command `args` names; returns the exit status (1 when some files failed)."""
    if args.command == 'train_list':
        utterances, speakers = write_train_list(args.root, args.out)
        print(f'{args.out}: {utterances} utterances of {speakers} speakers')
        return 0
    if args.command == 'shards':
        if args.per_shard < 1:
            raise UserError(f'--per_shard must be at least 1, got {args.per_shard}')
        train_list, repeats = without_repeats(read_train_list(args.train_list))
        shard_list = pack_shards(train_list, args.train_path, args.target, args.per_shard, args.seed, args.workers)
        print(f'{shard_list}: {len(train_list)} utterances of {len(train_list.speakers)} speakers in '
              f'{-(-len(train_list) // args.per_shard)} shards' + (f' ({repeats} repeated lines left out)' if repeats
                                                                   else ''))
        return 0
    if args.command == 'rirs':
        print(f'{args.target}: {layout_rirs(args.source, args.target, args.real)} impulse responses')
        return 0
    if args.command == 'm4a':
        done, before, failures = convert_m4a(args.source, args.target, args.sampling_rate, args.workers,
                                             args.extension)
    else:
        done, before, failures = split_musan(args.source, args.target, args.chunk_seconds, args.hop_seconds,
                                             args.workers)
    print(f'{args.target}: {done} files written now, {before} already there, {len(failures)} failed')
    for failure in failures[:PROBLEMS_SHOWN]:
        print(f'  {failure}')
    return 1 if failures else 0


def main(argv=None):
    with reported_as_exit(os.path.basename(sys.argv[0]) if argv is None else 'prepare.py'):
        return run(build_parser().parse_args(argv))

