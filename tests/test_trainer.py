"""trainer.py: the optimiser step, the epoch loop, a run's outputs, exact resume after an interruption or a
signal, and what a run does with unusable files, diverging losses and initial weights."""

import copy
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch

from speakerkit import cli, trainer
from conftest import assert_same_checkpoints
from speakerkit.dataLoader import Batch
from speakerkit.loss import AAMsoftmax
from speakerkit.lists import read_train_list, read_trials
from speakerkit.model import ECAPA_TDNN, build_encoder
from speakerkit.records import read_metrics
from speakerkit.samplers import SpeakerPairSampler
from speakerkit.schedules import warmup_exp
from speakerkit.tools import load_model
from speakerkit.trainer import NonFiniteTraining, SpeakerModel, TrainingStep

WARMUP_FLAGS = ('--scheduler', 'warmup_exp', '--warmup_epochs', '1', '--margin_schedule', '1', '2')


@pytest.fixture(scope='module')
def warmup_run(tiny_corpus, train_argv, tmp_path_factory):
    """Two epochs with the warm-up schedule, a margin schedule and, where the optional package is installed,
    TensorBoard records."""
    path = tmp_path_factory.mktemp('warmup_run')
    tensorboard = ['--tensorboard'] if importlib.util.find_spec('tensorboard') else []
    cli.main(train_argv(tiny_corpus, path, '--max_epoch', '2', *WARMUP_FLAGS, *tensorboard))
    return path


# ---------------------------------------------------------------- a run's outputs

def test_a_run_writes_checkpoints_score_lines_records_and_its_resume_state(reference_run):
    lines = (reference_run / 'score.txt').read_text().splitlines()
    pattern = (r'^(\d) epoch, LR ([\d.]+), LOSS [\d.]+, ACC [\d.]+%, EER ([\d.]+)%, minDCF\(0.05\) [\d.]+, '
               r'minDCF\(0.01\) [\d.]+, bestEER ([\d.]+)%$')
    matches = [re.match(pattern, line) for line in lines]
    assert all(matches) and len(matches) == 2, lines
    assert [m.group(1) for m in matches] == ['1', '2']
    assert float(matches[1].group(2)) == pytest.approx(0.001 * 0.97)
    assert float(matches[1].group(4)) == min(float(m.group(3)) for m in matches)
    state = torch.load(reference_run / 'model' / 'model_0002.model', weights_only=True)
    assert {k.split('.')[0] for k in state} == {'speaker_encoder', 'speaker_loss'}
    assert state['speaker_loss.weight'].shape == (6, 192)
    assert sorted(os.listdir(reference_run / 'model')) == ['model_0001.json', 'model_0001.model', 'model_0002.json',
                                                           'model_0002.model', 'resume.pt']
    records = read_metrics(reference_run / 'metrics.jsonl')
    for record, line in zip(records, lines):
        assert f"EER {record['eval']['trials.txt']['metrics']['eer']:2.2f}%" in line
        assert f"LOSS {record['loss']:f}" in line and f"ACC {record['accuracy']:2.2f}%" in line


@pytest.mark.slow
def test_a_runs_config_json_reruns_the_same_run(reference_run, tmp_path):
    cli.main(['--config', str(reference_run / 'config.json'), '--save_path', str(tmp_path)])
    assert_same_checkpoints(reference_run / 'model' / 'model_0002.model', tmp_path / 'model' / 'model_0002.model')
    assert (tmp_path / 'score.txt').read_text() == (reference_run / 'score.txt').read_text()


def test_config_and_metrics_record_the_schedules(warmup_run, root):
    config = json.loads((warmup_run / 'config.json').read_text())
    assert config['arguments']['scheduler'] == 'warmup_exp' and config['arguments']['max_epoch'] == 2
    assert 'margin_schedule' in config['given_flags'] and 'lr' not in config['given_flags']
    assert config['torch'] == torch.__version__ and config['device'] == 'cpu' and config['processes'] == 1
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True).stdout.strip()
    assert config['git_commit'].split('-')[0] == head
    records = read_metrics(warmup_run / 'metrics.jsonl')
    assert [r['epoch'] for r in records] == [1, 2]
    assert records[0]['margin'] == pytest.approx(0.2 * 0.75) and records[1]['margin'] == pytest.approx(0.2)
    assert records[0]['lr'] == pytest.approx(warmup_exp(0.001, 5e-5, 1, 2, 1, 4, 4))
    assert records[1]['lr'] == pytest.approx(5e-5)
    assert all(r['crops_per_s'] > 0 and r['epoch_seconds'] >= r['train_seconds'] > 0 for r in records)
    plots = {p.name for p in (warmup_run / 'plots').iterdir()}
    assert plots == {'training_curve.png', 'trials_det.png', 'trials_scores.png'}


def test_tensorboard_holds_the_metrics_records(warmup_run):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(warmup_run / 'tensorboard'))
    events.Reload()
    records = read_metrics(warmup_run / 'metrics.jsonl')
    assert [e.step for e in events.Scalars('train/loss')] == [1, 2]
    assert [e.value for e in events.Scalars('train/loss')] == pytest.approx([r['loss'] for r in records])
    assert [e.value for e in events.Scalars('trials.txt/metrics/eer')] == pytest.approx(
        [r['eval']['trials.txt']['metrics']['eer'] for r in records])


# ---------------------------------------------------------------- exact resume

