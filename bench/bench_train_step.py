"""Training-step throughput and peak memory of each encoder: 2 s crops, AAM-softmax over 5994 speakers, Adam.

  python bench/bench_train_step.py [--device cuda] [--batch_sizes 32 128] [--amp off bf16]
                                   [--compile off|on|both] [--encoders ...] [--seconds 5] [--json FILE]
  python bench/bench_train_step.py --reference DIR [--widths 512 1024] [--rounds 3] [--steps 3]

With --reference (a checkout of TaoRuijie/ECAPA-TDNN, see bench/reference.py) it times instead ECAPA-TDNN
steps of ours (SpeakerModel + TrainingStep: non-finite check, batch-norm rollback, exact-resume state) beside
the original's `ECAPAModel.train_network`, on the same batches of 2 s crops (batch 32, AAM-softmax over 5994
speakers, Adam), in one process, alternating: each round times `--steps` steps of each, the two taking turns
at going first. The ratio is ours' median step time over the original's (below 1: ours is faster).

On CPU each configuration runs in its own process (so peak memory is its own): warm-up steps (one on CPU, two on
CUDA for cuDNN's autotuning, three when compiled), then at least two steps and about `--seconds`, timed to
the last step's completion. Peak memory is
torch.cuda.max_memory_allocated on CUDA and the process's maximum resident set on CPU. On CUDA the first
timed step also runs under torch.cuda.set_sync_debug_mode('warn'); `syncs` counts the host-device
synchronisations it reported. Defaults: batch 32 on CPU, 32 and 128 on CUDA; eager on CPU, eager and
compiled on CUDA (`--compile both` adds compiled rows on CPU, where compiling takes about a minute per
encoder).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

import reference
from common import environment, peak_rss_gib, synchronize, write_json
from speakerkit.dataLoader import Batch
from speakerkit.loss import AAMsoftmax
from speakerkit.model import MODELS, build_encoder, crop_samples
from speakerkit.trainer import SpeakerModel, TrainingStep, adam

ENCODERS = [('ecapa-tdnn', 1024), ('resnet34', 32), ('tdnn', 512)]
SPEAKERS = 5994


def measure(name, C, batch_size, amp, compile, device, seconds):
    device = torch.device(device)
    torch.manual_seed(0)
    embedding_dim = MODELS[name].embedding_dim
    model = SpeakerModel(build_encoder(name, C, 16000, embedding_dim),
                         AAMsoftmax(SPEAKERS, 0.2, 30, embedding_dim)).to(device).train()
    optimizer = adam(model.parameters(), 0.001)
    step = TrainingStep(model, optimizer, device, amp, compile)
    crops, labels = 0.1 * torch.randn(batch_size, crop_samples(200, 16000)), torch.randint(0, SPEAKERS, (batch_size,))
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        crops, labels = crops.pin_memory(), labels.pin_memory()
    batch = Batch((crops,), labels, [])
    for _ in range(3 if compile else 2 if device.type == 'cuda' else 1):
        step(batch, None)
    synchronize(device)
    syncs = None
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            step(batch, None)
            torch.cuda.set_sync_debug_mode('default')
        syncs = sum('synchroniz' in str(w.message) for w in caught)
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < seconds:
        loss, _, _ = step(batch, None)
        steps += 1
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else peak_rss_gib()
    return {'encoder': name, 'C': C, 'batch': batch_size, 'amp': amp, 'compiled': compile,
            'steps_per_s': steps / elapsed, 'crops_per_s': steps * batch_size / elapsed,
            'peak_memory_gib': peak_gib, 'syncs': syncs, 'final_loss': float(loss)}


def run_one(config, args):
    """One configuration: in this process on CUDA (its peak-memory counter resets), in a child process on
    CPU (where the peak resident set cannot be reset)."""
    if torch.device(args.device).type == 'cuda':
        try:
            return measure(*config, args.device, args.seconds)
        finally:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    done = subprocess.run([sys.executable, __file__, '--one', json.dumps(config), '--device', args.device,
                           '--seconds', str(args.seconds)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_with_reference(directory, widths, batch_size, rounds, steps, device):
    """Rows of (width, our median step seconds, the original's, ratio), alternating rounds in this process."""
    original = reference.load(directory)
    rng = torch.Generator().manual_seed(0)
    waveforms = 0.1 * torch.randn(batch_size, crop_samples(200, 16000), generator=rng)
    labels = torch.randint(0, SPEAKERS, (batch_size,), generator=rng)
    rows = []
    for C in widths:
        torch.manual_seed(0)
        model = SpeakerModel(build_encoder('ecapa-tdnn', C, 16000, 192), AAMsoftmax(SPEAKERS, 0.2, 30, 192))
        ours = TrainingStep(model.to(device).train(), adam(model.parameters(), 0.001),
                            device)
        with reference.cpu_patches():
            theirs = original['ECAPAModel'].ECAPAModel(lr=0.001, lr_decay=0.97, C=C, n_class=SPEAKERS, m=0.2, s=30,
                                                       test_step=1).to(device)
        batch = Batch((waveforms,), labels, [])
        ours(batch, None)  # warm-up
        run_theirs(theirs, [(waveforms, labels)])
        runs = {'ours': lambda ours=ours, batch=batch: [ours(batch, None) for _ in range(steps)],
                'original': lambda theirs=theirs: run_theirs(theirs, [(waveforms, labels)] * steps)}
        times = {'ours': [], 'original': []}
        for round_ in range(rounds):
            for name in (('ours', 'original') if round_ % 2 == 0 else ('original', 'ours')):  # each first by turns
                start = time.perf_counter()
                runs[name]()
                synchronize(device)
                times[name].append((time.perf_counter() - start) / steps)
        ours_s, theirs_s = float(np.median(times['ours'])), float(np.median(times['original']))
        rows.append({'C': C, 'batch': batch_size, 'ours_step_s': ours_s, 'original_step_s': theirs_s,
                     'ratio': ours_s / theirs_s, 'rounds': times})
        print(f'ecapa-tdnn C={C:<5} batch {batch_size}: ours {ours_s:.3f} s/step, original {theirs_s:.3f} s/step, '
              f'ours / original {ours_s / theirs_s:.2f}x', flush=True)
    return rows


def run_theirs(model, batches):
    """The original's training loop over `batches`, its progress line (written to stderr per step) discarded."""
    with reference.cpu_patches(), open(os.devnull, 'w') as devnull, contextlib.redirect_stderr(devnull), \
            contextlib.redirect_stdout(devnull):
        model.train_network(1, batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch_sizes', type=int, nargs='+')
    parser.add_argument('--amp', nargs='+', default=['off', 'bf16'], choices=['off', 'bf16', 'fp16'])
    parser.add_argument('--compile', choices=['off', 'on', 'both'],
                        help='eager steps, compiled steps or both (default: both on CUDA, off on CPU)')
    parser.add_argument('--encoders', nargs='+', default=[name for name, _ in ENCODERS])
    parser.add_argument('--seconds', type=float, default=5.0)
    parser.add_argument('--json', help='also write the figures here')
    parser.add_argument('--one', help=argparse.SUPPRESS)
    parser.add_argument('--reference', metavar='DIR', help='time ours beside the original code in DIR')
    parser.add_argument('--widths', type=int, nargs='+', default=[512, 1024], help='--reference: ECAPA-TDNN C')
    parser.add_argument('--rounds', type=int, default=4, help='--reference: alternating rounds')
    parser.add_argument('--steps', type=int, default=3, help='--reference: steps of each per round')
    args = parser.parse_args()
    if args.reference:
        rows = compare_with_reference(args.reference, args.widths, (args.batch_sizes or [32])[0], args.rounds,
                                      args.steps, args.device)
        write_json(args.json, {**environment(args.device), 'speakers': SPEAKERS, 'reference': args.reference,
                               'rows': rows})
        return
    if args.one:
        name, C, batch_size, amp, compile = json.loads(args.one)
        print(json.dumps(measure(name, C, batch_size, amp, compile, args.device, args.seconds)))
        return
    cuda = torch.device(args.device).type == 'cuda'
    batch_sizes = args.batch_sizes or ([32, 128] if cuda else [32])
    compiled = {'off': [False], 'on': [True], 'both': [False, True]}[args.compile or ('both' if cuda else 'off')]
    rows = []
    print(f'{"encoder":<11} {"batch":>5} {"amp":>4} {"compiled":>8} {"steps/s":>8} {"crops/s":>8} '
          f'{"peak GiB":>8} {"syncs":>5}')
    for name, C in ENCODERS:
        if name not in args.encoders:
            continue
        for batch_size in batch_sizes:
            for amp in args.amp:
                for compile in compiled:
                    try:
                        row = run_one([name, C, batch_size, amp, compile], args)
                    except RuntimeError as error:
                        print(f'{name:<11} {batch_size:>5} {amp:>4} {str(compile):>8} failed: {error}', flush=True)
                        continue
                    rows.append(row)
                    print(f'{name:<11} {batch_size:>5} {amp:>4} {str(compile):>8} {row["steps_per_s"]:>8.2f} '
                          f'{row["crops_per_s"]:>8.1f} {row["peak_memory_gib"]:>8.2f} '
                          f'{"-" if row["syncs"] is None else row["syncs"]:>5}', flush=True)
    write_json(args.json, {**environment(args.device), 'speakers': SPEAKERS, 'rows': rows})


if __name__ == '__main__':
    np.seterr(all='ignore')
    main()
