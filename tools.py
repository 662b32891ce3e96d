"""The trial path, embed -> score -> normalise -> EER/minDCF (`evaluate`), and the notebook helpers (load a
checkpoint, embed a file, score two files) and export.

Evaluation protocol (as the original ECAPA-TDNN code scores VoxCeleb): each utterance gets a full-length
embedding f and the embeddings c_1..c_5 of five evenly spaced 3 s crops, all L2-normalised; a trial scores
(f_e . f_t + mean_ij c_ei . c_tj) / 2. Since mean_ij c_ei . c_tj = mean_i c_ei . mean_j c_tj, each utterance
is stored as one vector v = [f, mean_i c_i] / sqrt(2), and a trial's score is the dot product v_e . v_t.
"""

import copy
import dataclasses
import hashlib
import importlib.util
import math
import os
import pickle
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

import distributed
from checkpoints import (atomic_torch_save, atomic_write, encoder_config_path, encoder_weights, load_state_dict_file,
                         mismatches, read_encoder_config)
from dataLoader import (CUT_SHORT, LOWEST_FILE_RATE, MIN_SECONDS, NEAR_SILENT, EvalDataset, audio_problem,
                        leave_signals_to_parent, near_silent, read_audio, resample, wrap_pad)
from errors import UserError
from model import ConvMelSpectrogram, architecture_of, build_encoder, crop_samples

EVAL_CROPS = 5
EVAL_CROP_FRAMES = 300


# ---------------------------------------------------------------- metrics

