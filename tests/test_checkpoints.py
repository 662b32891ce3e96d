"""checkpoints.py: atomic writes, checkpoints in the original code's format, weight loading, and resume.pt
loaded without executing anything."""

import errno
import multiprocessing
import os
import pickle
import socket
import subprocess
import time

import numpy as np
import pytest
import soundfile
import torch

from speakerkit.checkpoints import (FolderLock, ResumeState, atomic_write, average_checkpoints, encoder_weights,
                                    load_encoder_weights, load_state_dict_file, remove_partial_writes, save_checkpoint)
from speakerkit.errors import UserError
from speakerkit.loss import AAMsoftmax
from speakerkit.model import ECAPA_TDNN, EncoderConfig, build_encoder
from speakerkit.trainer import SpeakerModel


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'model_0001.model'
    path.write_bytes(b'old')

    def failing(f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def failing_as_torch_save_does(f):  # its writer reports the OSError again as a RuntimeError
        try:
            failing(f)
        except OSError as error:
            raise RuntimeError('[enforce fail at inline_container.cc] unexpected pos') from error

    for write in (failing, failing_as_torch_save_does):
        with pytest.raises(UserError, match=f'^{path}: cannot be written \\(No space left on device\\)$'):
            atomic_write(str(path), write)
        assert path.read_bytes() == b'old'
        assert os.listdir(tmp_path) == ['model_0001.model']
    with pytest.raises(ZeroDivisionError):  # a fault of the code, not of the system, stays itself
        atomic_write(str(path), lambda f: 1 / 0)


def test_partial_writes_of_a_killed_process_are_removed_and_nothing_else(tmp_path):
    for name in ('.resume.pt.k2j3', '.model_0003.model.x9', 'model_0003.model', '.other.x', 'resume.pt'):
        (tmp_path / name).write_bytes(b'')
    assert remove_partial_writes(str(tmp_path), ('resume.pt', 'model_*.model')) == 2
    assert sorted(os.listdir(tmp_path)) == ['.other.x', 'model_0003.model', 'resume.pt']
    assert remove_partial_writes(str(tmp_path / 'absent'), ('resume.pt',)) == 0


def test_a_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path, capsys):
    lock = FolderLock(str(tmp_path)).acquire()
    assert (tmp_path / '.lock').read_text() == f'{os.getpid()} {socket.gethostname()}'
    with pytest.raises(UserError, match=rf'is in use by process {os.getpid()} on {socket.gethostname()}'):
        FolderLock(str(tmp_path)).acquire()
    lock.release()
    assert not (tmp_path / '.lock').exists()
    gone = subprocess.Popen(['true'])
    gone.wait()  # a process id that has just ended
    (tmp_path / '.lock').write_text(f'{gone.pid} {socket.gethostname()}')
    FolderLock(str(tmp_path)).acquire()
    assert f'taking over the lock of process {gone.pid}, which has ended' in capsys.readouterr().out
    (tmp_path / '.lock').write_text(f'{gone.pid} another-host')
    with pytest.raises(UserError, match=f'in use by process {gone.pid} on another-host'):
        FolderLock(str(tmp_path)).acquire()
    FolderLock(str(tmp_path)).release()  # not ours: left in place
    assert (tmp_path / '.lock').exists()


def hold_lock_for_a_moment(folder, start, results):
    start.wait()
    try:
        lock = FolderLock(folder).acquire()
    except UserError:
        results.put(0)
        return
    time.sleep(0.3)
    results.put(1)
    lock.release()


@pytest.mark.slow
@pytest.mark.parametrize('stale', [False, True])
def test_of_processes_starting_at_the_same_instant_one_alone_gets_the_folder(tmp_path, stale):
    """Eight processes released by one barrier, ten times, on a fresh folder or one with a dead process's lock."""
    context = multiprocessing.get_context('fork')
    for round_ in range(10):
        folder = str(tmp_path / str(round_))
        if stale:
            os.makedirs(folder)
            gone = subprocess.Popen(['true'])
            gone.wait()
            with open(os.path.join(folder, '.lock'), 'w') as f:
                f.write(f'{gone.pid} {socket.gethostname()}')
        start, results = context.Barrier(8), context.Queue()
        processes = [context.Process(target=hold_lock_for_a_moment, args=(folder, start, results)) for _ in range(8)]
        for process in processes:
            process.start()
        holders = sum(results.get(timeout=60) for _ in processes)
        for process in processes:
            process.join()
        assert holders == 1, f'round {round_}: {holders} processes held the lock at once'


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    atomic_write(str(tmp_path / 'atomic'), lambda f: f.write(b'x'))
    (tmp_path / 'plain').write_bytes(b'x')
    assert (tmp_path / 'atomic').stat().st_mode == (tmp_path / 'plain').stat().st_mode


