"""Encoders in the layouts of other toolkits' published checkpoints, so that those load, evaluate, fine-tune and
export here like ours: waveform [B, T] in, embedding [B, D] out, the toolkit's own features inside.

  SpeechBrainECAPA  `--model ecapa-speechbrain`: SpeechBrain's ECAPA-TDNN (speechbrain/spkrec-ecapa-voxceleb:
                    its `embedding_model.ckpt` loads as it is), with SpeechBrain's filterbank features and
                    per-utterance mean normalisation
  WespeakerResNet   `--model resnet34-wespeaker` (and every depth of model.RESNET_DEPTHS): wespeaker's ResNet
                    (its VoxCeleb ResNet34/221/293 `avg_model.pt` loads; its margin head is left out), with
                    Kaldi filterbank features and per-utterance mean normalisation, as wespeaker extracts
  WespeakerECAPA    `--model ecapa-wespeaker`: wespeaker's ECAPA-TDNN with global context (ECAPA_TDNN_GLOB_c1024,
                    _c512 with --C 512), with the same features

Written from the published architecture (Desplanques et al. 2020, as SpeechBrain lays it out: parameter names,
the order of activation and batch norm, reflect-padded 'same' convolutions, attentive statistics pooling with
global context, channels [C, C, C, C, 3C]); tests/test_published.py compares it with SpeechBrain's own code.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchaudio

from speakerkit.model import FbankAug, ResNet, stft_kernels


def mel(hz):
    return 2595 * math.log10(1 + hz / 700)


class SpeechBrainFbank(nn.Module):
    """SpeechBrain's `Fbank` and sentence mean normalisation: waveform [B, T] -> [B, n_mels, frames]. 25 ms
    Hamming windows every 10 ms, centred on zero padding, a 400-point FFT's power spectrum, `n_mels` triangular
    filters whose centres are evenly spaced on the mel scale from 0 Hz to half the rate (each filter as wide
    on both sides as the distance to the centre below it), 10 log10 of the energies (at least 1e-10), each
    utterance floored 80 dB below its loudest value, then each utterance's mean over time subtracted. No
    state: the filters and window are rebuilt from the rate."""

    def __init__(self, sampling_rate, n_mels=80, n_fft=400):
        super().__init__()
        self.n_fft = n_fft
        self.window_length = round(sampling_rate * 0.025)
        self.hop = round(sampling_rate * 0.010)
        self.register_buffer('window', torch.hamming_window(self.window_length), persistent=False)
        centres_mel = torch.linspace(mel(0), mel(sampling_rate // 2), n_mels + 2)
        edges = 700 * (10 ** (centres_mel / 2595) - 1)
        centre, width = edges[1:-1], (edges[1:] - edges[:-1])[:-1]
        frequencies = torch.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
        slope = (frequencies.repeat(n_mels, 1) - centre[:, None]) / width[:, None]
        filters = torch.max(torch.zeros(1), torch.min(slope + 1.0, 1.0 - slope)).transpose(0, 1)
        self.register_buffer('filters', filters, persistent=False)
        self.by_convolution = False

    def power_spectrum(self, x):
        """[B, frames, n_fft // 2 + 1]: torch.stft's, or with `by_convolution` (for export: tracing and ONNX
        do not follow a complex STFT) one strided convolution with windowed cosine and sine kernels, equal to
        float32 rounding."""
        if not self.by_convolution:
            spectrum = torch.stft(x, self.n_fft, self.hop, self.window_length, self.window, center=True,
                                  pad_mode='constant', return_complex=True)
            return torch.view_as_real(spectrum).pow(2).sum(-1).transpose(1, 2)
        padded = F.pad(x.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2))
        real, imaginary = F.conv1d(padded, stft_kernels(self.window, self.n_fft), stride=self.hop).chunk(2, dim=1)
        return (real ** 2 + imaginary ** 2).transpose(1, 2)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            power = self.power_spectrum(x.float())
            decibels = 10 * torch.log10(torch.clamp(torch.matmul(power, self.filters), min=1e-10))
            decibels = torch.max(decibels, decibels.amax(dim=(1, 2), keepdim=True) - 80.0)
            return (decibels - decibels.mean(dim=1, keepdim=True)).transpose(1, 2)


class SameConv1d(nn.Module):
    """A 1-D convolution whose output keeps the input's length: the input reflected at both ends by half the
    kernel's reach (dilation x (kernel - 1) / 2), as SpeechBrain pads. Its parameters are `conv.*`."""

    def __init__(self, in_channels, out_channels, kernel_size=1, dilation=1):
        super().__init__()
        self.reach = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(self, x):
        return self.conv(F.pad(x, (self.reach, self.reach), mode='reflect') if self.reach else x)


