"""CAM++ (Wang et al., "CAM++: A Fast and Efficient Network for Speaker Verification Using Context-Aware
Masking", Interspeech 2023), as 3D-Speaker and wespeaker define it (wespeaker/models/campplus.py), on
wespeaker's Kaldi filterbank features (`published.KaldiFbank`).

A small 2-D residual front end over the filterbank image (`head`: the frequency axis halved three times, then
flattened into channels), then densely connected TDNN blocks whose every layer's output is scaled by a
context-aware mask (a sigmoid of the utterance's mean and of 100-frame segment means), transition layers
halving the channels after each block, mean and standard-deviation pooling and a linear embedding layer
followed by a batch norm without affine parameters.

The parameter names are wespeaker's and 3D-Speaker's (`head.*`, `xvector.*`), so their checkpoints load as
they are; `--C` is the dense blocks' growth rate (32 in the published models).
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from speakerkit.model import Encoder
from speakerkit.published import KaldiFbank, KaldiFeatures, wespeaker_statistics_pooling

SEGMENT_FRAMES = 100  # the context mask's segment length
DENSE_BLOCKS = ((12, 1), (24, 2), (16, 2))  # (layers, dilation) of each dense block; kernel 3


def batch_norm_relu(channels, affine=True, relu=True):
    """The reference's `nonlinear` stage: a batch norm named `batchnorm`, then a ReLU."""
    layers = [('batchnorm', nn.BatchNorm1d(channels, affine=affine))]
    return nn.Sequential(OrderedDict(layers + ([('relu', nn.ReLU())] if relu else [])))


class FrequencyResBlock(nn.Module):
    """Two 3x3 convolutions with a residual path; `stride` applies to the frequency axis only."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class FrequencyFrontEnd(nn.Module):
    """[B, n_mels, frames] -> [B, channels * n_mels / 8, frames]: a 3x3 convolution, two stages of two residual
    blocks each halving the frequency axis, a last strided convolution halving it again."""

    def __init__(self, channels=32, n_mels=80):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(FrequencyResBlock(channels, channels, 2), FrequencyResBlock(channels, channels, 1))
        self.layer2 = nn.Sequential(FrequencyResBlock(channels, channels, 2), FrequencyResBlock(channels, channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (n_mels // 8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        x = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(x)))))
        return x.flatten(1, 2)


class ContextMask(nn.Module):
    """A dilated convolution of the input whose output is scaled, channel by channel and frame by frame, by a
    sigmoid of a two-layer projection of the utterance's mean plus the mean of the frame's 100-frame segment."""

    def __init__(self, in_channels, out_channels, dilation, reduction=2):
        super().__init__()
        self.linear_local = nn.Conv1d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(in_channels, in_channels // reduction, 1)
        self.linear2 = nn.Conv1d(in_channels // reduction, out_channels, 1)

    def forward(self, x):
        frames = x.shape[-1]
        segments = F.avg_pool1d(x, SEGMENT_FRAMES, SEGMENT_FRAMES, ceil_mode=True)
        context = x.mean(dim=-1, keepdim=True) + segments.repeat_interleave(SEGMENT_FRAMES, dim=-1)[..., :frames]
        mask = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return self.linear_local(x) * mask


class DenseLayer(nn.Module):
    """Batch norm, ReLU, a 1x1 bottleneck to `bottleneck` channels, batch norm, ReLU, a `ContextMask`."""

    def __init__(self, in_channels, growth, bottleneck, dilation):
        super().__init__()
        self.nonlinear1 = batch_norm_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bottleneck, 1, bias=False)
        self.nonlinear2 = batch_norm_relu(bottleneck)
        self.cam_layer = ContextMask(bottleneck, growth, dilation)

    def forward(self, x):
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class DenseBlock(nn.ModuleList):
    """Layers each given every earlier output: the input grows by `growth` channels a layer."""

    def __init__(self, layers, in_channels, growth, bottleneck, dilation):
        super().__init__()
        for i in range(layers):
            self.add_module(f'tdnnd{i + 1}', DenseLayer(in_channels + i * growth, growth, bottleneck, dilation))

    def forward(self, x):
        for layer in self:
            x = torch.cat((x, layer(x)), dim=1)
        return x


class ConvStage(nn.Module):
    """A convolution and its `nonlinear` stage, in the order given (`norm_first`: a transition layer's)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, norm_first=False, affine=True):
        super().__init__()
        self.norm_first = norm_first
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                                bias=False)
        self.nonlinear = batch_norm_relu(in_channels if norm_first else out_channels, affine, relu=affine)

    def forward(self, x):
        if self.norm_first:
            return self.linear(self.nonlinear(x))
        if x.dim() == 2:  # the embedding layer, after pooling
            return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))
        return self.nonlinear(self.linear(x))


class StatisticsPooling(nn.Module):
    """`published.wespeaker_statistics_pooling` as the `stats` stage of the network."""

    def forward(self, x):
        return wespeaker_statistics_pooling(x)


class CAMPPlus(KaldiFeatures, Encoder):
    """CAM++ (module docstring): `C` the growth rate, bottlenecks of 4C, 128 channels into the first block."""

    def __init__(self, C=32, sampling_rate=16000, embedding_dim=512, n_mels=80, head_channels=32,
                 first_channels=128):
        super().__init__(sampling_rate, embedding_dim, n_mels)
        self.torchfbank = KaldiFbank(sampling_rate, n_mels)
        self.head = FrequencyFrontEnd(head_channels, n_mels)
        stages = [('tdnn', ConvStage(self.head.out_channels, first_channels, kernel_size=5, stride=2))]
        channels = first_channels
        for i, (layers, dilation) in enumerate(DENSE_BLOCKS, start=1):
            stages.append((f'block{i}', DenseBlock(layers, channels, C, 4 * C, dilation)))
            channels += layers * C
            stages.append((f'transit{i}', ConvStage(channels, channels // 2, norm_first=True)))
            channels //= 2
        stages += [('out_nonlinear', batch_norm_relu(channels)), ('stats', StatisticsPooling()),
                   ('dense', ConvStage(2 * channels, embedding_dim, affine=False))]
        self.xvector = nn.Sequential(OrderedDict(stages))
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x, aug=False):
        return self.xvector(self.head(self.features(x, aug)))