def operating_points(scores, labels):
    """Miss and false-alarm rates when accepting scores >= t, for t at every distinct score and beyond
    the largest (reject all). The first point accepts all trials: (P_miss, P_fa) = (0, 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be 1-D and equally long")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (non-target) or 1 (target)")
    labels = labels.astype(np.int64)
    n_target = int(labels.sum())
    n_nontarget = len(labels) - n_target
    if n_target == 0 or n_nontarget == 0:
        raise ValueError("need at least one target and one non-target trial")
    order = np.argsort(scores, kind='mergesort')
    sorted_scores, sorted_labels = scores[order], labels[order]
    targets_below = np.concatenate(([0], np.cumsum(sorted_labels)))
    nontargets_below = np.arange(len(labels) + 1) - targets_below
    boundaries = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1], True])
    p_miss = targets_below[boundaries] / n_target
    p_fa = (n_nontarget - nontargets_below[boundaries]) / n_nontarget
    return p_miss, p_fa


def compute_eer(scores, labels):
    """Equal error rate in percent: where P_miss - P_fa changes sign, interpolated linearly between the
    two operating points on either side."""
    p_miss, p_fa = operating_points(scores, labels)
    diff = p_miss - p_fa
    after = int(np.flatnonzero(diff >= 0)[0])
    if diff[after] == 0:
        return 100.0 * p_miss[after]
    before = after - 1
    alpha = -diff[before] / (diff[after] - diff[before])
    return 100.0 * (p_miss[before] + alpha * (p_miss[after] - p_miss[before]))


def compute_min_dcf(scores, labels, p_target, c_miss=1, c_fa=1):
    """Minimum over all thresholds (accept-all and reject-all included) of
    c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target), divided by min(c_miss * p_target,
    c_fa * (1 - p_target))."""
    p_miss, p_fa = operating_points(scores, labels)
    cost = c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


DCF_TARGET_PRIORS = (0.05, 0.01)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """EER in percent and the minimum normalised DCF at each of DCF_TARGET_PRIORS (c_miss = c_fa = 1)."""
    eer: float
    min_dcf: dict  # target prior -> minDCF

    def text(self):
        return f'EER {self.eer:2.2f}%, ' + ', '.join(f'minDCF({p}) {v:.4f}' for p, v in self.min_dcf.items())

    def as_record(self):
        """As metrics.jsonl stores it: {'eer', 'min_dcf_0.05', 'min_dcf_0.01'}."""
        return {'eer': self.eer, **{f'min_dcf_{p}': v for p, v in self.min_dcf.items()}}


def verification_metrics(scores, labels):
    return Metrics(float(compute_eer(scores, labels)),
                   {p: compute_min_dcf(scores, labels, p) for p in DCF_TARGET_PRIORS})


# ---------------------------------------------------------------- embedding and scoring

def evenly_spaced_crops(waveform, length, count=EVAL_CROPS):
    """`count` windows of `length` samples at evenly spaced starts (wrap-padded when too short)."""
    waveform = torch.from_numpy(wrap_pad(waveform.numpy(), length))
    starts = np.linspace(0, len(waveform) - length, num=count).astype(np.int64)
    return torch.stack([waveform[s:s + length] for s in starts])


@torch.no_grad()
def _embed_equal_length(encoder, waveforms, device, max_samples):
    """Normalised embeddings of equally long waveforms [N, T]; inputs longer than `max_samples` are cut
    into equal chunks whose normalised embeddings are averaged. A forward pass takes one waveform or at most
    `max_samples` of chunks, so memory stays bounded by the longest pass."""
    length = waveforms.shape[1]
    chunks = max(1, math.ceil(length / max_samples))
    piece = length // chunks
    pieces = waveforms[:, :piece * chunks].reshape(len(waveforms) * chunks, piece)
    per_pass = len(pieces) if chunks == 1 else max(1, max_samples // piece)
    embeddings = torch.cat([F.normalize(encoder(pieces[i:i + per_pass].to(device), False).float(), dim=1).cpu()
                            for i in range(0, len(pieces), per_pass)])
    return F.normalize(embeddings.view(len(waveforms), chunks, -1).mean(dim=1), dim=1)


@torch.no_grad()
def whole_embeddings(encoder, waveforms, device):
    """The encoder's embedding of each whole 1-D waveform, [N, D], unnormalised: what `--extract` writes and the
    exported models compute. Equally long waveforms share a forward pass; nothing is padded."""
    embeddings = [None] * len(waveforms)
    for indices in indices_by_length(waveforms).values():
        batch = torch.stack([waveforms[i] for i in indices]).to(device)
        for i, embedding in zip(indices, encoder(batch, False).float().cpu()):
            embeddings[i] = embedding
    return torch.stack(embeddings)


def indices_by_length(waveforms):
    by_length = {}
    for i, w in enumerate(waveforms):
        by_length.setdefault(len(w), []).append(i)
    return by_length


@torch.no_grad()
def protocol_vectors_of(encoder, waveforms, device, max_seconds=60.0, whole=None):
    """The protocol vectors v = [f, mean crops] / sqrt(2) of a list of 1-D waveforms, as [N, 2D]. f is the
    normalised `whole_embeddings` (taken from `whole` when given) of a waveform up to `max_seconds`; a longer
    one is cut into equal chunks whose normalised embeddings are averaged, so memory stays bounded."""
    rate = encoder.sampling_rate
    crop_length = crop_samples(EVAL_CROP_FRAMES, rate)
    max_samples = int(max_seconds * rate)
    crops = torch.cat([evenly_spaced_crops(w, crop_length) for w in waveforms])
    crop_embeddings = F.normalize(encoder(crops.to(device), False).float(), dim=1).cpu()
    crop_mean = crop_embeddings.view(len(waveforms), EVAL_CROPS, -1).mean(dim=1)
    full = torch.empty_like(crop_mean)
    for length, indices in indices_by_length(waveforms).items():
        if whole is not None and length <= max_samples:
            full[indices] = F.normalize(whole[indices], dim=1)
        else:
            full[indices] = _embed_equal_length(encoder, torch.stack([waveforms[i] for i in indices]), device,
                                                max_samples)
    return torch.cat((full, crop_mean), dim=1) / math.sqrt(2)


def embeddings_and_protocol_vectors(encoder, waveforms, device):
    """[`whole_embeddings`, `protocol_vectors_of`] side by side, [N, 3D], the whole utterance embedded once."""
    whole = whole_embeddings(encoder, waveforms, device)
    return torch.cat((whole, protocol_vectors_of(encoder, waveforms, device, whole=whole)), dim=1)


def transpose(items):
    """[(name, waveform, problem), ...] -> ([names], [waveforms], [problems]): a batch of unequal lengths."""
    return tuple(list(column) for column in zip(*items))


class Autocast(torch.nn.Module):
    """A copy of `encoder` run under `dtype` autocast on its input's device, its output float32; its features
    stay float32 (`model.Encoder.features` turns autocast off). Its convolutions and linear layers hold their
    weights in `dtype` already: the values autocast would cast them to at every call, cast once. For
    --eval_precision bf16: on CPUs with AMX or AVX-512 BF16 the evaluation is faster, and vectors move by about
    1e-3 (bench/RESULTS.md)."""

    def __init__(self, encoder, dtype=torch.bfloat16):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        for name, module in self.encoder.named_modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and \
                    not name.startswith('torchfbank'):
                module.to(dtype)
        self.dtype = dtype
        self.sampling_rate = encoder.sampling_rate
        self.embedding_dim = encoder.embedding_dim

    def forward(self, x, aug=False):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.encoder(x, aug).float()


def embed_files(encoder, relative_paths, root, device, n_cpu=0, batch_size=None, progress=True, unusable=None,
                represent=protocol_vectors_of):
    """`represent(encoder, waveforms, device)` (the protocol vectors) of every file, read by `n_cpu` loader
    workers, `batch_size` files a forward pass (default: 16 on a GPU; one on the CPU, where larger batches
    measured slower, bench/RESULTS.md); returns {relative path: vector}.

    A file that cannot be embedded (unreadable, shorter than a window, NaN samples, or giving a non-finite
    embedding) is a `UserError` naming every such file, or, given an `unusable` list, is appended to it as
    (path, why) and left out. Near-silent files are embedded and reported on stdout (with `progress`): all-zero
    files all get the same vector, so two of them score 1.0, and fainter files come closer to it."""
    encoder.eval()
    dataset = EvalDataset(relative_paths, root, encoder.sampling_rate)
    batch_size = batch_size or (16 if torch.device(device).type == 'cuda' else 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=n_cpu,
                                         collate_fn=transpose, worker_init_fn=leave_signals_to_parent)
    vectors, problems, noted = {}, [], {NEAR_SILENT: [], CUT_SHORT: []}
    with tqdm.tqdm(total=len(dataset), desc='embedding', unit='utt', disable=not progress) as bar:
        for names, waveforms, found in loader:
            for name, problem in zip(names, found):
                if problem in noted:
                    noted[problem].append(name)
                elif problem is not None:
                    problems.append((name, problem))
            usable = [i for i, problem in enumerate(found) if problem is None or problem in noted]
            if usable:
                batch = represent(encoder, [waveforms[i] for i in usable], device)
                for i, vector in zip(usable, batch):
                    if torch.isfinite(vector).all():
                        vectors[names[i]] = vector
                    else:
                        problems.append((names[i], 'its embedding is not finite: are the weights?'))
            bar.update(len(names))
    silent, long = noted[NEAR_SILENT], noted[CUT_SHORT]
    if silent and progress:
        print(f'{root}: {len(silent)} files are {NEAR_SILENT}, e.g. {", ".join(silent[:3])}: they hold next to '
              f'nothing of a speaker, and all-zero files score 1.0 against each other', flush=True)
    if long and progress:
        print(f'{root}: {len(long)} files are {CUT_SHORT}, e.g. {", ".join(long[:3])}', flush=True)
    if problems and unusable is None:
        raise unembeddable(root, problems)
    if unusable is not None:
        unusable += problems
    return vectors


def unembeddable(root, problems):
    """The `UserError` for files of `root` that cannot be embedded, [(path, why), ...]."""
    return UserError(f'{root}: {len(problems)} files cannot be embedded, e.g. '
                     + '; '.join(f'{name} ({why})' for name, why in problems[:3]))


def score_trials(vectors, enroll, test):
    """Raw scores v_e . v_t for each trial."""
    e = torch.stack([vectors[name] for name in enroll])
    t = torch.stack([vectors[name] for name in test])
    return (e * t).sum(dim=1).numpy()


def cohort_statistics(rows, cohort, top_k, row_chunk=1024, cohort_chunk=65536):
    """Mean and population standard deviation (float64) of the `top_k` largest scores of each row against
    the cohort, from products of at most `row_chunk` x `cohort_chunk`, merging partial top-k lists, so
    memory stays bounded for any cohort size."""
    rows = torch.as_tensor(rows, dtype=torch.float32)
    cohort = torch.as_tensor(cohort, dtype=torch.float32)
    top_k = min(top_k, len(cohort))
    mean = np.empty(len(rows))
    std = np.empty(len(rows))
    for start in range(0, len(rows), row_chunk):
        block = rows[start:start + row_chunk]
        best = None
        for c in range(0, len(cohort), cohort_chunk):
            scores = (block @ cohort[c:c + cohort_chunk].T).numpy()
            if best is not None:
                scores = np.concatenate((best, scores), axis=1)
            k = min(top_k, scores.shape[1])
            best = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:]
        best = best.astype(np.float64)
        mean[start:start + row_chunk] = best.mean(axis=1)
        std[start:start + row_chunk] = best.std(axis=1)
    return torch.from_numpy(mean), torch.from_numpy(std)


def as_norm(embeddings, trials, cohort, top_k):
    """Adaptive symmetric score normalisation. `embeddings` [N, D], `trials` int [T, 2] rows of
    (enroll, test), `cohort` [M, D]. For each side x of a trial with raw score s = e . t, take the
    `top_k` largest scores of x against the cohort, their mean mu_x and population std sigma_x, and
    return 0.5 * ((s - mu_e) / sigma_e + (s - mu_t) / sigma_t) for every trial. The statistics are computed
    once per utterance that occurs in a trial (float32 products, float64 statistics), then looked up."""
    embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
    trials = torch.as_tensor(trials, dtype=torch.long)
    used, inverse = torch.unique(trials.flatten(), return_inverse=True)
    mean, std = cohort_statistics(embeddings[used], cohort, top_k)
    inverse = inverse.view(-1, 2)
    normalised = np.empty(len(trials))
    for start in range(0, len(trials), 65536):
        pairs, sides = trials[start:start + 65536], inverse[start:start + 65536]
        raw = (embeddings[pairs[:, 0]] * embeddings[pairs[:, 1]]).sum(dim=1, dtype=torch.float64)
        z_e = (raw - mean[sides[:, 0]]) / std[sides[:, 0]]
        z_t = (raw - mean[sides[:, 1]]) / std[sides[:, 1]]
        normalised[start:start + 65536] = (0.5 * (z_e + z_t)).numpy()
    return normalised


def build_cohort(vectors, entries, kind):
    """The AS-Norm cohort from the vectors of training utterances (`lists.TrainEntry`): their speaker means
    (`kind` 'speaker') or the vectors themselves ('utterance'), as [M, D]."""
    if kind == 'utterance':
        return torch.stack([vectors[entry.path] for entry in entries])
    by_speaker = {}
    for entry in entries:
        by_speaker.setdefault(entry.speaker, []).append(vectors[entry.path])
    return torch.stack([torch.stack(v).mean(dim=0) for _, v in sorted(by_speaker.items())])


def file_stamp(path):
    """What identifies a file's content for the embedding cache: its size and modification time (ns)."""
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns]


