"""What each command of trainECAPAModel.py does once its flags are checked: one short function per command,
and the checks of its own flags (`COMMANDS`). Training itself is trainer.py's `run_training`.

A module of its own so that the entry script holds the flags, their defaults and their checks, and this one
what the commands do with them.
"""

import dataclasses
import importlib.util
import io
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from speakerkit.checkpoints import (atomic_torch_save, atomic_write, average_checkpoints, calibration_path,
                                    encoder_config_path, file_digest, read_calibration, read_encoder_config,
                                    write_calibration, write_encoder_config)
from speakerkit.errors import UsageError, UserError
from speakerkit.lists import files_to_embed, read_score_file, write_score_file
from speakerkit.plots import evaluation_plots
from speakerkit.prepare import check_data
from speakerkit.dataLoader import audio_duration
from speakerkit.evaluation import (calibrated_pair, cohort_of, embed_files, embedding_readers,
                                   embeddings_and_protocol_vectors, evaluate_encoder, read_trial_lists, training_mean)
from speakerkit.metrics import cllr, fit_calibration, verification_metrics
from speakerkit.tools import as_recordings, export_onnx, export_program, export_torchscript, load_model
from speakerkit.trainer import run_training

EXTRACT_FORMATS = ('.pt', '.npz', '.ark')


def run_score_files(args):
    results = {}
    for path in args.score_file:
        scores, labels = read_score_file(path)
        results[path] = verification_metrics(scores, labels)
        print(f'{path}: {len(scores)} trials, {results[path].text()}')
    return results


def run_check_data(args):
    problems = check_data(args)
    if problems:
        raise UserError(f'--check_data found {len(problems)} problems (listed above)')
    return problems


def load_initial_encoder(args, device):
    """The encoder of --initial_model, built as recorded beside it unless --model/--C/--sampling_rate say."""
    overrides = {name: getattr(args, name) for name in ('model', 'C', 'sampling_rate') if name in args.given}
    return load_model(args.initial_model, device=device, **overrides)


EXPORTERS = {'.pt2': export_program, '.pt': export_torchscript, '.onnx': export_onnx}  # by --export's suffix


def run_export(args):
    encoder = load_initial_encoder(args, 'cpu')
    EXPORTERS[os.path.splitext(args.export)[1]](encoder, args.export)
    print(f'{args.export}: {type(encoder).__name__} at {encoder.sampling_rate} Hz, waveform [batch, samples] in, '
          f'embedding [batch, {encoder.embedding_dim}] out')


def run_eval(args):
    encoder = load_initial_encoder(args, args.device)
    print(f'Model {args.initial_model} loaded: {type(encoder).__name__} at {encoder.sampling_rate} Hz')
    results = evaluate_encoder(encoder, args, args.device, read_trial_lists(args), cohort_of(args),
                               file_digest(args.initial_model))
    for path, result in results.items():
        score_path = os.path.join(args.save_path, 'scores', result.trials.name)
        for suffix, scores, _ in result.score_sets():
            write_score_file(score_path + suffix.replace('_', '.'), result.trials.enroll, result.trials.test, scores,
                             result.trials.labels, result.trials.kaldi)
        print(f'{path}: {len(result.scores)} trials, {result.text()}\n'
              f'  scores (enroll test score [label]): {score_path}' + (' and .asnorm' if args.snorm else ''))
    evaluation_plots(results, os.path.join(args.save_path, 'plots'))
    return results


