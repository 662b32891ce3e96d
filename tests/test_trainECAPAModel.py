"""trainECAPAModel.py: flags, their defaults and checks, user errors as one line, and the one-shot commands
(--eval, --score_file, --extract, --export, --score_pair). Training itself is tested in test_trainer.py."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from conftest import assert_same_checkpoints
from speakerkit import cli, commands, evaluation, metrics, tools
from speakerkit.checkpoints import save_checkpoint
from speakerkit.lists import cohort_entries, read_train_list, read_trials
from speakerkit.loss import AAMsoftmax
from speakerkit.model import ECAPA_TDNN, EncoderConfig, build_encoder
from speakerkit.schedules import step_lr
from speakerkit.trainer import SpeakerModel, check_same_recipe


@pytest.fixture
def checkpoint(tmp_path):
    """An untrained ECAPA-TDNN C=32 checkpoint with its JSON."""
    torch.manual_seed(0)
    model = SpeakerModel(ECAPA_TDNN(32), AAMsoftmax(6, 0.2, 30))
    path = str(tmp_path / 'model_0001.model')
    save_checkpoint(model.state_dict(), EncoderConfig(model='ecapa-tdnn', C=32, sampling_rate=16000), path)
    return path


@pytest.fixture
def embed_calls(monkeypatch):
    """Every file that goes through the encoder, in order."""
    calls = []
    original = evaluation.embed_files

    def counting(encoder, relative_paths, *args, **kwargs):
        calls.extend(relative_paths)
        return original(encoder, relative_paths, *args, **kwargs)
    monkeypatch.setattr(evaluation, 'embed_files', counting)
    monkeypatch.setattr(commands, 'embed_files', counting)
    return calls


def eval_argv(checkpoint, corpus, save_path, *lists):
    return ['--eval', '--initial_model', checkpoint, '--eval_list', *(lists or [corpus['eval_list']]),
            '--eval_path', corpus['eval_path'], '--save_path', str(save_path), '--n_cpu', '0']


# ---------------------------------------------------------------- flags

def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / 'run.yaml'
    config.write_text('demo: true\nmax_epoch: 3\nlr: 1e-3\nspec_augment: "off"\ntensorboard: false\n'
                      'eval_list: [a.txt, b.txt]\nmargin_schedule: [2, 4]\n')
    args = cli.parse_args(['--config', str(config), '--max_epoch', '5', '--save_path', str(tmp_path)])
    assert (args.max_epoch, args.lr, args.spec_augment, args.tensorboard) == (5, 0.001, False, False)
    assert args.eval_list == ['a.txt', 'b.txt'] and args.margin_schedule == [2, 4]
    assert args.batch_size == cli.DEMO_DEFAULTS['batch_size']  # --demo from the file, with its defaults
    assert {'demo', 'max_epoch', 'lr', 'eval_list', 'config', 'save_path'} <= set(args.given)
    as_json = tmp_path / 'run.json'
    as_json.write_text(json.dumps({'demo': True, 'max_epoch': 3, 'lr': 0.001, 'spec_augment': 'off',
                                   'tensorboard': False, 'eval_list': ['a.txt', 'b.txt'], 'margin_schedule': [2, 4]}))
    same = cli.parse_args(['--config', str(as_json), '--max_epoch', '5', '--save_path', str(tmp_path)])
    assert {k: v for k, v in vars(same).items() if k != 'config'} == {
        k: v for k, v in vars(args).items() if k != 'config'}


def test_every_setting_that_is_on_or_off_is_a_switch_given_alone_or_with_on_or_off(tmp_path, cli_error):
    def parsed(*flags):
        return cli.parse_args(['--demo', '--save_path', str(tmp_path), *flags])
    default = parsed()
    assert (default.spec_augment, default.skip_silent, default.speed_perturb, default.snorm) == (True, True, False,
                                                                                                False)
    for flags, name, value in ((['--snorm'], 'snorm', True), (['--snorm', 'on'], 'snorm', True),
                               (['--snorm', 'off'], 'snorm', False), (['--spec_augment', 'off'], 'spec_augment', False),
                               (['--spec_augment'], 'spec_augment', True), (['--speed_perturb', 'on'], 'speed_perturb',
                                                                            True),
                               (['--skip_silent', 'OFF', '--lr', '0.1'], 'skip_silent', False)):
        args = parsed(*flags)
        assert getattr(args, name) is value and name in args.given, flags
    status, message, _ = cli_error(['--demo', '--spec_augment', 'maybe'])
    assert status == 2 and "argument --spec_augment: expected on or off, got 'maybe'" in message
    yaml_file = tmp_path / 'c.yaml'
    yaml_file.write_text('spec_augment: off\nspeed_perturb: "on"\nsnorm: true\n')  # YAML reads a bare off as false
    args = cli.parse_args(['--demo', '--config', str(yaml_file), '--save_path', str(tmp_path)])
    assert (args.spec_augment, args.speed_perturb, args.snorm) == (False, True, True)


@pytest.mark.parametrize('text,error', [
    ('{"max_epochs": 3}', r"'max_epochs' is not a flag \(names as in --help, without the dashes\)"),
    ('{"lr": "fast"}', r"argument --lr: invalid float value: 'fast'"),
    ('{"model": "lstm"}', r"argument --model: invalid choice: 'lstm'"),
    ('{"demo": "yes"}', r"demo is a switch: true or false \(on or off\), not 'yes'"),
    ('[1, 2]', r'not a mapping of flag names to values'),
    ('{"lr": ', r'Expecting value'),
    ('{"arguments": {"lr": 0.1}}', r"a run's config.json that does not say which flags the run was given"),
    ('{"lr": 0.1, "max_epoch": 2, "lr": 0.2}', r"'lr' is given twice"),
])
def test_a_config_mistake_is_one_line_naming_the_file(tmp_path, cli_error, text, error):
    (tmp_path / 'c.json').write_text(text)
    status, message, _ = cli_error(['--config', str(tmp_path / 'c.json')])
    assert status == 2 and re.search(rf'--config {re.escape(str(tmp_path / "c.json"))}: {error}', message), message
    status, message, _ = cli_error(['--config', str(tmp_path / 'none.yaml')])
    assert status == 2 and 'none.yaml: [Errno 2] No such file or directory' in message


def test_a_yaml_config_with_aliases_is_refused_before_it_expands(tmp_path, cli_error):
    """Nine levels of nine aliases: 387 million strings if expanded."""
    levels = ['a0: &a0 ["x"]'] + [f'a{i}: &a{i} [{", ".join([f"*a{i - 1}"] * 9)}]' for i in range(1, 10)]
    (tmp_path / 'bomb.yaml').write_text('\n'.join(levels) + '\n')
    status, message, _ = cli_error(['--config', str(tmp_path / 'bomb.yaml')])
    assert status == 2 and f'--config {tmp_path / "bomb.yaml"}: aliases (*name) are not accepted in a flag file' in \
        message and 'line 2, column' in message and message.count('\n') == 1
    (tmp_path / 'twice.yaml').write_text('max_epoch: 2\nlr: 0.1\nmax_epoch: 3\n')
    status, message, _ = cli_error(['--config', str(tmp_path / 'twice.yaml')])
    assert status == 2 and f"--config {tmp_path / 'twice.yaml'}: 'max_epoch' is given twice" in message


def test_demo_defaults_yield_to_given_flags(tmp_path):
    args = cli.parse_args(['--demo', '--max_epoch', '2', '--C', '256', '--save_path', str(tmp_path)])
    assert (args.max_epoch, args.C, args.save_path) == (2, 256, str(tmp_path))
    assert args.batch_size == cli.DEMO_DEFAULTS['batch_size']
    assert args.train_list == os.path.join(str(tmp_path), 'corpus', 'voxceleb', 'train_list.txt')
    assert cli.parse_args(['--demo', '--model', 'tdnn']).C == cli.DEMO_WIDTHS['tdnn']
    assert cli.parse_args(['--demo', '--model', 'resnet34']).C == 16
    assert cli.parse_args(['--demo', '--model', 'campplus']).C == 16
    assert cli.parse_args(['--demo', '--model', 'redimnet-b6']).C == 32  # its smallest width that builds
    assert cli.parse_args(['--demo']).loss == 'aamsoftmax'
    assert cli.parse_args(['--demo', '--mode', 'clip']).loss == 'infonce'


def test_large_margin_sets_longer_crops_a_larger_margin_and_a_low_lr(tmp_path):
    checkpoint = tmp_path / 'model.model'
    checkpoint.write_bytes(b'')
    args = cli.parse_args(['--demo', '--large_margin', '--initial_model', str(checkpoint),
                                       '--save_path', str(tmp_path)])
    assert (args.num_frames, args.m, args.max_epoch) == (600, 0.5, 5)
    assert (args.scheduler, args.lr, args.final_lr, args.spec_augment) == ('warmup_exp', 1e-4, 2.5e-5, False)
    args = cli.parse_args(['--demo', '--large_margin', '--initial_model', str(checkpoint), '--m', '0.4',
                                       '--save_path', str(tmp_path)])
    assert args.m == 0.4 and args.num_frames == 600


def test_averaging_the_last_epochs_is_the_default_of_long_runs(tiny_corpus, train_argv, tmp_path, capsys):
    n, shortest = cli.AVERAGED_EPOCHS, cli.AVERAGED_SHARE * cli.AVERAGED_EPOCHS

    def average(*flags):
        return cli.parse_args(train_argv(tiny_corpus, tmp_path, *flags)).average
    assert average('--max_epoch', str(shortest)) == n
    assert average('--max_epoch', str(shortest - 1)) == 0
    assert average('--max_epoch', '80', '--average', '0') == 0
    assert average('--max_epoch', '3', '--average', '2') == 2
    with pytest.raises(SystemExit):
        cli.main(['--help'])
    printed = ' '.join(capsys.readouterr().out.split())
    assert f'default: {n} when --max_epoch is at least {shortest}, else off' in printed


def test_readme_shows_the_score_txt_of_the_default_demo(root):
    """README's demo block is what `--demo` writes with today's defaults: an epoch line for each epoch with its
    learning rate, and the average's line exactly when the demo averages."""
    readme = open(os.path.join(root, 'README.md')).read()
    block = readme.split('writes `exps/demo/score.txt`', 1)[1].split('```')[1].strip().splitlines()
    args = cli.parse_args(['--demo'])
    starts = [f'{e} epoch, LR {step_lr(args.lr, args.lr_decay, args.lr_decay_every, e):f}, LOSS '
              for e in range(1, args.max_epoch + 1)]
    if args.average:
        starts.append(f'{args.max_epoch} epoch, average of epochs {args.max_epoch - args.average + 1}-'
                      f'{args.max_epoch}, EER ')
    assert [line[:len(start)] for line, start in zip(block, starts)] == starts and len(block) == len(starts)


