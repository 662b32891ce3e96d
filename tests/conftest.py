"""Fixtures shared by the test modules (each named after the module it tests).

  tiny_corpus      a generated corpus in the real layouts (session)
  tiny_shards      its training list packed into tar shards (session)
  train_argv       the flags of a tiny training run on a corpus: ECAPA-TDNN C=32, 0.4 s crops, batch 8
  reference_run    one tiny two-epoch run with those flags, shared by every test that only reads its outputs
  cli_error        runs cli.main expecting a user error: (exit status, stderr, stdout)
  shared_data      a path under ../shared/data, or a skip when that folder is not beside the checkout
  broken_corpus    the tiny corpus with one unusable file of each BROKEN kind listed under its first speaker
assert_same_checkpoints(a, b)  two checkpoint files hold bit-identical tensors
The long-running modules are collected first (`pytest_collection_modifyitems`).
"""

import os
import sys

import numpy as np
import pytest
import soundfile
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, '..', 'shared', 'data')

from speakerkit import cli, demo, prepare  # noqa: E402

if os.environ.get('PYTEST_XDIST_WORKER'):  # one process per core (pytest -n): no two workers fight over a core,
    torch.set_num_threads(1)
    os.environ['OMP_NUM_THREADS'] = '1'  # nor the trainings a test starts as a process of its own


def assert_same_checkpoints(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope='session')
def root():
    return ROOT


@pytest.fixture(scope='session')
def shared_data():
    def path(*parts):
        found = os.path.join(SHARED_DATA, *parts)
        if not os.path.exists(found):
            pytest.skip(f'{found} is not here (the shared real-audio set sits beside the checkout)')
        return found
    return path


@pytest.fixture(scope='session')
def tiny_corpus(tmp_path_factory):
    """6 training speakers x 6 utterances of 1-2 s, 4 held-out ones (48 trials), MUSAN and RIR folders."""
    root = tmp_path_factory.mktemp('corpus')
    return demo.make_corpus(str(root), train_speakers=6, test_speakers=4, utterances=6, seconds=(1.0, 2.0))


@pytest.fixture(scope='session')
def tiny_shards(tiny_corpus, tmp_path_factory):
    """The path of the shard list of `tiny_corpus`'s 36 training utterances, packed 3 a shard (12 shards)."""
    out = tmp_path_factory.mktemp('shards')
    assert prepare.main(['shards', tiny_corpus['train_list'], tiny_corpus['train_path'], str(out),
                         '--per_shard', '3', '--workers', '1']) == 0
    return str(out / 'shards.txt')


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / 'cache')


@pytest.fixture(scope='session')
def train_argv(tmp_path_factory):
    """train_argv(corpus, save_path, *extra): the flags of a tiny training run (4 steps an epoch)."""
    cache = str(tmp_path_factory.mktemp('bank_cache'))

    def argv(corpus, save_path, *extra):
        return ['--train_list', corpus['train_list'], '--train_path', corpus['train_path'],
                '--eval_list', corpus['eval_list'], '--eval_path', corpus['eval_path'],
                '--musan_path', corpus['musan_path'], '--rir_path', corpus['rir_path'],
                '--save_path', str(save_path), '--cache_dir', cache,
                '--C', '32', '--num_frames', '40', '--batch_size', '8', '--n_cpu', '0', '--seed', '5', *extra]
    return argv


@pytest.fixture(scope='session')
def reference_run(tiny_corpus, train_argv, tmp_path_factory):
    """The save_path of `train_argv` with --max_epoch 2, trained once for the whole session. Read it, never
    write into it."""
    path = tmp_path_factory.mktemp('reference_run')
    cli.main(train_argv(tiny_corpus, path, '--max_epoch', '2'))
    return path


@pytest.fixture
def cli_error(capsys):
    """cli_error(argv) -> (exit status, stderr, stdout) of cli.main(argv), which must stop on a user
    error."""
    def run(argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            cli.main(argv)
        printed = capsys.readouterr()
        return stopped.value.code, printed.err, printed.out
    return run


BROKEN = {  # file name -> (how to write it, a word the skip reason contains)
    'garbage.wav': (lambda p: open(p, 'wb').write(b'RIFF\x00\x00not audio at all' * 10), 'unreadable'),
    'empty.wav': (lambda p: soundfile.write(p, np.zeros(0, np.float32), 16000), 'empty'),
    'short.wav': (lambda p: soundfile.write(p, np.full(100, 0.1, np.float32), 16000), 'shorter'),
    'nan.wav': (lambda p: soundfile.write(p, np.full(16000, np.nan, np.float32), 16000, subtype='FLOAT'),
                'NaN'),
    'silent.wav': (lambda p: soundfile.write(p, np.zeros(16000, np.float32), 16000), 'silent'),
}


@pytest.fixture(scope='session')
def broken_audio():
    return BROKEN


@pytest.fixture
def broken_corpus(tiny_corpus, tmp_path):
    """The tiny corpus's training files and, listed under its first speaker, one file of each BROKEN kind
    and a stereo file; returns (corpus, {broken file name: its line in the training list})."""
    root = tmp_path / 'train'
    root.mkdir()
    for speaker in os.listdir(tiny_corpus['train_path']):
        os.symlink(os.path.join(tiny_corpus['train_path'], speaker), root / speaker)
    (root / 'bad').mkdir()
    lines = open(tiny_corpus['train_list']).read().splitlines()
    first_speaker = lines[0].split()[0]
    for name, (write, _) in BROKEN.items():
        write(str(root / 'bad' / name))
        lines.insert(2, f'{first_speaker} bad/{name}')
    stereo = np.random.default_rng(0).standard_normal((24000, 2)).astype(np.float32) * 0.1
    soundfile.write(root / 'bad' / 'stereo.wav', stereo, 16000)
    lines.append(f'{first_speaker} bad/stereo.wav')
    numbers = {line.split()[1][4:]: number for number, line in enumerate(lines, start=1)
               if line.split()[1].startswith('bad/') and line.split()[1] != 'bad/stereo.wav'}
    train_list = tmp_path / 'train_list.txt'
    train_list.write_text('\n'.join(lines) + '\n')
    return dict(tiny_corpus, train_list=str(train_list), train_path=str(root)), numbers


# The modules whose tests take a minute or more each; collected first, so that `pytest -n 2` starts them at once
# instead of leaving one worker alone with them at the end.
LONG_RUNNING = ('test_trainer_learning.py', 'test_recipe.py')


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONG_RUNNING)
