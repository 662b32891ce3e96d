"""The notebook helpers: load a checkpoint (`load_model`), embed recordings (`embed`), their protocol vectors
and score (`protocol_vectors`, `score`), decide with a calibration (`load_calibration`, `verify`), and export
(torch.export, TorchScript, ONNX). The evaluation protocol itself, with
the trial path, is evaluation.py's."""

import copy
import dataclasses
import importlib.util
import math
import os
import warnings

import numpy as np
import torch

from speakerkit.checkpoints import (atomic_write, calibration_path, encoder_config_path, encoder_weights,
                                    load_state_dict_file, mismatches, read_calibration, read_encoder_config)
from speakerkit.dataLoader import (LOWEST_FILE_RATE, MIN_SECONDS, NEAR_SILENT, audio_problem, near_silent, read_audio,
                                   resample, wrap_pad)
from speakerkit.errors import UserError
from speakerkit.evaluation import calibrated_pair, protocol_vectors_of, whole_embeddings
from speakerkit.model import ConvMelSpectrogram, EncoderConfig, architecture_of


def load_model(path, model=None, C=None, sampling_rate=None, device='cpu'):
    """An encoder in eval mode from a checkpoint (this toolkit's or the original ECAPA-TDNN code's). The
    architecture comes from the JSON written beside the checkpoint or, without one, from the weights' names and
    shapes (`model.architecture_of`; what it found is printed); `model`, `C` and `sampling_rate`, when given,
    override either."""
    weights = encoder_weights(load_state_dict_file(path))
    if os.path.exists(encoder_config_path(path)):
        config = read_encoder_config(path)
    else:
        config = architecture_of(weights)
        if config is None:
            config = EncoderConfig(model='ecapa-tdnn', C=1024, sampling_rate=16000)
        else:
            print(f'{path}: no {os.path.basename(encoder_config_path(path))} beside it; its weights are those of '
                  f'{config.model} C={config.C}, embedding {config.embedding_dim}, {config.sampling_rate} Hz')
    given = {'model': model, 'C': C, 'sampling_rate': sampling_rate}
    config = dataclasses.replace(config, **{name: value for name, value in given.items() if value})
    encoder = config.build()
    try:
        encoder.load_state_dict(weights)
    except RuntimeError:
        problems = '; '.join(mismatches(encoder.state_dict(), weights))
        raise UserError(f'{path}: does not fit a {type(encoder).__name__} with {config} (give --model, --C or '
                        f'--sampling_rate where the checkpoint has no JSON beside it): {problems}') from None
    return encoder.to(device).eval()


def pcm_full_scale(samples):
    """The full scale of integer PCM `samples`: 2**15 for int16, and for wider types holding values in int16's
    range (what `np.array` of Python ints or `torch.tensor` make of 16-bit samples); 2**31 for other int32
    (soundfile's 32-bit PCM). Wider values in an int64 array say nothing of their scale: a `ValueError`."""
    if samples.dtype.itemsize == 1:
        return float(2 ** 7)
    peak = int(np.abs(samples.astype(np.int64)).max()) if samples.size else 0
    if samples.dtype.itemsize == 2 or peak <= 2 ** 15:
        return float(2 ** 15)
    if samples.dtype.itemsize == 4:
        return float(2 ** 31)
    raise ValueError(f'{samples.dtype} samples beyond the 16-bit range (peak {peak}): give them as int16 or int32 '
                     f'PCM, or as floats in [-1, 1]')


