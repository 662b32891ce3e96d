"""Runs the original trainer, TaoRuijie/ECAPA-TDNN's trainECAPAModel.py, from a checkout given as the first
argument, with its own flags after it, under the run-time patches of bench/reference.py (what a CPU and
numpy >= 1.24 need) and nothing else. The checkout stays where the user put it; nothing of it is copied here.

  python exps/librispeech/original.py /tmp/orig --train_list ... --n_class 200 --save_path ...
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'bench'))
from reference import cpu_patches  # noqa: E402


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    directory = os.path.abspath(sys.argv[1])
    script = os.path.join(directory, 'trainECAPAModel.py')
    if not os.path.isfile(script):
        raise SystemExit(f'{directory}: not a checkout of TaoRuijie/ECAPA-TDNN (no trainECAPAModel.py)')
    sys.argv = [script] + sys.argv[2:]
    sys.path.insert(0, directory)
    with cpu_patches():
        runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
