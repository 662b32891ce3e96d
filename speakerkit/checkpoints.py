"""Everything written to disk that must survive a crash, and everything read back as weights.

  atomic_write        the one way files are written: a temporary file beside the target, fsynced, renamed
  save_checkpoint     model_XXXX.model (`speaker_encoder.*`, `speaker_loss.weight`, as the original code
                      writes them) and the JSON beside it that says how to rebuild the encoder
  load_state_dict_file / encoder_weights / load_encoder_weights
                      checkpoints of this toolkit or of the original code, loaded with `weights_only=True`
  average_checkpoints the element-wise mean of several checkpoints' weights (--average, --average_checkpoints)
  ResumeState         resume.pt: the whole training state after an epoch (or inside one), plain types only
  FolderLock          one training run per save_path

At the bottom of the import graph (torch and `errors` only), so that every module can write atomically.
"""

import dataclasses
import fcntl
import glob
import hashlib
import json
import math
import os
import socket
import tempfile
import time

import numpy as np
import torch

from speakerkit.dataLoader import SPEED_PERTURBATION
from speakerkit.errors import UserError, first_line
from speakerkit.metrics import Calibration
from speakerkit.model import EncoderConfig


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call `write(file object)` on a temporary file beside `path`, fsync it, then rename it over `path`,
    so that `path` holds either the old or the new content, never a partial one. A write the system refuses
    (no space left, no permission, a file where a folder should be) is a `UserError` naming `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise UserError(f'{path}: cannot be written (its folder {directory}: {error.strerror or error})') from error
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
        os.fchmod(fd, 0o666 & ~current_umask())  # what open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as error:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        refused = system_error_in(error)
        if refused is not None:
            raise UserError(f'{path}: cannot be written ({refused.strerror or refused})') from error
        raise


def system_error_in(error):
    """The OSError that `error` is, or that it was raised while handling (torch.save's writer reports a full
    disk as a RuntimeError raised while handling the OSError); None if there is none."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def remove_partial_writes(folder, names, idle_seconds=0):
    """Delete the temporary files that `atomic_write` leaves beside `names` (glob patterns of files in `folder`)
    when a process dies while writing; returns how many. Call it only where no other process writes, or give
    `idle_seconds`: only files unchanged for that long are removed (a live writer keeps its file changing)."""
    found = [p for name in names for p in glob.glob(os.path.join(glob.escape(folder), f'.{name}.*'))]
    removed = 0
    for path in found:
        try:
            if time.time() - os.path.getmtime(path) >= idle_seconds:
                os.remove(path)
                removed += 1
        except FileNotFoundError:  # its writer finished or another process removed it
            pass
    return removed


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_save(obj, path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def read_json(path, what, keys=()):
    """The JSON mapping in `path` (a `what`: 'encoder config', ...), holding at least `keys`; a `UserError`
    naming the file when it does not parse (a truncated write of an older version, an edit) or lacks a key."""
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f'{path}: not a readable {what} ({first_line(error)}); fix it or move it away') from None
    missing = [key for key in keys if not isinstance(found, dict) or key not in found]
    if missing:
        raise UserError(f'{path}: not a readable {what} (no {", ".join(missing)}); fix it or move it away')
    return found


def file_digest(path):
    """A short SHA-1 of a file's bytes: the identity of a checkpoint."""
    digest = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()[:16]


class FolderLock:
    """`folder`/.lock while a training run writes there, holding 'PID HOST' of its process and an exclusive
    `flock` on it for as long as the run holds the folder, so that of processes starting at the same instant one
    alone gets it. Taking it while another process holds the flock, or while the file names a live process on
    this host or any process on another host, is a `UserError` naming the holder; a lock whose process is gone
    is taken over with a message."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, '.lock')
        self.me = f'{os.getpid()} {socket.gethostname()}'
        self.fd = None

    def holder(self):
        """(pid, host) written in the lock, or None when it is unreadable or empty (a holder that died)."""
        try:
            with open(self.path) as f:
                pid, host = f.read().split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    def in_use(self, holder):
        who = f'process {holder[0]} on {holder[1]}' if holder else 'another process'
        return UserError(f'{self.folder} is in use by {who} ({self.path}): wait for that run, stop it, or choose '
                         f'another --save_path (delete the lock if that process is gone)')

    def acquire(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as error:
            why = 'a file, not a folder' if os.path.isfile(self.folder) else error.strerror
            raise UserError(f'{self.folder}: cannot hold a run ({why})') from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:  # a read-only folder or file system
                raise UserError(f'{self.folder}: cannot hold a run ({error.strerror})') from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self.in_use(self.holder()) from None
            except OSError:  # a file system without flock (some NFS mounts): the file's content alone decides
                pass
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder released and removed it between our open and our flock: try anew
        holder = self.holder()
        if holder is not None and (holder[1] != socket.gethostname() or process_exists(holder[0])):
            os.close(fd)
            raise self.in_use(holder)
        if holder is not None:
            print(f'{self.path}: taking over the lock of process {holder[0]}, which has ended', flush=True)
        os.ftruncate(fd, 0)
        os.write(fd, self.me.encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        os.remove(self.path)  # while still flocked, so that no one takes the file being removed
        os.close(self.fd)
        self.fd = None


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- model checkpoints

def encoder_config_path(checkpoint_path):
    """The JSON file beside a checkpoint that records how to rebuild its encoder."""
    return os.path.splitext(checkpoint_path)[0] + '.json'


def read_encoder_config(checkpoint_path):
    """The EncoderConfig written beside a checkpoint; a `UserError` naming the file when it does not hold one."""
    path = encoder_config_path(checkpoint_path)
    found = read_json(path, 'encoder config', ('model', 'C', 'sampling_rate'))
    try:
        return EncoderConfig(**{field.name: found[field.name] for field in dataclasses.fields(EncoderConfig)
                                if field.name in found})
    except ValueError as error:
        raise UserError(f'{path}: not a readable encoder config ({error}); fix it or move it away') from None


def calibration_path(checkpoint_path):
    """The JSON beside a checkpoint that `--calibrate` writes: its scores' map to log-likelihood ratios."""
    return os.path.splitext(checkpoint_path)[0] + '.calibration.json'


def write_calibration(calibration, checkpoint_path, record):
    """`calibration` (a metrics.Calibration) beside the checkpoint, with `record`: what it was fitted on."""
    atomic_json_save(dataclasses.asdict(calibration) | record, calibration_path(checkpoint_path))


def read_calibration(checkpoint_path):
    """The Calibration written beside a checkpoint, or None where there is none; a `UserError` naming the file
    when it does not hold one."""
    path = calibration_path(checkpoint_path)
    if not os.path.exists(path):
        return None
    found = read_json(path, 'calibration', ('scale', 'offset', 'p_target'))
    values = [found[name] for name in ('scale', 'offset', 'p_target')]
    weights, mean = found.get('duration_weights', []), found.get('training_mean', [])
    decision = found.get('decision_llr')
    if not all(is_number(v) for v in values) or not values[0] > 0 or not 0 < values[2] < 1 \
            or not (decision is None or is_number(decision)) \
            or not isinstance(weights, list) or len(weights) not in (0, 2) or not isinstance(mean, list) \
            or not all(is_number(v) for v in weights + mean):
        raise UserError(f'{path}: not a readable calibration (a positive scale, a finite offset, a p_target in '
                        f'(0, 1), and where present a decision LLR, two duration weights and a mean vector '
                        f'expected); run --calibrate again')
    return Calibration(scale=float(values[0]), offset=float(values[1]), p_target=float(values[2]),
                       decision_llr=None if decision is None else float(decision),
                       duration_weights=tuple(map(float, weights)), training_mean=tuple(map(float, mean)))


def is_number(value):
    """A finite int or float from JSON (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def averaged_epochs_of(checkpoint_path):
    """[first, last] epoch of an average written by --average, as its JSON records them; None for others."""
    return read_json(encoder_config_path(checkpoint_path), 'encoder config').get('averaged_epochs')


def write_encoder_config(config, checkpoint_path, averaged_epochs=None):
    """The JSON beside a checkpoint: its EncoderConfig and, for an average of epochs, which ([first, last])."""
    extra = {'averaged_epochs': averaged_epochs} if averaged_epochs else {}
    atomic_json_save(dataclasses.asdict(config) | extra, encoder_config_path(checkpoint_path))


def save_checkpoint(state_dict, config, path, averaged_epochs=None):
    """Write the weights (`speaker_encoder.*`, `speaker_loss.*`) and, beside them, `write_encoder_config`'s
    JSON of their EncoderConfig."""
    atomic_torch_save(state_dict, path)
    write_encoder_config(config, path, averaged_epochs)


def load_state_dict_file(path):
    """A checkpoint's state_dict (names to tensors), loaded without executing anything it holds."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line(error)})") from error
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state_dict, found {type(state).__name__}")
    other = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if other is not None:
        raise UserError(f"{path}: expected a state_dict of tensors, found a {type(state[other]).__name__} under "
                        f"{other!r}")
    broken = next((key for key, value in state.items()
                   if value.is_floating_point() and not torch.isfinite(value).all()), None)
    if broken is not None:
        raise UserError(f'{path}: {broken} holds NaN or infinite values (the weights of a run that diverged?); '
                        f'take an earlier checkpoint')
    return state


def average_checkpoints(paths):
    """The element-wise mean of the checkpoints' weights, accumulated in float64 and stored in each weight's
    dtype; integer entries (batch-norm's counters) are the last checkpoint's. Every checkpoint must have the
    first one's names and shapes."""
    states = [load_state_dict_file(path) for path in paths]
    first = states[0]
    for path, state in zip(paths[1:], states[1:]):
        differing = sorted(set(state) ^ set(first)) or [k for k in first if state[k].shape != first[k].shape]
        if differing:
            raise UserError(f'{path}: its weights differ from those of {paths[0]} in names or shapes (e.g. '
                            f'{differing[0]}); only checkpoints of one model can be averaged')
    return {key: torch.stack([state[key].double() for state in states]).mean(dim=0).to(value.dtype)
            if value.is_floating_point() else states[-1][key].clone() for key, value in first.items()}


def encoder_weights(state):
    """The encoder's entries of a checkpoint: the `speaker_encoder.*` ones with that prefix removed, or, for
    an encoder's own state_dict (SpeechBrain's, wespeaker's), all but wespeaker's margin head (`projection.*`).
    A `module.` prefix left by DataParallel is removed."""
    state = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}
    prefix = 'speaker_encoder.'
    if not any(k.startswith(prefix) for k in state):
        return {k: v for k, v in state.items() if not k.startswith('projection.')}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def mismatches(own, weights):
    """What keeps `weights` from loading strictly into a module with state `own`, one line per kind."""
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    reshaped = sorted(f'{k} {tuple(weights[k].shape)} -> {tuple(own[k].shape)}'
                      for k in own.keys() & weights.keys() if weights[k].shape != own[k].shape)
    return [f'{len(keys)} {what}: {", ".join(keys[:10])}' + (', ...' if len(keys) > 10 else '')
            for what, keys in (('missing', missing), ('unexpected', unexpected), ('of another shape', reshaped))
            if keys]


def flags_of_checkpoint(path, config):
    """The flags (`--C 128`, ...) that build the encoder the JSON beside checkpoint `path` records where it
    differs from `config` (the EncoderConfig built); empty without a JSON or a difference."""
    if config is None or not os.path.exists(encoder_config_path(path)):
        return []
    saved = read_encoder_config(path)
    return [f'--{field.name} {getattr(saved, field.name)}' for field in dataclasses.fields(EncoderConfig)
            if getattr(saved, field.name) is not None and getattr(saved, field.name) != getattr(config, field.name)]


def load_encoder_weights(encoder, classifier, path, allow_partial=False, config=None):
    """Load a checkpoint's encoder weights into `encoder` (built from `config`, an EncoderConfig, when given)
    and, when `classifier` (an AAM-softmax head, or None) and the checkpoint's `speaker_loss.weight` have one
    shape, that too. Every encoder weight must be in the checkpoint with its shape, and nothing else, unless
    `allow_partial`: then those that match are loaded and the rest keep their fresh initialisation. Returns
    what was loaded, in words. When they do not fit, the error names the flags of the checkpoint's own encoder
    (from its JSON)."""
    state = load_state_dict_file(path)
    weights = encoder_weights(state)
    own = encoder.state_dict()
    problems = mismatches(own, weights)
    if problems and not allow_partial:
        flags = flags_of_checkpoint(path, config)
        advice = (f'its {os.path.basename(encoder_config_path(path))} records another encoder: give '
                  f'{" ".join(flags)} to build that one, or --allow_partial_load to load the weights that fit'
                  if flags else '--allow_partial_load loads the weights that do')
        raise UserError(f'{path}: does not fit this {type(encoder).__name__} ({advice}): ' + '; '.join(problems))
    matching = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}
    encoder.load_state_dict({**own, **matching})
    loaded = f'{len(matching)} of {len(own)} encoder weights' if problems else 'encoder'
    if problems:
        print(f'{path}: partial load, the others start afresh:\n  ' + '\n  '.join(problems))
    weight = state.get('speaker_loss.weight')
    classes = None if classifier is None else classifier.weight.shape[0]
    if classifier is not None and weight is not None and weight.shape == classifier.weight.shape:
        with torch.no_grad():
            classifier.weight.copy_(weight)
        return f'{loaded} and classifier'
    if classifier is not None and weight is not None and weight.shape[1:] == classifier.weight.shape[1:] \
            and weight.shape[0] == len(SPEED_PERTURBATION) * classes:
        with torch.no_grad():  # a --speed_perturb run's head: class k * speakers + s is speaker s at speed k
            classifier.weight.copy_(weight[:classes])
        return (f'{loaded} and the classifier of its {classes} speakers at speed 1.0 (a --speed_perturb head of '
                f'{weight.shape[0]} classes; the speakers at the other speeds are left out, as this run plays '
                f'every crop at speed 1.0)')
    return f'{loaded}; classifier initialised afresh (none in the checkpoint, or another shape)'


# ---------------------------------------------------------------- resume state

# Resume files written before ResumeState kept EERs as numpy floats; these rebuild such a scalar and nothing
# else, so those files still load without unpickling arbitrary objects.
NUMPY_SCALAR_GLOBALS = [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]


@dataclasses.dataclass(kw_only=True)
class ResumeState:
    """resume.pt: the state after `epoch` complete epochs. `rng` and `cuda_rng` hold one generator state per
    process; `partial_epoch`, when a run stopped inside epoch + 1, each process's `EpochProgress` as a dict;
    `unevaluated`, when `epoch` is trained but not yet evaluated and recorded, its `EpochRecord` as a dict.
    Only tensors, numbers, strings, lists and dicts, so that it loads with `weights_only=True`."""
    epoch: int
    model: dict
    optimizer: dict
    rng: list
    cuda_rng: list | None
    scaler: dict
    eers: list
    partial_epoch: list | None = None
    unevaluated: dict | None = None

    def save(self, path):
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        atomic_torch_save(fields | {'eers': [float(e) for e in self.eers]}, path)

    @classmethod
    def load(cls, path):
        try:
            with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
                stored = torch.load(path, map_location='cpu', weights_only=True)
            fields = {field.name for field in dataclasses.fields(cls)}
            state = cls(**{k: v for k, v in stored.items() if k in fields})
        except Exception as error:
            raise UserError(f'{path}: not a readable resume state ({first_line(error)}); move it away '
                            f'to start this run afresh') from error
        # Files from before torchrun support hold one generator state instead of a list of them.
        state.rng = state.rng if isinstance(state.rng, list) else [state.rng]
        state.eers = [float(e) for e in state.eers]
        return state
