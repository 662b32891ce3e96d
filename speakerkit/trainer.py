"""Training: the model being trained, one optimiser step, one epoch, and a whole run with resume.

  SpeakerModel    encoder + head; its state_dict has the original code's `speaker_encoder.*`/`speaker_loss.*`
  TrainingStep    augmentation on the device (optional), forward under autocast, loss, backward, update; a
                  step with non-finite gradients changes nothing
  train_one_epoch the steps of an epoch with the learning rate and margin of the schedule, as `EpochProgress`
  StopRequest     SIGINT/SIGTERM: finish the step, save, exit 0 (before the first step: stop at once, 130/143)
  TrainingRun     a run in save_path: resume or initial weights, epochs, evaluation, checkpoints, records

trainECAPAModel.py parses the flags and calls `run_training(args)`; nothing here reads the command line.
"""

import argparse
import contextlib
import dataclasses
import glob
import os
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import tqdm

from speakerkit import distributed
from speakerkit.augment import Augmenter, DeviceAugmenter
from speakerkit.checkpoints import (FolderLock, ResumeState, average_checkpoints, averaged_epochs_of,
                                    encoder_config_path, encoder_weights, load_encoder_weights, remove_partial_writes,
                                    save_checkpoint)
from speakerkit.dataLoader import (SPEED_PERTURBATION, CropMaker, PairDataset, TrainDataset, collate,
                                   leave_signals_to_parent)
from speakerkit.errors import UsageError, UserError, first_line, message_of
from speakerkit.evaluation import cohort_of, evaluate_encoder, read_trial_lists
from speakerkit.lists import ShardList, read_shard_list, read_train_list, require_files, without_repeats
from speakerkit.loss import AAMsoftmax, build_objective
from speakerkit.model import EncoderConfig, crop_samples
from speakerkit.records import EpochRecord, average_line, changed_flags, recipe_changes, recorded_arguments, score_line
from speakerkit.runlog import RunLog
from speakerkit.samplers import (EpochSampler, HardNegativeBatches, HardNegativePairBatches, SpeakerGroups,
                                 SpeakerPairSampler)
from speakerkit.schedules import training_schedule
from speakerkit.shards import ShardDataset, steps_per_epoch


