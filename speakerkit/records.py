"""What a training run leaves behind for later: `config.json` (how it was run), `score.txt` (one line a
person reads per evaluated epoch) and `metrics.jsonl` (each epoch's `EpochRecord` as one JSON object).
Kept apart from trainer.py, which only calls these."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
import torchaudio

from speakerkit.checkpoints import atomic_json_save, atomic_write, read_json
from speakerkit.errors import UserError
from speakerkit.lists import list_lines, malformed


@dataclasses.dataclass(kw_only=True)
class EpochRecord:
    """One epoch of training as metrics.jsonl holds it. `eval` is {trial list name: {'metrics': ...,
    'snorm_metrics': ...}} (`metrics.Metrics.as_record`) for an evaluated epoch, else empty. `contrastive_scale`:
    in the pair modes, the contrastive logit scale at the end of the epoch (learned unless fixed)."""
    epoch: int
    loss: float
    accuracy: float
    lr: float
    margin: float
    crops_per_s: float
    bad_steps: int
    skipped_files: int
    train_seconds: float
    epoch_seconds: float = 0.0
    peak_gpu_memory_gib: float | None = None
    contrastive_scale: float | None = None
    eval: dict = dataclasses.field(default_factory=dict)

    def add_results(self, results):
        """The metrics of `results` ({list path: evaluation.ListResult})."""
        self.eval = {result.trials.name: {
            'metrics': result.metrics and result.metrics.as_record(),
            **({'snorm_metrics': result.snorm_metrics and result.snorm_metrics.as_record()}
               if result.snorm_scores is not None else {})} for result in results.values()}

    def as_json(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and (k != 'eval' or v)}


def results_parts(results):
    """Each trial list's metrics, named when there are several."""
    return [(f'{r.trials.name} ' if len(results) > 1 else '') + r.text() for r in results.values()]


def score_line(record, results, best_eer):
    """score.txt's line for an evaluated epoch, in the original code's format with one part per trial list; the
    best EER so far (None: no list with labels) ends it."""
    parts = [f'{record.epoch} epoch, LR {record.lr:f}, LOSS {record.loss:f}, ACC {record.accuracy:2.2f}%',
             *results_parts(results)]
    return ', '.join(parts + ([f'bestEER {best_eer:2.2f}%'] if best_eer is not None else []))


def average_line(first, last, results):
    """score.txt's line for --average's model: it starts with the last epoch, as the lines of epochs do."""
    return ', '.join([f'{last} epoch, average of epochs {first}-{last}', *results_parts(results)])


