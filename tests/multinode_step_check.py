"""Run by tests/test_distributed.py under two torchrun agents (`--nnodes 2`, one process each): the first batch
this process reads from tar shards, and one `TrainingStep` (DistributedDataParallel over gloo) on it. Writes
{initial weights, waveforms, labels, gradients} to OUT/rank<r>.pt.

  python tests/multinode_step_check.py OUT SHARDS_TXT
"""

import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from speakerkit import distributed  # noqa: E402
from speakerkit.dataLoader import CropMaker, collate  # noqa: E402
from speakerkit.lists import read_shard_list  # noqa: E402
from speakerkit.loss import AAMsoftmax  # noqa: E402
from speakerkit.model import build_encoder, crop_samples  # noqa: E402
from speakerkit.shards import ShardDataset, steps_per_epoch  # noqa: E402
from speakerkit.trainer import SpeakerModel, TrainingStep, adam  # noqa: E402

BATCH = 3


def tiny_model(classes):
    torch.manual_seed(0)
    return SpeakerModel(build_encoder('ecapa-tdnn', 16, 16000), AAMsoftmax(classes, 0.2, 30, 192))


def main():
    out, shard_path = sys.argv[1:3]
    distributed.setup('cpu')
    try:
        shard_list = read_shard_list(shard_path)
        crops = CropMaker(crop_samples(40, 16000), 16000, None, len(shard_list.speakers))
        steps = steps_per_epoch(shard_list, BATCH, distributed.world_size())
        dataset = ShardDataset(shard_list, crops, 3, BATCH, steps, distributed.world_size(), distributed.rank())
        batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=collate)))
        (waveforms,), labels = batch.views, batch.labels
        model = tiny_model(len(shard_list.speakers))
        initial = copy.deepcopy(model.state_dict())
        step = TrainingStep(model, adam(model.parameters(), 1e-3), 'cpu', spec_augment=False)
        step(batch, np.random.default_rng(0))
        torch.save({'initial': initial, 'waveforms': waveforms, 'labels': labels,
                    'gradients': {n: p.grad for n, p in model.named_parameters()}},
                   os.path.join(out, f'rank{distributed.rank()}.pt'))
    finally:
        distributed.cleanup()


if __name__ == '__main__':
    main()
