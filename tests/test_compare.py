"""exps/librispeech: the lists it cuts from a LibriSpeech-style tree and the side-by-side harness, run on
generated speech in its reduced setting (ours and a variant; the original code is not here to run)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import soundfile
import torch

from speakerkit import demo, evaluation, tools
from speakerkit.lists import read_trials

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'exps', 'librispeech'))
import compare  # noqa: E402
from make_lists import make_lists  # noqa: E402


@pytest.fixture(scope='module')
def librispeech_like(tmp_path_factory):
    """6 speakers with one 4 s flac each, as <speaker>/<chapter>/<utt>.flac with numeric ids."""
    root = tmp_path_factory.mktemp('librispeech')
    rng = np.random.default_rng(0)
    for number in range(6):
        speaker = str(100 + number * 7)
        folder = root / speaker / '1'
        folder.mkdir(parents=True)
        audio = demo.synthesize(demo.draw_speaker(rng), demo.draw_session(rng), 4.0, rng)
        soundfile.write(folder / f'{speaker}-1-0000.flac', audio, 16000)
    return root


def test_lists_train_on_the_first_speakers_and_pair_every_part_of_the_others(librispeech_like, tmp_path):
    trials = make_lists(str(librispeech_like), str(tmp_path), train_speakers=4, pieces=3)
    train = (tmp_path / 'train_list.txt').read_text().splitlines()
    assert [line.split()[0] for line in train] == ['100', '107', '114', '121']
    lines = [line.split() for line in (tmp_path / 'trials.txt').read_text().splitlines()]
    assert trials == len(lines) == 15 and sum(label == '1' for label, _, _ in lines) == 2 * 3
    parts = [soundfile.info(str(tmp_path / 'test' / '128' / f'{p}.wav')).frames for p in 'abc']
    assert sum(parts) == soundfile.info(str(librispeech_like / '128' / '1' / '128-1-0000.flac')).frames
    with pytest.raises(ValueError, match='6 speakers .* need more than 6'):
        make_lists(str(librispeech_like), str(tmp_path / 'no'), train_speakers=6)


@pytest.mark.slow
def test_the_harness_trains_scores_every_checkpoint_and_writes_the_table(librispeech_like, tiny_corpus, tmp_path,
                                                                         capsys):
    out = tmp_path / 'compare'
    compare.main(['--reduced', '--only', 'ours', 'speed', '--variant', 'speed', '--speed_perturb on',
                  '--finetune', 'ours', 'speed', '--finetune_control', 'ours', '--corpus', str(librispeech_like),
                  '--train_speakers', '4', '--musan_path', tiny_corpus['musan_path'], '--rir_path',
                  tiny_corpus['rir_path'], '--C', '16', '--batch_size', '2', '--num_frames', '40', '--test_step', '2',
                  '--score_every', '1', '--out', str(out)])
    table = (out / 'table.md').read_text()
    rows = [line for line in table.splitlines() if line.startswith('| ')]
    assert [row.split(' | ')[0][2:] for row in rows] == [
        'system', 'ours', 'ours, average of the last 2 epochs', 'ours, large-margin fine-tuned',
        'ours, continued at the fine-tuning rates (control)', 'speed', 'speed, average of the last 2 epochs',
        'speed, large-margin fine-tuned']
    results = json.loads((out / 'results.json').read_text())['results']
    assert set(results['ours']['1']) == {'1', '2'}
    trials = read_trials(str(out / 'data' / 'trials.txt'))
    encoder = tools.load_model(str(out / 'runs' / 'ours_1' / 'model' / 'model_0002.model'))
    scored = evaluation.evaluate(encoder, [trials], str(out / 'data' / 'test'), 'cpu')[trials.path].metrics
    assert results['ours']['1']['2']['eer'] == pytest.approx(scored.eer)
    speed = json.loads((out / 'runs' / 'speed_1' / 'config.json').read_text())['arguments']
    assert (speed['test_step'], speed['lr_decay_every']) == (1, 2)  # scored every epoch, decaying every 2
    assert speed['speed_perturb'] is True and speed['n_class'] == 12 and speed['seed'] == 1
    tuned = json.loads((out / 'runs' / 'speed_1_finetuned' / 'config.json').read_text())['arguments']
    assert tuned['large_margin'] and tuned['m'] == 0.5 and tuned['num_frames'] == 600 and tuned['speed_perturb'] is True
    assert tuned['initial_model'] == str(out / 'runs' / 'speed_1' / 'model' / 'model_0002.model')
    control = json.loads((out / 'runs' / 'ours_1_continued' / 'config.json').read_text())['arguments']
    assert (control['num_frames'], control['m'], control['spec_augment']) == (40, 0.2, True)  # the recipe's
    assert (control['scheduler'], control['lr'], control['max_epoch']) == ('warmup_exp', 1e-4, 1)  # fine-tuning's
    assert control['initial_model'] == str(out / 'runs' / 'ours_1' / 'model' / 'model_0002.model')
    assert (out / 'eer_by_epoch.png').stat().st_size > 0
    scores = (out / 'runs' / 'ours_1' / 'scores.json').read_text()
    compare.main(['--reduced', '--only', 'ours', '--corpus', str(librispeech_like), '--train_speakers', '4',
                  '--C', '16', '--batch_size', '2', '--num_frames', '40', '--out', str(out)])
    assert (out / 'runs' / 'ours_1' / 'scores.json').read_text() == scores  # nothing trained or scored again
    assert 'trainECAPAModel.py' not in capsys.readouterr().out.split('| system')[1]
    compare.main(['--reduced', '--report', '--runs', '2', '--only', 'ours', 'speed', '--variant', 'speed', '',
                  '--finetune', 'speed', '--corpus', str(librispeech_like), '--out', str(out)])
    assert not (out / 'runs' / 'ours_2').exists()  # nothing trained: each system with the runs it has
    table = (out / 'table.md').read_text()
    rows = [line.split(' | ')[:2] for line in table.splitlines()[2:] if line.startswith('| ')]
    assert 'ours: training to epoch 2, per run: ' in table and 'speed: training to epoch 2, per run: ' in table
    assert rows == [['| ours', '1'], ['| ours, average of the last 2 epochs', '1'], ['| speed', '1'],
                    ['| speed, average of the last 2 epochs', '1'], ['| speed, large-margin fine-tuned', '1']]
    with pytest.raises(SystemExit, match=r"--finetune \['original'\]: only ours and its variants fine-tune"):
        compare.main(['--reduced', '--finetune', 'original', '--corpus', str(librispeech_like), '--train_speakers',
                      '4', '--reference', str(tmp_path), '--out', str(out)])


def test_the_original_runner_names_a_folder_that_is_not_a_checkout(tmp_path):
    runner = os.path.join(ROOT, 'exps', 'librispeech', 'original.py')
    done = subprocess.run([sys.executable, runner, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and 'not a checkout of TaoRuijie/ECAPA-TDNN' in done.stderr


def test_the_original_runner_saves_the_last_epochs_and_passes_on_every_other_flag(tmp_path):
    """original.py --save_last, on a stand-in checkout shaped as the original's: ECAPAModel.train_network
    trains one epoch, trainECAPAModel.py saves every --test_step-th epoch in save_path/model."""
    checkout = tmp_path / 'checkout'
    checkout.mkdir()
    (checkout / 'ECAPAModel.py').write_text(
        'class ECAPAModel:\n'
        '    def train_network(self, epoch, loader):\n'
        '        return 0.0, 0.001, 0.0\n'
        '    def save_parameters(self, path):\n'
        '        open(path, "w").write("weights")\n')
    (checkout / 'trainECAPAModel.py').write_text(
        'import argparse, json, os, sys\n'
        'from ECAPAModel import ECAPAModel\n'
        'parser = argparse.ArgumentParser()\n'
        'for name in ("--max_epoch", "--test_step", "--s"):\n'
        '    parser.add_argument(name, type=int)\n'
        'parser.add_argument("--save_path")\n'
        'args = parser.parse_args()\n'
        'os.makedirs(args.save_path + "/model")\n'
        'json.dump(sys.argv[1:], open(args.save_path + "/argv.json", "w"))\n'
        'model = ECAPAModel()\n'
        'for epoch in range(1, args.max_epoch + 1):\n'
        '    model.train_network(epoch=epoch, loader=None)\n'
        '    if epoch % args.test_step == 0:\n'
        '        model.save_parameters(args.save_path + "/model/model_%04d.model" % epoch)\n')
    runner = os.path.join(ROOT, 'exps', 'librispeech', 'original.py')
    run = tmp_path / 'run'
    flags = ['--max_epoch', '7', '--test_step', '3', '--s', '3', '--save_path', str(run)]  # --s: no abbreviation
    done = subprocess.run([sys.executable, runner, str(checkout), '--save_last', '3'] + flags, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(run / 'model')) == [f'model_000{epoch}.model' for epoch in (3, 5, 6, 7)]
    assert json.loads((run / 'argv.json').read_text()) == flags


def test_the_originals_last_epochs_are_averaged_only_when_all_were_saved(tmp_path):
    (tmp_path / 'model').mkdir()
    args = types.SimpleNamespace(max_epoch=6, average=2)
    for epoch in (3, 5, 6):
        torch.save({'speaker_encoder.w': torch.full((2,), float(epoch))}, compare.checkpoint(str(tmp_path), epoch))
    compare.average_last_epochs(args, str(tmp_path))
    mean = torch.load(compare.checkpoint(str(tmp_path), 'average'))
    assert torch.equal(mean['speaker_encoder.w'], torch.full((2,), 5.5))
    os.remove(compare.checkpoint(str(tmp_path), 'average'))
    compare.average_last_epochs(types.SimpleNamespace(max_epoch=6, average=3), str(tmp_path))  # epoch 4 is missing
    assert not os.path.exists(compare.checkpoint(str(tmp_path), 'average'))


def test_late_swings_are_each_runs_worst_second_half_eer_over_its_last():
    def run(eers):
        return {epoch: {'eer': eer} for epoch, eer in eers.items()}
    results = {'blip': {1: run({10: 40.0, 35: 9.0, 40: 12.0, 60: 6.0}), 2: run({10: 30.0, 45: 5.5, 60: 5.0})},
               'blip, average of the last 5 epochs': {1: run({60: 4.0}), 2: run({60: 4.5})},
               'clip': {1: run({30: 20.0, 50: 10.0, 60: 0.0})},  # epoch 30 is not after it
               'ours': {1: run({30: 20.0, 60: 10.0})}}  # once after epoch 30: no line
    assert compare.late_swings(results, 60) == [
        '\nblip: worst EER after epoch 30 over the EER at epoch 60, per run: 2.00, 1.10.',  # 12 / 6, 5.5 / 5
        '\nclip: worst EER after epoch 30 over the EER at epoch 60, per run: inf.']


def test_training_costs_are_each_finished_runs_minutes_crops_and_rate(tmp_path):
    def write(folder, records):
        os.makedirs(tmp_path / 'runs' / folder)
        with open(tmp_path / 'runs' / folder / 'metrics.jsonl', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in records)

    def epoch(n, crops, seconds):
        return {'epoch': n, 'crops_per_s': crops / seconds, 'train_seconds': seconds, 'epoch_seconds': seconds + 6}
    write('blip_1', [epoch(1, 2000, 54), epoch(2, 2000, 54), epoch(3, 2000, 54)])  # epoch 3 is past the last
    write('blip_2', [epoch(1, 4000, 100), epoch(2, 4000, 100)])
    write('clip_1', [epoch(1, 2000, 50)])  # unfinished: no line
    args = types.SimpleNamespace(out=str(tmp_path), runs=2)
    assert compare.training_costs(args, ['blip', 'clip'], 2) == [
        '\nblip: training to epoch 2, per run: 2.0 min, 4.0 k crops at 37.0/s; 3.5 min, 8.0 k crops at 40.0/s.']
