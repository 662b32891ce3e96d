"""model.py: the reference ECAPA-TDNN layout, the front-end, every encoder's shapes and SpecAugment; the sizes
and widths of CAM++ (campplus.py) and ReDimNet (redimnet.py), whose exactness against wespeaker's code is in
test_published.py."""

import pytest
import torch
import torchaudio

from speakerkit import redimnet
from speakerkit.model import (ALIASES, ECAPA_TDNN, MODELS, REDIMNET_WIDTHS, FbankAug, PreEmphasis, architecture_of,
                              build_encoder, crop_samples, frame_geometry, width_problem)


def reference_ecapa_keys(C):
    """(name, shape) of every entry of TaoRuijie/ECAPA-TDNN's state_dict, from its published structure:
    pre-emphasis + MelSpectrogram(n_fft 512, 80 mels) in `torchfbank`, conv1, three Res2Net blocks of
    scale 8 with SE (bottleneck 128), layer4 to 1536 channels, attention 4608 -> 256 -> 1536, bn5, fc6, bn6."""
    def bn(name, n):
        return [(f'{name}.weight', (n,)), (f'{name}.bias', (n,)), (f'{name}.running_mean', (n,)),
                (f'{name}.running_var', (n,)), (f'{name}.num_batches_tracked', ())]

    def conv(name, out, inp, k):
        return [(f'{name}.weight', (out, inp, k)), (f'{name}.bias', (out,))]

    width = C // 8
    keys = [('torchfbank.0.flipped_filter', (1, 1, 2)), ('torchfbank.1.spectrogram.window', (400,)),
            ('torchfbank.1.mel_scale.fb', (257, 80))]
    keys += conv('conv1', C, 80, 5) + bn('bn1', C)
    for layer in ('layer1', 'layer2', 'layer3'):
        keys += conv(f'{layer}.conv1', C, C, 1) + bn(f'{layer}.bn1', C)
        for i in range(7):
            keys += conv(f'{layer}.convs.{i}', width, width, 3)
        for i in range(7):
            keys += bn(f'{layer}.bns.{i}', width)
        keys += conv(f'{layer}.conv3', C, C, 1) + bn(f'{layer}.bn3', C)
        keys += conv(f'{layer}.se.se.1', 128, C, 1) + conv(f'{layer}.se.se.3', C, 128, 1)
    keys += conv('layer4', 1536, 3 * C, 1)
    keys += conv('attention.0', 256, 4608, 1) + bn('attention.2', 256) + conv('attention.4', 1536, 256, 1)
    keys += bn('bn5', 3072) + [('fc6.weight', (192, 3072)), ('fc6.bias', (192,))] + bn('bn6', 192)
    return keys


@pytest.mark.parametrize('C', [512, 1024])
def test_ecapa_state_dict_matches_the_reference(C):
    state = ECAPA_TDNN(C, 16000).state_dict()
    assert sorted((k, tuple(v.shape)) for k, v in state.items()) == sorted(reference_ecapa_keys(C))


def test_ecapa_front_end_is_the_reference_mel_spectrogram():
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=512, win_length=400, hop_length=160, f_min=20, f_max=7600,
        window_fn=torch.hamming_window, n_mels=80)
    ours = ECAPA_TDNN(64, 16000).torchfbank[1]
    x = torch.randn(2, 16000)
    torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize('name,expected', [
    ('ecapa-tdnn', 15_444_544), ('resnet18', 4_105_440), ('resnet34', 6_634_336), ('resnet293', 28_626_016),
    ('tdnn', 4_618_644), ('campplus', 7_176_224), ('redimnet-b0', 1_001_851), ('redimnet-b1', 2_123_481),
    ('redimnet-b2', 4_888_241), ('redimnet-b3', 3_220_413), ('redimnet-b4', 6_432_305), ('redimnet-b5', 7_650_545),
    ('redimnet-b6', 15_006_257)])
def test_parameter_counts(name, expected):
    """Exact: a layer left out or of another shape changes the count (the published sizes, to their rounding:
    ResNet34 6.6 M and ResNet293 28.6 M in wespeaker's tables, the TDNN 4.6 M of the x-vector paper, CAM++ 7.2 M
    in its paper; ReDimNet B0-B6 1.0, 2.1, 4.9, 3.2, 6.4, 7.65 and 15.0 M as wespeaker's redimnet.py lists them)."""
    assert sum(p.numel() for p in build_encoder(name).parameters()) == expected


def test_eight_kilohertz_front_end_keeps_25_and_10_ms():
    assert frame_geometry(8000) == (200, 80, 256)
    mel = ECAPA_TDNN(64, 8000).torchfbank[1]
    assert mel.mel_scale.f_max < 4000 and mel.win_length == 200 and mel.hop_length == 80


