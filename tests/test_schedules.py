import argparse
import json

import pytest

import trainECAPAModel
from records import forget_epochs_after, read_metrics
from schedules import margin, step_lr, training_schedule, warmup_exp
from test_cli import tiny_args


def test_step_lr_is_the_original_steplr():
    assert step_lr(0.001, 0.97, 1, 1) == 0.001
    assert step_lr(0.001, 0.97, 1, 3) == pytest.approx(0.001 * 0.97 ** 2)
    assert [step_lr(1.0, 0.5, 2, e) for e in (1, 2, 3, 4, 5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_warmup_exp_warms_up_linearly_then_decays_to_the_final_lr():
    def lr(epoch, step):
        return warmup_exp(0.1, 1e-4, 2, 10, epoch, step, 50)
    assert lr(1, 1) == pytest.approx(0.1 / 100)                       # 1 of 100 warm-up steps
    assert lr(1, 50) == pytest.approx(0.1 * 1e-3 ** (49 / 499) * 0.5)  # half way through the warm-up
    assert lr(3, 1) == pytest.approx(0.1 * 1e-3 ** (100 / 499))       # warm-up over, decay only
    assert lr(10, 50) == pytest.approx(1e-4)                           # the last step
    values = [lr(e, s) for e in range(1, 11) for s in range(1, 51)]
    assert values[0] < values[9] < values[49]
    assert all(a > b for a, b in zip(values[99:], values[100:]))
    assert warmup_exp(0.1, 1e-4, 0, 10, 1, 1, 50) == pytest.approx(0.1)


def test_margin_rises_linearly_between_its_epochs():
    def at(epoch, step):
        return margin(0.2, 3, 5, epoch, step, 10)
    assert at(1, 1) == at(2, 10) == at(3, 1) == 0.0
    assert at(4, 1) == pytest.approx(0.1)
    assert at(4, 6) == pytest.approx(0.2 * 1.5 / 2)
    assert at(5, 1) == at(9, 7) == pytest.approx(0.2)
    assert margin(0.2, 2, 2, 1, 10, 10) == 0.0 and margin(0.2, 2, 2, 2, 1, 10) == 0.2


def test_training_schedule_combines_the_flags():
    args = argparse.Namespace(scheduler='step', lr=0.001, lr_decay=0.97, test_step=1, m=0.2, margin_schedule=None,
                              final_lr=5e-5, warmup_epochs=6, max_epoch=80)
    assert training_schedule(args, 100)(2, 7) == (pytest.approx(0.00097), 0.2)
    args.scheduler, args.margin_schedule = 'warmup_exp', [1, 3]
    lr, m = training_schedule(args, 100)(2, 1)
    assert lr == pytest.approx(warmup_exp(0.001, 5e-5, 6, 80, 2, 1, 100)) and m == pytest.approx(0.1)


def test_run_writes_config_and_metrics_records(tiny_corpus, tmp_path, cache_dir):
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '2', '--scheduler', 'warmup_exp',
                                   '--warmup_epochs', '1', '--margin_schedule', '1', '3'))
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['arguments']['scheduler'] == 'warmup_exp' and config['arguments']['max_epoch'] == 2
    assert '--margin_schedule' not in config['arguments'] and 'margin_schedule' in config['given_on_command_line']
    assert config['torch'] and config['device'] == 'cpu' and config['processes'] == 1
    assert config['git_commit'] is None or len(config['git_commit'].split('-')[0]) == 40
    records = read_metrics(tmp_path / 'metrics.jsonl')
    assert [r['epoch'] for r in records] == [1, 2]
    assert 0 < records[0]['margin'] < records[1]['margin'] < 0.2
    assert records[1]['lr'] == pytest.approx(5e-5)
    assert all(r['crops_per_s'] > 0 and r['epoch_seconds'] >= r['train_seconds'] > 0 for r in records)
    plots = {p.name for p in (tmp_path / 'plots').iterdir()}
    assert plots == {'training_curve.png', 'trials_det.png', 'trials_scores.png'}
    lines = (tmp_path / 'score.txt').read_text().splitlines()
    for record, line in zip(records, lines):
        metrics = next(iter(record['eval'].values()))['metrics']
        assert f"EER {metrics['eer']:2.2f}%" in line and f"LOSS {record['loss']:f}" in line


