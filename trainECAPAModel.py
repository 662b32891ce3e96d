"""Train a speaker encoder and score trial lists: the one entry point.

  python trainECAPAModel.py --demo                          # generated corpus, train + evaluate
  python trainECAPAModel.py --train_list ... --train_path ... --eval_list ... --eval_path ...
  python trainECAPAModel.py --eval --initial_model M --eval_list L --eval_path P [--snorm ...]

Re-running a training command continues from `save_path/model/resume.pt`, the state after the last
finished epoch.
"""

import argparse
import math
import os
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tqdm

import demo
import distributed
from dataLoader import (Augmenter, DeviceAugmenter, EpochSampler, PairDataset, SpeakerPairSampler, TrainDataset,
                        collate, default_cache_dir, parse_train_list, speaker_labels, train_list_rows)
from loss import AAMsoftmax, build_objective
from model import MODELS, build_encoder
from plots import evaluation_plots, training_curve
from prepare import AUDIO_EXTENSIONS, check_data, files_under, list_references
from records import TensorBoard, append_metrics, forget_epochs_after, write_config
from schedules import training_schedule
from tools import (as_norm, atomic_torch_save, build_cohort, cached_embed_files, embed_files, encoder_weights,
                   export_onnx, export_torchscript, file_digest, load_model, load_state_dict_file, read_score_file,
                   save_checkpoint, score_trials, trial_columns, trial_rows, verification_metrics, write_score_file)

DEMO_DEFAULTS = {'save_path': 'exps/demo', 'max_epoch': 7, 'batch_size': 32, 'num_frames': 150,
                 'test_step': 1, 'lr': 0.002, 'n_cpu': 1}
DEMO_WIDTHS = {'ecapa-tdnn': 128, 'tdnn': 256}  # --C for the demo; ResNets take 16 base channels
# Large-margin fine-tuning, after wespeaker's VoxCeleb recipe (conf/ecapa_tdnn_lm.yaml): 5 epochs of 6 s crops,
# margin 0.5, lr from 1e-4 to 2.5e-5 with a one-epoch warm-up, no SpecAugment.
LARGE_MARGIN_DEFAULTS = {'num_frames': 600, 'm': 0.5, 'max_epoch': 5, 'scheduler': 'warmup_exp', 'lr': 1e-4,
                         'final_lr': 2.5e-5, 'warmup_epochs': 1, 'spec_augment': 'off'}