def git_commit():
    """The commit of this code, with '-dirty' when tracked files differ from it; None outside a checkout."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ('-dirty' if status.stdout.strip() else '')


def write_config(path, args, device, processes, resumed_after):
    """Every argument (and which were given, on the command line or by --config: what `--config` of this file
    sets), the code's commit, library versions and the device, as JSON."""
    device = torch.device(device)
    atomic_json_save({
        'arguments': {k: v for k, v in sorted(vars(args).items()) if k != 'given'},
        'given_flags': args.given, 'command': sys.argv, 'git_commit': git_commit(),
        'torch': torch.__version__, 'torchaudio': torchaudio.__version__, 'cuda': torch.version.cuda,
        'device': str(device),
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        'processes': processes, 'resumed_after_epoch': resumed_after,
        'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }, path)


# Flags that say where and how fast a run trains, how it is evaluated, and how long it goes on: a run may
# continue with them changed. Every other flag decides what is trained and must stay as the run started.
RESUMABLE_FLAGS = frozenset({
    'max_epoch', 'test_step', 'average', 'train_list', 'train_path', 'train_shards', 'musan_path', 'rir_path',
    'cache_dir', 'eval_list', 'eval_path', 'eval_precision', 'snorm', 'subtract_mean', 'cohort', 'cohort_top_k',
    'cohort_size', 'n_cpu', 'device', 'amp', 'compile', 'gpu_augment', 'max_bad_steps', 'tensorboard', 'save_path',
    'config', 'check_data', 'check_decode', 'allow_partial_load', 'demo'})


def recorded_arguments(config_path):
    """The arguments a run's config.json records, or None when there is no config.json."""
    if not os.path.exists(config_path):
        return None
    return read_json(config_path, 'run config', ('arguments',))['arguments']


def changed_flags(recorded, args):
    """{flag: (recorded value, value now)} for the flags of `args` that differ from `recorded` (a run's
    config.json arguments). Flags the record does not hold (added to the code since) are not compared; a
    switch recorded as 'on' or 'off' (as versions before every switch was a boolean wrote them) is that boolean."""
    changed = {}
    for name, value in sorted(vars(args).items()):
        if name not in recorded:
            continue
        before = recorded[name]
        if isinstance(value, bool) and before in ('on', 'off'):
            before = before == 'on'
        if json.loads(json.dumps(value)) != before:
            changed[name] = (recorded[name], value)
    return changed


def recipe_changes(changed, scheduler):
    """Of `changed_flags`, those that decide what is trained: all but RESUMABLE_FLAGS, and --max_epoch and
    --lr_decay_every when the learning-rate `scheduler` is a function of them (warmup_exp decays over
    --max_epoch; the step schedule decays every --lr_decay_every epochs)."""
    fixed = {'max_epoch'} if scheduler == 'warmup_exp' else {'lr_decay_every'}
    return {name: values for name, values in changed.items() if name not in RESUMABLE_FLAGS or name in fixed}


def append_metrics(path, record):
    with open(path, 'a') as f:
        f.write(json.dumps(record.as_json()) + '\n')


def read_metrics(path):
    """The records of metrics.jsonl, without a last line that a crash left unfinished."""
    if not os.path.exists(path):
        return []
    records = []
    for line in list_lines(path, 'metrics log', drop_unfinished=True):
        try:
            records.append(json.loads(line.text))
        except json.JSONDecodeError:
            raise malformed(path, line, 'one JSON object a line') from None
    return records


def forget_epochs_after(epoch, score_path, metrics_path):
    """On resume: drop the lines of epochs after `epoch` (written before a crash that came before their
    resume state), so that the continued run does not log them twice."""
    if os.path.exists(score_path):
        lines = []
        for line in list_lines(score_path, 'score log', drop_unfinished=True):
            if not line.fields[0].isdigit():
                raise malformed(score_path, line, "'<epoch> epoch, ...'")
            if int(line.fields[0]) <= epoch:
                lines.append(line.text + '\n')
        atomic_write(score_path, lambda f: f.write(''.join(lines).encode()))
    if os.path.exists(metrics_path):
        kept = [r for r in read_metrics(metrics_path) if r['epoch'] <= epoch]
        atomic_write(metrics_path, lambda f: f.write(''.join(json.dumps(r) + '\n' for r in kept).encode()))


class TensorBoard:
    """Each epoch's metrics.jsonl record as TensorBoard scalars (--tensorboard) in `folder`: train/<field>
    and <trial list>/<metrics|snorm_metrics>/<metric>, at step = epoch."""

    TRAINING_FIELDS = ('loss', 'accuracy', 'lr', 'margin', 'crops_per_s', 'train_seconds', 'epoch_seconds')

    def __init__(self, folder):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise UserError(f'--tensorboard needs the tensorboard package (pip install tensorboard): {error}') from None
        self.writer = SummaryWriter(folder)

    def add(self, record):
        for field in self.TRAINING_FIELDS:
            self.writer.add_scalar(f'train/{field}', getattr(record, field), record.epoch)
        for name, result in record.eval.items():
            for group, metrics in result.items():
                for metric, value in (metrics or {}).items():
                    self.writer.add_scalar(f'{name}/{group}/{metric}', value, record.epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()