def test_resume_forgets_epochs_logged_after_the_resume_state(tmp_path):
    score, metrics = tmp_path / 'score.txt', tmp_path / 'metrics.jsonl'
    score.write_text(''.join(f'{e} epoch, LR 0.001\n' for e in (1, 2, 3)))
    metrics.write_text(''.join(json.dumps({'epoch': e}) + '\n' for e in (1, 2, 3)))
    forget_epochs_after(2, score, metrics)
    assert score.read_text().splitlines() == ['1 epoch, LR 0.001', '2 epoch, LR 0.001']
    assert [r['epoch'] for r in read_metrics(metrics)] == [1, 2]


def test_large_margin_sets_longer_crops_a_larger_margin_and_a_low_lr(tmp_path):
    checkpoint = tmp_path / 'model.model'
    checkpoint.write_bytes(b'')
    args = trainECAPAModel.parse_args(['--demo', '--large_margin', '--initial_model', str(checkpoint),
                                       '--save_path', str(tmp_path)])
    assert (args.num_frames, args.m, args.max_epoch) == (600, 0.5, 5)
    assert (args.scheduler, args.lr, args.final_lr, args.spec_augment) == ('warmup_exp', 1e-4, 2.5e-5, 'off')
    args = trainECAPAModel.parse_args(['--demo', '--large_margin', '--initial_model', str(checkpoint), '--m', '0.4',
                                       '--save_path', str(tmp_path)])
    assert args.m == 0.4 and args.num_frames == 600
    with pytest.raises(SystemExit):
        trainECAPAModel.parse_args(['--demo', '--large_margin', '--save_path', str(tmp_path)])


def test_large_margin_fine_tunes_a_trained_model(tiny_corpus, tmp_path, cache_dir):
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path / 'first', cache_dir, '--max_epoch', '1'))
    checkpoint = str(tmp_path / 'first' / 'model' / 'model_0001.model')
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path / 'lm', cache_dir, '--large_margin', '--initial_model',
                                   checkpoint, '--max_epoch', '2', '--num_frames', '60'))
    records = read_metrics(tmp_path / 'lm' / 'metrics.jsonl')
    assert [r['margin'] for r in records] == [0.5, 0.5]
    steps = 36 // 8  # 6 speakers x 6 utterances in batches of 8
    assert records[0]['lr'] == pytest.approx(warmup_exp(1e-4, 2.5e-5, 1, 2, 1, steps, steps))
    assert records[1]['lr'] == pytest.approx(2.5e-5)
    config = json.loads((tmp_path / 'lm' / 'config.json').read_text())
    assert config['arguments']['large_margin'] and config['arguments']['initial_model'] == checkpoint


def test_tensorboard_holds_the_metrics_records(tiny_corpus, tmp_path, cache_dir):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '2', '--tensorboard'))
    events = EventAccumulator(str(tmp_path / 'tensorboard'))
    events.Reload()
    records = read_metrics(tmp_path / 'metrics.jsonl')
    assert [e.step for e in events.Scalars('train/loss')] == [1, 2]
    assert [e.value for e in events.Scalars('train/loss')] == pytest.approx([r['loss'] for r in records])
    assert [e.value for e in events.Scalars('trials.txt/metrics/eer')] == pytest.approx(
        [r['eval']['trials.txt']['metrics']['eer'] for r in records])


def test_an_unreadable_score_line_is_named_on_resume(tmp_path):
    score = tmp_path / 'score.txt'
    score.write_text('1 epoch, LR 0.001\nnotes I added\n')
    with pytest.raises(SystemExit, match=r"score.txt:2: expected '<epoch> epoch, \.\.\.', got 'notes I added'"):
        forget_epochs_after(1, score, tmp_path / 'metrics.jsonl')
    assert score.read_text() == '1 epoch, LR 0.001\nnotes I added\n'
