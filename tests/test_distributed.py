"""distributed.py: torchrun with the gloo backend on CPU, two processes, as a user would launch them."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from speakerkit import cli
from conftest import assert_same_checkpoints
from speakerkit.records import read_metrics

pytestmark = pytest.mark.slow  # every test starts torchrun processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*argv, processes=2):
    """torchrun's output; a run that is not done in 10 minutes is killed with every process it started."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}']
    process = subprocess.Popen(command + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, start_new_session=True)
    try:
        out, err = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    return out


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


@pytest.fixture(scope='module')
def torchrun_argv(tiny_corpus, train_argv):
    """torchrun_argv(save_path, *extra): trainECAPAModel.py and the flags of a tiny run on two processes."""
    def argv(save_path, *extra):
        return [os.path.join(ROOT, 'trainECAPAModel.py'),
                *train_argv(tiny_corpus, save_path, '--batch_size', '3', '--n_cpu', '1', *extra)]
    return argv


@pytest.fixture(scope='module')
def straight_torchrun_run(torchrun_argv, tmp_path_factory):
    """(save_path, output) of a three-epoch classifier run on two processes, never stopped."""
    path = tmp_path_factory.mktemp('straight_torchrun_run')
    return path, torchrun(*torchrun_argv(path, '--max_epoch', '3'))


def test_torchrun_trains_with_two_processes_and_one_writer(straight_torchrun_run):
    path, output = straight_torchrun_run
    assert output.count('1 epoch, LR') == 1 and '2 processes' in output
    assert sorted(os.listdir(path / 'model')) == ['model_0001.json', 'model_0001.model', 'model_0002.json',
                                                  'model_0002.model', 'model_0003.json', 'model_0003.model',
                                                  'resume.pt']
    assert len((path / 'score.txt').read_text().splitlines()) == 3
    resume = torch.load(path / 'model' / 'resume.pt', weights_only=True)
    assert len(resume['rng']) == 2 and not torch.equal(resume['rng'][0], resume['rng'][1])


def test_score_txt_under_torchrun_describes_the_saved_checkpoint(straight_torchrun_run, tiny_corpus, tmp_path):
    """Each process's last steps update its own batch-norm statistics; the evaluation must use those of the
    checkpoint (rank 0's), so that --eval of the checkpoint reproduces what the run logged."""
    path, _ = straight_torchrun_run
    logged = [record['eval'] for record in read_metrics(path / 'metrics.jsonl')]
    for epoch in (1, 2, 3):
        results = cli.main(['--eval', '--initial_model', str(path / 'model' / f'model_{epoch:04d}.model'),
                                        '--eval_list', tiny_corpus['eval_list'], '--eval_path',
                                        tiny_corpus['eval_path'], '--save_path', str(tmp_path), '--n_cpu', '0'])
        result, = results.values()
        assert result.metrics.as_record() == pytest.approx(logged[epoch - 1][result.trials.name]['metrics'], abs=1e-9)


@pytest.mark.parametrize('mode,extra', [('clip', ()), ('blip', ('--contrastive_weight', '0'))])
def test_torchrun_trains_the_contrastive_modes_and_scores_the_average(torchrun_argv, tmp_path, mode, extra):
    """Two steps on each process; without a contrastive term nothing may wait for a gradient that never comes.
    --average 2: every process evaluates the averaged weights, process 0 writes them and their line."""
    torchrun(*torchrun_argv(tmp_path, '--mode', mode, *extra, '--max_epoch', '2', '--average', '2'))
    lines = (tmp_path / 'score.txt').read_text().splitlines()
    assert [line.split()[0] for line in lines] == ['1', '2', '2'] and all(' EER ' in line for line in lines)
    assert 'average of epochs 1-2' in lines[2] and (tmp_path / 'model' / 'model_average.model').exists()


