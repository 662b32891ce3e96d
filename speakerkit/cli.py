"""Train a speaker encoder and score trial lists: the one entry point, `python trainECAPAModel.py` from a
checkout or the `speakerkit` command once installed.

  python trainECAPAModel.py --demo                          # generated corpus, train + evaluate
  python trainECAPAModel.py --train_list ... --train_path ... --eval_list ... --eval_path ...
  python trainECAPAModel.py --eval --initial_model M --eval_list L --eval_path P [--snorm ...]
  python trainECAPAModel.py --score_pair A.wav B.wav --initial_model M

Here: flags, their defaults and their checks; what each command then does is commands.py (`COMMANDS`), training
trainer.py. A rerun continues from save_path/model/resume.pt; a mistake ends in one line naming the flag, file
or list line.
"""

import argparse
import json
import math
import os
import sys

import torch
import yaml

from speakerkit import demo, distributed
from speakerkit.augment import default_cache_dir
from speakerkit.commands import COMMANDS
from speakerkit.dataLoader import SPEED_PERTURBATION, end_loader_workers
from speakerkit.errors import ArgumentParser, UsageError, reported_as_exit
from speakerkit.model import MODELS, width_problem

DEMO_DEFAULTS = {'save_path': 'exps/demo', 'max_epoch': 7, 'batch_size': 32, 'num_frames': 150,
                 'test_step': 1, 'lr': 0.002, 'n_cpu': 1}
DEMO_WIDTHS = {'ecapa-tdnn': 128, 'tdnn': 256}  # --C for the demo; ResNets take 16 base channels
# --average's default: the mean of the last 5 epochs' weights, in runs of at least 4 x 5 epochs. In 60-epoch runs
# on the LibriSpeech harness it lowered the EER of every run, at no cost in training; over 5 of the demo's 7 epochs
# (a run far from converged) it did not (EER 5.00 -> 5.56%, minDCF(0.01) 0.38 -> 0.47; bench/RESULTS.md).
AVERAGED_EPOCHS = 5
AVERAGED_SHARE = 4
# Large-margin fine-tuning, after wespeaker's VoxCeleb recipe (conf/ecapa_tdnn_lm.yaml): 5 epochs of 6 s crops,
# margin 0.5, lr from 1e-4 to 2.5e-5 with a one-epoch warm-up, no SpecAugment.
LARGE_MARGIN_DEFAULTS = {'num_frames': 600, 'm': 0.5, 'max_epoch': 5, 'scheduler': 'warmup_exp', 'lr': 1e-4,
                         'final_lr': 2.5e-5, 'warmup_epochs': 1, 'spec_augment': False}
CONTRASTIVE_FLAGS = ('classifier_weight', 'contrastive_weight', 'matching_weight', 'hard_negative',
                     'fixed_contrastive_scale', 'local_negatives')
ONLY_WITH = {'out': ('extract', 'average_checkpoints'), 'check_decode': 'check_data', 'p_target': 'calibrate',
             'cohort': 'snorm', 'cohort_top_k': 'snorm', 'cohort_size': ('snorm', 'subtract_mean'),
             'duration_terms': 'calibrate',
             'allow_partial_load': 'initial_model'}  # flag -> the flag(s) it refines
NEEDS = {'large_margin': ('initial_model',),        # it fine-tunes a trained model
         'eval_list': ('eval_path',),               # its paths are relative to it
         'snorm': ('train_list', 'train_path'),     # the cohort comes from the training list
         'subtract_mean': ('train_list', 'train_path')}


def flag(group, name, **options):
    """Add the flag `name` to `group`; its help ends with its default where it has one."""
    if options.get('default') not in (None, False, '') and '%(default)' not in options.get('help', ''):
        options['help'] = options.get('help', '') + ' (default: %(default)s)'
    group.add_argument(name, **options)


ON_OFF = {'on': True, 'off': False, 'true': True, 'false': False}


def on_or_off(text):
    value = ON_OFF.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f'expected on or off, got {text!r}')
    return value


def switch(group, name, default=False, help=''):
    """Add the switch `name`, the one style of every setting that is on or off: `--name` alone turns it on,
    `--name on` or `--name off` sets it either way (a default that is on is turned off so)."""
    group.add_argument(name, nargs='?', const=True, default=default, type=on_or_off, metavar='on|off',
                       help=help + (' (default: on)' if default else ''))