@pytest.mark.parametrize('given, recorded, kept', [([], 0, 0), ([], 3, 3), (['--average', '4'], 0, 4)])
def test_a_continued_run_keeps_its_own_average_unless_one_is_given(tiny_corpus, train_argv, tmp_path, given,
                                                                   recorded, kept):
    """A run started with other epochs to average (or none) saved the checkpoints of those: the default yields."""
    args = cli.parse_args(train_argv(tiny_corpus, tmp_path, '--max_epoch', '80', *given))
    (tmp_path / 'config.json').write_text(json.dumps({'arguments': {'average': recorded}}))
    check_same_recipe(args, str(tmp_path / 'model' / 'resume.pt'))
    assert args.average == kept


def test_help_shows_no_empty_defaults(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(['--help'])
    printed = capsys.readouterr().out
    assert stopped.value.code == 0 and '--snorm' in printed
    assert '(default: None)' not in printed and '(default: False)' not in printed
    assert '(default: 0.97)' in printed


def flag_mistakes():
    """(argv, message) of each line of flag_mistakes.txt."""
    path = os.path.join(os.path.dirname(__file__), 'flag_mistakes.txt')
    cases = [line.rstrip('\n').split(' => ') for line in open(path) if line.strip() and not line.startswith('#')]
    return [pytest.param(argv.split(), message, id=message) for argv, message in cases]


@pytest.mark.parametrize('argv,message', flag_mistakes())
def test_flag_mistakes_are_one_line_with_exit_status_2(argv, message, cli_error):
    status, printed, _ = cli_error(argv)
    assert status == 2
    assert printed.count('\n') == 1 and printed.startswith('trainECAPAModel.py: error: ') and message in printed


@pytest.mark.slow
def test_a_flag_mistake_in_a_shell_prints_no_traceback(root):
    result = subprocess.run([sys.executable, os.path.join(root, 'trainECAPAModel.py'), '--demo', '--max_epoch', '0'],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr == 'trainECAPAModel.py: error: --max_epoch must be at least 1, got 0\n'


# ---------------------------------------------------------------- data mistakes: one line, exit status 1

def test_a_trial_list_naming_a_missing_file_stops_before_training(tiny_corpus, train_argv, tmp_path, cli_error):
    trials = tmp_path / 'trials.txt'
    lines = open(tiny_corpus['eval_list']).read().splitlines() + ['1 id20000/session0/00000.wav id99999/gone.wav']
    trials.write_text('\n'.join(lines) + '\n')
    argv = train_argv(tiny_corpus, tmp_path / 'run', '--max_epoch', '1')
    argv[argv.index('--eval_list') + 1] = str(trials)
    status, printed, _ = cli_error(argv)
    assert status == 1 and printed.count('\n') == 1
    assert f'trials.txt: 1 files not under {tiny_corpus["eval_path"]}, e.g. {trials}:{len(lines)}: id99999/gone.wav' \
        in printed
    assert not (tmp_path / 'run' / 'model').exists()


@pytest.mark.parametrize('extra,status,message', [
    (['--n_class', '3'], 2, '--n_class 3 is smaller than the 6 speakers'),
    (['--n_class', '6', '--speed_perturb', 'on'], 2,
     '--n_class 6 is smaller than the 18 classes of --speed_perturb on'),
    (['--mode', 'clip'], 1, 'needs at least 8 speakers; the list has 6 (lower --batch_size)'),
])
def test_training_flags_that_do_not_fit_the_list(tiny_corpus, train_argv, tmp_path, cli_error, extra, status,
                                                 message):
    """A flag's mistake exits 2, what the data cannot give 1."""
    found, printed, _ = cli_error(train_argv(tiny_corpus, tmp_path, '--max_epoch', '1', *extra))
    assert found == status and printed.count('\n') == 1 and message in printed


def test_unreadable_score_files_and_checkpoints_are_named(tmp_path, tiny_corpus, cli_error):
    scores = tmp_path / 'scores.txt'
    scores.write_text('a b 0.5 1\na c high 0\n')
    assert cli_error(['--score_file', str(scores)])[:2] == (
        1, f"trainECAPAModel.py: error: {scores}:2: expected '<enroll> <test> <finite score> "
           f"<0|1|target|nontarget>', got 'a c high 0'\n")
    scores.write_text('a b 0.5 1\na c 0.7 1\n')
    status, printed, _ = cli_error(['--score_file', str(scores)])
    assert status == 1 and 'every trial has label 1' in printed
    garbage = tmp_path / 'garbage.model'
    garbage.write_bytes(b'not a checkpoint')
    status, printed, _ = cli_error(eval_argv(str(garbage), tiny_corpus, tmp_path))
    assert status == 1 and printed.count('\n') == 1 and 'garbage.model: not a readable PyTorch checkpoint' in printed
    (tmp_path / 'empty.model').write_bytes(b'')
    status, printed, _ = cli_error(eval_argv(str(tmp_path / 'empty.model'), tiny_corpus, tmp_path))
    assert status == 1 and printed.endswith('empty.model: not a readable PyTorch checkpoint (EOFError)\n')
    torch.save({'speaker_encoder.conv1.weight': 'a string, not a tensor'}, tmp_path / 'strings.model')
    status, printed, _ = cli_error(eval_argv(str(tmp_path / 'strings.model'), tiny_corpus, tmp_path))
    assert status == 1 and printed.count('\n') == 1
    assert ("strings.model: expected a state_dict of tensors, found a str under 'speaker_encoder.conv1.weight'"
            in printed)


def test_a_save_path_that_is_a_file_is_one_line(tiny_corpus, train_argv, tmp_path, cli_error):
    (tmp_path / 'taken').write_text('a file')
    for save_path in (tmp_path / 'taken', tmp_path / 'taken' / 'run'):
        status, printed, _ = cli_error(train_argv(tiny_corpus, save_path))
        assert status == 1 and printed.count('\n') == 1
        assert printed.startswith(f'trainECAPAModel.py: error: {save_path}: cannot hold a run (')
    assert (tmp_path / 'taken').read_text() == 'a file'


# ---------------------------------------------------------------- --eval, --score_file

@pytest.mark.slow
def test_eval_of_a_training_checkpoint_gives_its_logged_eer_and_a_score_file(tiny_corpus, reference_run, tmp_path,
                                                                            capsys):
    checkpoint = str(reference_run / 'model' / 'model_0002.model')
    results = cli.main(eval_argv(checkpoint, tiny_corpus, tmp_path))
    metrics = results[tiny_corpus['eval_list']].metrics
    logged = (reference_run / 'score.txt').read_text().splitlines()[1]
    assert f'{metrics.text()}, bestEER' in logged
    assert f'EER {metrics.eer:2.2f}%' in capsys.readouterr().out
    trials = read_trials(tiny_corpus['eval_list'])
    score_file = tmp_path / 'scores' / 'trials.txt'
    rows = [line.split() for line in score_file.read_text().splitlines()]
    assert [(r[0], r[1], int(r[3])) for r in rows] == list(zip(trials.enroll, trials.test, trials.labels))
    # The scores are those of the notebook helper on the same files.
    encoder = tools.load_model(checkpoint)
    first = tools.score(encoder, os.path.join(tiny_corpus['eval_path'], trials.enroll[0]),
                        os.path.join(tiny_corpus['eval_path'], trials.test[0]))
    assert float(rows[0][2]) == pytest.approx(first, abs=1e-5)
    # --score_file recomputes the metrics from that file alone.
    again = cli.main(['--score_file', str(score_file)])[str(score_file)]
    assert again.eer == pytest.approx(metrics.eer, abs=1e-3)
    assert again.min_dcf == pytest.approx(metrics.min_dcf, abs=1e-3)
    # The same trials in Kaldi's form (wespeaker's .kaldi lists): the same metrics, its score file in that form.
    kaldi = tmp_path / 'vox1_O.kaldi'
    kaldi.write_text(''.join(f'{e} {t} {"target" if label else "nontarget"}\n'
                             for e, t, label in zip(trials.enroll, trials.test, trials.labels)))
    same = cli.main(eval_argv(checkpoint, tiny_corpus, tmp_path / 'kaldi', str(kaldi)))[str(kaldi)].metrics
    assert same.text() == metrics.text()
    kaldi_rows = [line.split() for line in (tmp_path / 'kaldi' / 'scores' / 'vox1_O.kaldi').read_text().splitlines()]
    assert [(r[2], r[3] == 'target') for r in kaldi_rows] == [(r[2], r[3] == '1') for r in rows]


def test_a_broken_json_beside_a_checkpoint_or_in_a_run_folder_is_one_line(tiny_corpus, checkpoint, train_argv,
                                                                            tmp_path, cli_error):
    shutil.copy(checkpoint, tmp_path / 'm.model')
    for text, why in (('{"model": "ecapa', 'Unterminated string'), ('{"model": "ecapa-tdnn"}', 'no C, sampling_rate'),
                      ('{"model": "ecapa-tdnn", "C": "32", "sampling_rate": 16000}', "C: '32' is not a positive"),
                      ('{"model": "ecapa", "C": 32, "sampling_rate": 16000}', "model: 'ecapa' is none of ecapa-tdnn"),
                      ('{"model": "tdnn", "C": 32, "sampling_rate": 16000, "embedding_dim": 0}',
                       'embedding_dim: 0 is not')):
        (tmp_path / 'm.json').write_text(text)
        status, printed, _ = cli_error(eval_argv(str(tmp_path / 'm.model'), tiny_corpus, tmp_path))
        assert status == 1 and printed.count('\n') == 1 and 'm.json: not a readable encoder config' in printed
        assert why in printed
    run = tmp_path / 'run'
    (run / 'model').mkdir(parents=True)
    (run / 'model' / 'resume.pt').write_bytes(b'')
    (run / 'config.json').write_text('{"arguments": {"lr"')  # cut short
    status, printed, _ = cli_error(train_argv(tiny_corpus, run, '--max_epoch', '1'))
    assert status == 1 and printed.count('\n') == 1 and 'config.json: not a readable run config' in printed


@pytest.mark.parametrize('cohort,size', [('speaker', 1), ('utterance', 1)])
def test_a_cohort_of_one_is_refused_before_anything_is_embedded(tiny_corpus, checkpoint, tmp_path, cli_error, cohort,
                                                                size):
    one_speaker = tmp_path / 'one_speaker.txt'
    one_speaker.write_text(''.join(line for line in open(tiny_corpus['train_list']) if line.startswith('id10000 ')))
    argv = eval_argv(checkpoint, tiny_corpus, tmp_path) + [
        '--snorm', '--cohort', cohort, '--cohort_size', str(size) if cohort == 'utterance' else '0',
        '--train_list', str(one_speaker), '--train_path', tiny_corpus['train_path']]
    status, printed, _ = cli_error(argv)
    assert status == 2 and f'--snorm: a cohort of 1 {cohort} from {one_speaker}; AS-Norm needs at least two' in printed


@pytest.mark.slow
@pytest.mark.parametrize('cohort', ['speaker', 'utterance'])
def test_as_norm_scores_equal_a_direct_computation_with_either_cohort(tiny_corpus, checkpoint, tmp_path, cohort):
    argv = eval_argv(checkpoint, tiny_corpus, tmp_path) + [
        '--snorm', '--cohort', cohort, '--cohort_size', '20', '--cohort_top_k', '4',
        '--train_list', tiny_corpus['train_list'], '--train_path', tiny_corpus['train_path']]
    result = cli.main(argv)[tiny_corpus['eval_list']]
    encoder = tools.load_model(checkpoint)
    trials = read_trials(tiny_corpus['eval_list'])
    files = sorted(set(trials.enroll + trials.test))
    vectors = torch.stack([tools.protocol_vectors(encoder, os.path.join(tiny_corpus['eval_path'], f)) for f in files])
    entries = cohort_entries(read_train_list(tiny_corpus['train_list']), 20, seed=10)  # --seed's default
    train = {e.path: tools.protocol_vectors(encoder, os.path.join(tiny_corpus['train_path'], e.path)) for e in entries}
    if cohort == 'utterance':
        members = torch.stack([train[e.path] for e in entries])
        assert len(members) == 20
    else:
        speakers = sorted({e.speaker for e in entries})
        members = torch.stack([torch.stack([train[e.path] for e in entries if e.speaker == s]).mean(dim=0)
                               for s in speakers])
        assert len(members) == 6
    index = {f: i for i, f in enumerate(files)}
    pairs = np.array([(index[e], index[t]) for e, t in zip(trials.enroll, trials.test)])
    # Four cohort scores have a small spread: float32 products differ by ~1e-5 relative after normalising.
    np.testing.assert_allclose(result.snorm_scores, metrics.as_norm(vectors, pairs, members, 4), rtol=1e-3)
    assert result.snorm_metrics == metrics.verification_metrics(result.snorm_scores, trials.labels)
    assert not np.allclose(result.snorm_scores, result.scores)
    written = [float(line.split()[2]) for line in open(tmp_path / 'scores' / 'trials.txt.asnorm')]
    np.testing.assert_allclose(written, result.snorm_scores, atol=1e-6)


def test_several_lists_in_one_run_embed_each_file_once(tiny_corpus, checkpoint, tmp_path, embed_calls):
    trials = read_trials(tiny_corpus['eval_list'])
    half = tmp_path / 'half.txt'
    half.write_text(''.join(f'{label} {e} {t}\n' for label, e, t in list(zip(trials.labels, trials.enroll,
                                                                                trials.test))[::2]))
    unlabelled = tmp_path / 'test_phase.txt'
    unlabelled.write_text(''.join(f'{e} {t}\n' for e, t in zip(trials.enroll, trials.test)))
    results = cli.main(eval_argv(checkpoint, tiny_corpus, tmp_path / 'run', tiny_corpus['eval_list'],
                                             str(half), str(unlabelled)))
    assert sorted(embed_calls) == sorted(set(trials.enroll) | set(trials.test))
    full, part, blind = (results[p] for p in (tiny_corpus['eval_list'], str(half), str(unlabelled)))
    np.testing.assert_allclose(part.scores, full.scores[::2])
    np.testing.assert_allclose(blind.scores, full.scores)
    assert part.metrics == metrics.verification_metrics(full.scores[::2], trials.labels[::2])
    assert blind.metrics is None
    rows = (tmp_path / 'run' / 'scores' / 'test_phase.txt').read_text().split('\n')[0].split()
    assert rows == [trials.enroll[0], trials.test[0], f'{full.scores[0]:.6f}']


def test_a_replaced_audio_file_is_embedded_again(tiny_corpus, checkpoint, tmp_path, embed_calls):
    eval_path = tmp_path / 'wav'
    shutil.copytree(tiny_corpus['eval_path'], eval_path)
    argv = eval_argv(checkpoint, tiny_corpus, tmp_path / 'run')
    argv[argv.index('--eval_path') + 1] = str(eval_path)
    before = cli.main(argv)[tiny_corpus['eval_list']]
    trials = read_trials(tiny_corpus['eval_list'])
    replaced, other = trials.enroll[0], next(f for f in trials.test if f != trials.enroll[0])
    shutil.copyfile(eval_path / other, eval_path / replaced)
    embed_calls.clear()
    after = cli.main(argv)[tiny_corpus['eval_list']]
    assert embed_calls == [replaced]
    changed = [i for i, (e, t) in enumerate(zip(trials.enroll, trials.test)) if replaced in (e, t)]
    assert not np.allclose(after.scores[changed], before.scores[changed])
    unchanged = [i for i in range(len(trials.enroll)) if i not in changed]
    np.testing.assert_array_equal(after.scores[unchanged], before.scores[unchanged])


def test_two_lists_of_one_file_name_keep_their_own_outputs(tiny_corpus, checkpoint, tmp_path):
    lines = open(tiny_corpus['eval_list']).read().splitlines()
    for folder, part in (('O', lines[::2]), ('E', lines[1::2])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / 'trials.txt').write_text('\n'.join(part) + '\n')
    lists = [str(tmp_path / 'O' / 'trials.txt'), str(tmp_path / 'E' / 'trials.txt')]
    results = cli.main(eval_argv(checkpoint, tiny_corpus, tmp_path / 'run', *lists))
    for path, folder, part in zip(lists, ('O', 'E'), (lines[::2], lines[1::2])):
        written = (tmp_path / 'run' / 'scores' / f'{folder}_trials.txt').read_text().splitlines()
        assert [line.split()[:2] for line in written] == [line.split()[1:] for line in part]
        np.testing.assert_allclose([float(line.split()[2]) for line in written], results[path].scores, atol=1e-6)
    assert {p.name for p in (tmp_path / 'run' / 'plots').iterdir()} == {
        'O_trials_det.png', 'O_trials_scores.png', 'E_trials_det.png', 'E_trials_scores.png'}


@pytest.mark.slow
def test_embeddings_are_cached_per_checkpoint(tiny_corpus, checkpoint, tmp_path, embed_calls):
    argv = eval_argv(checkpoint, tiny_corpus, tmp_path / 'run')
    first = cli.main(argv)[tiny_corpus['eval_list']]
    count = len(embed_calls)
    assert count > 0 and os.listdir(tmp_path / 'run' / 'embeddings')
    second = cli.main(argv)[tiny_corpus['eval_list']]
    assert len(embed_calls) == count
    np.testing.assert_array_equal(first.scores, second.scores)
    # Another precision: the cache does not apply, and the scores move only a little.
    bf16 = cli.main(argv + ['--eval_precision', 'bf16'])[tiny_corpus['eval_list']]
    assert len(embed_calls) == 2 * count and len(os.listdir(tmp_path / 'run' / 'embeddings')) == 2
    assert not np.array_equal(bf16.scores, first.scores) and np.abs(bf16.scores - first.scores).max() < 0.02
    # Other weights: the cache does not apply.
    state = torch.load(checkpoint, weights_only=True)
    state['speaker_encoder.fc6.bias'] += 1
    torch.save(state, checkpoint)
    cli.main(argv)
    assert len(embed_calls) == 3 * count


# ---------------------------------------------------------------- --extract, --export

@pytest.mark.slow
def test_extract_writes_embeddings_for_a_folder_and_a_list(tiny_corpus, checkpoint, tmp_path):
    out = tmp_path / 'folder.pt'
    cli.main(['--initial_model', checkpoint, '--extract', tiny_corpus['eval_path'], '--out', str(out),
                          '--n_cpu', '0'])
    saved = torch.load(out, weights_only=True)
    trials = read_trials(tiny_corpus['eval_list'])
    files = sorted(set(trials.enroll + trials.test))
    assert saved['paths'] == files
    assert saved['embeddings'].shape == (len(files), 192) and saved['protocol_vectors'].shape == (len(files), 384)
    encoder = tools.load_model(checkpoint)
    first = os.path.join(tiny_corpus['eval_path'], files[0])
    torch.testing.assert_close(saved['embeddings'][0], tools.embed(encoder, first), atol=1e-5, rtol=0)
    torch.testing.assert_close(saved['protocol_vectors'][0], tools.protocol_vectors(encoder, first), atol=1e-6, rtol=0)
    listed = tmp_path / 'listed.pt'
    cli.main(['--initial_model', checkpoint, '--extract', tiny_corpus['train_list'],
                          '--eval_path', tiny_corpus['train_path'], '--out', str(listed), '--n_cpu', '0'])
    assert torch.load(listed, weights_only=True)['paths'] == [
        entry.path for entry in read_train_list(tiny_corpus['train_list'])]


def test_embed_extract_torchscript_and_onnx_give_one_embedding(tiny_corpus, checkpoint, tmp_path):
    out = tmp_path / 'embeddings.npz'
    cli.main(['--initial_model', checkpoint, '--extract', tiny_corpus['eval_path'], '--out', str(out),
                          '--n_cpu', '0'])
    saved = np.load(out)  # no pickle needed
    assert saved['skipped'].shape == (0, 2) and int(saved['sampling_rate']) == 16000
    path = os.path.join(tiny_corpus['eval_path'], str(saved['paths'][0]))
    encoder = tools.load_model(checkpoint)
    embedding = tools.embed(encoder, path).numpy()
    np.testing.assert_allclose(saved['embeddings'][0], embedding, rtol=0, atol=1e-5)
    np.testing.assert_allclose(saved['protocol_vectors'][0], tools.protocol_vectors(encoder, path), rtol=0, atol=1e-5)
    waveform = soundfile.read(path, dtype='float32')[0][None]
    cli.main(['--initial_model', checkpoint, '--export', str(tmp_path / 'encoder.pt')])
    with torch.no_grad():
        scripted = torch.jit.load(str(tmp_path / 'encoder.pt'))(torch.from_numpy(waveform))[0].numpy()
    np.testing.assert_allclose(scripted, embedding, rtol=0, atol=1e-5)
    pytest.importorskip('onnx', reason='onnx is an optional extra (requirements-extras.txt)')
    onnxruntime = pytest.importorskip('onnxruntime', reason='onnxruntime is an optional extra')
    cli.main(['--initial_model', checkpoint, '--export', str(tmp_path / 'encoder.onnx')])
    session = onnxruntime.InferenceSession(str(tmp_path / 'encoder.onnx'))
    np.testing.assert_allclose(session.run(['embedding'], {'waveform': waveform})[0][0], embedding, rtol=0, atol=1e-5)


@pytest.mark.parametrize('suffix, loader', [
    ('.pt', 'torch.jit.load(sys.argv[1])'),
    pytest.param('.pt2', 'torch.export.load(sys.argv[1]).module()', marks=pytest.mark.slow),  # 20 s to export
])
def test_an_exported_model_embeds_from_any_folder_with_plain_torch(checkpoint, tmp_path, suffix, loader):
    cli.main(['--initial_model', checkpoint, '--export', str(tmp_path / f'encoder{suffix}')])
    elsewhere = tmp_path / 'notebook'
    elsewhere.mkdir()
    waveform = tmp_path / 'waveform.npy'
    np.save(waveform, (0.1 * np.random.default_rng(0).standard_normal((3, 23000))).astype(np.float32))
    program = (f"import sys, numpy, torch; assert 'model' not in sys.modules and 'speakerkit' not in sys.modules; "
               f"m = {loader}; x = torch.from_numpy(numpy.load(sys.argv[2])); "
               f"numpy.save(sys.argv[3], m(x).detach().numpy())")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    ran = subprocess.run([sys.executable, '-W', 'error::FutureWarning' if suffix == '.pt2' else 'default', '-c',
                          program, str(tmp_path / f'encoder{suffix}'), str(waveform), str(tmp_path / 'out.npy')],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    expected = tools.embed(tools.load_model(checkpoint), np.load(waveform), 16000)
    np.testing.assert_allclose(np.load(tmp_path / 'out.npy'), expected.numpy(), rtol=0, atol=1e-5)


def test_score_pair_prints_the_cosine_and_the_protocol_score(tiny_corpus, checkpoint, capsys, cli_error, tmp_path):
    trials = read_trials(tiny_corpus['eval_list'])
    pair = [os.path.join(tiny_corpus['eval_path'], f) for f in (trials.enroll[0], trials.test[0])]
    cosine, protocol = cli.main(['--initial_model', checkpoint, '--score_pair', *pair])
    encoder = tools.load_model(checkpoint)
    a, b = (tools.embed(encoder, p) for p in pair)
    assert cosine == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-5)
    assert protocol == pytest.approx(tools.score(encoder, *pair), abs=1e-5)
    assert f'protocol score (as --eval scores a trial) {protocol:.4f}' in capsys.readouterr().out
    status, message, _ = cli_error(['--initial_model', checkpoint, '--score_pair', pair[0], 'missing.wav'])
    assert status == 2 and message.rstrip().endswith('--score_pair missing.wav: no such file')
    status, message, _ = cli_error(['--initial_model', checkpoint, '--score_pair', pair[0], str(tmp_path)])
    assert status == 2 and message.rstrip().endswith(f'--score_pair {tmp_path}: no such file')
    (tmp_path / 'notes.wav').write_text('not audio')
    status, message, _ = cli_error(['--initial_model', checkpoint, '--score_pair', pair[0],
                                    str(tmp_path / 'notes.wav')])
    assert status == 1 and message == (f'trainECAPAModel.py: error: --score_pair: {tmp_path / "notes.wav"}: neither '
                                       f'libsndfile nor FFmpeg reads it as audio') + message.split('audio', 1)[1]
    assert message.count('\n') == 1


def test_extract_skips_and_lists_files_it_cannot_embed_and_writes_the_rest(tiny_corpus, checkpoint, tmp_path,
                                                                           broken_audio, capsys, cli_error):
    folder = tmp_path / 'audio'
    shutil.copytree(tiny_corpus['eval_path'], folder)
    good = sorted(str(p.relative_to(folder)) for p in folder.rglob('*.wav'))
    for name, (write, _) in broken_audio.items():
        write(str(folder / name))
    out = tmp_path / 'embeddings.pt'
    cli.main(['--initial_model', checkpoint, '--extract', str(folder), '--out', str(out), '--n_cpu', '1'])
    printed = capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    unembeddable = {'garbage.wav', 'empty.wav', 'short.wav', 'nan.wav'}  # silent.wav is embedded and reported
    assert saved['paths'] == sorted(good + ['silent.wav']) and len(saved['embeddings']) == len(good) + 1
    assert sorted(path for path, _ in saved['skipped']) == sorted(unembeddable)
    for name in unembeddable:
        assert f'{folder}: skipped {name} (' in printed
    assert f'{out}: {len(good) + 1} embeddings of 192 dimensions, 4 files skipped' in printed
    only_broken = tmp_path / 'broken.txt'
    only_broken.write_text(''.join(f'{name}\n' for name in sorted(unembeddable)))
    status, message, _ = cli_error(['--initial_model', checkpoint, '--extract', str(only_broken), '--eval_path',
                                    str(folder), '--out', str(tmp_path / 'none.pt'), '--n_cpu', '0'])
    assert status == 1 and message.splitlines()[-1].endswith(f'--extract {only_broken}: none of its 4 files can be '
                                                             f'embedded')
    (tmp_path / 'empty').mkdir()
    for argv, status_and_line in (
            (['--extract', str(folder), '--out', str(tmp_path / 'e.txt')],
             (2, f'--out {tmp_path / "e.txt"}: name a .pt (torch.save), .npz (numpy) or .ark (Kaldi, with .scp) file')),
            (['--extract', str(tmp_path / 'nothing'), '--out', str(out)],
             (2, f'--extract {tmp_path / "nothing"}: no such file or folder')),
            (['--extract', str(tmp_path / 'empty'), '--out', str(out)],
             (1, f'{tmp_path / "empty"}: no audio files to embed'))):
        status, message, _ = cli_error(['--initial_model', checkpoint, *argv])
        assert (status, message) == (status_and_line[0], f'trainECAPAModel.py: error: {status_and_line[1]}\n')


def test_onnx_export_without_the_onnx_package_is_one_line(checkpoint, tmp_path, cli_error, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnx' else
                        real_find_spec(name, *a))
    status, message, _ = cli_error(['--initial_model', checkpoint, '--export', str(tmp_path / 'e.onnx')])
    assert status == 1 and message == (f'trainECAPAModel.py: error: {tmp_path / "e.onnx"}: ONNX export needs the onnx '
                                       f'package (pip install -r requirements-extras.txt)\n')
    assert not (tmp_path / 'e.onnx').exists()


@pytest.mark.parametrize('suffix', ['.pt', '.onnx'])
def test_export_to_a_path_that_cannot_be_written_is_one_line_and_into_a_new_folder_works(checkpoint, tmp_path,
                                                                                       cli_error, suffix):
    if suffix == '.onnx':
        pytest.importorskip('onnx', reason='onnx is an optional extra (requirements-extras.txt)')
    (tmp_path / f'folder{suffix}').mkdir()
    (tmp_path / 'file').write_text('')
    for target, why in ((tmp_path / f'folder{suffix}', 'Is a directory'),
                        (tmp_path / 'file' / f'e{suffix}', f'its folder {tmp_path / "file"}: File exists')):
        status, message, _ = cli_error(['--initial_model', checkpoint, '--export', str(target)])
        assert status == 1 and message == f'trainECAPAModel.py: error: {target}: cannot be written ({why})\n'
    cli.main(['--initial_model', checkpoint, '--export', str(tmp_path / 'new' / f'e{suffix}')])
    assert (tmp_path / 'new' / f'e{suffix}').stat().st_size > 0 and os.listdir(tmp_path / 'new') == [f'e{suffix}']


def test_export_writes_a_torchscript_encoder_of_a_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder('tdnn', 32, 16000)
    model = SpeakerModel(encoder, AAMsoftmax(4, 0.2, 30, 512))
    save_checkpoint(model.state_dict(), EncoderConfig(model='tdnn', C=32, sampling_rate=16000, embedding_dim=512),
                    str(tmp_path / 'model_0001.model'))
    cli.main(['--initial_model', str(tmp_path / 'model_0001.model'), '--export', str(tmp_path / 'e.pt')])
    x = 0.1 * torch.randn(2, 16000)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / 'e.pt'))(x), encoder.eval()(x, False), rtol=0,
                                   atol=1e-4)


