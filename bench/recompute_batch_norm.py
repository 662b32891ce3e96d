"""Is an epoch's bad EER in its batch-norm statistics? Scores a checkpoint as saved, then again after its
batch-norm running means and variances are recomputed as plain averages over BATCHES batches of clean 2 s crops
of the training list (one view per utterance, no augmentation, weights unchanged). Where the second EER is far
lower, the checkpoint's statistics, not its weights, made the swing (issue 29).

  python bench/recompute_batch_norm.py --checkpoint RUN/model/model_0035.model --train_list LIST \\
      --train_path DIR --eval_list TRIALS --eval_path DIR [--batches 20 --batch_size 32 --seed 1]
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..')))
from speakerkit import evaluation, tools  # noqa: E402
from speakerkit.dataLoader import read_random_window, wrap_pad  # noqa: E402
from speakerkit.lists import read_train_list, read_trials  # noqa: E402
from speakerkit.model import crop_samples  # noqa: E402

TRAINING_FRAMES = 200  # the crop --num_frames gives by default: 2 s


def crops(train_list, train_path, batches, batch_size, length, sampling_rate, rng):
    """`batches` tensors [batch_size, length] of random crops of random entries of `train_list` (a
    `lists.TrainList`), read at `sampling_rate` and wrap-padded where shorter, as training reads them."""
    for _ in range(batches):
        rows = [wrap_pad(read_random_window(os.path.join(train_path, train_list.path(int(index))), length,
                                            sampling_rate, rng), length)
                for index in rng.integers(len(train_list), size=batch_size)]
        yield torch.from_numpy(np.stack(rows))


def recompute(encoder, batches):
    """Replaces every batch-norm layer's running statistics by their average over `batches` (train mode,
    no gradients); the weights do not change."""
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    encoder.train()
    with torch.no_grad():
        for batch in batches:
            encoder(batch)
    encoder.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ('checkpoint', 'train_list', 'train_path', 'eval_list', 'eval_path'):
        parser.add_argument(f'--{name}', required=True)
    parser.add_argument('--batches', type=int, default=20)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--seed', type=int, default=1)
    args = parser.parse_args()
    trials = read_trials(args.eval_list)
    encoder = tools.load_model(args.checkpoint)

    def scored():
        return evaluation.evaluate(encoder, [trials], args.eval_path, 'cpu')[trials.path].metrics.as_record()
    results = {'saved': scored()}
    rate = encoder.sampling_rate
    recompute(encoder, crops(read_train_list(args.train_list), args.train_path, args.batches, args.batch_size,
                             crop_samples(TRAINING_FRAMES, rate), rate, np.random.default_rng(args.seed)))
    results['recomputed'] = scored()
    print(json.dumps({'checkpoint': args.checkpoint, **results}))


if __name__ == '__main__':
    main()
