"""The trainer on a VoxCeleb2-sized list: start-up, loader memory, epoch plans, resume state, data checks.

  python bench/bench_scale.py --corpus DIR [--steps 2000] [--batch_size 32] [--workers 2] [--code DIR]
                              [--skip_check_data] [--json FILE]

DIR is bench/simulate_voxceleb2.py's corpus (made there first when DIR has none: 1,092,009 training lines of
5,994 speakers, 579,818 trials over 145,160 files). Measured and printed:

  lists        reading the training list, dropping repeats, checking that every file exists; the trial list
               read and each of its files' headers checked (what training does before its first step)
  plans        one epoch's order from each sampler (random, chns, pairs, chns pairs)
  cohort       choosing the AS-Norm cohort (20,000 utterances over every speaker) from the list
  training     `trainECAPAModel.py` (ECAPA-TDNN C=16, 0.5 s crops, no augmentation, --workers loader workers)
               in a process of its own: seconds from the command to the first step, private (unshared) memory
               of the training process and of each loader worker at the first step and after --steps steps;
               then a SIGTERM stops it mid-epoch, and the resume state's size and its save and load times
  check_data   `--check_data` over the whole list (headers of every file, 2,000 decoded; --workers processes)

`--code DIR` runs the training part with the trainer of another checkout (an older commit, say), for a
before/after of the same measurement.
"""

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time

from common import ROOT, environment, write_json
import simulate_voxceleb2


def private_mib(pid):
    """Private (unshared) memory of process `pid`: its pages that no other process maps, clean or dirty."""
    fields = {}
    with open(f'/proc/{pid}/smaps_rollup') as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(':') and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    return (fields['Private_Clean'] + fields['Private_Dirty']) / 1024


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def measure_lists(corpus):
    from speakerkit.lists import read_train_list, read_trials, require_files, without_repeats
    from speakerkit.dataLoader import unreadable_headers
    train_list, read_s = timed(read_train_list, os.path.join(corpus, 'train_list.txt'))
    (train_list, _), repeat_s = timed(without_repeats, train_list)
    _, exist_s = timed(require_files, train_list.paths, train_list.lines, os.path.join(corpus, 'train', 'wav'),
                       'train_list.txt')
    trials, trials_s = timed(read_trials, os.path.join(corpus, 'trials.txt'))
    files = list(trials.references())
    problems, headers_s = timed(unreadable_headers, os.path.join(corpus, 'test', 'wav'), files)
    arrays = (train_list.labels, train_list.path_bytes, train_list.path_ends, train_list.lines, train_list.speakers)
    return train_list, {
        'train_lines': len(train_list), 'speakers': len(train_list.speakers),
        'train_list_mib': sum(a.nbytes for a in arrays) / 2 ** 20, 'read_train_list_s': read_s,
        'without_repeats_s': repeat_s, 'files_exist_s': exist_s, 'trials': len(trials.lines), 'trial_files': len(files),
        'read_trials_s': trials_s, 'trial_headers_s': headers_s, 'unreadable_trial_files': len(problems)}


def measure_plans(train_list, batch_size):
    import numpy as np
    import torch
    from speakerkit.lists import cohort_entries
    from speakerkit.samplers import (EpochSampler, HardNegativeBatches, HardNegativePairBatches, SpeakerGroups,
                                     SpeakerPairSampler)
    found = {}
    centres = torch.from_numpy(np.random.default_rng(0).standard_normal((len(train_list.speakers), 16)))
    labels = train_list.labels
    groupings = {'chns': SpeakerGroups(labels, batch_size, 0.5), 'chns_pairs': SpeakerGroups(labels, batch_size, 0.5)}
    samplers = {'random': EpochSampler(len(train_list), batch_size, 10),
                'chns': HardNegativeBatches(labels, batch_size, groupings['chns'], 10),
                'pairs': SpeakerPairSampler(labels, batch_size, 10),
                'chns_pairs': HardNegativePairBatches(labels, batch_size, groupings['chns_pairs'], 10)}
    for name, sampler in samplers.items():
        sampler.set_epoch(2)
        started = time.perf_counter()
        if name in groupings:
            groupings[name].groups = groupings[name].from_weights(centres, 10, 2)
        steps = sum(len(batch) for batch in sampler)
        found[f'plan_{name}_s'] = time.perf_counter() - started
        found[f'plan_{name}_items'] = steps
    _, found['cohort_s'] = timed(cohort_entries, train_list, 20000, 10)
    return found