def read_embedding_cache(cache_path, identity, root):
    """The cache stored for this checkpoint `identity` and `root`, or an empty one when there is none (or an
    unreadable one, which is then rebuilt)."""
    empty = {'identity': identity, 'root': root, 'paths': [], 'stamps': [], 'vectors': None}
    try:
        stored = torch.load(cache_path, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError):
        return empty
    if not isinstance(stored, dict) or stored.get('identity') != identity or stored.get('root') != root or \
            'stamps' not in stored:
        return empty  # another checkpoint's, or written before files were stamped
    return stored


def cached_embed_files(encoder, relative_paths, root, device, cache_dir, identity, **kwargs):
    """`embed_files`, reusing the vectors stored under `cache_dir` for this `identity` (the checkpoint) and
    `root`, in a file named by both, and storing there the ones it computes. A vector is reused only while its
    file has the size and modification time it had when it was embedded."""
    root = os.path.abspath(root)
    cache_path = os.path.join(cache_dir, hashlib.sha1(f'{identity} {root}'.encode()).hexdigest()[:16] + '.pt')
    cache = read_embedding_cache(cache_path, identity, root)
    stamps = {p: file_stamp(os.path.join(root, p)) for p in relative_paths}
    index = {p: i for i, p in enumerate(cache['paths'])}
    missing = [p for p in stamps if p not in index or cache['stamps'][index[p]] != stamps[p]]
    if missing:
        computed = embed_files(encoder, missing, root, device, **kwargs)
        new = [p for p in missing if p not in index]
        if new:
            rows = torch.stack([computed[p] for p in new])
            cache['vectors'] = rows if cache['vectors'] is None else torch.cat((cache['vectors'], rows))
            index.update((p, len(cache['paths']) + i) for i, p in enumerate(new))
            cache['paths'] += new
            cache['stamps'] += [None] * len(new)
        for p in missing:  # new ones, and changed files' fresh vectors over their stale ones
            cache['vectors'][index[p]] = computed[p]
            cache['stamps'][index[p]] = stamps[p]
        atomic_torch_save(cache, cache_path)
    return {p: cache['vectors'][index[p]] for p in relative_paths}


