"""Speaker encoders: waveform [B, T] in, embedding [B, D] out, features computed inside.

The front-end (pre-emphasis, log-mel, mean normalisation over time, SpecAugment-style masks) is shared by
every encoder. `ECAPA_TDNN` keeps the parameter and buffer names of TaoRuijie/ECAPA-TDNN so that its
published checkpoints load with a strict `load_state_dict`. `MODELS` maps each `--model` name to its
`EncoderSpec`.
"""

import dataclasses
import math
from typing import NamedTuple
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio


def frame_geometry(sampling_rate):
    """Window, hop and FFT size in samples for 25 ms windows and a 10 ms hop at `sampling_rate`."""
    win_length = int(round(0.025 * sampling_rate))
    hop_length = int(round(0.010 * sampling_rate))
    n_fft = 1 << (win_length - 1).bit_length()
    return win_length, hop_length, n_fft


def crop_samples(num_frames, sampling_rate):
    """Samples needed for `num_frames` hops plus the overhang of the last window (32240 for 200 at 16 kHz)."""
    win_length, hop_length, _ = frame_geometry(sampling_rate)
    return num_frames * hop_length + win_length - hop_length


class PreEmphasis(nn.Module):
    """y[t] = x[t] - coef * x[t-1], with the first sample reflected. The two taps are kept as the original's
    `flipped_filter` buffer (its checkpoints hold it) but applied as two products and a sum, not a convolution:
    the same values here, 10-20 times faster on a CPU, where the convolution took 8% of an evaluation."""

    def __init__(self, coef=0.97):
        super().__init__()
        self.register_buffer('flipped_filter', torch.tensor([[[-coef, 1.0]]]))

    def forward(self, x):
        x = F.pad(x.unsqueeze(1), (1, 0), 'reflect').squeeze(1)
        return self.flipped_filter[0, 0, 0] * x[:, :-1] + self.flipped_filter[0, 0, 1] * x[:, 1:]


class FbankAug(nn.Module):
    """One random time mask (0-9 frames) and one frequency mask (0-7 bins) per example, set to zero."""

    def __init__(self, freq_mask_width=(0, 8), time_mask_width=(0, 10)):
        super().__init__()
        self.freq_mask_width = freq_mask_width
        self.time_mask_width = time_mask_width

    @staticmethod
    def mask_along_axis(x, dim, width_range):
        batch, size = x.shape[0], x.shape[dim]
        mask_len = torch.randint(width_range[0], width_range[1], (batch, 1), device=x.device)
        # Uniform over [0, max(1, size - longest mask)), drawn without reading the lengths back to the host.
        upper = (size - mask_len.max()).clamp(min=1)
        mask_pos = (torch.rand((batch, 1), device=x.device) * upper).long()
        arange = torch.arange(size, device=x.device).view(1, -1)
        mask = (mask_pos <= arange) & (arange < mask_pos + mask_len)
        mask = mask.unsqueeze(2) if dim == 1 else mask.unsqueeze(1)
        return x.masked_fill(mask, 0.0)

    def forward(self, x):
        x = self.mask_along_axis(x, 2, self.time_mask_width)
        return self.mask_along_axis(x, 1, self.freq_mask_width)


def log_mel_frontend(sampling_rate, n_mels=80):
    """Pre-emphasis then a Hamming-window mel spectrogram; at 16 kHz exactly the reference's settings."""
    win_length, hop_length, n_fft = frame_geometry(sampling_rate)
    return nn.Sequential(
        PreEmphasis(),
        torchaudio.transforms.MelSpectrogram(
            sample_rate=sampling_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length,
            f_min=20, f_max=min(7600.0, 0.475 * sampling_rate), window_fn=torch.hamming_window,
            n_mels=n_mels),
    )