def train_child(out_json, started, steps, argv):
    """In the training process: cli.main(argv), measured at its first and `steps`-th step, then
    stopped by SIGTERM (as a scheduler would)."""
    from speakerkit import checkpoints, cli, trainer
    record = {'at_step': {}}
    taken = [0]
    step = trainer.TrainingStep.__call__

    def measured_step(self, batch, rng):
        result = step(self, batch, rng)
        taken[0] += 1
        if taken[0] in (1, steps):
            workers = [p.pid for p in multiprocessing.active_children()]
            record['at_step'][taken[0]] = {'seconds_since_command': time.time() - started,
                                           'main_private_mib': private_mib(os.getpid()),
                                           'workers_private_mib': [private_mib(pid) for pid in workers]}
            print(f'step {taken[0]}: {record["at_step"][taken[0]]}', flush=True)
        if taken[0] == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    save = checkpoints.ResumeState.save

    def measured_save(self, path):
        began = time.perf_counter()
        save(self, path)
        record['resume_save_s'] = time.perf_counter() - began

    trainer.TrainingStep.__call__ = measured_step
    checkpoints.ResumeState.save = measured_save
    cli.main(argv)
    with open(out_json, 'w') as f:
        json.dump(record, f)


def measure_training(args, corpus, save_path):
    argv = ['--train_list', os.path.join(corpus, 'train_list.txt'),
            '--train_path', os.path.join(corpus, 'train', 'wav'),
            '--eval_list', os.path.join(corpus, 'trials.txt'), '--eval_path', os.path.join(corpus, 'test', 'wav'),
            '--save_path', save_path, '--model', 'ecapa-tdnn', '--C', '16', '--num_frames', '50',
            '--batch_size', str(args.batch_size), '--n_cpu', str(args.workers), '--max_epoch', '1',
            '--device', 'cpu']
    out_json = os.path.join(save_path, 'bench_scale.json')
    started = time.time()
    command = [sys.executable, os.path.abspath(__file__), '--train_child', out_json, '--started', str(started),
               '--steps', str(args.steps), '--code', args.code, '--', *argv]
    subprocess.run(command, check=True)
    with open(out_json) as f:
        record = json.load(f)
    from speakerkit.checkpoints import ResumeState
    resume = os.path.join(save_path, 'model', 'resume.pt')
    _, record['resume_load_s'] = timed(ResumeState.load, resume)
    record['resume_mib'] = os.path.getsize(resume) / 2 ** 20
    first, last = record['at_step'][str(1)], record['at_step'][str(args.steps)]
    record['first_step_s'] = first['seconds_since_command']
    record['worker_growth_mib'] = [b - a for a, b in zip(first['workers_private_mib'], last['workers_private_mib'])]
    record['main_growth_mib'] = last['main_private_mib'] - first['main_private_mib']
    return record


def measure_check_data(args, corpus):
    started = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(args.code, 'trainECAPAModel.py'), '--check_data', '--train_list',
                    os.path.join(corpus, 'train_list.txt'), '--train_path', os.path.join(corpus, 'train', 'wav'),
                    '--n_cpu', str(args.workers)], check=False)
    return {'check_data_s': time.perf_counter() - started}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--corpus', default=os.path.join(tempfile.gettempdir(), 'vox2sim'))
    parser.add_argument('--steps', type=int, default=2000)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--code', default=ROOT, help='checkout whose trainer runs the training part')
    parser.add_argument('--skip_check_data', action='store_true')
    parser.add_argument('--json')
    parser.add_argument('--train_child', help=argparse.SUPPRESS)
    parser.add_argument('--started', type=float, help=argparse.SUPPRESS)
    parser.add_argument('rest', nargs='*', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        sys.path.insert(0, os.path.abspath(args.code))
        os.chdir(args.code)
        return train_child(args.train_child, args.started, args.steps, args.rest)
    simulate_voxceleb2.simulate(args.corpus)
    result = {'environment': environment(), 'corpus': args.corpus, 'code': args.code}
    train_list, result['lists'] = measure_lists(args.corpus)
    print(json.dumps(result['lists'], indent=1), flush=True)
    result['plans'] = measure_plans(train_list, min(128, len(train_list.speakers)))
    print(json.dumps(result['plans'], indent=1), flush=True)
    del train_list
    with tempfile.TemporaryDirectory() as save_path:
        result['training'] = measure_training(args, args.corpus, save_path)
    print(json.dumps(result['training'], indent=1), flush=True)
    if not args.skip_check_data:
        result['check_data'] = measure_check_data(args, args.corpus)
        print(json.dumps(result['check_data'], indent=1), flush=True)
    write_json(args.json, result)


if __name__ == '__main__':
    main()
