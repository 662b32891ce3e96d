"""lists.py: every list format through one line reader; a bad line is an error naming its file and line."""

import numpy as np
import pytest

from speakerkit.errors import UserError
from speakerkit.lists import (TrainEntry, TrainList, TrialList, cohort_entries, distinct_names, files_under,
                              read_path_list, read_score_file, read_train_list, read_trials, require_files,
                              without_repeats, write_score_file)


def test_a_byte_order_mark_crlf_endings_and_blank_lines_change_nothing(tmp_path):
    plain, odd = tmp_path / 'plain.txt', tmp_path / 'odd.txt'
    plain.write_bytes(b'id1 id1/a/1.wav\nid2 id2/b/1.wav\n')
    odd.write_bytes(b'\xef\xbb\xbfid1 id1/a/1.wav\r\n\r\n  \nid2 id2/b/1.wav\r\n')
    assert [e[:2] for e in read_train_list(str(odd))] == [e[:2] for e in read_train_list(str(plain))] == [
        ('id1', 'id1/a/1.wav'), ('id2', 'id2/b/1.wav')]
    assert [e.line for e in read_train_list(str(odd))] == [1, 4]
    train_list = read_train_list(str(odd))
    assert train_list.speakers.tolist() == ['id1', 'id2'] and train_list.labels.tolist() == [0, 1]


def test_a_train_list_holds_its_entries_in_arrays_labelled_in_sorted_speaker_order(tmp_path):
    path = tmp_path / 'train.txt'
    path.write_text('id2 id2/v/1.wav\nid10 id10/v/é.wav\n\nid2 id2/w/2.wav\n')
    train_list = read_train_list(str(path))
    assert train_list.speakers.tolist() == ['id10', 'id2'] and train_list.labels.tolist() == [1, 0, 1]
    assert list(train_list) == [TrainEntry('id2', 'id2/v/1.wav', 1), TrainEntry('id10', 'id10/v/é.wav', 2),
                                TrainEntry('id2', 'id2/w/2.wav', 4)]
    assert list(train_list.paths) == ['id2/v/1.wav', 'id10/v/é.wav', 'id2/w/2.wav']
    order, starts = train_list.by_label()
    assert [order[starts[k]:starts[k + 1]].tolist() for k in range(2)] == [[1], [0, 2]]
    assert all(isinstance(column, np.ndarray) for column in (train_list.labels, train_list.path_bytes,
                                                             train_list.path_ends, train_list.lines))
    assert list(train_list.take([2, 0])) == [train_list[2], train_list[0]]


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
    (read_trials, 'a b target\n1 a c\n', 2),          # Kaldi's form and VoxCeleb's mixed
    (read_trials, 'a b target\na c impostor\n', 2),
    (read_score_file, 'a b 0.5 target\na c 0.1 impostor\n', 2),
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
    assert read_trials(str(path)).labels is None and not read_trials(str(path)).kaldi


def test_kaldi_trial_lists_read_as_the_voxceleb_form_and_their_score_files_as_wespeaker_writes_them(tmp_path):
    voxceleb, kaldi = tmp_path / 'veri_test2.txt', tmp_path / 'vox1_O_cleaned.kaldi'
    voxceleb.write_text('1 id1/a/1.wav id1/b/2.wav\n0 id1/a/1.wav id2/c/3.wav\n')
    kaldi.write_text('id1/a/1.wav id1/b/2.wav target\nid1/a/1.wav id2/c/3.wav nontarget\n')  # wespeaker's form
    ours, theirs = read_trials(str(voxceleb)), read_trials(str(kaldi))
    assert theirs.kaldi and not ours.kaldi
    assert (theirs.enroll, theirs.test, theirs.labels.tolist()) == (ours.enroll, ours.test, ours.labels.tolist())
    scores = tmp_path / 'vox1_O_cleaned.kaldi.score'
    write_score_file(str(scores), theirs.enroll, theirs.test, np.array([0.5, -0.25]), theirs.labels, theirs.kaldi)
    assert scores.read_text() == ('id1/a/1.wav id1/b/2.wav 0.500000 target\n'
                                  'id1/a/1.wav id2/c/3.wav -0.250000 nontarget\n')
    read_back, labels = read_score_file(str(scores))
    assert read_back.tolist() == [0.5, -0.25] and labels.tolist() == [1, 0]
    # what wespeaker's compute_metrics takes from each line: the third token, and whether the last is 'target'
    tokens = [line.split() for line in scores.read_text().splitlines()]
    assert [(float(t[2]), t[-1] == 'target') for t in tokens] == [(0.5, True), (-0.25, False)]


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
    kept, repeats = without_repeats(read_train_list(str(path)))
    assert [(e.speaker, e.path, e.line) for e in kept] == [('a', 'a/1.wav', 1), ('b', 'b/1.wav', 2),
                                                           ('a', 'a/2.wav', 4)] and repeats == 1
    path.write_text('a a/1.wav\nb a/1.wav\n')
    with pytest.raises(UserError, match=r'train.txt:2: a/1.wav is listed under speaker b here and under a on line 1'):
        without_repeats(read_train_list(str(path)))


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