def data_flags(group):
    """Flags of training and trial data, augmentation banks, and the data check."""
    flag(group, '--train_list', help='training list, lines "<speaker> <relative path>", or a Kaldi data folder '
                                     '(wav.scp and utt2spk)')
    flag(group, '--train_path', help='folder the training list paths are relative to (for a Kaldi data folder: '
                                     'the current folder unless given)')
    flag(group, '--train_shards', metavar='SHARDS_TXT',
         help='train from tar shards (`prepare.py shards`) instead of --train_list/--train_path: their '
              'shards.txt, with speakers.txt beside it (--mode classifier, --sampler random)')
    flag(group, '--eval_list', nargs='+',
         help='trial lists, lines "<0|1> <enroll> <test>", Kaldi\'s "<enroll> <test> <target|nontarget>" '
              '(or "<enroll> <test>": scored without metrics); e.g. veri_test2.txt list_test_all2.txt '
              'list_test_hard2.txt')
    flag(group, '--eval_path', help='folder the trial list paths are relative to')
    flag(group, '--musan_path', help='MUSAN split into 5 s chunks (noise|speech|music/<subset>/<stem>/*.wav); '
                                     'omit to train without additive noise')
    flag(group, '--rir_path', help='impulse responses (<room type>/<room>/*.wav, e.g. '
                                   'RIRS_NOISES/simulated_rirs); omit to train without reverberation')
    flag(group, '--num_frames', type=int, default=200, help='training crop in 10 ms frames (200 = 2 s)')
    flag(group, '--sampling_rate', type=int, default=16000, help='all audio is resampled to this rate')
    switch(group, '--skip_silent', default=True,
           help='on: an all-zero training crop is replaced like an unreadable file; off: it is trained on')
    flag(group, '--cache_dir', default=default_cache_dir(), help='decoded noise and impulse-response banks')
    switch(group, '--check_data', help='check that every file the given lists and folders name decodes to usable '
                                       'audio; report counts, durations, rates, speakers and problems with their '
                                       'list lines')
    flag(group, '--check_decode', type=int, default=2000,
         help='--check_data: files of each source decoded in full, spread evenly (0: all); the others '
              'have their headers read')


def model_flags(group):
    """Flags of the encoder."""
    flag(group, '--model', default='ecapa-tdnn', choices=sorted(MODELS),
         help='encoder architecture (with --eval, the one recorded beside the checkpoint when '
              'this flag is not given)')
    flag(group, '--C', type=int, default=None,
         help='encoder width: channels of ECAPA-TDNN (default 1024), base channels of ResNet '
              '(32), frame-layer channels of TDNN (512), growth rate of CAM++ (32), stem channels of ReDimNet '
              '(each size\'s own: B0 10, B1 12, B2 and B3 16, B4-B6 32)')
    flag(group, '--embedding_dim', type=int, default=None,
         help='embedding size (default 192 for ECAPA-TDNN and ReDimNet, 256 ResNet, 512 TDNN and CAM++)')


def objective_flags(group):
    """Flags of the training objective."""
    flag(group, '--mode', default='classifier', choices=['classifier', 'clip', 'blip'],
         help='classifier: AAM-softmax on single crops; clip: InfoNCE between two views of '
              'distinct speakers; blip: clip plus a pair-matching head trained on hard negatives')
    flag(group, '--loss', choices=['aamsoftmax', 'infonce', 'aam_infonce'],
         help='aamsoftmax (mode classifier, the default there) or the contrastive term of '
              'clip/blip: infonce (default) or aam_infonce (margin --m on the positives)')
    flag(group, '--m', type=float, default=0.2, help='additive angular margin (radians)')
    flag(group, '--s', type=float, default=30, help='logit scale')
    flag(group, '--n_class', type=int, default=None,
         help='number of classes (default: the speakers in the training list)')
    flag(group, '--classifier_weight', type=float, default=0.8,
         help='clip/blip: weight of the AAM-softmax term on view 1 (0: no classifier)')
    flag(group, '--contrastive_weight', type=float, default=0.2, help='clip/blip: InfoNCE weight')
    flag(group, '--matching_weight', type=float, default=0.2, help='blip: pair-matching weight')
    flag(group, '--hard_negative', default='softmax', choices=['softmax', 'argmax'],
         help='blip: draw each negative with probability softmax(similarity), or take the '
              'most similar')
    switch(group, '--fixed_contrastive_scale',
           help='clip/blip: scale the contrastive logits by --s, not by a learned temperature')
    switch(group, '--local_negatives', help='clip/blip under torchrun: negatives from this process\'s batch only, '
                                            'instead of the batches of all processes')