# ---------------------------------------------------------------- evaluation of trial lists

@dataclasses.dataclass(frozen=True)
class Cohort:
    """AS-Norm settings: the training `entries` (`lists.TrainEntry`) under `root` whose vectors form the
    cohort, as speaker means or single utterances (`kind`), and the top scores used."""
    entries: list
    root: str
    kind: str
    top_k: int


@dataclasses.dataclass
class ListResult:
    """One trial list scored: raw scores and, with AS-Norm, normalised ones; metrics are None without labels."""
    trials: object  # lists.TrialList
    scores: np.ndarray
    metrics: Metrics | None = None
    snorm_scores: np.ndarray | None = None
    snorm_metrics: Metrics | None = None

    def score_sets(self):
        """(name suffix, scores, metrics) for the raw scores and, with AS-Norm, the normalised ones."""
        sets = [('', self.scores, self.metrics)]
        if self.snorm_scores is not None:
            sets.append(('_asnorm', self.snorm_scores, self.snorm_metrics))
        return sets

    def text(self):
        if self.metrics is None:
            return f'{len(self.scores)} trials scored (no labels)'
        return self.metrics.text() + (f', AS-Norm {self.snorm_metrics.text()}' if self.snorm_metrics else '')


def embed_for(encoder, files, root, device, n_cpu=0, cache_dir=None, identity=None):
    """{file: protocol vector}. Under torchrun each process embeds every world_size-th file and all of them
    receive every vector; otherwise, given a `cache_dir` and the checkpoint's `identity`, vectors are cached."""
    if distributed.world_size() > 1:  # every process raises alike, none is left waiting for the others
        unusable = []
        part = embed_files(encoder, files[distributed.rank()::distributed.world_size()], root, device,
                           n_cpu=n_cpu, progress=distributed.is_main(), unusable=unusable)
        gathered = distributed.gather_objects((part, unusable))
        problems = [problem for _, found in gathered for problem in found]
        if problems:
            raise unembeddable(root, problems)
        return {name: vector for vectors, _ in gathered for name, vector in vectors.items()}
    if identity is None:
        return embed_files(encoder, files, root, device, n_cpu=n_cpu)
    return cached_embed_files(encoder, files, root, device, cache_dir, identity, n_cpu=n_cpu)