@pytest.mark.parametrize('rate', [8000, 16000])
@pytest.mark.parametrize('name,C', [('ecapa-tdnn', 64), ('resnet18', 8), ('tdnn', 64), ('campplus', 8),
                                    ('redimnet-b0', 8), ('redimnet-b2', 8)])
def test_encoder_shapes_gradients_and_determinism(name, C, rate):
    torch.manual_seed(0)
    encoder = build_encoder(name, C, rate, embedding_dim=48)
    x = torch.randn(3, crop_samples(80, rate))
    out = encoder(x, aug=True)
    assert out.shape == (3, 48)
    out.square().sum().backward()
    trained = [p for p in encoder.parameters() if p.requires_grad]  # ReDimNet's first input weight is fixed
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), encoder(x), rtol=0, atol=0)
    assert encoder.sampling_rate == rate


def test_width_reaches_the_network():
    assert ECAPA_TDNN(256).conv1.out_channels == 256
    assert build_encoder('resnet34', 16).conv1.out_channels == 16
    assert build_encoder('tdnn', 128).frame_layers[0][0].out_channels == 128


def test_redimnet_sizes_widths_and_their_checks():
    for size, (width, probe) in REDIMNET_WIDTHS.items():
        assert width == redimnet.SIZES[size].C and width_problem(f'redimnet-{size}', width) is None
        assert MODELS[f'redimnet-{size}'].probe_width == probe and width_problem(f'redimnet-{size}', probe) is None
        assert all(width_problem(f'redimnet-{size}', w) for w in (8, 16, 32) if w < probe)  # the smallest
    assert MODELS['redimnet'] is MODELS[ALIASES['redimnet']] == MODELS['redimnet-b2']
    assert build_encoder('redimnet').backbone.stem[0].out_channels == 16
    assert width_problem('redimnet-b6', 100).startswith('stage 1: 100 channels do not split into groups of 32')
    with pytest.raises(ValueError, match='ReDimNet B3 with C=8: stage 1: a time block of 18 channels'):
        build_encoder('redimnet-b3', 8)


def test_redimnet_b4_and_b5_share_their_names_and_are_told_apart_by_shapes():
    b4, b5 = (build_encoder(f'redimnet-{s}', 16, 16000, 24).state_dict() for s in ('b4', 'b5'))
    assert b4.keys() == b5.keys()
    assert architecture_of(b4).model == 'redimnet-b4' and architecture_of(b5).model == 'redimnet-b5'
    assert architecture_of(b5).C == 16 and architecture_of(b5).embedding_dim == 24


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match='unknown model'):
        build_encoder('vgg')


def test_specaugment_masks_stay_within_their_widths():
    torch.manual_seed(0)
    features = torch.ones(64, 80, 200)
    masked = FbankAug()(features)
    zero_frames = (masked == 0).all(dim=1).sum(dim=1)
    zero_bins = (masked == 0).all(dim=2).sum(dim=1)
    assert zero_frames.max() <= 9 and zero_bins.max() <= 7
    assert zero_frames.float().mean() > 2 and zero_bins.float().mean() > 1
    assert ((masked == 0) == ((masked == 0).all(dim=1, keepdim=True) | (masked == 0).all(dim=2, keepdim=True))).all()


def test_pre_emphasis_is_the_original_two_tap_filter_with_the_first_sample_reflected():
    torch.manual_seed(0)
    emphasis = PreEmphasis()
    x = torch.randn(3, 4000) * 0.1
    filtered = torch.nn.functional.conv1d(torch.nn.functional.pad(x.unsqueeze(1), (1, 0), 'reflect'),
                                          torch.tensor([[[-0.97, 1.0]]])).squeeze(1)
    torch.testing.assert_close(emphasis(x), filtered, rtol=0, atol=1e-7)
    assert emphasis(x)[0, 0] == x[0, 0] - torch.tensor(0.97) * x[0, 1]
    assert list(emphasis.state_dict()) == ['flipped_filter']  # the original's checkpoints hold it


def test_attentive_statistics_are_float32_under_bfloat16_autocast():
    """Channels steady over time (3 + 0.01 noise): in bfloat16, E[x^2] - mu^2 would cancel to nothing; the pooled
    mean and standard deviation must be the float64 formula's for the same frames and attention weights."""
    encoder = build_encoder('ecapa-tdnn', 16).eval()
    frames = 3 + 0.01 * torch.randn(2, 1536, 50, generator=torch.Generator().manual_seed(0))
    frames = frames.to(torch.bfloat16)
    captured = []
    encoder.attention.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        pooled = encoder.attentive_statistics(frames)
    x, weights = frames.double(), captured[0].double()
    mu = (x * weights).sum(2)
    sigma = ((x ** 2 * weights).sum(2) - mu ** 2).clamp(min=1e-4).sqrt()
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[:, :1536].double(), mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled[:, 1536:].double(), sigma, rtol=0.01, atol=1e-4)