def stft_kernels(window, n_fft):
    """Convolution kernels [2 (n_fft // 2 + 1), 1, n_fft] whose outputs at a frame are the real and imaginary
    parts of its `n_fft`-point DFT after `window` (centred, zero-padded to n_fft): a STFT that tracing and
    ONNX export follow."""
    left = (n_fft - len(window)) // 2
    window = F.pad(window, (left, n_fft - len(window) - left)).double()
    bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=window.device)
    angle = 2 * math.pi * torch.arange(n_fft, dtype=torch.float64, device=window.device)[None, :] * \
        bins[:, None] / n_fft
    return (torch.cat((torch.cos(angle), -torch.sin(angle))) * window).float().unsqueeze(1)


class ConvMelSpectrogram(nn.Module):
    """The same power mel spectrogram as a torchaudio `MelSpectrogram` (centred reflect-padded frames, its
    window and filterbank), computed as one strided convolution with windowed cosine and sine kernels.
    Tracing and ONNX export handle this; they do not handle the complex STFT inside torchaudio's."""

    def __init__(self, mel):
        super().__init__()
        spectrogram = mel.spectrogram
        self.n_fft, self.hop_length = spectrogram.n_fft, spectrogram.hop_length
        self.register_buffer('kernels', stft_kernels(spectrogram.window, self.n_fft))
        self.register_buffer('fb', mel.mel_scale.fb.clone())

    def forward(self, x):
        x = F.pad(x.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2), mode='reflect')
        real, imag = F.conv1d(x, self.kernels, stride=self.hop_length).chunk(2, dim=1)
        power = real ** 2 + imag ** 2
        return torch.matmul(power.transpose(1, 2), self.fb).transpose(1, 2)


class Encoder(nn.Module):
    """Base class: `features()` turns a waveform into mean-normalised log-mel frames [B, n_mels, frames]."""

    def __init__(self, sampling_rate, embedding_dim, n_mels=80):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.embedding_dim = embedding_dim
        self.torchfbank = log_mel_frontend(sampling_rate, n_mels)
        self.specaug = FbankAug()

    def features(self, x, aug):
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x = self.torchfbank(x.float()) + 1e-6
            x = x.log()
            x = x - torch.mean(x, dim=-1, keepdim=True)
            if aug:
                x = self.specaug(x)
        return x


