"""Size and cost of encoders side by side: parameters, multiply-accumulates of one 2 s utterance's forward pass,
and on this machine the time of a training step (batch of 2 s crops, AAM-softmax, Adam, as the trainer takes
it) and of embedding one 2 s utterance.

  python bench/bench_encoders.py [--encoders ecapa-tdnn:512 campplus redimnet-b0 redimnet-b2] [--batch_size 32]
                                 [--classes 200] [--steps 3] [--json FILE]

MACs are counted by torch.utils.flop_counter (matrix products and convolutions: FLOPs / 2) in the encoder's
forward pass without its features; the step and embedding times are medians after one warm-up, on the CPU
unless --device says otherwise.
"""

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import environment, synchronize, write_json
from speakerkit.dataLoader import Batch
from speakerkit.loss import AAMsoftmax
from speakerkit.model import MODELS, build_encoder, crop_samples
from speakerkit.trainer import SpeakerModel, TrainingStep, adam

DEFAULT = ['ecapa-tdnn:512', 'campplus', 'redimnet-b0', 'redimnet-b2']


def macs_per_utterance(encoder, samples):
    """Multiply-accumulates of the network on the features of one utterance of `samples`."""
    encoder.eval()
    with torch.no_grad():
        features = encoder.features(0.1 * torch.randn(1, samples), False)
        network = type(encoder).forward
        encoder.features = lambda x, aug: x  # count the network alone: the features go in as they are
        try:
            with FlopCounterMode(display=False) as counter:
                network(encoder, features)
        finally:
            del encoder.features
    return counter.get_total_flops() / 2


def median_seconds(run, steps, device):
    run()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(name, C, args):
    torch.manual_seed(0)
    device = torch.device(args.device)
    encoder = build_encoder(name, C, 16000)
    samples = crop_samples(200, 16000)
    row = {'encoder': name, 'C': C or MODELS[name].width, 'embedding_dim': encoder.embedding_dim,
           'parameters': sum(p.numel() for p in encoder.parameters()),
           'gmacs_per_2s': macs_per_utterance(encoder, samples) / 1e9}
    model = SpeakerModel(encoder, AAMsoftmax(args.classes, 0.2, 30, encoder.embedding_dim)).to(device).train()
    step = TrainingStep(model, adam(model.parameters(), 0.001), device, 'off', False)
    batch = Batch((0.1 * torch.randn(args.batch_size, samples),), torch.randint(0, args.classes, (args.batch_size,)),
                  [])
    row['train_step_s'] = median_seconds(lambda: step(batch, None), args.steps, device)
    encoder.eval()
    utterance = (0.1 * torch.randn(1, samples)).to(device)
    with torch.no_grad():
        row['embed_2s_ms'] = 1000 * median_seconds(lambda: encoder(utterance), 5 * args.steps, device)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--encoders', nargs='+', default=DEFAULT, metavar='NAME[:C]')
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--classes', type=int, default=200)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json')
    args = parser.parse_args()
    print(f'{"encoder":<16} {"params":>8} {"GMACs/2s":>9} {"step s":>7} {"embed ms":>9}   '
          f'(batch {args.batch_size} of 2 s crops, {args.classes} classes, {args.device})')
    rows = []
    for spec in args.encoders:
        name, _, width = spec.partition(':')
        row = measure(name, int(width) if width else None, args)
        rows.append(row)
        print(f'{spec:<16} {row["parameters"] / 1e6:>7.2f}M {row["gmacs_per_2s"]:>9.2f} {row["train_step_s"]:>7.2f} '
              f'{row["embed_2s_ms"]:>9.1f}', flush=True)
    write_json(args.json, {**environment(args.device), 'batch_size': args.batch_size, 'classes': args.classes,
                           'rows': rows})


if __name__ == '__main__':
    main()