class SpeakerModel(nn.Module):
    """The encoder and its training head; its state_dict has the original's `speaker_encoder.*` and
    `speaker_loss.*` keys. `forward` is the training pass (what DistributedDataParallel and torch.compile
    wrap): waveforms of `views` views stacked along the batch -> (loss, accuracy), the encoder under
    autocast when `autocast_dtype` is given, the head in float32."""

    def __init__(self, encoder, head):
        super().__init__()
        self.speaker_encoder = encoder
        self.speaker_loss = head

    def forward(self, waveforms, labels, views=1, autocast_dtype=None, spec_augment=True):
        with torch.autocast(waveforms.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            embeddings = self.speaker_encoder(waveforms, aug=spec_augment)
        return self.speaker_loss(*embeddings.float().chunk(views), labels)

    def classifier(self):
        """The AAM-softmax head (the whole head in classifier mode), or None."""
        head = self.speaker_loss
        return head if isinstance(head, AAMsoftmax) else getattr(head, 'classifier', None)

    def checkpoint_state(self):
        """What model_XXXX.model holds: `speaker_encoder.*` and, when there is a classifier, its weights as
        `speaker_loss.weight`, the keys the original code's checkpoints have. Other heads (temperature,
        matching head) live in resume.pt only."""
        state = {k: v for k, v in self.state_dict().items() if k.startswith('speaker_encoder.')}
        if self.classifier() is not None:
            state['speaker_loss.weight'] = self.classifier().weight.detach()
        return state


def encoder_config(args):
    """The EncoderConfig of the flags: how to rebuild the encoder trained, recorded beside each checkpoint."""
    return EncoderConfig(model=args.model, C=args.C, sampling_rate=args.sampling_rate,
                         embedding_dim=args.embedding_dim)


def adam(parameters, lr):
    """Adam with the original's weight decay, 2e-5, in its fused form: one pass over all parameters instead of
    a loop over them (6 ms against 35 ms a step for ECAPA-TDNN C=512 on a 2-core CPU, bench/RESULTS.md)."""
    return torch.optim.Adam(parameters, lr=lr, weight_decay=2e-5, fused=True)


class NonFiniteTraining(UserError):
    """Too many steps in a row had a non-finite loss or gradients."""


class TrainingStep:
    """One optimiser step on a batch: optional augmentation on the device, the encoder's forward pass under
    autocast (`amp` 'bf16', 'fp16' with dynamic loss scaling, or 'off'), the head and loss in float32,
    backward, optional clipping of the global gradient norm, the update. Under torchrun the model runs inside
    DistributedDataParallel, which averages the gradients over the processes; `compile` compiles that
    forward pass.

    A step whose gradients (so also its loss) are not finite changes no weight, batch-norm statistic or
    optimiser state; it is counted, and `max_bad_steps` such steps in a row raise `NonFiniteTraining`. With
    fp16 this includes the loss scaler's overflow steps, which halve the scale. Reading that one flag back is
    the step's only wait for the device; the gradients are those averaged over the processes, so every
    process decides alike. Returns (loss, accuracy) as device tensors and whether the step was taken."""

    def __init__(self, model, optimizer, device, amp='off', compile=False, grad_clip=0.0, device_augmenter=None,
                 spec_augment=True, max_bad_steps=50):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.forward = model
        if distributed.world_size() > 1:
            self.forward = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == 'cuda' else None)
        if compile:
            self.forward = torch.compile(self.forward)
        self.amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == 'fp16')
        self.grad_clip = grad_clip
        self.device_augmenter = device_augmenter
        self.spec_augment = spec_augment
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0

    def set_schedule(self, lr, margin):
        """The one place the schedule reaches the training: the optimiser's learning rate and the head's margin."""
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        self.model.speaker_loss.set_margin(margin)

    def __call__(self, batch, rng):
        """A step on `batch`, a `dataLoader.Batch`; `rng` draws the device augmentation."""
        labels = batch.labels.to(self.device, non_blocking=True)
        waveforms = torch.cat([views.to(self.device, non_blocking=True) for views in batch.views])
        if self.device_augmenter is not None:
            waveforms = self.device_augmenter(waveforms, rng)
        buffers = [b.detach().clone() for b in self.model.buffers()]  # batch-norm statistics, kept for a bad step
        loss, accuracy = self.forward(waveforms, labels, len(batch.views), self.amp_dtype, self.spec_augment)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        finite = bool(torch.isfinite(norm))
        if finite:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(parameters, self.grad_clip, norm)
            self.scaler.step(self.optimizer)
        else:
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
        self.scaler.update()
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise NonFiniteTraining(f'{self.bad_in_a_row} steps in a row had a non-finite loss or gradients '
                                    f'(--max_bad_steps {self.max_bad_steps}): the weights or the data have gone '
                                    f'bad; lower --lr, set --grad_clip, or check the data with --check_data')
        return loss.detach(), accuracy.detach(), finite


class StopRequest:
    """Set by SIGINT or SIGTERM while installed: training then finishes its current step, saves its state and
    exits 0. A second Ctrl-C (SIGINT) interrupts at once; further SIGTERMs are ignored, since launchers pass
    on the scheduler's SIGTERM that the whole process group already got (torchrun does). Under torchrun
    `requested()` is true on every process as soon as one of them got a signal, so all stop after the same
    step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *_):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number, _frame):
        if self.received is not None:
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signal.Signals(number).name
        print(f'\n{self.received} received: stopping after this step'
              + (' (Ctrl-C again to stop at once)' if number == signal.SIGINT else ''), flush=True)

    def requested(self):
        return distributed.any_rank(self.received is not None)

    def describe(self):
        return self.received or 'a signal to another process'


class NothingTrained(UserError):
    """A stop signal while a run was starting: nothing was trained or saved."""


@contextlib.contextmanager
def stopped_at_once_before_training():
    """SIGINT and SIGTERM while a run starts (reading a million-line list, checking its files) stop it at once
    with `NothingTrained`, which exits with the signal's usual status (130, 143) and says so in one line."""
    def handle(number, _frame):
        error = NothingTrained(f'{signal.Signals(number).name} received before the first training step: nothing '
                               f'was trained; run the same command again to start')
        error.exit_status = 128 + number
        raise error
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handle) for number in StopRequest.SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@dataclasses.dataclass
class EpochProgress:
    """The running sums of an epoch on one process; kept in resume.pt (as a dict) when a run stops inside it."""
    step: int = 0
    loss_sum: float = 0.0
    correct_sum: float = 0.0
    examples: int = 0
    crops: int = 0
    seconds: float = 0.0
    bad_steps: int = 0
    skipped: list = dataclasses.field(default_factory=list)  # (path, reason) of each unusable file met
    speaker_groups: list | None = None  # --sampler chns: the epoch's speaker groups

    @property
    def loss(self):
        return self.loss_sum / max(self.examples, 1)

    @property
    def accuracy(self):
        return self.correct_sum / max(self.examples, 1)

    @property
    def crops_per_s(self):
        return self.crops / self.seconds


