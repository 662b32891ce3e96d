"""This toolkit's trainer beside the original's on real speech: the same LibriSpeech split, flags and
augmentation sources for both, several runs of each, and every `--test_step`th epoch's checkpoint of every
run scored by one evaluation, then one table (mean, spread) and one plot of EER against epoch.

  python exps/librispeech/compare.py --reference /tmp/orig                 # the full setting: hours on 2 cores
  python exps/librispeech/compare.py --reference /tmp/orig --reduced       # minutes: everything runs once
  python exps/librispeech/compare.py --variant speed "--speed_perturb on"  # a technique, beside the plain recipe
  python exps/librispeech/compare.py --report --variant speed "..."       # the table of the runs finished so far

Systems and runs:
  ours      trainECAPAModel.py with `--seed 1..--runs`.
  original  TaoRuijie/ECAPA-TDNN's trainer from the checkout `--reference DIR` names (fetch it; it is never
            copied here), run by original.py under the CPU/numpy patches of bench/reference.py. It has no seed
            flag: each run draws its own (torch's unseeded default), so its runs differ as ours do by seed.
            With --average N it also saves its last N epochs (original.py --save_last), and their mean is
            scored beside ours, so that an averaged row of ours has the original's averaged row to compare to.
  NAME      each `--variant NAME FLAGS`: ours with FLAGS added, the same seeds.
Runs are interleaved (ours 1, original 1, variants 1, ours 2, ...) so that a machine shared with other work
slows all systems alike; a finished run is not trained again, and an interrupted one continues from its last
checkpoint (both trainers resume). With --finetune SYSTEM ... every run of those systems (ours or variants) is
also fine-tuned (--large_margin, from its last checkpoint) into <run>_finetuned; with --finetune_control
SYSTEM ... the same epochs at the same learning rates but with the recipe's crops, margin and SpecAugment, into
<run>_continued: what fine-tuning gains beyond that many more epochs at a low rate.

Evaluation: during training both trainers score a two-trial list only (the original evaluates at every test
step and cannot be told not to); afterwards each saved checkpoint is scored on every trial with this toolkit's
`evaluation.evaluate`, which gives the original's own scores for the same weights to 1e-7 and also reports minDCF at
p_target 0.01. Results are cached beside each checkpoint's run (scores.json).

Output in `--out`: table.md, results.json (every run's EER and minDCF per epoch) and eer_by_epoch.png.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speakerkit import evaluation, plots, tools  # noqa: E402
from speakerkit.checkpoints import atomic_torch_save, average_checkpoints  # noqa: E402
from speakerkit.lists import read_trials  # noqa: E402
from speakerkit.records import read_metrics  # noqa: E402
from make_lists import make_lists  # noqa: E402

SHARED = os.path.join(ROOT, '..', 'shared', 'data')
RECIPE = {'C': 512, 'batch_size': 32, 'lr': 0.001, 'lr_decay': 0.97, 'test_step': 10, 'max_epoch': 60,
          'num_frames': 200, 'm': 0.2, 's': 30, 'n_cpu': 1}
REDUCED = {'C': 64, 'max_epoch': 2, 'test_step': 1}
FINETUNE_EPOCHS = 5  # --large_margin's default


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--reference', help='checkout of TaoRuijie/ECAPA-TDNN (without it: ours and variants)')
    parser.add_argument('--corpus', default=os.path.join(SHARED, 'librispeech_251'))
    parser.add_argument('--musan_path', default=os.path.join(SHARED, 'musan_mini'))
    parser.add_argument('--rir_path', default=os.path.join(SHARED, 'rirs_mini', 'simulated_rirs'))
    parser.add_argument('--out', default=os.path.join(ROOT, 'exps', 'librispeech', 'compare'))
    parser.add_argument('--runs', type=int, default=3, help='runs of each system (ours: seeds 1..RUNS)')
    parser.add_argument('--train_speakers', type=int, default=200)
    parser.add_argument('--pieces', type=int, default=3, help='parts each held-out recording is cut into')
    parser.add_argument('--variant', nargs=2, action='append', default=[], metavar=('NAME', 'FLAGS'),
                        help='also train ours with these extra flags, e.g. --variant speed "--speed_perturb on"')
    parser.add_argument('--average', type=int, default=5, metavar='N',
                        help='ours and variants also write the mean of their last N epochs (--average N, which '
                             'changes no training), reported as a row of its own (0: off)')
    parser.add_argument('--finetune', nargs='+', default=[], metavar='SYSTEM',
                        help=f'also fine-tune every run of these systems (ours or variants) with --large_margin from '
                             f'its last checkpoint ({FINETUNE_EPOCHS} epochs of 6 s crops; 1 with --reduced), '
                             f'reported as a row of its own')
    parser.add_argument('--finetune_control', nargs='+', default=[], metavar='SYSTEM',
                        help='also continue every run of these systems as --finetune does, but with the recipe\'s '
                             'crops, margin and SpecAugment: only the learning rates and the epochs of fine-tuning, '
                             'reported as a row of its own')
    parser.add_argument('--score_every', type=int, metavar='N',
                        help='ours and its variants save a checkpoint, scored afterwards, every N epochs (--test_step '
                             'N), their learning rate still decaying every --test_step epochs (--lr_decay_every); the '
                             'original saves every --test_step epochs, which also sets its schedule (default: '
                             '--test_step)')
    parser.add_argument('--only', nargs='+', metavar='SYSTEM', help='train and report these systems only')
    parser.add_argument('--report', action='store_true',
                        help='train nothing: score and tabulate the finished runs there are, each system with its own '
                             'number of runs')
    parser.add_argument('--reduced', action='store_true', help=f'a quick check: {REDUCED}, one run each')
    for name, value in RECIPE.items():
        parser.add_argument(f'--{name}', type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.reduced:
        for name, value in REDUCED.items():
            if getattr(args, name) == RECIPE[name]:
                setattr(args, name, value)
        args.runs = 1
        args.average = min(args.average, args.max_epoch)
    for name in ('reference', 'corpus', 'musan_path', 'rir_path', 'out'):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def data_flags(args, data):
    return ['--train_list', os.path.join(data, 'train_list.txt'), '--train_path', args.corpus,
            '--eval_list', os.path.join(data, 'two_trials.txt'), '--eval_path', os.path.join(data, 'test'),
            '--musan_path', args.musan_path, '--rir_path', args.rir_path]


def recipe_flags(args, data):
    """The flags both trainers are given, in the original's spelling (ours accepts all of them)."""
    return data_flags(args, data) + [word for name in RECIPE for word in (f'--{name}', str(getattr(args, name)))]


