"""Bad input: unusable training files are skipped, counted and replaced; --check_data finds them first; a
non-finite run stops with a message; a mismatched --initial_model is an error listing the keys."""

import json
import os

import numpy as np
import pytest
import soundfile
import torch

import trainECAPAModel
from conftest import shared_data
from dataLoader import PairDataset, TrainDataset, UnusableAudio, collate, read_usable_crop
from test_cli import tiny_args

BROKEN = {  # file name -> (how to write it, word the skip reason must contain)
    'garbage.wav': (lambda p: open(p, 'wb').write(b'RIFF\x00\x00not audio at all' * 10), 'unreadable'),
    'empty.wav': (lambda p: soundfile.write(p, np.zeros(0, np.float32), 16000), 'shorter'),
    'short.wav': (lambda p: soundfile.write(p, np.full(100, 0.1, np.float32), 16000), 'shorter'),
    'nan.wav': (lambda p: soundfile.write(p, np.full(16000, np.nan, np.float32), 16000, subtype='FLOAT'),
                'NaN'),
    'silent.wav': (lambda p: soundfile.write(p, np.zeros(16000, np.float32), 16000), 'silent'),
}


@pytest.fixture
def broken_corpus(tiny_corpus, tmp_path):
    """The tiny corpus's training files and, listed under its first speaker, one file of each BROKEN kind
    and a stereo file; the list's line numbers of the broken files."""
    root = tmp_path / 'train'
    root.mkdir()
    for speaker in os.listdir(tiny_corpus['train_path']):
        os.symlink(os.path.join(tiny_corpus['train_path'], speaker), root / speaker)
    (root / 'bad').mkdir()
    lines = open(tiny_corpus['train_list']).read().splitlines()
    first_speaker = lines[0].split()[0]
    numbers = {}
    for name, (write, _) in BROKEN.items():
        write(str(root / 'bad' / name))
        lines.insert(2, f'{first_speaker} bad/{name}')
    stereo = np.random.default_rng(0).standard_normal((24000, 2)).astype(np.float32) * 0.1
    soundfile.write(root / 'bad' / 'stereo.wav', stereo, 16000)
    lines.append(f'{first_speaker} bad/stereo.wav')
    for number, line in enumerate(lines, start=1):
        if line.split()[1].startswith('bad/') and line.split()[1] != 'bad/stereo.wav':
            numbers[line.split()[1][4:]] = number
    train_list = tmp_path / 'train_list.txt'
    train_list.write_text('\n'.join(lines) + '\n')
    return dict(tiny_corpus, train_list=str(train_list), train_path=str(root)), numbers


def entries_of(corpus):
    return [tuple(line.split()) for line in open(corpus['train_list']) if line.strip()]


def test_each_kind_of_unusable_file_is_refused_with_its_reason(tmp_path):
    rng = np.random.default_rng(0)
    for name, (write, reason) in BROKEN.items():
        write(str(tmp_path / name))
        with pytest.raises(UnusableAudio, match=reason):
            read_usable_crop(str(tmp_path / name), 8000, 16000, rng)
    silent = read_usable_crop(str(tmp_path / 'silent.wav'), 8000, 16000, rng, skip_silent=False)
    assert silent.shape == (8000,) and not silent.any()


def test_real_odd_files_silence_is_refused_and_other_formats_read_as_mono():
    folder = shared_data('odd_audio')
    rng = np.random.default_rng(0)
    with pytest.raises(UnusableAudio, match='silent'):
        read_usable_crop(os.path.join(folder, 'digital_silence.wav'), 16000, 16000, rng)
    for name in ('mono_float64.wav', 'mono_int24.wav', 'mono_int32.wav'):  # a few samples each
        with pytest.raises(UnusableAudio, match='shorter than a 25 ms window'):
            read_usable_crop(os.path.join(folder, name), 16000, 16000, rng)
    for name in ('stereo_16bit.wav', 'stereo_24bit.WAV', 'ms_adpcm.wav', 'signed_24bit.wav', 'p286_011.wav'):
        audio = read_usable_crop(os.path.join(folder, name), 16000, 16000, rng)
        assert audio.shape == (16000,) and np.all(np.isfinite(audio)) and audio.any(), name
    with pytest.raises(UnusableAudio, match='unreadable'):  # AAC is for `prepare.py m4a`, not the loader
        read_usable_crop(os.path.join(folder, 'testing.m4a'), 16000, 16000, rng)