def train_one_epoch(step_fn, feed, epoch, schedule, seed, progress, stop=None, reported=None):
    """Steps over a `TrainingFeed`'s loader (`dataLoader.Batch`es) with `step_fn`, a `TrainingStep`, setting the
    learning rate and margin of `schedule(epoch, step, the steps the feed declares for the epoch)` before each
    step; `progress` (an `EpochProgress`, fresh or a stopped epoch's) is updated in place. Returns whether the
    `stop` request came. Files a batch skipped are printed the first time (`reported`: paths already printed).
    Device augmentation draws from a generator seeded by (seed, epoch, step, rank)."""
    reported = set() if reported is None else reported
    step_fn.model.train()
    loss_sum = torch.tensor(progress.loss_sum, device=step_fn.device)
    correct_sum = torch.tensor(progress.correct_sum, device=step_fn.device)
    start, seconds = time.time(), progress.seconds
    total = feed.epochs.steps_in_epoch()
    bar = tqdm.tqdm(feed.loader, desc=f'epoch {epoch}', unit='batch', file=sys.stdout, dynamic_ncols=True,
                    initial=progress.step, total=total, mininterval=1 if sys.stdout.isatty() else 30,
                    disable=not distributed.is_main())
    stopped = False
    for step, batch in enumerate(bar, start=progress.step + 1):
        for path, reason in batch.skipped:
            progress.skipped.append((path, reason))
            if path not in reported:
                reported.add(path)
                tqdm.tqdm.write(f'skipped {path}: {reason}')
        lr, margin = schedule(epoch, step, total)
        step_fn.set_schedule(lr, margin)
        loss, accuracy, taken = step_fn(batch, np.random.default_rng((seed, epoch, step, distributed.rank())))
        progress.step = step
        if taken:
            progress.examples += len(batch.labels)
            progress.crops += sum(len(views) for views in batch.views)
            loss_sum += loss * len(batch.labels)
            correct_sum += accuracy * len(batch.labels)
        else:
            progress.bad_steps += 1
        if step % 10 == 0 or step == total:
            examples = max(progress.examples, 1)
            bar.set_postfix(lr=f'{lr:.6f}', loss=f'{loss_sum.item() / examples:.4f}', refresh=False,
                            acc=f'{correct_sum.item() / examples:.2f}%',
                            utt_s=f'{progress.crops / (seconds + time.time() - start):.1f}')
        if stop is not None and stop.requested():
            stopped = True
            break
    if progress.step == 0:
        raise UsageError('the training loader produced no batch: --batch_size is larger than the training list')
    progress.loss_sum, progress.correct_sum = loss_sum.item(), correct_sum.item()
    progress.seconds = seconds + time.time() - start
    return stopped


def speeds(args):
    """The speeds training crops are played at: SPEED_PERTURBATION under --speed_perturb on, else (1.0,)."""
    return SPEED_PERTURBATION if args.speed_perturb else (1.0,)


@dataclasses.dataclass(frozen=True)
class TrainingFeed:
    """What the epochs train on: the `loader` of batches; `epochs`, its plan of each epoch (a sampler of
    samplers.py or a shards.ShardDataset: `set_epoch(epoch, steps_done)`, `steps_in_epoch()`); and with
    --sampler chns the `grouping` of speakers whose groups the epoch's start sets."""
    loader: torch.utils.data.DataLoader
    epochs: object
    grouping: SpeakerGroups | None = None