@pytest.mark.slow
@pytest.mark.parametrize('flags', [(), WARMUP_FLAGS, ('--gpu_augment', '--amp', 'bf16', '--grad_clip', '5')])
def test_a_run_interrupted_in_epoch_2_resumes_to_the_uninterrupted_result(tiny_corpus, train_argv, tmp_path, flags,
                                                                          monkeypatch, request):
    argv = ['--max_epoch', '2', *flags]
    if flags == ():
        straight = request.getfixturevalue('reference_run')
    elif flags == WARMUP_FLAGS:
        straight = request.getfixturevalue('warmup_run')
    else:
        straight = tmp_path / 'straight'
        cli.main(train_argv(tiny_corpus, straight, *argv))
    train_one_epoch = trainer.train_one_epoch

    def stopped_in_epoch_2(step_fn, loader, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_one_epoch(step_fn, loader, epoch, *rest)

    monkeypatch.setattr(trainer, 'train_one_epoch', stopped_in_epoch_2)
    interrupted = tmp_path / 'interrupted'
    with pytest.raises(SystemExit) as stopped:  # KeyboardInterrupt, reported as "interrupted"
        cli.main(train_argv(tiny_corpus, interrupted, *argv))
    assert stopped.value.code == 130
    monkeypatch.setattr(trainer, 'train_one_epoch', train_one_epoch)
    cli.main(train_argv(tiny_corpus, interrupted, *argv))
    assert_same_checkpoints(straight / 'model' / 'model_0002.model', interrupted / 'model' / 'model_0002.model')
    assert (straight / 'score.txt').read_text() == (interrupted / 'score.txt').read_text()


def signal_at_step(monkeypatch, step, *numbers):
    """Patch TrainingStep so that its `step`-th call first sends `numbers` to this process; returns the list
    that counts the calls and the unpatched step, to patch back."""
    original_step = TrainingStep.__call__
    calls = []

    def signalling(self, batch, rng):
        calls.append(1)
        if len(calls) == step:
            for number in numbers:
                os.kill(os.getpid(), number)
        return original_step(self, batch, rng)

    monkeypatch.setattr(TrainingStep, '__call__', signalling)
    return calls, original_step


@pytest.mark.slow
@pytest.mark.parametrize('number', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_and_the_run_resumes_exactly(tiny_corpus, train_argv, reference_run, tmp_path,
                                                                   monkeypatch, capsys, number):
    calls, original_step = signal_at_step(monkeypatch, 6, number)  # epoch 2, step 2 (4 steps an epoch)
    assert cli.main(train_argv(tiny_corpus, tmp_path, '--max_epoch', '2')) is False
    printed = capsys.readouterr().out
    name = signal.Signals(number).name
    assert f'Stopped by {name} in epoch 2 after step 2' in printed and 'Run the same command again' in printed
    assert len(calls) == 6 and not (tmp_path / 'model' / 'model_0002.model').exists()
    state = torch.load(tmp_path / 'model' / 'resume.pt', weights_only=True)
    assert state['epoch'] == 1 and state['partial_epoch'][0]['step'] == 2
    monkeypatch.setattr(TrainingStep, '__call__', original_step)
    cli.main(train_argv(tiny_corpus, tmp_path, '--max_epoch', '2'))
    assert 'after epoch 1 and 2 steps of epoch 2' in capsys.readouterr().out
    assert_same_checkpoints(reference_run / 'model' / 'model_0002.model', tmp_path / 'model' / 'model_0002.model')
    assert (reference_run / 'score.txt').read_text() == (tmp_path / 'score.txt').read_text()


@pytest.mark.slow
def test_a_signal_during_an_evaluation_stops_after_it_and_the_run_resumes_exactly(tiny_corpus, train_argv,
                                                                                 reference_run, tmp_path,
                                                                                 monkeypatch, capsys):
    evaluate_encoder = trainer.evaluate_encoder

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate_encoder(*args, **kwargs)
    monkeypatch.setattr(trainer, 'evaluate_encoder', signalled)
    assert cli.main(train_argv(tiny_corpus, tmp_path, '--max_epoch', '2')) is False
    assert 'Stopped by SIGTERM after epoch 1' in capsys.readouterr().out
    assert torch.load(tmp_path / 'model' / 'resume.pt', weights_only=True)['epoch'] == 1
    monkeypatch.setattr(trainer, 'evaluate_encoder', evaluate_encoder)
    assert cli.main(train_argv(tiny_corpus, tmp_path, '--max_epoch', '2')) is True
    assert_same_checkpoints(reference_run / 'model' / 'model_0002.model', tmp_path / 'model' / 'model_0002.model')
    assert (reference_run / 'score.txt').read_text() == (tmp_path / 'score.txt').read_text()


@pytest.mark.slow
def test_a_signal_while_the_average_is_made_lets_the_finished_run_end_with_it(tiny_corpus, train_argv, tmp_path,
                                                                              monkeypatch):
    average_checkpoints = trainer.average_checkpoints

    def signalled(paths):
        os.kill(os.getpid(), signal.SIGTERM)  # with the default action this process would end here
        return average_checkpoints(paths)
    monkeypatch.setattr(trainer, 'average_checkpoints', signalled)
    argv = train_argv(tiny_corpus, tmp_path, '--max_epoch', '2', '--test_step', '2', '--average', '2')
    assert cli.main(argv) is True
    assert (tmp_path / 'model' / 'model_average.model').exists()
    assert open(tmp_path / 'score.txt').read().splitlines()[-1].startswith('2 epoch, average of epochs 1-2, EER ')


@pytest.mark.slow
def test_an_unreadable_checkpoint_to_average_is_one_line_and_the_trained_run_is_kept(tiny_corpus, train_argv,
                                                                                     tmp_path, cli_error):
    argv = train_argv(tiny_corpus, tmp_path, '--max_epoch', '2', '--test_step', '2', '--average', '2')
    cli.main(argv)
    (tmp_path / 'model' / 'model_average.model').unlink()
    (tmp_path / 'model' / 'model_0001.model').write_bytes(b'PK\x03\x04 cut short')
    status, message, _ = cli_error(argv)
    assert status == 1 and message.startswith(f'trainECAPAModel.py: error: {tmp_path / "model" / "model_0001.model"}: '
                                              f'not a readable PyTorch checkpoint') and message.count('\n') == 1
    assert torch.load(tmp_path / 'model' / 'resume.pt', weights_only=True)['epoch'] == 2
    first = tmp_path / 'model' / 'model_0001.model'
    first.unlink()
    status, message, _ = cli_error(argv)
    assert status == 1 and message == (f'trainECAPAModel.py: error: --average 2: {first} is missing (a run saves the '
                                       f'last epochs only when given --average from its start); average those there '
                                       f'are with --average_checkpoints\n')
    status, message, _ = cli_error(['--average_checkpoints', str(first), str(tmp_path / 'model' / 'model_0002.model'),
                                    '--out', str(tmp_path / 'a.model')])
    assert (status, message) == (2, f'trainECAPAModel.py: error: --average_checkpoints {first}: no such file\n')


@pytest.mark.slow
def test_hard_negative_batches_train_and_a_run_stopped_inside_an_epoch_resumes_exactly(tiny_corpus, train_argv,
                                                                                          tmp_path, monkeypatch):
    argv = ('--max_epoch', '2', '--sampler', 'chns', '--hard_fraction', '0.5')
    cli.main(train_argv(tiny_corpus, tmp_path / 'straight', *argv))
    _, original_step = signal_at_step(monkeypatch, 6, signal.SIGTERM)  # epoch 2, step 2
    assert cli.main(train_argv(tiny_corpus, tmp_path / 'resumed', *argv)) is False
    state = torch.load(tmp_path / 'resumed' / 'model' / 'resume.pt', weights_only=True)
    groups = state['partial_epoch'][0]['speaker_groups']
    assert sorted(s for group in groups for s in group) == list(range(6)) and len(groups[0]) == 4
    monkeypatch.setattr(TrainingStep, '__call__', original_step)
    cli.main(train_argv(tiny_corpus, tmp_path / 'resumed', *argv))
    assert_same_checkpoints(tmp_path / 'straight' / 'model' / 'model_0002.model',
                            tmp_path / 'resumed' / 'model' / 'model_0002.model')
    assert (tmp_path / 'straight' / 'score.txt').read_text() == (tmp_path / 'resumed' / 'score.txt').read_text()


@pytest.mark.slow
@pytest.mark.parametrize('killed_in', ['save_resume', 'save_weights'])
def test_a_kill_while_the_first_epoch_is_saved_loses_nothing(tiny_corpus, train_argv, reference_run, tmp_path,
                                                             monkeypatch, killed_in):
    """The process ends (as by SIGKILL or a full disk) while epoch 1's resume.pt or its checkpoint is written: the
    same command then continues to the uninterrupted run's checkpoints and score.txt."""
    original = getattr(trainer.TrainingRun, killed_in)

    def killed(self, epoch, *rest, **keywords):
        if epoch == 1:
            raise SystemExit(137)
        return original(self, epoch, *rest, **keywords)
    monkeypatch.setattr(trainer.TrainingRun, killed_in, killed)
    with pytest.raises(SystemExit):
        cli.main(train_argv(tiny_corpus, tmp_path, '--max_epoch', '2'))
    assert not (tmp_path / 'model' / 'model_0001.model').exists()
    monkeypatch.setattr(trainer.TrainingRun, killed_in, original)
    cli.main(train_argv(tiny_corpus, tmp_path, '--max_epoch', '2'))
    for epoch in (1, 2):
        assert_same_checkpoints(reference_run / 'model' / f'model_000{epoch}.model',
                                tmp_path / 'model' / f'model_000{epoch}.model')
    assert (reference_run / 'score.txt').read_text() == (tmp_path / 'score.txt').read_text()


@pytest.mark.parametrize('number', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_list_is_read_stops_at_once_saying_nothing_was_trained(tiny_corpus, train_argv, tmp_path,
                                                                                 monkeypatch, cli_error, number):
    def read_then_signal(path):
        os.kill(os.getpid(), number)
        raise AssertionError('the signal did not stop the start')
    monkeypatch.setattr(trainer, 'read_train_list', read_then_signal)
    before = signal.getsignal(number)
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--max_epoch', '2'))
    name = signal.Signals(number).name
    assert status == 128 + number
    assert message == (f'trainECAPAModel.py: error: {name} received before the first training step: nothing was '
                       f'trained; run the same command again to start\n')
    assert not (tmp_path / 'model').exists() and not (tmp_path / '.lock').exists()
    assert signal.getsignal(number) == before


def test_a_second_ctrl_c_interrupts_at_once_but_a_repeated_sigterm_is_ignored():
    with trainer.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # what torchrun passes on after the process group got it
        assert stop.received == 'SIGTERM' and stop.requested()
    with trainer.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == 'SIGINT'
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_ctrl_c_twice_stops_at_once_with_one_line_and_keeps_the_last_saved_state(tiny_corpus, train_argv, tmp_path,
                                                                                  monkeypatch, cli_error):
    calls, _ = signal_at_step(monkeypatch, 6, signal.SIGINT, signal.SIGINT)  # epoch 2, step 2
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--max_epoch', '2'))
    assert status == 130 and message.endswith('\ntrainECAPAModel.py: interrupted\n') and len(calls) == 6
    state = torch.load(tmp_path / 'model' / 'resume.pt', weights_only=True)
    assert state['epoch'] == 1 and state['partial_epoch'] is None and state['unevaluated'] is None
    assert not (tmp_path / '.lock').exists()


def test_a_folder_with_another_runs_results_but_no_resume_state_is_refused(tiny_corpus, train_argv, reference_run,
                                                                           tmp_path, cli_error):
    (tmp_path / 'model').mkdir()
    shutil.copy(reference_run / 'model' / 'model_0001.model', tmp_path / 'model')  # as the original code leaves it
    shutil.copy(reference_run / 'score.txt', tmp_path)
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--max_epoch', '1'))
    assert status == 1 and message == (f'trainECAPAModel.py: error: {tmp_path} holds the results of another run '
                                       f'({tmp_path / "score.txt"}, 2 files) but no model/resume.pt to continue it: '
                                       f'choose another --save_path or move them away\n')
    assert (tmp_path / 'score.txt').read_text() == (reference_run / 'score.txt').read_text()


@pytest.fixture(scope='module')
def process_command(tiny_corpus, train_argv, root):
    """process_command(save_path): a tiny three-epoch training run as a shell would start it, one loader worker.
    Stopped anywhere from epoch 1's evaluation to epoch 2's, it must stop before the end."""
    def command(save_path):
        return [sys.executable, os.path.join(root, 'trainECAPAModel.py'),
                *train_argv(tiny_corpus, save_path, '--max_epoch', '3', '--n_cpu', '1')]
    return command


@pytest.fixture(scope='module')
def straight_process_run(process_command, root, tmp_path_factory):
    path = tmp_path_factory.mktemp('straight_process_run')
    subprocess.run(process_command(path), check=True, capture_output=True, cwd=root)
    return path


@pytest.mark.slow
@pytest.mark.parametrize('how', ['SIGKILL to the process', 'SIGTERM to the process group'])
def test_a_run_killed_or_stopped_by_a_scheduler_resumes_to_the_same_final_checkpoint(process_command,
                                                                                     straight_process_run, tmp_path,
                                                                                     root, how, cli_error):
    process = subprocess.Popen(process_command(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=root, start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / 'model' / 'resume.pt').exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2 or its evaluation, the loader worker running
    assert process.poll() is None, 'the run ended before it could be stopped'
    if how == 'SIGKILL to the process':
        status, message, _ = cli_error(process_command(tmp_path)[2:])  # a second run into the same folder
        assert status == 1 and f'is in use by process {process.pid} on' in message
        process.send_signal(signal.SIGKILL)
    else:
        os.killpg(process.pid, signal.SIGTERM)  # the loader worker gets it too, as under timeout or scancel
    out, err = process.communicate(timeout=300)
    assert not (tmp_path / 'model' / 'model_0003.model').exists()
    if how == 'SIGTERM to the process group':
        assert process.returncode == 0, err[-3000:]
        assert re.search(r'Stopped by SIGTERM (in epoch 2 after step \d|after epoch [12])', out)
        assert 'Traceback' not in err
    (tmp_path / 'model' / '.resume.pt.x1y2').write_bytes(b'partial')  # as a write cut short leaves it
    finished = subprocess.run(process_command(tmp_path), capture_output=True, text=True, cwd=root)
    assert finished.returncode == 0, finished.stderr
    assert 'Resuming from' in finished.stdout and 'removed 1 temporary files' in finished.stdout
    assert ('taking over the lock' in finished.stdout) == (how == 'SIGKILL to the process')
    assert not (tmp_path / '.lock').exists()
    assert not (tmp_path / 'model' / '.resume.pt.x1y2').exists()
    assert_same_checkpoints(straight_process_run / 'model' / 'model_0003.model',
                            tmp_path / 'model' / 'model_0003.model')
    assert (straight_process_run / 'score.txt').read_text() == (tmp_path / 'score.txt').read_text()


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_and_leaves_no_partial_file(process_command, tmp_path, root):
    """RLIMIT_FSIZE makes the system refuse writes past 1 MB (EFBIG) as a full disk refuses them (ENOSPC). No
    loader worker: the limit would also stop one writing its batches to shared memory."""
    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))

    result = subprocess.run(process_command(tmp_path) + ['--n_cpu', '0'], capture_output=True, text=True, cwd=root,
                            preexec_fn=small_files_only, timeout=300)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    # The noise bank, when this is the session's first run to build it, or else epoch 1's resume.pt (written
    # before its checkpoint, so that no checkpoint is left without it).
    assert re.fullmatch(r'trainECAPAModel\.py: error: \S+(bank-\w+\.f32|model/resume\.pt): cannot be written '
                        r'\(File too large\)', result.stderr.splitlines()[-1])
    assert not (tmp_path / 'model').exists() or os.listdir(tmp_path / 'model') == []
    assert not (tmp_path / '.lock').exists()


@pytest.mark.slow
@pytest.mark.parametrize('mode,loss,extra', [('clip', 'infonce', ()), ('blip', 'aam_infonce', ()),
                                              ('blip', 'infonce', ('--sampler', 'chns', '--speed_perturb', 'on'))])
def test_contrastive_modes_train_evaluate_and_resume_exactly(tiny_corpus, train_argv, tmp_path, mode, loss, extra):
    def run(save_path, epochs):
        argv = train_argv(tiny_corpus, save_path, '--max_epoch', epochs, '--mode', mode, '--loss', loss, *extra)
        argv[argv.index('--batch_size') + 1] = '4'
        cli.main(argv)

    run(tmp_path / 'straight', '2')
    run(tmp_path / 'interrupted', '1')
    run(tmp_path / 'interrupted', '2')
    lines = (tmp_path / 'straight' / 'score.txt').read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith(f'{e} epoch, ') and ' EER ' in line
                                   for e, line in zip((1, 2), lines))
    assert (tmp_path / 'interrupted' / 'score.txt').read_text() == '\n'.join(lines) + '\n'
    straight = tmp_path / 'straight' / 'model' / 'model_0002.model'
    assert_same_checkpoints(straight, tmp_path / 'interrupted' / 'model' / 'model_0002.model')
    # What the original README snippet needs: the encoder and `speaker_loss.weight`, nothing else.
    state = torch.load(straight, weights_only=True)
    assert {k for k in state if not k.startswith('speaker_encoder.')} == {'speaker_loss.weight'}
    resume = torch.load(tmp_path / 'straight' / 'model' / 'resume.pt', weights_only=True)
    heads = {k.split('.')[1] for k in resume['model'] if k.startswith('speaker_loss.')}
    assert heads == ({'classifier', 'contrastive', 'matching'} if mode == 'blip' else {'classifier', 'contrastive'})


@pytest.mark.parametrize('model,width,kind', [('tdnn', '32', 'TDNN'), ('resnet18', '4', 'ResNet')])
def test_other_encoders_train_and_evaluate(tiny_corpus, train_argv, tmp_path, model, width, kind):
    argv = train_argv(tiny_corpus, tmp_path, '--max_epoch', '1', '--model', model)
    argv[argv.index('--C') + 1] = width
    cli.main(argv)
    assert (tmp_path / 'score.txt').read_text().startswith('1 epoch, ')
    config = json.loads((tmp_path / 'model' / 'model_0001.json').read_text())
    assert config == {'model': model, 'C': int(width), 'embedding_dim': {'tdnn': 512}.get(model, 256),
                      'sampling_rate': 16000}
    encoder = load_model(str(tmp_path / 'model' / 'model_0001.model'))
    assert type(encoder).__name__ == kind and encoder.sampling_rate == 16000


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['classifier', 'clip', 'blip'])
@pytest.mark.parametrize('model,kind', [('campplus', 'CAMPPlus'), ('redimnet-b0', 'ReDimNet')])
def test_the_demo_trains_and_evaluates_campplus_and_redimnet_in_every_mode(tiny_corpus, tmp_path, model, kind,
                                                                           mode):
    """`--demo` with each newer encoder and mode, on the tests' small corpus in place of the demo's own (the demo
    generates none where a complete one is): its defaults, one epoch, the evaluation of its trial list."""
    os.symlink(os.path.dirname(os.path.dirname(tiny_corpus['train_list'])), tmp_path / 'corpus')
    cli.main(['--demo', '--model', model, '--mode', mode, '--max_epoch', '1', '--batch_size', '4',
              '--save_path', str(tmp_path)])  # pairs of views of distinct speakers: the corpus has 6
    line = (tmp_path / 'score.txt').read_text()
    assert line.startswith('1 epoch, ') and math.isfinite(float(line.split('LOSS ')[1].split(',')[0]))
    assert 0 <= float(line.split('EER ')[1].split('%')[0]) <= 100
    encoder = load_model(str(tmp_path / 'model' / 'model_0001.model'))
    assert type(encoder).__name__ == kind and encoder.embedding_dim == {'campplus': 512}.get(model, 192)
    state = encoder.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith('running_mean'))  # training steps ran


