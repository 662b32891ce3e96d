"""Can an encoder, at a learning rate, fit one fixed batch? AAM-softmax over 8 classes, 16 crops of 1 s of
random noise (two per class), the trainer's Adam (`trainer.adam`), no schedule: a check of the optimisation
alone, minutes on a CPU. An encoder that cannot drive this loss down at a rate will not train at it either.

  python bench/fit_one_batch.py --model redimnet --lr 1e-3 1e-4
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..')))
from speakerkit.loss import AAMsoftmax  # noqa: E402
from speakerkit.model import build_encoder  # noqa: E402
from speakerkit.trainer import adam  # noqa: E402


def fit(model, C, lr, steps, seed=0):
    """The loss before each step and after the last, of one fixed batch trained `steps` times."""
    torch.manual_seed(seed)
    encoder = build_encoder(model, C)
    head = AAMsoftmax(8, 0.2, 30, encoder.embedding_dim)
    waveforms = torch.randn(16, 16000) * 0.1
    labels = torch.arange(16) % 8
    optimiser = adam(list(encoder.parameters()) + list(head.parameters()), lr)
    losses = []
    for _ in range(steps):
        loss = head(encoder(waveforms), labels)[0]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(head(encoder(waveforms), labels)[0].item())
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='ecapa-tdnn')
    parser.add_argument('--C', type=int, help='width (default: the encoder\'s)')
    parser.add_argument('--lr', type=float, nargs='+', default=[1e-3])
    parser.add_argument('--steps', type=int, default=25)
    args = parser.parse_args()
    for lr in args.lr:
        started = time.time()
        losses = fit(args.model, args.C, lr, args.steps)
        shown = range(0, len(losses), max(1, args.steps // 4))
        print(f'{args.model} lr {lr:g}, loss after steps {", ".join(map(str, shown))}: '
              f'{" ".join(f"{losses[i]:.2f}" for i in shown)} ({time.time() - started:.0f} s)')


if __name__ == '__main__':
    main()