def run_extract(args):
    """Embed every file of a folder, a Kaldi data folder's wav.scp or a list (`lists.files_to_embed`) and write
    `write_extracted`'s fields to --out; files that cannot be embedded are skipped and listed."""
    device = torch.device(args.device)
    encoder = load_initial_encoder(args, device)
    files = files_to_embed(args.extract, args.eval_path)
    skipped = []
    vectors = embed_files(encoder, list(files.references), files.root, device, n_cpu=embedding_readers(args, device),
                          unusable=skipped, represent=embeddings_and_protocol_vectors)
    print(''.join(f'{args.extract}: skipped {path} ({why})\n' for path, why in skipped), end='')
    if not vectors:
        raise UserError(f'--extract {args.extract}: none of its {len(files.references)} files can be embedded')
    rows = list(vectors.values())
    write_extracted(args.out, {'paths': list(vectors), 'names': [files.names[path] for path in vectors],
                               'embeddings': torch.stack([row.embeddings for row in rows]),
                               'protocol_vectors': torch.stack([row.protocol_vectors for row in rows]),
                               'model': args.initial_model, 'sampling_rate': encoder.sampling_rate,
                               'skipped': [list(p) for p in skipped]})
    print(f'{args.out}: {len(vectors)} embeddings of {encoder.embedding_dim} dimensions'
          + (f', {len(skipped)} files skipped' if skipped else ''))


def write_extracted(path, fields):
    """--extract's output: `paths` (in the order of --extract), `names` (each one's utterance in a wav.scp, or its
    path), `embeddings` [N, D] (the encoder's, unnormalised, as `tools.embed` and the exported models give them),
    `protocol_vectors` [N, 2D] (the evaluation protocol's, whose dot products are --eval's scores), `model`,
    `sampling_rate` and `skipped` ([path, why] pairs); with torch.save for .pt, numpy's savez for .npz (strings as
    unicode arrays: np.load needs no pickle). For .ark, Kaldi's form: the embeddings under their names, and
    the .scp beside it (wespeaker's xvector.scp)."""
    if path.endswith('.ark'):
        write_kaldi_vectors(path, fields['names'], fields['embeddings'])
    elif path.endswith('.npz'):
        arrays = {name: value.numpy() if isinstance(value, torch.Tensor) else np.array(value, dtype=None)
                  for name, value in fields.items()}
        arrays['skipped'] = np.array(fields['skipped'], dtype=str).reshape(-1, 2)
        atomic_write(path, lambda f: np.savez(f, **arrays))
    else:
        atomic_torch_save(fields, path)


def write_kaldi_vectors(ark, names, vectors):
    """`ark` (Kaldi's binary float vectors, written by kaldiio) and the .scp beside it: `<name> <ark>:<offset>`
    lines, what Kaldi, kaldiio and wespeaker's scoring read. Names with white space are an error."""
    if importlib.util.find_spec('kaldiio') is None:
        raise UserError(f'{ark}: Kaldi output needs the kaldiio package (pip install -r requirements-extras.txt)')
    import kaldiio
    spaced = next((name for name in names if len(name.split()) != 1), None)
    if spaced is not None:
        raise UserError(f'{ark}: {spaced!r} cannot be a Kaldi key (white space); name the files without it')
    buffer, lines = io.BytesIO(), []
    for name, vector in zip(names, vectors):
        lines.append(f'{name} {os.path.abspath(ark)}:{buffer.tell() + len(name.encode()) + 1}\n')
        kaldiio.save_ark(buffer, {name: vector.numpy()})
    atomic_write(ark, lambda f: f.write(buffer.getvalue()))
    atomic_write(os.path.splitext(ark)[0] + '.scp', lambda f: f.write(''.join(lines).encode()))


