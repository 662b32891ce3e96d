"""Everything a training run writes beside its checkpoints, one owner: `RunLog` writes `config.json` (how the
run was started), `score.txt` (one line a person reads per evaluated epoch, as the original code writes it),
`metrics.jsonl` (each epoch's `records.EpochRecord`), `skipped_files.txt` (the unusable files each epoch met),
`plots/` and, with --tensorboard, `tensorboard/`. Under torchrun process 0 alone writes: the other processes
hold a RunLog that writes nothing."""

import os

from speakerkit.checkpoints import remove_partial_writes
from speakerkit.plots import evaluation_plots, training_curve
from speakerkit.records import TensorBoard, append_metrics, forget_epochs_after, write_config


class RunLog:
    WRITTEN_WHOLE = ('config.json', 'score.txt', 'metrics.jsonl')  # by atomic writes, which a kill can leave cut

    def __init__(self, save_path, writes=True):
        self.save_path = save_path
        self.writes = writes
        self.config_path = os.path.join(save_path, 'config.json')
        self.score_path = os.path.join(save_path, 'score.txt')
        self.metrics_path = os.path.join(save_path, 'metrics.jsonl')
        self.skipped_path = os.path.join(save_path, 'skipped_files.txt')
        self.tensorboard = None

    def start(self, args, device, processes, trained, recorded):
        """A start or restart after `trained` epochs, of which `recorded` were logged: the temporary files of
        writes a stopped run left unfinished removed (returns how many), config.json written for this start,
        the lines of epochs after `recorded` (logged before a crash that came before their resume state)
        dropped, TensorBoard opened with --tensorboard."""
        if not self.writes:
            return 0
        removed = remove_partial_writes(self.save_path, self.WRITTEN_WHOLE)
        write_config(self.config_path, args, device, processes, trained)
        forget_epochs_after(recorded, self.score_path, self.metrics_path)
        if args.tensorboard:
            self.tensorboard = TensorBoard(os.path.join(self.save_path, 'tensorboard'))
        return removed

    def score(self, line):
        """A line of score.txt."""
        if self.writes:
            with open(self.score_path, 'a') as f:
                f.write(line + '\n')

    def skipped(self, epoch, entries):
        """skipped_files.txt: `epoch<TAB>path<TAB>reason` for each (path, reason) of `entries`."""
        if self.writes and entries:
            with open(self.skipped_path, 'a') as f:
                f.writelines(f'{epoch}\t{path}\t{reason}\n' for path, reason in entries)

    def epoch(self, record, results=None):
        """An epoch's EpochRecord in metrics.jsonl and TensorBoard; for an evaluated one (`results`, {list path:
        evaluation.ListResult}) the plots: score distributions, DET curves and the training curve so far."""
        if not self.writes:
            return
        append_metrics(self.metrics_path, record)
        if self.tensorboard is not None:
            self.tensorboard.add(record)
        if results:
            plots = os.path.join(self.save_path, 'plots')
            evaluation_plots(results, plots)
            training_curve(self.metrics_path, os.path.join(plots, 'training_curve.png'))

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
