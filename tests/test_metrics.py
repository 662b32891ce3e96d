import dataclasses
import math

import numpy as np
import pytest

from speakerkit.metrics import (cllr, cohort_statistics, compute_eer, compute_min_dcf, fit_calibration,
                                min_dcf_threshold)


def reference_rates(scores, labels):
    """P_miss and P_fa at every candidate threshold, one threshold at a time (accept score >= t)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    thresholds = np.concatenate((np.unique(scores), [np.inf]))
    p_miss = np.array([np.mean(scores[labels == 1] < t) for t in thresholds])
    p_fa = np.array([np.mean(scores[labels == 0] >= t) for t in thresholds])
    return p_miss, p_fa


def reference_eer(scores, labels):
    p_miss, p_fa = reference_rates(scores, labels)
    for i in range(len(p_miss)):
        if p_miss[i] >= p_fa[i]:
            if i == 0 or p_miss[i] == p_fa[i]:
                return 100 * p_miss[i]
            d0, d1 = p_miss[i - 1] - p_fa[i - 1], p_miss[i] - p_fa[i]
            a = d0 / (d0 - d1)
            return 100 * (p_miss[i - 1] + a * (p_miss[i] - p_miss[i - 1]))


def reference_min_dcf(scores, labels, p_target, c_miss=1, c_fa=1):
    p_miss, p_fa = reference_rates(scores, labels)
    costs = [c_miss * m * p_target + c_fa * f * (1 - p_target) for m, f in zip(p_miss, p_fa)]
    return min(costs) / min(c_miss * p_target, c_fa * (1 - p_target))


def test_perfect_separation():
    scores, labels = [0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]
    assert compute_eer(scores, labels) == 0.0
    assert compute_min_dcf(scores, labels, 0.05) == 0.0


def test_fully_inverted_scores():
    scores, labels = [0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]
    assert compute_eer(scores, labels) == pytest.approx(100.0)
    # The best threshold is then reject-all (cost p) or accept-all (cost 1 - p): normalised, 1.
    assert compute_min_dcf(scores, labels, 0.05) == pytest.approx(1.0)
    assert compute_min_dcf(scores, labels, 0.01) == pytest.approx(1.0)


def test_two_trials():
    assert compute_eer([0.7, 0.3], [1, 0]) == 0.0
    assert compute_eer([0.3, 0.7], [1, 0]) == pytest.approx(100.0)
    # One target, one non-target with the same score: either both accepted or both rejected.
    assert compute_eer([0.5, 0.5], [1, 0]) == pytest.approx(50.0)
    assert compute_min_dcf([0.5, 0.5], [1, 0], 0.05) == pytest.approx(1.0)


def test_ties_are_one_operating_point():
    # Targets 0.9, 0.5; non-targets 0.5, 0.1. At t = 0.5 both tied trials are accepted together:
    # points (P_miss, P_fa): (0, 1), (0, .5), (.5, 0), (1, 0) after 0.1, 0.5, 0.9 and beyond.
    scores, labels = [0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]
    # P_miss - P_fa goes from -0.5 at (0, .5) to +0.5 at (.5, 0): crossing halfway, at 0.25.
    assert compute_eer(scores, labels) == pytest.approx(25.0)
    # Reordering the tied trials changes nothing.
    assert compute_eer([0.9, 0.5, 0.5, 0.1], [1, 0, 1, 0]) == pytest.approx(25.0)
    # minDCF(0.05): costs 0.95, 0.475, 0.025, 0.05 -> 0.025 / 0.05 = 0.5.
    assert compute_min_dcf(scores, labels, 0.05) == pytest.approx(0.5)


def test_interpolation_hand_computed():
    # 1 target at 0.6 among 7 non-targets: accepting >= 0.6 gives (P_miss, P_fa) = (0, 2/7), the next
    # threshold, 0.65, gives (1, 2/7). P_miss - P_fa goes from -2/7 to 5/7: it crosses zero 2/7 of the way,
    # where P_miss = 2/7.
    scores = [0.6, 0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.7]
    labels = [1, 0, 0, 0, 0, 0, 0, 0]
    assert compute_eer(scores, labels) == pytest.approx(100 * 2 / 7)


def test_costs_are_weighted():
    scores, labels = [0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]
    assert compute_min_dcf(scores, labels, 0.05, c_miss=10, c_fa=1) == pytest.approx(
        reference_min_dcf(scores, labels, 0.05, 10, 1))


@pytest.mark.parametrize('seed', range(6))
def test_matches_per_threshold_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    if seed % 2:  # very unbalanced: few targets
        labels = (rng.random(n) < 0.03).astype(int)
        labels[:2] = [0, 1]
    scores = np.round(rng.normal(labels, 1.0), 1)  # rounding makes many ties
    assert compute_eer(scores, labels) == pytest.approx(reference_eer(scores, labels))
    for p in (0.01, 0.05):
        assert compute_min_dcf(scores, labels, p) == pytest.approx(reference_min_dcf(scores, labels, p))


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match='target'):
        compute_eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match='NaN'):
        compute_eer([0.1, float('nan')], [1, 0])
    with pytest.raises(ValueError, match='labels'):
        compute_eer([0.1, 0.2], [2, 0])


def test_cohort_statistics_do_not_depend_on_chunking():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((37, 8)).astype(np.float32)
    cohort = rng.standard_normal((101, 8)).astype(np.float32)
    whole = cohort_statistics(rows, cohort, 20, row_chunk=1000, cohort_chunk=1000)
    chunked = cohort_statistics(rows, cohort, 20, row_chunk=5, cohort_chunk=7)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    top = np.sort(rows.astype(np.float64) @ cohort.T.astype(np.float64), axis=1)[:, -20:]
    np.testing.assert_allclose(whole[0], top.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(whole[1], top.std(axis=1), rtol=1e-4)


def test_calibration_recovers_the_log_likelihood_ratio_of_gaussian_scores():
    """Targets N(1, 0.5^2) and non-targets N(-1, 0.5^2): the true LLR is 8 x score."""
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(1, 0.5, 20000), rng.normal(-1, 0.5, 20000)]
    labels = np.r_[np.ones(20000, dtype=int), np.zeros(20000, dtype=int)]
    calibration = fit_calibration(scores, labels, p_target=0.05)
    assert calibration.scale == pytest.approx(8, rel=0.05) and abs(calibration.offset) < 0.1
    assert cllr(calibration.llr(scores), labels) <= cllr(8 * scores, labels) + 1e-9  # the fit's own data
    assert compute_eer(calibration.llr(scores), labels) == compute_eer(scores, labels)  # monotone: EER unchanged
    # the minDCF operating point of this many well-calibrated scores lies near the Bayes threshold, log(19)
    assert calibration.llr_threshold == calibration.decision_llr == pytest.approx(math.log(19), abs=0.5)
    assert calibration.threshold() == pytest.approx((calibration.decision_llr - calibration.offset) / calibration.scale)
    assert calibration.decide([calibration.threshold() + 1e-6, calibration.threshold() - 1e-6]).tolist() == \
        [True, False]
    older = dataclasses.replace(calibration, decision_llr=None)  # a calibration written before it was kept
    assert older.llr_threshold == pytest.approx(math.log(19))


@pytest.mark.parametrize('p_target', [0.5, 0.05, 0.01])
def test_min_dcf_threshold_is_where_accepting_costs_the_min_dcf(p_target):
    rng = np.random.default_rng(2)
    scores = np.round(np.r_[rng.normal(1, 1, 300), rng.normal(-1, 1, 3000)], 2)  # ties, as rounded scores give
    labels = np.r_[np.ones(300, dtype=int), np.zeros(3000, dtype=int)]
    cut = min_dcf_threshold(scores, labels, p_target)
    accepted = scores > cut
    cost = (p_target * np.mean(~accepted[labels == 1]) + (1 - p_target) * np.mean(accepted[labels == 0])) \
        / min(p_target, 1 - p_target)
    assert cost == pytest.approx(compute_min_dcf(scores, labels, p_target)) and not np.any(scores == cut)
    assert min_dcf_threshold(np.array([0.1, 0.9]), np.array([0, 1]), 0.5) == pytest.approx(0.5)
    assert min_dcf_threshold(np.array([0.1, 0.2]), np.array([1, 0]), 0.01) > 0.2  # reject all: above the largest


def test_duration_terms_recover_a_shift_of_short_trials_scores():
    """Scores of trials whose shorter recording lasts 1 s are 0.5 higher, targets and non-targets alike, than
    those of 16 s: the true LLR is 8 x score - 4 for the short ones and 8 x score for the long ones."""
    rng = np.random.default_rng(1)
    n = 20000
    labels = np.r_[np.ones(n, dtype=int), np.zeros(n, dtype=int)]
    short = rng.random(2 * n) < 0.5
    scores = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 0.5, 2 * n) + 0.5 * short
    seconds = np.stack([np.where(short, 1.0, 16.0), rng.uniform(16, 30, 2 * n)], axis=1)
    calibration = fit_calibration(scores, labels, seconds=seconds)
    assert len(calibration.duration_weights) == 2 and calibration.scale == pytest.approx(8, rel=0.05)
    llrs = calibration.llr(scores, seconds)
    np.testing.assert_allclose((llrs - 8 * scores)[short].mean(), -4, atol=0.3)
    np.testing.assert_allclose((llrs - 8 * scores)[~short].mean(), 0, atol=0.3)
    without = fit_calibration(scores, labels)
    assert cllr(llrs, labels) < cllr(without.llr(scores), labels) - 0.02
    with pytest.raises(ValueError, match='give the durations'):
        calibration.llr(scores)
    # 30 s counts as 20 s: durations past the cap change nothing
    np.testing.assert_allclose(calibration.llr([0.3], [[1.0, 30.0]]), calibration.llr([0.3], [[20.0, 1.0]]))
    assert calibration.decide([calibration.threshold([1.0, 20.0]) + 1e-6], [[1.0, 20.0]]).tolist() == [True]


def test_cllr_is_one_bit_for_no_information_and_falls_to_zero_for_certainty():
    labels = np.array([1, 1, 0, 0])
    assert cllr(np.zeros(4), labels) == pytest.approx(1.0)
    assert cllr(np.array([50.0, 50.0, -50.0, -50.0]), labels) < 1e-20
    assert cllr(np.array([-50.0, -50.0, 50.0, 50.0]), labels) > 70  # confidently wrong costs the most
    separable = fit_calibration(np.array([0.9, 0.8, 0.1, 0.2]), labels)
    assert 0 < separable.scale < np.inf and np.isfinite(separable.offset)  # the ridge keeps it finite