def training_flags(group):
    """Flags of the training run: schedule, sampling, saving, precision."""
    flag(group, '--max_epoch', type=int, default=80, help='train up to this epoch')
    flag(group, '--batch_size', type=int, default=400,
         help='utterances (clip/blip: speakers, two views each) per step and per process; under '
              'torchrun the global batch is this times the number of processes')
    flag(group, '--lr', type=float, default=0.001, help='initial learning rate (Adam)')
    flag(group, '--lr_decay', type=float, default=0.97,
         help='--scheduler step: learning rate factor applied every --lr_decay_every epochs')
    flag(group, '--lr_decay_every', type=int,
         help='--scheduler step: epochs between two decays (default: --test_step, which set both in the original)')
    flag(group, '--scheduler', default='step', choices=['step', 'warmup_exp'],
         help='step: the original StepLR, lr * lr_decay ** ((epoch - 1) // lr_decay_every); warmup_exp: '
              'linear warm-up, then exponential decay to --final_lr, per step (wespeaker\'s)')
    flag(group, '--warmup_epochs', type=float, default=6, help='--scheduler warmup_exp: warm-up length')
    flag(group, '--final_lr', type=float, default=5e-5, help='--scheduler warmup_exp: lr at the last step')
    flag(group, '--margin_schedule', type=int, nargs=2, metavar=('START', 'END'),
         help='margin 0 until epoch START, then rising linearly (per step) to --m at epoch END')
    switch(group, '--spec_augment', default=True, help='time and frequency masks on the training features')
    flag(group, '--sampler', default='random', choices=['random', 'chns'],
         help='random batches, or chns: --hard_fraction of each batch from speakers whose '
              'classifier weights lie close together (hard negatives)')
    flag(group, '--hard_fraction', type=float, default=0.5,
         help='--sampler chns: the share of each batch taken from one group of close speakers')
    flag(group, '--noise_power_floor', type=float, default=0.0,
         help='added to the speech and noise powers of each SNR (the original code adds 1e-4, '
              'so that quiet noise files are mixed below the SNR drawn)')
    switch(group, '--speed_perturb',
           help=f'each crop played at a speed drawn from {SPEED_PERTURBATION}, each speed a speaker of its own '
                f'(so 3x the classes)')
    switch(group, '--large_margin',
           help=f'large-margin fine-tuning of --initial_model: flags not given take {LARGE_MARGIN_DEFAULTS}')
    flag(group, '--test_step', type=int, default=1,
         help='evaluate and save every this many epochs (and, unless given, --lr_decay_every)')
    flag(group, '--average', type=int, metavar='N',
         help=f'also save the last N epochs and, after the last, model/model_average.model: the mean '
              f'of their weights, evaluated on a score.txt line of its own (0: off; default: {AVERAGED_EPOCHS} '
              f'when --max_epoch is at least {AVERAGED_SHARE * AVERAGED_EPOCHS}, else off; a continued run keeps '
              f'its own)')
    flag(group, '--seed', type=int, default=10, help='seed of every random choice')
    flag(group, '--initial_model', default='',
         help='start from these weights (this toolkit\'s or the original code\'s checkpoints); '
              'every encoder weight must match')
    switch(group, '--allow_partial_load', help='--initial_model: load the encoder weights whose names and shapes '
                                               'match, list the others and train them from scratch')
    flag(group, '--max_bad_steps', type=int, default=50,
         help='stop after this many steps in a row with a non-finite loss or gradients (skipped)')
    flag(group, '--amp', choices=['bf16', 'fp16', 'off'],
         help='mixed precision of the encoder\'s forward pass (default: bf16 on CUDA, off on CPU); '
              'features and losses stay float32; fp16 adds dynamic loss scaling')
    switch(group, '--compile', help='torch.compile the encoder for training steps')
    flag(group, '--grad_clip', type=float, default=0.0, help='clip the global gradient L2 norm (0: off)')
    switch(group, '--gpu_augment',
           help='add noise and reverberation on --device, batch by batch, not in the loader workers')


