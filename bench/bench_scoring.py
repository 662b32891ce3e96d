"""Speed of scoring after the embeddings: metrics and AS-Norm at VoxCeleb1-E/H scale, beside the original
code's way of computing the same numbers (timed on a subset and extrapolated where it would take hours).

  pip install -r bench/requirements.txt    # scikit-learn, which the original's EER needs
  python bench/bench_scoring.py [--json FILE] [--quick]

Random unit vectors stand in for embeddings (the time does not depend on their values). Prints a table; peak
memory is the process's maximum resident set size, which includes the ~0.3 GiB of an idle torch import.
"""

import argparse
import time
from operator import itemgetter

import numpy as np
import torch

from common import environment, peak_rss_gib, write_json
from speakerkit.metrics import as_norm, compute_eer, compute_min_dcf


def unit_rows(rng, n, d):
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
    return torch.nn.functional.normalize(x, dim=1)


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def original_metrics(scores, labels):
    """The original's metrics: a Python loop over sorted trials for the error rates, then one cost per
    threshold for minDCF (EER came from scikit-learn's ROC curve)."""
    from sklearn import metrics
    fpr, tpr, _ = metrics.roc_curve(labels, scores, pos_label=1)
    fnr = 1 - tpr
    index = np.nanargmin(np.abs(fnr - fpr))
    sorted_pairs = sorted(enumerate(scores), key=itemgetter(1))
    ordered = [labels[i] for i, _ in sorted_pairs]
    fnrs, fprs = [], []
    for i, label in enumerate(ordered):
        fnrs.append(label + (fnrs[-1] if i else 0))
        fprs.append(1 - label + (fprs[-1] if i else 0))
    n_target = sum(ordered)
    fnrs = [x / n_target for x in fnrs]
    fprs = [1 - x / (len(ordered) - n_target) for x in fprs]
    for p in (0.05, 0.01):
        min(fn * p + fp * (1 - p) for fn, fp in zip(fnrs, fprs))
    return max(fpr[index], fnr[index])


def original_as_norm(embeddings, trials, cohort, top_k):
    """One trial at a time, scoring both sides against the whole cohort every time."""
    out = []
    for e, t in trials:
        cohort_e = np.sort(cohort @ embeddings[e])[-top_k:]
        cohort_t = np.sort(cohort @ embeddings[t])[-top_k:]
        s = float(embeddings[e] @ embeddings[t])
        out.append(0.5 * ((s - cohort_e.mean()) / cohort_e.std() + (s - cohort_t.mean()) / cohort_t.std()))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', help='also write the figures here')
    parser.add_argument('--quick', action='store_true', help='a tenth of every size, for a smoke run')
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    rng = np.random.default_rng(0)
    rows = []

    n = 600_000 // scale
    labels = (rng.random(n) < 0.5).astype(np.int64)
    scores = rng.normal(labels * 1.5, 1.0)
    _, ours = timed(lambda: (compute_eer(scores, labels), compute_min_dcf(scores, labels, 0.05),
                             compute_min_dcf(scores, labels, 0.01)))
    _, theirs = timed(lambda: original_metrics(scores.tolist(), labels.tolist()))
    rows.append({'task': f'EER + minDCF(0.05, 0.01), {n} trials', 'seconds': ours, 'original_seconds': theirs,
                 'original_measured_on': n})

    n_eval, n_cohort, dim, top_k = 145_000 // scale, 6_000, 192, 300
    embeddings, cohort = unit_rows(rng, n_eval, dim), unit_rows(rng, n_cohort, dim)
    trials = rng.integers(0, n_eval, size=((581_000 + 552_000) // scale, 2))
    _, ours = timed(lambda: as_norm(embeddings, trials, cohort, top_k))
    subset = 2_000 // scale
    _, theirs = timed(lambda: original_as_norm(embeddings.numpy(), trials[:subset], cohort.numpy(), top_k))
    rows.append({'task': f'AS-Norm, {n_eval} embeddings x {n_cohort} cohort, top {top_k}, {len(trials)} trials',
                 'seconds': ours, 'original_seconds': theirs * len(trials) / subset, 'original_measured_on': subset,
                 'peak_rss_gib': peak_rss_gib()})

    n_eval, n_cohort = 5_000 // scale, 1_000_000 // scale
    embeddings, cohort = unit_rows(rng, n_eval, dim), unit_rows(rng, n_cohort, dim)
    trials = rng.integers(0, n_eval, size=(100_000 // scale, 2))
    _, ours = timed(lambda: as_norm(embeddings, trials, cohort, top_k))
    subset = 20
    _, theirs = timed(lambda: original_as_norm(embeddings.numpy(), trials[:subset], cohort.numpy(), top_k))
    rows.append({'task': f'AS-Norm, utterance cohort of {n_cohort} x {n_eval} embeddings, {len(trials)} trials',
                 'seconds': ours, 'original_seconds': theirs * len(trials) / subset, 'original_measured_on': subset,
                 'peak_rss_gib': peak_rss_gib()})

    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    print(f'{"task":<86} {"ours s":>8} {"original s":>11} {"speed-up":>9} {"peak GiB":>9}')
    for row in rows:
        peak = f'{row["peak_rss_gib"]:.2f}' if 'peak_rss_gib' in row else '-'
        print(f'{row["task"]:<86} {row["seconds"]:>8.2f} {row["original_seconds"]:>11.1f} '
              f'{row["original_seconds"] / row["seconds"]:>8.0f}x {peak:>9}')
    print('original: AS-Norm timed on `original_measured_on` trials and extrapolated; metrics timed in full')
    write_json(args.json, {**environment(), 'rows': rows})


if __name__ == '__main__':
    main()
