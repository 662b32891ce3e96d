"""Runs the original trainer, TaoRuijie/ECAPA-TDNN's trainECAPAModel.py, from a checkout given as the first
argument, with its own flags after it, under the run-time patches of bench/reference.py (what a CPU and
numpy >= 1.24 need). The checkout stays where the user put it; nothing of it is copied here.

  python exps/librispeech/original.py /tmp/orig [--save_last N] --train_list ... --n_class 200 --save_path ...

--save_last N (this runner's, not the original's) also saves the weights of each of the last N epochs as
save_path/model/model_XXXX.model, in the original's own format, so that their mean can stand beside ours
(`trainECAPAModel.py --average_checkpoints`); the original saves only every --test_step-th epoch, and its
--test_step also sets its learning-rate schedule. Nothing else of its training changes.
"""

import argparse
import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'bench'))
from reference import cpu_patches  # noqa: E402


def save_last_epochs(model_class, last, max_epoch, folder):
    """Make `model_class.train_network` (the original ECAPAModel's, one epoch) save the weights after each of
    the `last` epochs up to `max_epoch` into `folder`, as the original names its checkpoints."""
    train_network = model_class.train_network

    def train_and_save(self, epoch, loader):
        result = train_network(self, epoch=epoch, loader=loader)
        if epoch > max_epoch - last:
            self.save_parameters(os.path.join(folder, f'model_{epoch:04d}.model'))
        return result
    model_class.train_network = train_and_save


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    directory = os.path.abspath(sys.argv[1])
    script = os.path.join(directory, 'trainECAPAModel.py')
    if not os.path.isfile(script):
        raise SystemExit(f'{directory}: not a checkout of TaoRuijie/ECAPA-TDNN (no trainECAPAModel.py)')
    ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ours.add_argument('--save_last', type=int, default=0)
    own, flags = ours.parse_known_args(sys.argv[2:])  # flags: the original's, in their order
    read = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # what --save_last needs of them
    read.add_argument('--max_epoch', type=int, default=80)  # the original's default
    read.add_argument('--save_path')
    known, _ = read.parse_known_args(flags)
    sys.argv = [script] + flags
    sys.path.insert(0, directory)
    with cpu_patches():
        if own.save_last:
            import ECAPAModel
            save_last_epochs(ECAPAModel.ECAPAModel, own.save_last, known.max_epoch,
                             os.path.join(known.save_path, 'model'))
        runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
