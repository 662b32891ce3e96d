"""The notebook API's inputs: `tools.embed` and `tools.protocol_vectors` on every waveform form, rate and file
format against the path form, and their errors. A module-scoped ECAPA-TDNN C=32 with random weights."""

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile
import torch

from speakerkit import tools
from speakerkit.dataLoader import decode_with_av, read_audio, wrap_pad
from speakerkit.model import ECAPA_TDNN

ATOL = 1e-5


@pytest.fixture(scope='module')
def encoder():
    torch.manual_seed(0)
    return ECAPA_TDNN(32, 16000).eval()


def speech_like(seconds, rate, seed=0, channels=1):
    """Noise shaped by a slow random envelope: each channel a different signal."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * rate)
    envelope = np.repeat(rng.uniform(0.02, 0.3, size=(frames // 800 + 1, channels)), 800, axis=0)[:frames]
    return (envelope * rng.standard_normal((frames, channels))).astype(np.float32).squeeze()


def test_every_waveform_form_gives_the_vector_of_the_path(encoder, tmp_path):
    stereo = speech_like(2.5, 16000, channels=2)
    soundfile.write(tmp_path / 'stereo.wav', stereo, 16000, subtype='FLOAT')
    path = str(tmp_path / 'stereo.wav')
    expected = tools.embed(encoder, path)
    assert expected.shape == (192,)
    read, rate = soundfile.read(path, dtype='float32')  # [T, 2]
    same = {'[T, C] numpy': tools.embed(encoder, read, rate),
            '[C, T] tensor, channels=True': tools.embed(encoder, torch.from_numpy(read.T.copy()), rate, channels=True),
            '[T] mixed': tools.embed(encoder, read.mean(axis=1), rate),
            '[1, T] batch of one': tools.embed(encoder, torch.from_numpy(read.mean(axis=1))[None], rate)[0],
            'pathlib path': tools.embed(encoder, tmp_path / 'stereo.wav'),
            'list of a path and an array': tools.embed(encoder, [path, read], rate)[1]}
    for form, vector in same.items():
        torch.testing.assert_close(vector, expected, rtol=0, atol=ATOL, msg=form)
    soundfile.write(tmp_path / 'stereo.flac', read, 16000)  # 16-bit FLAC: its own samples, read back
    flac, _ = soundfile.read(tmp_path / 'stereo.flac', dtype='float32')
    torch.testing.assert_close(tools.embed(encoder, str(tmp_path / 'stereo.flac')), tools.embed(encoder, flac, 16000),
                               rtol=0, atol=ATOL)
    pcm = np.round(read * 20000).astype(np.int16)
    torch.testing.assert_close(tools.embed(encoder, pcm, rate), tools.embed(encoder, pcm / 32768.0, rate), rtol=0,
                               atol=ATOL, msg='int16 PCM is scaled by 1/32768')
    for wider in (np.int32, np.int64):  # 16-bit samples in a wider array, as np.array of Python ints makes them
        torch.testing.assert_close(tools.embed(encoder, pcm.astype(wider), rate), tools.embed(encoder, pcm, rate),
                                   rtol=0, atol=ATOL, msg=f'int16 samples held as {wider.__name__}')
    pcm32 = pcm.astype(np.int32) * 65536  # 32-bit PCM as soundfile reads it
    torch.testing.assert_close(tools.embed(encoder, pcm32, rate), tools.embed(encoder, pcm, rate), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match=r'int64 samples beyond the 16-bit range'):
        tools.embed(encoder, pcm.astype(np.int64) * 65536, rate)
    mono = torch.from_numpy(read.mean(axis=1))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # each waveform's own rounding, then the same
        torch.testing.assert_close(tools.embed(encoder, mono.to(dtype), rate),
                                   tools.embed(encoder, mono.to(dtype).float(), rate), rtol=0, atol=0, msg=str(dtype))
    torch.testing.assert_close(tools.embed(encoder, read.mean(axis=1), np.int64(rate)), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(tools.embed(encoder, read.mean(axis=1), float(rate)), expected, rtol=0, atol=ATOL)
    protocol = tools.protocol_vectors(encoder, [path, read], rate)
    assert protocol.shape == (2, 384)
    torch.testing.assert_close(protocol[1], tools.protocol_vectors(encoder, path), rtol=0, atol=ATOL)


def test_a_batch_with_lengths_gives_each_row_the_vector_of_its_own_file(encoder, tmp_path):
    a, b = speech_like(2.0, 16000, seed=1), speech_like(1.3, 16000, seed=2)
    paths = []
    for name, waveform in (('a.wav', a), ('b.wav', b)):
        soundfile.write(tmp_path / name, waveform, 16000, subtype='FLOAT')
        paths.append(str(tmp_path / name))
    batch = np.zeros((2, len(a)), np.float32)
    batch[0], batch[1, :len(b)] = a, b
    rows = tools.embed(encoder, torch.from_numpy(batch), 16000, lengths=[len(a), len(b)])
    assert rows.shape == (2, 192)
    torch.testing.assert_close(rows, tools.embed(encoder, paths), rtol=0, atol=ATOL)
    torch.testing.assert_close(rows[1], tools.embed(encoder, paths[1]), rtol=0, atol=ATOL)
    relative = torch.tensor([1.0, len(b) / len(a)])  # SpeechBrain's wav_lens
    torch.testing.assert_close(tools.embed(encoder, torch.from_numpy(batch), 16000, lengths=relative), rows, rtol=0,
                               atol=0)
    unpadded = tools.embed(encoder, torch.from_numpy(batch), 16000)[1]
    assert not torch.allclose(unpadded, rows[1], atol=1e-3)  # without lengths the zeros are part of row 1
    with pytest.raises(ValueError, match=r'lengths \[16000\] do not fit a batch of shape \[2, 32000\]'):
        tools.embed(encoder, batch, 16000, lengths=[16000])


@pytest.mark.parametrize('rate', [8000, 44100])
def test_other_rates_are_resampled_alike_from_a_file_and_an_array(encoder, tmp_path, rate):
    waveform = speech_like(1.5, rate, seed=3)
    soundfile.write(tmp_path / 'a.wav', waveform, rate, subtype='FLOAT')
    from_file = tools.embed(encoder, str(tmp_path / 'a.wav'))
    torch.testing.assert_close(tools.embed(encoder, waveform, rate), from_file, rtol=0, atol=ATOL)
    resampled = read_audio(str(tmp_path / 'a.wav'), 16000)
    assert abs(len(resampled) - 1.5 * 16000) <= 1
    torch.testing.assert_close(tools.embed(encoder, resampled, 16000), from_file, rtol=0, atol=ATOL)


def test_an_m4a_file_is_decoded_through_pyav(encoder, tmp_path):
    av = pytest.importorskip('av', reason='PyAV decodes AAC')
    waveform = speech_like(1.0, 16000, seed=4)
    path = str(tmp_path / 'a.m4a')
    with av.open(path, 'w') as container:  # AAC in MP4, as VoxCeleb2 ships
        stream = container.add_stream('aac', rate=16000, layout='mono')
        frame = av.AudioFrame.from_ndarray(waveform[None], format='flt', layout='mono')
        frame.rate = 16000
        for part in (*stream.encode(frame), *stream.encode(None)):
            container.mux(part)
    decoded, rate = decode_with_av(path)
    assert rate == 16000 and decoded.shape[0] == 1 and abs(decoded.shape[1] - 16000) < 3000  # AAC adds priming
    torch.testing.assert_close(tools.embed(encoder, path), tools.embed(encoder, decoded[0], rate), rtol=0, atol=ATOL)


def test_inputs_shorter_than_a_window_are_wrap_padded(encoder):
    short = speech_like(0.01, 16000, seed=5)  # 160 samples: less than one 400-sample window
    torch.testing.assert_close(tools.embed(encoder, short, 16000), tools.embed(encoder, wrap_pad(short, 400), 16000),
                               rtol=0, atol=ATOL)
    assert tools.protocol_vectors(encoder, short, 16000).shape == (384,)


def test_bad_inputs_are_errors_naming_them_and_silence_warns(encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.wav'):
        tools.embed(encoder, str(tmp_path / 'missing.wav'))
    with pytest.raises(ValueError, match='the waveform: empty: no samples'):
        tools.embed(encoder, np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match='row 1 of the batch: NaN or infinite samples'):
        tools.embed(encoder, np.stack([np.ones(800), np.full(800, np.nan)]), 16000)
    with pytest.raises(ValueError, match=r'give the sampling_rate of a waveform \(the model takes 16000 Hz\)'):
        tools.embed(encoder, np.zeros(16000, np.float32))
    for rate in (0, -16000, 16000.5, '16000', 999, True):
        with pytest.raises(ValueError, match=rf'sampling_rate must be a whole number of Hz, at least 1000; got '
                                             rf'{re.escape(repr(rate))}$'):
            tools.embed(encoder, np.ones(16000, np.float32), rate)
    with pytest.raises(ValueError, match=r'a list of paths and waveforms \(arrays or tensors\), not of lists'):
        tools.embed(encoder, [np.ones(800, np.float32), [np.ones(800, np.float32)] * 2], 16000)
    with pytest.raises(ValueError, match=r'shape \[2, 3, 400\]'):
        tools.embed(encoder, np.zeros((2, 3, 400), np.float32), 16000)
    (tmp_path / 'notes.wav').write_text('not audio')
    with pytest.raises(ValueError, match='notes.wav: neither libsndfile nor FFmpeg reads it as audio'):
        tools.embed(encoder, str(tmp_path / 'notes.wav'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        tools.embed(encoder, np.zeros(16000, np.float32), 16000)
    assert [str(w.message) for w in caught] == ['the waveform: silent or nearly (RMS below -80 dBFS); it holds next '
                                                'to nothing of a speaker']


PEAK_MEMORY = """
import resource, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from speakerkit import tools
from speakerkit.model import ECAPA_TDNN
torch.manual_seed(0)
encoder = ECAPA_TDNN(512, 16000).eval()
tools.embed(encoder, np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ten_seconds = np.random.default_rng(1).standard_normal((2, 160000)).astype(np.float32) * 0.1
shapes = [tuple(tools.embed(encoder, audio, 16000).shape) for audio in
          (ten_seconds, torch.from_numpy(ten_seconds[:1]), ten_seconds.T.copy(), ten_seconds[0])]
print(shapes, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow
def test_ten_second_batches_and_channel_layouts_embed_in_bounded_memory():
    """[2, T] once asked for 22 GB and [1, T] for 32 GiB; ECAPA-TDNN C=512 on 2 x 10 s needs well under 1 GiB
    more than embedding 1 s (peak resident memory of a fresh process, in MiB)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ran = subprocess.run([sys.executable, '-c', PEAK_MEMORY, root], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    shapes, grown = ran.stdout.rsplit(' ', 1)
    assert shapes == '[(2, 192), (1, 192), (192,), (192,)]'
    assert float(grown) < 1024