@pytest.mark.slow
def test_training_runs_without_a_trial_list_or_with_one_without_labels(tiny_corpus, train_argv, tmp_path, cli_error):
    argv = train_argv(tiny_corpus, tmp_path / 'run', '--max_epoch', '2', '--average', '2')
    at = argv.index('--eval_list')
    status, printed, _ = cli_error(argv[:at + 2] + argv[at + 4:])  # --eval_list without --eval_path
    assert status == 2 and 'error: --eval_list needs --eval_path' in printed
    cli.main(argv[:at] + argv[at + 4:])
    lines = (tmp_path / 'run' / 'score.txt').read_text().splitlines()
    assert [re.sub(r'[\d.]+', 'N', line) for line in lines] == ['N epoch, LR N, LOSS N, ACC N%'] * 2 + [
        'N epoch, average of epochs N-N']
    assert (tmp_path / 'run' / 'model' / 'model_0002.model').exists()
    assert (tmp_path / 'run' / 'model' / 'model_average.model').exists()
    blind = tmp_path / 'blind.txt'
    blind.write_text(''.join(' '.join(line.split()[1:]) + '\n' for line in open(tiny_corpus['eval_list'])))
    argv = train_argv(tiny_corpus, tmp_path / 'blind_run', '--max_epoch', '1')
    argv[argv.index('--eval_list') + 1] = str(blind)
    cli.main(argv)
    line = (tmp_path / 'blind_run' / 'score.txt').read_text()
    assert line.endswith('%, 48 trials scored (no labels)\n') and 'EER' not in line