def run_score_pair(args):
    """The embeddings of two recordings, their cosine, and the evaluation protocol's score (--eval's)."""
    device = torch.device(args.device)
    encoder = load_initial_encoder(args, device)
    try:
        waveforms, _ = as_recordings(args.score_pair, None, encoder.sampling_rate)
    except (OSError, RuntimeError, ValueError) as error:  # soundfile's errors are RuntimeErrors
        raise UserError(f'--score_pair: {error}') from None
    embeddings, vectors = embeddings_and_protocol_vectors(encoder, waveforms, device)  # each file embedded once
    for path, embedding in zip(args.score_pair, embeddings):
        print(f'{path}: embedding of {len(embedding)} dimensions, norm {embedding.norm():.4f}')
    cosine = float(torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0))
    protocol = float(vectors[0] @ vectors[1])
    print(f'cosine of the embeddings {cosine:.4f}; protocol score (as --eval scores a trial) {protocol:.4f}')
    calibration = read_calibration(args.initial_model)
    if calibration is not None:
        seconds = [len(w) / encoder.sampling_rate for w in waveforms]
        calibrated, llr, same = calibrated_pair(calibration, vectors, seconds)
        centred = ' (of centred vectors, as calibrated)' if calibration.training_mean else ''
        print(f'calibrated log-likelihood ratio {llr:.4f} of the score {calibrated:.4f}{centred} '
              f'({calibration_path(args.initial_model)}); at p_target {calibration.p_target:g}: '
              + ('the same speaker' if same else 'different speakers'))
    return cosine, protocol


def run_calibrate(args):
    """Fit the map from --initial_model's protocol scores (of centred vectors with --subtract_mean; with the
    recordings' durations as quality terms with --duration_terms) to log-likelihood ratios on the labelled trial
    list --calibrate (a development list, apart from the lists it will decide on) and write it beside the
    checkpoint, where --score_pair and `tools.verify` find it."""
    trials = read_trial_lists(args, [args.calibrate])[0]
    if trials.labels is None:
        raise UserError(f'--calibrate {args.calibrate}: a list without labels; calibration needs target and '
                        f'non-target trials')
    encoder = load_initial_encoder(args, args.device)
    identity = file_digest(args.initial_model)
    result = evaluate_encoder(encoder, args, args.device, [trials], cohort_of(args), identity)[trials.path]
    seconds = trial_seconds(trials, args.eval_path) if args.duration_terms else None
    fitted = fit_calibration(result.scores, trials.labels, args.p_target, seconds)
    if fitted.scale <= 0:
        raise UserError(f'--calibrate {args.calibrate}: the scores do not rank targets above non-targets '
                        f'(EER {result.metrics.eer:.2f}%), so there is nothing to calibrate')
    mean = training_mean(encoder, args, args.device, identity).tolist() if args.subtract_mean else []
    calibration = dataclasses.replace(fitted, training_mean=tuple(mean))
    calibrated = cllr(calibration.llr(result.scores, seconds), trials.labels)
    write_calibration(calibration, args.initial_model, {'trial_list': os.path.abspath(args.calibrate),
                                                        'trials': len(result.scores), 'cllr': calibrated,
                                                        'eer': result.metrics.eer})
    terms = (f' {calibration.duration_weights[0]:+.4f} x log shorter s {calibration.duration_weights[1]:+.4f} x '
             f'log longer s' if args.duration_terms else '')
    where = (f'{calibration.threshold():.4f}' if not args.duration_terms else
             f'{calibration.threshold([4.0, 4.0]):.4f} for two 4 s recordings, '
             f'{calibration.threshold([20.0, 20.0]):.4f} for two of 20 s')
    print(f'{args.calibrate}: {len(result.scores)} trials, {result.metrics.text()}\n'
          f'  LLR = {calibration.scale:.4f} x score {calibration.offset:+.4f}{terms}; Cllr {calibrated:.4f} bits; '
          f'at p_target {calibration.p_target:g}, same speaker when the score is above {where}\n'
          f'  written to {calibration_path(args.initial_model)}')
    return calibration


def trial_seconds(trials, root):
    """[N, 2]: the durations of each trial's two files under `root`, from their headers."""
    seconds = {name: audio_duration(os.path.join(root, name)) for name in set(trials.enroll + trials.test)}
    return np.array([[seconds[e], seconds[t]] for e, t in zip(trials.enroll, trials.test)])


def check_calibrate(args):
    if args.snorm:
        raise UsageError('--calibrate with --snorm: AS-Norm scores need the cohort at every decision, which '
                         '--score_pair and tools.verify do not have; calibrate raw scores, or with --subtract_mean')


