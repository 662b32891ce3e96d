"""lists.py: every list format through one line reader; a bad line is an error naming its file and line."""

import numpy as np
import pytest

from errors import UserError
from lists import (TrainEntry, TrialList, cohort_entries, distinct_names, files_under, read_path_list,
                   read_score_file, read_train_list, read_trials, require_files, speaker_labels, without_repeats,
                   write_score_file)


def test_a_byte_order_mark_crlf_endings_and_blank_lines_change_nothing(tmp_path):
    plain, odd = tmp_path / 'plain.txt', tmp_path / 'odd.txt'
    plain.write_bytes(b'id1 id1/a/1.wav\nid2 id2/b/1.wav\n')
    odd.write_bytes(b'\xef\xbb\xbfid1 id1/a/1.wav\r\n\r\n  \nid2 id2/b/1.wav\r\n')
    assert [e[:2] for e in read_train_list(str(odd))] == [e[:2] for e in read_train_list(str(plain))] == [
        ('id1', 'id1/a/1.wav'), ('id2', 'id2/b/1.wav')]
    assert [e.line for e in read_train_list(str(odd))] == [1, 4]
    assert speaker_labels(read_train_list(str(odd))) == {'id1': 0, 'id2': 1}


@pytest.mark.parametrize('reader', [read_train_list, read_trials, read_path_list, read_score_file])
def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path, reader):
    path = tmp_path / 'list.txt'
    path.write_bytes(b'\n\xff\xfe a b 1\n')
    with pytest.raises(UserError, match=r'list.txt:2: the .* is not UTF-8 text'):
        reader(str(path))


@pytest.mark.parametrize('reader,text,line', [
    (read_train_list, 'id1 id1/a/1.wav\nid2\n', 2),
    (read_trials, '1 a.wav b.wav\nyes a.wav c.wav\n', 2),
    (read_trials, '1 a b\nc d\n', 2),                  # labelled and unlabelled lines mixed
    (read_score_file, 'a b 0.5 1\na c high 0\n', 2),
    (read_score_file, 'a b 0.5 1\na c nan 0\n', 2),
    (read_score_file, 'a b 0.5 2\n', 1),
])
def test_a_malformed_line_is_named(tmp_path, reader, text, line):
    path = tmp_path / 'veri_test2.txt'
    path.write_text(text)
    with pytest.raises(UserError, match=rf'veri_test2.txt:{line}: expected'):
        reader(str(path))


@pytest.mark.parametrize('reader', [read_train_list, read_trials, read_score_file])
def test_an_empty_or_missing_list_is_an_error(tmp_path, reader):
    (tmp_path / 'empty.txt').write_text('\n\n')
    with pytest.raises(UserError, match='empty.txt: '):
        reader(str(tmp_path / 'empty.txt'))
    with pytest.raises(UserError, match='missing.txt: cannot read the .*: No such file'):
        reader(str(tmp_path / 'missing.txt'))


def test_trial_lists_with_and_without_labels(tmp_path):
    path = tmp_path / 'trials.txt'
    path.write_text('1 a.wav b.wav\n\n0 a.wav c.wav\n')
    trials = read_trials(str(path))
    assert trials.name == 'trials.txt' and trials.labels.tolist() == [1, 0]
    assert trials.enroll == ['a.wav', 'a.wav'] and trials.test == ['b.wav', 'c.wav'] and trials.lines == [1, 3]
    assert trials.references() == {'a.wav': 1, 'b.wav': 1, 'c.wav': 3}
    path.write_text('a.wav b.wav\n')
    assert read_trials(str(path)).labels is None


@pytest.mark.parametrize('reader,text', [(read_trials, '1 a.wav b.wav\n1 a.wav c.wav\n'),
                                         (read_score_file, 'a.wav b.wav 0.5 0\na.wav c.wav 0.1 0\n')])
def test_labels_of_one_class_only_are_an_error(tmp_path, reader, text):
    (tmp_path / 'one_class.txt').write_text(text)
    with pytest.raises(UserError, match=r'one_class.txt: every trial has label [01]; EER and minDCF need target '
                                        r'\(1\) and non-target \(0\) trials'):
        reader(str(tmp_path / 'one_class.txt'))


def test_repeated_training_lines_are_left_out_and_a_file_of_two_speakers_is_an_error(tmp_path):
    path = tmp_path / 'train.txt'
    path.write_text('a a/1.wav\nb b/1.wav\na a/1.wav\na a/2.wav\n')
    kept, repeats = without_repeats(read_train_list(str(path)), str(path))
    assert [(e.speaker, e.path, e.line) for e in kept] == [('a', 'a/1.wav', 1), ('b', 'b/1.wav', 2),
                                                           ('a', 'a/2.wav', 4)] and repeats == 1
    path.write_text('a a/1.wav\nb a/1.wav\n')
    with pytest.raises(UserError, match=r'train.txt:2: a/1.wav is listed under speaker b here and under a on line 1'):
        without_repeats(read_train_list(str(path)), str(path))


def test_lists_of_one_file_name_get_distinct_output_names():
    lists = [TrialList(path, None, [], [], [], path.split('/')[-1])
             for path in ('/data/vox1/O/trials.txt', '/data/vox1/E/trials.txt', '/data/vox1/veri_test2.txt')]
    assert [t.name for t in distinct_names(lists)] == ['O_trials.txt', 'E_trials.txt', 'veri_test2.txt']
    assert [t.path for t in distinct_names(lists)] == [t.path for t in lists]


def test_score_files_round_trip(tmp_path):
    path = tmp_path / 'scores.txt'
    write_score_file(str(path), ['a', 'b'], ['c', 'd'], np.array([0.25, -1.5]), np.array([1, 0]))
    assert path.read_text() == 'a c 0.250000 1\nb d -1.500000 0\n'
    scores, labels = read_score_file(str(path))
    assert scores.tolist() == [0.25, -1.5] and labels.tolist() == [1, 0]


def test_path_lists_take_the_last_field_and_folders_their_audio_files(tmp_path):
    path = tmp_path / 'files.txt'
    path.write_text('id1 id1/a.wav\n\nid1/b.flac\nid1 id1/a.wav\n')
    assert read_path_list(str(path)) == {'id1/a.wav': 1, 'id1/b.flac': 3}
    for rel in ('s/a.wav', 's/v/b.FLAC', 's/notes.txt'):
        (tmp_path / 'tree' / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'tree' / rel).write_bytes(b'')
    assert files_under(str(tmp_path / 'tree')) == ['s/a.wav', 's/v/b.FLAC']


def test_missing_files_are_named_with_their_lines(tmp_path):
    (tmp_path / 'here.wav').write_bytes(b'')
    require_files({'here.wav': 1}, str(tmp_path), 'list.txt')
    with pytest.raises(UserError, match=r'^list.txt: 2 files not under .*, e.g. list.txt:4: gone.wav; list.txt:9: '
                                        r'away.wav$'):
        require_files({'here.wav': 1, 'gone.wav': 4, 'away.wav': 9}, str(tmp_path), 'list.txt')


def test_cohort_entries_spread_over_speakers():
    entries = [TrainEntry(f's{i % 5}', f'u{i}') for i in range(50)]
    chosen = cohort_entries(entries, 12, seed=1)
    assert len(chosen) == 12 and len(set(chosen)) == 12
    counts = [sum(1 for e in chosen if e.speaker == f's{k}') for k in range(5)]
    assert max(counts) - min(counts) <= 1
    assert cohort_entries(entries, 0, seed=1) == entries