def available_cores():
    """The cores this process may use, shared among the processes torchrun started on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', '1')))


def build_parser():
    parser = argparse.ArgumentParser(
        description='Train a speaker encoder (AAM-softmax or contrastive) and score speaker-verification trials.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--train_list', help='training list, lines "<speaker> <relative path>"')
    data.add_argument('--train_path', help='folder the training list paths are relative to')
    data.add_argument('--eval_list', nargs='+',
                      help='trial lists, lines "<0|1> <enroll> <test>" (or "<enroll> <test>": scored without '
                           'metrics); e.g. veri_test2.txt list_test_all2.txt list_test_hard2.txt')
    data.add_argument('--eval_path', help='folder the trial list paths are relative to')
    data.add_argument('--musan_path', help='MUSAN split into 5 s chunks (noise|speech|music/<subset>/<stem>/*.wav); '
                                           'omit to train without additive noise')
    data.add_argument('--rir_path', help='impulse responses (<room type>/<room>/*.wav, e.g. '
                                         'RIRS_NOISES/simulated_rirs); omit to train without reverberation')
    data.add_argument('--num_frames', type=int, default=200, help='training crop in 10 ms frames (200 = 2 s)')
    data.add_argument('--sampling_rate', type=int, default=16000, help='all audio is resampled to this rate')
    data.add_argument('--cache_dir', default=default_cache_dir(),
                      help='where decoded noise and impulse-response banks are kept')
    data.add_argument('--skip_silent', default='on', choices=['on', 'off'],
                      help='on: a training crop that is all zeros is replaced like an unreadable file; off: it is '
                           'trained on (it yields finite features and losses)')
    data.add_argument('--check_data', action='store_true',
                      help='check the given lists and folders (files exist, decode, are not empty, silent or '
                           'non-finite), report counts, durations, rates and speakers and the first problems with '
                           'their list lines, exit 1 on problems; trains nothing')
    data.add_argument('--check_decode', type=int, default=2000,
                      help='--check_data: files of each source decoded in full, spread evenly (0: all); the others '
                           'have their headers read')

    model = parser.add_argument_group('model')
    model.add_argument('--model', default='ecapa-tdnn', choices=sorted(MODELS),
                       help='encoder architecture (with --eval, the one recorded beside the checkpoint when '
                            'this flag is not given)')
    model.add_argument('--C', type=int, default=None,
                       help='encoder width: channels of ECAPA-TDNN (default 1024), base channels of ResNet '
                            '(32), frame-layer channels of TDNN (512)')
    model.add_argument('--embedding_dim', type=int, default=None,
                       help='embedding size (default 192 for ECAPA-TDNN, 256 ResNet, 512 TDNN)')

    objective = parser.add_argument_group('loss')
    objective.add_argument('--mode', default='classifier', choices=['classifier', 'clip', 'blip'],
                           help='classifier: AAM-softmax on single crops; clip: InfoNCE between two views of '
                                'distinct speakers; blip: clip plus a pair-matching head trained on hard negatives')
    objective.add_argument('--loss', choices=['aamsoftmax', 'infonce', 'aam_infonce'],
                           help='aamsoftmax (mode classifier, the default there) or the contrastive term of '
                                'clip/blip: infonce (default) or aam_infonce (margin --m on the positives)')
    objective.add_argument('--m', type=float, default=0.2, help='additive angular margin (radians)')
    objective.add_argument('--s', type=float, default=30, help='logit scale')
    objective.add_argument('--n_class', type=int, default=None,
                           help='number of classes (default: the speakers in the training list)')
    objective.add_argument('--classifier_weight', type=float, default=0.8,
                           help='clip/blip: weight of the AAM-softmax term on view 1 (0: no classifier)')
    objective.add_argument('--contrastive_weight', type=float, default=0.2,
                           help='clip/blip: weight of the InfoNCE / AAM-InfoNCE term')
    objective.add_argument('--matching_weight', type=float, default=0.2,
                           help='blip: weight of the pair-matching cross-entropy')
    objective.add_argument('--hard_negative', default='softmax', choices=['softmax', 'argmax'],
                           help='blip: draw each negative with probability softmax(similarity), or take the '
                                'most similar')
    objective.add_argument('--fixed_contrastive_scale', action='store_true',
                           help='clip/blip: scale the contrastive logits by --s instead of a learned '
                                'temperature')
    objective.add_argument('--local_negatives', action='store_true',
                           help='clip/blip under torchrun: negatives from this process\'s batch only, instead of '
                                'the batches of all processes')

    training = parser.add_argument_group('training')
    training.add_argument('--max_epoch', type=int, default=80, help='train up to this epoch')
    training.add_argument('--batch_size', type=int, default=400,
                          help='utterances (clip/blip: speakers, two views each) per step and per process; under '
                               'torchrun the global batch is this times the number of processes')
    training.add_argument('--lr', type=float, default=0.001, help='initial learning rate (Adam)')
    training.add_argument('--lr_decay', type=float, default=0.97,
                          help='--scheduler step: learning rate factor applied every test_step epochs')
    training.add_argument('--scheduler', default='step', choices=['step', 'warmup_exp'],
                          help='step: the original StepLR, lr * lr_decay ** ((epoch - 1) // test_step); warmup_exp: '
                               'linear warm-up over --warmup_epochs and exponential decay from --lr to --final_lr '
                               'over the run, step by step (wespeaker\'s recipe)')
    training.add_argument('--warmup_epochs', type=float, default=6, help='--scheduler warmup_exp: warm-up length')
    training.add_argument('--final_lr', type=float, default=5e-5, help='--scheduler warmup_exp: lr at the last step')
    training.add_argument('--margin_schedule', type=int, nargs=2, metavar=('START', 'END'),
                          help='margin 0 until epoch START, then rising linearly (per step) to --m at epoch END')
    training.add_argument('--spec_augment', default='on', choices=['on', 'off'],
                          help='time and frequency masks on the training features')
    training.add_argument('--large_margin', action='store_true',
                          help=f'large-margin fine-tuning of --initial_model: flags not given take '
                               f'{LARGE_MARGIN_DEFAULTS}')
    training.add_argument('--test_step', type=int, default=1, help='evaluate and save every this many epochs')
    training.add_argument('--seed', type=int, default=10, help='seed of every random choice')
    training.add_argument('--initial_model', default='',
                          help='start from these weights (this toolkit\'s or the original code\'s checkpoints); '
                               'every encoder weight must match')
    training.add_argument('--allow_partial_load', action='store_true',
                          help='--initial_model: load the encoder weights whose names and shapes match, list the '
                               'others and train them from scratch')
    training.add_argument('--max_bad_steps', type=int, default=50,
                          help='stop when this many steps in a row have a non-finite loss or gradients (each such '
                               'step is skipped)')
    training.add_argument('--amp', choices=['bf16', 'fp16', 'off'],
                          help='mixed precision of the encoder\'s forward pass (default: bf16 on CUDA, off on CPU); '
                               'features and losses stay float32; fp16 adds dynamic loss scaling')
    training.add_argument('--compile', action='store_true', help='torch.compile the encoder for training steps')
    training.add_argument('--grad_clip', type=float, default=0.0,
                          help='clip the gradients\' global L2 norm to this value (0: no clipping)')
    training.add_argument('--gpu_augment', action='store_true',
                          help='add noise and reverberation on --device, batch by batch, instead of in the loader '
                               'workers (same kinds, SNRs and probabilities)')

    evaluation = parser.add_argument_group('evaluation')
    evaluation.add_argument('--eval', action='store_true', help='only score --eval_list with --initial_model')
    evaluation.add_argument('--export', metavar='FILE',
                            help='write --initial_model\'s encoder as TorchScript (FILE.pt) or ONNX (FILE.onnx) '
                                 'and exit')
    evaluation.add_argument('--snorm', action='store_true',
                            help='also report AS-Norm scores, with a cohort of speaker means from --train_list')
    evaluation.add_argument('--cohort_top_k', type=int, default=300, help='AS-Norm: top cohort scores used')
    evaluation.add_argument('--cohort', default='speaker', choices=['speaker', 'utterance'],
                            help='AS-Norm cohort: speaker means or single utterances of the training list')
    evaluation.add_argument('--cohort_size', type=int, default=20000,
                            help='AS-Norm: training utterances embedded for the cohort, spread over the '
                                 'speakers (0: all)')
    evaluation.add_argument('--extract', metavar='LIST_OR_DIR',
                            help='embed every file of a folder, or of a list (last field of each line, relative '
                                 'to --eval_path or the list\'s folder), with --initial_model; needs --out')
    evaluation.add_argument('--out', help='--extract: file to write {paths, embeddings, vectors} to (torch.save)')
    evaluation.add_argument('--score_file', nargs='+', metavar='FILE',
                            help='only compute EER and minDCF of existing "enroll test score label" files')

    system = parser.add_argument_group('system')
    system.add_argument('--save_path', default='exps/exp1', help='checkpoints, score.txt and score files')
    system.add_argument('--n_cpu', type=int, default=available_cores(), help='data loader workers')
    system.add_argument('--device', default=None, help='torch device (default: cuda when available, else cpu)')
    system.add_argument('--tensorboard', action='store_true',
                        help='also write each epoch\'s metrics as TensorBoard scalars to save_path/tensorboard '
                             '(needs the tensorboard package)')
    system.add_argument('--demo', action='store_true',
                        help=f'generate a small corpus under save_path and train on it; flags given beside '
                             f'it override the demo defaults {DEMO_DEFAULTS} and --C {DEMO_WIDTHS} (16 for '
                             f'ResNets)')
    return parser


def explicit_flags(argv):
    """The destinations of the flags actually given on the command line."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = explicit_flags(argv)
    args.given = sorted(given)
    if args.demo:
        for name, value in DEMO_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
        if 'C' not in given:
            args.C = DEMO_WIDTHS.get(args.model, 16)
        paths = demo.corpus_paths(os.path.join(args.save_path, 'corpus'))
        for name, value in paths.items():
            if name not in given:
                setattr(args, name, [value] if name == 'eval_list' else value)
    if args.large_margin:
        for name, value in LARGE_MARGIN_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
    validate(args, parser)
    return args