def evaluation_flags(group):
    """Flags of scoring, export, extraction and the commands that need no training."""
    switch(group, '--eval', help='only score --eval_list with --initial_model')
    flag(group, '--export', metavar='FILE',
         help='write --initial_model\'s encoder as a torch.export program (FILE.pt2), TorchScript (FILE.pt) '
              'or ONNX (FILE.onnx)')
    flag(group, '--eval_precision', default='float32', choices=['float32', 'bf16'],
         help='bf16: score trial lists (--eval and training\'s evaluations) under bfloat16 '
              'autocast, features in float32: 1.4x as fast on a CPU with AMX (may be slower '
              'without AVX-512 BF16); scores move by about 1e-3: the demo\'s final EER is the '
              'same, its EER at other epochs within one trial (0.14) (bench/RESULTS.md)')
    switch(group, '--snorm', help='also report AS-Norm scores (cohort: --train_list)')
    flag(group, '--cohort_top_k', type=int, default=300, help='AS-Norm: top cohort scores used')
    flag(group, '--cohort', default='speaker', choices=['speaker', 'utterance'],
         help='AS-Norm cohort: speaker means or single utterances of the training list')
    flag(group, '--cohort_size', type=int, default=20000,
         help='AS-Norm and --subtract_mean: training utterances embedded, over all speakers (0: all)')
    switch(group, '--subtract_mean',
           help='subtract the mean vector of --train_list\'s utterances (--cohort_size of them) from every '
                'vector before scoring (wespeaker\'s cosine back end); with --calibrate, saved with the map')
    flag(group, '--extract', metavar='LIST_OR_DIR',
         help='embed every file of a folder, of a Kaldi data folder\'s wav.scp, or of a list (each field '
              'with an audio extension, both sides of a trial, or else the last field of a line; relative to '
              '--eval_path or the list\'s folder), with --initial_model; needs --out')
    flag(group, '--out', help='--extract: file to write {paths, names, embeddings, protocol_vectors, ...} to: '
                              'FILE.pt (torch.save), FILE.npz (numpy) or FILE.ark (Kaldi\'s, the embeddings '
                              'under their names, with FILE.scp); --average_checkpoints: the averaged checkpoint')
    flag(group, '--average_checkpoints', nargs='+', metavar='FILE',
         help='write the mean of these checkpoints\' weights to --out (what --average N does at '
              'the end of training)')
    flag(group, '--score_pair', nargs=2, metavar='FILE',
         help='print the cosine of two recordings\' embeddings and their protocol score '
              '(as --eval scores a trial), with --initial_model')
    flag(group, '--calibrate', metavar='DEV_TRIALS',
         help='fit the map from --initial_model\'s scores to log-likelihood ratios on this labelled trial list '
              '(files under --eval_path; a development list, apart from those it will decide on) and write it '
              'beside the checkpoint (NAME.calibration.json), for --score_pair and tools.verify')
    flag(group, '--p_target', type=float, default=0.01,
         help='--calibrate: the prior of a target trial that decisions assume (equal costs)')
    switch(group, '--duration_terms',
           help='--calibrate: the two recordings\' durations (log, capped at 20 s) enter the map as quality '
                'measures, as in wespeaker\'s QMF')
    flag(group, '--score_file', nargs='+', metavar='FILE',
         help='only compute EER and minDCF of existing "enroll test score label" files')


def system_flags(group):
    """Flags of the run folder, workers, device."""
    flag(group, '--config', metavar='FILE',
         help='flags from a JSON or YAML mapping (names as in this help, without the dashes), or a '
              'run\'s save_path/config.json (the flags that run was given); flags on the command '
              'line override it')
    flag(group, '--save_path', default='exps/exp1', help='checkpoints, score.txt and score files')
    flag(group, '--n_cpu', type=int, default=distributed.available_cores(),
         help='data loader workers (for embedding on the CPU: none unless given)')
    flag(group, '--device', default=None, help='torch device (default: cuda when available, else cpu)')
    switch(group, '--tensorboard',
           help='also write each epoch\'s metrics to save_path/tensorboard (needs tensorboard)')
    switch(group, '--demo', help=f'generate a small corpus under save_path and train on it; given flags override '
                                 f'the demo defaults {DEMO_DEFAULTS} and --C {DEMO_WIDTHS} (16 for ResNets)')