def evaluate(encoder, trial_lists, eval_path, device, n_cpu=0, cohort=None, cache_dir=None, identity=None):
    """Score each `lists.TrialList`, embedding each utterance once (`embed_for`), with AS-Norm against
    `cohort` when one is given. Returns {list path: ListResult}."""
    files = sorted({f for trials in trial_lists for f in trials.enroll + trials.test})
    vectors = embed_for(encoder, files, eval_path, device, n_cpu, cache_dir, identity)
    results = {trials.path: ListResult(trials, score_trials(vectors, trials.enroll, trials.test))
               for trials in trial_lists}
    if cohort is not None:
        cohort_vectors = embed_for(encoder, [entry.path for entry in cohort.entries], cohort.root, device, n_cpu,
                                   cache_dir, identity)
        index = {name: i for i, name in enumerate(files)}
        pairs = np.array([(index[e], index[t]) for trials in trial_lists for e, t in zip(trials.enroll, trials.test)])
        normalised = as_norm(torch.stack([vectors[f] for f in files]), pairs,
                             build_cohort(cohort_vectors, cohort.entries, cohort.kind), cohort.top_k)
        start = 0
        for result in results.values():
            result.snorm_scores = normalised[start:start + len(result.scores)]
            start += len(result.scores)
    for result in results.values():
        labels = result.trials.labels
        if labels is not None:
            result.metrics = verification_metrics(result.scores, labels)
            if result.snorm_scores is not None:
                result.snorm_metrics = verification_metrics(result.snorm_scores, labels)
    return results