def as_recordings(audio, sampling_rate, rate, lengths=None, channels=False):
    """(1-D float32 waveforms at `rate`, whether `audio` was one recording) for `embed`; see there."""
    if isinstance(audio, (list, tuple)):
        if lengths is not None or not audio:
            raise ValueError('give lengths with a [N, T] batch, not a list' if audio else 'an empty list')
        if any(isinstance(item, (list, tuple)) for item in audio):  # its recordings would be cut to the first
            raise ValueError('a list of paths and waveforms (arrays or tensors), not of lists')
        return [as_recordings(item, sampling_rate, rate, channels=True)[0][0] for item in audio], False
    if isinstance(audio, (str, os.PathLike)):
        return [checked_waveform(read_audio(audio, rate), os.fspath(audio), rate, rate)], True
    if isinstance(audio, torch.Tensor):  # bfloat16 and float16 have no numpy counterpart of use here
        audio = audio.detach().cpu()
        samples = (audio.float() if audio.is_floating_point() else audio).numpy()
    else:
        samples = np.asarray(audio)
    if sampling_rate is None:
        raise ValueError(f'give the sampling_rate of a waveform (the model takes {rate} Hz)')
    sampling_rate = checked_rate(sampling_rate)
    if np.issubdtype(samples.dtype, np.signedinteger):
        samples = samples / pcm_full_scale(samples)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f'a waveform of {samples.dtype}: give float or signed integer samples')
    samples = samples.astype(np.float32)
    if samples.ndim == 2 and (channels or samples.shape[0] > samples.shape[1]):
        samples = samples.mean(axis=1 if samples.shape[0] > samples.shape[1] else 0)
    if samples.ndim == 1:
        if lengths is not None:
            raise ValueError('lengths are for a [N, T] batch')
        return [checked_waveform(samples, 'the waveform', sampling_rate, rate)], True
    if samples.ndim != 2:
        raise ValueError(f'a waveform of shape {list(samples.shape)}: give [T], [T, C], [C, T] or [N, T]')
    lengths = [samples.shape[1]] * len(samples) if lengths is None else samples_in_rows(lengths, samples.shape[1])
    if len(lengths) != len(samples) or not all(0 <= n <= samples.shape[1] for n in lengths):
        raise ValueError(f'lengths {lengths} do not fit a batch of shape {list(samples.shape)}')
    return [checked_waveform(row[:n], f'row {i} of the batch', sampling_rate, rate)
            for i, (row, n) in enumerate(zip(samples, lengths))], False


def samples_in_rows(lengths, width):
    """The samples of each row of a batch `width` samples wide: `lengths` as counts or, when they are all floats
    in (0, 1], as fractions of the width (SpeechBrain's relative `wav_lens`)."""
    values = np.asarray(lengths.detach().cpu() if isinstance(lengths, torch.Tensor) else lengths)
    if np.issubdtype(values.dtype, np.floating) and values.size and np.all((values > 0) & (values <= 1)):
        return [int(round(float(v) * width)) for v in values]
    return [int(n) for n in values]


def checked_rate(sampling_rate):
    """`sampling_rate` as an int: a whole number of Hz, at least the lowest rate of usable audio."""
    whole = isinstance(sampling_rate, (int, np.integer)) or (isinstance(sampling_rate, (float, np.floating))
                                                             and float(sampling_rate).is_integer())
    if isinstance(sampling_rate, bool) or not whole or sampling_rate < LOWEST_FILE_RATE:
        raise ValueError(f'sampling_rate must be a whole number of Hz, at least {LOWEST_FILE_RATE}; got '
                         f'{sampling_rate!r}')
    return int(sampling_rate)


def checked_waveform(waveform, name, sampling_rate, rate):
    """`waveform` resampled to `rate` as a tensor, wrap-padded to one analysis window (as training pads short
    files); a ValueError naming it when it is empty or not finite, a warning when it is near silent."""
    problem = audio_problem(waveform, skip_silent=False)
    if problem:
        raise ValueError(f'{name}: {problem}')
    if near_silent(waveform):
        warnings.warn(f'{name}: {NEAR_SILENT}; it holds next to nothing of a speaker', stacklevel=4)
    waveform = resample(np.ascontiguousarray(waveform), sampling_rate, rate)
    return torch.from_numpy(np.ascontiguousarray(wrap_pad(waveform, math.ceil(MIN_SECONDS * rate))))


def embed(encoder, audio, sampling_rate=None, lengths=None, channels=False):
    """The encoder's embedding of whole utterances (192-d for ECAPA-TDNN, unnormalised): the vector `--extract`
    writes and the exported TorchScript and ONNX models compute. `audio` is
      - a path (wav, flac, ... read by libsndfile; m4a, mp3 and other FFmpeg formats by PyAV),
      - a waveform at `sampling_rate` (resampled to the model's), numpy or torch, float or integer PCM:
        [T]; or 2-D with time on the longer axis: [T, C] (soundfile.read's layout) is one recording whose
        channels are averaged; [N, T] is a batch of N waveforms, one per row, of `lengths[i]` samples each
        when given (or, as floats in (0, 1], that fraction of T: SpeechBrain's relative `wav_lens`); with
        `channels=True` the rows of [C, T] are instead the channels of one recording (torchaudio.load's
        layout), averaged;
      - or a list of paths and waveforms, one recording each.
    Returns [D] for one recording, [N, D] for a batch or a list. Inputs shorter than one 25 ms window are
    wrap-padded to it; an empty or non-finite input is a ValueError naming it, a missing file a
    FileNotFoundError; near-silent input warns."""
    encoder.eval()
    waveforms, single = as_recordings(audio, sampling_rate, encoder.sampling_rate, lengths, channels)
    embeddings = whole_embeddings(encoder, waveforms, next(encoder.parameters()).device)
    return embeddings[0] if single else embeddings


