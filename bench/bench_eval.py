"""Embedding extraction for evaluation: utterances per second, batched (what --eval does) versus one file at
a time (the original's loop), with the same protocol vectors (full utterance + 5 evenly spaced 3 s crops).

  python bench/bench_eval.py [--device cuda] [--files 24] [--C 1024] [--workers N] [--json FILE]

Files: generated speech of 4-10 s at 16 kHz, every length distinct as in VoxCeleb1 (so full-utterance
passes cannot share a batch; crops can). ECAPA-TDNN with random weights. Both ways are timed after a
warm-up on the first file; the largest difference between their vectors is printed as a check.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from common import environment, synchronize, write_json
import demo
from dataLoader import read_audio
from model import build_encoder
from tools import embed_files, protocol_vectors_of


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
    args = parser.parse_args()
    device = torch.device(args.device)
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