def test_an_initial_model_of_another_width_names_the_flags_of_its_own_encoder(tiny_corpus, checkpoint, train_argv,
                                                                              tmp_path, cli_error):
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path / 'run', '--initial_model', checkpoint,
                                              '--C', '16'))
    assert status == 1 and message.count('\n') == 1
    assert (f'{checkpoint}: does not fit this ECAPA_TDNN (its model_0001.json records another encoder: give --C 32 '
            f'to build that one, or --allow_partial_load to load the weights that fit): ') in message
    os.remove(checkpoint[:-len('.model')] + '.json')  # without it, nothing to name but the partial load
    status, message, _ = cli_error(train_argv(tiny_corpus, tmp_path / 'run2', '--initial_model', checkpoint,
                                              '--C', '16'))
    assert status == 1 and '(--allow_partial_load loads the weights that do)' in message


@pytest.mark.slow
def test_a_kaldi_data_folder_trains_as_the_list_it_describes(tiny_corpus, train_argv, reference_run, tmp_path):
    """wav.scp with absolute paths and utt2spk, no --train_path: the reference run's first epoch, bit for bit."""
    folder = tmp_path / 'kaldi'
    folder.mkdir()
    lines = [line.split() for line in open(tiny_corpus['train_list'])]
    (folder / 'wav.scp').write_text(''.join(f'utt{i} {os.path.join(tiny_corpus["train_path"], path)}\n'
                                            for i, (_, path) in enumerate(lines)))
    (folder / 'utt2spk').write_text(''.join(f'utt{i} {speaker}\n' for i, (speaker, _) in enumerate(lines)))
    argv = train_argv(tiny_corpus, tmp_path / 'run', '--max_epoch', '1')
    at = argv.index('--train_list')
    cli.main(argv[:at] + ['--train_list', str(folder)] + argv[at + 4:])  # without --train_path
    assert_same_checkpoints(reference_run / 'model' / 'model_0001.model',
                            tmp_path / 'run' / 'model' / 'model_0001.model')
    assert (tmp_path / 'run' / 'score.txt').read_text().splitlines()[0] == \
        (reference_run / 'score.txt').read_text().splitlines()[0]