# ---------------------------------------------------------------- initial weights

def test_an_original_format_checkpoint_starts_training(tiny_corpus, train_argv, tmp_path, capsys):
    """A checkpoint of the original code (5994-class head, no JSON beside it) seeds a run with 6 speakers."""
    original = SpeakerModel(ECAPA_TDNN(32), AAMsoftmax(5994, 0.2, 30))
    torch.save(original.state_dict(), tmp_path / 'pretrain.model')
    cli.main(train_argv(tiny_corpus, tmp_path / 'run', '--max_epoch', '1', '--initial_model',
                                    str(tmp_path / 'pretrain.model')))
    assert 'encoder; classifier initialised afresh' in capsys.readouterr().out
    assert (tmp_path / 'run' / 'model' / 'model_0001.model').exists()


def test_a_mismatched_initial_model_lists_its_keys_unless_partial_load_is_allowed(tiny_corpus, train_argv,
                                                                                    reference_run, tmp_path,
                                                                                    cli_error, capsys):
    state = torch.load(reference_run / 'model' / 'model_0001.model', weights_only=True)
    state['speaker_encoder.extra.weight'] = torch.zeros(3)
    dropped = sorted(k for k in state if k.startswith('speaker_encoder.layer4'))
    for key in dropped:
        del state[key]
    torch.save(state, tmp_path / 'mismatched.model')
    argv = train_argv(tiny_corpus, tmp_path / 'b', '--max_epoch', '1', '--initial_model',
                      str(tmp_path / 'mismatched.model'))
    status, message, _ = cli_error(argv)
    assert status == 1 and message.count('\n') == 1
    assert f'{len(dropped)} missing: ' in message and dropped[0][len('speaker_encoder.'):] in message
    assert '1 unexpected: extra.weight' in message and '--allow_partial_load' in message
    cli.main(argv + ['--allow_partial_load'])
    assert f'{len(state) - 2} of {len(state) - 2 + len(dropped)} encoder weights and classifier' in \
        capsys.readouterr().out


