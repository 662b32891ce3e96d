"""The original code, TaoRuijie/ECAPA-TDNN, imported from a checkout the user names (`--reference DIR`), so that
a benchmark times it beside ours in one process. Nothing of it is copied here.

Its modules are named like this checkout's top-level names (model, loss, tools, dataLoader) and import each
other by those names, so they are loaded while ours are out of `sys.modules`, then kept under
`reference.modules`. The only run-time patches are what a CPU and numpy >= 1.24 need: `.cuda()` is the identity
when CUDA is absent, and the alias `numpy.float` (removed from numpy) is `float` again. Its `tools.py` imports
scikit-learn (bench/requirements.txt).
"""

import contextlib
import importlib
import os
import sys

import numpy
import torch

NAMES = ('tools', 'loss', 'model', 'dataLoader', 'ECAPAModel')


@contextlib.contextmanager
def cpu_patches():
    """`.cuda()` of modules and tensors as the identity (only without CUDA), and `numpy.float`."""
    saved = (torch.nn.Module.cuda, torch.Tensor.cuda)
    if not torch.cuda.is_available():
        torch.nn.Module.cuda = lambda self, *args, **kwargs: self
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    had_float = hasattr(numpy, 'float')
    if not had_float:
        numpy.float = float
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved
        if not had_float:
            del numpy.float


def load(directory):
    """{name: module} of the original code in `directory` (a checkout of TaoRuijie/ECAPA-TDNN)."""
    missing = [n for n in NAMES if not os.path.isfile(os.path.join(directory, n + '.py'))]
    if missing:
        raise SystemExit(f'--reference {directory}: not a checkout of TaoRuijie/ECAPA-TDNN (no {missing[0]}.py)')
    ours = {name: sys.modules.pop(name) for name in NAMES if name in sys.modules}
    sys.path.insert(0, os.path.abspath(directory))
    try:
        return {name: importlib.import_module(name) for name in NAMES}
    finally:
        sys.path.pop(0)
        for name in NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(ours)
