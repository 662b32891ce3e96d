"""Faults that must lose nothing: SIGTERM/SIGINT stop after the current step with a resumable state; a run
killed with SIGKILL continues from its last complete state to the same result."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import trainECAPAModel
from conftest import ROOT
from test_cli import tiny_args


def assert_same_checkpoints(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize('number', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_and_the_run_resumes_exactly(tiny_corpus, tmp_path, cache_dir, monkeypatch,
                                                                   capsys, number):
    straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
    trainECAPAModel.main(tiny_args(tiny_corpus, straight, cache_dir, '--max_epoch', '2'))
    original_step = trainECAPAModel.TrainingStep.__call__
    calls = []

    def signalled_at_step_6(self, batch, rng):  # epoch 2, step 2 (4 steps an epoch)
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), number)
        return original_step(self, batch, rng)

    monkeypatch.setattr(trainECAPAModel.TrainingStep, '__call__', signalled_at_step_6)
    assert trainECAPAModel.main(tiny_args(tiny_corpus, stopped, cache_dir, '--max_epoch', '2')) is None
    printed = capsys.readouterr().out
    name = signal.Signals(number).name
    assert f'Stopped by {name} in epoch 2 after step 2' in printed and 'Run the same command again' in printed
    assert len(calls) == 6 and not (stopped / 'model' / 'model_0002.model').exists()
    state = torch.load(stopped / 'model' / 'resume.pt', weights_only=False)
    assert state['epoch'] == 1 and state['partial_epoch'][0]['step'] == 2
    monkeypatch.setattr(trainECAPAModel.TrainingStep, '__call__', original_step)
    trainECAPAModel.main(tiny_args(tiny_corpus, stopped, cache_dir, '--max_epoch', '2'))
    assert 'after epoch 1 and 2 steps of epoch 2' in capsys.readouterr().out
    assert_same_checkpoints(straight / 'model' / 'model_0002.model', stopped / 'model' / 'model_0002.model')
    assert (straight / 'score.txt').read_text() == (stopped / 'score.txt').read_text()


def train_command(corpus, save_path, cache_dir):
    return [sys.executable, os.path.join(ROOT, 'trainECAPAModel.py'),
            *tiny_args(corpus, save_path, cache_dir, '--max_epoch', '3', '--n_cpu', '1')]


def test_a_run_killed_with_sigkill_resumes_to_the_same_final_checkpoint(tiny_corpus, tmp_path, cache_dir):
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    subprocess.run(train_command(tiny_corpus, straight, cache_dir), check=True, capture_output=True, cwd=ROOT)
    process = subprocess.Popen(train_command(tiny_corpus, killed, cache_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=ROOT)
    resume = killed / 'model' / 'resume.pt'
    deadline = time.time() + 300
    while not resume.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    assert process.poll() is None, 'the run ended before it could be killed'
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / 'model' / 'model_0003.model').exists()
    finished = subprocess.run(train_command(tiny_corpus, killed, cache_dir), capture_output=True, text=True,
                              cwd=ROOT)
    assert finished.returncode == 0, finished.stderr
    assert 'Resuming from' in finished.stdout
    assert_same_checkpoints(straight / 'model' / 'model_0003.model', killed / 'model' / 'model_0003.model')
    assert (straight / 'score.txt').read_text() == (killed / 'score.txt').read_text()