@pytest.mark.slow
def test_large_margin_fine_tunes_a_trained_model(tiny_corpus, train_argv, reference_run, tmp_path):
    checkpoint = str(reference_run / 'model' / 'model_0001.model')
    cli.main(train_argv(tiny_corpus, tmp_path, '--large_margin', '--initial_model', checkpoint,
                                    '--max_epoch', '2', '--num_frames', '60'))
    records = read_metrics(tmp_path / 'metrics.jsonl')
    assert [r['margin'] for r in records] == [0.5, 0.5]
    steps = 36 // 8  # 6 speakers x 6 utterances in batches of 8
    assert records[0]['lr'] == pytest.approx(warmup_exp(1e-4, 2.5e-5, 1, 2, 1, steps, steps))
    assert records[1]['lr'] == pytest.approx(2.5e-5)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['arguments']['large_margin'] and config['arguments']['initial_model'] == checkpoint


@pytest.mark.slow
def test_average_saves_the_last_epochs_and_scores_the_mean_of_their_weights(tiny_corpus, train_argv, tmp_path,
                                                                              capsys):
    run = tmp_path / 'run'
    cli.main(train_argv(tiny_corpus, run, '--max_epoch', '4', '--test_step', '4', '--average', '2'))
    saved = sorted(p.name for p in (run / 'model').glob('model_*.model'))
    assert saved == ['model_0003.model', 'model_0004.model', 'model_average.model']
    last = open(run / 'score.txt').read().splitlines()[-1]
    assert last.startswith('4 epoch, average of epochs 3-4, EER ')
    averaged = torch.load(run / 'model' / 'model_average.model')
    epochs = [torch.load(run / 'model' / f'model_000{e}.model') for e in (3, 4)]
    for key, value in averaged.items():
        if value.is_floating_point():
            assert torch.allclose(value, (epochs[0][key] + epochs[1][key]) / 2, atol=1e-6), key
    encoder = load_model(str(run / 'model' / 'model_average.model'))
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, averaged['speaker_encoder.' + name]), name
    cli.main(['--average_checkpoints', str(run / 'model' / 'model_0003.model'),
                          str(run / 'model' / 'model_0004.model'), '--out', str(tmp_path / 'tool.model')])
    assert 'the mean of the weights of 2 checkpoints' in capsys.readouterr().out
    tool = torch.load(tmp_path / 'tool.model')
    assert all(torch.equal(tool[k], averaged[k]) for k in averaged) and (tmp_path / 'tool.json').exists()
    cli.main(train_argv(tiny_corpus, run, '--max_epoch', '4', '--test_step', '4', '--average', '2'))
    assert open(run / 'score.txt').read().count('average of epochs') == 1  # a rerun of a finished run adds nothing
    cli.main(train_argv(tiny_corpus, run, '--max_epoch', '5', '--test_step', '4', '--average', '2'))
    assert 'continuing with --max_epoch 5 (the run had 4)' in capsys.readouterr().out
    assert open(run / 'score.txt').read().splitlines()[-1].startswith('5 epoch, average of epochs 4-5, EER ')
    averaged = torch.load(run / 'model' / 'model_average.model')
    epochs = [torch.load(run / 'model' / f'model_000{e}.model') for e in (4, 5)]
    assert torch.allclose(averaged['speaker_encoder.fc6.weight'],
                          (epochs[0]['speaker_encoder.fc6.weight'] + epochs[1]['speaker_encoder.fc6.weight']) / 2)
    assert json.loads((run / 'model' / 'model_average.json').read_text())['averaged_epochs'] == [4, 5]