def training_loader(args, data, augmenter, device):
    """The TrainingFeed of --mode: crops of single utterances (`EpochSampler`, `HardNegativeBatches`; a
    `ShardDataset` when `data` is a ShardList) or pairs of views of distinct speakers (`SpeakerPairSampler`,
    `HardNegativePairBatches`), batched by `collate`."""
    loader_options = {'num_workers': args.n_cpu, 'pin_memory': device.type == 'cuda', 'collate_fn': collate,
                      'persistent_workers': args.n_cpu > 0, 'prefetch_factor': 4 if args.n_cpu > 0 else None,
                      'worker_init_fn': leave_signals_to_parent,
                      # Starting an epoch draws the workers' base seed: from its own generator, not the global one,
                      # so that a run resumed mid-epoch draws the same SpecAugment masks as an uninterrupted one.
                      'generator': torch.Generator().manual_seed(args.seed)}
    share = (distributed.world_size(), distributed.rank())
    if isinstance(data, ShardList):  # workers start anew each epoch, to take the epoch's shards
        crops = CropMaker(crop_samples(args.num_frames, args.sampling_rate), args.sampling_rate, augmenter,
                          len(data.speakers), speeds(args), args.skip_silent)
        dataset = ShardDataset(data, crops, args.seed, args.batch_size,
                               steps_per_epoch(data, args.batch_size, distributed.world_size()), *share)
        loader_options['persistent_workers'] = False
        return TrainingFeed(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, **loader_options),
                            dataset)
    dataset_type = TrainDataset if args.mode == 'classifier' else PairDataset
    dataset = dataset_type(data, args.train_path, args.num_frames, args.sampling_rate, augmenter, args.seed,
                           args.skip_silent, speeds(args))
    grouping = SpeakerGroups(dataset.labels, args.batch_size, args.hard_fraction) if args.sampler == 'chns' else None
    if args.mode == 'classifier':
        sampler = HardNegativeBatches(dataset.labels, args.batch_size, grouping, args.seed, *share) if grouping \
            else EpochSampler(len(dataset), args.batch_size, args.seed, *share)
    else:
        sampler = HardNegativePairBatches(dataset.labels, args.batch_size, grouping, args.seed, *share) if grouping \
            else SpeakerPairSampler(dataset.labels, args.batch_size, args.seed, *share)
    return TrainingFeed(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_options), sampler,
                        grouping)


def log(*parts):
    """Print on the main process only (under torchrun every process runs the same code)."""
    if distributed.is_main():
        print(*parts, flush=True)


def main_process_result(compute):
    """What `compute()` returns on process 0, sent to every process; a UserError it raises is raised by all."""
    found = None
    if distributed.is_main():
        try:
            found = compute()
        except UserError as error:
            found = error
    found = distributed.from_main(found)
    if isinstance(found, UserError):
        raise found
    return found


def checkpoint_path(model_dir, epoch):
    return os.path.join(model_dir, f'model_{epoch:04d}.model')


def averaged(path, epochs):
    """Whether the average checkpoint at `path` is that of `epochs` ([first, last])."""
    return os.path.exists(path) and os.path.exists(encoder_config_path(path)) and \
        averaged_epochs_of(path) == epochs