def build_parser():
    parser = ArgumentParser(
        description='Train a speaker encoder (AAM-softmax or contrastive) and score speaker-verification trials.')
    for title, add_flags in (('data', data_flags), ('model', model_flags), ('loss', objective_flags),
                             ('training', training_flags), ('evaluation', evaluation_flags),
                             ('system', system_flags)):
        add_flags(parser.add_argument_group(title))
    return parser


def explicit_flags(argv):
    """The destinations of the flags actually given on the command line."""
    parser, not_given = build_parser(), object()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), not_given))
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not not_given}


# ---------------------------------------------------------------- defaults that depend on other flags

def take_defaults(args, defaults):
    for name, value in defaults.items():
        if name not in args.given:
            setattr(args, name, value)


def resolve_defaults(args):
    """Fill what the flags leave open: the demo's and --large_margin's settings (given flags win), --average, the
    folder of a Kaldi data folder's relative paths, the loss of the mode, the encoder's width and embedding size,
    the device and mixed precision."""
    if args.demo:
        take_defaults(args, DEMO_DEFAULTS | {'C': DEMO_WIDTHS.get(args.model, max(16, MODELS[args.model].probe_width))})
        corpus = demo.corpus_paths(os.path.join(args.save_path, 'corpus'))
        take_defaults(args, corpus | {'eval_list': [corpus['eval_list']]})
    if args.large_margin:
        take_defaults(args, LARGE_MARGIN_DEFAULTS)
    if args.lr_decay_every is None:
        args.lr_decay_every = args.test_step
    if args.average is None:
        args.average = AVERAGED_EPOCHS if args.max_epoch >= AVERAGED_SHARE * AVERAGED_EPOCHS else 0
    if kaldi_data(args.train_list) and args.train_path is None:  # wav.scp's paths: absolute, or from here
        args.train_path = os.curdir
    args.loss = args.loss or ('aamsoftmax' if args.mode == 'classifier' else 'infonce')
    spec = MODELS[args.model]
    args.C = spec.width if args.C is None else args.C  # 0 is a mistake that check_ranges names, not the default
    args.embedding_dim = spec.embedding_dim if args.embedding_dim is None else args.embedding_dim
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    args.amp = args.amp or ('bf16' if args.device.startswith('cuda') else 'off')


# ---------------------------------------------------------------- checks: each raises UsageError

def check_ranges(args):
    least = {'num_frames': 1, 'batch_size': 2, 'max_epoch': 1, 'test_step': 1, 'lr_decay_every': 1, 'max_bad_steps': 1,
             'embedding_dim': 1, 'n_class': 2, 'cohort_top_k': 2,
             'C': 8 if args.model == 'ecapa-tdnn' else 1}  # 8: Res2Net's scale
    for name, low in least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise UsageError(f'--{name} must be at least {low}, got {getattr(args, name)}')
    for name in ('cohort_size', 'n_cpu', 'grad_clip', 'check_decode', 'noise_power_floor', 'seed'):
        if getattr(args, name) < 0:
            raise UsageError(f'--{name} cannot be negative, got {getattr(args, name)}')
    if args.average == 1 or not 0 <= args.average <= args.max_epoch:
        raise UsageError(f'--average must be 0 (off) or from 2 to --max_epoch {args.max_epoch}, got {args.average}')
    if args.sampling_rate < 8000:
        raise UsageError(f'--sampling_rate must be at least 8000 Hz, got {args.sampling_rate}')
    problem = width_problem(args.model, args.C) if args.C >= 1 else None
    if problem:
        raise UsageError(f'--C {args.C} does not fit {args.model}: {problem}')
    if not 0 < args.p_target < 1:
        raise UsageError(f'--p_target must be in (0, 1), got {args.p_target}')


def check_schedule(args):
    if not (args.lr > 0 and 0 < args.lr_decay <= 1 and args.final_lr > 0 and args.warmup_epochs >= 0):
        raise UsageError('--lr and --final_lr must be positive, --lr_decay in (0, 1] and --warmup_epochs not '
                         'negative')
    if args.margin_schedule and not 1 <= args.margin_schedule[0] <= args.margin_schedule[1]:
        raise UsageError(f'--margin_schedule START END needs 1 <= START <= END, got {args.margin_schedule}')
    if args.gpu_augment and not (args.musan_path or args.rir_path):
        raise UsageError('--gpu_augment needs --musan_path or --rir_path: there is nothing to augment with')


