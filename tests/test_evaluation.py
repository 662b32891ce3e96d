"""evaluation.py: the evaluation protocol, scoring, AS-Norm applied to trial lists, evaluation of trial lists, the
embedding cache; and tools.py's checkpoint loading and export (the notebook's waveform forms are
test_notebook.py's, the metrics test_metrics.py's)."""

import os
import pickle

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from speakerkit.checkpoints import save_checkpoint
from speakerkit.dataLoader import EVAL_MAX_SECONDS
from speakerkit.errors import UserError
from speakerkit.lists import TrainEntry, TrialList
from speakerkit.loss import AAMsoftmax
from speakerkit.model import ConvMelSpectrogram, ECAPA_TDNN, EncoderConfig, build_encoder, crop_samples
from speakerkit.evaluation import (Autocast, Cohort, build_cohort, cached_embed_files, embed_files, evaluate,
                                   protocol_vectors_of)
from speakerkit.metrics import as_norm, verification_metrics
from speakerkit.tools import embed, export_onnx, export_torchscript, load_model, protocol_vectors, score
from speakerkit.trainer import SpeakerModel


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
    vectors = protocol_vectors_of(encoder, [torch.from_numpy(x) for x in (a, b, c)], torch.device('cpu'))
    assert float(vectors[0] @ vectors[1]) == pytest.approx(original_protocol_score(encoder, a, b), abs=1e-5)
    assert float(vectors[1] @ vectors[2]) == pytest.approx(original_protocol_score(encoder, b, c), abs=1e-5)


def test_long_files_are_embedded_in_chunks(encoder):
    x = (0.1 * np.random.default_rng(2).standard_normal(48000)).astype(np.float32)
    vector = protocol_vectors_of(encoder, [torch.from_numpy(x)], torch.device('cpu'), max_seconds=1.0)[0]
    with torch.no_grad():
        chunks = F.normalize(encoder(torch.from_numpy(x).view(3, 16000)), dim=1)
    full = F.normalize(chunks.mean(dim=0), dim=0)
    torch.testing.assert_close(vector[:192] * np.sqrt(2), full, atol=1e-5, rtol=0)


