"""Encoders in the layouts of other toolkits' published checkpoints, so that those load, evaluate, fine-tune and
export here like ours: waveform [B, T] in, embedding [B, D] out, the toolkit's own features inside.

  SpeechBrainECAPA  `--model ecapa-speechbrain`: SpeechBrain's ECAPA-TDNN (speechbrain/spkrec-ecapa-voxceleb:
                    its `embedding_model.ckpt` loads as it is), with SpeechBrain's filterbank features and
                    per-utterance mean normalisation

Written from the published architecture (Desplanques et al. 2020, as SpeechBrain lays it out: parameter names,
the order of activation and batch norm, reflect-padded 'same' convolutions, attentive statistics pooling with
global context, channels [C, C, C, C, 3C]); tests/test_published.py compares it with SpeechBrain's own code.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from speakerkit.model import FbankAug


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
        left = (self.n_fft - self.window_length) // 2
        window = F.pad(self.window, (left, self.n_fft - self.window_length - left)).double()
        bins = torch.arange(self.n_fft // 2 + 1, dtype=torch.float64, device=x.device)
        angle = 2 * math.pi * torch.arange(self.n_fft, dtype=torch.float64, device=x.device)[None, :] * \
            bins[:, None] / self.n_fft
        kernels = (torch.cat((torch.cos(angle), -torch.sin(angle))) * window).float().unsqueeze(1)
        padded = F.pad(x.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2))
        real, imaginary = F.conv1d(padded, kernels, stride=self.hop).chunk(2, dim=1)
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
        self.features = SpeechBrainFbank(sampling_rate, n_mels)
        self.specaug = FbankAug()
        self.blocks = nn.ModuleList([TDNNBlock(n_mels, C, 5, 1)] +
                                    [SERes2NetBlock(C, 3, dilation) for dilation in (2, 3, 4)])
        self.mfa = TDNNBlock(3 * C, 3 * C)
        self.asp = AttentiveStatisticsPooling(3 * C)
        self.asp_bn = BatchNorm(6 * C)
        self.fc = SameConv1d(6 * C, embedding_dim)

    def forward(self, x, aug=False):
        with torch.no_grad():
            x = self.features(x)
            if aug:
                x = self.specaug(x)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        x = self.mfa(torch.cat(outputs[1:], dim=1))
        return self.fc(self.asp_bn(self.asp(x))).squeeze(2)