class BatchNorm(nn.Module):
    """nn.BatchNorm1d under the name `norm`, where SpeechBrain's checkpoints keep it."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x):
        return self.norm(x)


class TDNNBlock(nn.Module):
    """Convolution, ReLU, then batch norm (in that order)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, dilation=1):
        super().__init__()
        self.conv = SameConv1d(in_channels, out_channels, kernel_size, dilation)
        self.norm = BatchNorm(out_channels)

    def forward(self, x):
        return self.norm(F.relu(self.conv(x)))


class Res2NetBlock(nn.Module):
    """The channels in `scale` groups: the first passes as it is, the second through a TDNN block, each next
    one through a TDNN block after the previous group's output is added to it."""

    def __init__(self, channels, kernel_size, dilation, scale=8):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList(TDNNBlock(channels // scale, channels // scale, kernel_size, dilation)
                                    for _ in range(scale - 1))

    def forward(self, x):
        groups = torch.chunk(x, self.scale, dim=1)
        outputs = [groups[0]]
        for k, block in enumerate(self.blocks, start=1):
            outputs.append(block(groups[k] if k == 1 else groups[k] + outputs[-1]))
        return torch.cat(outputs, dim=1)


class SEBlock(nn.Module):
    """Squeeze and excitation: each channel scaled by a gate computed from the channels' means over time."""

    def __init__(self, channels, bottleneck):
        super().__init__()
        self.conv1 = SameConv1d(channels, bottleneck)
        self.conv2 = SameConv1d(bottleneck, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(x.mean(dim=2, keepdim=True)))))
        return gate * x


class SERes2NetBlock(nn.Module):
    def __init__(self, channels, kernel_size, dilation, scale=8, se_channels=128):
        super().__init__()
        self.tdnn1 = TDNNBlock(channels, channels)
        self.res2net_block = Res2NetBlock(channels, kernel_size, dilation, scale)
        self.tdnn2 = TDNNBlock(channels, channels)
        self.se_block = SEBlock(channels, se_channels)

    def forward(self, x):
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def weighted_statistics(x, weights):
    """The mean and standard deviation over time of `x` [B, C, T] under `weights` that sum to 1 over time
    (the standard deviation from a variance of at least 1e-12)."""
    mean = (weights * x).sum(dim=2)
    variance = (weights * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)
    return mean, torch.sqrt(variance.clamp(1e-12))


class AttentiveStatisticsPooling(nn.Module):
    """Attention over time from each frame and the utterance's mean and standard deviation (global context),
    then the attention-weighted mean and standard deviation: [B, C, T] -> [B, 2C, 1]."""

    def __init__(self, channels, attention_channels=128):
        super().__init__()
        self.tdnn = TDNNBlock(3 * channels, attention_channels)
        self.conv = SameConv1d(attention_channels, channels)

    def forward(self, x):
        frames = x.shape[2]
        mean, std = weighted_statistics(x, torch.full_like(x[:, :1], 1.0 / frames))
        context = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, frames), std.unsqueeze(2).expand(-1, -1, frames)],
                            dim=1)
        attention = F.softmax(self.conv(torch.tanh(self.tdnn(context))), dim=2)
        return torch.cat(weighted_statistics(x, attention), dim=1).unsqueeze(2)


class SpeechBrainECAPA(nn.Module):
    """SpeechBrain's ECAPA-TDNN with channels [C, C, C, C, 3C] (the published VoxCeleb model: C=1024,
    embedding 192), kernels 5, 3, 3, 3, 1 with dilations 1, 2, 3, 4, 1, Res2Net scale 8, squeeze-excitation
    and attention bottlenecks of 128; its features are `SpeechBrainFbank`'s. `aug` masks the features as our
    encoders do in training (`model.FbankAug`)."""

    def __init__(self, C=1024, sampling_rate=16000, embedding_dim=192, n_mels=80):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.embedding_dim = embedding_dim
        self.torchfbank = SpeechBrainFbank(sampling_rate, n_mels)  # the name of every encoder's front end
        self.specaug = FbankAug()
        self.blocks = nn.ModuleList([TDNNBlock(n_mels, C, 5, 1)] +
                                    [SERes2NetBlock(C, 3, dilation) for dilation in (2, 3, 4)])
        self.mfa = TDNNBlock(3 * C, 3 * C)
        self.asp = AttentiveStatisticsPooling(3 * C)
        self.asp_bn = BatchNorm(6 * C)
        self.fc = SameConv1d(6 * C, embedding_dim)

    def forward(self, x, aug=False):
        with torch.no_grad():
            x = self.torchfbank(x)
            if aug:
                x = self.specaug(x)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        x = self.mfa(torch.cat(outputs[1:], dim=1))
        return self.fc(self.asp_bn(self.asp(x))).squeeze(2)


