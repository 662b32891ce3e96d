"""published.py: SpeechBrain's ECAPA-TDNN and wespeaker's ResNets and ECAPA-TDNN, and campplus.py and redimnet.py
(CAM++ and ReDimNet B0-B6), exact against their own code (speechbrain from PyPI, in requirements-test.txt;
wespeaker, which PyPI does not carry, from a checkout named by WESPEAKER_CHECKOUT; each skipped with the reason
where it is missing), and checkpoints in their layouts loaded, evaluated, fine-tuned and exported through our
entry points."""

import os
import sys
import types

import numpy as np
import pytest
import torch
import torchaudio

from speakerkit import cli, tools
from speakerkit.checkpoints import encoder_weights
from speakerkit.model import build_encoder
from speakerkit.published import KaldiFbank
from speakerkit.redimnet import SIZES


def randomised_batch_norms(network):
    """`network` in eval mode with random batch-norm statistics and affine parameters, so that they matter."""
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                if module.affine:
                    module.weight.normal_(1, 0.2)
                    module.bias.normal_(0, 0.2)
    return network.eval()


def speechbrain_ecapa(C, embedding_dim):
    """SpeechBrain's ECAPA-TDNN with channels [C, C, C, C, 3C], eval mode, random weights and batch-norm
    statistics (so that every parameter and statistic matters), with its feature pipeline."""
    models = pytest.importorskip('speechbrain.lobes.models.ECAPA_TDNN', reason='speechbrain is not installed')
    features = pytest.importorskip('speechbrain.lobes.features')
    normalisation = pytest.importorskip('speechbrain.processing.features')
    torch.manual_seed(0)
    network = randomised_batch_norms(models.ECAPA_TDNN(80, channels=[C] * 4 + [3 * C], lin_neurons=embedding_dim))

    def embed(waveforms):
        """What SpeechBrain's EncoderClassifier.encode_batch computes for whole (unpadded) waveforms."""
        lengths = torch.ones(len(waveforms))
        feats = normalisation.InputNormalization(norm_type='sentence', std_norm=False)(
            features.Fbank(n_mels=80)(waveforms), lengths)
        return network(feats, lengths).squeeze(1)
    return network, embed


@pytest.mark.parametrize('C, seconds', [(64, 1.5), (1024, 1.0)])  # 1024: the published model's size
def test_speechbrain_ecapa_gives_speechbrains_embedding(C, seconds):
    network, reference = speechbrain_ecapa(C, 192)
    ours = build_encoder('ecapa-speechbrain', C, 16000, 192).eval()
    ours.load_state_dict(network.state_dict(), strict=True)  # its embedding_model.ckpt's names and shapes
    waveforms = 0.1 * torch.randn(3, int(seconds * 16000), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(waveforms)
        torch.testing.assert_close(ours(waveforms), expected, rtol=1e-5, atol=1e-5)
        # one waveform at a time, of another length, as tools.embed and --eval give them
        torch.testing.assert_close(ours(waveforms[:1, :20001]), reference(waveforms[:1, :20001]), rtol=1e-5,
                                   atol=1e-5)


def wespeaker_features(waveform, n_mels=80):
    """What wespeaker's processor computes for extraction (compute_fbank with dither 0, then apply_cmvn)."""
    mat = torchaudio.compliance.kaldi.fbank(waveform.unsqueeze(0) * (1 << 15), num_mel_bins=n_mels, frame_length=25,
                                            frame_shift=10, dither=0.0, sample_frequency=16000,
                                            window_type='hamming', use_energy=False)
    return mat - torch.mean(mat, dim=0)


def test_kaldi_fbank_is_torchaudios_kaldi_fbank_with_the_utterance_mean_removed():
    waveforms = 0.1 * torch.randn(3, 17000, generator=torch.Generator().manual_seed(4))
    ours = KaldiFbank(16000)
    expected = torch.stack([wespeaker_features(w) for w in waveforms])
    torch.testing.assert_close(ours(waveforms).transpose(1, 2), expected, rtol=0, atol=0)
    ours.by_convolution = True  # for export: the spectrum by matrix products
    torch.testing.assert_close(ours(waveforms).transpose(1, 2), expected, rtol=0, atol=2e-3)


@pytest.fixture(scope='module')
def wespeaker_models():
    """{our --model: (wespeaker's builder, width, embedding size, mel bins)} from the checkout WESPEAKER_CHECKOUT
    names, its modules imported without its package's __init__ (which loads its command-line tools and their
    dependencies)."""
    root = os.environ.get('WESPEAKER_CHECKOUT', '')
    if not os.path.isfile(os.path.join(root, 'wespeaker', 'models', 'resnet.py')):
        pytest.skip('WESPEAKER_CHECKOUT does not name a checkout of wenet-e2e/wespeaker (not on PyPI)')
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split('.')[0] == 'wespeaker'}
    for name in ('wespeaker', 'wespeaker.models'):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, *name.split('.'))]
        sys.modules[name] = package
    try:
        from wespeaker.models import campplus, ecapa_tdnn, redimnet, resnet
        yield {'resnet34-wespeaker': (resnet.ResNet34, 32, 256, 80),
               'resnet293-wespeaker': (resnet.ResNet293, 32, 256, 80),
               'ecapa-wespeaker': (ecapa_tdnn.ECAPA_TDNN_GLOB_c1024, 1024, 192, 80),
               'campplus': (campplus.CAMPPlus, 32, 512, 80),
               **{f'redimnet-{size}': (getattr(redimnet, f'ReDimNet{size.upper()}'), shape.C, 192, shape.n_mels)
                  for size, shape in SIZES.items()}}
    finally:
        for name in [n for n in sys.modules if n.split('.')[0] == 'wespeaker']:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize('name', ['resnet34-wespeaker', 'resnet293-wespeaker', 'ecapa-wespeaker', 'campplus']
                         + [f'redimnet-{size}' for size in SIZES])