def test_path_lists_take_each_audio_field_or_the_last_and_folders_their_audio_files(tmp_path):
    path = tmp_path / 'files.txt'
    path.write_text('id1 id1/a.wav\n\nid1/b.flac\nid1 id1/a.wav\nid2/c\n')
    assert read_path_list(str(path)) == {'id1/a.wav': 1, 'id1/b.flac': 3, 'id2/c': 5}
    trials = tmp_path / 'trials.txt'  # files that only enrol are embedded too
    trials.write_text('1 e/1.wav t/1.wav\n0 e/1.wav t/2.WAV\ne/3.m4a t/1.wav\ne/4.wav t/3.wav target\n')
    assert list(read_path_list(str(trials))) == ['e/1.wav', 't/1.wav', 't/2.WAV', 'e/3.m4a', 'e/4.wav', 't/3.wav']
    for rel in ('s/a.wav', 's/v/b.FLAC', 's/notes.txt'):
        (tmp_path / 'tree' / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'tree' / rel).write_bytes(b'')
    assert files_under(str(tmp_path / 'tree')) == ['s/a.wav', 's/v/b.FLAC']


def test_folders_linked_in_are_listed_and_a_link_loop_is_entered_once(tmp_path):
    (tmp_path / 'data' / 'id1').mkdir(parents=True)
    (tmp_path / 'data' / 'id1' / 'a.wav').write_bytes(b'')
    (tmp_path / 'tree').mkdir()
    (tmp_path / 'tree' / 'wav').symlink_to(tmp_path / 'data')    # a dataset linked into place
    (tmp_path / 'data' / 'id1' / 'up').symlink_to(tmp_path / 'data')  # a loop back up
    (tmp_path / 'tree' / 'gone').symlink_to(tmp_path / 'nowhere')  # a dangling link
    assert files_under(str(tmp_path / 'tree')) == ['wav/id1/a.wav']
    (tmp_path / 'data' / 'loop.wav').symlink_to(tmp_path / 'data' / 'loop.wav')
    with pytest.raises(UserError, match=r'list.txt: 1 files not under .*, e.g. list.txt:2: loop.wav$'):
        require_files(['id1/a.wav', 'loop.wav'], [1, 2], str(tmp_path / 'data'), 'list.txt')


def test_missing_files_are_named_with_their_lines(tmp_path):
    (tmp_path / 'here.wav').write_bytes(b'')
    require_files(['here.wav'], [1], str(tmp_path), 'list.txt')
    with pytest.raises(UserError, match=r'^list.txt: 2 files not under .*, e.g. list.txt:4: gone.wav; list.txt:9: '
                                        r'away.wav$'):
        require_files(['here.wav', 'gone.wav', 'away.wav'], [1, 4, 9], str(tmp_path), 'list.txt')
    many = [f'{i}.wav' for i in range(10000)]  # more than one thread's share
    with pytest.raises(UserError, match=r'^list.txt: 10000 files not under .*, e.g. 0.wav; 1.wav; 2.wav$'):
        require_files(many, None, str(tmp_path), 'list.txt')


def round_robin_cohort(entries, size, seed):
    """The cohort's definition, one entry at a time: speakers in the order a seeded permutation meets them,
    their first utterance in it, then their second, ..."""
    by_speaker = {}
    for i in np.random.default_rng(seed).permutation(len(entries)):
        by_speaker.setdefault(entries[i].speaker, []).append(entries[i])
    chosen, depth = [], 0
    while len(chosen) < size:
        chosen.extend(utts[depth] for utts in by_speaker.values() if depth < len(utts))
        depth += 1
    return chosen[:size]


def test_cohort_entries_spread_over_speakers():
    entries = TrainList.of([TrainEntry(f's{i % 5}', f'u{i}') for i in range(50)])
    chosen = cohort_entries(entries, 12, seed=1)
    assert len(chosen) == 12 and len(set(chosen)) == 12
    counts = [sum(1 for e in chosen if e.speaker == f's{k}') for k in range(5)]
    assert max(counts) - min(counts) <= 1
    assert cohort_entries(entries, 0, seed=1) == list(entries)
    uneven = TrainList.of([TrainEntry(f's{i * i % 7}', f'u{i}') for i in range(60)])
    for size in (1, 5, 13, 40):
        assert cohort_entries(uneven, size, seed=3) == round_robin_cohort(list(uneven), size, seed=3)


def test_a_kaldi_data_folder_reads_as_the_training_list_it_describes(tmp_path):
    folder = tmp_path / 'train'
    folder.mkdir()
    (folder / 'wav.scp').write_text('u1 /data/a/1.wav\nu2 b/2.wav\n\nu3 /data/a/3.wav\n')
    (folder / 'utt2spk').write_text('u2 spkB\nu1 spkA\nu3 spkA\n')
    data = read_train_list(str(folder))
    assert [tuple(entry) for entry in data] == [('spkA', '/data/a/1.wav', 1), ('spkB', 'b/2.wav', 2),
                                                ('spkA', '/data/a/3.wav', 4)]
    assert data.source == str(folder / 'wav.scp') and data.speakers.tolist() == ['spkA', 'spkB']
    scp, utt2spk = str(folder / 'wav.scp'), str(folder / 'utt2spk')
    for files, speakers, error in (
            ('u1 sox a.flac -t wav - |\n', 'u1 s\n', f"{scp}:1: expected '<utterance> <audio path>' (a command"),
            ('u1 a.wav\nu1 b.wav\n', 'u1 s\n', f'{scp}:2: utterance u1 is named again (first on line 1)'),
            ('u1 a.wav\nu2 b.wav\n', 'u1 s\n', f'{scp}:2: utterance u2 has no speaker in {utt2spk}'),
            ('u1 a.wav\n', 'u1 s\nu9 s\n', f'{utt2spk}:2: utterance u9 is not in {scp}')):
        (folder / 'wav.scp').write_text(files)
        (folder / 'utt2spk').write_text(speakers)
        with pytest.raises(UserError) as raised:
            read_train_list(str(folder))
        assert str(raised.value).startswith(error), raised.value