def check_objective(args):
    if not (0 <= args.m < math.pi / 2 and 0 < args.s < math.inf):
        raise UsageError('--m must be in [0, pi/2) and --s positive and finite')
    contrastive = args.mode != 'classifier'
    if args.sampler == 'chns' and contrastive and args.classifier_weight == 0:
        raise UsageError('--sampler chns groups speakers by the classifier\'s weights: --classifier_weight 0 has none')
    if 'hard_fraction' in args.given and args.sampler != 'chns':
        raise UsageError('--hard_fraction only applies with --sampler chns')
    if not 0 < args.hard_fraction <= 1:
        raise UsageError(f'--hard_fraction must be in (0, 1], got {args.hard_fraction}')
    if contrastive != (args.loss != 'aamsoftmax'):
        raise UsageError(f'--mode {args.mode} trains with ' + ('--loss infonce or aam_infonce' if contrastive else
                                                                '--loss aamsoftmax') + f', not --loss {args.loss}')
    weights = {'classifier_weight': args.classifier_weight, 'contrastive_weight': args.contrastive_weight,
               'matching_weight': args.matching_weight if args.mode == 'blip' else 0}
    if any(w < 0 for w in weights.values()):
        raise UsageError('loss weights cannot be negative')
    if not contrastive:
        changed = [f'--{n}' for n in CONTRASTIVE_FLAGS if n in args.given]
        if changed:
            raise UsageError(f"{' '.join(changed)} only apply to --mode clip or blip")
    elif not any(weights.values()):
        raise UsageError(f'--mode {args.mode}: every loss weight is 0, nothing would be trained')
    elif args.mode == 'blip' and args.matching_weight == 0:
        raise UsageError('--mode blip with --matching_weight 0 is --mode clip')


def check_one_command(args):
    actions = [f'--{name}' for name in COMMANDS if name != 'train' and getattr(args, name)]
    if len(actions) > 1 or (actions and args.demo and actions not in (['--eval'], ['--check_data'])):
        raise UsageError(f"{' and '.join(actions + (['--demo'] if args.demo else []))} are separate commands; "
                         f"give one at a time")


def check_command_flags(args):
    """The flags the command needs, its own checks, and no flag that refines one not given."""
    command = COMMANDS[command_of(args)]
    missing = [f'--{n}' for n in command.needs if not getattr(args, n)]
    if missing:
        raise UsageError(f"{command_of(args).replace('_', ' ')} needs {' '.join(missing)}")
    if command.check is not None:
        command.check(args)
    for flag, refined in ONLY_WITH.items():
        refined = (refined,) if isinstance(refined, str) else refined
        if flag in args.given and not any(getattr(args, r) for r in refined):
            raise UsageError(f'--{flag} only applies with ' + ' or '.join(f'--{r}' for r in refined))
    for flag, needed in NEEDS.items():
        if getattr(args, flag) and not all(getattr(args, n) for n in needed):
            raise UsageError(f"--{flag} needs {' and '.join(f'--{n}' for n in needed)}")


def kaldi_data(path):
    """Whether `path` is a Kaldi data folder (--train_list given as one: lists.read_kaldi_data)."""
    return bool(path) and os.path.isfile(os.path.join(path, 'wav.scp'))


def check_paths(args):
    for name in ('train_list', 'train_shards', 'eval_list', 'initial_model'):
        paths = getattr(args, name) or []
        for path in ([paths] if isinstance(paths, str) else paths):
            if path and not os.path.isfile(path) and not (args.demo and name != 'initial_model') and \
                    not (name == 'train_list' and kaldi_data(path)):
                raise UsageError(f'--{name} {path}: no such file' + (' (nor a Kaldi data folder with wav.scp)'
                                                                      if name == 'train_list' else ''))
    for name in ('train_path', 'eval_path', 'musan_path', 'rir_path'):
        path = getattr(args, name)
        if path and not os.path.isdir(path) and not args.demo:
            raise UsageError(f'--{name} {path}: no such folder')


def check_device(args):
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f'--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device}: CUDA is not available here')


CHECKS = (check_ranges, check_schedule, check_objective, check_one_command, check_command_flags, check_paths,
          check_device)


def command_of(args):
    return next((name for name in COMMANDS if name != 'train' and getattr(args, name)), 'train')


def repeated_name(names):
    """The first of `names` given more than once (in a flag file, the later would silently win), or None."""
    return next((name for name in names if names.count(name) > 1), None)