def test_wespeakers_encoders_give_wespeakers_embedding(wespeaker_models, name):
    """Its weights, under its names (a published avg_model.pt's, less the margin head), give its embedding of the
    same waveform (ReDimNet: through attention and layer norms computed another way, so to float32 rounding of
    the largest value)."""
    build, width, embedding_dim, n_mels = wespeaker_models[name]
    torch.manual_seed(0)
    network = build(feat_dim=n_mels, embed_dim=embedding_dim)
    with torch.no_grad():  # parameters that start constant drawn at random (ReDimNet's stage mixtures, zero biases)
        for parameter in network.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.normal_(parameter.flatten()[0].item(), 0.2)
    network = randomised_batch_norms(network)
    published = network.state_dict() | {'projection.weight': torch.randn(5994, embedding_dim)}  # avg_model.pt
    ours = build_encoder(name, width, 16000, embedding_dim).eval()
    ours.load_state_dict(encoder_weights(published), strict=True)
    waveforms = 0.1 * torch.randn(2, 24000, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        output = network(torch.stack([wespeaker_features(w, n_mels) for w in waveforms]))
        expected = output[-1] if isinstance(output, tuple) else output  # (embedding a, embedding b) or one
        scale = float(expected.abs().max())
        torch.testing.assert_close(ours(waveforms), expected, rtol=1e-5, atol=1e-5 * max(1.0, scale))


PUBLISHED = {  # --model: (width for the tests, the file its toolkit publishes, extra keys it holds)
    'ecapa-speechbrain': (64, 'embedding_model.ckpt', {}),
    'resnet34-wespeaker': (8, 'avg_model.pt', {'projection.weight': torch.zeros(5994, 256)}),
    'ecapa-wespeaker': (64, 'avg_model.pt', {'projection.weight': torch.zeros(5994, 192)}),
    'campplus': (8, 'avg_model.pt', {'projection.weight': torch.zeros(5994, 512)}),
    'redimnet-b2': (8, 'avg_model.pt', {'projection.weight': torch.zeros(5994, 192)}),
}


@pytest.fixture(params=sorted(PUBLISHED))
def published_checkpoint(request, tmp_path):
    """A checkpoint as the toolkit publishes one (the encoder's own state_dict, no prefix, wespeaker's with its
    margin head, nothing beside it): (model name, width, path, the encoder in eval mode)."""
    name = request.param
    width, file_name, extra = PUBLISHED[name]
    torch.manual_seed(2)
    encoder = build_encoder(name, width, 16000)
    path = tmp_path / file_name
    torch.save(encoder.state_dict() | extra, path)
    return name, width, str(path), encoder.eval()


def test_a_published_checkpoint_loads_from_its_weights_alone_and_embeds(published_checkpoint, capsys):
    name, width, path, encoder = published_checkpoint
    loaded = tools.load_model(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    assert capsys.readouterr().out == (f'{path}: no {stem}.json beside it; its weights are those of {name} '
                                       f'C={width}, embedding {encoder.embedding_dim}, 16000 Hz\n')
    waveform = (0.1 * np.random.default_rng(0).standard_normal(24000)).astype(np.float32)
    torch.testing.assert_close(tools.embed(loaded, waveform, 16000), tools.embed(encoder, waveform, 16000),
                               rtol=0, atol=0)


@pytest.mark.slow
def test_a_published_checkpoint_evaluates_fine_tunes_and_exports(published_checkpoint, tiny_corpus, train_argv,
                                                                 tmp_path):
    name, width, path, encoder = published_checkpoint
    results = cli.main(['--eval', '--initial_model', path, '--eval_list', tiny_corpus['eval_list'],
                        '--eval_path', tiny_corpus['eval_path'], '--save_path', str(tmp_path / 'eval'),
                        '--n_cpu', '0'])
    assert results[tiny_corpus['eval_list']].metrics is not None
    tuned = tmp_path / 'tuned'
    cli.main(train_argv(tiny_corpus, tuned, '--model', name, '--C', str(width), '--initial_model', path,
                        '--max_epoch', '1'))
    lines = (tuned / 'score.txt').read_text().splitlines()
    assert len(lines) == 1 and 'EER' in lines[0]
    state = torch.load(tuned / 'model' / 'model_0001.model', weights_only=True)
    assert state['speaker_loss.weight'].shape == (6, encoder.embedding_dim)  # a new head for the six speakers
    last = [k for k in encoder.state_dict() if k.endswith('weight')][-1]
    assert not torch.equal(state[f'speaker_encoder.{last}'], encoder.state_dict()[last])  # it trained
    onnxruntime = pytest.importorskip('onnxruntime')  # the export path every format shares, features by convolution
    cli.main(['--initial_model', path, '--export', str(tmp_path / 'encoder.onnx')])
    waveform = 0.1 * torch.randn(2, 20000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = encoder(waveform)
    session = onnxruntime.InferenceSession(str(tmp_path / 'encoder.onnx'))
    np.testing.assert_allclose(session.run(['embedding'], {'waveform': waveform.numpy()})[0], expected.numpy(),
                               rtol=0, atol=1e-4)
