"""Score calibration held out: a trial list split by speaker into a development half (where the map to
log-likelihood ratios is fitted, as --calibrate fits it) and a test half (where it is judged); a trial whose
two sides fall in different halves is left out, so no speaker of the test half is seen in the fit.

  python bench/bench_calibration.py MODEL TRIALS EVAL_PATH [--train_list L --train_path P] [--p_target 0.01]
                                    [--random_durations SEED]

For each back end (plain protocol scores; with --train_list also the training mean subtracted, as
--subtract_mean does) and each map (score only; score and the durations' quality terms, as --duration_terms)
it prints, on the test half: EER before and after calibration (the same for a map of the score alone, which is
monotone), Cllr of the calibrated LLRs (1 bit: no information; 0: certainty), and at p_target the detection
cost of the calibration's decisions (actual DCF) at its decision threshold (the development half's minDCF
operating point, as --calibrate keeps it) and at the Bayes threshold log((1 - p) / p), beside the best any
threshold reaches on the test half (minDCF).

--random_durations SEED cuts every file to a random length first (uniform from 1 s to its own, the same cut
for a file wherever it appears): where a list's target pairs are parts of one recording cut equally (the
LibriSpeech harness), their equal durations would otherwise tell the duration terms the answer.
"""

import argparse
import os
import tempfile

import numpy as np
import soundfile

from common import ROOT  # noqa: F401 (puts the checkout on the path)
from speakerkit.commands import trial_seconds
from speakerkit.evaluation import Cohort, evaluate
from speakerkit.lists import TrialList, cohort_entries, read_train_list, read_trials
from speakerkit.metrics import bayes_threshold, cllr, compute_eer, compute_min_dcf, fit_calibration
from speakerkit.tools import load_model


def halves(trials):
    """The trials of the first half of the sorted speakers (the path's first folder), both sides, and those of
    the second half."""
    speakers = sorted({name.split('/')[0] for name in trials.enroll + trials.test})
    first = set(speakers[:len(speakers) // 2])
    parts = []
    for name, keep in (('dev', True), ('test', False)):
        chosen = [i for i, (e, t) in enumerate(zip(trials.enroll, trials.test))
                  if (e.split('/')[0] in first) == keep and (t.split('/')[0] in first) == keep]
        parts.append(TrialList(name, trials.labels[chosen], [trials.enroll[i] for i in chosen],
                               [trials.test[i] for i in chosen], [trials.lines[i] for i in chosen], name))
    return parts


def actual_dcf(decisions, labels, p_target):
    """The normalised detection cost of accept/reject `decisions` (costs 1 and 1)."""
    miss = np.mean(~decisions[labels == 1])
    false_alarm = np.mean(decisions[labels == 0])
    return (p_target * miss + (1 - p_target) * false_alarm) / min(p_target, 1 - p_target)


def cut_randomly(trials, root, seed, folder):
    """Every file of `trials` under `root`, cut to a random length from 1 s to its own, written under `folder`."""
    rng = np.random.default_rng(seed)
    for name in sorted(set(trials.enroll + trials.test)):
        audio, rate = soundfile.read(os.path.join(root, name), dtype='float32')
        keep = int(rng.uniform(min(rate, len(audio)), len(audio) + 1))
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        soundfile.write(os.path.join(folder, name), audio[:keep], rate)
    return folder


def report(name, dev, test, scores, seconds, p_target, durations):
    dev_seconds, test_seconds = (seconds['dev'], seconds['test']) if durations else (None, None)
    calibration = fit_calibration(scores['dev'], dev.labels, p_target, dev_seconds)
    llrs = calibration.llr(scores['test'], test_seconds)
    dev_llrs = calibration.llr(scores['dev'], dev_seconds)
    terms = (f' {calibration.duration_weights[0]:+.4f} x log shorter {calibration.duration_weights[1]:+.4f} x log '
             f'longer' if durations else '')
    print(f'{name}{", duration terms" if durations else ""}: LLR = {calibration.scale:.4f} x score '
          f'{calibration.offset:+.4f}{terms}')
    print(f'  test EER {compute_eer(scores["test"], test.labels):.2f}% raw, {compute_eer(llrs, test.labels):.2f}% '
          f'calibrated; Cllr {cllr(llrs, test.labels):.4f} bits (dev {cllr(dev_llrs, dev.labels):.4f})')
    decided = actual_dcf(calibration.decide(scores['test'], test_seconds), test.labels, p_target)
    bayes = actual_dcf(llrs > bayes_threshold(p_target), test.labels, p_target)
    print(f'  at p_target {p_target:g}: actual DCF {decided:.4f} (its threshold, dev minDCF: LLR '
          f'{calibration.llr_threshold:.2f}), {bayes:.4f} (Bayes: {bayes_threshold(p_target):.2f}); minDCF '
          f'{compute_min_dcf(scores["test"], test.labels, p_target):.4f}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model')
    parser.add_argument('trials')
    parser.add_argument('eval_path')
    parser.add_argument('--train_list', help='with --train_path: also score with the training mean subtracted')
    parser.add_argument('--train_path')
    parser.add_argument('--cohort_size', type=int, default=20000)
    parser.add_argument('--p_target', type=float, default=0.01)
    parser.add_argument('--random_durations', type=int, metavar='SEED',
                        help='cut every file to a random length first (see above)')
    args = parser.parse_args()
    encoder = load_model(args.model)
    trials = read_trials(args.trials)
    dev, test = halves(trials)
    if args.random_durations is not None:
        args.eval_path = cut_randomly(trials, args.eval_path, args.random_durations, tempfile.mkdtemp())
    print(f'dev: {len(dev.labels)} trials ({int(dev.labels.sum())} targets); test: {len(test.labels)} trials '
          f'({int(test.labels.sum())} targets)')
    seconds = {'dev': trial_seconds(dev, args.eval_path), 'test': trial_seconds(test, args.eval_path)}
    back_ends = {'plain scores': None}
    if args.train_list:
        entries = cohort_entries(read_train_list(args.train_list), args.cohort_size, 10)
        back_ends['training mean subtracted'] = Cohort(entries, args.train_path, 'utterance', 2, as_norm=False,
                                                       subtract_mean=True)
    for name, cohort in back_ends.items():
        results = evaluate(encoder, [dev, test], args.eval_path, 'cpu', cohort=cohort)  # each file embedded once
        scores = {part: results[part].scores for part in ('dev', 'test')}
        for durations in (False, True):
            report(name, dev, test, scores, seconds, args.p_target, durations)


if __name__ == '__main__':
    main()
