"""bench/: the scripts that measure what the tests do not (speed, size) still run against the current code, on a
tiny setting each, and write what they say they write. Their figures are not checked here: bench/RESULTS.md
holds them."""

import json
import os
import subprocess
import sys

import pytest
import torch

from speakerkit.model import build_encoder, crop_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, *flags):
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', script), *flags], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_train_step_bench_times_a_step(tmp_path):
    run_bench('bench_train_step.py', '--encoders', 'tdnn', '--batch_sizes', '2', '--amp', 'off', '--compile', 'off',
              '--seconds', '0', '--json', str(tmp_path / 'steps.json'))
    rows = json.loads((tmp_path / 'steps.json').read_text())['rows']
    assert [(row['encoder'], row['batch']) for row in rows] == [('tdnn', 2)] and rows[0]['steps_per_s'] > 0


def test_encoder_bench_counts_parameters_and_multiply_accumulates(tmp_path):
    run_bench('bench_encoders.py', '--encoders', 'tdnn:16', 'redimnet-b0:8', '--batch_size', '2', '--steps', '1',
              '--json', str(tmp_path / 'encoders.json'))
    rows = json.loads((tmp_path / 'encoders.json').read_text())['rows']
    tdnn = rows[0]
    # The x-vector at 16 channels: its frame layers' products at each frame they output (contexts 5, 3 dilated 2,
    # 3 dilated 3, 1, 1), then the segment layers 3000 -> 512 -> 512.
    frames = build_encoder('tdnn', 16).features(torch.zeros(1, crop_samples(200, 16000)), False).shape[-1]
    layers = [(frames - 4, 80 * 16 * 5), (frames - 8, 16 * 16 * 3), (frames - 14, 16 * 16 * 3),
              (frames - 14, 16 * 16), (frames - 14, 16 * 1500)]
    expected = sum(n * macs for n, macs in layers) + 3000 * 512 + 512 * 512
    assert tdnn['encoder'] == 'tdnn' and round(tdnn['gmacs_per_2s'] * 1e9) == expected
    assert rows[1]['parameters'] == sum(p.numel() for p in build_encoder('redimnet-b0', 8).parameters())
    assert all(row['train_step_s'] > 0 and row['embed_2s_ms'] > 0 for row in rows)


@pytest.mark.slow
def test_fitting_one_batch_drives_an_encoders_loss_down():
    printed = run_bench('fit_one_batch.py', '--model', 'tdnn', '--C', '16', '--lr', '1e-3', '--steps', '4')
    assert printed.startswith('tdnn lr 0.001, loss after steps 0, 1, 2, 3, 4: ')
    losses = [float(x) for x in printed.split(': ')[1].split(' (')[0].split()]
    assert len(losses) == 5 and losses[-1] < losses[0] / 2


def test_recomputed_batch_norm_statistics_are_the_plain_average_over_the_batches():
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    from recompute_batch_norm import recompute
    encoder = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    encoder[1].running_mean.fill_(5.0)  # statistics left by training, to be replaced
    weights = {k: v.clone() for k, v in encoder.state_dict().items() if 'running' not in k and 'tracked' not in k}
    batches = [torch.randn(8, 3) + shift for shift in (0.0, 2.0, -1.0)]
    recompute(encoder, batches)
    outputs = [encoder[0](batch).detach() for batch in batches]
    assert torch.allclose(encoder[1].running_mean, torch.stack([o.mean(0) for o in outputs]).mean(0), atol=1e-6)
    assert torch.allclose(encoder[1].running_var, torch.stack([o.var(0) for o in outputs]).mean(0), atol=1e-5)
    assert not encoder.training and all(torch.equal(encoder.state_dict()[k], v) for k, v in weights.items())
