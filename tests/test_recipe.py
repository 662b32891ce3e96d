"""exps/voxceleb/run.sh --demo: every stage of the VoxCeleb recipe, end to end on a generated corpus."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the whole recipe, every stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, 'exps', 'voxceleb', 'run.sh')


def run_recipe(*flags):
    return subprocess.run(['bash', RECIPE, *flags], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHON=sys.executable))


def test_demo_recipe_prepares_checks_trains_finetunes_and_evaluates(tiny_corpus, tmp_path):
    corpus = os.path.dirname(os.path.dirname(tiny_corpus['train_list']))
    exp = tmp_path / 'exp'
    done = run_recipe('--demo', '--corpus', corpus, '--exp', str(exp))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = [line.split()[:3] for line in (exp / 'stage_times.txt').read_text().splitlines()]
    assert [s[:3] for s in stages] == [['stage', '1', 'prepare'], ['stage', '2', 'check'], ['stage', '3', 'train'],
                                       ['stage', '4', 'finetune'], ['stage', '5', 'eval']]
    listed = (exp / 'data' / 'train_list.txt').read_text().splitlines()
    assert sorted(listed) == sorted(open(tiny_corpus['train_list']).read().splitlines())
    assert 'no problems found' in done.stdout
    assert len((exp / 'ecapa' / 'score.txt').read_text().splitlines()) == 2
    finetune = json.loads((exp / 'ecapa_lm' / 'config.json').read_text())['arguments']
    assert finetune['m'] == 0.5 and finetune['num_frames'] == 300 and finetune['spec_augment'] is False
    assert finetune['initial_model'].endswith('ecapa/model/model_0002.model')
    trained = json.loads((exp / 'ecapa' / 'config.json').read_text())['arguments']
    assert trained['config'] == 'exps/voxceleb/conf/ecapa_tdnn.yaml' and finetune['large_margin']
    assert (trained['C'], trained['max_epoch'], trained['lr_decay']) == (128, 2, 0.97)  # flags over the file's
    results = (exp / 'eval' / 'results.txt').read_text()
    assert re.search(r'trials.txt: \d+ trials, EER [\d.]+%.*, AS-Norm EER [\d.]+%', results)
    assert 'ecapa_lm/model/model_0001.model' in results
    # Skipping stages: only the evaluation runs again, on the same checkpoint.
    again = run_recipe('--demo', '--corpus', corpus, '--exp', str(exp), '--stage', '2', '--skip', '2',
                       '--skip', '3', '--skip', '4')
    assert again.returncode == 0, again.stderr[-3000:]
    assert '== stage 5' in again.stdout and '== stage 3' not in again.stdout and '== stage 1' not in again.stdout
    assert (exp / 'eval' / 'results.txt').read_text() == results
