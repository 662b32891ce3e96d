"""Figures of a run, as PNG files under save_path/plots: for each labelled trial list a DET curve (miss and
false-alarm rates on normal-deviate axes, the EER and both minDCF operating points marked) and the
target/non-target score histograms; and the training curve (loss, accuracy, EER per epoch) from
metrics.jsonl. Kept apart because only these need matplotlib.

  python plots.py SAVE_PATH     # redraw the training curve of a run from its metrics.jsonl
"""

import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from speakerkit.checkpoints import atomic_write  # noqa: E402
from speakerkit.errors import UsageError, UserError, reported_as_exit  # noqa: E402
from speakerkit.records import read_metrics  # noqa: E402
from speakerkit.metrics import operating_points  # noqa: E402


def save_figure(figure, path):
    atomic_write(path, lambda f: figure.savefig(f, format='png', dpi=100))
    plt.close(figure)


def probit(rate):
    """The standard normal quantile of each rate (the DET plot's axis scale)."""
    return torch.special.ndtri(torch.as_tensor(rate, dtype=torch.float64)).numpy()


def det_curve(scores, labels, metrics, path, title):
    """Miss rate against false-alarm rate on probit axes, with the EER point and each minDCF point;
    `metrics` are the list's `metrics.Metrics`, already computed by the evaluation."""
    miss, false_alarm = operating_points(scores, labels)
    clip = 1e-4

    def clipped(rate):
        return probit(np.clip(rate, clip, 1 - clip))

    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot(clipped(false_alarm), clipped(miss), lw=1.5)
    eer = metrics.eer / 100
    axes.plot(clipped(eer), clipped(eer), 'o', label=f'EER {100 * eer:.2f}%')
    for (prior, min_dcf), marker in zip(metrics.min_dcf.items(), ('s', '^')):
        best = int(np.argmin(prior * miss + (1 - prior) * false_alarm))
        axes.plot(clipped(false_alarm[best]), clipped(miss[best]), marker, label=f'minDCF({prior}) {min_dcf:.4f}')
    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.8])
    axes.set_xticks(probit(ticks), [f'{100 * t:g}' for t in ticks])
    axes.set_yticks(probit(ticks), [f'{100 * t:g}' for t in ticks])
    axes.set_xlim(probit(clip), probit(0.9))
    axes.set_ylim(probit(clip), probit(0.9))
    axes.set_xlabel('false-alarm rate (%)')
    axes.set_ylabel('miss rate (%)')
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc='upper right')
    save_figure(figure, path)


def score_histograms(scores, labels, path, title):
    scores, labels = np.asarray(scores), np.asarray(labels)
    figure, axes = plt.subplots(figsize=(6, 4))
    bins = np.linspace(scores.min(), scores.max(), 60)
    axes.hist(scores[labels == 0], bins=bins, alpha=0.6, density=True, label=f'non-target ({np.sum(labels == 0)})')
    axes.hist(scores[labels == 1], bins=bins, alpha=0.6, density=True, label=f'target ({np.sum(labels == 1)})')
    axes.set_xlabel('score')
    axes.set_ylabel('density')
    axes.set_title(title)
    axes.legend()
    save_figure(figure, path)


def training_curve(metrics_path, path):
    """Loss, accuracy and each list's EER per epoch from metrics.jsonl; False when it holds no epoch."""
    records = read_metrics(metrics_path)
    if not records:
        return False
    epochs = [r['epoch'] for r in records]
    figure, (loss_axes, accuracy_axes, eer_axes) = plt.subplots(1, 3, figsize=(13, 3.6))
    loss_axes.plot(epochs, [r['loss'] for r in records], 'o-')
    loss_axes.set_title('training loss')
    accuracy_axes.plot(epochs, [r['accuracy'] for r in records], 'o-')
    accuracy_axes.set_title('training accuracy (%)')
    plotted = False
    for name in sorted({name for r in records for name in r.get('eval', {})}):
        points = [(r['epoch'], r['eval'][name]['metrics']['eer']) for r in records
                  if name in r.get('eval', {}) and r['eval'][name].get('metrics')]
        if points:
            eer_axes.plot(*zip(*points), 'o-', label=name)
            plotted = True
    eer_axes.set_title('EER (%)')
    if plotted:
        eer_axes.legend()
    for axes in (loss_axes, accuracy_axes, eer_axes):
        axes.set_xlabel('epoch')
        axes.grid(True, alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)
    return True


def evaluation_plots(results, folder):
    """DET curve and histograms of every labelled list in `results` ({list path: evaluation.ListResult})."""
    os.makedirs(folder, exist_ok=True)
    for result in results.values():
        if result.metrics is None:
            continue
        name = os.path.splitext(result.trials.name)[0]
        for suffix, scores, metrics in result.score_sets():
            title = name + (' AS-Norm' if suffix else '')
            det_curve(scores, result.trials.labels, metrics, os.path.join(folder, f'{name}{suffix}_det.png'), title)
            score_histograms(scores, result.trials.labels, os.path.join(folder, f'{name}{suffix}_scores.png'), title)


def main(argv):
    if len(argv) != 1:
        raise UsageError('give one argument, the save_path of a run: python -m speakerkit.plots SAVE_PATH')
    target = os.path.join(argv[0], 'plots', 'training_curve.png')
    if not training_curve(os.path.join(argv[0], 'metrics.jsonl'), target):
        raise UserError(f'{argv[0]}/metrics.jsonl: no epochs recorded')
    print(target)


if __name__ == '__main__':
    with reported_as_exit('speakerkit.plots'):
        main(sys.argv[1:])