class KaldiFbank(nn.Module):
    """Kaldi's filterbank features as wespeaker computes them for extraction (torchaudio.compliance.kaldi.fbank
    of the waveform scaled to the 16-bit range, no dither, Hamming window, no energy term), for a batch:
    waveform [B, T] -> [B, n_mels, frames]. 25 ms frames every 10 ms that fit in the waveform, each frame's mean
    removed, pre-emphasis 0.97 (the first sample against itself), a Hamming window, the power spectrum of the
    frame zero-padded to a power of two (with `by_convolution`, for export, by products with cosines and
    sines, which tracing and ONNX follow), Kaldi's mel filters from 20 Hz to half the rate, the log of each
    energy (at least float32's epsilon), then each utterance's mean over time subtracted (wespeaker's CMN).
    No state: rebuilt from the rate."""

    def __init__(self, sampling_rate, n_mels=80):
        super().__init__()
        self.length = int(sampling_rate * 0.025)
        self.shift = int(sampling_rate * 0.010)
        self.padded = 1 << (self.length - 1).bit_length()
        self.register_buffer('window', torch.hamming_window(self.length, periodic=False, alpha=0.54, beta=0.46),
                             persistent=False)
        filters, _ = torchaudio.compliance.kaldi.get_mel_banks(n_mels, self.padded, float(sampling_rate), 20.0,
                                                                0.0, 100.0, -500.0, 1.0)
        self.register_buffer('filters', F.pad(filters, (0, 1)).transpose(0, 1).float(), persistent=False)
        self.by_convolution = False

    def export_kernels(self, device):
        """[2 (padded // 2 + 1), 1, length]: the frame's mean removed, pre-emphasis, the window and the real and
        imaginary parts of the DFT, one linear map of the frame's samples, as convolution kernels."""
        eye = torch.eye(self.length, dtype=torch.float64, device=device)
        centred = eye - 1.0 / self.length
        emphasis = eye - 0.97 * torch.cat((eye[:1], eye[:-1]))  # row i: sample i less 0.97 sample i - 1 (0: i)
        angle = 2 * math.pi * torch.arange(self.length, dtype=torch.float64, device=device)[:, None] * \
            torch.arange(self.padded // 2 + 1, dtype=torch.float64, device=device)[None, :] / self.padded
        dft = torch.cat((torch.cos(angle), torch.sin(angle)), dim=1) * self.window.double()[:, None]
        return (centred @ emphasis.T @ dft).T.float().unsqueeze(1)

    def power_spectrum(self, x):
        """[B, frames, padded // 2 + 1] of waveforms [B, T] at the 16-bit scale."""
        if self.by_convolution:  # tracing and ONNX follow neither unfold of a dynamic length nor the FFT
            real, imaginary = F.conv1d(x.unsqueeze(1), self.export_kernels(x.device), stride=self.shift).chunk(2, 1)
            return (real ** 2 + imaginary ** 2).transpose(1, 2)
        frames = x.unfold(1, self.length, self.shift)
        frames = frames - frames.mean(dim=2, keepdim=True)
        frames = frames - 0.97 * torch.cat((frames[..., :1], frames[..., :-1]), dim=2)
        return torch.fft.rfft(F.pad(frames * self.window, (0, self.padded - self.length))).abs().pow(2.0)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            power = self.power_spectrum(x.float() * 32768)
            logs = torch.log(torch.clamp(torch.matmul(power, self.filters), min=torch.finfo(torch.float32).eps))
            return (logs - logs.mean(dim=1, keepdim=True)).transpose(1, 2)


def wespeaker_statistics_pooling(x):
    """wespeaker's statistics pooling (TSTP): mean and standard deviation (from the unbiased variance plus 1e-7)
    over the last axis, concatenated: [B, C, T] -> [B, 2C]."""
    return torch.cat((x.mean(dim=-1), torch.sqrt(x.var(dim=-1) + 1e-7)), dim=1)


class KaldiFeatures:
    """The `features` of an encoder whose front end (`torchfbank`) is a `KaldiFbank`: its filterbank, then in
    training SpecAugment's masks (`specaug`)."""

    def features(self, x, aug):
        with torch.no_grad():
            x = self.torchfbank(x)
            return self.specaug(x) if aug else x


class WespeakerResNet(KaldiFeatures, ResNet):
    """model.ResNet under wespeaker's parameter names (the same as ours), with wespeaker's features
    (`KaldiFbank`) and its statistics pooling (standard deviation from the variance plus 1e-7)."""

    def __init__(self, block, num_blocks, C=32, sampling_rate=16000, embedding_dim=256, n_mels=80):
        super().__init__(block, num_blocks, C, sampling_rate, embedding_dim, n_mels)
        self.torchfbank = KaldiFbank(sampling_rate, n_mels)

    def pool(self, x):
        return wespeaker_statistics_pooling(x)


class ConvReluBn(nn.Module):
    """Convolution (zero-padded to keep the length), ReLU, batch norm: wespeaker's Conv1dReluBn (`conv`, `bn`)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                              dilation=dilation)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


class WespeakerRes2Conv(nn.Module):
    """wespeaker's Res2Conv1dReluBn: the channels in `scale` groups; group 0 through the first convolution, each
    next group k < scale - 1 through convolution k after the previous output is added to it; the last group
    passes as it is, at the end (`convs`, `bns`)."""

    def __init__(self, channels, kernel_size, dilation, scale=8):
        super().__init__()
        width = channels // scale
        self.width = width
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                                             dilation=dilation) for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(scale - 1))

    def forward(self, x):
        groups = torch.split(x, self.width, dim=1)
        outputs = []
        for k, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            outputs.append(bn(F.relu(conv(groups[k] if k == 0 else groups[k] + outputs[-1]))))
        return torch.cat(outputs + [groups[-1]], dim=1)


class WespeakerSE(nn.Module):
    """Squeeze and excitation with linear layers (`linear1`, `linear2`), wespeaker's SE_Connect."""

    def __init__(self, channels, bottleneck=128):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x):
        return x * torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2))))).unsqueeze(2)


