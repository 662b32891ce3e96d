import numpy as np
import pytest
import soundfile
import torch

import trainECAPAModel
from conftest import shared_data
from dataLoader import read_audio
from loss import AAMsoftmax
from model import ECAPA_TDNN, build_encoder
from test_cli import tiny_args
from tools import embed, load_model, save_checkpoint, score


@pytest.mark.parametrize('name,C,rate', [('ecapa-tdnn', 32, 16000), ('tdnn', 64, 8000), ('resnet18', 8, 16000)])
def test_checkpoint_round_trip_through_the_notebook_helpers(tmp_path, name, C, rate):
    torch.manual_seed(0)
    encoder = build_encoder(name, C, rate, embedding_dim=40).eval()
    speaker_model = trainECAPAModel.SpeakerModel(encoder, AAMsoftmax(7, 0.2, 30, 40))
    path = str(tmp_path / 'model_0003.model')
    save_checkpoint(speaker_model.state_dict(), {'model': name, 'C': C, 'embedding_dim': 40, 'sampling_rate': rate},
                    path)
    loaded = load_model(path)
    assert type(loaded) is type(encoder) and loaded.sampling_rate == rate and not loaded.training
    waveform = (0.1 * np.random.default_rng(0).standard_normal(2 * rate)).astype(np.float32)
    torch.testing.assert_close(embed(loaded, waveform, rate), embed(encoder, waveform, rate), rtol=0, atol=0)
    # A file at another rate is resampled to the encoder's.
    other_rate = 16000 if rate == 8000 else 8000
    soundfile.write(tmp_path / 'a.wav', (0.1 * np.random.default_rng(1).standard_normal(other_rate)), other_rate)
    vector = embed(loaded, str(tmp_path / 'a.wav'))
    assert vector.shape == (80,)
    assert score(loaded, str(tmp_path / 'a.wav'), str(tmp_path / 'a.wav')) == pytest.approx(float(vector @ vector))


def test_waveform_without_a_rate_is_an_error():
    with pytest.raises(ValueError, match='sampling_rate'):
        embed(ECAPA_TDNN(32), np.zeros(16000, dtype=np.float32))


def test_original_format_checkpoint_starts_training(tiny_corpus, tmp_path, cache_dir, capsys):
    """A checkpoint of the original code (5994-class head, no JSON beside it) seeds a run with 6 speakers."""
    original = trainECAPAModel.SpeakerModel(ECAPA_TDNN(32), AAMsoftmax(5994, 0.2, 30))
    torch.save(original.state_dict(), tmp_path / 'pretrain.model')
    trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path / 'run', cache_dir, '--max_epoch', '1',
                                   '--initial_model', str(tmp_path / 'pretrain.model')))
    assert 'classifier initialised afresh' in capsys.readouterr().out
    assert (tmp_path / 'run' / 'model' / 'model_0001.model').exists()


def test_mismatched_initial_model_is_a_clear_error(tiny_corpus, tmp_path, cache_dir):
    torch.save(trainECAPAModel.SpeakerModel(ECAPA_TDNN(64), AAMsoftmax(6, 0.2, 30)).state_dict(),
               tmp_path / 'wide.model')
    with pytest.raises(SystemExit, match='wide.model: does not fit this ECAPA_TDNN'):
        trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path / 'run', cache_dir, '--max_epoch', '1',
                                       '--initial_model', str(tmp_path / 'wide.model')))
    (tmp_path / 'garbage.model').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='garbage.model: not a readable PyTorch checkpoint'):
        trainECAPAModel.main(tiny_args(tiny_corpus, tmp_path / 'run', cache_dir, '--max_epoch', '1',
                                       '--initial_model', str(tmp_path / 'garbage.model')))


@pytest.mark.parametrize('name', ['stereo_24bit.WAV', 'stereo_16bit.wav', 'mono_int24.wav', 'mono_int32.wav',
                                  'mono_float64.wav', 'signed_24bit.wav'])
def test_real_files_of_every_depth_and_layout_read_as_mono(name):
    path = shared_data('odd_audio', name)
    audio = read_audio(path, 16000)
    info = soundfile.info(path)
    assert audio.ndim == 1 and audio.dtype == np.float32 and np.all(np.isfinite(audio))
    assert abs(len(audio) - info.frames * 16000 / info.samplerate) <= 1


def test_real_eight_kilohertz_digits_are_resampled():
    path = shared_data('fsdd', 'recordings', '0_george_0.wav')
    assert soundfile.info(path).samplerate == 8000
    audio = read_audio(path, 16000)
    assert len(audio) == pytest.approx(2 * soundfile.info(path).frames, abs=1)
