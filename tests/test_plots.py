"""plots.py: DET curves, score histograms and the training curve as PNG images."""

import json
import statistics

import numpy as np
from matplotlib.image import imread

from speakerkit.lists import TrialList
from speakerkit.plots import det_curve, evaluation_plots, probit, score_histograms, training_curve
from speakerkit.evaluation import ListResult
from speakerkit.metrics import verification_metrics

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def assert_png(path, width, height):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[:2] == (height, width) and image.std() > 0


def trials(seed=0, n=400):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 4 == 0).astype(int)
    return rng.normal(labels * 2.0, 1.0), labels


def test_the_det_axis_is_the_standard_normal_quantile():
    rates = np.array([1e-4, 0.001, 0.05, 0.5, 0.8, 0.9999])
    expected = [statistics.NormalDist().inv_cdf(rate) for rate in rates]
    np.testing.assert_allclose(probit(rates), expected, rtol=1e-12, atol=1e-12)
    assert probit(0.5) == 0


def test_det_curve_and_histograms_are_png_images(tmp_path):
    scores, labels = trials()
    det_curve(scores, labels, verification_metrics(scores, labels), tmp_path / 'det.png', 'trials')
    score_histograms(scores, labels, tmp_path / 'scores.png', 'trials')
    assert_png(tmp_path / 'det.png', 500, 500)
    assert_png(tmp_path / 'scores.png', 600, 400)


def test_det_curve_copes_with_perfectly_separated_scores(tmp_path):
    scores, labels = [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]
    det_curve(scores, labels, verification_metrics(scores, labels), tmp_path / 'det.png', 'separated')
    assert_png(tmp_path / 'det.png', 500, 500)


def test_evaluation_plots_cover_labelled_lists_and_as_norm(tmp_path):
    scores, labels = trials()
    labelled = TrialList('lists/veri_test2.txt', labels, [], [], [], 'veri_test2.txt')
    results = {'lists/veri_test2.txt': ListResult(labelled, scores, verification_metrics(scores, labels), scores * 2,
                                                  verification_metrics(scores * 2, labels)),
               'lists/test_phase.txt': ListResult(TrialList('lists/test_phase.txt', None, [], [], [], 'test_phase.txt'),
                                                  scores)}
    evaluation_plots(results, tmp_path / 'plots')
    assert sorted(p.name for p in (tmp_path / 'plots').iterdir()) == [
        'veri_test2_asnorm_det.png', 'veri_test2_asnorm_scores.png', 'veri_test2_det.png', 'veri_test2_scores.png']


def test_training_curve_needs_recorded_epochs(tmp_path):
    metrics = tmp_path / 'metrics.jsonl'
    assert not training_curve(metrics, tmp_path / 'curve.png')
    metrics.write_text(''.join(json.dumps({
        'epoch': e, 'loss': 10.0 / e, 'accuracy': 10.0 * e,
        **({'eval': {'trials.txt': {'metrics': {'eer': 40.0 / e}}}} if e % 2 == 0 else {})}) + '\n'
        for e in range(1, 6)))
    assert training_curve(metrics, tmp_path / 'curve.png')
    assert_png(tmp_path / 'curve.png', 1300, 360)
