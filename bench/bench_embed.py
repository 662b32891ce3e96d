"""Embedding throughput of each encoder: utterances per second for 2 s and 8 s inputs, eval mode, no gradients.

  python bench/bench_embed.py [--device cpu|cuda] [--batch 16] [--seconds 3] [--json bench/embed.json]

Each (encoder, length) is timed for about `--seconds` after one warm-up batch; prints a table and writes JSON.
"""

import argparse
import time

import torch

from common import environment, synchronize, write_json
from speakerkit.model import build_encoder

ENCODERS = [('ecapa-tdnn', 1024), ('ecapa-tdnn', 512), ('resnet34', 32), ('tdnn', 512)]


def throughput(encoder, batch, samples, device, seconds):
    x = 0.1 * torch.randn(batch, samples, device=device)
    with torch.no_grad():
        encoder(x)
        synchronize(device)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or done == 0:
            encoder(x)
            done += batch
        synchronize(device)
    return done / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--seconds', type=float, default=3.0)
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    print(f'device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}')
    print(f'{"encoder":<12} {"C":>5} {"params":>8} {"2 s utt/s":>10} {"8 s utt/s":>10}')
    for name, C in ENCODERS:
        encoder = build_encoder(name, C, 16000).to(device).eval()
        params = sum(p.numel() for p in encoder.parameters()) / 1e6
        rates = [throughput(encoder, args.batch, 16000 * s, device, args.seconds) for s in (2, 8)]
        rows.append({'encoder': name, 'C': C, 'params_millions': round(params, 2),
                     'utt_per_s_2s': round(rates[0], 1), 'utt_per_s_8s': round(rates[1], 1)})
        print(f'{name:<12} {C:>5} {params:>7.2f}M {rates[0]:>10.1f} {rates[1]:>10.1f}')
    write_json(args.json, {**environment(device), 'batch': args.batch, 'rows': rows})

if __name__ == '__main__':
    main()
