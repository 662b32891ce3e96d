"""speakerkit: train speaker encoders on VoxCeleb-style data and score trial lists.

In a notebook: `from speakerkit import load_model, embed, score` (tools.py). The commands are `speakerkit`
(training, evaluation, extraction, export: cli.py) and `speakerkit-prepare` (prepare.py); from a checkout, the
same programs are `python trainECAPAModel.py` and `python prepare.py`, and `import model` is speakerkit.model.
"""

from speakerkit.model import ECAPA_TDNN, build_encoder
from speakerkit.tools import (embed, export_onnx, export_program, export_torchscript, load_calibration, load_model,
                              protocol_vectors, score, verify)

__all__ = ['ECAPA_TDNN', 'build_encoder', 'embed', 'export_onnx', 'export_program', 'export_torchscript',
           'load_calibration', 'load_model', 'protocol_vectors', 'score', 'verify']