def test_extract_from_a_kaldi_data_folder_writes_kaldi_vectors_under_its_utterances(tiny_corpus, checkpoint,
                                                                                   tmp_path):
    kaldiio = pytest.importorskip('kaldiio', reason='kaldiio is an optional extra (requirements-extras.txt)')
    trials = read_trials(tiny_corpus['eval_list'])
    files = sorted(set(trials.enroll + trials.test))[:4]
    folder = tmp_path / 'vox1'
    folder.mkdir()
    (folder / 'wav.scp').write_text(''.join(f'utt-{i} {path}\n' for i, path in enumerate(files)))
    cli.main(['--initial_model', checkpoint, '--extract', str(folder), '--eval_path', tiny_corpus['eval_path'],
              '--out', str(tmp_path / 'xvector.ark'), '--n_cpu', '0'])
    read_back = dict(kaldiio.load_scp(str(tmp_path / 'xvector.scp')))
    assert list(read_back) == [f'utt-{i}' for i in range(4)]
    encoder = tools.load_model(checkpoint)
    for i, path in enumerate(files):
        np.testing.assert_allclose(read_back[f'utt-{i}'], tools.embed(encoder, os.path.join(
            tiny_corpus['eval_path'], path)).numpy(), rtol=0, atol=1e-5)
    cli.main(['--initial_model', checkpoint, '--extract', str(folder), '--eval_path', tiny_corpus['eval_path'],
              '--out', str(tmp_path / 'e.npz'), '--n_cpu', '0'])
    saved = np.load(tmp_path / 'e.npz')
    assert saved['names'].tolist() == [f'utt-{i}' for i in range(4)] and saved['paths'].tolist() == files
    np.testing.assert_allclose(saved['embeddings'], np.stack([read_back[f'utt-{i}'] for i in range(4)]), rtol=0,
                               atol=0)
    cli.main(['--initial_model', checkpoint, '--extract', tiny_corpus['eval_list'], '--eval_path',
              tiny_corpus['eval_path'], '--out', str(tmp_path / 'trials.ark'), '--n_cpu', '0'])
    assert sorted(dict(kaldiio.load_scp(str(tmp_path / 'trials.scp')))) == sorted(set(trials.enroll + trials.test))