def protocol_vectors(encoder, audio, sampling_rate=None, lengths=None, channels=False):
    """The evaluation protocol's vectors (module docstring: the normalised whole-utterance embedding and the
    mean of five 3 s crops, [2D]), whose dot product is the score `--eval` and `score` give; same inputs and
    shapes as `embed`."""
    encoder.eval()
    waveforms, single = as_recordings(audio, sampling_rate, encoder.sampling_rate, lengths, channels)
    vectors = protocol_vectors_of(encoder, waveforms, next(encoder.parameters()).device)
    return vectors[0] if single else vectors


def score(encoder, audio_1, audio_2, sampling_rate=None):
    """The protocol score of two recordings (paths, or waveforms at `sampling_rate`): about 1 for one speaker."""
    return float(protocol_vectors(encoder, audio_1, sampling_rate) @ protocol_vectors(encoder, audio_2, sampling_rate))


def load_calibration(path):
    """The Calibration that --calibrate wrote beside checkpoint `path` (metrics.Calibration: `llr`, `decide`,
    `threshold`); a ValueError when there is none."""
    calibration = read_calibration(path)
    if calibration is None:
        raise UserError(f'{calibration_path(path)}: no calibration beside {path}; run --calibrate first')
    return calibration


def verify(encoder, audio_1, audio_2, calibration, sampling_rate=None):
    """(score, calibrated log-likelihood ratio, whether the same speaker at the calibration's p_target) of two
    recordings (paths, or waveforms at `sampling_rate`), with a `calibration` from `load_calibration`; the score
    is the protocol score, of centred vectors where the calibration was fitted with --subtract_mean."""
    encoder.eval()
    waveforms = []
    for audio in (audio_1, audio_2):
        found, single = as_recordings(audio, sampling_rate, encoder.sampling_rate)
        if not single:
            raise ValueError(f'verify compares two recordings; got a batch of {len(found)}')
        waveforms += found
    vectors = protocol_vectors_of(encoder, waveforms, next(encoder.parameters()).device)
    return calibrated_pair(calibration, vectors, [len(w) / encoder.sampling_rate for w in waveforms])


class ExportableEncoder(torch.nn.Module):
    """An eval-mode copy of an encoder with waveform [B, T] in and embedding out (no augmentation), its
    spectrum computed by convolution so that tracing and ONNX export can follow it."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).cpu().eval()
        front = self.encoder.torchfbank
        if isinstance(front, torch.nn.Sequential):  # our log-mel front end
            front[1] = ConvMelSpectrogram(front[1])
        else:  # another toolkit's features (published.py)
            front.by_convolution = True

    def forward(self, waveform):
        return self.encoder(waveform, False)


def _export_example(encoder):
    return 0.1 * torch.randn(2, 2 * encoder.sampling_rate, generator=torch.Generator().manual_seed(0))


def export_torchscript(encoder, path):
    """A traced TorchScript module, loadable with `torch.jit.load` without this code; any batch and length."""
    module = ExportableEncoder(encoder)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning, message='.*torch.jit')
        traced = torch.jit.trace(module, _export_example(encoder))
        atomic_write(path, lambda f: torch.jit.save(traced, f))


def export_program(encoder, path):
    """A `torch.export` program (.pt2), loadable with `torch.export.load(path).module()` without this code (and
    without TorchScript's deprecation warnings); any batch and length the encoder takes."""
    module = ExportableEncoder(encoder)
    free = torch.export.Dim.AUTO
    with torch.no_grad():
        program = torch.export.export(module, (_export_example(encoder),), dynamic_shapes=({0: free, 1: free},))
    atomic_write(path, lambda f: torch.export.save(program, f))


def export_onnx(encoder, path):
    """An ONNX graph (opset 17) with input `waveform` [batch, samples] and output `embedding`."""
    if importlib.util.find_spec('onnx') is None:
        raise UserError(f'{path}: ONNX export needs the onnx package (pip install -r requirements-extras.txt)')
    module = ExportableEncoder(encoder)

    def write(f):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*[Cc]onstant folding')
            torch.onnx.export(module, (_export_example(encoder),), f, input_names=['waveform'],
                              output_names=['embedding'], opset_version=17, dynamo=False,
                              dynamic_axes={'waveform': {0: 'batch', 1: 'samples'}, 'embedding': {0: 'batch'}})
    atomic_write(path, write)