def test_sigterm_to_a_torchrun_process_group_stops_every_process_after_a_step_and_the_rerun_is_exact(
        torchrun_argv, straight_torchrun_run, tmp_path):
    """As `timeout`, Slurm's scancel and `kill -- -PGID` stop a job: torchrun, both training processes and
    their loader workers all get SIGTERM, and torchrun passes it on once more."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               *torchrun_argv(tmp_path, '--max_epoch', '3')]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    deadline = time.time() + 300
    while not (tmp_path / 'model' / 'resume.pt').exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert process.poll() is None, 'the run ended before it could be stopped'
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert out.count('SIGTERM received: stopping after this step') == 2, err[-3000:]
    assert re.search(r'Stopped by SIGTERM (in epoch [23] after step \d|after epoch [12])', out)
    # torchrun itself reports the signal it got (its own traceback, exit status 1); neither process failed.
    assert 'KeyboardInterrupt' not in err and 'trainer.py' not in err and 'ChildFailedError' not in err
    assert not (tmp_path / 'model' / 'model_0003.model').exists()
    output = torchrun(*torchrun_argv(tmp_path, '--max_epoch', '3'))
    assert 'Resuming from' in output
    straight, _ = straight_torchrun_run
    assert_same_checkpoints(straight / 'model' / 'model_0003.model', tmp_path / 'model' / 'model_0003.model')
    assert (straight / 'score.txt').read_text() == (tmp_path / 'score.txt').read_text()


# ---------------------------------------------------------------- two machines: two torchrun agents on 127.0.0.1

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_two_nodes(argv_of_node):
    """Two torchrun agents as on two machines (`--nnodes 2`, one process each, c10d rendezvous on a free port of
    127.0.0.1); argv_of_node(n): what node n runs. Returns the two agents' processes."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
               '--rdzv_backend', 'c10d', '--rdzv_endpoint', f'127.0.0.1:{free_port()}', '--rdzv_id', 'two_nodes']
    return [subprocess.Popen(command + list(argv_of_node(node)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, start_new_session=True)
            for node in (0, 1)]


def finish(agents, timeout=600):
    """[(exit status, stdout, stderr)] of each agent; agents not done within `timeout` s are killed."""
    done = []
    for agent in agents:
        try:
            out, err = agent.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in agents:
                os.killpg(other.pid, signal.SIGKILL)
            raise
        done.append((agent.returncode, out, err))
    return done


def test_two_nodes_first_step_gradients_equal_one_process_accumulating_the_global_batch(tiny_shards, tmp_path):
    """Each node reads its own shards; DistributedDataParallel averages the gradients. Batch-norm statistics
    are each process's own (as in the original and wespeaker), so the reference is one process accumulating
    the gradients of the two processes' batches, each forward pass on its own batch."""
    from multinode_step_check import tiny_model
    for status, out, err in finish(start_two_nodes(lambda node: [os.path.join(ROOT, 'tests', 'multinode_step_check.py'),
                                                               str(tmp_path), tiny_shards])):
        assert status == 0, out[-2000:] + err[-2000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    assert not torch.equal(ranks[0]['waveforms'], ranks[1]['waveforms'])
    model = tiny_model(6)
    model.load_state_dict(ranks[0]['initial'])
    for rank in ranks:
        loss, _ = model(rank['waveforms'], rank['labels'], 1, None, False)
        (loss / 2).backward()
    # To float32 rounding of sums over thousands of terms, on the scale of the largest gradient (a bias
    # followed by batch norm has a gradient that is zero but for rounding, so no scale of its own).
    scale = max(float(parameter.grad.abs().max()) for parameter in model.parameters())
    for name, parameter in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank['gradients'][name], parameter.grad, rtol=1e-4, atol=1e-4 * scale,
                                       msg=name)


@pytest.fixture(scope='module')
def shard_run_argv(tiny_corpus, tiny_shards):
    def argv(save_path, *extra):
        return [os.path.join(ROOT, 'trainECAPAModel.py'), '--train_shards', tiny_shards, '--eval_list',
                tiny_corpus['eval_list'], '--eval_path', tiny_corpus['eval_path'], '--save_path', str(save_path),
                '--C', '16', '--num_frames', '40', '--batch_size', '3', '--n_cpu', '1', '--seed', '5', *extra]
    return argv


def test_on_two_nodes_only_global_rank_0_writes_and_needs_the_run_folder(shard_run_argv, tmp_path):
    """Each node given a folder of its own, as two machines without shared storage: one gets the whole run."""
    folders = [tmp_path / 'node0', tmp_path / 'node1']
    for status, out, err in finish(start_two_nodes(lambda node: shard_run_argv(folders[node], '--max_epoch', '1'))):
        assert status == 0, out[-2000:] + err[-2000:]
    written = [folder for folder in folders if folder.exists() and any(folder.iterdir())]
    assert len(written) == 1
    assert len((written[0] / 'score.txt').read_text().splitlines()) == 1
    assert 'model_0001.model' in os.listdir(written[0] / 'model')


def test_a_node_killed_stops_the_other_with_one_line_and_both_rerun_continue(shard_run_argv, tmp_path):
    agents = start_two_nodes(lambda node: shard_run_argv(tmp_path, '--max_epoch', '2'))
    deadline = time.time() + 300
    while not (tmp_path / 'model' / 'model_0001.model').exists() and time.time() < deadline:
        time.sleep(0.1)
    workers = subprocess.run(['pgrep', '-P', str(agents[1].pid)], capture_output=True, text=True).stdout.split()
    assert workers and all(agent.poll() is None for agent in agents), 'the run ended before a node could be killed'
    killed = time.time()
    os.kill(int(workers[0]), signal.SIGKILL)
    results = finish(agents, timeout=300)
    assert time.time() - killed < 120 and all(status != 0 for status, _, _ in results)
    survivor_err = results[0][2]
    assert re.search(r'^trainECAPAModel.py: error: .*another process of the run .*run the same command', survivor_err,
                     re.MULTILINE), survivor_err[-3000:]
    assert 'trainer.py' not in survivor_err and 'distributed_c10d.py' not in survivor_err
    rerun = finish(start_two_nodes(lambda node: shard_run_argv(tmp_path, '--max_epoch', '2')))
    assert all(status == 0 for status, _, _ in rerun), rerun[0][2][-2000:] + rerun[1][2][-2000:]
    assert any('Resuming from' in out for _, out, _ in rerun)
    assert [line.split()[0] for line in (tmp_path / 'score.txt').read_text().splitlines()] == ['1', '2']