def test_kaldi_output_refuses_a_name_that_cannot_be_a_kaldi_key(tiny_corpus, checkpoint, tmp_path, cli_error):
    pytest.importorskip('kaldiio', reason='kaldiio is an optional extra (requirements-extras.txt)')
    folder = tmp_path / 'files'
    folder.mkdir()
    trials = read_trials(tiny_corpus['eval_list'])
    shutil.copy(os.path.join(tiny_corpus['eval_path'], trials.enroll[0]), folder / 'a b.wav')
    status, message, _ = cli_error(['--initial_model', checkpoint, '--extract', str(folder), '--out',
                                    str(tmp_path / 'x.ark'), '--n_cpu', '0'])
    assert status == 1 and "x.ark: 'a b.wav' cannot be a Kaldi key (white space)" in message
    assert not (tmp_path / 'x.ark').exists()


def test_calibrate_writes_the_map_to_llrs_that_score_pair_and_verify_decide_with(tiny_corpus, checkpoint,
                                                                                  tmp_path, cli_error, capsys):
    model = checkpoint  # untrained, yet its scores rank the tiny corpus's targets higher (EER 25%)
    calibration = cli.main(['--calibrate', tiny_corpus['eval_list'], '--eval_path', tiny_corpus['eval_path'],
                            '--initial_model', model, '--p_target', '0.05', '--save_path', str(tmp_path / 'run'),
                            '--n_cpu', '0'])
    written = json.loads((tmp_path / 'model_0001.calibration.json').read_text())
    assert written['scale'] == calibration.scale > 0 and written['p_target'] == 0.05 and written['trials'] == 48
    assert 0 < written['cllr'] < 1.5 and written['trial_list'] == os.path.abspath(tiny_corpus['eval_list'])
    trials = read_trials(tiny_corpus['eval_list'])
    pair = [os.path.join(tiny_corpus['eval_path'], f) for f in (trials.enroll[0], trials.test[0])]
    capsys.readouterr()
    _, protocol = cli.main(['--initial_model', model, '--score_pair', *pair])
    llr = calibration.scale * protocol + calibration.offset
    same = llr > calibration.llr_threshold
    assert f'calibrated log-likelihood ratio {llr:.4f}' in capsys.readouterr().out
    assert tools.verify(tools.load_model(model), *pair, tools.load_calibration(model)) == \
        pytest.approx((protocol, llr, same), abs=1e-4)
    blind = tmp_path / 'blind.txt'
    blind.write_text(''.join(f'{e} {t}\n' for e, t in zip(trials.enroll, trials.test)))
    status, message, _ = cli_error(['--calibrate', str(blind), '--eval_path', tiny_corpus['eval_path'],
                                    '--initial_model', model])
    assert status == 1 and 'a list without labels; calibration needs target and non-target trials' in message
    (tmp_path / 'model_0001.calibration.json').write_text('{"scale": -1, "offset": 0, "p_target": 0.01}')
    status, message, _ = cli_error(['--initial_model', model, '--score_pair', *pair])
    assert status == 1 and 'model_0001.calibration.json: not a readable calibration' in message


