"""Training heads and objectives. `build_objective` is the one place that turns `--mode/--loss` into one."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def additive_angular_margin(cosine, margin):
    """cos(theta + margin) for theta = arccos(cosine), continued as cos(theta) - margin * sin(margin)
    where theta + margin would pass pi, so the result keeps decreasing in theta."""
    sine = torch.sqrt((1.0 - cosine * cosine).clamp(0, 1))
    shifted = cosine * math.cos(margin) - sine * math.sin(margin)
    threshold = math.cos(math.pi - margin)
    return torch.where(cosine > threshold, shifted, cosine - math.sin(math.pi - margin) * margin)


class AAMsoftmax(nn.Module):
    """Additive angular margin softmax: logits s * cos(theta_y + m) for the true class, s * cos(theta_j)
    for the others. `forward(x, label)` returns (loss, top-1 accuracy in percent); the accuracy is that of
    the plain cosine classifier, without the margin."""

    def __init__(self, n_class, m, s, embedding_dim=192):
        super().__init__()
        self.m = m
        self.s = s
        self.weight = nn.Parameter(torch.empty(n_class, embedding_dim))
        nn.init.xavier_normal_(self.weight, gain=1)

    def forward(self, x, label):
        cosine = F.linear(F.normalize(x.float()), F.normalize(self.weight.float()))
        target = F.one_hot(label, cosine.size(1)).bool()
        logits = self.s * torch.where(target, additive_angular_margin(cosine, self.m), cosine)
        loss = F.cross_entropy(logits, label)
        accuracy = (cosine.argmax(dim=1) == label).float().mean() * 100
        return loss, accuracy


def build_objective(args, embedding_dim):
    """The training head for `args.mode`/`args.loss`; only the classifier mode exists so far."""
    if args.mode == 'classifier':
        return AAMsoftmax(args.n_class, args.m, args.s, embedding_dim)
    raise ValueError(f"--mode {args.mode} is not implemented")
