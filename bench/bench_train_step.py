"""Training-step throughput and peak memory of each encoder: 2 s crops, AAM-softmax over 5994 speakers, Adam.

  python bench/bench_train_step.py [--device cuda] [--batch_sizes 32 128] [--amp off bf16]
                                   [--compile off|on|both] [--encoders ...] [--seconds 5] [--json FILE]

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
import json
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

from common import environment, peak_rss_gib, synchronize, write_json
from loss import AAMsoftmax
from model import MODELS, build_encoder, crop_samples
from trainer import SpeakerModel, TrainingStep

ENCODERS = [('ecapa-tdnn', 1024), ('resnet34', 32), ('tdnn', 512)]
SPEAKERS = 5994


def measure(name, C, batch_size, amp, compile, device, seconds):
    device = torch.device(device)
    torch.manual_seed(0)
    embedding_dim = MODELS[name].embedding_dim
    model = SpeakerModel(build_encoder(name, C, 16000, embedding_dim),
                         AAMsoftmax(SPEAKERS, 0.2, 30, embedding_dim)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, weight_decay=2e-5)
    step = TrainingStep(model, optimizer, device, amp, compile)
    batch = (0.1 * torch.randn(batch_size, crop_samples(200, 16000)), torch.randint(0, SPEAKERS, (batch_size,)))
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        batch = tuple(t.pin_memory() for t in batch)
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
    args = parser.parse_args()
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
