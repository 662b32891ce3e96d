import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import ECAPA_TDNN, crop_samples
from tools import as_norm, utterance_vectors


def reference_as_norm(embeddings, trials, cohort, top_k):
    """One trial at a time, the whole cohort each time (the way the original computed it)."""
    out = []
    for e, t in trials:
        s = float(embeddings[e] @ embeddings[t])
        top_e = np.sort(cohort @ embeddings[e])[::-1][:top_k]
        top_t = np.sort(cohort @ embeddings[t])[::-1][:top_k]
        out.append(0.5 * ((s - top_e.mean()) / top_e.std() + (s - top_t.mean()) / top_t.std()))
    return np.array(out)


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize('top_k', [2, 7, 50, 500])
def test_as_norm_matches_the_per_trial_definition(top_k):
    rng = np.random.default_rng(top_k)
    embeddings, cohort = unit_rows(rng, 40, 16), unit_rows(rng, 60, 16)
    trials = rng.integers(0, 40, size=(300, 2))
    expected = reference_as_norm(embeddings, trials, cohort, min(top_k, 60))
    # The cohort products are float32: with top_k = 2 the std is tiny and relative errors grow to ~1e-4.
    np.testing.assert_allclose(as_norm(embeddings, trials, cohort, top_k), expected, rtol=1e-3, atol=1e-4)


def test_as_norm_single_trial():
    rng = np.random.default_rng(0)
    embeddings, cohort = unit_rows(rng, 2, 8), unit_rows(rng, 5, 8)
    trials = np.array([[0, 1]])
    np.testing.assert_allclose(as_norm(embeddings, trials, cohort, 3), reference_as_norm(embeddings, trials, cohort, 3),
                               rtol=1e-5)


@pytest.fixture(scope='module')
def encoder():
    torch.manual_seed(0)
    return ECAPA_TDNN(32, 16000).eval()


def original_protocol_score(encoder, a, b):
    """The original evaluation: full-length and five 3 s crop embeddings, mean of the two cosine scores."""
    length = crop_samples(300, 16000)

    def crops(x):
        x = np.pad(x, (0, max(0, length - len(x))), 'wrap')
        return np.stack([x[int(s):int(s) + length] for s in np.linspace(0, len(x) - length, num=5)])

    with torch.no_grad():
        full = [F.normalize(encoder(torch.from_numpy(x)[None]), dim=1) for x in (a, b)]
        parts = [F.normalize(encoder(torch.from_numpy(crops(x))), dim=1) for x in (a, b)]
    return float((full[0] @ full[1].T).mean() + (parts[0] @ parts[1].T).mean()) / 2


def test_vectors_reproduce_the_original_protocol(encoder):
    rng = np.random.default_rng(1)
    a = (0.1 * rng.standard_normal(20000)).astype(np.float32)   # shorter than a crop: wrap-padded
    b = (0.1 * rng.standard_normal(70000)).astype(np.float32)
    c = (0.1 * rng.standard_normal(70000)).astype(np.float32)   # same length as b: batched with it
    vectors = utterance_vectors(encoder, [torch.from_numpy(x) for x in (a, b, c)], torch.device('cpu'))
    assert float(vectors[0] @ vectors[1]) == pytest.approx(original_protocol_score(encoder, a, b), abs=1e-5)
    assert float(vectors[1] @ vectors[2]) == pytest.approx(original_protocol_score(encoder, b, c), abs=1e-5)


def test_long_files_are_embedded_in_chunks(encoder):
    x = (0.1 * np.random.default_rng(2).standard_normal(48000)).astype(np.float32)
    vector = utterance_vectors(encoder, [torch.from_numpy(x)], torch.device('cpu'), max_seconds=1.0)[0]
    with torch.no_grad():
        chunks = F.normalize(encoder(torch.from_numpy(x).view(3, 16000)), dim=1)
    full = F.normalize(chunks.mean(dim=0), dim=0)
    torch.testing.assert_close(vector[:192] * np.sqrt(2), full, atol=1e-5, rtol=0)
