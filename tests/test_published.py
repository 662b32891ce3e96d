"""published.py: SpeechBrain's ECAPA-TDNN, exact against SpeechBrain's own code (speechbrain on PyPI, in
requirements-test.txt; skipped with the reason where it is not installed), and a checkpoint in its layout
loaded, evaluated, fine-tuned and exported through our entry points."""

import numpy as np
import pytest
import torch

from speakerkit import cli, tools
from speakerkit.model import build_encoder


def speechbrain_ecapa(C, embedding_dim):
    """SpeechBrain's ECAPA-TDNN with channels [C, C, C, C, 3C], eval mode, random weights and batch-norm
    statistics (so that every parameter and statistic matters), with its feature pipeline."""
    models = pytest.importorskip('speechbrain.lobes.models.ECAPA_TDNN', reason='speechbrain is not installed')
    features = pytest.importorskip('speechbrain.lobes.features')
    normalisation = pytest.importorskip('speechbrain.processing.features')
    torch.manual_seed(0)
    network = models.ECAPA_TDNN(80, channels=[C] * 4 + [3 * C], lin_neurons=embedding_dim).eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)

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


@pytest.fixture
def speechbrain_checkpoint(tmp_path):
    """A checkpoint as SpeechBrain publishes one (embedding_model.ckpt: the encoder's state_dict, no prefix,
    nothing beside it), at C=64."""
    torch.manual_seed(2)
    encoder = build_encoder('ecapa-speechbrain', 64, 16000, 192)
    path = tmp_path / 'embedding_model.ckpt'
    torch.save(encoder.state_dict(), path)
    return str(path), encoder.eval()


def test_a_speechbrain_checkpoint_loads_from_its_weights_alone_and_embeds(speechbrain_checkpoint, tmp_path, capsys):
    path, encoder = speechbrain_checkpoint
    loaded = tools.load_model(path)
    assert capsys.readouterr().out == (f'{path}: no embedding_model.json beside it; its weights are those of '
                                       f'ecapa-speechbrain C=64, embedding 192, 16000 Hz\n')
    waveform = (0.1 * np.random.default_rng(0).standard_normal(24000)).astype(np.float32)
    torch.testing.assert_close(tools.embed(loaded, waveform, 16000), tools.embed(encoder, waveform, 16000),
                               rtol=0, atol=0)


@pytest.mark.slow
def test_a_speechbrain_checkpoint_evaluates_fine_tunes_and_exports(speechbrain_checkpoint, tiny_corpus, train_argv,
                                                                  tmp_path):
    path, encoder = speechbrain_checkpoint
    results = cli.main(['--eval', '--initial_model', path, '--eval_list', tiny_corpus['eval_list'],
                        '--eval_path', tiny_corpus['eval_path'], '--save_path', str(tmp_path / 'eval'),
                        '--n_cpu', '0'])
    assert results[tiny_corpus['eval_list']].metrics is not None
    tuned = tmp_path / 'tuned'
    cli.main(train_argv(tiny_corpus, tuned, '--model', 'ecapa-speechbrain', '--C', '64', '--initial_model', path,
                        '--max_epoch', '1'))
    lines = (tuned / 'score.txt').read_text().splitlines()
    assert len(lines) == 1 and 'EER' in lines[0]
    state = torch.load(tuned / 'model' / 'model_0001.model', weights_only=True)
    assert state['speaker_loss.weight'].shape == (6, 192)  # a new head for this list's six speakers
    assert not torch.equal(state['speaker_encoder.fc.conv.weight'], encoder.state_dict()['fc.conv.weight'])
    for suffix in ('.pt2', '.onnx'):
        cli.main(['--initial_model', path, '--export', str(tmp_path / f'encoder{suffix}')])
    waveform = 0.1 * torch.randn(2, 20000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = encoder(waveform)
        exported = torch.export.load(str(tmp_path / 'encoder.pt2')).module()
        torch.testing.assert_close(exported(waveform), expected, rtol=1e-5, atol=1e-5)
    onnxruntime = pytest.importorskip('onnxruntime')
    session = onnxruntime.InferenceSession(str(tmp_path / 'encoder.onnx'))
    np.testing.assert_allclose(session.run(['embedding'], {'waveform': waveform.numpy()})[0], expected.numpy(),
                               rtol=0, atol=1e-4)
