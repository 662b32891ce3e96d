import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

import trainECAPAModel
from conftest import ROOT
from loss import AAMsoftmax
from model import ECAPA_TDNN
from tools import atomic_write, load_model, read_trials, score


def tiny_args(corpus, save_path, cache_dir, *extra):
    args = ['--train_list', corpus['train_list'], '--train_path', corpus['train_path'],
            '--eval_list', corpus['eval_list'], '--eval_path', corpus['eval_path'],
            '--musan_path', corpus['musan_path'], '--rir_path', corpus['rir_path'],
            '--save_path', str(save_path), '--cache_dir', cache_dir,
            '--C', '32', '--num_frames', '40', '--batch_size', '8', '--n_cpu', '0', '--seed', '5']
    return args + list(extra)


def test_training_writes_checkpoints_scores_and_resume_state(tiny_corpus, tmp_path, cache_dir):
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '2'))
    lines = (tmp_path / 'score.txt').read_text().splitlines()
    assert len(lines) == 2
    pattern = (r'^(\d) epoch, LR ([\d.]+), LOSS [\d.]+, ACC [\d.]+%, EER ([\d.]+)%, minDCF\(0.05\) [\d.]+, '
               r'minDCF\(0.01\) [\d.]+, bestEER ([\d.]+)%$')
    matches = [re.match(pattern, line) for line in lines]
    assert all(matches), lines
    assert [m.group(1) for m in matches] == ['1', '2']
    assert float(matches[1].group(2)) == pytest.approx(0.001 * 0.97)
    assert float(matches[1].group(4)) == min(float(m.group(3)) for m in matches)
    state = torch.load(tmp_path / 'model' / 'model_0002.model', weights_only=True)
    assert {k.split('.')[0] for k in state} == {'speaker_encoder', 'speaker_loss'}
    assert state['speaker_loss.weight'].shape == (6, 192)
    assert (tmp_path / 'model' / 'resume.pt').exists()


@pytest.mark.parametrize('flags', [[], ['--gpu_augment', '--amp', 'bf16', '--grad_clip', '5'],
                                   ['--scheduler', 'warmup_exp', '--warmup_epochs', '1',
                                    '--margin_schedule', '1', '2']])