def mapping_without_repeats(pairs):
    """A JSON object's pairs as a dict; a `ValueError` for a name given twice."""
    repeated = repeated_name([name for name, _ in pairs])
    if repeated is not None:
        raise ValueError(f'{repeated!r} is given twice')
    return dict(pairs)


class FlatYAMLLoader(yaml.SafeLoader):
    """YAML without aliases (`*name`): a flag file has no use for them, and nested ones make a few hundred bytes
    expand to gigabytes. A key given twice is an error, as in JSON files."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, 'aliases (*name) are not accepted in a flag file',
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        repeated = repeated_name([self.construct_object(key, deep=True) for key, _ in node.value])
        if repeated is not None:
            raise yaml.constructor.ConstructorError(None, None, f'{repeated!r} is given twice', node.start_mark)
        return super().construct_mapping(node, deep)


def config_words(path):
    """The flags a --config file sets, as command-line words. The file is a JSON (or, named .yaml/.yml, YAML)
    mapping of flag names to values (true/false for switches, lists for flags of several values), or a run's
    config.json, of which the flags that run was given are taken (its defaults are this code's own)."""
    try:
        with open(path) as f:
            settings = yaml.load(f, FlatYAMLLoader) if path.endswith(('.yaml', '.yml')) else \
                json.load(f, object_pairs_hook=mapping_without_repeats)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise UsageError(f'--config {path}: {" ".join(str(error).split())}') from None
    if isinstance(settings, dict) and 'arguments' in settings:  # a run's own config.json
        if not isinstance(settings.get('given_flags'), list) or not isinstance(settings['arguments'], dict):
            raise UsageError(f'--config {path}: a run\'s config.json that does not say which flags the run was given '
                             f'(written by an older version): give that run\'s flags on the command line')
        settings = {name: settings['arguments'][name] for name in settings['given_flags']
                    if name != 'config' and name in settings['arguments']}
    if not isinstance(settings, dict):
        raise UsageError(f'--config {path}: not a mapping of flag names to values')
    defaults = vars(build_parser().parse_args([]))  # a switch is the flag whose default is True or False
    words = []
    for name, value in settings.items():
        if name not in defaults or name == 'config':
            raise UsageError(f'--config {path}: {name!r} is not a flag (names as in --help, without the dashes)')
        if isinstance(defaults[name], bool):
            if not isinstance(value, bool) and str(value).lower() not in ON_OFF:
                raise UsageError(f'--config {path}: {name} is a switch: true or false (on or off), not {value!r}')
            words += [f'--{name}', str(value).lower()]
        elif value is not None:
            words += [f'--{name}', *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return words


def parse_args(argv=None):
    """The checked flags, with every default resolved; a --config file's flags come before the command line's,
    which therefore override them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    config = parser.parse_args(argv).config
    if config:
        words = config_words(config)
        try:
            parser.parse_args(words)
        except UsageError as error:
            raise UsageError(f'--config {config}: {error}') from None
        argv = words + argv
    args = parser.parse_args(argv)
    args.given = sorted(explicit_flags(argv))
    resolve_defaults(args)
    for check in CHECKS:
        check(args)
    return args


def main(argv=None):
    """Run the command `argv` (default: the command line) names. Its mistakes are one line on stderr and an exit
    status, under the program's name: that of the command line (trainECAPAModel.py, the `speakerkit` console
    command) or, for a list given in Python, trainECAPAModel.py."""
    program = os.path.basename(sys.argv[0]) if argv is None else 'trainECAPAModel.py'
    with reported_as_exit(program):
        args = parse_args(argv)
        command = command_of(args)
        if command != 'train' and distributed.launched_by_torchrun():
            raise UsageError(f'--{command} runs in one process: launch it without torchrun')
        if command == 'train':
            args.device = str(distributed.setup(args.device))
        try:
            corpus = os.path.join(args.save_path, 'corpus')
            if args.demo and any(n not in args.given for n in demo.corpus_paths(corpus)) and distributed.is_main():
                print(f'Demo corpus: {corpus}')
                demo.make_corpus(corpus)
            distributed.barrier()
            return COMMANDS[command].run(args)
        finally:
            end_loader_workers()
            distributed.cleanup()



def command():
    """The `speakerkit` console command: `main` on the command line, exit status 0 when it returns (what it
    returns is for callers in Python)."""
    main()