def finetune_command(args, data, folder, extra, control=False):
    """Ours with --large_margin from `folder`'s last checkpoint: its own schedule, crops and margin (the
    recipe's --lr, --num_frames, --m, ... would override them), the recipe's width, batch and data. The
    `control` keeps fine-tuning's schedule and epochs but trains on the recipe's crops and margin, with
    SpecAugment, into <folder>_continued."""
    kept = [word for name in ('C', 'batch_size', 's', 'n_cpu') for word in (f'--{name}', str(getattr(args, name)))]
    if control:
        kept += ['--num_frames', str(args.num_frames), '--m', str(args.m), '--spec_augment', 'on']
    return ([sys.executable, os.path.join(ROOT, 'trainECAPAModel.py'), '--large_margin', '--initial_model',
             checkpoint(folder, args.max_epoch), '--max_epoch', str(finetune_epochs(args)), '--save_path',
             continuation(folder, control)] + data_flags(args, data) + kept + extra)


def continuation(folder, control):
    """The folder of a run's fine-tuning, or of its control."""
    return folder + ('_continued' if control else '_finetuned')


def finetune_epochs(args):
    return 1 if args.reduced else FINETUNE_EPOCHS


def systems(args):
    """{name: (command prefix, extra flags per run)}; every system but the original is ours."""
    ours = [sys.executable, os.path.join(ROOT, 'trainECAPAModel.py'), '--average', str(args.average)]
    scoring = []  # after the recipe's flags, so that they win
    if args.score_every and args.score_every != args.test_step:
        scoring = ['--test_step', str(args.score_every), '--lr_decay_every', str(args.test_step)]
    found = {'ours': (ours, lambda run: ['--seed', str(run)] + scoring)}
    if args.reference:
        found['original'] = ([sys.executable, os.path.join(os.path.dirname(__file__), 'original.py'),
                              args.reference, '--save_last', str(args.average), '--n_class', str(args.train_speakers)],
                             lambda run: [])
    for name, flags in args.variant:
        extra = flags.split()
        found[name] = (ours, lambda run, extra=extra: ['--seed', str(run)] + scoring + extra)
    if args.only:
        unknown = sorted(set(args.only) - set(found))
        if unknown:
            raise SystemExit(f'--only {unknown}: not among the systems {sorted(found)}')
        found = {name: found[name] for name in args.only}
    for option in ('finetune', 'finetune_control'):
        wrong = sorted(set(getattr(args, option)) - (set(found) - {'original'}))
        if wrong:
            raise SystemExit(f'--{option} {wrong}: only ours and its variants fine-tune; the systems are '
                             f'{sorted(found)}')
    return found


