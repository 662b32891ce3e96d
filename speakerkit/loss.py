"""Training heads and objectives. `build_objective` is the one place that turns `--mode/--loss` into one."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from speakerkit.distributed import gather_batch


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

    def set_margin(self, m):
        self.m = m

    def forward(self, x, label):
        cosine = F.linear(F.normalize(x.float()), F.normalize(self.weight.float()))
        target = label[:, None] == torch.arange(cosine.size(1), device=label.device)[None, :]
        logits = self.s * torch.where(target, additive_angular_margin(cosine, self.m), cosine)
        loss = F.cross_entropy(logits, label)
        accuracy = (cosine.argmax(dim=1) == label).float().mean() * 100
        return loss, accuracy


class InfoNCE(nn.Module):
    """Symmetric InfoNCE over a batch of pairs: u_i and v_i are two views of speaker i, every v_j (j != i) a
    negative for u_i and vice versa. Logits are scale * cos(u_i, v_j), the scale exp(t) with a learnable t
    initialised to log(1 / 0.07) and clamped to at most 100 (or a fixed `scale`). With `margin` > 0
    (AAM-InfoNCE) each positive cosine cos(theta) becomes cos(theta + margin) before scaling.
    `forward(u, v)` returns (loss, logits [B, B] with the margin applied)."""

    INITIAL_SCALE = 1 / 0.07
    MAX_SCALE = 100.0

    def __init__(self, margin=0.0, scale=None):
        super().__init__()
        self.margin = margin
        self.fixed_scale = scale
        if scale is None:
            self.log_scale = nn.Parameter(torch.tensor(math.log(self.INITIAL_SCALE)))

    def scale(self):
        """The logit scale: a float when fixed, else exp of the clamped learnable log-scale (a tensor)."""
        if self.fixed_scale is not None:
            return float(self.fixed_scale)
        return self.log_scale.clamp(max=math.log(self.MAX_SCALE)).exp()

    def forward(self, u, v):
        cosine = F.normalize(u.float()) @ F.normalize(v.float()).T
        if self.margin > 0:
            diagonal = torch.eye(len(cosine), dtype=torch.bool, device=cosine.device)
            cosine = torch.where(diagonal, additive_angular_margin(cosine, self.margin), cosine)
        logits = self.scale() * cosine
        targets = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        return loss, logits


def sample_hard_negatives(logits, labels, argmax=False):
    """For each row i of `logits` [B, B] (anchor i against candidate j), a candidate of another speaker,
    drawn with probability softmax_j(logits[i, j]) over the other speakers' candidates (or the most
    similar one with `argmax`). Draws use torch's global generator."""
    other_speaker = labels[:, None] != labels[None, :]
    torch._assert_async(other_speaker.any(dim=1).all(), 'hard-negative sampling needs another speaker per anchor')
    masked = logits.detach().masked_fill(~other_speaker, float('-inf'))
    if argmax:
        return masked.argmax(dim=1)
    return torch.multinomial(torch.softmax(masked, dim=1), 1).squeeze(1)


class PairMatchingHead(nn.Module):
    """Scores whether (anchor, candidate) embeddings come from one speaker: the anchor attends over the two
    embeddings of its own pair only (multi-head attention, sequence of length 2), a residual and ReLU, then a
    2-way linear classifier. Returns logits [N, 2] (class 1: same speaker)."""

    def __init__(self, embedding_dim, heads=4):
        super().__init__()
        self.attention = nn.MultiheadAttention(embedding_dim, heads, batch_first=True)
        self.classifier = nn.Linear(embedding_dim, 2)

    def forward(self, anchor, candidate):
        query = anchor.unsqueeze(1)
        pair = torch.stack((anchor, candidate), dim=1)
        attended, _ = self.attention(query, pair, pair, need_weights=False)
        return self.classifier(F.relu(anchor + attended.squeeze(1)))


