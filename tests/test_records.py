"""records.py: the score.txt line, metrics.jsonl records and what a resumed run forgets."""

import argparse
import json

import numpy as np
import pytest

from speakerkit.errors import UserError
from speakerkit.lists import TrialList
from speakerkit.records import EpochRecord, append_metrics, changed_flags, forget_epochs_after, read_metrics, score_line
from speakerkit.evaluation import ListResult
from speakerkit.metrics import verification_metrics


def result(name, labels=True, snorm=False):
    scores = np.array([0.9, 0.2, 0.4, 0.1])
    trials = TrialList(name, np.array([1, 0, 1, 0]) if labels else None, list('abcd'), list('efgh'), [1, 2, 3, 4],
                       name.split('/')[-1])
    found = ListResult(trials, scores, verification_metrics(scores, trials.labels) if labels else None)
    if snorm:
        found.snorm_scores = scores * 2
        found.snorm_metrics = verification_metrics(found.snorm_scores, trials.labels)
    return found


def test_score_line_has_the_original_format_and_one_part_per_list():
    record = EpochRecord(epoch=3, loss=1.5, accuracy=62.5, lr=0.00097, margin=0.2, crops_per_s=10.0, bad_steps=0,
                         skipped_files=0, train_seconds=4.0)
    one = {'l/veri.txt': result('l/veri.txt')}
    assert score_line(record, one, 0.0) == ('3 epoch, LR 0.000970, LOSS 1.500000, ACC 62.50%, EER 0.00%, '
                                            'minDCF(0.05) 0.0000, minDCF(0.01) 0.0000, bestEER 0.00%')
    two = {'l/veri.txt': result('l/veri.txt', snorm=True), 'l/blind.txt': result('l/blind.txt', labels=False)}
    line = score_line(record, two, 1.25)
    assert ', veri.txt EER 0.00%, minDCF(0.05) 0.0000, minDCF(0.01) 0.0000, AS-Norm EER 0.00%' in line
    assert line.endswith(', blind.txt 4 trials scored (no labels), bestEER 1.25%')


def test_metrics_records_hold_each_lists_metrics(tmp_path):
    record = EpochRecord(epoch=1, loss=1.5, accuracy=62.5, lr=0.001, margin=0.2, crops_per_s=10.0, bad_steps=0,
                         skipped_files=2, train_seconds=4.0, epoch_seconds=5.0)
    record.add_results({'l/veri.txt': result('l/veri.txt', snorm=True), 'l/blind.txt': result('l/blind.txt', False)})
    append_metrics(tmp_path / 'metrics.jsonl', record)
    append_metrics(tmp_path / 'metrics.jsonl', EpochRecord(epoch=2, loss=1.0, accuracy=70.0, lr=0.001, margin=0.2,
                                                           crops_per_s=10.0, bad_steps=0, skipped_files=0,
                                                           train_seconds=4.0))
    first, second = read_metrics(tmp_path / 'metrics.jsonl')
    assert first['eval'] == {'veri.txt': {'metrics': {'eer': 0.0, 'min_dcf_0.05': 0.0, 'min_dcf_0.01': 0.0},
                                          'snorm_metrics': {'eer': 0.0, 'min_dcf_0.05': 0.0, 'min_dcf_0.01': 0.0}},
                             'blind.txt': {'metrics': None}}
    assert first['skipped_files'] == 2 and 'peak_gpu_memory_gib' not in first
    assert 'eval' not in second and second['epoch'] == 2


def test_resume_forgets_epochs_logged_after_the_resume_state(tmp_path):
    score, metrics = tmp_path / 'score.txt', tmp_path / 'metrics.jsonl'
    score.write_text(''.join(f'{e} epoch, LR 0.001\n' for e in (1, 2, 3)))
    metrics.write_text(''.join(json.dumps({'epoch': e}) + '\n' for e in (1, 2, 3)))
    forget_epochs_after(2, score, metrics)
    assert score.read_text().splitlines() == ['1 epoch, LR 0.001', '2 epoch, LR 0.001']
    assert [r['epoch'] for r in read_metrics(metrics)] == [1, 2]


def test_an_unreadable_score_line_is_named_on_resume(tmp_path):
    score = tmp_path / 'score.txt'
    score.write_text('1 epoch, LR 0.001\nnotes I added\n')
    with pytest.raises(UserError, match=r"score.txt:2: expected '<epoch> epoch, \.\.\.', got 'notes I added'"):
        forget_epochs_after(1, score, tmp_path / 'metrics.jsonl')
    assert score.read_text() == '1 epoch, LR 0.001\nnotes I added\n'


def test_a_last_log_line_cut_short_by_a_crash_is_dropped_and_other_bad_lines_are_named(tmp_path):
    score, metrics = tmp_path / 'score.txt', tmp_path / 'metrics.jsonl'
    score.write_text('1 epoch, LR 0.001\n2 epoch, LR 0.001\n1')  # "1" of "12 epoch, ..." cut short
    metrics.write_text(json.dumps({'epoch': 1}) + '\n' + json.dumps({'epoch': 2})[:5])
    assert [r['epoch'] for r in read_metrics(metrics)] == [1]
    forget_epochs_after(2, score, metrics)
    assert score.read_text() == '1 epoch, LR 0.001\n2 epoch, LR 0.001\n'
    assert metrics.read_text() == json.dumps({'epoch': 1}) + '\n'
    metrics.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: expected one JSON object a line, got '\{\"epo'"):
        read_metrics(metrics)


def test_a_switch_recorded_as_on_or_off_by_an_older_version_compares_as_its_boolean():
    now = argparse.Namespace(spec_augment=True, speed_perturb=False, skip_silent=False, lr=0.001, eval_list=['t.txt'])
    recorded = {'spec_augment': 'on', 'speed_perturb': 'off', 'skip_silent': 'on', 'lr': 0.001,
                'eval_list': ['t.txt']}
    assert changed_flags(recorded, now) == {'skip_silent': ('on', False)}
    assert changed_flags(recorded | {'skip_silent': False, 'lr': 0.01}, now) == {'lr': (0.01, 0.001)}