def test_a_run_continues_only_from_the_weights_it_started_from(tiny_corpus, train_argv, reference_run, tmp_path,
                                                                cli_error, capsys):
    first = str(reference_run / 'model' / 'model_0001.model')
    argv = train_argv(tiny_corpus, tmp_path, '--max_epoch', '1', '--initial_model', first)
    cli.main(argv)
    assert cli.main(argv) is True and 'Resuming from' in capsys.readouterr().out  # the same start
    other = str(reference_run / 'model' / 'model_0002.model')
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--max_epoch', '1', '--initial_model', other))
    assert status == 2 and f'resume.pt continues a run started from {first}, not from --initial_model {other}' in \
        message
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--max_epoch', '1'))
    assert status == 2 and 'not from --initial_model (none)' in message
    # fine-tuning the same start into the folder of its first run would continue that run with other flags
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--initial_model', first, '--large_margin'))
    assert status == 2 and '--large_margin True (the run has False)' in message and \
        "--m 0.5 (the run has 0.2)" in message and 'another --save_path to start a new run' in message


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['clip', 'blip'])
def test_in_pair_modes_the_schedules_end_where_they_say_though_epochs_differ_in_steps(tiny_corpus, train_argv,
                                                                                     tmp_path, mode):
    """Speakers of 6, 6, 5, 3, 2 and 2 utterances in batches of 4 distinct speakers: the pair sampler plans 3,
    3 and 2 steps for epochs 1-3 (seed 5). The warm-up/exponential schedule must still reach --final_lr on the
    last step, and the margin schedule reach --m at the beginning of epoch 3."""
    lines = open(tiny_corpus['train_list']).read().splitlines()
    wanted = dict(zip(sorted({line.split()[0] for line in lines}), (6, 6, 5, 3, 2, 2)))
    kept, counts = [], {}
    for line in lines:
        speaker = line.split()[0]
        counts[speaker] = counts.get(speaker, 0) + 1
        if counts[speaker] <= wanted[speaker]:
            kept.append(line + '\n')
    uneven = tmp_path / 'uneven.txt'
    uneven.write_text(''.join(kept))
    sampler = SpeakerPairSampler(read_train_list(str(uneven)).labels, 4, seed=5)
    steps = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        steps.append(len(sampler))
    assert steps == [3, 3, 2]
    argv = train_argv(tiny_corpus, tmp_path / 'run', '--mode', mode, '--batch_size', '4', '--max_epoch', '3',
                      '--scheduler', 'warmup_exp', '--warmup_epochs', '1', '--final_lr', '1e-4',
                      '--margin_schedule', '1', '3')
    argv[argv.index('--train_list') + 1] = str(uneven)
    cli.main(argv)
    records = read_metrics(tmp_path / 'run' / 'metrics.jsonl')
    assert records[-1]['lr'] == pytest.approx(1e-4, rel=1e-12)
    # at each epoch's last step, (epoch - 1) + (steps - 1) / steps epochs are done of the margin's two
    assert [r['margin'] for r in records] == [pytest.approx(0.2 * (2 / 3) / 2), pytest.approx(0.2 * (5 / 3) / 2),
                                              0.2]
    # the learned logit scale, as the state it was read from holds it
    log_scale = torch.load(tmp_path / 'run' / 'model' / 'resume.pt', weights_only=True)['model'][
        'speaker_loss.contrastive.log_scale']
    assert records[-1]['contrastive_scale'] == pytest.approx(float(log_scale.exp()), rel=1e-6)
    assert records[0]['contrastive_scale'] != records[-1]['contrastive_scale']