def resume_state():
    model = SpeakerModel(build_encoder('tdnn', 16, 16000, 8), AAMsoftmax(3, 0.2, 30, 8))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 4000), torch.arange(4) % 3)[0].backward()
    optimizer.step()
    partial = {'step': 2, 'loss_sum': 1.5, 'correct_sum': 50.0, 'examples': 8, 'crops': 8, 'seconds': 0.5,
               'bad_steps': 0, 'skipped': [('a.wav', 'silent')]}
    return ResumeState(epoch=3, model=model.state_dict(), optimizer=optimizer.state_dict(),
                       rng=[torch.get_rng_state()], cuda_rng=None,
                       scaler=torch.amp.GradScaler('cpu', enabled=False).state_dict(), eers=[np.float64(12.5), 10.0],
                       partial_epoch=[partial])


def test_resume_state_round_trips_through_weights_only_loading(tmp_path):
    state = resume_state()
    state.save(str(tmp_path / 'resume.pt'))
    torch.load(tmp_path / 'resume.pt', weights_only=True)  # plain types only: no allow-list needed
    loaded = ResumeState.load(str(tmp_path / 'resume.pt'))
    assert loaded.epoch == 3 and loaded.eers == [12.5, 10.0] and type(loaded.eers[0]) is float
    assert loaded.partial_epoch == [{**state.partial_epoch[0], 'skipped': [('a.wav', 'silent')]}]
    for key, value in state.model.items():
        torch.testing.assert_close(loaded.model[key], value, rtol=0, atol=0)
    assert torch.equal(loaded.rng[0], state.rng[0])


def test_resume_files_of_earlier_versions_still_load(tmp_path):
    """Before ResumeState, resume.pt held numpy float EERs and, before torchrun support, one RNG state."""
    old = resume_state()
    stored = {'epoch': old.epoch, 'model': old.model, 'optimizer': old.optimizer, 'rng': old.rng[0], 'cuda_rng': None,
              'scaler': old.scaler, 'eers': [np.float64(12.5)], 'partial_epoch': None}
    torch.save(stored, tmp_path / 'resume.pt')
    loaded = ResumeState.load(str(tmp_path / 'resume.pt'))
    assert loaded.eers == [12.5] and len(loaded.rng) == 1 and torch.equal(loaded.rng[0], old.rng[0])


class Payload:
    def __reduce__(self):
        return (os.system, ('touch executed',))


def test_a_crafted_resume_file_is_refused_without_running_its_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / 'resume.pt', 'wb') as f:
        pickle.dump({'epoch': 1, 'payload': Payload()}, f)
    with pytest.raises(UserError, match='resume.pt: not a readable resume state'):
        ResumeState.load(str(tmp_path / 'resume.pt'))
    with pytest.raises(UserError, match='resume.pt: not a readable PyTorch checkpoint'):
        load_state_dict_file(str(tmp_path / 'resume.pt'))
    assert not (tmp_path / 'executed').exists()


def test_checkpoints_that_are_not_state_dicts_are_named(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / 'list.model')
    with pytest.raises(UserError, match='list.model: expected a state_dict, found list'):
        load_state_dict_file(str(tmp_path / 'list.model'))


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_a_checkpoint_holding_non_finite_weights_is_refused_naming_the_weight(tmp_path, bad):
    state = build_encoder('tdnn', 16, 16000, 8).state_dict()
    state['frame_layers.0.0.weight'][0, 0, 0] = bad
    torch.save(state, tmp_path / 'diverged.model')
    with pytest.raises(UserError, match=r'diverged.model: frame_layers.0.0.weight holds NaN or infinite values'):
        load_state_dict_file(str(tmp_path / 'diverged.model'))


def test_encoder_weights_strip_the_training_prefixes():
    weight = torch.zeros(1)
    assert encoder_weights({'speaker_encoder.a': weight, 'speaker_loss.weight': weight}) == {'a': weight}
    assert encoder_weights({'module.speaker_encoder.a': weight}) == {'a': weight}
    assert encoder_weights({'a': weight}) == {'a': weight}