class WespeakerSERes2Block(nn.Module):
    def __init__(self, channels, kernel_size, dilation, scale=8):
        super().__init__()
        self.se_res2block = nn.Sequential(ConvReluBn(channels, channels),
                                          WespeakerRes2Conv(channels, kernel_size, dilation, scale),
                                          ConvReluBn(channels, channels), WespeakerSE(channels))

    def forward(self, x):
        return x + self.se_res2block(x)


class WespeakerAttentivePooling(nn.Module):
    """wespeaker's ASTP with global context: attention from each frame and the utterance's mean and standard
    deviation (from the unbiased variance plus 1e-7), then the weighted mean and standard deviation (from the
    weighted second moment less the squared mean, at least 1e-7): [B, C, T] -> [B, 2C]."""

    def __init__(self, channels, bottleneck=128):
        super().__init__()
        self.linear1 = nn.Conv1d(3 * channels, bottleneck, kernel_size=1)
        self.linear2 = nn.Conv1d(bottleneck, channels, kernel_size=1)

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True).expand_as(x)
        std = torch.sqrt(x.var(dim=-1, keepdim=True) + 1e-7).expand_as(x)
        attention = torch.softmax(self.linear2(torch.tanh(self.linear1(torch.cat((x, mean, std), dim=1)))), dim=2)
        weighted_mean = torch.sum(attention * x, dim=2)
        variance = torch.sum(attention * x ** 2, dim=2) - weighted_mean ** 2
        return torch.cat([weighted_mean, torch.sqrt(variance.clamp(min=1e-7))], dim=1)


class WespeakerECAPA(KaldiFeatures, nn.Module):
    """wespeaker's ECAPA-TDNN with global context (its VoxCeleb ECAPA_TDNN_GLOB_c1024 and _c512): channels C in
    three SE-Res2Net blocks (dilations 2, 3, 4), their outputs joined into 1536 channels (whatever C), attentive
    statistics pooling, batch norm, a linear embedding; its features are `KaldiFbank`'s."""

    def __init__(self, C=1024, sampling_rate=16000, embedding_dim=192, n_mels=80):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.embedding_dim = embedding_dim
        self.torchfbank = KaldiFbank(sampling_rate, n_mels)  # the name of every encoder's front end
        self.specaug = FbankAug()
        self.layer1 = ConvReluBn(n_mels, C, kernel_size=5)
        self.layer2 = WespeakerSERes2Block(C, 3, 2)
        self.layer3 = WespeakerSERes2Block(C, 3, 3)
        self.layer4 = WespeakerSERes2Block(C, 3, 4)
        self.conv = nn.Conv1d(3 * C, 1536, kernel_size=1)
        self.pool = WespeakerAttentivePooling(1536)
        self.bn = nn.BatchNorm1d(3072)
        self.linear = nn.Linear(3072, embedding_dim)

    def forward(self, x, aug=False):
        first = self.layer1(self.features(x, aug))
        second = self.layer2(first)
        third = self.layer3(second)
        fourth = self.layer4(third)
        x = F.relu(self.conv(torch.cat([second, third, fourth], dim=1)))
        return self.linear(self.bn(self.pool(x)))