def test_cohorts_of_speaker_means_or_utterances():
    vectors = {f'u{i}': torch.full((2,), float(i)) for i in range(4)}
    entries = [TrainEntry('b', 'u0'), TrainEntry('a', 'u1'), TrainEntry('b', 'u2'), TrainEntry('a', 'u3')]
    torch.testing.assert_close(build_cohort(vectors, entries, 'speaker'), torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    torch.testing.assert_close(build_cohort(vectors, entries, 'utterance'), torch.tensor([[0.0] * 2, [1.0] * 2,
                                                                                          [2.0] * 2, [3.0] * 2]))


def test_evaluate_scores_each_list_and_normalises_against_the_cohort(tmp_path, encoder):
    rng = np.random.default_rng(3)
    for name in ('a', 'b', 'c', 'd'):
        soundfile.write(tmp_path / f'{name}.wav', 0.1 * rng.standard_normal(12000), 16000)
    labelled = TrialList('l.txt', np.array([1, 0, 0]), ['a.wav', 'a.wav', 'b.wav'], ['b.wav', 'c.wav', 'c.wav'],
                         [1, 2, 3])
    blind = TrialList('b.txt', None, ['a.wav'], ['d.wav'], [1])
    cohort = Cohort([TrainEntry('s', 'c.wav'), TrainEntry('t', 'd.wav')], str(tmp_path), 'utterance', 2)
    results = evaluate(encoder, [labelled, blind], str(tmp_path), 'cpu', cohort=cohort)
    vectors = {n: protocol_vectors(encoder, str(tmp_path / n)) for n in ('a.wav', 'b.wav', 'c.wav', 'd.wav')}
    expected = [float(vectors[e] @ vectors[t]) for e, t in zip(labelled.enroll, labelled.test)]
    np.testing.assert_allclose(results['l.txt'].scores, expected, atol=1e-6)
    assert results['l.txt'].metrics == verification_metrics(results['l.txt'].scores, labelled.labels)
    assert results['b.txt'].metrics is None and results['b.txt'].snorm_metrics is None
    files = ['a.wav', 'b.wav', 'c.wav', 'd.wav']
    pairs = np.array([(0, 1), (0, 2), (1, 2)])
    normalised = as_norm(torch.stack([vectors[f] for f in files]), pairs,
                         torch.stack([vectors['c.wav'], vectors['d.wav']]), 2)
    # A cohort of two has a tiny spread: the 1e-7 differences between batched and single embeddings grow here.
    np.testing.assert_allclose(results['l.txt'].snorm_scores, normalised, atol=1e-3)
    assert [suffix for suffix, _, _ in results['l.txt'].score_sets()] == ['', '_asnorm']


def test_subtracting_the_training_mean_scores_the_mean_of_two_cosines_of_centred_embeddings(tmp_path, encoder):
    rng = np.random.default_rng(4)
    for name in ('a', 'b', 'c', 'd', 'e'):
        soundfile.write(tmp_path / f'{name}.wav', 0.1 * rng.standard_normal(12000 + 4000 * (name == 'e')), 16000)
    trials = TrialList('l.txt', np.array([1, 0]), ['a.wav', 'a.wav'], ['b.wav', 'c.wav'], [1, 2])
    cohort = Cohort([TrainEntry('s', 'd.wav'), TrainEntry('t', 'e.wav')], str(tmp_path), 'utterance', 2,
                    as_norm=False, subtract_mean=True)
    result = evaluate(encoder, [trials], str(tmp_path), 'cpu', cohort=cohort)['l.txt']
    assert result.snorm_scores is None  # the cohort serves the mean only
    vectors = {f'{n}.wav': protocol_vectors(encoder, str(tmp_path / f'{n}.wav')) * np.sqrt(2) for n in 'abcde'}
    mean = (vectors['d.wav'] + vectors['e.wav']) / 2
    halves = {n: (v - mean).split(192) for n, v in vectors.items()}
    expected = [np.mean([float(F.cosine_similarity(x, y, dim=0)) for x, y in zip(halves[e], halves[t])])
                for e, t in zip(trials.enroll, trials.test)]
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    plain = evaluate(encoder, [trials], str(tmp_path), 'cpu')['l.txt'].scores
    assert np.abs(plain - result.scores).max() > 1e-3  # it changed the scores


@pytest.fixture
def odd_files(tmp_path):
    """Two noises, two silent files, one near-silent (-90 dBFS) file and three that cannot be embedded."""
    rng = np.random.default_rng(3)
    for name in ('voice1.wav', 'voice2.wav'):
        soundfile.write(tmp_path / name, (0.1 * rng.standard_normal(24000)).astype(np.float32), 16000)
    soundfile.write(tmp_path / 'silent1.wav', np.zeros(24000, np.float32), 16000)
    soundfile.write(tmp_path / 'silent2.wav', np.zeros(40000, np.float32), 16000)
    soundfile.write(tmp_path / 'hum.wav', (3e-5 * rng.standard_normal(24000)).astype(np.float32), 16000,
                    subtype='FLOAT')
    soundfile.write(tmp_path / 'nan.wav', np.full(16000, np.nan, np.float32), 16000, subtype='FLOAT')
    soundfile.write(tmp_path / 'short.wav', np.full(100, 0.1, np.float32), 16000)
    (tmp_path / 'garbage.wav').write_bytes(b'RIFF\x00\x00not audio at all')
    return tmp_path


def test_silent_files_are_reported_and_score_about_one_against_each_other(encoder, odd_files, capsys):
    names = ['voice1.wav', 'silent1.wav', 'hum.wav', 'silent2.wav', 'voice2.wav']
    vectors = embed_files(encoder, names, str(odd_files), torch.device('cpu'), progress=True)
    printed = capsys.readouterr().out
    assert f'{odd_files}: 3 files are silent or nearly (RMS below -80 dBFS), e.g. silent1.wav, hum.wav, ' \
           f'silent2.wav: they hold next to nothing of a speaker, and all-zero files score 1.0 against each ' \
           f'other' in printed
    assert float(vectors['silent1.wav'] @ vectors['silent2.wav']) == pytest.approx(1.0, abs=1e-5)
    assert float(vectors['voice1.wav'] @ vectors['silent1.wav']) < 0.99


class Payload:
    def __reduce__(self):
        return (os.system, ('touch executed',))


@pytest.mark.parametrize('stored', [lambda: {'identity': 'x', 'payload': Payload()}, lambda: [1, 2]],
                         ids=['crafted', 'a list'])
def test_an_embedding_cache_that_is_crafted_or_not_a_cache_is_rebuilt_without_running_it(odd_files, tmp_path,
                                                                                        monkeypatch, stored):
    monkeypatch.chdir(tmp_path)
    encoder = build_encoder('tdnn', 8, 16000, 8).eval()
    names, cache = ['voice1.wav', 'voice2.wav'], tmp_path / 'cache'
    first = cached_embed_files(encoder, names, str(odd_files), torch.device('cpu'), str(cache), 'x', progress=False)
    [cache_file] = cache.iterdir()
    with open(cache_file, 'wb') as f:
        pickle.dump(stored(), f, protocol=2)
    again = cached_embed_files(encoder, names, str(odd_files), torch.device('cpu'), str(cache), 'x', progress=False)
    assert all(torch.equal(first[n], again[n]) for n in names) and not (tmp_path / 'executed').exists()
    assert torch.load(cache_file, weights_only=True)['paths'] == names


def test_a_recording_longer_than_ten_minutes_is_embedded_from_its_first_ten_and_named(tmp_path, capsys):
    encoder = build_encoder('tdnn', 8, 8000, 8).eval()
    noise = (0.1 * np.random.default_rng(4).standard_normal(int(EVAL_MAX_SECONDS + 5) * 8000)).astype(np.float32)
    soundfile.write(tmp_path / 'long.wav', noise, 8000, subtype='FLOAT')
    soundfile.write(tmp_path / 'start.wav', noise[:int(EVAL_MAX_SECONDS) * 8000], 8000, subtype='FLOAT')
    vectors = embed_files(encoder, ['long.wav', 'start.wav'], str(tmp_path), torch.device('cpu'))
    assert torch.equal(vectors['long.wav'], vectors['start.wav'])
    assert f'{tmp_path}: 1 files are longer than 600 s: its first 600 s embedded, e.g. long.wav' in \
        capsys.readouterr().out


def test_a_long_recording_is_embedded_one_bounded_pass_at_a_time():
    """Chunks of a long waveform go through the encoder in passes of at most `max_seconds` of audio (all at once,
    an hour of audio took 17 GB), and give the mean of their normalised embeddings."""
    encoder = build_encoder('tdnn', 8, 8000, 8).eval()
    passes = []
    encoder.register_forward_pre_hook(lambda _, inputs: passes.append(inputs[0].numel()))
    waveform = torch.from_numpy(np.random.default_rng(5).standard_normal(130 * 8000).astype(np.float32))
    vector = protocol_vectors_of(encoder, [waveform], torch.device('cpu'), max_seconds=20.0)
    assert passes[0] == 5 * crop_samples(300, 8000) and max(passes[1:]) <= 20 * 8000 and sum(passes[1:]) > 120 * 8000
    pieces = waveform[:130 * 8000 // 7 * 7].reshape(7, -1)
    with torch.no_grad():
        chunked = F.normalize(F.normalize(encoder(pieces, False), dim=1).mean(dim=0), dim=0)
    torch.testing.assert_close(vector[0, :8] * np.sqrt(2), chunked, atol=1e-5, rtol=1e-5)


def test_files_that_cannot_be_embedded_are_named_or_skipped_and_listed(encoder, odd_files):
    names = ['voice1.wav', 'nan.wav', 'short.wav', 'garbage.wav', 'voice2.wav']
    with pytest.raises(UserError, match=rf'{odd_files}: 3 files cannot be embedded, e\.g\. nan\.wav \(NaN or '
                                        rf'infinite samples\); short\.wav \(6\.2 ms long, .*\); garbage\.wav '
                                        rf'\(unreadable: '):
        embed_files(encoder, names, str(odd_files), torch.device('cpu'), n_cpu=1)
    unusable = []
    vectors = embed_files(encoder, names, str(odd_files), torch.device('cpu'), unusable=unusable)
    assert list(vectors) == ['voice1.wav', 'voice2.wav'] and [name for name, _ in unusable] == names[1:4]
    broken = ECAPA_TDNN(32, 16000).eval()
    with torch.no_grad():
        next(broken.parameters()).fill_(float('nan'))
    with pytest.raises(UserError, match=r'2 files cannot be embedded, e\.g\. voice1\.wav \(its embedding is not '
                                        r'finite: are the weights\?\)'):
        embed_files(broken, ['voice1.wav', 'voice2.wav'], str(odd_files), torch.device('cpu'))


def test_waveform_without_a_rate_is_an_error():
    with pytest.raises(ValueError, match='sampling_rate'):
        embed(ECAPA_TDNN(32), np.zeros(16000, dtype=np.float32))


def test_a_checkpoint_of_another_width_is_a_clear_error(tmp_path):
    save_checkpoint({'speaker_encoder.' + k: v for k, v in ECAPA_TDNN(32).state_dict().items()},
                    EncoderConfig(model='ecapa-tdnn', C=32, sampling_rate=16000, embedding_dim=192),
                    str(tmp_path / 'm.model'))
    with pytest.raises(UserError, match=r'm.model: does not fit a ECAPA_TDNN .*of another shape'):
        load_model(str(tmp_path / 'm.model'), C=64)


@pytest.mark.parametrize('name,C,rate', [('ecapa-tdnn', 32, 16000), ('tdnn', 64, 8000), ('resnet18', 8, 44100)])
def test_checkpoint_round_trip_through_the_notebook_helpers(tmp_path, name, C, rate, capsys):
    torch.manual_seed(0)
    encoder = build_encoder(name, C, rate, embedding_dim=40).eval()
    speaker_model = SpeakerModel(encoder, AAMsoftmax(7, 0.2, 30, 40))
    path = str(tmp_path / 'model_0003.model')
    save_checkpoint(speaker_model.state_dict(), EncoderConfig(model=name, C=C, sampling_rate=rate, embedding_dim=40),
                    path)
    loaded = load_model(path)
    assert type(loaded) is type(encoder) and loaded.sampling_rate == rate and not loaded.training
    waveform = (0.1 * np.random.default_rng(0).standard_normal(2 * rate)).astype(np.float32)
    torch.testing.assert_close(embed(loaded, waveform, rate), embed(encoder, waveform, rate), rtol=0, atol=0)
    # A file at another rate is resampled to the encoder's.
    other_rate = 16000 if rate == 8000 else 8000
    soundfile.write(tmp_path / 'a.wav', (0.1 * np.random.default_rng(1).standard_normal(other_rate)), other_rate)
    vector = protocol_vectors(loaded, str(tmp_path / 'a.wav'))
    assert vector.shape == (80,) and embed(loaded, str(tmp_path / 'a.wav')).shape == (40,)
    assert score(loaded, str(tmp_path / 'a.wav'), str(tmp_path / 'a.wav')) == pytest.approx(float(vector @ vector))
    # Without the JSON beside it, the architecture is read from the weights' names and shapes, and said.
    os.remove(tmp_path / 'model_0003.json')
    capsys.readouterr()
    alone = load_model(path)
    assert capsys.readouterr().out == f'{path}: no model_0003.json beside it; its weights are those of {name} C={C}, ' \
                                      f'embedding 40, {rate} Hz\n'
    assert type(alone) is type(encoder) and alone.sampling_rate == rate
    torch.testing.assert_close(embed(alone, waveform, rate), embed(encoder, waveform, rate), rtol=0, atol=0)


ENCODERS = [('ecapa-tdnn', 48), ('tdnn', 64), ('resnet18', 8), ('campplus', 8), ('redimnet-b2', 8)]


def eager(encoder, x):
    with torch.no_grad():
        return encoder.eval()(x, False)


@pytest.mark.parametrize('rate', [8000, 16000])
def test_convolutional_mel_equals_torchaudio(rate):
    mel = ECAPA_TDNN(32, rate).torchfbank[1]
    x = torch.randn(2, rate)
    torch.testing.assert_close(ConvMelSpectrogram(mel)(x), mel(x), rtol=1e-4, atol=1e-4 * float(mel(x).max()))


@pytest.mark.parametrize('name,C', ENCODERS)
def test_torchscript_matches_eager_for_any_batch_and_length(tmp_path, name, C):
    torch.manual_seed(0)
    encoder = build_encoder(name, C, 16000).eval()
    export_torchscript(encoder, str(tmp_path / 'encoder.pt'))
    scripted = torch.jit.load(str(tmp_path / 'encoder.pt'))
    for shape in [(1, 20000), (3, 41000)]:
        x = 0.1 * torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), eager(encoder, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize('name,C', ENCODERS[:3])  # CAM++'s and ReDimNet's: test_published.py exports them
def test_onnx_matches_eager(tmp_path, name, C):
    pytest.importorskip('onnx', reason='onnx is an optional extra (requirements-extras.txt)')
    onnxruntime = pytest.importorskip('onnxruntime', reason='onnxruntime is an optional extra')
    torch.manual_seed(0)
    encoder = build_encoder(name, C, 8000).eval()
    export_onnx(encoder, str(tmp_path / 'encoder.onnx'))
    session = onnxruntime.InferenceSession(str(tmp_path / 'encoder.onnx'))
    x = 0.1 * torch.randn(3, 13000)
    out = session.run(['embedding'], {'waveform': x.numpy()})[0]
    np.testing.assert_allclose(out, eager(encoder, x).numpy(), rtol=0, atol=1e-4)


def test_bf16_evaluation_moves_protocol_vectors_slightly_and_keeps_features_in_float32():
    torch.manual_seed(0)
    encoder = ECAPA_TDNN(C=64).eval()
    waveforms = [torch.randn(n) * 0.1 for n in (40000, 52000)]
    exact = protocol_vectors_of(encoder, waveforms, 'cpu')
    fast = protocol_vectors_of(Autocast(encoder), waveforms, 'cpu')
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    assert (fast - exact).abs().max() < 2e-2
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert encoder.features(waveforms[0][None], False).dtype == torch.float32
