import numpy as np
import pytest
import torch

import trainECAPAModel
from loss import AAMsoftmax
from model import ConvMelSpectrogram, ECAPA_TDNN, build_encoder
from tools import export_onnx, export_torchscript, save_checkpoint

ENCODERS = [('ecapa-tdnn', 48), ('tdnn', 64), ('resnet18', 8)]


def eager(encoder, x):
    with torch.no_grad():
        return encoder.eval()(x, False)


@pytest.mark.parametrize('rate', [8000, 16000])
def test_convolutional_mel_equals_torchaudio(rate):
    mel = ECAPA_TDNN(32, rate).torchfbank[1]
    x = torch.randn(2, rate)
    torch.testing.assert_close(ConvMelSpectrogram(mel)(x), mel(x), rtol=1e-4, atol=1e-4 * float(mel(x).max()))


@pytest.mark.parametrize('name,C', ENCODERS)
def test_torchscript_matches_eager_for_any_batch_and_length(tmp_path, name, C):
    torch.manual_seed(0)
    encoder = build_encoder(name, C, 16000).eval()
    export_torchscript(encoder, str(tmp_path / 'encoder.pt'))
    scripted = torch.jit.load(str(tmp_path / 'encoder.pt'))
    for shape in [(1, 20000), (3, 41000)]:
        x = 0.1 * torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), eager(encoder, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize('name,C', ENCODERS)
def test_onnx_matches_eager(tmp_path, name, C):
    pytest.importorskip('onnx', reason='onnx is an optional extra (requirements-extras.txt)')
    onnxruntime = pytest.importorskip('onnxruntime', reason='onnxruntime is an optional extra')
    torch.manual_seed(0)
    encoder = build_encoder(name, C, 8000).eval()
    export_onnx(encoder, str(tmp_path / 'encoder.onnx'))
    session = onnxruntime.InferenceSession(str(tmp_path / 'encoder.onnx'))
    x = 0.1 * torch.randn(3, 13000)
    out = session.run(['embedding'], {'waveform': x.numpy()})[0]
    np.testing.assert_allclose(out, eager(encoder, x).numpy(), rtol=0, atol=1e-4)


def test_cli_exports_a_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder('tdnn', 32, 16000)
    model = trainECAPAModel.SpeakerModel(encoder, AAMsoftmax(4, 0.2, 30, 512))
    save_checkpoint(model.state_dict(), {'model': 'tdnn', 'C': 32, 'embedding_dim': 512, 'sampling_rate': 16000},
                    str(tmp_path / 'model_0001.model'))
    trainECAPAModel.main(['--initial_model', str(tmp_path / 'model_0001.model'), '--export', str(tmp_path / 'e.pt')])
    x = 0.1 * torch.randn(2, 16000)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / 'e.pt'))(x), eager(encoder, x), rtol=0, atol=1e-4)