def write_two_trials(data):
    """The trial list both trainers score during training: the first target and the first non-target."""
    with open(os.path.join(data, 'trials.txt')) as f:
        lines = f.read().splitlines()
    chosen = [next(line for line in lines if line.startswith(label)) for label in ('1 ', '0 ')]
    with open(os.path.join(data, 'two_trials.txt'), 'w') as f:
        f.write('\n'.join(chosen) + '\n')


def run_folder(args, name, run):
    """Where run `run` of system `name` trains."""
    return os.path.join(args.out, 'runs', f'{name}_{run}')


def checkpoint(folder, epoch):
    """A run's checkpoint of `epoch`, or of its last epochs' average for epoch 'average'."""
    return os.path.join(folder, 'model', f'model_{epoch:04d}.model' if epoch != 'average' else 'model_average.model')


def train(command, folder, last_epoch):
    """Run one training to `last_epoch` unless its checkpoint exists; its output goes to folder/log.txt."""
    if os.path.exists(checkpoint(folder, last_epoch)):
        return
    os.makedirs(folder, exist_ok=True)
    print(' '.join(command), flush=True)
    with open(os.path.join(folder, 'log.txt'), 'a') as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not os.path.exists(checkpoint(folder, last_epoch)):
        raise SystemExit(f'{folder}: training stopped (exit {result.returncode}); see {folder}/log.txt')


def average_last_epochs(args, folder):
    """The original writes no average: the mean of the weights of its last --average epochs (which original.py's
    --save_last saved), as ours writes it, unless some of them are missing (a run trained without them)."""
    last = [checkpoint(folder, epoch) for epoch in range(args.max_epoch - args.average + 1, args.max_epoch + 1)]
    if args.average and all(map(os.path.exists, last)) and not os.path.exists(checkpoint(folder, 'average')):
        atomic_torch_save(average_checkpoints(last), checkpoint(folder, 'average'))


def score_checkpoints(folder, epochs, data):
    """{epoch: {'eer', 'min_dcf_0.05', 'min_dcf_0.01'}} of the run's checkpoints, cached in scores.json."""
    cache_path = os.path.join(folder, 'scores.json')
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    trials = read_trials(os.path.join(data, 'trials.txt'))
    for epoch in epochs:
        path = checkpoint(folder, epoch)
        if not os.path.exists(path):
            continue
        key = f'{epoch}:{os.path.getmtime(path)}'
        if key not in cache:
            encoder = tools.load_model(path)
            result = evaluation.evaluate(encoder, [trials], os.path.join(data, 'test'), 'cpu')[trials.path]
            cache[key] = result.metrics.as_record()
            with open(cache_path + '.tmp', 'w') as f:
                json.dump(cache, f, indent=1)
            os.replace(cache_path + '.tmp', cache_path)
    return {epoch: cache[f'{epoch}:{os.path.getmtime(checkpoint(folder, epoch))}'] for epoch in epochs
            if os.path.exists(checkpoint(folder, epoch))}