def test_training_items_replace_unusable_files_by_their_speakers_other_utterances(broken_corpus):
    corpus, _ = broken_corpus
    entries = entries_of(corpus)
    dataset = TrainDataset(entries, corpus['train_path'], 40, 16000, None, seed=3)
    for index, (speaker, rel) in enumerate(entries):
        if rel.startswith('bad/') and rel != 'bad/stereo.wav':
            audio, label, skipped = dataset[(index, 1)]
            name = rel[4:]
            assert label == dataset.labels[index] and np.all(np.isfinite(audio.numpy())) and audio.abs().sum() > 0
            assert skipped[0][0].endswith(rel) and BROKEN[name][1] in skipped[0][1]
    stereo = entries.index((entries[0][0], 'bad/stereo.wav'))
    audio, _, skipped = dataset[(stereo, 1)]
    assert skipped == []
    mono = soundfile.read(os.path.join(corpus['train_path'], 'bad', 'stereo.wav'))[0].mean(axis=1)
    assert np.min(np.abs(np.subtract.outer(audio.numpy()[:5], mono).astype(np.float32)), axis=1).max() < 1e-6
    batch = collate([dataset[(i, 1)] for i in range(len(entries))])
    assert batch[0].shape == (len(entries), dataset.length) and len(batch[1]) == len(entries)
    assert {os.path.basename(path) for path, _ in batch[2]} == set(BROKEN)  # substitutes may be bad too


def test_a_pair_speaker_without_any_usable_utterance_is_an_error_naming_it(tmp_path):
    for name in ('silent.wav', 'nan.wav'):
        BROKEN[name][0](str(tmp_path / name))
    soundfile.write(tmp_path / 'good.wav', np.random.default_rng(0).standard_normal(16000) * 0.1, 16000)
    dataset = PairDataset([('a', 'silent.wav'), ('a', 'nan.wav'), ('b', 'good.wav')], str(tmp_path), 40, 16000,
                          None, seed=0)
    with pytest.raises(RuntimeError, match="silent.wav: no usable audio among its speaker's utterances"):
        dataset[(0, 1, 1)]
    view_a, view_b, label, skipped = dataset[(2, 2, 1)]
    assert label == 1 and skipped == []


def test_silent_input_gives_a_finite_loss_when_silence_is_not_skipped():
    model = trainECAPAModel.SpeakerModel(trainECAPAModel.build_encoder('ecapa-tdnn', 32, 16000, None),
                                         trainECAPAModel.AAMsoftmax(4, 0.2, 30, 192))
    loss, accuracy = model(torch.zeros(4, 8000), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_training_over_broken_files_skips_counts_and_lists_them(broken_corpus, tmp_path, cache_dir):
    corpus, _ = broken_corpus
    trainECAPAModel.main(tiny_args(corpus, tmp_path / 'run', cache_dir, '--max_epoch', '1', '--batch_size', '4'))
    record = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[0])
    listed = [line.split('\t') for line in (tmp_path / 'run' / 'skipped_files.txt').read_text().splitlines()]
    assert record['skipped_files'] == len(listed) > 0 and record['bad_steps'] == 0
    assert {os.path.basename(path) for _, path, _ in listed} <= set(BROKEN)
    assert all(epoch == '1' for epoch, _, _ in listed)
    assert np.isfinite(record['loss'])


def test_diverging_training_stops_after_max_bad_steps_with_a_message(tiny_corpus, tmp_path, cache_dir):
    with pytest.raises(SystemExit, match=r'steps in a row had a non-finite loss.*--max_bad_steps 2'):
        trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path, cache_dir, '--max_epoch', '3', '--lr', '1e30',
                                       '--max_bad_steps', '2', '--batch_size', '4'))