def last_epochs_average(model_dir, first, last, count):
    """The mean of the weights of epochs first..last (--average `count`), saved in `model_dir`."""
    paths = [checkpoint_path(model_dir, epoch) for epoch in range(first, last + 1)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UserError(f'--average {count}: {missing[0]} is missing (a run saves the last epochs only when given '
                        f'--average from its start); average those there are with --average_checkpoints')
    return average_checkpoints(paths)


def resume_state_of(args, resume_path):
    """The ResumeState of the run in args.save_path, or None for a new run, after checking that the folder
    holds no other run's results and that a run to continue is continued as it started."""
    if not os.path.exists(resume_path):
        check_no_other_results(args.save_path, os.path.dirname(resume_path))
        return None
    check_same_recipe(args, resume_path)
    return ResumeState.load(resume_path)


def check_no_other_results(save_path, model_dir):
    """A run without resume.pt starts afresh: it must not overwrite another run's checkpoints and log (the
    original code's, say, which writes no resume.pt)."""
    found = sorted(glob.glob(os.path.join(glob.escape(model_dir), 'model_*.model')))
    score_path = os.path.join(save_path, 'score.txt')
    if os.path.exists(score_path) and os.path.getsize(score_path):
        found.insert(0, score_path)
    if found:
        raise UserError(f'{save_path} holds the results of another run ({found[0]}, {len(found)} files) '
                        f'but no model/resume.pt to continue it: choose another --save_path or move them away')


def check_same_recipe(args, resume_path):
    """A run continues only as it started: from the same --initial_model, with the same flags for everything
    that decides what is trained (records.recipe_changes); the others may change, and are named."""
    recorded = recorded_arguments(os.path.join(args.save_path, 'config.json'))
    if recorded is None:
        return
    if 'average' not in args.given and 'average' in recorded:  # its own: the run saved the epochs that one needs
        args.average = recorded['average']
    if 'lr_decay_every' not in recorded and 'test_step' in recorded:  # before the flag, --test_step set it
        recorded['lr_decay_every'] = recorded['test_step']
    changed = changed_flags(recorded, args)
    changes = recipe_changes(changed, args.scheduler)
    previous, given = changes.pop('initial_model', (None, None))
    if previous is not None and not (previous and given and os.path.exists(previous) and os.path.exists(given)
                                     and os.path.samefile(previous, given)):
        raise UsageError(f'{resume_path} continues a run started from {previous or "fresh weights"}, not '
                         f'from --initial_model {given or "(none)"}: give that run\'s --initial_model to '
                         f'continue it, or another --save_path to start a new run')
    if changes:
        listed = ', '.join(f'--{name} {now} (the run has {before})' for name, (before, now) in changes.items())
        raise UsageError(f'{resume_path} continues a run started with other flags: {listed}; give the '
                         f'run\'s flags (its config.json holds them) to continue it, or another --save_path to '
                         f'start a new run (--initial_model {os.path.dirname(resume_path)}/model_XXXX.model takes '
                         f'its weights)')
    for name in sorted(set(changed) - {'initial_model', 'config'}):
        log(f'continuing with --{name} {changed[name][1]} (the run had {changed[name][0]})')


def read_training_inputs(args):
    """(the training data, a TrainList or with --train_shards a ShardList; the trial lists; the classifier's
    classes: --n_class or else the speakers, times 3 under --speed_perturb on), after checking every file they
    name and the class count."""
    if args.train_shards:
        data = read_shard_list(args.train_shards)
    else:
        data, repeats = without_repeats(read_train_list(args.train_list))
        if repeats:
            log(f'{args.train_list}: {repeats} lines repeat an earlier line and are left out')
        require_files(data.paths, data.lines, args.train_path, args.train_list)
    source = args.train_shards or args.train_list
    speakers = len(data.speakers)
    classes = speakers * len(speeds(args))
    if speakers < 2:
        raise UsageError(f'{source}: every utterance is of speaker {data.speakers[0]}; training a speaker '
                         f'encoder needs at least two speakers')
    if args.mode == 'classifier' and args.batch_size * distributed.world_size() > len(data):
        raise UsageError(f'--batch_size {args.batch_size} on {distributed.world_size()} processes is more than '
                         f'the {len(data)} utterances of {source}')
    if args.n_class is not None and args.n_class < classes:
        raise UsageError(f'--n_class {args.n_class} is smaller than the {speakers} speakers in {source}'
                         if classes == speakers else f'--n_class {args.n_class} is smaller than the {classes} '
                         f'classes of --speed_perturb on ({speakers} speakers in {source} x 3 speeds)')
    return data, read_trial_lists(args) if args.eval_list else [], args.n_class or classes


def combined_record(epoch, everyone, lr, margin, train_seconds):
    """The EpochRecord of an epoch from every process's EpochProgress (`everyone`), the learning rate and margin
    of its last step: loss and accuracy averaged over the processes, speeds and skipped files summed."""
    return EpochRecord(epoch=epoch, loss=float(np.mean([p.loss for p in everyone])),
                       accuracy=float(np.mean([p.accuracy for p in everyone])), lr=lr, margin=margin,
                       crops_per_s=sum(p.crops_per_s for p in everyone), bad_steps=everyone[0].bad_steps,
                       skipped_files=sum(len(p.skipped) for p in everyone), train_seconds=train_seconds)


def restore_state(args, model, optimizer, device, resume_path):
    """The ResumeState of args.save_path, loaded into the model, optimiser and generators; or None, after
    loading --initial_model's weights when given. Process 0 reads the run folder and sends what it found to
    the others, so that on several machines only its own need hold the folder."""
    resume = main_process_result(lambda: resume_state_of(args, resume_path))
    if resume is None:
        if args.initial_model:
            loaded = load_encoder_weights(model.speaker_encoder, model.classifier(), args.initial_model,
                                          args.allow_partial_load, encoder_config(args))
            log(f'Model {args.initial_model} loaded ({loaded})')
        return None
    try:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f'{resume_path} was written by a run with other model or loss flags; continue it with '
                         f'those flags or choose another --save_path ({first_line(error)})') from None
    rank = distributed.rank()
    torch.set_rng_state(resume.rng[rank % len(resume.rng)])
    if device.type == 'cuda' and resume.cuda_rng is not None:
        torch.cuda.set_rng_state(resume.cuda_rng[rank % len(resume.cuda_rng)], device)
    partial = resume.partial_epoch
    log(f'Resuming from {resume_path} after epoch {resume.epoch}'
        + (f' and {partial[0]["step"]} steps of epoch {resume.epoch + 1}' if partial else ''))
    return resume