@pytest.mark.parametrize('edit, named', [
    (('--lr', '0.01'), '--lr 0.01 (the run has 0.001)'),
    (('--seed', '6'), '--seed 6 (the run has 5)'),
    (('--num_frames', '50'), '--num_frames 50 (the run has 40)'),
    (('--m', '0.3', '--s', '20'), '--m 0.3 (the run has 0.2), --s 20.0 (the run has 30)'),
    (('--lr_decay_every', '2'), '--lr_decay_every 2 (the run has 1)'),
    (('--test_step', '2'), '--lr_decay_every 2 (the run has 1)'),  # unless given, --test_step sets it too
])
def test_a_run_continues_only_with_the_flags_that_decide_what_is_trained(tiny_corpus, train_argv, reference_run,
                                                                       tmp_path, cli_error, edit, named):
    shutil.copytree(reference_run, tmp_path / 'run')
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path / 'run', '--max_epoch', '3', *edit))
    assert status == 2 and f'continues a run started with other flags: {named}; give the run\'s flags' in message
    assert json.loads((tmp_path / 'run' / 'config.json').read_text()) == \
        json.loads((reference_run / 'config.json').read_text())  # the record of the run is kept


def test_a_run_recorded_before_lr_decay_every_decays_every_test_step_epochs(tiny_corpus, train_argv, reference_run,
                                                                            tmp_path, cli_error):
    shutil.copytree(reference_run, tmp_path / 'run')
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    del config['arguments']['lr_decay_every']
    (tmp_path / 'run' / 'config.json').write_text(json.dumps(config))
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path / 'run', '--max_epoch', '2', '--test_step', '2'))
    assert status == 2 and '--lr_decay_every 2 (the run has 1)' in message
    assert cli.main(train_argv(tiny_corpus, tmp_path / 'run', '--max_epoch', '2', '--test_step', '2',
                               '--lr_decay_every', '1')) is True