def test_resumed_run_equals_an_uninterrupted_one(tiny_corpus, tmp_path, cache_dir, flags, monkeypatch):
    straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
    args = ['--max_epoch', '2', *flags]
    trainECAPAModel.main(tiny_args(tiny_corpus, straight, cache_dir, *args))
    train_one_epoch = trainECAPAModel.train_one_epoch

    def stopped_in_epoch_2(step_fn, loader, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_one_epoch(step_fn, loader, epoch, *rest)

    monkeypatch.setattr(trainECAPAModel, 'train_one_epoch', stopped_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        trainECAPAModel.main(tiny_args(tiny_corpus, interrupted, cache_dir, *args))
    monkeypatch.setattr(trainECAPAModel, 'train_one_epoch', train_one_epoch)
    trainECAPAModel.main(tiny_args(tiny_corpus, interrupted, cache_dir, *args))
    a = torch.load(straight / 'model' / 'model_0002.model', weights_only=True)
    b = torch.load(interrupted / 'model' / 'model_0002.model', weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert (straight / 'score.txt').read_text() == (interrupted / 'score.txt').read_text()


def test_eval_scores_a_saved_model_and_writes_a_score_file(tiny_corpus, tmp_path, cache_dir, capsys):
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '1'))
    checkpoint = str(tmp_path / 'model' / 'model_0001.model')
    results = trainECAPAModel.main(['--eval', '--initial_model', checkpoint, '--eval_list', tiny_corpus['eval_list'],
                                    '--eval_path', tiny_corpus['eval_path'], '--save_path', str(tmp_path),
                                    '--n_cpu', '0'])
    metrics = results[tiny_corpus['eval_list']]['metrics']
    printed = capsys.readouterr().out
    assert f"EER {metrics['eer']:2.2f}%" in printed and 'minDCF(0.01)' in printed
    labels, enroll, test = read_trials(tiny_corpus['eval_list'])
    score_file = tmp_path / 'scores' / 'trials.txt'
    rows = [line.split() for line in score_file.read_text().splitlines()]
    assert len(rows) == len(labels)
    assert [(r[0], r[1], int(r[3])) for r in rows] == list(zip(enroll, test, labels))
    # The scores are those of the notebook helper on the same files.
    encoder = load_model(checkpoint)
    first = score(encoder, os.path.join(tiny_corpus['eval_path'], enroll[0]),
                  os.path.join(tiny_corpus['eval_path'], test[0]))
    assert float(rows[0][2]) == pytest.approx(first, abs=1e-5)
    # --score_file recomputes the metrics from that file alone.
    again = trainECAPAModel.main(['--score_file', str(score_file)])[str(score_file)]
    assert again == pytest.approx(metrics, abs=1e-3)


def test_eval_with_as_norm_reports_both(tiny_corpus, tmp_path, cache_dir):
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '1'))
    argv = ['--eval', '--initial_model', str(tmp_path / 'model' / 'model_0001.model'),
            '--eval_list', tiny_corpus['eval_list'], '--eval_path', tiny_corpus['eval_path'], '--n_cpu', '0']
    raw = trainECAPAModel.main(argv + ['--save_path', str(tmp_path / 'raw')])[tiny_corpus['eval_list']]
    normalised = trainECAPAModel.main(argv + [
        '--snorm', '--cohort_top_k', '3', '--train_list', tiny_corpus['train_list'],
        '--train_path', tiny_corpus['train_path'], '--save_path', str(tmp_path / 'snorm')])[tiny_corpus['eval_list']]
    assert 'snorm_metrics' not in raw and normalised['metrics'] == raw['metrics']
    assert 0 <= normalised['snorm_metrics']['eer'] <= 100
    scores = tmp_path / 'snorm' / 'scores'
    raw_scores, snorm_scores = ([float(line.split()[2]) for line in (scores / name).open()]
                                for name in ('trials.txt', 'trials.txt.asnorm'))
    np.testing.assert_allclose(raw_scores, raw['scores'], atol=1e-6)
    np.testing.assert_allclose(snorm_scores, normalised['snorm_scores'], atol=1e-6)
    assert not np.allclose(snorm_scores, raw_scores)


def test_original_readme_snippet_loads_our_checkpoint(tmp_path):
    """The embedding snippet of the original README, run as written, on a checkpoint in our format."""
    speaker_model = trainECAPAModel.SpeakerModel(ECAPA_TDNN(1024, 16000), AAMsoftmax(5994, 0.2, 30))
    torch.save(speaker_model.state_dict(), tmp_path / 'pretrained_model.model')
    soundfile.write(tmp_path / 'a.wav', np.random.default_rng(0).standard_normal(8000) * 0.1, 8000)
    snippet = '''
import model
import torch
import torch, sys, os, tqdm, numpy, soundfile, time, pickle
import torchaudio.transforms as T
import torch.nn.functional as F

use_cuda = torch.cuda.is_available() and True
device = torch.device("cuda" if use_cuda else "cpu")

speaker_encoder = model.ECAPA_TDNN(1024, 16000).to(device)

loaded_state = torch.load('/path/pretrained_model.model')
self_state = speaker_encoder.state_dict()
new_state_dict = {name.replace("speaker_encoder.", ""): param for name, param in loaded_state.items()}
new_state_dict.pop('speaker_loss.weight')

speaker_encoder.load_state_dict(new_state_dict)
sampling_rate = 16000
audio_path = 'your audio path'
audio, sr  = soundfile.read(os.path.join(audio_path))

audio = torch.FloatTensor(audio)
resampler = T.Resample(sr, sampling_rate, dtype=audio.dtype)
audio = resampler(audio)

with torch.no_grad():
    speaker_encoder.eval()
    embedding = speaker_encoder(audio.unsqueeze(0).to(device), False) # audio = [B, sampling_rate * second]
    embedding = F.normalize(embedding, p=2, dim=1) # embedding = [B, 192]
print(embedding.shape)
'''.replace('/path/pretrained_model.model', str(tmp_path / 'pretrained_model.model')).replace(
        'your audio path', str(tmp_path / 'a.wav'))
    namespace = {}
    exec(compile(snippet, 'README snippet', 'exec'), namespace)
    assert namespace['embedding'].shape == (1, 192)
    torch.testing.assert_close(namespace['embedding'].norm(dim=1), torch.ones(1))