def test_calibration_with_the_training_mean_and_durations_decides_as_it_was_fitted(tiny_corpus, checkpoint,
                                                                                     tmp_path, capsys):
    model = checkpoint
    calibration = cli.main(['--calibrate', tiny_corpus['eval_list'], '--eval_path', tiny_corpus['eval_path'],
                            '--initial_model', model, '--subtract_mean', '--duration_terms', '--train_list',
                            tiny_corpus['train_list'], '--train_path', tiny_corpus['train_path'],
                            '--save_path', str(tmp_path / 'run'), '--n_cpu', '0'])
    written = json.loads((tmp_path / 'model_0001.calibration.json').read_text())
    encoder = tools.load_model(model)
    assert len(written['duration_weights']) == 2 and len(written['training_mean']) == 2 * 192
    assert tools.load_calibration(model) == calibration
    # the same scores as --eval --subtract_mean gives, and the map fitted on them with the files' durations
    results = cli.main(['--eval', '--initial_model', model, '--eval_list', tiny_corpus['eval_list'], '--eval_path',
                        tiny_corpus['eval_path'], '--subtract_mean', '--train_list', tiny_corpus['train_list'],
                        '--train_path', tiny_corpus['train_path'], '--save_path', str(tmp_path / 'run'),
                        '--n_cpu', '0'])
    trials = read_trials(tiny_corpus['eval_list'])
    scores = next(iter(results.values())).scores
    seconds = [[soundfile.info(os.path.join(tiny_corpus['eval_path'], f)).duration for f in pair]
               for pair in zip(trials.enroll, trials.test)]
    assert metrics.cllr(calibration.llr(scores, seconds), trials.labels) == pytest.approx(written['cllr'])
    pair = [os.path.join(tiny_corpus['eval_path'], f) for f in (trials.enroll[0], trials.test[0])]
    score, llr, same = tools.verify(encoder, *pair, calibration)
    assert score == pytest.approx(scores[0], abs=1e-5)
    assert llr == pytest.approx(float(calibration.llr([scores[0]], [seconds[0]])[0]), abs=1e-4)
    assert same == (llr > calibration.llr_threshold) and written['decision_llr'] == calibration.decision_llr
    capsys.readouterr()
    cli.main(['--initial_model', model, '--score_pair', *pair])
    assert f'calibrated log-likelihood ratio {llr:.4f} of the score {score:.4f} (of centred vectors' in \
        capsys.readouterr().out
