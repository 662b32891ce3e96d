"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (and once without torchrun): a tiny
encoder in DistributedDataParallel, the contrastive objective on this process's share of 2B pairs, one
backward pass. Writes {loss, gradients} to OUT/rank<r>.pt.

  python tests/ddp_loss_check.py OUT [--local_negatives]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from speakerkit import distributed  # noqa: E402
from speakerkit.loss import JointObjective  # noqa: E402

PAIRS = 8  # over all processes


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(12, 16)
        self.head = JointObjective(PAIRS, 16, 0.2, 30, classifier_weight=0.0, contrastive_weight=1.0,
                                   loss='aam_infonce', fixed_scale=False,
                                   local_negatives='--local_negatives' in sys.argv)

    def forward(self, u, v, labels):
        return self.head(self.encoder(u), self.encoder(v), labels)


def main():
    out = sys.argv[1]
    distributed.setup('cpu')
    try:
        generator = torch.Generator().manual_seed(1)
        u, v = torch.randn(PAIRS, 12, generator=generator), torch.randn(PAIRS, 12, generator=generator)
        labels = torch.arange(PAIRS)
        share = slice(distributed.rank() * PAIRS // distributed.world_size(),
                      (distributed.rank() + 1) * PAIRS // distributed.world_size())
        model = TinyModel()
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed.world_size() > 1 else model
        loss, _ = wrapped(u[share], v[share], labels[share])
        loss.backward()
        torch.save({'loss': loss.detach(), 'gradients': {n: p.grad for n, p in model.named_parameters()}},
                   os.path.join(out, f'rank{distributed.rank()}.pt'))
    finally:
        distributed.cleanup()


if __name__ == '__main__':
    main()