class JointObjective(nn.Module):
    """Training objective of the contrastive modes, on two views u, v of B distinct speakers:

      classifier_weight * AAM-softmax(u)          (joint supervision; its weight is `self.weight`)
    + contrastive_weight * InfoNCE or AAM-InfoNCE(u, v)
    + matching_weight * cross-entropy of the pair-matching head on (u_i, v_i) positives and, for each
      anchor in both directions, one hard negative (mode blip only).

    A term with weight 0 is left out and its parameters are not created. Under torchrun the contrastive and
    matching terms see the views of every process's batch (`gather_batch`), unless `local_negatives`; the
    classifier term sees this process's. `forward(u, v, labels)` returns (loss, accuracy): the classifier's
    accuracy when it exists, else how often u_i's nearest v is v_i."""

    def __init__(self, n_class, embedding_dim, m, s, classifier_weight, contrastive_weight, loss, fixed_scale,
                 matching_weight=0.0, hard_negative='softmax', local_negatives=False):
        super().__init__()
        self.local_negatives = local_negatives
        self.classifier_weight = classifier_weight
        self.contrastive_weight = contrastive_weight
        self.matching_weight = matching_weight
        self.hard_negative = hard_negative
        if classifier_weight > 0:
            self.classifier = AAMsoftmax(n_class, m, s, embedding_dim)
        self.contrastive_margin = loss == 'aam_infonce'
        if contrastive_weight > 0 or matching_weight > 0:
            # Without the contrastive term a learnable scale would get no gradient (and DistributedDataParallel
            # would wait for one): the hard negatives are then drawn at the scale it starts from.
            learnable = contrastive_weight > 0 and not fixed_scale
            self.contrastive = InfoNCE(m if self.contrastive_margin else 0.0,
                                       None if learnable else (s if fixed_scale else InfoNCE.INITIAL_SCALE))
        if matching_weight > 0:
            self.matching = PairMatchingHead(embedding_dim)

    def set_margin(self, m):
        """The angular margin of the classifier and, with aam_infonce, of the positives (--margin_schedule)."""
        if self.classifier_weight > 0:
            self.classifier.set_margin(m)
        if self.contrastive_margin and hasattr(self, 'contrastive'):
            self.contrastive.margin = m

    def forward(self, u, v, labels):
        total = u.new_zeros((), dtype=torch.float32)
        accuracy = None
        if self.classifier_weight > 0:
            loss, accuracy = self.classifier(u, labels)
            total = total + self.classifier_weight * loss
        if self.contrastive_weight > 0 or self.matching_weight > 0:
            if not self.local_negatives:
                u, v, labels = gather_batch(u, v, labels)
            loss, logits = self.contrastive(u, v)
            if self.contrastive_weight > 0:
                total = total + self.contrastive_weight * loss
            if accuracy is None:
                targets = torch.arange(len(logits), device=logits.device)
                accuracy = (logits.argmax(dim=1) == targets).float().mean() * 100
            if self.matching_weight > 0:
                total = total + self.matching_weight * self.matching_loss(u, v, logits, labels)
        return total, accuracy

    def matching_loss(self, u, v, logits, labels):
        argmax = self.hard_negative == 'argmax'
        negative_v = sample_hard_negatives(logits, labels, argmax)      # for each u_i, a v of another speaker
        negative_u = sample_hard_negatives(logits.T, labels, argmax)    # for each v_i, a u of another speaker
        anchors = torch.cat((u, u, u[negative_u]))
        candidates = torch.cat((v, v[negative_v], v))
        targets = torch.cat((torch.ones(len(u)), torch.zeros(2 * len(u)))).long().to(u.device)
        return F.cross_entropy(self.matching(anchors.float(), candidates.float()), targets)


def build_objective(args, embedding_dim):
    """The training head for `args.mode` and `args.loss`."""
    if args.mode == 'classifier':
        return AAMsoftmax(args.n_class, args.m, args.s, embedding_dim)
    return JointObjective(args.n_class, embedding_dim, args.m, args.s, args.classifier_weight,
                          args.contrastive_weight, args.loss, args.fixed_contrastive_scale,
                          args.matching_weight if args.mode == 'blip' else 0.0, args.hard_negative,
                          args.local_negatives)