class SEModule(nn.Module):
    def __init__(self, channels, bottleneck=128):
        super().__init__()
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool1d(1),
            nn.Conv1d(channels, bottleneck, kernel_size=1),
            nn.ReLU(),
            nn.Conv1d(bottleneck, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.se(x)


class Bottle2neck(nn.Module):
    """Res2Net block: 1x1 conv, `scale - 1` hierarchical dilated convs, 1x1 conv, squeeze-excitation."""

    def __init__(self, inplanes, planes, kernel_size, dilation, scale=8):
        super().__init__()
        width = planes // scale
        self.conv1 = nn.Conv1d(inplanes, width * scale, kernel_size=1)
        self.bn1 = nn.BatchNorm1d(width * scale)
        self.nums = scale - 1
        padding = (kernel_size // 2) * dilation
        self.convs = nn.ModuleList(
            nn.Conv1d(width, width, kernel_size=kernel_size, dilation=dilation, padding=padding)
            for _ in range(self.nums))
        self.bns = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(self.nums))
        self.conv3 = nn.Conv1d(width * scale, planes, kernel_size=1)
        self.bn3 = nn.BatchNorm1d(planes)
        self.relu = nn.ReLU()
        self.width = width
        self.se = SEModule(planes)

    def forward(self, x):
        out = self.bn1(self.relu(self.conv1(x)))
        splits = torch.split(out, self.width, 1)
        pieces = []
        sp = splits[0]
        for i in range(self.nums):
            if i > 0:
                sp = sp + splits[i]
            sp = self.bns[i](self.relu(self.convs[i](sp)))
            pieces.append(sp)
        pieces.append(splits[self.nums])
        out = self.bn3(self.relu(self.conv3(torch.cat(pieces, 1))))
        return self.se(out) + x


class ECAPA_TDNN(Encoder):
    """ECAPA-TDNN with C channels, attentive statistics pooling and a 192-d embedding.

    `ECAPA_TDNN(1024, 16000)` has exactly the state-dict keys and shapes of TaoRuijie/ECAPA-TDNN.
    `forward(x, aug)` takes a waveform [B, T] at `sampling_rate`.
    """

    def __init__(self, C=1024, sampling_rate=16000, embedding_dim=192):
        super().__init__(sampling_rate, embedding_dim)
        self.conv1 = nn.Conv1d(80, C, kernel_size=5, stride=1, padding=2)
        self.relu = nn.ReLU()
        self.bn1 = nn.BatchNorm1d(C)
        self.layer1 = Bottle2neck(C, C, kernel_size=3, dilation=2)
        self.layer2 = Bottle2neck(C, C, kernel_size=3, dilation=3)
        self.layer3 = Bottle2neck(C, C, kernel_size=3, dilation=4)
        self.layer4 = nn.Conv1d(3 * C, 1536, kernel_size=1)
        self.attention = nn.Sequential(
            nn.Conv1d(4608, 256, kernel_size=1),
            nn.ReLU(),
            nn.BatchNorm1d(256),
            nn.Tanh(),
            nn.Conv1d(256, 1536, kernel_size=1),
            nn.Softmax(dim=2),
        )
        self.bn5 = nn.BatchNorm1d(3072)
        self.fc6 = nn.Linear(3072, embedding_dim)
        self.bn6 = nn.BatchNorm1d(embedding_dim)

    def forward(self, x, aug=False):
        x = self.features(x, aug)
        x = self.bn1(self.relu(self.conv1(x)))
        x1 = self.layer1(x)
        x2 = self.layer2(x + x1)
        x3 = self.layer3(x + x1 + x2)
        x = self.relu(self.layer4(torch.cat((x1, x2, x3), dim=1)))
        return self.bn6(self.fc6(self.bn5(self.attentive_statistics(x))))

    def attentive_statistics(self, x):
        """Attentive statistics pooling [B, C, T] -> [B, 2C]: the attention-weighted mean and standard deviation
        of each channel over time. The statistics are float32 under any autocast (the attention itself runs in
        it): in bfloat16, E[x^2] - mu^2 of a channel steady over time loses its digits to cancellation."""
        x = x.float()
        mean = torch.mean(x, dim=2, keepdim=True)
        std = torch.sqrt(torch.var(x, dim=2, keepdim=True).clamp(min=1e-4))
        w = self.attention(torch.cat((x, mean.expand_as(x), std.expand_as(x)), dim=1)).float()
        mu = torch.sum(x * w, dim=2)
        sg = torch.sqrt((torch.sum((x ** 2) * w, dim=2) - mu ** 2).clamp(min=1e-4))
        return torch.cat((mu, sg), 1)


def statistics_pooling(x):
    """Mean and standard deviation over the last axis, concatenated: [B, C, T] -> [B, 2C]."""
    mean = x.mean(dim=-1)
    std = torch.sqrt(x.var(dim=-1, unbiased=True).clamp(min=1e-5))
    return torch.cat((mean, std), dim=-1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def shortcut(in_planes, out_planes, stride):
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class ResNet(Encoder):
    """ResNet for speaker verification as wespeaker defines it: 2-D convolutions over the log-mel
    image, four stages (C, 2C, 4C, 8C channels; strides 1, 2, 2, 2), statistics pooling over time of
    the flattened channel x frequency map, one linear embedding layer."""

    def __init__(self, block, num_blocks, C=32, sampling_rate=16000, embedding_dim=256, n_mels=80):
        super().__init__(sampling_rate, embedding_dim, n_mels)
        self.conv1 = nn.Conv2d(1, C, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(C)
        stages = []
        in_planes = C
        for i, blocks in enumerate(num_blocks):
            planes, stride = C * 2 ** i, (1 if i == 0 else 2)
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        pooled_freq = math.ceil(n_mels / 8)
        self.seg_1 = nn.Linear(2 * in_planes * pooled_freq, embedding_dim)

    def forward(self, x, aug=False):
        x = self.features(x, aug).unsqueeze(1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.seg_1(self.pool(x.flatten(1, 2)))

    def pool(self, x):
        return statistics_pooling(x)


class TDNN(Encoder):
    """The x-vector network: five frame-level TDNN layers (contexts 5, 3 dilated 2, 3 dilated 3, 1, 1),
    mean and standard-deviation pooling, two 512-d segment layers; the second one's output is the
    embedding."""

    def __init__(self, C=512, sampling_rate=16000, embedding_dim=512, n_mels=80):
        super().__init__(sampling_rate, embedding_dim, n_mels)
        specs = [(n_mels, C, 5, 1), (C, C, 3, 2), (C, C, 3, 3), (C, C, 1, 1), (C, 1500, 1, 1)]
        self.frame_layers = nn.Sequential(*(
            nn.Sequential(nn.Conv1d(i, o, k, dilation=d), nn.ReLU(), nn.BatchNorm1d(o))
            for i, o, k, d in specs))
        self.segment6 = nn.Sequential(nn.Linear(3000, embedding_dim), nn.ReLU(), nn.BatchNorm1d(embedding_dim))
        self.segment7 = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, x, aug=False):
        x = self.frame_layers(self.features(x, aug))
        return self.segment7(self.segment6(statistics_pooling(x)))


RESNET_DEPTHS = {
    'resnet18': (BasicBlock, [2, 2, 2, 2]),
    'resnet34': (BasicBlock, [3, 4, 6, 3]),
    'resnet50': (Bottleneck, [3, 4, 6, 3]),
    'resnet101': (Bottleneck, [3, 4, 23, 3]),
    'resnet152': (Bottleneck, [3, 8, 36, 3]),
    'resnet221': (Bottleneck, [6, 16, 48, 3]),
    'resnet293': (Bottleneck, [10, 20, 64, 3]),
}


class EncoderSpec(NamedTuple):
    """How `--model NAME` is built: `build(C, sampling_rate, embedding_dim)` and the defaults of C (the
    width) and of the embedding size; `probe_width`, a small width it builds at (`architecture_of`)."""
    build: Callable
    width: int
    embedding_dim: int
    probe_width: int = 8


def _resnet(name):
    block, blocks = RESNET_DEPTHS[name]

    def build(C, sampling_rate, embedding_dim):
        return ResNet(block, blocks, C, sampling_rate, embedding_dim)
    return build


def _speechbrain_ecapa(C, sampling_rate, embedding_dim):
    from speakerkit.published import SpeechBrainECAPA  # published.py builds on this module
    return SpeechBrainECAPA(C, sampling_rate, embedding_dim)


def _wespeaker_ecapa(C, sampling_rate, embedding_dim):
    from speakerkit.published import WespeakerECAPA  # published.py builds on this module
    return WespeakerECAPA(C, sampling_rate, embedding_dim)


def _campplus(C, sampling_rate, embedding_dim):
    from speakerkit.campplus import CAMPPlus  # built on this module
    return CAMPPlus(C, sampling_rate, embedding_dim)


def _redimnet(size):
    def build(C, sampling_rate, embedding_dim):
        from speakerkit.redimnet import ReDimNet  # built on this module
        return ReDimNet(size, C, sampling_rate, embedding_dim)
    return build


# redimnet.SIZES' C, and the smallest power of two from 8 that it builds with (redimnet.width_problem)
REDIMNET_WIDTHS = {'b0': (10, 8), 'b1': (12, 8), 'b2': (16, 8), 'b3': (16, 16), 'b4': (32, 16), 'b5': (32, 16),
                   'b6': (32, 32)}
ALIASES = {'resnet': 'resnet34', 'redimnet': 'redimnet-b2'}  # a short name and the encoder it builds


def _wespeaker_resnet(name):
    block, blocks = RESNET_DEPTHS[name]

    def build(C, sampling_rate, embedding_dim):
        from speakerkit.published import WespeakerResNet  # published.py builds on this module
        return WespeakerResNet(block, blocks, C, sampling_rate, embedding_dim)
    return build


MODELS = {
    'ecapa-tdnn': EncoderSpec(ECAPA_TDNN, 1024, 192),
    'ecapa-speechbrain': EncoderSpec(_speechbrain_ecapa, 1024, 192),
    'ecapa-wespeaker': EncoderSpec(_wespeaker_ecapa, 1024, 192),
    'tdnn': EncoderSpec(TDNN, 512, 512),
    'campplus': EncoderSpec(_campplus, 32, 512),
    **{f'redimnet-{size}': EncoderSpec(_redimnet(size), width, 192, probe)
       for size, (width, probe) in REDIMNET_WIDTHS.items()},
    **{name: EncoderSpec(_resnet(name), 32, 256) for name in RESNET_DEPTHS},
    **{f'{name}-wespeaker': EncoderSpec(_wespeaker_resnet(name), 32, 256) for name in RESNET_DEPTHS},
}
MODELS |= {alias: MODELS[name] for alias, name in ALIASES.items()}


def width_problem(name, C):
    """Why encoder `name` cannot be built `C` wide, or None."""
    if name in ('ecapa-speechbrain', 'ecapa-wespeaker') and C % 8:
        return 'its Res2Net splits channels in 8 groups, so C must be a multiple of 8'
    if name.startswith('redimnet'):
        from speakerkit.redimnet import width_problem as redimnet_problem  # built on this module
        return redimnet_problem(ALIASES.get(name, name).removeprefix('redimnet-'), C)
    return None


def build_encoder(name, C=None, sampling_rate=16000, embedding_dim=None):
    """Build the encoder registered as `name`; None takes that encoder's default width or size."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    return spec.build(C or spec.width, sampling_rate, embedding_dim or spec.embedding_dim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """How to rebuild an encoder, as the JSON beside each checkpoint records it: the `model` name (a key of
    MODELS), its width `C`, `sampling_rate` in Hz and `embedding_dim` (None: the architecture's default). A
    value of the wrong kind is a ValueError naming the field."""
    model: str
    C: int
    sampling_rate: int
    embedding_dim: int | None = None

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model: {self.model!r} is none of {', '.join(MODELS)}")
        for name in ('C', 'sampling_rate', 'embedding_dim'):
            value = getattr(self, name)
            if not (value is None and name == 'embedding_dim') and \
                    (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f'{name}: {value!r} is not a positive whole number')

    def build(self):
        return build_encoder(self.model, self.C, self.sampling_rate, self.embedding_dim)


MEL_FILTERS = 'torchfbank.1.mel_scale.fb'
COMMON_RATES = (16000, 8000, 11025, 22050, 24000, 32000, 44100, 48000)


def mel_filters(sampling_rate):
    return log_mel_frontend(sampling_rate)[1].mel_scale.fb


def same_tensor(a, b):
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6)


def architecture_of(weights):
    """The EncoderConfig of the registered encoder that an encoder state_dict fits, read from its names and
    shapes: the architecture from the set of names, the width and the embedding size from the first and last
    tensors that follow them, the rate from the mel filters (which depend on it; 16000 when no common rate fits,
    or for an encoder that keeps no filters, as SpeechBrain's), and, among architectures with the same names (as
    ReDimNet B4 and B5), the one whose every shape fits. None when no architecture has these names and shapes."""
    for name in (n for n in MODELS if n not in ALIASES):
        width = MODELS[name].probe_width  # a small width and embedding 5: their tensors stand out
        probe = build_encoder(name, width, 16000, 5).state_dict()
        if probe.keys() != weights.keys():
            continue
        width_key = next(k for k, v in probe.items() if v.ndim and v.shape[0] == width)
        embedding_key = [k for k, v in probe.items() if v.ndim and v.shape[0] == 5][-1]
        rate = next((r for r in COMMON_RATES if MEL_FILTERS in weights and
                     same_tensor(weights[MEL_FILTERS], mel_filters(r))), 16000)
        config = EncoderConfig(model=name, C=weights[width_key].shape[0], sampling_rate=rate,
                               embedding_dim=weights[embedding_key].shape[0])
        built = config.build().state_dict()
        if all(built[k].shape == weights[k].shape for k in built):
            return config
    return None