def summary(values):
    values = np.asarray(values, dtype=float)
    return {'mean': float(values.mean()), 'sd': float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            'min': float(values.min()), 'max': float(values.max()), 'n': int(len(values))}


def table(results, epochs):
    """Markdown: EER mean ± sd [min-max] per system (rows) and epoch (columns), then minDCFs at the last."""
    last = epochs[-1]
    lines = ['| system | runs | ' + ' | '.join(f'EER @{e}' for e in epochs) +
             f' | minDCF(0.01) @{last} | minDCF(0.05) @{last} |',
             '|---|---|' + '---|' * (len(epochs) + 2)]
    for name, runs in results.items():
        cells = []
        for epoch in epochs:
            if not all(epoch in run for run in runs.values()):
                cells.append('')
                continue
            s = summary([run[epoch]['eer'] for run in runs.values()])
            cells.append(f'{s["mean"]:.2f}% ± {s["sd"]:.2f} [{s["min"]:.2f}-{s["max"]:.2f}]')
        for key in ('min_dcf_0.01', 'min_dcf_0.05'):
            s = summary([run[last][key] for run in runs.values()])
            cells.append(f'{s["mean"]:.3f} ± {s["sd"]:.3f}')
        lines.append(f'| {name} | {len(runs)} | ' + ' | '.join(cells) + ' |')
    lines += late_swings(results, last)
    if 'original' in results:
        base = summary([run[last]['eer'] for run in results['original'].values()])['mean']
        for name, runs in results.items():
            if name != 'original':
                mean = summary([run[last]['eer'] for run in runs.values()])['mean']
                lines.append(f'\n{name}: mean EER at epoch {last} is {mean / base:.2f}x the original\'s.')
    return '\n'.join(lines) + '\n'


def late_swings(results, last):
    """A line for each system evaluated more than once in the second half of training: per run, its worst EER
    after epoch last / 2 over its EER at `last` (issue 29 asks blip for at most 2 in every run)."""
    lines = []
    for name, runs in results.items():
        ratios = []
        for run in runs.values():
            late = [metrics['eer'] for epoch, metrics in run.items() if last / 2 < epoch <= last]
            if len(late) > 1:
                ratios.append(max(late) / run[last]['eer'] if run[last]['eer'] > 0 else float('inf'))
        if ratios:
            lines.append(f'\n{name}: worst EER after epoch {last // 2} over the EER at epoch {last}, per run: '
                         + ', '.join(f'{r:.2f}' for r in ratios) + '.')
    return lines


def training_costs(args, found, last):
    """A line for each of our systems with finished runs: per run (from its metrics.jsonl, epochs 1 to `last`),
    the wall clock of training and its evaluations in minutes, the crops it trained on and their rate, so that
    modes whose batches hold two views of each speaker are compared at equal crops as well as equal epochs."""
    lines = []
    for name in found:
        costs = []
        for run in range(1, args.runs + 1):
            records = {r['epoch']: r for r in read_metrics(os.path.join(run_folder(args, name, run), 'metrics.jsonl'))}
            if not all(epoch in records for epoch in range(1, last + 1)):
                continue
            epochs = [records[epoch] for epoch in range(1, last + 1)]
            crops = sum(r['crops_per_s'] * r['train_seconds'] for r in epochs)
            seconds = sum(r['train_seconds'] for r in epochs)
            minutes = sum(r['epoch_seconds'] for r in epochs) / 60
            costs.append(f'{minutes:.1f} min, {crops / 1000:.1f} k crops at {crops / seconds:.1f}/s')
        if costs:
            lines.append(f'\n{name}: training to epoch {last}, per run: ' + '; '.join(costs) + '.')
    return lines


