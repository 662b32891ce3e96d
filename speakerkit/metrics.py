"""Verification metrics and score normalisation, numpy only: the operating points of a trial list's scores,
EER and minDCF (`Metrics`), and AS-Norm against a cohort. Edge cases (ties, perfect and inverted scores, two
trials) are pinned down by tests/test_metrics.py."""

import dataclasses
import math

import numpy as np


def operating_points(scores, labels):
    """Miss and false-alarm rates when accepting scores >= t, for t at every distinct score and beyond
    the largest (reject all). The first point accepts all trials: (P_miss, P_fa) = (0, 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be 1-D and equally long")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (non-target) or 1 (target)")
    labels = labels.astype(np.int64)
    n_target = int(labels.sum())
    n_nontarget = len(labels) - n_target
    if n_target == 0 or n_nontarget == 0:
        raise ValueError("need at least one target and one non-target trial")
    order = np.argsort(scores, kind='mergesort')
    sorted_scores, sorted_labels = scores[order], labels[order]
    targets_below = np.concatenate(([0], np.cumsum(sorted_labels)))
    nontargets_below = np.arange(len(labels) + 1) - targets_below
    boundaries = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1], True])
    p_miss = targets_below[boundaries] / n_target
    p_fa = (n_nontarget - nontargets_below[boundaries]) / n_nontarget
    return p_miss, p_fa


def compute_eer(scores, labels):
    """Equal error rate in percent: where P_miss - P_fa changes sign, interpolated linearly between the
    two operating points on either side."""
    p_miss, p_fa = operating_points(scores, labels)
    diff = p_miss - p_fa
    after = int(np.flatnonzero(diff >= 0)[0])
    if diff[after] == 0:
        return 100.0 * p_miss[after]
    before = after - 1
    alpha = -diff[before] / (diff[after] - diff[before])
    return 100.0 * (p_miss[before] + alpha * (p_miss[after] - p_miss[before]))


def compute_min_dcf(scores, labels, p_target, c_miss=1, c_fa=1):
    """Minimum over all thresholds (accept-all and reject-all included) of
    c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target), divided by min(c_miss * p_target,
    c_fa * (1 - p_target))."""
    p_miss, p_fa = operating_points(scores, labels)
    cost = c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


DCF_TARGET_PRIORS = (0.05, 0.01)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """EER in percent and the minimum normalised DCF at each of DCF_TARGET_PRIORS (c_miss = c_fa = 1)."""
    eer: float
    min_dcf: dict  # target prior -> minDCF

    def text(self):
        return f'EER {self.eer:2.2f}%, ' + ', '.join(f'minDCF({p}) {v:.4f}' for p, v in self.min_dcf.items())

    def as_record(self):
        """As metrics.jsonl stores it: {'eer', 'min_dcf_0.05', 'min_dcf_0.01'}."""
        return {'eer': self.eer, **{f'min_dcf_{p}': v for p, v in self.min_dcf.items()}}


def verification_metrics(scores, labels):
    return Metrics(float(compute_eer(scores, labels)),
                   {p: compute_min_dcf(scores, labels, p) for p in DCF_TARGET_PRIORS})


def cohort_statistics(rows, cohort, top_k, row_chunk=1024, cohort_chunk=65536):
    """Mean and population standard deviation (float64) of the `top_k` largest scores of each row against
    the cohort, from products of at most `row_chunk` x `cohort_chunk`, merging partial top-k lists, so
    memory stays bounded for any cohort size."""
    rows = np.asarray(rows, dtype=np.float32)
    cohort = np.asarray(cohort, dtype=np.float32)
    top_k = min(top_k, len(cohort))
    mean = np.empty(len(rows))
    std = np.empty(len(rows))
    for start in range(0, len(rows), row_chunk):
        block = rows[start:start + row_chunk]
        best = None
        for c in range(0, len(cohort), cohort_chunk):
            scores = block @ cohort[c:c + cohort_chunk].T
            if best is not None:
                scores = np.concatenate((best, scores), axis=1)
            k = min(top_k, scores.shape[1])
            best = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:]
        best = best.astype(np.float64)
        mean[start:start + row_chunk] = best.mean(axis=1)
        std[start:start + row_chunk] = best.std(axis=1)
    return mean, std


def as_norm(embeddings, trials, cohort, top_k):
    """Adaptive symmetric score normalisation. `embeddings` [N, D], `trials` int [T, 2] rows of
    (enroll, test), `cohort` [M, D]. For each side x of a trial with raw score s = e . t, take the
    `top_k` largest scores of x against the cohort, their mean mu_x and population std sigma_x, and
    return 0.5 * ((s - mu_e) / sigma_e + (s - mu_t) / sigma_t) for every trial. The statistics are computed
    once per utterance that occurs in a trial (float32 products, float64 statistics), then looked up."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    trials = np.asarray(trials, dtype=np.int64).reshape(-1, 2)
    used, inverse = np.unique(trials.ravel(), return_inverse=True)
    mean, std = cohort_statistics(embeddings[used], cohort, top_k)
    inverse = inverse.reshape(-1, 2)
    normalised = np.empty(len(trials))
    for start in range(0, len(trials), 65536):
        pairs, sides = trials[start:start + 65536], inverse[start:start + 65536]
        raw = (embeddings[pairs[:, 0]] * embeddings[pairs[:, 1]]).sum(axis=1, dtype=np.float64)
        z_e = (raw - mean[sides[:, 0]]) / std[sides[:, 0]]
        z_t = (raw - mean[sides[:, 1]]) / std[sides[:, 1]]
        normalised[start:start + 65536] = 0.5 * (z_e + z_t)
    return normalised


QUALITY_SECONDS_CAP = 20.0  # durations beyond this add no information to a calibration (wespeaker's QMF caps at 20)