def test_a_speed_perturbed_head_gives_its_speed_one_rows_to_a_run_without_perturbation(tmp_path):
    """Fine-tuning a --speed_perturb model (3N classes: speaker s at the k-th speed is class k * N + s) without
    perturbation keeps its classifier for the N speakers at speed 1.0."""
    torch.manual_seed(0)
    source = SpeakerModel(build_encoder('tdnn', 16, 16000, 8), AAMsoftmax(3 * 4, 0.2, 30, 8))
    torch.save(source.state_dict(), tmp_path / 'speed.model')
    target = SpeakerModel(build_encoder('tdnn', 16, 16000, 8), AAMsoftmax(4, 0.2, 30, 8))
    loaded = load_encoder_weights(target.speaker_encoder, target.classifier(), str(tmp_path / 'speed.model'))
    assert loaded == ('encoder and the classifier of its 4 speakers at speed 1.0 (a --speed_perturb head of 12 '
                      'classes; the speakers at the other speeds are left out, as this run plays every crop at '
                      'speed 1.0)')
    assert torch.equal(target.classifier().weight, source.classifier().weight[:4])
    other = SpeakerModel(build_encoder('tdnn', 16, 16000, 8), AAMsoftmax(5, 0.2, 30, 8))  # 12 is not 3 x 5
    assert 'classifier initialised afresh' in load_encoder_weights(other.speaker_encoder, other.classifier(),
                                                                   str(tmp_path / 'speed.model'))


def test_partial_loading_keeps_the_rest_of_the_encoder_fresh(tmp_path):
    torch.manual_seed(0)
    source = SpeakerModel(build_encoder('tdnn', 16, 16000, 8), AAMsoftmax(3, 0.2, 30, 8))
    state = source.state_dict()
    del state['speaker_encoder.segment7.weight']
    torch.save(state, tmp_path / 'partial.model')
    target = SpeakerModel(build_encoder('tdnn', 16, 16000, 8), AAMsoftmax(5, 0.2, 30, 8))
    fresh = target.speaker_encoder.segment7.weight.detach().clone()
    with pytest.raises(UserError, match=r'partial.model: does not fit this TDNN .*1 missing: segment7.weight'):
        load_encoder_weights(target.speaker_encoder, target.classifier(), str(tmp_path / 'partial.model'))
    loaded = load_encoder_weights(target.speaker_encoder, target.classifier(), str(tmp_path / 'partial.model'),
                                  allow_partial=True)
    assert loaded.endswith('classifier initialised afresh (none in the checkpoint, or another shape)')
    assert torch.equal(target.speaker_encoder.segment7.weight, fresh)
    torch.testing.assert_close(target.speaker_encoder.segment6[0].weight, source.speaker_encoder.segment6[0].weight)


def test_the_original_readme_snippet_loads_our_checkpoint(tmp_path):
    """The embedding snippet of the original README, run as written, on a checkpoint in our format."""
    speaker_model = SpeakerModel(ECAPA_TDNN(1024, 16000), AAMsoftmax(5994, 0.2, 30))
    save_checkpoint(speaker_model.checkpoint_state(), EncoderConfig(model='ecapa-tdnn', C=1024, sampling_rate=16000),
                    str(tmp_path / 'pretrained.model'))
    soundfile.write(tmp_path / 'a.wav', np.random.default_rng(0).standard_normal(8000) * 0.1, 8000)
    snippet = '''
from speakerkit import model
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
'''.replace('/path/pretrained_model.model', str(tmp_path / 'pretrained.model')).replace(
        'your audio path', str(tmp_path / 'a.wav'))
    namespace = {}
    exec(compile(snippet, 'README snippet', 'exec'), namespace)
    assert namespace['embedding'].shape == (1, 192)
    torch.testing.assert_close(namespace['embedding'].norm(dim=1), torch.ones(1))


def test_averaged_checkpoints_are_the_mean_of_their_weights(tmp_path):
    generator = torch.Generator().manual_seed(0)
    states = [{'speaker_encoder.w': torch.randn(4, 3, generator=generator),
               'speaker_encoder.bn.num_batches_tracked': torch.tensor(10 * (i + 1)),
               'speaker_loss.weight': torch.randn(5, 2, generator=generator)} for i in range(3)]
    paths = []
    for i, state in enumerate(states):
        paths.append(str(tmp_path / f'model_{i}.model'))
        torch.save(state, paths[-1])
    average = average_checkpoints(paths)
    for key in ('speaker_encoder.w', 'speaker_loss.weight'):
        assert torch.allclose(average[key], sum(s[key] for s in states) / 3, atol=1e-7)
        assert average[key].dtype == torch.float32
    assert average['speaker_encoder.bn.num_batches_tracked'] == 30
    torch.save({**states[0], 'speaker_loss.weight': torch.zeros(6, 2)}, tmp_path / 'other.model')
    with pytest.raises(UserError, match='other.model: its weights differ .* speaker_loss.weight'):
        average_checkpoints([paths[0], str(tmp_path / 'other.model')])
