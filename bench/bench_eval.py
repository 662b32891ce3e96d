"""Embedding extraction for evaluation: utterances per second, batched (what --eval does) versus one file at
a time (the original's loop), with the same protocol vectors (full utterance + 5 evenly spaced 3 s crops).

  python bench/bench_eval.py [--device cuda] [--files 24] [--C 1024] [--workers N] [--json FILE]
  python bench/bench_eval.py --reference DIR [--files 48] [--C 512] [--rounds 2]

With --reference (a checkout of TaoRuijie/ECAPA-TDNN, see bench/reference.py) it times instead a whole trial
list scored by ours (`evaluation.evaluate`, `--workers` readers) beside the original's `eval_network`, with the
same weights, on LibriSpeech recordings from ../shared/data (generated speech without it), in one process,
alternating rounds: ours in float32 and with --eval_precision bf16 (`evaluation.Autocast`), then the original; it
prints files per second of each, the ratios and the EERs (float32's must agree with the original's).

Files: generated speech of 4-10 s at 16 kHz, every length distinct as in VoxCeleb1 (so full-utterance
passes cannot share a batch; crops can). ECAPA-TDNN with random weights. Both ways are timed after a
warm-up on the first file; the largest difference between their vectors is printed as a check.
"""

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np
import torch

import reference
from common import SHARED_DATA, environment, synchronize, write_json
from speakerkit import demo
from speakerkit.dataLoader import read_audio
from speakerkit.lists import read_trials
from speakerkit.model import build_encoder
from speakerkit.evaluation import Autocast, embed_files, evaluate, protocol_vectors_of


def one_at_a_time(encoder, paths, root, device):
    vectors = {}
    for path in paths:
        waveform = torch.from_numpy(read_audio(os.path.join(root, path), encoder.sampling_rate))
        vectors[path] = protocol_vectors_of(encoder, [waveform], device)[0]
    return vectors


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def trial_set(root, files):
    """(eval_path, trial list path, file count): `files` LibriSpeech recordings (generated speech without
    ../shared/data), each paired with the next, labels alternating."""
    librispeech = os.path.join(SHARED_DATA, 'librispeech_251')
    if os.path.isdir(librispeech):
        eval_path = librispeech
        paths = sorted(os.path.relpath(os.path.join(folder, name), librispeech)
                       for folder, _, names in os.walk(librispeech) for name in names if name.endswith('.flac'))
        paths = paths[:files]
    else:
        eval_path = root
        paths = [rel for _, rel in demo.write_speakers(root, 1, files // 8 + 1, 8, np.random.default_rng(0),
                                                        seconds=(4.0, 10.0))[:files]]
    trial_list = os.path.join(root, 'trials.txt')
    with open(trial_list, 'w') as f:
        f.writelines(f'{i % 2} {a} {b}\n' for i, (a, b) in enumerate(zip(paths, paths[1:] + paths[:1])))
    return eval_path, trial_list, len(paths)


def compare_with_reference(args, device):
    original = reference.load(args.reference)
    torch.manual_seed(0)
    encoder = build_encoder('ecapa-tdnn', args.C, 16000).to(device).eval()
    with reference.cpu_patches():
        theirs = original['ECAPAModel'].ECAPAModel(lr=0.001, lr_decay=0.97, C=args.C, n_class=10, m=0.2, s=30,
                                                   test_step=1).to(device)
    theirs.speaker_encoder.load_state_dict(encoder.state_dict())
    with tempfile.TemporaryDirectory() as root:
        eval_path, trial_list, files = trial_set(root, args.files or 48)
        trials = read_trials(trial_list)
        seconds = sum(len(read_audio(os.path.join(eval_path, p), 16000)) for p in set(trials.enroll)) / 16000

        def ours(model):
            return lambda: evaluate(model, [trials], eval_path, device, n_cpu=args.workers)[trial_list].metrics.eer

        def original_eval():
            with reference.cpu_patches(), open(os.devnull, 'w') as devnull, \
                    contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
                return float(theirs.eval_network(trial_list, eval_path)[0])
        ways = {'ours': ours(encoder), 'ours, --eval_precision bf16': ours(Autocast(encoder)),
                'original': original_eval}
        times, eers = {name: [] for name in ways}, {}
        for _ in range(args.rounds):
            for name, way in ways.items():
                eers[name], elapsed = timed(way, device)
                times[name].append(elapsed)
    rates = {name: files / float(np.median(elapsed)) for name, elapsed in times.items()}
    print(f'{files} files ({seconds / files:.1f} s each on average), ECAPA-TDNN C={args.C} on {device}, '
          f'{args.rounds} alternating rounds, ours with {args.workers} readers')
    for name, rate in rates.items():
        print(f'{name}: {rate:.2f} files/s, {rate / rates["original"]:.2f}x the original; EER {eers[name]:.4f}%')
    write_json(args.json, {**environment(device), 'reference': args.reference, 'files': files,
                           'mean_seconds': seconds / files, 'C': args.C, 'workers': args.workers,
                           'files_per_s': rates, 'ratio': {n: r / rates['original'] for n, r in rates.items()},
                           'eer': eers, 'rounds': times})


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if cuda else 'cpu')
    parser.add_argument('--files', type=int, default=None, help='default: 240 on CUDA, 24 on CPU')
    parser.add_argument('--C', type=int, default=1024)
    parser.add_argument('--batch_size', type=int, default=16, help='files per batch of the batched way')
    parser.add_argument('--workers', type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help='reader processes of the batched way')
    parser.add_argument('--json', help='also write the figures here')
    parser.add_argument('--reference', metavar='DIR', help='score a trial list beside the original code in DIR')
    parser.add_argument('--rounds', type=int, default=2, help='--reference: alternating rounds')
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.reference:
        compare_with_reference(args, device)
        return
    files = args.files or (240 if device.type == 'cuda' else 24)
    encoder = build_encoder('ecapa-tdnn', args.C, 16000).to(device).eval()
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        entries = demo.write_speakers(root, 1, files // 8 + 1, 8, rng, seconds=(4.0, 10.0))[:files]
        paths = [rel for _, rel in entries]
        seconds = sum(len(read_audio(os.path.join(root, p), 16000)) for p in paths) / 16000
        one_at_a_time(encoder, paths[:1], root, device)
        single, single_time = timed(lambda: one_at_a_time(encoder, paths, root, device), device)
        batched, batched_time = timed(lambda: embed_files(encoder, paths, root, device, n_cpu=args.workers,
                                                          batch_size=args.batch_size, progress=False), device)
    difference = max(float((single[p] - batched[p]).abs().max()) for p in paths)
    rows = [{'way': 'one file at a time', 'utt_per_s': files / single_time, 'seconds': single_time},
            {'way': f'batched ({args.batch_size} files, {args.workers} readers)', 'utt_per_s': files / batched_time,
             'seconds': batched_time}]
    print(f'{files} files, {seconds / 60:.1f} min of audio, ECAPA-TDNN C={args.C} on {device}')
    print(f'{"way":<36} {"utt/s":>8} {"seconds":>8}')
    for row in rows:
        print(f'{row["way"]:<36} {row["utt_per_s"]:>8.1f} {row["seconds"]:>8.1f}')
    print(f'speed-up {single_time / batched_time:.1f}x; largest vector difference {difference:.2e}')
    write_json(args.json, {**environment(device), 'files': files, 'audio_seconds': seconds, 'C': args.C,
                           'rows': rows, 'max_vector_difference': difference})


if __name__ == '__main__':
    main()