def test_check_data_reports_planted_problems_with_their_list_lines(broken_corpus, tmp_path, capsys):
    corpus, numbers = broken_corpus
    trials = tmp_path / 'trials.txt'
    good_trials = open(corpus['eval_list']).read().splitlines()
    enroll = good_trials[0].split()[1]
    trials.write_text('\n'.join(good_trials[:3] + [f'1 {enroll} missing/file.wav'] + good_trials[3:]) + '\n')
    argv = ['--check_data', '--train_list', corpus['train_list'], '--train_path', corpus['train_path'],
            '--eval_list', str(trials), '--eval_path', corpus['eval_path'], '--musan_path', corpus['musan_path'],
            '--rir_path', corpus['rir_path'], '--n_cpu', '0', '--check_decode', '0']
    with pytest.raises(SystemExit) as stopped:
        trainECAPAModel.main(argv)
    assert stopped.value.code == 1
    printed = capsys.readouterr().out
    for name, number in numbers.items():
        assert f"{corpus['train_list']}:{number}: {os.path.join(corpus['train_path'], 'bad', name)}: " in printed
    assert f'{trials}:4: ' in printed and 'missing/file.wav: missing' in printed
    assert f'{len(numbers) + 1} problems' in printed
    assert '6 speakers' in printed and 'MUSAN noise' in printed and 'RIRs' in printed
    clean = tmp_path / 'clean.txt'
    clean.write_text(''.join(line for line in open(corpus['train_list']) if 'bad/' not in line or 'stereo' in line))
    assert trainECAPAModel.main(['--check_data', '--train_list', str(clean), '--train_path', corpus['train_path'],
                                 '--n_cpu', '0']) == []


def test_check_data_names_a_malformed_line(tiny_corpus, tmp_path, capsys):
    bad = tmp_path / 'train_list.txt'
    bad.write_text('id1 a/b.wav\nid2 c/d.wav extra\n')
    with pytest.raises(SystemExit):
        trainECAPAModel.main(['--check_data', '--train_list', str(bad), '--train_path', str(tmp_path), '--n_cpu', '0'])
    assert f"{bad}:2: expected '<speaker> <relative path>'" in capsys.readouterr().out


def test_mismatched_initial_model_lists_its_keys_unless_partial_load_is_allowed(tiny_corpus, tmp_path, cache_dir,
                                                                                  capsys):
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path / 'a', cache_dir, '--max_epoch', '1'))
    state = torch.load(tmp_path / 'a' / 'model' / 'model_0001.model', weights_only=True)
    state['speaker_encoder.extra.weight'] = torch.zeros(3)
    dropped = sorted(k for k in state if k.startswith('speaker_encoder.layer4'))
    for key in dropped:
        del state[key]
    torch.save(state, tmp_path / 'mismatched.model')
    args = tiny_args(tiny_corpus, tmp_path / 'b', cache_dir, '--max_epoch', '1', '--initial_model',
                     str(tmp_path / 'mismatched.model'))
    with pytest.raises(SystemExit) as stopped:
        trainECAPAModel.main(args)
    message = str(stopped.value)
    assert f'{len(dropped)} missing: ' in message and dropped[0][len('speaker_encoder.'):] in message
    assert '1 unexpected: extra.weight' in message and '--allow_partial_load' in message
    trainECAPAModel.main(args + ['--allow_partial_load'])
    assert 'partial load' in capsys.readouterr().out
    (tmp_path / 'corrupt.model').write_bytes(b'not a checkpoint')
    args[args.index('--initial_model') + 1] = str(tmp_path / 'corrupt.model')
    with pytest.raises(SystemExit, match='corrupt.model: not a readable PyTorch checkpoint'):
        trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path / 'c', cache_dir, '--initial_model',
                                       str(tmp_path / 'corrupt.model')))