def test_a_run_continues_with_other_evaluation_and_system_flags_and_names_them(tiny_corpus, train_argv,
                                                                               reference_run, tmp_path, capsys):
    shutil.copytree(reference_run, tmp_path / 'run')
    assert cli.main(train_argv(tiny_corpus, tmp_path / 'run', '--max_epoch', '2', '--eval_precision',
                                           'bf16', '--max_bad_steps', '7', '--test_step', '2', '--lr_decay_every',
                                           '1')) is True
    printed = capsys.readouterr().out
    assert 'continuing with --test_step 2 (the run had 1)' in printed
    assert 'continuing with --eval_precision bf16 (the run had float32)' in printed
    assert 'continuing with --max_bad_steps 7 (the run had 50)' in printed
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['arguments']['eval_precision'] == 'bf16'


def test_training_lists_too_small_to_train_are_errors(tiny_corpus, train_argv, tmp_path, cli_error):
    one_speaker = tmp_path / 'one_speaker.txt'
    lines = open(tiny_corpus['train_list']).read().splitlines()
    one_speaker.write_text('\n'.join(line for line in lines if line.split()[0] == lines[0].split()[0]) + '\n')
    argv = train_argv(tiny_corpus, tmp_path / 'a', '--max_epoch', '1')
    argv[argv.index('--train_list') + 1] = str(one_speaker)
    status, message, _ = cli_error(argv)
    assert status == 2 and f'every utterance is of speaker {lines[0].split()[0]}' in message
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path / 'b', '--max_epoch', '1', '--batch_size', '37'))
    assert status == 2 and '--batch_size 37 on 1 processes is more than the 36 utterances' in message
    assert not (tmp_path / 'a' / 'model').exists() and not (tmp_path / 'b' / 'model').exists()


def test_an_epoch_in_which_every_step_was_skipped_is_an_error(tiny_corpus, train_argv, tmp_path, cli_error,
                                                              monkeypatch):
    def every_step_bad(self, batch, rng):
        return torch.tensor(float('nan')), torch.tensor(float('nan')), False

    monkeypatch.setattr(TrainingStep, '__call__', every_step_bad)
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--max_epoch', '1'))
    assert status == 1 and message.count('\n') == 1
    assert 'every step of epoch 1 had a non-finite loss or gradients, so nothing was trained' in message
    assert not (tmp_path / 'score.txt').exists()


@pytest.mark.slow
def test_a_failing_evaluation_loses_no_trained_epoch(tiny_corpus, train_argv, reference_run, tmp_path, cli_error,
                                                    capsys):
    eval_path = tmp_path / 'eval'
    shutil.copytree(tiny_corpus['eval_path'], eval_path)
    trials = read_trials(tiny_corpus['eval_list'])
    bad = eval_path / trials.test[0]
    shutil.copy(bad, tmp_path / 'good.wav')
    soundfile.write(bad, np.full(16000, np.nan, np.float32), 16000, subtype='FLOAT')  # its header reads fine
    argv = train_argv({**tiny_corpus, 'eval_path': str(eval_path)}, tmp_path / 'run', '--max_epoch', '2')
    for _ in range(2):  # the second run evaluates the saved epoch again; it trains nothing
        status, printed, _ = cli_error(argv)
        message = printed.splitlines()[-1]  # after the evaluation's progress bar
        assert status == 1 and message.startswith('trainECAPAModel.py: error: ') and 'Traceback' not in printed
        assert (f'epoch 1 is trained and saved in {tmp_path / "run" / "model" / "resume.pt"}, but its evaluation '
                f'failed: {eval_path}: 1 files cannot be embedded, e.g. {trials.test[0]} (NaN or infinite samples)'
                in message)
        state = torch.load(tmp_path / 'run' / 'model' / 'resume.pt', weights_only=True)
        assert state['epoch'] == 1 and state['unevaluated']['epoch'] == 1
        assert_same_checkpoints(reference_run / 'model' / 'model_0001.model',
                                tmp_path / 'run' / 'model' / 'model_0001.model')
        assert not (tmp_path / 'run' / 'score.txt').exists() or not (tmp_path / 'run' / 'score.txt').read_text()
    shutil.copy(tmp_path / 'good.wav', bad)
    cli.main(argv)
    assert 'Evaluating epoch 1, trained before the last run stopped' in capsys.readouterr().out
    run = tmp_path / 'run'
    assert_same_checkpoints(reference_run / 'model' / 'model_0002.model', run / 'model' / 'model_0002.model')
    assert (reference_run / 'score.txt').read_text() == (run / 'score.txt').read_text()
    assert [r['epoch'] for r in read_metrics(tmp_path / 'run' / 'metrics.jsonl')] == [1, 2]


def test_trial_files_that_do_not_decode_stop_training_before_its_first_step(tiny_corpus, train_argv, tmp_path,
                                                                            cli_error):
    eval_path = tmp_path / 'eval'
    shutil.copytree(tiny_corpus['eval_path'], eval_path)
    trials = read_trials(tiny_corpus['eval_list'])
    (eval_path / trials.enroll[0]).write_bytes(b'RIFF\x00\x00not audio at all')
    status, message, _ = cli_error(train_argv({**tiny_corpus, 'eval_path': str(eval_path)}, tmp_path / 'run'))
    assert status == 1 and message.count('\n') == 1
    assert f'{tiny_corpus["eval_list"]}: 1 files cannot be used, e.g. line 1: {trials.enroll[0]} (unreadable' in message
    assert not (tmp_path / 'run' / 'model').exists()