# ---------------------------------------------------------------- notebook helpers

def load_model(path, model=None, C=None, sampling_rate=None, device='cpu'):
    """An encoder in eval mode from a checkpoint (this toolkit's or the original ECAPA-TDNN code's). The
    architecture comes from the JSON written beside the checkpoint or, without one, from the weights' names and
    shapes (`model.architecture_of`; what it found is printed); `model`, `C` and `sampling_rate`, when given,
    override either."""
    weights = encoder_weights(load_state_dict_file(path))
    if os.path.exists(encoder_config_path(path)):
        config = {'embedding_dim': None, **read_encoder_config(path)}
    else:
        config = architecture_of(weights)
        if config is None:
            config = {'model': 'ecapa-tdnn', 'C': 1024, 'sampling_rate': 16000, 'embedding_dim': None}
        else:
            print(f'{path}: no {os.path.basename(encoder_config_path(path))} beside it; its weights are those of '
                  f'{config["model"]} C={config["C"]}, embedding {config["embedding_dim"]}, '
                  f'{config["sampling_rate"]} Hz')
    config.update({k: v for k, v in (('model', model), ('C', C), ('sampling_rate', sampling_rate)) if v})
    encoder = build_encoder(config['model'], config['C'], config['sampling_rate'], config['embedding_dim'])
    try:
        encoder.load_state_dict(weights)
    except RuntimeError:
        problems = '; '.join(mismatches(encoder.state_dict(), weights))
        raise UserError(f'{path}: does not fit a {type(encoder).__name__} with {config} (give --model, --C or '
                        f'--sampling_rate where the checkpoint has no JSON beside it): {problems}') from None
    return encoder.to(device).eval()


def pcm_full_scale(samples):
    """The full scale of integer PCM `samples`: 2**15 for int16, and for wider types holding values in int16's
    range (what `np.array` of Python ints or `torch.tensor` make of 16-bit samples); 2**31 for other int32
    (soundfile's 32-bit PCM). Wider values in an int64 array say nothing of their scale: a `ValueError`."""
    if samples.dtype.itemsize == 1:
        return float(2 ** 7)
    peak = int(np.abs(samples.astype(np.int64)).max()) if samples.size else 0
    if samples.dtype.itemsize == 2 or peak <= 2 ** 15:
        return float(2 ** 15)
    if samples.dtype.itemsize == 4:
        return float(2 ** 31)
    raise ValueError(f'{samples.dtype} samples beyond the 16-bit range (peak {peak}): give them as int16 or int32 '
                     f'PCM, or as floats in [-1, 1]')