def training_augmenters(args, device):
    """(the loader workers' Augmenter, the DeviceAugmenter): one of them None. With --gpu_augment the workers
    only read and crop, and noise and reverberation are added on `device`."""
    augmenter = Augmenter(args.musan_path, args.rir_path, args.sampling_rate, args.cache_dir, args.noise_power_floor)
    for path, why in augmenter.skipped:
        log(f'augmentation: skipped {path} ({why})')
    if args.gpu_augment:
        return None, DeviceAugmenter(augmenter, device)
    return augmenter, None


class TrainingRun:
    """A training run in `args.save_path`: model/checkpoint_XXXX.model and its JSON every --test_step epochs,
    model/resume.pt after every epoch (or when stopped), score.txt, metrics.jsonl, config.json, plots/.
    Under torchrun every process runs this with its share of each epoch; process 0 alone writes."""

    def __init__(self, args):
        self.data, self.trial_lists, n_class = read_training_inputs(args)
        self.args = args = argparse.Namespace(**vars(args) | {'n_class': n_class})  # as trained: the count resolved
        self.device = torch.device(args.device)
        self.model_dir = os.path.join(args.save_path, 'model')
        self.resume_path = os.path.join(self.model_dir, 'resume.pt')
        self.log = RunLog(args.save_path, writes=distributed.is_main())
        torch.manual_seed(args.seed + distributed.rank())
        self.cohort = cohort_of(args, self.data)
        self.reported = set()  # unusable files already printed
        encoder = encoder_config(args).build()
        self.model = SpeakerModel(encoder, build_objective(args, encoder.embedding_dim)).to(self.device)
        self.optimizer = adam(self.model.parameters(), args.lr)
        log(f'{args.model}: {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M parameters, '
            f'{len(self.data)} utterances of {len(self.data.speakers)} speakers, {args.n_class} '
            f'classes, device {self.device}'
            + (f', {distributed.world_size()} processes' if distributed.world_size() > 1 else ''))
        self.resume = restore_state(args, self.model, self.optimizer, self.device, self.resume_path)
        augmenter, device_augmenter = training_augmenters(args, self.device)
        self.step_fn = TrainingStep(self.model, self.optimizer, self.device, args.amp, args.compile, args.grad_clip,
                                    device_augmenter, args.spec_augment, args.max_bad_steps)
        if self.resume is not None:
            self.step_fn.scaler.load_state_dict(self.resume.scaler)
        self.feed = training_loader(args, self.data, augmenter, self.device)
        self.schedule = training_schedule(args)
        self.eers = self.resume.eers if self.resume else []
        self.first_epoch = self.resume.epoch + 1 if self.resume else 1
        removed = {self.model_dir: remove_partial_writes(self.model_dir, ('resume.pt', 'model_*.model', 'model_*.json'))
                   if distributed.is_main() else 0}
        recorded = self.first_epoch - 1 - (1 if self.resume and self.resume.unevaluated else 0)
        removed[args.save_path] = self.log.start(args, self.device, distributed.world_size(), self.first_epoch - 1,
                                                 recorded)
        for folder, count in removed.items():
            if count:
                log(f'{folder}: removed {count} temporary files of writes a stopped run left unfinished')

    def save_resume(self, epoch, partial=None, unevaluated=None):
        """resume.pt: the state after `epoch` complete epochs and, when stopped inside the next one, every
        process's `EpochProgress` of that epoch; or, when `epoch` is still to evaluate, its EpochRecord."""
        rng = distributed.gather_objects(torch.get_rng_state())
        cuda_rng = (distributed.gather_objects(torch.cuda.get_rng_state(self.device))
                    if self.device.type == 'cuda' else None)
        partials = distributed.gather_objects(dataclasses.asdict(partial)) if partial is not None else None
        if distributed.is_main():
            ResumeState(epoch=epoch, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), rng=rng,
                        cuda_rng=cuda_rng, scaler=self.step_fn.scaler.state_dict(), eers=self.eers,
                        partial_epoch=partials,
                        unevaluated=unevaluated and dataclasses.asdict(unevaluated)).save(self.resume_path)

    def progress_at(self, epoch):
        """This process's EpochProgress to continue `epoch` from: the stopped one's on resume, else fresh."""
        if epoch == self.first_epoch and self.resume is not None and self.resume.partial_epoch:
            stored = self.resume.partial_epoch[distributed.rank() % len(self.resume.partial_epoch)]
            return EpochProgress(**stored)
        return EpochProgress()

    def train_epoch(self, epoch, stop):
        """Train `epoch`; returns (this process's EpochProgress, whether a stop was requested inside it)."""
        progress = self.progress_at(epoch)
        self.feed.epochs.set_epoch(epoch, progress.step)
        grouping = self.feed.grouping
        if grouping is not None:  # the groups of the epoch's start, kept for a resume
            if progress.speaker_groups is None:
                progress.speaker_groups = grouping.from_weights(self.model.classifier().weight, self.args.seed, epoch)
            grouping.groups = progress.speaker_groups
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: let cuDNN pick its fastest kernels
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        stopped = train_one_epoch(self.step_fn, self.feed, epoch, self.schedule, self.args.seed, progress, stop,
                                  self.reported)
        torch.backends.cudnn.benchmark = False  # evaluation sees every utterance length once
        if not stopped:
            distributed.share_buffers_of_main(self.model)
        return progress, stopped

    def epoch_record(self, epoch, progress, started):
        """The EpochRecord of every process's `progress`; lists and counts the files skipped."""
        everyone = distributed.gather_objects(progress)
        if not any(p.examples for p in everyone):
            raise NonFiniteTraining(f'every step of epoch {epoch} had a non-finite loss or gradients, so nothing was '
                                    f'trained: lower --lr, set --grad_clip, or check the data with --check_data')
        skipped = [entry for p in everyone for entry in p.skipped]
        record = combined_record(epoch, everyone, *self.schedule(epoch, progress.step, progress.step),
                                 train_seconds=time.time() - started)
        contrastive = getattr(self.model.speaker_loss, 'contrastive', None)
        if contrastive is not None:
            record.contrastive_scale = float(contrastive.scale())
        if self.device.type == 'cuda':
            record.peak_gpu_memory_gib = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.log.skipped(epoch, skipped)
        if skipped:
            log(f'epoch {epoch}: {len(skipped)} unusable files skipped and replaced (listed in '
                f'{self.log.skipped_path})')
        if record.bad_steps:
            log(f'epoch {epoch}: {record.bad_steps} steps skipped for a non-finite loss or gradients')
        return record

    def save_weights(self, epoch):
        if distributed.is_main():
            save_checkpoint(self.model.checkpoint_state(), encoder_config(self.args),
                            checkpoint_path(self.model_dir, epoch))

    def save_trained(self, record):
        """Before an evaluation: resume.pt holding the epoch as trained, not evaluated, so that an evaluation
        that fails loses no training; then model_XXXX.model. In that order, a stop between the two leaves a
        state to continue from (which writes the checkpoint again), never a checkpoint without its resume.pt."""
        self.save_resume(record.epoch, unevaluated=record)
        self.save_weights(record.epoch)

    def evaluate_average(self):
        """--average N, after the last epoch: model/model_average.model, the mean of the last N epochs' weights,
        scored on a score.txt line of its own; once for those epochs (a rerun of a finished run leaves it be, a
        run continued to a later --max_epoch or given another N averages again). Its JSON records the epochs.
        Process 0 averages the checkpoints and sends the weights to the others; all evaluate them (under torchrun
        each embeds its share of the files), process 0 writes."""
        args = self.args
        path = os.path.join(self.model_dir, 'model_average.model')
        epochs = [args.max_epoch - args.average + 1, args.max_epoch]
        state = main_process_result(lambda: None if averaged(path, epochs) else
                                    last_epochs_average(self.model_dir, *epochs, args.average))
        if state is None:
            return
        encoder = encoder_config(args).build()
        encoder.load_state_dict(encoder_weights(state))
        results = evaluate_encoder(encoder.to(self.device).eval(), args, self.device, self.trial_lists, self.cohort)
        line = average_line(*epochs, results)
        log(time.strftime('%Y-%m-%d %H:%M:%S'), line)
        self.log.score(line)
        if distributed.is_main():
            save_checkpoint(state, encoder_config(args), path, averaged_epochs=epochs)

    def evaluate_epoch(self, record):
        """Score the trial lists (if any) with the model as trained to `record.epoch`; log the score.txt line."""
        epoch = record.epoch
        try:
            results = evaluate_encoder(self.model.speaker_encoder, self.args, self.device, self.trial_lists,
                                       self.cohort)
        except UserError as error:
            raise UserError(f'epoch {epoch} is trained and saved in {self.resume_path}, but its evaluation failed: '
                            f'{message_of(error)}; once that is put right, run the same command again to evaluate '
                            f'epoch {epoch} and continue') from error
        self.eers += [r.metrics.eer for r in results.values() if r.metrics][:1]
        line = score_line(record, results, min(self.eers) if self.eers else None)
        log(time.strftime('%Y-%m-%d %H:%M:%S'), line)
        record.add_results(results)
        self.log.score(line)
        return results

    def finish_epoch(self, record, started, evaluate):
        """Evaluate a trained epoch if `evaluate`, write its records, and save resume.pt after it."""
        results = self.evaluate_epoch(record) if evaluate else None
        record.epoch_seconds = time.time() - started
        self.log.epoch(record, results)
        self.save_resume(record.epoch)

    def run(self):
        """Epochs from the first unfinished one to --max_epoch; returns False when stopped by a signal."""
        args = self.args
        if self.first_epoch > args.max_epoch and not (self.resume and self.resume.unevaluated):
            log(f'{self.resume_path} holds epoch {self.first_epoch - 1}: nothing to train up to --max_epoch '
                f'{args.max_epoch}')
        with StopRequest() as stop:
            if self.resume is not None and self.resume.unevaluated:
                record = EpochRecord(**self.resume.unevaluated)
                log(f'Evaluating epoch {record.epoch}, trained before the last run stopped')
                self.save_weights(record.epoch)  # the stop may have come before it was written
                self.finish_epoch(record, time.time() - record.train_seconds, evaluate=True)
            for epoch in range(self.first_epoch, args.max_epoch + 1):
                started = time.time()
                try:
                    progress, stopped = self.train_epoch(epoch, stop)
                except NonFiniteTraining as error:
                    raise NonFiniteTraining(f'stopped in epoch {epoch}: {error}; the last complete state is '
                                            f'{self.resume_path}') from None
                if stopped:
                    self.save_resume(epoch - 1, progress)
                    log(f'Stopped by {stop.describe()} in epoch {epoch} after step {progress.step}; the state is '
                        f'saved in {self.resume_path}. Run the same command again to continue.')
                    return False
                record = self.epoch_record(epoch, progress, started)
                evaluate = epoch % args.test_step == 0 or epoch == args.max_epoch
                if evaluate:
                    self.save_trained(record)
                elif epoch > args.max_epoch - args.average:
                    self.save_weights(epoch)
                self.finish_epoch(record, started, evaluate)
                if epoch < args.max_epoch and stop.requested():
                    log(f'Stopped by {stop.describe()} after epoch {epoch}; the state is saved in '
                        f'{self.resume_path}. Run the same command again to continue.')
                    return False
            if args.average:  # a signal meanwhile is noted; the run is over once the average is evaluated
                self.evaluate_average()
        log(f'score.txt: {self.log.score_path}\ncheckpoints: {self.model_dir}')
        return True

    def close(self):
        self.log.close()


def run_training(args):
    """Train as `args` says (flags of trainECAPAModel.py, checked and completed), holding save_path's lock."""
    lock, refused = FolderLock(args.save_path), None
    if distributed.is_main():
        try:
            lock.acquire()
        except UserError as error:
            refused = error
    if distributed.any_rank(refused is not None):
        raise refused or UserError(f'{args.save_path} is in use by another run (process 0 says which)')
    try:
        with stopped_at_once_before_training():
            run = TrainingRun(args)
        try:
            return run.run()
        finally:
            run.close()
    except OSError as error:  # what the system refused: a full disk, a file system gone read-only, ...
        raise UserError(f'{error.filename or args.save_path}: {error.strerror or error}') from error
    except RuntimeError as error:
        if not distributed.lost_a_process(error):
            raise
        raise UserError(f'another process of the run stopped or cannot be reached ({first_line(error)[:200]}); '
                        f'what the run saved last is in {os.path.join(args.save_path, "model", "resume.pt")}: once '
                        f'every machine is back, run the same command again on each to continue') from error
    finally:
        if distributed.is_main():
            lock.release()