# ---------------------------------------------------------------- unusable files and diverging runs

def test_training_over_broken_files_skips_counts_and_lists_them(broken_corpus, train_argv, tmp_path):
    corpus, _ = broken_corpus
    cli.main(train_argv(corpus, tmp_path / 'run', '--max_epoch', '1', '--batch_size', '4'))
    record = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[0])
    listed = [line.split('\t') for line in (tmp_path / 'run' / 'skipped_files.txt').read_text().splitlines()]
    assert record['skipped_files'] == len(listed) > 0 and record['bad_steps'] == 0
    assert {os.path.basename(path) for _, path, _ in listed} <= {'garbage.wav', 'empty.wav', 'short.wav', 'nan.wav',
                                                                 'silent.wav'}
    assert all(epoch == '1' for epoch, _, _ in listed)
    assert np.isfinite(record['loss'])


def test_a_list_of_nothing_usable_stops_with_one_line_from_the_loader_worker(broken_corpus, broken_audio,
                                                                             train_argv, tmp_path, cli_error):
    corpus, _ = broken_corpus
    train_list = tmp_path / 'unusable.txt'
    train_list.write_text(''.join(f'spk{i % 2} bad/{name}\n' for i, name in enumerate(broken_audio)))
    argv = train_argv({**corpus, 'train_list': str(train_list)}, tmp_path / 'run', '--max_epoch', '1',
                      '--batch_size', '2', '--n_cpu', '1')
    status, message, _ = cli_error(argv)
    assert status == 1 and message.count('\n') == 1 and 'DataLoader worker' not in message
    assert re.match(r'trainECAPAModel\.py: error: \S+/bad/\w+\.wav: no usable audio among the substitutes tried; '
                    r'first problems: ', message)


def test_a_diverging_run_stops_after_max_bad_steps_with_one_line(tiny_corpus, train_argv, tmp_path, cli_error):
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--max_epoch', '3', '--lr', '1e30',
                                           '--max_bad_steps', '2', '--batch_size', '4'))
    assert status == 1 and message.count('\n') == 1
    assert 'stopped in epoch' in message and 'steps in a row had a non-finite loss' in message
    assert '--max_bad_steps 2' in message


# ---------------------------------------------------------------- the step

def small_model(seed=0):
    torch.manual_seed(seed)
    return SpeakerModel(build_encoder('tdnn', 32, 16000, 16), AAMsoftmax(4, 0.2, 30, 16))


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return Batch((0.1 * torch.randn(8, 4000, generator=generator),), torch.arange(8) % 4, [])


def run_step(model, optimizer_class=torch.optim.Adam, lr=1e-3, **options):
    optimizer = optimizer_class(model.parameters(), lr=lr)
    step = TrainingStep(model, optimizer, 'cpu', **options)
    torch.manual_seed(2)  # the same SpecAugment masks for every variant
    loss, accuracy, taken = step(batch(), np.random.default_rng(0))
    assert taken
    return step, loss


def parameter_change(before, after):
    with torch.no_grad():
        return float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after.parameters(), before.parameters()))))


def test_bf16_forward_is_close_to_float32_but_not_equal():
    _, full = run_step(small_model(), amp='off')
    _, mixed = run_step(small_model(), amp='bf16')
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert mixed.item() != full.item()
    assert mixed.item() == pytest.approx(full.item(), rel=0.05)


def test_fp16_uses_dynamic_loss_scaling_and_updates_the_weights():
    model = small_model()
    before = copy.deepcopy(model)
    step = TrainingStep(model, trainer.adam(model.parameters(), 1e-3), 'cpu', amp='fp16')  # the trainer's Adam
    initial_scale = step.scaler.get_scale()
    losses = [step(batch(), None)[0] for _ in range(20)]
    # Steps whose fp16 gradients overflow are skipped and halve the scale; the others update the weights.
    assert step.scaler.is_enabled() and 1 < step.scaler.get_scale() < initial_scale
    assert all(torch.isfinite(loss) for loss in losses) and parameter_change(before, model) > 0
    assert losses[-1] < losses[0]


def test_gradient_clipping_bounds_the_update_norm():
    clip = 1e-3
    unclipped = small_model()
    run_step(unclipped, torch.optim.SGD, lr=1.0)
    assert parameter_change(small_model(), unclipped) > 10 * clip
    clipped = small_model()
    run_step(clipped, torch.optim.SGD, lr=1.0, grad_clip=clip)
    assert parameter_change(small_model(), clipped) == pytest.approx(clip, rel=1e-3)


def test_a_step_with_non_finite_gradients_changes_nothing_and_too_many_in_a_row_stop_training():
    model = small_model()
    optimizer = trainer.adam(model.parameters(), 1e-3)
    step = TrainingStep(model, optimizer, 'cpu', max_bad_steps=3)
    step(batch(), None)
    weights, moments = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    (waveforms,), labels, _ = batch()
    poisoned = waveforms.clone()
    poisoned[3, 100] = float('nan')
    for _ in range(2):
        loss, _, taken = step(Batch((poisoned,), labels, []), None)
        assert not taken and not torch.isfinite(loss)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, equal_nan=False, msg=key)
    assert optimizer.state_dict()['state'][0]['step'] == moments['state'][0]['step']
    assert step(batch(), None)[2] and step.bad_in_a_row == 0  # a good step resets the count
    for _ in range(2):
        step(Batch((poisoned,), labels, []), None)
    with pytest.raises(NonFiniteTraining, match='3 steps in a row'):
        step(Batch((poisoned,), labels, []), None)


def test_silent_input_gives_a_finite_loss_when_silence_is_not_skipped():
    model = SpeakerModel(build_encoder('ecapa-tdnn', 32, 16000, None), AAMsoftmax(4, 0.2, 30, 192))
    loss, accuracy = model(torch.zeros(4, 8000), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
