"""distributed.py: torchrun with the gloo backend on CPU, two processes, as a user would launch them."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*argv, processes=2):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}']
    result = subprocess.run(command + list(argv), capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def loss_check(out, *flags, processes):
    out.mkdir()
    script = os.path.join(ROOT, 'tests', 'ddp_loss_check.py')
    if processes == 1:
        subprocess.run([sys.executable, script, str(out)] + list(flags), check=True, cwd=ROOT)
    else:
        torchrun(script, str(out), *flags, processes=processes)
    return [torch.load(out / f'rank{r}.pt') for r in range(processes)]


def test_gathered_contrastive_loss_and_gradients_equal_one_process_over_the_global_batch(tmp_path):
    single, = loss_check(tmp_path / 'single', processes=1)
    ranks = loss_check(tmp_path / 'gathered', processes=2)
    for rank in ranks:
        torch.testing.assert_close(rank['loss'], single['loss'], rtol=0, atol=1e-5)
        for name, gradient in single['gradients'].items():
            torch.testing.assert_close(rank['gradients'][name], gradient, rtol=1e-4, atol=1e-5, msg=name)
    local = loss_check(tmp_path / 'local', '--local_negatives', processes=2)
    assert all(abs(float(rank['loss'] - single['loss'])) > 1e-3 for rank in local)


@pytest.mark.parametrize('mode', ['classifier', 'clip'])
def test_torchrun_trains_with_two_processes_and_one_writer(tiny_corpus, train_argv, tmp_path, mode):
    args = train_argv(tiny_corpus, tmp_path, '--mode', mode, '--batch_size', '3', '--max_epoch', '1')
    output = torchrun(os.path.join(ROOT, 'trainECAPAModel.py'), *args)
    assert output.count('1 epoch, LR') == 1 and '2 processes' in output
    assert sorted(os.listdir(tmp_path / 'model')) == ['model_0001.json', 'model_0001.model', 'resume.pt']
    assert len((tmp_path / 'score.txt').read_text().splitlines()) == 1
    resume = torch.load(tmp_path / 'model' / 'resume.pt', weights_only=True)
    assert len(resume['rng']) == 2 and not torch.equal(resume['rng'][0], resume['rng'][1])
    if mode == 'clip':
        output = torchrun(os.path.join(ROOT, 'trainECAPAModel.py'), *args[:-1], '2')
        assert 'Resuming from' in output and output.count('Resuming from') == 1
        assert len((tmp_path / 'score.txt').read_text().splitlines()) == 2