def duration_terms(seconds):
    """The quality terms of trials from the durations of their two recordings ([N, 2] seconds, each capped at
    QUALITY_SECONDS_CAP): log of the shorter and log of the longer, [N, 2]. (wespeaker's QMF takes the shorter,
    the longer, their difference and their ratio; in the log domain two terms span those.)"""
    seconds = np.asarray(seconds, dtype=np.float64).reshape(-1, 2)
    if not np.all(seconds > 0):
        raise ValueError('durations of calibrated trials must be positive seconds')
    capped = np.log(np.minimum(seconds, QUALITY_SECONDS_CAP))
    return np.stack([capped.min(axis=1), capped.max(axis=1)], axis=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """A linear map from a system's scores to log-likelihood ratios, fitted on a development trial list:
    LLR = scale * score + offset, plus, with `duration_weights`, weights times the trials' `duration_terms` (a
    quality measure: short recordings give less certain scores). `decide` accepts a trial when its LLR passes
    `decision_llr`: the LLR of the development list's minDCF operating point at the prior `p_target` (equal
    costs), which held out decided at a lower cost than the Bayes threshold log((1 - p_target) / p_target) of a
    map fitted on a few dozen targets (bench/RESULTS.md); without it (a calibration of an older version), the
    Bayes threshold. `training_mean` is the mean protocol vector that was subtracted from every vector before
    scoring (empty: none), so that a score to be calibrated is computed the same way
    (`evaluation.calibrated_pair`)."""
    scale: float
    offset: float
    p_target: float = 0.01
    decision_llr: float | None = None
    duration_weights: tuple = ()
    training_mean: tuple = ()

    def llr(self, scores, seconds=None):
        """The LLRs of `scores`; `seconds` ([N, 2], the two recordings of each trial) where the calibration has
        duration terms."""
        llrs = self.scale * np.asarray(scores, dtype=np.float64) + self.offset
        if not self.duration_weights:
            return llrs
        if seconds is None:
            raise ValueError('this calibration has duration terms: give the durations of both recordings')
        return llrs + (duration_terms(seconds) @ np.asarray(self.duration_weights)).reshape(llrs.shape)

    @property
    def llr_threshold(self):
        """The LLR above which `decide` accepts."""
        return self.decision_llr if self.decision_llr is not None else bayes_threshold(self.p_target)

    def threshold(self, seconds=None):
        """The score above which `decide` accepts (for recordings of `seconds`, [2], with duration terms)."""
        return (self.llr_threshold - float(self.llr(0.0, None if seconds is None else [seconds]).ravel()[0])) \
            / self.scale

    def decide(self, scores, seconds=None):
        return self.llr(scores, seconds) > self.llr_threshold


def bayes_threshold(p_target):
    """The LLR above which accepting costs less than rejecting, at prior `p_target` and equal costs."""
    return math.log((1 - p_target) / p_target)


def min_dcf_threshold(scores, labels, p_target):
    """The threshold of `scores` at their minDCF operating point (equal costs): midway between the two distinct
    scores around the best place to cut, so that accepting scores above it reaches `compute_min_dcf`."""
    p_miss, p_fa = operating_points(scores, labels)
    best = int(np.argmin(p_miss * p_target + p_fa * (1 - p_target)))
    values = np.unique(np.asarray(scores, dtype=np.float64))
    if best == 0:
        return float(values[0] - 1)
    if best == len(values):
        return float(values[-1] + 1)
    return float((values[best - 1] + values[best]) / 2)


def cllr(llrs, labels):
    """The log-likelihood-ratio cost in bits: the mean over targets of log2(1 + e^-LLR) and over non-targets of
    log2(1 + e^LLR), averaged (1 for LLRs of 0, 0 for perfect ones)."""
    llrs, labels = np.asarray(llrs, dtype=np.float64), np.asarray(labels)
    return float((np.mean(np.logaddexp(0, -llrs[labels == 1])) + np.mean(np.logaddexp(0, llrs[labels == 0])))
                 / (2 * math.log(2)))


def fit_calibration(scores, labels, p_target=0.01, seconds=None, steps=100):
    """The Calibration of `scores` that minimises Cllr on them (logistic regression with targets and
    non-targets weighted equally, by Newton's method; a small ridge keeps the scale finite when the two classes
    do not overlap), with duration terms when the trials' `seconds` ([N, 2]) are given, and the decision
    threshold at its minDCF operating point at `p_target`."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    compute_eer(scores, labels)  # the same checks of the input
    sign = np.where(labels == 1, 1.0, -1.0)
    weight = np.where(labels == 1, 0.5 / np.sum(labels == 1), 0.5 / np.sum(labels == 0))
    columns = [scores[:, None], np.ones((len(scores), 1))]
    if seconds is not None:
        columns.append(duration_terms(seconds))
    features = np.concatenate(columns, axis=1)
    params, ridge = np.zeros(features.shape[1]), 1e-6
    for _ in range(steps):
        margins = sign * (features @ params)
        pushed = 1 / (1 + np.exp(margins))  # the sigmoid of -margin: each trial's share of the gradient
        gradient = -(features * (weight * sign * pushed)[:, None]).sum(0) + ridge * params
        hessian = (features * (weight * pushed * (1 - pushed))[:, None]).T @ features + ridge * np.eye(len(params))
        change = np.linalg.solve(hessian, gradient)
        params -= change
        if np.abs(change).max() < 1e-10:
            break
    return Calibration(scale=float(params[0]), offset=float(params[1]), p_target=p_target,
                       decision_llr=min_dcf_threshold(features @ params, labels, p_target),
                       duration_weights=tuple(float(w) for w in params[2:]))
