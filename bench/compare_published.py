"""Our encoders in other toolkits' layouts (speakerkit/published.py, campplus.py, redimnet.py) against those
toolkits' own code: the largest difference of the embeddings for the same random weights (batch-norm statistics
included; parameters that start constant, as ReDimNet's stage mixtures and zero biases do, drawn at random) and
waveforms.

  python bench/compare_published.py [--wespeaker DIR]

SpeechBrain's ECAPA-TDNN comes from the installed `speechbrain` (requirements-test.txt); wespeaker's models
from a checkout of wenet-e2e/wespeaker at DIR (not on PyPI), imported without its package's __init__. Prints one
line per model: its size, the largest absolute difference, and the largest absolute value for scale.
"""

import argparse
import os
import sys
import types

import torch
import torchaudio

from common import ROOT  # noqa: F401 (puts the checkout on the path)
from speakerkit.checkpoints import encoder_weights
from speakerkit.model import build_encoder
from speakerkit.redimnet import SIZES


def randomise(network):
    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.normal_(parameter.flatten()[0].item(), 0.2)  # a constant start (zero biases, ones)
        for module in network.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                if module.affine:
                    module.weight.normal_(1, 0.2)
                    module.bias.normal_(0, 0.2)
    return network.eval()


def speechbrain_cases():
    from speechbrain.lobes.features import Fbank
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
    from speechbrain.processing.features import InputNormalization
    for C in (512, 1024):
        network = randomise(ECAPA_TDNN(80, channels=[C] * 4 + [3 * C], lin_neurons=192))

        def reference(waveforms, network=network):
            lengths = torch.ones(len(waveforms))
            feats = InputNormalization(norm_type='sentence', std_norm=False)(Fbank(n_mels=80)(waveforms), lengths)
            return network(feats, lengths).squeeze(1)
        yield f'ecapa-speechbrain C={C}', 'ecapa-speechbrain', C, 192, network.state_dict(), reference


def wespeaker_features(waveform, n_mels=80):
    mat = torchaudio.compliance.kaldi.fbank(waveform.unsqueeze(0) * (1 << 15), num_mel_bins=n_mels, frame_length=25,
                                            frame_shift=10, dither=0.0, sample_frequency=16000,
                                            window_type='hamming', use_energy=False)
    return mat - torch.mean(mat, dim=0)


def wespeaker_cases(root):
    for name in ('wespeaker', 'wespeaker.models'):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, *name.split('.'))]
        sys.modules[name] = package
    from wespeaker.models import campplus, ecapa_tdnn, redimnet, resnet
    cases = [('ResNet34', 'resnet34-wespeaker', resnet.ResNet34, 32, 256, 80),
             ('ResNet293', 'resnet293-wespeaker', resnet.ResNet293, 32, 256, 80),
             ('ECAPA_TDNN_GLOB_c512', 'ecapa-wespeaker', ecapa_tdnn.ECAPA_TDNN_GLOB_c512, 512, 192, 80),
             ('ECAPA_TDNN_GLOB_c1024', 'ecapa-wespeaker', ecapa_tdnn.ECAPA_TDNN_GLOB_c1024, 1024, 192, 80),
             ('CAMPPlus', 'campplus', campplus.CAMPPlus, 32, 512, 80)]
    cases += [(f'ReDimNet{size.upper()}', f'redimnet-{size}', getattr(redimnet, f'ReDimNet{size.upper()}'), shape.C,
               192, shape.n_mels) for size, shape in SIZES.items()]
    for label, ours, build, C, dim, n_mels in cases:
        network = randomise(build(feat_dim=n_mels, embed_dim=dim))

        def reference(waveforms, network=network, n_mels=n_mels):
            output = network(torch.stack([wespeaker_features(w, n_mels) for w in waveforms]))
            return output[-1] if isinstance(output, tuple) else output  # CAM++ gives the embedding alone
        yield f'wespeaker {label}', ours, C, dim, network.state_dict(), reference


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--wespeaker', help='a checkout of wenet-e2e/wespeaker')
    args = parser.parse_args()
    torch.manual_seed(0)
    waveforms = 0.1 * torch.randn(3, 32000)
    cases = list(speechbrain_cases()) + (list(wespeaker_cases(args.wespeaker)) if args.wespeaker else [])
    for label, name, C, dim, state, reference in cases:
        ours = build_encoder(name, C, 16000, dim).eval()
        ours.load_state_dict(encoder_weights(state), strict=True)
        with torch.no_grad():
            expected, found = reference(waveforms), ours(waveforms)
        print(f'{label:<32} {sum(p.numel() for p in ours.parameters()) / 1e6:6.2f} M  largest difference '
              f'{(found - expected).abs().max().item():.3g} (largest value {expected.abs().max().item():.3g})')


if __name__ == '__main__':
    main()