def as_recordings(audio, sampling_rate, rate, lengths=None, channels=False):
    """(1-D float32 waveforms at `rate`, whether `audio` was one recording) for `embed`; see there."""
    if isinstance(audio, (list, tuple)):
        if lengths is not None or not audio:
            raise ValueError('give lengths with a [N, T] batch, not a list' if audio else 'an empty list')
        if any(isinstance(item, (list, tuple)) for item in audio):  # its recordings would be cut to the first
            raise ValueError('a list of paths and waveforms (arrays or tensors), not of lists')
        return [as_recordings(item, sampling_rate, rate, channels=True)[0][0] for item in audio], False
    if isinstance(audio, (str, os.PathLike)):
        return [checked_waveform(read_audio(audio, rate), os.fspath(audio), rate, rate)], True
    if isinstance(audio, torch.Tensor):  # bfloat16 and float16 have no numpy counterpart of use here
        audio = audio.detach().cpu()
        samples = (audio.float() if audio.is_floating_point() else audio).numpy()
    else:
        samples = np.asarray(audio)
    if sampling_rate is None:
        raise ValueError(f'give the sampling_rate of a waveform (the model takes {rate} Hz)')
    sampling_rate = checked_rate(sampling_rate)
    if np.issubdtype(samples.dtype, np.signedinteger):
        samples = samples / pcm_full_scale(samples)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f'a waveform of {samples.dtype}: give float or signed integer samples')
    samples = samples.astype(np.float32)
    if samples.ndim == 2 and (channels or samples.shape[0] > samples.shape[1]):
        samples = samples.mean(axis=1 if samples.shape[0] > samples.shape[1] else 0)
    if samples.ndim == 1:
        if lengths is not None:
            raise ValueError('lengths are for a [N, T] batch')
        return [checked_waveform(samples, 'the waveform', sampling_rate, rate)], True
    if samples.ndim != 2:
        raise ValueError(f'a waveform of shape {list(samples.shape)}: give [T], [T, C], [C, T] or [N, T]')
    lengths = [samples.shape[1]] * len(samples) if lengths is None else [int(n) for n in lengths]
    if len(lengths) != len(samples) or not all(0 <= n <= samples.shape[1] for n in lengths):
        raise ValueError(f'lengths {lengths} do not fit a batch of shape {list(samples.shape)}')
    return [checked_waveform(row[:n], f'row {i} of the batch', sampling_rate, rate)
            for i, (row, n) in enumerate(zip(samples, lengths))], False


def checked_rate(sampling_rate):
    """`sampling_rate` as an int: a whole number of Hz, at least the lowest rate of usable audio."""
    whole = isinstance(sampling_rate, (int, np.integer)) or (isinstance(sampling_rate, (float, np.floating))
                                                             and float(sampling_rate).is_integer())
    if isinstance(sampling_rate, bool) or not whole or sampling_rate < LOWEST_FILE_RATE:
        raise ValueError(f'sampling_rate must be a whole number of Hz, at least {LOWEST_FILE_RATE}; got '
                         f'{sampling_rate!r}')
    return int(sampling_rate)


def checked_waveform(waveform, name, sampling_rate, rate):
    """`waveform` resampled to `rate` as a tensor, wrap-padded to one analysis window (as training pads short
    files); a ValueError naming it when it is empty or not finite, a warning when it is near silent."""
    problem = audio_problem(waveform, skip_silent=False)
    if problem:
        raise ValueError(f'{name}: {problem}')
    if near_silent(waveform):
        warnings.warn(f'{name}: {NEAR_SILENT}; it holds next to nothing of a speaker', stacklevel=4)
    waveform = resample(np.ascontiguousarray(waveform), sampling_rate, rate)
    return torch.from_numpy(np.ascontiguousarray(wrap_pad(waveform, math.ceil(MIN_SECONDS * rate))))