def validate(args, parser):
    def need(*names, why):
        missing = [f'--{n}' for n in names if not getattr(args, n)]
        if missing:
            parser.error(f"{why} needs {' '.join(missing)}")

    for name in ('num_frames', 'batch_size', 'max_epoch', 'test_step', 'sampling_rate', 'cohort_top_k',
                 'max_bad_steps'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    for name in ('C', 'embedding_dim', 'n_class'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    for name in ('cohort_size', 'n_cpu', 'grad_clip', 'check_decode'):
        if getattr(args, name) < 0:
            parser.error(f'--{name} cannot be negative, got {getattr(args, name)}')
    if args.gpu_augment and not (args.musan_path or args.rir_path):
        parser.error('--gpu_augment needs --musan_path or --rir_path: there is nothing to augment with')
    if not (args.lr > 0 and 0 < args.lr_decay <= 1 and args.final_lr > 0 and args.warmup_epochs >= 0):
        parser.error('--lr and --final_lr must be positive, --lr_decay in (0, 1] and --warmup_epochs not negative')
    if args.margin_schedule and not 1 <= args.margin_schedule[0] <= args.margin_schedule[1]:
        parser.error(f'--margin_schedule START END needs 1 <= START <= END, got {args.margin_schedule}')
    if not (0 <= args.m < math.pi / 2 and args.s > 0):
        parser.error('--m must be in [0, pi/2) and --s positive')
    contrastive = args.mode in ('clip', 'blip')
    args.loss = args.loss or ('infonce' if contrastive else 'aamsoftmax')
    if contrastive != (args.loss != 'aamsoftmax'):
        parser.error(f'--mode {args.mode} trains with ' + ('--loss infonce or aam_infonce' if contrastive else
                                                            '--loss aamsoftmax') + f', not --loss {args.loss}')
    weights = {'classifier_weight': args.classifier_weight, 'contrastive_weight': args.contrastive_weight,
               'matching_weight': args.matching_weight}
    if any(w < 0 for w in weights.values()):
        parser.error('loss weights cannot be negative')
    if contrastive:
        active = [n for n in weights if weights[n] > 0 and (n != 'matching_weight' or args.mode == 'blip')]
        if not active:
            parser.error(f'--mode {args.mode}: every loss weight is 0, nothing would be trained')
        if args.mode == 'blip' and args.matching_weight == 0:
            parser.error('--mode blip with --matching_weight 0 is --mode clip')
    else:
        changed = [f'--{n}' for n in ('classifier_weight', 'contrastive_weight', 'matching_weight', 'hard_negative',
                                      'fixed_contrastive_scale', 'local_negatives') if n in args.given]
        if changed:
            parser.error(f"{' '.join(changed)} only apply to --mode clip or blip")
    actions = [f'--{name}' for name in ('score_file', 'export', 'extract', 'eval', 'check_data')
               if getattr(args, name)]
    if len(actions) > 1 or (actions and args.demo and actions not in (['--eval'], ['--check_data'])):
        parser.error(f"{' and '.join(actions + (['--demo'] if args.demo else []))} are separate commands; "
                     f"give one at a time")
    if args.score_file:
        return
    if args.check_data:
        if not any(getattr(args, n) for n in ('train_list', 'eval_list', 'musan_path', 'rir_path')):
            parser.error('--check_data needs something to check: --train_list, --eval_list, --musan_path or '
                         '--rir_path')
        for names in (('train_list', 'train_path'), ('eval_list', 'eval_path')):
            if getattr(args, names[0]):
                need(*names, why=f'--check_data of --{names[0]}')
    elif args.export:
        need('initial_model', why='--export')
        if os.path.splitext(args.export)[1] not in ('.pt', '.onnx'):
            parser.error(f'--export {args.export}: name a .pt (TorchScript) or .onnx file')
    elif args.extract:
        need('initial_model', 'out', why='--extract')
        if not os.path.exists(args.extract):
            parser.error(f'--extract {args.extract}: no such file or folder')
    elif args.eval:
        need('initial_model', 'eval_list', 'eval_path', why='--eval')
    else:
        need('train_list', 'train_path', 'eval_list', 'eval_path', why='training')
        if args.large_margin:
            need('initial_model', why='--large_margin (it fine-tunes a trained model)')
    if args.snorm:
        need('train_list', 'train_path', why='--snorm (the cohort comes from the training list)')
    for name in ('train_list', 'eval_list', 'initial_model'):
        paths = getattr(args, name) or []
        for path in ([paths] if isinstance(paths, str) else paths):
            if path and not os.path.isfile(path) and not (args.demo and name != 'initial_model'):
                parser.error(f'--{name} {path}: no such file')
    for name in ('train_path', 'eval_path', 'musan_path', 'rir_path'):
        path = getattr(args, name)
        if path and not os.path.isdir(path) and not args.demo:
            parser.error(f'--{name} {path}: no such folder')
    _, default_width, default_dim = MODELS[args.model]
    args.C = args.C or default_width
    args.embedding_dim = args.embedding_dim or default_dim
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: CUDA is not available here')
    args.amp = args.amp or ('bf16' if args.device.startswith('cuda') else 'off')


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


def encoder_config(args):
    return {'model': args.model, 'C': args.C, 'embedding_dim': args.embedding_dim,
            'sampling_rate': args.sampling_rate}


def classifier_of(model):
    """The AAM-softmax head of a model (the whole head in classifier mode), or None."""
    head = model.speaker_loss
    return head if isinstance(head, AAMsoftmax) else getattr(head, 'classifier', None)


def checkpoint_state(model):
    """What model_XXXX.model holds: `speaker_encoder.*` and, when there is a classifier, its weights as
    `speaker_loss.weight`, the keys the original code's checkpoints have. Other heads (temperature, matching
    head) live in resume.pt only."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith('speaker_encoder.')}
    if classifier_of(model) is not None:
        state['speaker_loss.weight'] = classifier_of(model).weight.detach()
    return state


def load_initial_weights(model, path, allow_partial=False):
    """Load a checkpoint's encoder weights and, when it has one of the same shape, its classifier. Every
    encoder weight must be in the checkpoint with its shape, and nothing else, unless `allow_partial`: then
    those that match are loaded and the rest keep their fresh initialisation. Returns what was loaded."""
    state = load_state_dict_file(path)
    weights = encoder_weights(state)
    own = model.speaker_encoder.state_dict()
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    reshaped = sorted(f'{k} {tuple(weights[k].shape)} -> {tuple(own[k].shape)}'
                      for k in own.keys() & weights.keys() if weights[k].shape != own[k].shape)
    problems = [f'{len(keys)} {what}: {", ".join(keys[:10])}' + (', ...' if len(keys) > 10 else '')
                for what, keys in (('missing', missing), ('unexpected', unexpected), ('of another shape', reshaped))
                if keys]
    if problems and not allow_partial:
        raise ValueError(f'{path}: does not fit this {type(model.speaker_encoder).__name__} (--allow_partial_load '
                         f'loads the weights that do):\n  ' + '\n  '.join(problems))
    matching = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}
    model.speaker_encoder.load_state_dict({**own, **matching})
    loaded = f'{len(matching)} of {len(own)} encoder weights' if problems else 'encoder'
    if problems:
        print(f'{path}: partial load, the others start afresh:\n  ' + '\n  '.join(problems))
    classifier, weight = classifier_of(model), state.get('speaker_loss.weight')
    if classifier is not None and weight is not None and weight.shape == classifier.weight.shape:
        with torch.no_grad():
            classifier.weight.copy_(weight)
        return f'{loaded} and classifier'
    return f'{loaded}; classifier initialised afresh (none in the checkpoint, or another shape)'


class NonFiniteTraining(RuntimeError):
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

    def __call__(self, batch, rng):
        """`batch`: (waveforms, labels) or (view a, view b, labels); `rng` draws the device augmentation."""
        labels = batch[-1].to(self.device, non_blocking=True)
        waveforms = torch.cat([views.to(self.device, non_blocking=True) for views in batch[:-1]])
        if self.device_augmenter is not None:
            waveforms = self.device_augmenter(waveforms, rng)
        buffers = [b.detach().clone() for b in self.model.buffers()]  # batch-norm statistics, kept for a bad step
        loss, accuracy = self.forward(waveforms, labels, len(batch) - 1, self.amp_dtype, self.spec_augment)
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
    exits 0. A second signal interrupts at once. Under torchrun `requested()` is true on every process as
    soon as one of them got a signal, so all stop after the same step."""

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
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        print(f'\n{self.received} received: stopping after this step (again to stop at once)', flush=True)

    def requested(self):
        return distributed.any_rank(self.received is not None)


def ignore_interrupts(_worker_id):
    """Loader workers leave Ctrl-C to the training process, which stops cleanly (`StopRequest`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def new_epoch_progress():
    """The running sums of an epoch; kept in resume.pt when a run stops mid-epoch."""
    return {'step': 0, 'loss_sum': 0.0, 'correct_sum': 0.0, 'examples': 0, 'crops': 0, 'seconds': 0.0,
            'bad_steps': 0, 'skipped': []}


def train_one_epoch(step_fn, loader, epoch, schedule, seed, progress=None, stop=None, reported=None):
    """Steps over `loader` (batches from `collate`: waveforms or two views, labels, skipped files) with
    `step_fn`, a `TrainingStep`, setting the learning rate and margin of `schedule(epoch, step)` before each
    step. `progress` (from `new_epoch_progress`, or a stopped epoch's) is updated in place; the result is
    its sums with the example-weighted mean 'loss' and 'accuracy' of the steps taken, the last step's 'lr' and
    'margin', this process's 'crops_per_s' and 'stopped' (the `stop` request came). Files a batch skipped are printed
    the first time (`reported`: paths already printed) and listed in progress['skipped']. Device augmentation
    draws from a generator seeded by (seed, epoch, step, rank)."""
    progress = progress or new_epoch_progress()
    reported = set() if reported is None else reported
    step_fn.model.train()
    loss_sum = torch.tensor(progress['loss_sum'], device=step_fn.device)
    correct_sum = torch.tensor(progress['correct_sum'], device=step_fn.device)
    start, seconds = time.time(), progress['seconds']
    total = progress['step'] + len(loader)
    bar = tqdm.tqdm(loader, desc=f'epoch {epoch}', unit='batch', file=sys.stdout, dynamic_ncols=True,
                    initial=progress['step'], total=total, mininterval=1 if sys.stdout.isatty() else 30,
                    disable=not distributed.is_main())
    stopped = False
    for step, (*batch, skipped) in enumerate(bar, start=progress['step'] + 1):
        for path, reason in skipped:
            progress['skipped'].append((path, reason))
            if path not in reported:
                reported.add(path)
                tqdm.tqdm.write(f'skipped {path}: {reason}')
        lr, margin = schedule(epoch, step)
        for group in step_fn.optimizer.param_groups:
            group['lr'] = lr
        step_fn.model.speaker_loss.set_margin(margin)
        loss, accuracy, taken = step_fn(batch, np.random.default_rng((seed, epoch, step, distributed.rank())))
        progress['step'] = step
        if taken:
            progress['examples'] += len(batch[-1])
            progress['crops'] += sum(len(views) for views in batch[:-1])
            loss_sum += loss * len(batch[-1])
            correct_sum += accuracy * len(batch[-1])
        else:
            progress['bad_steps'] += 1
        if step % 10 == 0 or step == total:
            examples = max(progress['examples'], 1)
            bar.set_postfix(lr=f'{lr:.6f}', loss=f'{loss_sum.item() / examples:.4f}', refresh=False,
                            acc=f'{correct_sum.item() / examples:.2f}%',
                            utt_s=f'{progress["crops"] / (seconds + time.time() - start):.1f}')
        if stop is not None and stop.requested():
            stopped = True
            break
    if progress['step'] == 0:
        raise RuntimeError('the training loader produced no batch: --batch_size is larger than the training list')
    progress.update(loss_sum=loss_sum.item(), correct_sum=correct_sum.item(), seconds=seconds + time.time() - start)
    examples = max(progress['examples'], 1)
    lr, margin = schedule(epoch, progress['step'])
    return dict(progress, loss=progress['loss_sum'] / examples, accuracy=progress['correct_sum'] / examples, lr=lr,
                margin=margin, crops_per_s=progress['crops'] / progress['seconds'], stopped=stopped)


def cohort_entries(entries, size, seed):
    """Up to `size` training utterances (all when 0), taken round-robin over speakers in a seeded order."""
    if size == 0 or size >= len(entries):
        return entries
    rng = np.random.default_rng(seed)
    by_speaker = {}
    for i in rng.permutation(len(entries)):
        by_speaker.setdefault(entries[i][0], []).append(entries[i])
    chosen, depth = [], 0
    while len(chosen) < size:
        chosen.extend(utts[depth] for utts in by_speaker.values() if depth < len(utts))
        depth += 1
    return chosen[:size]


def require_files(references, root, source):
    """Stop with a message naming `source` unless every file of `references` ({relative path: the line of
    `source` naming it, or None}) exists under `root`."""
    missing = [p for p in references if not os.path.isfile(os.path.join(root, p))]
    if missing:
        shown = [f'{source}:{references[p]}: {p}' if references[p] else p for p in missing[:3]]
        raise SystemExit(f'{source}: {len(missing)} files not under {root}, e.g.\n  ' + '\n  '.join(shown))


def read_eval_lists(args):
    """{list path: (labels or None, enroll, test)} for every --eval_list, after checking that every file
    they name is under --eval_path."""
    lists = {}
    for path in args.eval_list:
        rows = trial_rows(path)
        require_files(list_references(rows), args.eval_path, path)
        lists[path] = trial_columns(rows)
    return lists


def evaluate(encoder, args, device, lists, identity=None):
    """Score the trial `lists` (from `read_eval_lists`), embedding each utterance once (cached under
    save_path/embeddings when the checkpoint `identity` is given). Returns {list path: result} with the
    trials, 'scores', 'metrics' (None for a list without labels) and, with --snorm, 'snorm_scores' and
    'snorm_metrics'."""
    files = sorted({f for _, enroll, test in lists.values() for f in enroll + test})
    vectors = embed_for(encoder, files, args.eval_path, args, device, identity)
    results = {path: {'labels': labels, 'enroll': enroll, 'test': test,
                      'scores': score_trials(vectors, enroll, test)}
               for path, (labels, enroll, test) in lists.items()}
    if args.snorm:
        entries = cohort_entries(parse_train_list(args.train_list), args.cohort_size, args.seed)
        cohort_vectors = embed_for(encoder, [rel for _, rel in entries], args.train_path, args, device, identity)
        cohort = build_cohort(cohort_vectors, entries, args.cohort)
        index = {name: i for i, name in enumerate(files)}
        trials = np.array([(index[e], index[t]) for r in results.values() for e, t in zip(r['enroll'], r['test'])])
        normalised = as_norm(torch.stack([vectors[f] for f in files]), trials, cohort, args.cohort_top_k)
        start = 0
        for result in results.values():
            result['snorm_scores'] = normalised[start:start + len(result['scores'])]
            start += len(result['scores'])
    for result in results.values():
        labelled = result['labels'] is not None
        result['metrics'] = verification_metrics(result['scores'], result['labels']) if labelled else None
        if args.snorm:
            result['snorm_metrics'] = (verification_metrics(result['snorm_scores'], result['labels'])
                                       if labelled else None)
    return results


def embed_for(encoder, files, root, args, device, identity):
    """{file: protocol vector}; under torchrun each process embeds every world_size-th file and all of them
    receive every vector."""
    if distributed.world_size() > 1:
        part = embed_files(encoder, files[distributed.rank()::distributed.world_size()], root, device,
                           n_cpu=args.n_cpu, progress=distributed.is_main())
        return {name: vector for vectors in distributed.gather_objects(part) for name, vector in vectors.items()}
    if identity is None:
        return embed_files(encoder, files, root, device, n_cpu=args.n_cpu)
    return cached_embed_files(encoder, files, root, device, os.path.join(args.save_path, 'embeddings'), identity,
                              n_cpu=args.n_cpu)


def format_metrics(metrics):
    return (f"EER {metrics['eer']:2.2f}%, minDCF(0.05) {metrics['min_dcf_0.05']:.4f}, "
            f"minDCF(0.01) {metrics['min_dcf_0.01']:.4f}")


def format_result(result):
    if result['metrics'] is None:
        return f"{len(result['scores'])} trials scored (no labels)"
    text = format_metrics(result['metrics'])
    if result.get('snorm_metrics'):
        text += ', AS-Norm ' + format_metrics(result['snorm_metrics'])
    return text


def load_initial_encoder(args, device):
    """The encoder of --initial_model, built as recorded beside it unless --model/--C/--sampling_rate say."""
    overrides = {name: getattr(args, name) for name in ('model', 'C', 'sampling_rate') if name in args.given}
    try:
        return load_model(args.initial_model, device=device, **overrides)
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"{args.initial_model}: cannot be loaded as {overrides or 'recorded'}:\n{error}")


def run_export(args):
    encoder = load_initial_encoder(args, 'cpu')
    (export_onnx if args.export.endswith('.onnx') else export_torchscript)(encoder, args.export)
    print(f'{args.export}: {type(encoder).__name__} at {encoder.sampling_rate} Hz, waveform [batch, samples] in, '
          f'embedding [batch, {encoder.embedding_dim}] out')


def run_eval(args):
    device = torch.device(args.device)
    encoder = load_initial_encoder(args, device)
    print(f'Model {args.initial_model} loaded: {type(encoder).__name__} at {encoder.sampling_rate} Hz')
    results = evaluate(encoder, args, device, read_eval_lists(args), identity=file_digest(args.initial_model))
    for path, result in results.items():
        name = os.path.basename(path)
        score_path = os.path.join(args.save_path, 'scores', name)
        write_score_file(score_path, result['enroll'], result['test'], result['scores'], result['labels'])
        if args.snorm:
            write_score_file(score_path + '.asnorm', result['enroll'], result['test'], result['snorm_scores'],
                             result['labels'])
        print(f'{path}: {len(result["scores"])} trials, {format_result(result)}\n'
              f'  scores (enroll test score [label]): {score_path}' + (' and .asnorm' if args.snorm else ''))
    evaluation_plots(results, os.path.join(args.save_path, 'plots'))
    return results


def run_extract(args):
    """Embed every file of a folder or a list (one path per line, its last field, relative to --eval_path or
    else to the list's folder) and save {'paths', 'embeddings', 'vectors', 'model'} to --out."""
    device = torch.device(args.device)
    encoder = load_initial_encoder(args, device)
    if os.path.isdir(args.extract):
        root, references = args.extract, dict.fromkeys(files_under(args.extract, AUDIO_EXTENSIONS))
    else:
        root = args.eval_path or os.path.dirname(os.path.abspath(args.extract))
        references = {}
        with open(args.extract) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    references.setdefault(line.split()[-1], number)
    if not references:
        raise SystemExit(f'{args.extract}: no audio files to embed')
    require_files(references, root, args.extract)
    paths = list(references)
    vectors = embed_files(encoder, paths, root, device, n_cpu=args.n_cpu)
    stacked = torch.stack([vectors[p] for p in paths])
    atomic_torch_save({'paths': paths, 'embeddings': F.normalize(stacked[:, :encoder.embedding_dim], dim=1),
                       'vectors': stacked, 'model': args.initial_model, 'sampling_rate': encoder.sampling_rate},
                      args.out)
    print(f'{args.out}: {len(paths)} embeddings of {encoder.embedding_dim} dimensions')


def run_score_files(args):
    results = {}
    for path in args.score_file:
        try:
            scores, labels = read_score_file(path)
        except (OSError, ValueError) as error:
            raise SystemExit(str(error))
        results[path] = verification_metrics(scores, labels)
        print(f'{path}: {len(scores)} trials, {format_metrics(results[path])}')
    return results


def training_loader(args, entries, augmenter, device):
    """(sampler, loader, items the sampler yields per step) for --mode: crops of single utterances
    (`EpochSampler`) or pairs of views of distinct speakers (`SpeakerPairSampler`), batched by `collate`."""
    loader_options = {'num_workers': args.n_cpu, 'pin_memory': device.type == 'cuda', 'collate_fn': collate,
                      'persistent_workers': args.n_cpu > 0, 'prefetch_factor': 4 if args.n_cpu > 0 else None,
                      'worker_init_fn': ignore_interrupts,
                      # Starting an epoch draws the workers' base seed: from its own generator, not the global one,
                      # so that a run resumed mid-epoch draws the same SpecAugment masks as an uninterrupted one.
                      'generator': torch.Generator().manual_seed(args.seed)}
    skip_silent = args.skip_silent == 'on'
    if args.mode == 'classifier':
        dataset = TrainDataset(entries, args.train_path, args.num_frames, args.sampling_rate, augmenter, args.seed,
                               skip_silent)
        sampler = EpochSampler(len(dataset), args.seed, distributed.world_size(), distributed.rank())
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                             **loader_options)
        return sampler, loader, args.batch_size
    else:
        dataset = PairDataset(entries, args.train_path, args.num_frames, args.sampling_rate, augmenter, args.seed,
                              skip_silent)
        try:
            sampler = SpeakerPairSampler(dataset.labels, args.batch_size, args.seed, distributed.world_size(),
                                         distributed.rank())
        except ValueError as error:
            raise SystemExit(f'{args.train_list}: {error} (lower --batch_size)')
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_options)
        return sampler, loader, 1


def run_training(args):
    """Train, evaluating every --test_step epochs. Under torchrun every process runs this with its share of
    each epoch; process 0 alone prints, writes checkpoints, score.txt and resume.pt."""
    device = torch.device(args.device)
    main_process = distributed.is_main()
    log = print if main_process else (lambda *_: None)
    torch.manual_seed(args.seed + distributed.rank())
    rows = train_list_rows(args.train_list)
    entries = [(speaker, rel) for _, speaker, rel in rows]
    speakers = len(speaker_labels(entries))
    if args.n_class is None:
        args.n_class = speakers
    elif args.n_class < speakers:
        raise SystemExit(f'--n_class {args.n_class} is smaller than the {speakers} speakers in {args.train_list}')
    require_files(list_references(rows), args.train_path, args.train_list)
    eval_lists = read_eval_lists(args)
    if all(labels is None for labels, _, _ in eval_lists.values()):
        raise SystemExit('training needs an --eval_list with labels to report EER')

    encoder = build_encoder(args.model, args.C, args.sampling_rate, args.embedding_dim)
    model = SpeakerModel(encoder, build_objective(args, encoder.embedding_dim)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=2e-5)
    log(f'{args.model}: {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M parameters, '
        f'{len(entries)} utterances of {speakers} speakers, {args.n_class} classes, device {device}'
        + (f', {distributed.world_size()} processes' if distributed.world_size() > 1 else ''))

    model_dir = os.path.join(args.save_path, 'model')
    resume_path = os.path.join(model_dir, 'resume.pt')
    eers = []
    first_epoch = 1
    resume = torch.load(resume_path, map_location='cpu', weights_only=False) if os.path.exists(resume_path) else {}
    if resume:
        try:
            model.load_state_dict(resume['model'])
            optimizer.load_state_dict(resume['optimizer'])
        except (RuntimeError, ValueError) as error:
            raise SystemExit(f'{resume_path} was written by a run with other model or loss flags; continue it with '
                             f'those flags or choose another --save_path:\n{error}')
        # One generator state per process that wrote the file; files from before torchrun support hold one.
        states = resume['rng'] if isinstance(resume['rng'], list) else [resume['rng']]
        torch.set_rng_state(states[distributed.rank() % len(states)])
        if device.type == 'cuda' and resume.get('cuda_rng') is not None:
            torch.cuda.set_rng_state(resume['cuda_rng'][distributed.rank() % len(resume['cuda_rng'])], device)
        eers = resume['eers']
        first_epoch = resume['epoch'] + 1
        partial = resume.get('partial_epoch')
        log(f'Resuming from {resume_path} after epoch {resume["epoch"]}'
            + (f' and {partial[0]["step"]} steps of epoch {first_epoch}' if partial else ''))
    elif args.initial_model:
        try:
            loaded = load_initial_weights(model, args.initial_model, args.allow_partial_load)
        except ValueError as error:
            raise SystemExit(str(error))
        log(f'Model {args.initial_model} loaded ({loaded})')

    augmenter = Augmenter(args.musan_path, args.rir_path, args.sampling_rate, args.cache_dir)
    device_augmenter = None
    if args.gpu_augment:  # the loader workers only read and crop
        device_augmenter, augmenter = DeviceAugmenter(augmenter, device), None
    step_fn = TrainingStep(model, optimizer, device, args.amp, args.compile, args.grad_clip, device_augmenter,
                           args.spec_augment == 'on', args.max_bad_steps)
    if resume.get('scaler'):
        step_fn.scaler.load_state_dict(resume['scaler'])
    sampler, loader, items_per_step = training_loader(args, entries, augmenter, device)

    score_path = os.path.join(args.save_path, 'score.txt')
    metrics_path = os.path.join(args.save_path, 'metrics.jsonl')
    skipped_path = os.path.join(args.save_path, 'skipped_files.txt')
    if main_process:
        write_config(os.path.join(args.save_path, 'config.json'), args, device, distributed.world_size(),
                     first_epoch - 1)
        forget_epochs_after(first_epoch - 1, score_path, metrics_path)
    tensorboard = None
    if args.tensorboard and main_process:
        tensorboard = TensorBoard(os.path.join(args.save_path, 'tensorboard'))
    schedule = training_schedule(args, len(loader))
    reported = set()

    def save_resume(epoch, partial=None):
        """resume.pt: the state after `epoch` complete epochs and, when stopped inside the next one, every
        process's running sums of that epoch."""
        rng = distributed.gather_objects(torch.get_rng_state())
        cuda_rng = distributed.gather_objects(torch.cuda.get_rng_state(device)) if device.type == 'cuda' else None
        partials = distributed.gather_objects(partial) if partial is not None else None
        if main_process:
            atomic_torch_save({'epoch': epoch, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                               'rng': rng, 'cuda_rng': cuda_rng, 'scaler': step_fn.scaler.state_dict(),
                               'eers': eers, 'partial_epoch': partials}, resume_path)

    try:
        with StopRequest() as stop:
            for epoch in range(first_epoch, args.max_epoch + 1):
                progress = None
                if epoch == first_epoch and resume.get('partial_epoch'):
                    progress = resume['partial_epoch'][distributed.rank() % len(resume['partial_epoch'])]
                sampler.set_epoch(epoch, progress['step'] * items_per_step if progress else 0)
                torch.backends.cudnn.benchmark = True  # fixed crop shapes: let cuDNN pick its fastest kernels
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(device)
                started = time.time()
                try:
                    done = train_one_epoch(step_fn, loader, epoch, schedule, args.seed, progress, stop, reported)
                except NonFiniteTraining as error:
                    raise SystemExit(f'Stopped in epoch {epoch}: {error}. The last complete state is {resume_path}.')
                torch.backends.cudnn.benchmark = False  # evaluation sees every utterance length once
                if done['stopped']:
                    save_resume(epoch - 1, {name: done[name] for name in new_epoch_progress()})
                    log(f'Stopped by {stop.received or "a signal to another process"} in epoch {epoch} after step '
                        f'{done["step"]}; the state is saved in {resume_path}. Run the same command again to continue.')
                    return None
                progress = distributed.gather_objects(done)
                loss, accuracy = (float(np.mean([p[name] for p in progress])) for name in ('loss', 'accuracy'))
                lr = progress[0]['lr']
                skipped = [entry for p in progress for entry in p['skipped']]
                record = {'epoch': epoch, 'loss': loss, 'accuracy': accuracy, 'lr': lr, 'margin': progress[0]['margin'],
                          'crops_per_s': sum(p['crops_per_s'] for p in progress),
                          'bad_steps': progress[0]['bad_steps'], 'skipped_files': len(skipped),
                          'train_seconds': time.time() - started}
                if device.type == 'cuda':
                    record['peak_gpu_memory_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                if skipped and main_process:
                    with open(skipped_path, 'a') as f:
                        f.writelines(f'{epoch}\t{path}\t{reason}\n' for path, reason in skipped)
                    log(f'epoch {epoch}: {len(skipped)} unusable files skipped and replaced (listed in {skipped_path})')
                if progress[0]['bad_steps']:
                    log(f'epoch {epoch}: {progress[0]["bad_steps"]} steps skipped for a non-finite loss or gradients')
                if epoch % args.test_step == 0 or epoch == args.max_epoch:
                    checkpoint = os.path.join(model_dir, f'model_{epoch:04d}.model')
                    if main_process:
                        save_checkpoint(checkpoint_state(model), encoder_config(args), checkpoint)
                    results = evaluate(model.speaker_encoder, args, device, eval_lists)
                    eers.append(next(r['metrics']['eer'] for r in results.values() if r['metrics']))
                    line = f'{epoch} epoch, LR {lr:f}, LOSS {loss:f}, ACC {accuracy:2.2f}%, ' + ', '.join(
                        (f'{os.path.basename(path)} ' if len(results) > 1 else '') + format_result(result)
                        for path, result in results.items()) + f', bestEER {min(eers):2.2f}%'
                    log(time.strftime('%Y-%m-%d %H:%M:%S'), line)
                    record['eval'] = {os.path.basename(path): {k: v for k, v in result.items() if k.endswith('metrics')}
                                      for path, result in results.items()}
                    if main_process:
                        with open(score_path, 'a') as f:
                            f.write(line + '\n')
                record['epoch_seconds'] = time.time() - started
                if main_process:
                    append_metrics(metrics_path, record)
                    if tensorboard is not None:
                        tensorboard.add(record)
                    if 'eval' in record:
                        evaluation_plots(results, os.path.join(args.save_path, 'plots'))
                        training_curve(metrics_path, os.path.join(args.save_path, 'plots', 'training_curve.png'))
                save_resume(epoch)
                if epoch < args.max_epoch and stop.requested():
                    log(f'Stopped by {stop.received or "a signal to another process"} after epoch {epoch}; the state '
                        f'is saved in {resume_path}. Run the same command again to continue.')
                    return None
    finally:
        if tensorboard is not None:
            tensorboard.close()
    log(f'score.txt: {score_path}\ncheckpoints: {model_dir}')


def main(argv=None):
    args = parse_args(argv)
    training = not (args.score_file or args.export or args.extract or args.eval or args.check_data)
    if distributed.launched_by_torchrun() and not training:
        raise SystemExit('--score_file, --export, --extract, --eval and --check_data run in one process: launch '
                         'them without torchrun')
    if training:
        args.device = str(distributed.setup(args.device))
    try:
        corpus = os.path.join(args.save_path, 'corpus')
        if args.demo and any(name not in args.given for name in demo.corpus_paths(corpus)) and distributed.is_main():
            print(f'Demo corpus: {corpus}')
            demo.make_corpus(corpus)
        distributed.barrier()
        if args.score_file:
            return run_score_files(args)
        if args.check_data:
            problems = check_data(args)
            if problems:
                raise SystemExit(1)
            return problems
        if args.export:
            return run_export(args)
        if args.extract:
            return run_extract(args)
        if args.eval:
            return run_eval(args)
        return run_training(args)
    finally:
        distributed.cleanup()


if __name__ == '__main__':
    main()
