import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, '..', 'shared', 'data')

import demo  # noqa: E402


def shared_data(*parts):
    """A path under ../shared/data, or a skip when that folder is not beside the checkout."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f'{path} is not here (the shared real-audio set sits beside the checkout)')
    return path


@pytest.fixture(scope='session')
def tiny_corpus(tmp_path_factory):
    """A generated corpus in the real layouts: 6 training speakers x 6 utterances of 1-2 s, 4 held-out ones."""
    root = tmp_path_factory.mktemp('corpus')
    return demo.make_corpus(str(root), train_speakers=6, test_speakers=4, utterances=6, seconds=(1.0, 2.0))


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / 'cache')