def plot(results, epochs, path):
    figure, axes = plots.plt.subplots(figsize=(10, 4.5))
    for colour, (name, runs) in zip(plots.plt.rcParams['axes.prop_cycle'].by_key()['color'], results.items()):
        shown = [e for e in epochs if all(e in run for run in runs.values())]
        curves = np.array([[run[e]['eer'] for e in shown] for run in runs.values()])
        for curve in curves:
            axes.plot(shown, curve, color=colour, alpha=0.3, lw=0.8)
        axes.plot(shown, curves.mean(axis=0), color=colour, lw=2, marker='o' if len(shown) > 1 else '*',
                  markersize=6 if len(shown) > 1 else 12, label=f'{name} (mean of {len(curves)})')
    axes.set_xlabel('epoch')
    axes.set_ylabel('EER (%)')
    axes.grid(alpha=0.3)
    axes.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    plots.save_figure(figure, path)


def collect_results(args, found, epochs, data):
    """{row name: {run: {epoch: metrics}}}: each system's finished runs (those whose last epoch has a checkpoint),
    and rows for their averages and fine-tuned models where every such run has one."""
    results = {}
    last, tuned = epochs[-1], finetune_epochs(args)
    for name in found:
        folders = {run: run_folder(args, name, run) for run in range(1, args.runs + 1)}
        runs = {run: score_checkpoints(folder, epochs + ['average'], data) for run, folder in folders.items()
                if os.path.exists(checkpoint(folder, last))}
        if not runs:
            continue
        results[name] = {run: {e: v for e, v in scores.items() if e != 'average'} for run, scores in runs.items()}
        if all('average' in scores for scores in runs.values()):  # rows reported at the last epoch's column
            results[f'{name}, average of the last {args.average} epochs'] = {
                run: {last: scores['average']} for run, scores in runs.items()}
        for control, option, row in ((False, args.finetune, 'large-margin fine-tuned'),
                                     (True, args.finetune_control, 'continued at the fine-tuning rates (control)')):
            continued = {run: continuation(folders[run], control) for run in runs}
            if name in option and all(os.path.exists(checkpoint(f, tuned)) for f in continued.values()):
                results[f'{name}, {row}'] = {
                    run: {last: score_checkpoints(folder, [tuned], data)[tuned]} for run, folder in continued.items()}
    return results


def main(argv=None):
    args = arguments(argv)
    data = os.path.join(args.out, 'data')
    if not os.path.exists(os.path.join(data, 'trials.txt')):
        try:
            make_lists(args.corpus, data, args.train_speakers, args.pieces)
        except ValueError as error:
            raise SystemExit(f'--corpus: {error}') from None
        write_two_trials(data)
    found = systems(args)
    flags = recipe_flags(args, data)
    for run in range(1, (0 if args.report else args.runs) + 1):
        for name, (command, per_run) in found.items():
            folder = run_folder(args, name, run)
            train(command + flags + per_run(run) + ['--save_path', folder], folder, args.max_epoch)
            if name == 'original':
                average_last_epochs(args, folder)
            for control, option in ((False, args.finetune), (True, args.finetune_control)):
                if name in option:
                    train(finetune_command(args, data, folder, per_run(run), control), continuation(folder, control),
                          finetune_epochs(args))
    every = args.score_every or args.test_step
    epochs = list(range(every, args.max_epoch, every)) + [args.max_epoch]
    results = collect_results(args, found, epochs, data)
    text = table(results, epochs) + ''.join(line + '\n' for line in training_costs(args, found, epochs[-1]))
    print(text)
    with open(os.path.join(args.out, 'table.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump({'flags': flags, 'results': results}, f, indent=1)
    plot(results, epochs, os.path.join(args.out, 'eer_by_epoch.png'))


if __name__ == '__main__':
    main()
