import os

import numpy as np
import pytest
import torch

import tools
import trainECAPAModel
from loss import AAMsoftmax
from model import ECAPA_TDNN
from tools import cohort_statistics, read_trials, save_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = trainECAPAModel.SpeakerModel(ECAPA_TDNN(32), AAMsoftmax(6, 0.2, 30))
    path = str(tmp_path / 'model_0001.model')
    save_checkpoint(model.state_dict(), {'model': 'ecapa-tdnn', 'C': 32, 'embedding_dim': 192,
                                         'sampling_rate': 16000}, path)
    return path


@pytest.fixture
def embed_calls(monkeypatch):
    """Every file that goes through the encoder, in order."""
    calls = []
    original = tools.embed_files

    def counting(encoder, relative_paths, *args, **kwargs):
        calls.extend(relative_paths)
        return original(encoder, relative_paths, *args, **kwargs)
    monkeypatch.setattr(tools, 'embed_files', counting)
    monkeypatch.setattr(trainECAPAModel, 'embed_files', counting)
    return calls


def eval_argv(checkpoint, corpus, save_path, *lists):
    return ['--eval', '--initial_model', checkpoint, '--eval_list', *lists, '--eval_path', corpus['eval_path'],
            '--save_path', str(save_path), '--n_cpu', '0']


def test_several_lists_in_one_run_embed_each_file_once(tiny_corpus, checkpoint, tmp_path, embed_calls):
    labels, enroll, test = read_trials(tiny_corpus['eval_list'])
    half = tmp_path / 'half.txt'
    half.write_text(''.join(f'{label} {e} {t}\n' for label, e, t in list(zip(labels, enroll, test))[::2]))
    unlabelled = tmp_path / 'test_phase.txt'
    unlabelled.write_text(''.join(f'{e} {t}\n' for e, t in zip(enroll, test)))
    results = trainECAPAModel.main(eval_argv(checkpoint, tiny_corpus, tmp_path / 'run', tiny_corpus['eval_list'],
                                             str(half), str(unlabelled)))
    assert sorted(embed_calls) == sorted(set(enroll) | set(test))
    full, part, blind = (results[p] for p in (tiny_corpus['eval_list'], str(half), str(unlabelled)))
    np.testing.assert_allclose(part['scores'], full['scores'][::2])
    np.testing.assert_allclose(blind['scores'], full['scores'])
    assert part['metrics'] == tools.verification_metrics(full['scores'][::2], labels[::2])
    assert blind['metrics'] is None
    rows = (tmp_path / 'run' / 'scores' / 'test_phase.txt').read_text().split('\n')[0].split()
    assert len(rows) == 3 and rows[:2] == [enroll[0], test[0]]


def test_embeddings_are_cached_per_checkpoint(tiny_corpus, checkpoint, tmp_path, embed_calls):
    argv = eval_argv(checkpoint, tiny_corpus, tmp_path / 'run', tiny_corpus['eval_list'])
    first = trainECAPAModel.main(argv)[tiny_corpus['eval_list']]
    count = len(embed_calls)
    assert count > 0 and os.listdir(tmp_path / 'run' / 'embeddings')
    second = trainECAPAModel.main(argv)[tiny_corpus['eval_list']]
    assert len(embed_calls) == count
    np.testing.assert_array_equal(first['scores'], second['scores'])
    # Other weights: the cache does not apply.
    state = torch.load(checkpoint, weights_only=True)
    state['speaker_encoder.fc6.bias'] += 1
    torch.save(state, checkpoint)
    trainECAPAModel.main(argv)
    assert len(embed_calls) == 2 * count


def test_extract_writes_embeddings_for_a_folder_and_a_list(tiny_corpus, checkpoint, tmp_path):
    out = tmp_path / 'folder.pt'
    trainECAPAModel.main(['--initial_model', checkpoint, '--extract', tiny_corpus['eval_path'], '--out', str(out),
                          '--n_cpu', '0'])
    saved = torch.load(out, weights_only=True)
    files = sorted({f for _, e, t in [read_trials(tiny_corpus['eval_list'])] for f in e + t})
    assert saved['paths'] == files
    assert saved['embeddings'].shape == (len(files), 192)
    torch.testing.assert_close(saved['embeddings'].norm(dim=1), torch.ones(len(files)))
    encoder = tools.load_model(checkpoint)
    torch.testing.assert_close(saved['vectors'][0], tools.embed(encoder, os.path.join(tiny_corpus['eval_path'],
                                                                                       files[0])), atol=1e-6, rtol=0)
    listed = tmp_path / 'listed.pt'
    trainECAPAModel.main(['--initial_model', checkpoint, '--extract', tiny_corpus['train_list'],
                          '--eval_path', tiny_corpus['train_path'], '--out', str(listed), '--n_cpu', '0'])
    assert len(torch.load(listed, weights_only=True)['paths']) == len(open(tiny_corpus['train_list']).readlines())


def test_utterance_cohort(tiny_corpus, checkpoint, tmp_path):
    argv = eval_argv(checkpoint, tiny_corpus, tmp_path / 'run', tiny_corpus['eval_list']) + [
        '--snorm', '--cohort', 'utterance', '--cohort_size', '10', '--cohort_top_k', '4',
        '--train_list', tiny_corpus['train_list'], '--train_path', tiny_corpus['train_path']]
    result = trainECAPAModel.main(argv)[tiny_corpus['eval_list']]
    assert result['snorm_metrics'] is not None and len(result['snorm_scores']) == len(result['scores'])


def test_cohort_statistics_do_not_depend_on_chunking():
    rng = np.random.default_rng(0)
    rows = torch.tensor(rng.standard_normal((37, 8)), dtype=torch.float32)
    cohort = torch.tensor(rng.standard_normal((101, 8)), dtype=torch.float32)
    whole = cohort_statistics(rows, cohort, 20, row_chunk=1000, cohort_chunk=1000)
    chunked = cohort_statistics(rows, cohort, 20, row_chunk=5, cohort_chunk=7)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)
    top = torch.topk(rows @ cohort.T, 20, dim=1).values.double()
    torch.testing.assert_close(whole[0], top.mean(dim=1))
    torch.testing.assert_close(whole[1], top.std(dim=1, unbiased=False))


def test_cohort_entries_spread_over_speakers():
    entries = [(f's{i % 5}', f'u{i}') for i in range(50)]
    chosen = trainECAPAModel.cohort_entries(entries, 12, seed=1)
    assert len(chosen) == 12 and len(set(chosen)) == 12
    counts = [sum(1 for s, _ in chosen if s == f's{k}') for k in range(5)]
    assert max(counts) - min(counts) <= 1


def test_score_file_errors_name_the_line(tmp_path):
    path = tmp_path / 'scores.txt'
    path.write_text('a b 0.5 1\na c high 0\n')
    with pytest.raises(SystemExit, match='scores.txt:2'):
        trainECAPAModel.main(['--score_file', str(path)])


def test_mixed_trial_formats_are_an_error(tmp_path):
    path = tmp_path / 'trials.txt'
    path.write_text('1 a b\nc d\n')
    with pytest.raises(ValueError, match='trials.txt:2'):
        read_trials(str(path))