def test_demo_defaults_yield_to_given_flags(tmp_path):
    args = trainECAPAModel.parse_args(['--demo', '--max_epoch', '2', '--C', '256', '--save_path', str(tmp_path)])
    assert (args.max_epoch, args.C, args.save_path) == (2, 256, str(tmp_path))
    assert args.batch_size == trainECAPAModel.DEMO_DEFAULTS['batch_size']
    assert args.train_list == os.path.join(str(tmp_path), 'corpus', 'voxceleb', 'train_list.txt')
    assert trainECAPAModel.parse_args(['--demo', '--model', 'tdnn']).C == trainECAPAModel.DEMO_WIDTHS['tdnn']
    assert trainECAPAModel.parse_args(['--demo', '--model', 'resnet34']).C == 16


@pytest.mark.parametrize('argv,message', [
    (['--eval', '--eval_list', 'x', '--eval_path', '.'], '--eval needs --initial_model'),
    (['--train_list', 'missing.txt', '--train_path', '.', '--eval_list', 'x', '--eval_path', '.'],
     '--train_list missing.txt: no such file'),
    (['--max_epoch', '0', '--demo'], '--max_epoch must be at least 1'),
    (['--demo', '--lr_decay', '1.5'], '--lr_decay in (0, 1]'),
    (['--demo', '--mode', 'siamese'], "invalid choice: 'siamese'"),
    (['--demo', '--grad_clip', '-1'], '--grad_clip cannot be negative'),
    (['--demo', '--amp', 'fp8'], "invalid choice: 'fp8'"),
    (['--train_list', 'x', '--train_path', '.', '--eval_list', 'x', '--eval_path', '.', '--gpu_augment'],
     '--gpu_augment needs --musan_path or --rir_path'),
])
def test_nonsense_flag_combinations_are_argparse_errors(argv, message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'trainECAPAModel.py')] + argv,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert message in result.stderr


def test_n_class_smaller_than_the_speakers_is_an_error(tiny_corpus, tmp_path, cache_dir):
    with pytest.raises(SystemExit, match='--n_class 3 is smaller than the 6 speakers'):
        trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '1', '--n_class', '3'))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'model_0001.model'
    path.write_bytes(b'old')

    def failing(f):
        f.write(b'partial')
        raise OSError('disk full')

    with pytest.raises(OSError):
        atomic_write(str(path), failing)
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['model_0001.model']


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    atomic_write(str(tmp_path / 'atomic'), lambda f: f.write(b'x'))
    (tmp_path / 'plain').write_bytes(b'x')
    assert (tmp_path / 'atomic').stat().st_mode == (tmp_path / 'plain').stat().st_mode


def test_eval_list_with_missing_files_fails_before_training(tiny_corpus, tmp_path, cache_dir):
    trials = tmp_path / 'trials.txt'
    lines = open(tiny_corpus['eval_list']).read().splitlines() + ['1 id20000/session0/00000.wav id99999/gone.wav']
    trials.write_text('\n'.join(lines) + '\n')
    argv = tiny_args(tiny_corpus, tmp_path / 'run', cache_dir, '--max_epoch', '1')
    argv[argv.index('--eval_list') + 1] = str(trials)
    line = rf'\n  {trials}:{len(lines)}: id99999/gone.wav'
    with pytest.raises(SystemExit, match=r'trials.txt: 1 files not under .*' + line):
        trainECAPAModel.main(argv)
    assert not (tmp_path / 'run' / 'model').exists()


