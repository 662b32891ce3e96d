"""The installed package: `pip install` of the checkout puts speakerkit (and no module of a generic name) on
the path, with its console commands, and it works from any folder; the checkout's own names keep working."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile

pytestmark = pytest.mark.slow  # a pip install: about half a minute

PACKAGED = ('pyproject.toml', 'README.md', 'LICENSE', 'requirements.txt', 'requirements-extras.txt', 'speakerkit')
TOP_LEVEL_NAMES = ('model', 'loss', 'dataLoader', 'tools', 'trainECAPAModel', 'prepare', 'trainer', 'errors',
                   'distributed', 'lists', 'records', 'commands')


@pytest.fixture(scope='module')
def installed(root, tmp_path_factory):
    """The checkout installed with pip into a folder of its own (without its dependencies, which this
    environment has); built from a copy, so that the build leaves nothing in the checkout."""
    pytest.importorskip('setuptools', reason='building the package without isolation needs setuptools')
    folder = tmp_path_factory.mktemp('install')
    source = folder / 'source'
    source.mkdir()
    for name in PACKAGED:
        copy = shutil.copytree if os.path.isdir(os.path.join(root, name)) else shutil.copy
        copy(os.path.join(root, name), source / name)
    shutil.rmtree(source / 'speakerkit' / '__pycache__', ignore_errors=True)
    site = folder / 'site'
    built = subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                            '--no-compile', '--target', str(site), str(source)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr
    return site


def run_elsewhere(site, tmp_path, argv):
    """`argv` run in a new folder outside the checkout, with only the installed package added to the path."""
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'} | {'PYTHONPATH': str(site)}
    return subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_package_holds_speakerkit_and_its_commands_and_no_generic_name(installed):
    assert sorted(p.name for p in installed.iterdir() if not p.name.endswith('.dist-info')) == ['bin', 'speakerkit']
    assert sorted(p.name for p in (installed / 'bin').iterdir()) == ['speakerkit', 'speakerkit-prepare']
    assert not {f'{name}.py' for name in TOP_LEVEL_NAMES} & {p.name for p in installed.iterdir()}


def test_from_another_folder_the_package_embeds_and_its_commands_score_a_pair(installed, tmp_path):
    rng = np.random.default_rng(0)
    for name in ('a.wav', 'b.wav'):
        soundfile.write(tmp_path / name, 0.1 * rng.standard_normal(16000), 16000)
    program = f'''
import sys, torch
import speakerkit
from speakerkit import ECAPA_TDNN, embed, load_model, score
from speakerkit.checkpoints import save_checkpoint
from speakerkit.model import EncoderConfig
assert speakerkit.__file__.startswith({str(installed)!r}), speakerkit.__file__
for generic in {TOP_LEVEL_NAMES!r}:
    try:
        __import__(generic)
    except ModuleNotFoundError:
        continue
    raise SystemExit(generic + ' is importable')
torch.manual_seed(0)
encoder = ECAPA_TDNN(32, 16000)
save_checkpoint({{'speaker_encoder.' + k: v for k, v in encoder.state_dict().items()}},
                EncoderConfig(model='ecapa-tdnn', C=32, sampling_rate=16000), {str(tmp_path / 'm.model')!r})
loaded = load_model({str(tmp_path / 'm.model')!r})
print(tuple(embed(loaded, {str(tmp_path / 'a.wav')!r}).shape), round(score(loaded, {str(tmp_path / 'a.wav')!r},
      {str(tmp_path / 'b.wav')!r}), 4))
'''
    ran = run_elsewhere(installed, tmp_path, [sys.executable, '-c', program])
    assert ran.returncode == 0, ran.stderr
    shape, protocol = ran.stdout.split(') ')
    assert shape == '(192,'
    command = run_elsewhere(installed, tmp_path, [str(installed / 'bin' / 'speakerkit'), '--score_pair',
                                                  str(tmp_path / 'a.wav'), str(tmp_path / 'b.wav'),
                                                  '--initial_model', str(tmp_path / 'm.model')])
    assert command.returncode == 0, command.stderr
    assert f'protocol score (as --eval scores a trial) {float(protocol):.4f}' in command.stdout
    mistake = run_elsewhere(installed, tmp_path, [str(installed / 'bin' / 'speakerkit'), '--max_epoch', '0'])
    assert (mistake.returncode, mistake.stderr) == (2, 'speakerkit: error: --max_epoch must be at least 1, got 0\n')


def test_a_checkout_keeps_the_original_names(root, tmp_path):
    """`python trainECAPAModel.py` from any folder (prepare.py is the same kind of script); `import model` (and
    loss, dataLoader, tools) in the checkout's folder is speakerkit's module itself."""
    program = ('import model, loss, dataLoader, tools, speakerkit.model, speakerkit.tools\n'
               'assert model is speakerkit.model and tools is speakerkit.tools\n'
               'print(model.ECAPA_TDNN(1024, 16000).__class__.__module__)')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    ran = subprocess.run([sys.executable, '-c', program], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0 and ran.stdout == 'speakerkit.model\n', ran.stderr
    shown = subprocess.run([sys.executable, os.path.join(root, 'trainECAPAModel.py'), '--help'], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and shown.stdout.startswith('usage: trainECAPAModel.py'), shown.stderr