def run_average_checkpoints(args):
    """--out: the mean of the given checkpoints' weights, with the encoder JSON of the first beside it when it
    has one (what --average N writes at the end of training, for runs that are already over)."""
    atomic_torch_save(average_checkpoints(args.average_checkpoints), args.out)
    if os.path.exists(encoder_config_path(args.average_checkpoints[0])):
        write_encoder_config(read_encoder_config(args.average_checkpoints[0]), args.out)
    print(f'{args.out}: the mean of the weights of {len(args.average_checkpoints)} checkpoints')


def check_check_data(args):
    if not any(getattr(args, n) for n in ('train_list', 'eval_list', 'musan_path', 'rir_path')):
        raise UsageError('--check_data needs something to check: --train_list, --eval_list, --musan_path or '
                         '--rir_path')
    for listed, folder in (('train_list', 'train_path'), ('eval_list', 'eval_path')):
        if getattr(args, listed) and not getattr(args, folder):
            raise UsageError(f'--check_data of --{listed} needs --{folder}')


def check_train(args):
    if args.train_shards:
        if args.train_list and not (args.snorm or args.subtract_mean):
            raise UsageError('--train_shards and --train_list: training reads the shards, and the list would serve '
                             'only --snorm\'s cohort or --subtract_mean; give one of them')
        if args.mode != 'classifier' or args.sampler != 'random':
            raise UsageError('--train_shards streams utterances in a shuffled order, which trains --mode classifier '
                             'with --sampler random; the pair modes and --sampler chns need --train_list')
    elif not (args.train_list and args.train_path):
        raise UsageError('training needs --train_list and --train_path, or --train_shards')


def check_export(args):
    if os.path.splitext(args.export)[1] not in EXPORTERS:
        raise UsageError(f'--export {args.export}: name a .pt2 (torch.export), .pt (TorchScript) or .onnx file')


def check_extract(args):
    if not os.path.exists(args.extract):
        raise UsageError(f'--extract {args.extract}: no such file or folder')
    if os.path.isdir(args.out):
        raise UsageError(f'--out {args.out}: a folder; name the file to write')
    if os.path.splitext(args.out)[1] not in EXTRACT_FORMATS:
        raise UsageError(f'--out {args.out}: name a .pt (torch.save), .npz (numpy) or .ark (Kaldi, with .scp) file')


def check_average_checkpoints(args):
    if len(args.average_checkpoints) < 2:
        raise UsageError('--average_checkpoints needs at least two checkpoints to average')
    if encoder_config_path(args.out) == args.out:
        raise UsageError(f'--out {args.out}: the encoder\'s .json is written beside the weights under that name; '
                         f'name the weights file .model or .pt')
    for path in args.average_checkpoints:
        if not os.path.isfile(path):
            raise UsageError(f'--average_checkpoints {path}: no such file')
    if args.out in args.average_checkpoints or os.path.isdir(args.out):
        raise UsageError(f'--out {args.out}: name a new file for the average')


def check_score_pair(args):
    for path in args.score_pair:
        if not os.path.isfile(path):
            raise UsageError(f'--score_pair {path}: no such file')


class Command(NamedTuple):
    run: Callable
    needs: tuple               # flags that must be given
    check: Callable = None     # further checks of its flags


COMMANDS = {  # the flag that selects each command (training: none of them)
    'score_file': Command(run_score_files, ()),
    'check_data': Command(run_check_data, (), check_check_data),
    'export': Command(run_export, ('initial_model',), check_export),
    'extract': Command(run_extract, ('initial_model', 'out'), check_extract),
    'score_pair': Command(run_score_pair, ('initial_model',), check_score_pair),
    'calibrate': Command(run_calibrate, ('initial_model', 'eval_path'), check_calibrate),
    'average_checkpoints': Command(run_average_checkpoints, ('out',), check_average_checkpoints),
    'eval': Command(run_eval, ('initial_model', 'eval_list', 'eval_path')),
    'train': Command(run_training, (), check_train),
}
