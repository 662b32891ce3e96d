"""ReDimNet (Yakovlev et al., "Reshape Dimensions Network for Speaker Recognition", Interspeech 2024), its
published sizes B0-B6 as IDRnD/ReDimNet and wespeaker define them (wespeaker/models/redimnet.py), on wespeaker's
Kaldi filterbank features (`published.KaldiFbank`: 60 bins for B0, 72 for the others).

The network keeps one tensor of C x F values per frame (C channels times F frequency bins; F shrinks and C grows
by each stage's stride, their product stays) and views it two ways in turn: as a 2-D map [C, F, frames] for
convolution blocks over frequency and time, and flattened to [C x F, frames] for a block over time alone (four
depthwise convolutions of growing span, then one self-attention layer). Each stage's input is a learnt softmax
mixture of the stem's and every earlier stage's outputs; the last mixture is pooled (attentive statistics with
global context) into a linear embedding layer.

The parameter names are wespeaker's (`backbone.*`, `pool.*`, `seg_1.*`), so its checkpoints load as they are;
`--C` is the stem's channel count (each size's own by default).
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from speakerkit.model import Encoder
from speakerkit.published import KaldiFbank, KaldiFeatures, WespeakerAttentivePooling


class Stage(NamedTuple):
    stride: int            # frequency pooled by it, channels multiplied by it
    blocks: int            # 2-D blocks
    expansion: int         # the 2-D blocks' channels are expansion x C
    time_reduction: int    # the time block works on C x F / time_reduction channels (0: no time block)


class Size(NamedTuple):
    C: int
    n_mels: int
    block: str             # the 2-D block: 'resnet', 'resnet_fwse' (frequency-wise excitation) or 'convnext'
    group_divisor: int     # channels per group of the 2-D blocks' grouped convolutions
    stages: tuple


SIZES = {  # the published sizes, as wespeaker's ReDimNetB0 ... ReDimNetB6 build them
    'b0': Size(10, 60, 'resnet', 1, (Stage(1, 2, 1, 30), Stage(2, 3, 2, 30), Stage(1, 3, 3, 30),
                                     Stage(2, 4, 2, 10), Stage(1, 3, 1, 10))),
    'b1': Size(12, 72, 'convnext', 8, (Stage(1, 2, 1, 0), Stage(2, 3, 1, 0), Stage(3, 4, 1, 12),
                                       Stage(2, 5, 1, 12), Stage(2, 3, 1, 8))),
    'b2': Size(16, 72, 'convnext', 4, (Stage(1, 2, 1, 12), Stage(2, 2, 1, 12), Stage(1, 3, 1, 12),
                                       Stage(2, 4, 1, 8), Stage(1, 4, 1, 8), Stage(2, 4, 1, 4))),
    'b3': Size(16, 72, 'resnet_fwse', 1, (Stage(1, 6, 4, 32), Stage(2, 6, 2, 32), Stage(1, 8, 2, 32),
                                          Stage(2, 10, 2, 16), Stage(1, 10, 1, 16), Stage(2, 8, 1, 16))),
    'b4': Size(32, 72, 'resnet_fwse', 1, (Stage(1, 4, 2, 48), Stage(2, 4, 2, 48), Stage(1, 6, 2, 48),
                                          Stage(2, 6, 1, 32), Stage(1, 8, 1, 24), Stage(2, 4, 1, 16))),
    'b5': Size(32, 72, 'resnet_fwse', 16, (Stage(1, 4, 2, 48), Stage(2, 4, 2, 48), Stage(1, 6, 2, 48),
                                           Stage(2, 6, 1, 32), Stage(1, 8, 1, 24), Stage(2, 4, 1, 16))),
    'b6': Size(32, 72, 'resnet', 32, (Stage(1, 4, 4, 32), Stage(2, 6, 2, 32), Stage(1, 6, 2, 24),
                                      Stage(3, 8, 1, 24), Stage(1, 8, 1, 16), Stage(2, 8, 1, 16))),
}
TIME_KERNELS = (7, 19, 31, 59)  # the depthwise convolutions of each time block
ATTENTION_HEADS = 4


def width_problem(size, C):
    """Why ReDimNet `size` cannot have `C` stem channels, or None: each grouped convolution's channels must split
    into whole groups of `group_divisor`, and each time block's width into the attention heads."""
    chosen = SIZES[size]
    channels, flat = C, C * chosen.n_mels
    for i, stage in enumerate(chosen.stages):
        channels *= stage.stride
        for n in (channels, channels * stage.expansion):
            if n < chosen.group_divisor or n % (n // chosen.group_divisor):
                return (f'stage {i + 1}: {n} channels do not split into groups of {chosen.group_divisor} '
                        f'(a multiple of {chosen.group_divisor} works)')
        if stage.time_reduction and (flat // stage.time_reduction) % ATTENTION_HEADS:
            return (f'stage {i + 1}: a time block of {flat // stage.time_reduction} channels does not split into '
                    f'{ATTENTION_HEADS} attention heads')
    return None


class ChannelNorm(nn.Module):
    """Layer normalisation over the channels (dimension 1) of [B, C, ...], eps 1e-6."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        variance = (x - mean).pow(2).mean(dim=1, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean) / torch.sqrt(variance + 1e-6) * self.weight.view(shape) + self.bias.view(shape)


class DepthwiseBlock(nn.Module):
    """x + pointwise(GELU(batch norm(depthwise(x)))): ConvNeXt's shape, 1-D or 2-D, groups of `group_divisor`."""

    def __init__(self, channels, kernel_size, group_divisor=1, dims=2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.dwconvs = nn.ModuleList([conv(channels, channels, kernel_size, padding='same',
                                           groups=channels // group_divisor)])
        self.norm = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels)
        self.pwconv1 = conv(channels, channels, 1)

    def forward(self, x):
        return x + self.pwconv1(F.gelu(self.norm(self.dwconvs[0](x))))


class FrequencyExcitation(nn.Module):
    """Each frequency bin of [B, C, F, T] scaled by a sigmoid of a two-layer projection of the bins' means."""

    def __init__(self, bins, hidden):
        super().__init__()
        self.squeeze = nn.Linear(bins, hidden)
        self.exitation = nn.Linear(hidden, bins)

    def forward(self, x):
        weights = torch.sigmoid(self.exitation(F.relu(self.squeeze(x.mean(dim=(1, 3))))))
        return x * weights[:, None, :, None]


class GroupedResBlock(nn.Module):
    """Two grouped 3x3 convolutions, each followed by a pointwise one (ReLU then batch norm after the first,
    batch norm after the second), optional frequency-wise excitation, the input added, ReLU."""

    def __init__(self, channels, bins, group_divisor, excitation):
        super().__init__()
        groups = channels // group_divisor
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=groups)
        self.conv1pw = nn.Conv2d(channels, channels, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=groups)
        self.conv2pw = nn.Conv2d(channels, channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = FrequencyExcitation(bins, min(64, max(channels, 32))) if excitation else nn.Identity()

    def forward(self, x):
        y = self.bn1(F.relu(self.conv1pw(self.conv1(x))))
        y = self.se(self.bn2(self.conv2pw(self.conv2(y))))
        return F.relu(y + x)


class Block2d(nn.Module):
    """One 2-D block of a stage, under the reference's name `conv_block`."""

    def __init__(self, kind, channels, bins, group_divisor):
        super().__init__()
        if kind == 'convnext':
            self.conv_block = DepthwiseBlock(channels, (3, 3), group_divisor)
        else:
            self.conv_block = GroupedResBlock(channels, bins, group_divisor, excitation=kind == 'resnet_fwse')

    def forward(self, x):
        return self.conv_block(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over frames, [B, T, D] -> [B, T, D]."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (project(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for project in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden)
        self.output_dense = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.output_dense(F.gelu(self.intermediate_dense(x), approximate='tanh'))


class AttentionLayer(nn.Module):
    """A post-norm transformer layer over the frames of [B, D, T] (feed-forward width D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feed_forward = FeedForward(dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = x.transpose(1, 2)
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x)).transpose(1, 2)


class TimeBlock(nn.Module):
    """x + expand(time layers(reduce(x))) over [B, C x F, T]: a pointwise reduction to `hidden` channels and a
    channel norm, depthwise blocks of TIME_KERNELS spans, an attention layer, a pointwise expansion."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.red_dim_conv = nn.Sequential(nn.Conv1d(channels, hidden, 1), ChannelNorm(hidden))
        self.tcm = nn.Sequential(*(DepthwiseBlock(hidden, k, dims=1) for k in TIME_KERNELS),
                                 AttentionLayer(hidden, ATTENTION_HEADS))
        self.exp_dim_conv = nn.Conv1d(hidden, channels, 1)

    def forward(self, x):
        return x + self.exp_dim_conv(self.tcm(self.red_dim_conv(x)))


class Flatten(nn.Module):
    """[B, C, F, T] -> [B, F x C, T], frequency-major (the order the 2-D view is read back in)."""

    def forward(self, x):
        return x.transpose(1, 2).flatten(1, 2)


def as_2d(x, channels, bins):
    """[B, F x C, T] -> [B, C, F, T], the inverse of Flatten."""
    return x.unflatten(1, (bins, channels)).transpose(1, 2)


class Backbone(nn.Module):
    """The stem (a 3x3 convolution and a channel norm) and the stages, each fed a learnt mixture of the earlier
    outputs; [B, n_mels, T] -> [B, C x n_mels, T]."""

    def __init__(self, size, C):
        super().__init__()
        flat = C * size.n_mels
        self.inputs_weights = nn.ParameterList(
            [nn.Parameter(torch.ones(1, 1, 1, 1), requires_grad=False)]
            + [nn.Parameter(torch.zeros(1, n + 1, flat, 1)) for n in range(1, len(size.stages) + 1)])
        self.stem = nn.Sequential(nn.Conv2d(1, C, 3, padding='same'), ChannelNorm(C))
        self.shapes = []  # (channels, bins) of each stage's input
        channels, bins = C, size.n_mels
        for i, stage in enumerate(size.stages):
            self.shapes.append((channels, bins))
            wide = stage.stride * channels * stage.expansion
            layers = [nn.Conv2d(channels, wide, (stage.stride, 1), stride=(stage.stride, 1))]
            channels, bins = stage.stride * channels, bins // stage.stride
            layers += [Block2d(size.block, wide, bins, size.group_divisor) for _ in range(stage.blocks)]
            if stage.expansion != 1:  # back to `channels`, so that channels x bins stays C x n_mels
                layers.append(nn.Sequential(
                    nn.Conv2d(wide, channels, 3, padding='same', groups=channels // size.group_divisor),
                    nn.BatchNorm2d(channels, eps=1e-6), nn.GELU(), nn.Conv2d(channels, channels, 1)))
            layers.append(Flatten())
            if stage.time_reduction:
                layers.append(TimeBlock(flat, flat // stage.time_reduction))
            setattr(self, f'stage{i}', nn.Sequential(*layers))

    def mixture(self, outputs, i):
        """The outputs so far weighted by the softmax of mixture i's weights (one per output and channel) and summed
        one by one: stacking them first (the reference's way) copies them all and trains B2 7% slower on a CPU."""
        weights = torch.softmax(self.inputs_weights[i], dim=1)
        return sum(weights[:, n] * output for n, output in enumerate(outputs))

    def forward(self, x):
        outputs = [Flatten()(self.stem(x.unsqueeze(1)))]
        for i, shape in enumerate(self.shapes):
            outputs.append(getattr(self, f'stage{i}')(as_2d(self.mixture(outputs, i), *shape)))
        return self.mixture(outputs, len(self.shapes))


class ReDimNet(KaldiFeatures, Encoder):
    """ReDimNet of one of the published `size`s (module docstring), `C` the stem's channels."""

    def __init__(self, size='b2', C=None, sampling_rate=16000, embedding_dim=192):
        chosen = SIZES[size]
        C = C or chosen.C
        problem = width_problem(size, C)
        if problem:
            raise ValueError(f'ReDimNet {size.upper()} with C={C}: {problem}')
        super().__init__(sampling_rate, embedding_dim, chosen.n_mels)
        self.torchfbank = KaldiFbank(sampling_rate, chosen.n_mels)
        self.backbone = Backbone(chosen, C)
        self.pool = WespeakerAttentivePooling(C * chosen.n_mels)
        self.seg_1 = nn.Linear(2 * C * chosen.n_mels, embedding_dim)

    def forward(self, x, aug=False):
        return self.seg_1(self.pool(self.backbone(self.features(x, aug))))
