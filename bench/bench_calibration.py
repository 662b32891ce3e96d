"""Score calibration held out: a trial list split by enrolment speaker into a development half (where the map
to log-likelihood ratios is fitted, as --calibrate fits it) and a test half (where it is judged).

  python bench/bench_calibration.py MODEL TRIALS EVAL_PATH [--p_target 0.01]

Prints, on the test half: EER before and after calibration (the same: the map is monotone), Cllr of the
calibrated LLRs (1 bit: no information; 0: certainty), and at p_target the detection cost of the calibration's
own decisions (actual DCF) beside the best any threshold reaches on that half (minDCF).
"""

import argparse

import numpy as np

from common import ROOT  # noqa: F401 (puts the checkout on the path)
from speakerkit.evaluation import evaluate
from speakerkit.lists import TrialList, read_trials
from speakerkit.metrics import cllr, compute_eer, compute_min_dcf, fit_calibration
from speakerkit.tools import load_model


def halves(trials):
    """The trials whose enrolment speaker (the path's first folder) is in the first half of the sorted
    speakers, and the others."""
    speakers = sorted({e.split('/')[0] for e in trials.enroll})
    first = set(speakers[:len(speakers) // 2])
    parts = []
    for keep in (True, False):
        chosen = [i for i, e in enumerate(trials.enroll) if (e.split('/')[0] in first) == keep]
        name = 'dev' if keep else 'test'
        parts.append(TrialList(name, trials.labels[chosen], [trials.enroll[i] for i in chosen],
                               [trials.test[i] for i in chosen], [trials.lines[i] for i in chosen], name))
    return parts


def actual_dcf(decisions, labels, p_target):
    """The normalised detection cost of accept/reject `decisions` (costs 1 and 1)."""
    miss = np.mean(~decisions[labels == 1])
    false_alarm = np.mean(decisions[labels == 0])
    return (p_target * miss + (1 - p_target) * false_alarm) / min(p_target, 1 - p_target)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model')
    parser.add_argument('trials')
    parser.add_argument('eval_path')
    parser.add_argument('--p_target', type=float, default=0.01)
    args = parser.parse_args()
    encoder = load_model(args.model)
    dev, test = halves(read_trials(args.trials))
    results = evaluate(encoder, [dev, test], args.eval_path, 'cpu')  # every file embedded once
    dev_scores, test_scores = results['dev'].scores, results['test'].scores
    calibration = fit_calibration(dev_scores, dev.labels, args.p_target)
    llrs = calibration.llr(test_scores)
    print(f'dev: {len(dev.labels)} trials; test: {len(test.labels)} trials')
    print(f'calibration: LLR = {calibration.scale:.4f} x score + {calibration.offset:.4f}')
    print(f'test EER {compute_eer(test_scores, test.labels):.2f}% raw, {compute_eer(llrs, test.labels):.2f}% '
          f'calibrated')
    print(f'test Cllr {cllr(llrs, test.labels):.4f} bits (dev {cllr(calibration.llr(dev_scores), dev.labels):.4f})')
    decided = actual_dcf(calibration.decide(test_scores), test.labels, args.p_target)
    print(f'test at p_target {args.p_target:g}: actual DCF {decided:.4f}, '
          f'minDCF {compute_min_dcf(test_scores, test.labels, args.p_target):.4f}')


if __name__ == '__main__':
    main()
