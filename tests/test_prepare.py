"""prepare.py: VoxCeleb2 m4a -> wav, train lists, MUSAN chunks and the RIR layout, end to end; --check_data."""

import os
import shutil
import signal

import av
import numpy as np
import pytest
import soundfile

from speakerkit import cli, prepare
from speakerkit.augment import Augmenter, musan_files, rir_files
from speakerkit.dataLoader import UnusableAudio, read_usable_crop, resample
from speakerkit.errors import UserError


def write_m4a(path, seconds, frequency, rate=16000):
    """An AAC file as VoxCeleb2 ships them, encoded with PyAV."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    samples = (np.sin(2 * np.pi * frequency * np.arange(int(seconds * rate)) / rate) * 8000).astype(np.int16)
    with av.open(path, 'w', format='ipod') as out:
        stream = out.add_stream('aac', rate=rate, layout='mono')
        frame = av.AudioFrame.from_ndarray(samples[None], format='s16', layout='mono')
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


@pytest.fixture
def m4a_tree(tmp_path):
    """id1/vidA/00001.m4a ... : 2 speakers x 2 videos x 2 utterances of 1-2 s at 16 kHz."""
    root = tmp_path / 'aac'
    for s, speaker in enumerate(('id00001', 'id00002')):
        for v, video in enumerate(('vidA', 'vidB')):
            for u in range(2):
                write_m4a(str(root / speaker / video / f'{u + 1:05d}.m4a'), 1 + 0.5 * u, 200 + 100 * s + 30 * v)
    return root


def test_voxcelebs_real_aac_file_converts_to_16k_mono_wav(tmp_path, shared_data):
    source = tmp_path / 'aac' / 'id00001' / 'video' / '00001.m4a'
    source.parent.mkdir(parents=True)
    shutil.copy(shared_data('odd_audio', 'testing.m4a'), source)
    assert prepare.main(['m4a', str(tmp_path / 'aac'), str(tmp_path / 'wav'), '--workers', '1']) == 0
    audio, rate = soundfile.read(tmp_path / 'wav' / 'id00001' / 'video' / '00001.wav')
    info = soundfile.info(tmp_path / 'wav' / 'id00001' / 'video' / '00001.wav')
    assert rate == 16000 and info.channels == 1 and info.subtype == 'PCM_16'
    with av.open(str(source)) as container:  # the AAC stream as decoded at its own 44.1 kHz
        native_rate = container.streams.audio[0].rate
        native = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio=0)])
    reference = resample(native.astype(np.float32), native_rate, 16000)
    length = min(len(reference), len(audio))
    assert abs(len(audio) - len(reference)) < 0.01 * rate and length / rate > 3.1
    assert np.corrcoef(audio[:length], reference[:length])[0, 1] > 0.99


@pytest.mark.slow
def test_conversion_runs_in_parallel_resumes_and_reports_broken_files(m4a_tree, tmp_path, capsys):
    target = tmp_path / 'wav'
    (m4a_tree / 'id00002' / 'vidB' / '00003.m4a').write_bytes(b'\x00\x00\x00\x18ftypM4A broken')
    assert prepare.main(['m4a', str(m4a_tree), str(target), '--workers', '2']) == 1
    printed = capsys.readouterr().out
    assert '8 files written now, 0 already there, 1 failed' in printed and '00003.m4a' in printed
    wavs = sorted(p.relative_to(target).as_posix() for p in target.rglob('*.wav'))
    assert len(wavs) == 8 and 'id00002/vidB/00003.wav' not in wavs
    audio, rate = soundfile.read(target / 'id00001' / 'vidA' / '00002.wav')
    assert rate == 16000 and abs(len(audio) / rate - 1.5) < 0.15  # AAC adds its encoder delay
    assert [name for name in os.listdir(target / 'id00002' / 'vidB') if not name.endswith('.wav')] == []
    # An interrupted run: one output missing, another leaves only a stray temporary file.
    os.remove(target / 'id00001' / 'vidB' / '00001.wav')
    (target / 'id00001' / 'vidB' / '.00001.wav.xyz').write_bytes(b'partial')
    os.remove(m4a_tree / 'id00002' / 'vidB' / '00003.m4a')
    assert prepare.main(['m4a', str(m4a_tree), str(target), '--workers', '1']) == 0
    assert '1 files written now, 7 already there, 0 failed' in capsys.readouterr().out
    assert soundfile.info(target / 'id00001' / 'vidB' / '00001.wav').frames > 16000


def test_train_list_from_a_converted_tree_checks_and_trains(m4a_tree, tiny_corpus, tmp_path, capsys):
    target = tmp_path / 'wav'
    prepare.main(['m4a', str(m4a_tree), str(target), '--workers', '1'])
    assert prepare.main(['train_list', str(target), str(tmp_path / 'train_list.txt')]) == 0
    lines = (tmp_path / 'train_list.txt').read_text().splitlines()
    assert len(lines) == 8 and lines[0] == 'id00001 id00001/vidA/00001.wav'
    assert {line.split()[0] for line in lines} == {'id00001', 'id00002'}
    assert all(line.split()[1].startswith(line.split()[0] + '/') for line in lines)
    assert cli.main(['--check_data', '--train_list', str(tmp_path / 'train_list.txt'),
                                 '--train_path', str(target), '--n_cpu', '0']) == []
    assert '8 files, 2 speakers' in capsys.readouterr().out
    cli.main(['--train_list', str(tmp_path / 'train_list.txt'), '--train_path', str(target),
                          '--eval_list', tiny_corpus['eval_list'], '--eval_path', tiny_corpus['eval_path'],
                          '--save_path', str(tmp_path / 'run'), '--C', '16', '--num_frames', '40', '--batch_size', '4',
                          '--max_epoch', '1', '--n_cpu', '0'])
    assert (tmp_path / 'run' / 'score.txt').read_text().startswith('1 epoch, LR 0.001000, LOSS ')
    (target / 'loose.wav').write_bytes(b'')
    with pytest.raises(SystemExit) as stopped:
        prepare.main(['train_list', str(target), str(tmp_path / 'again.txt')])
    assert stopped.value.code == 1 and 'not inside a speaker folder' in capsys.readouterr().err


def test_musan_is_split_into_5s_chunks_every_3s_that_the_augmenter_reads(tmp_path, cache_dir):
    source, target = tmp_path / 'musan', tmp_path / 'musan_split'
    rng = np.random.default_rng(0)
    lengths = {'music/fma/music-fma-0000.wav': 12.0, 'noise/free-sound/noise-free-sound-0000.wav': 4.0,
               'speech/librivox/speech-librivox-0000.wav': 8.0, 'noise/sound-bible/noise-sound-bible-0001.wav': 5.0}
    for rel, seconds in lengths.items():
        (source / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        soundfile.write(source / rel, rng.uniform(-0.5, 0.5, int(seconds * 16000)), 16000, subtype='PCM_16')
    (source / 'README').write_text('not audio')
    assert prepare.main(['musan', str(source), str(target), '--workers', '1']) == 0
    chunks = {os.path.relpath(p, target): soundfile.info(p).frames for files in musan_files(str(target)).values()
              for p in files}
    assert sorted(chunks) == sorted(  # 12 s: starts 0, 3, 6 s; 8 s: 0, 3 s; 5 s: 0; 4 s: the whole file
        [f'music/fma/music-fma-0000/{i:05d}.wav' for i in range(3)]
        + [f'speech/librivox/speech-librivox-0000/{i:05d}.wav' for i in range(2)]
        + ['noise/free-sound/noise-free-sound-0000/00000.wav', 'noise/sound-bible/noise-sound-bible-0001/00000.wav'])
    assert chunks['noise/free-sound/noise-free-sound-0000/00000.wav'] == 4 * 16000
    assert {n for rel, n in chunks.items() if not rel.startswith('noise/free')} == {5 * 16000}
    original = soundfile.read(source / 'music/fma/music-fma-0000.wav', dtype='int16')[0]
    second = soundfile.read(target / 'music/fma/music-fma-0000/00001.wav', dtype='int16')[0]
    np.testing.assert_array_equal(second, original[3 * 16000:8 * 16000])
    assert sorted(Augmenter(str(target), None, 16000, cache_dir).noise_banks) == ['music', 'noise', 'speech']
    assert prepare.main(['musan', str(source), str(target), '--workers', '1']) == 0  # nothing left to do


def test_rirs_noises_is_laid_out_for_the_rir_path(tmp_path, cache_dir):
    source = tmp_path / 'RIRS_NOISES'
    rng = np.random.default_rng(0)
    for room_type, room in (('smallroom', 'Room001'), ('mediumroom', 'Room002')):
        folder = source / 'simulated_rirs' / room_type / room
        folder.mkdir(parents=True)
        for i in range(2):
            soundfile.write(folder / f'{room}-{i + 1:05d}.wav', rng.standard_normal(800) * np.exp(-np.arange(800) / 80),
                            16000)
    real = source / 'real_rirs_isotropic_noises'
    real.mkdir()
    soundfile.write(real / 'RVB2014_type1_noise_largeroom1_1.wav', rng.standard_normal((900, 8)) * 0.1, 16000)
    name = 'RVB2014_type1_rir_largeroom1_far_angla'
    soundfile.write(real / f'{name}.wav', rng.standard_normal((900, 8)) * 0.1, 16000)
    (real / 'rir_list').write_text(f'--rir-id {name} --room-id RVB2014_type1_rir_largeroom1 '
                                   f'RIRS_NOISES/real_rirs_isotropic_noises/{name}.wav\n')
    target = tmp_path / 'rirs'
    assert prepare.main(['rirs', str(source), str(target), '--real']) == 0
    files = [os.path.relpath(p, target) for p in rir_files(str(target))]
    assert sorted(files) == sorted(['mediumroom/Room002/Room002-00001.wav', 'mediumroom/Room002/Room002-00002.wav',
                                    f'real/RVB2014_type1_rir_largeroom1/{name}.wav',
                                    'smallroom/Room001/Room001-00001.wav', 'smallroom/Room001/Room001-00002.wav'])
    real_rir, _ = soundfile.read(target / 'real' / 'RVB2014_type1_rir_largeroom1' / f'{name}.wav')
    recorded = soundfile.read(real / f'{name}.wav')[0]
    np.testing.assert_allclose(real_rir, recorded[:, 0], atol=1e-6)
    assert len(Augmenter(None, str(target), 16000, cache_dir).rir_bank) == 5


def test_check_data_reports_planted_problems_with_their_list_lines(broken_corpus, tmp_path, capsys, cli_error):
    corpus, numbers = broken_corpus
    trials = tmp_path / 'trials.txt'
    good_trials = open(corpus['eval_list']).read().splitlines()
    enroll = good_trials[0].split()[1]
    trials.write_text('\n'.join(good_trials[:3] + [f'1 {enroll} missing/file.wav'] + good_trials[3:]) + '\n')
    argv = ['--check_data', '--train_list', corpus['train_list'], '--train_path', corpus['train_path'],
            '--eval_list', str(trials), '--eval_path', corpus['eval_path'], '--musan_path', corpus['musan_path'],
            '--rir_path', corpus['rir_path'], '--n_cpu', '0', '--check_decode', '0']
    status, error, printed = cli_error(argv)
    assert status == 1 and error == f'trainECAPAModel.py: error: --check_data found {len(numbers) + 1} problems ' \
                                    f'(listed above)\n'
    for name, number in numbers.items():
        assert f"{corpus['train_list']}:{number}: {os.path.join(corpus['train_path'], 'bad', name)}: " in printed
    assert f'{trials}:4: ' in printed and 'missing/file.wav: missing' in printed
    assert f'{len(numbers) + 1} problems' in printed
    assert '6 speakers' in printed and 'MUSAN noise' in printed and 'RIRs' in printed
    clean = tmp_path / 'clean.txt'
    clean.write_text(''.join(line for line in open(corpus['train_list']) if 'bad/' not in line or 'stereo' in line))
    assert cli.main(['--check_data', '--train_list', str(clean), '--train_path', corpus['train_path'],
                                 '--n_cpu', '0']) == []


def test_a_file_passes_the_check_exactly_when_the_training_loader_can_train_on_it(tmp_path, broken_audio):
    """The broken kinds, an m4a (which libsndfile does not read), a header at 8 Hz, stereo and a plain wav."""
    for name, (write, _) in broken_audio.items():
        write(str(tmp_path / name))
    write_m4a(str(tmp_path / 'aac.m4a'), 1.5, 300)
    tone = (0.1 * np.sin(np.arange(24000) / 5)).astype(np.float32)
    soundfile.write(tmp_path / 'eight_hertz.wav', tone, 8)
    soundfile.write(tmp_path / 'stereo.wav', np.stack([tone, -0.5 * tone], axis=1), 16000)
    soundfile.write(tmp_path / 'plain.wav', tone, 16000)
    verdicts = {}
    for path in sorted(tmp_path.iterdir()):
        checked = 'problem' not in prepare.inspect_file((str(path), True, True))
        try:
            read_usable_crop(str(path), 32000, 16000, np.random.default_rng(0))
            trainable = True
        except UnusableAudio:
            trainable = False
        verdicts[path.name] = (checked, trainable)
    assert all(checked == trainable for checked, trainable in verdicts.values()), verdicts
    assert {name for name, (checked, _) in verdicts.items() if checked} == {'aac.m4a', 'stereo.wav', 'plain.wav'}


def test_check_data_names_a_malformed_line(tiny_corpus, tmp_path, capsys, cli_error):
    bad = tmp_path / 'train_list.txt'
    bad.write_text('id1 a/b.wav\nid2 c/d.wav extra\n')
    status, _, printed = cli_error(['--check_data', '--train_list', str(bad), '--train_path', str(tmp_path),
                                    '--n_cpu', '0'])
    assert status == 1 and f"{bad}:2: expected '<speaker> <relative path>'" in printed


def sigkill_on_c(job):
    if job[0] == 'c':
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer ends a process
    return job[0].upper()


@pytest.mark.slow
def test_a_worker_process_that_dies_ends_the_run_with_the_files_not_processed():
    jobs = [(name,) for name in 'abcdefgh']
    assert prepare.map_in_processes(sigkill_on_c, jobs[:2], 2, 'test', chunk=1) == ['A', 'B']
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail('waits forever for the dead worker'))
    signal.alarm(240)
    try:
        with pytest.raises(UserError, match=r'test: a worker process died .*; \d files were not processed, e\.g\. '
                                            r'.*\bc\b'):
            prepare.map_in_processes(sigkill_on_c, jobs, 2, 'test', chunk=1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