def embed(encoder, audio, sampling_rate=None, lengths=None, channels=False):
    """The encoder's embedding of whole utterances (192-d for ECAPA-TDNN, unnormalised): the vector `--extract`
    writes and the exported TorchScript and ONNX models compute. `audio` is
      - a path (wav, flac, ... read by libsndfile; m4a, mp3 and other FFmpeg formats by PyAV),
      - a waveform at `sampling_rate` (resampled to the model's), numpy or torch, float or integer PCM:
        [T]; or 2-D with time on the longer axis: [T, C] (soundfile.read's layout) is one recording whose
        channels are averaged; [N, T] is a batch of N waveforms, one per row, of `lengths[i]` samples each
        when given; with `channels=True` the rows of [C, T] are instead the channels of one recording
        (torchaudio.load's layout), averaged;
      - or a list of paths and waveforms, one recording each.
    Returns [D] for one recording, [N, D] for a batch or a list. Inputs shorter than one 25 ms window are
    wrap-padded to it; an empty or non-finite input is a ValueError naming it, a missing file a
    FileNotFoundError; near-silent input warns."""
    encoder.eval()
    waveforms, single = as_recordings(audio, sampling_rate, encoder.sampling_rate, lengths, channels)
    embeddings = whole_embeddings(encoder, waveforms, next(encoder.parameters()).device)
    return embeddings[0] if single else embeddings


def protocol_vectors(encoder, audio, sampling_rate=None, lengths=None, channels=False):
    """The evaluation protocol's vectors (module docstring: the normalised whole-utterance embedding and the
    mean of five 3 s crops, [2D]), whose dot product is the score `--eval` and `score` give; same inputs and
    shapes as `embed`."""
    encoder.eval()
    waveforms, single = as_recordings(audio, sampling_rate, encoder.sampling_rate, lengths, channels)
    vectors = protocol_vectors_of(encoder, waveforms, next(encoder.parameters()).device)
    return vectors[0] if single else vectors


def score(encoder, audio_1, audio_2, sampling_rate=None):
    """The protocol score of two recordings (paths, or waveforms at `sampling_rate`): about 1 for one speaker."""
    return float(protocol_vectors(encoder, audio_1, sampling_rate) @ protocol_vectors(encoder, audio_2, sampling_rate))


# ---------------------------------------------------------------- export

class ExportableEncoder(torch.nn.Module):
    """An eval-mode copy of an encoder with waveform [B, T] in and embedding out (no augmentation), its
    mel front-end computed by convolution so that tracing and ONNX export can follow it."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).cpu().eval()
        self.encoder.torchfbank[1] = ConvMelSpectrogram(self.encoder.torchfbank[1])

    def forward(self, waveform):
        return self.encoder(waveform, False)


def _export_example(encoder):
    return 0.1 * torch.randn(2, 2 * encoder.sampling_rate, generator=torch.Generator().manual_seed(0))


def export_torchscript(encoder, path):
    """A traced TorchScript module, loadable with `torch.jit.load` without this code; any batch and length."""
    module = ExportableEncoder(encoder)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning, message='.*torch.jit')
        traced = torch.jit.trace(module, _export_example(encoder))
        atomic_write(path, lambda f: torch.jit.save(traced, f))


def export_onnx(encoder, path):
    """An ONNX graph (opset 17) with input `waveform` [batch, samples] and output `embedding`."""
    if importlib.util.find_spec('onnx') is None:
        raise UserError(f'{path}: ONNX export needs the onnx package (pip install -r requirements-extras.txt)')
    module = ExportableEncoder(encoder)

    def write(f):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*[Cc]onstant folding')
            torch.onnx.export(module, (_export_example(encoder),), f, input_names=['waveform'],
                              output_names=['embedding'], opset_version=17, dynamo=False,
                              dynamic_axes={'waveform': {0: 'batch', 1: 'samples'}, 'embedding': {0: 'batch'}})
    atomic_write(path, write)