def test_malformed_trial_line_is_named(tmp_path):
    path = tmp_path / 'veri_test2.txt'
    path.write_text('1 a.wav b.wav\nyes a.wav c.wav\n')
    with pytest.raises(ValueError, match=r'veri_test2.txt:2'):
        read_trials(str(path))


@pytest.mark.parametrize('model,width', [('tdnn', '32'), ('resnet18', '4')])
def test_other_encoders_train_and_evaluate(tiny_corpus, tmp_path, cache_dir, model, width):
    argv = tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '1', '--model', model)
    argv[argv.index('--C') + 1] = width
    trainECAPAModel.main(argv)
    assert re.match(r'^1 epoch, .* EER [\d.]+%', (tmp_path / 'score.txt').read_text())
    encoder = load_model(str(tmp_path / 'model' / 'model_0001.model'))
    assert encoder.sampling_rate == 16000 and type(encoder).__name__ == {'tdnn': 'TDNN'}.get(model, 'ResNet')


@pytest.mark.parametrize('mode,loss', [('clip', 'infonce'), ('blip', 'aam_infonce')])
def test_contrastive_modes_train_evaluate_and_resume_exactly(tiny_corpus, tmp_path, cache_dir, mode, loss):
    def run(save_path, epochs):
        argv = tiny_args(tiny_corpus, save_path, cache_dir, '--max_epoch', epochs, '--mode', mode, '--loss', loss)
        argv[argv.index('--batch_size') + 1] = '4'
        trainECAPAModel.main(argv)

    run(tmp_path / 'straight', '2')
    run(tmp_path / 'interrupted', '1')
    run(tmp_path / 'interrupted', '2')
    lines = (tmp_path / 'straight' / 'score.txt').read_text().splitlines()
    assert len(lines) == 2 and all(re.match(r'^\d epoch, .* EER [\d.]+%', line) for line in lines)
    assert (tmp_path / 'interrupted' / 'score.txt').read_text() == '\n'.join(lines) + '\n'
    a = torch.load(tmp_path / 'straight' / 'model' / 'model_0002.model', weights_only=True)
    b = torch.load(tmp_path / 'interrupted' / 'model' / 'model_0002.model', weights_only=True)
    # What the original README snippet needs: the encoder and `speaker_loss.weight`, nothing else.
    assert {k for k in a if not k.startswith('speaker_encoder.')} == {'speaker_loss.weight'}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    resume = torch.load(tmp_path / 'straight' / 'model' / 'resume.pt', weights_only=False)
    heads = {k.split('.')[1] for k in resume['model'] if k.startswith('speaker_loss.')}
    assert heads == ({'classifier', 'contrastive', 'matching'} if mode == 'blip' else {'classifier', 'contrastive'})


@pytest.mark.parametrize('argv,message', [
    (['--mode', 'clip', '--loss', 'aamsoftmax'], '--mode clip trains with --loss infonce or aam_infonce'),
    (['--mode', 'classifier', '--loss', 'infonce'], '--mode classifier trains with --loss aamsoftmax'),
    (['--classifier_weight', '0.5'], '--classifier_weight only apply to --mode clip or blip'),
    (['--mode', 'blip', '--matching_weight', '0'], '--mode blip with --matching_weight 0 is --mode clip'),
    (['--mode', 'clip', '--classifier_weight', '0', '--contrastive_weight', '0'], 'every loss weight is 0'),
])
def test_contrastive_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        trainECAPAModel.parse_args(['--demo'] + argv)
    assert message in capsys.readouterr().err


def test_batch_of_more_speakers_than_the_list_has_is_an_error(tiny_corpus, tmp_path, cache_dir):
    with pytest.raises(SystemExit, match='speakers; the list has 6'):
        trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '1', '--mode', 'clip'))
