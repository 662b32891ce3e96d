"""The trial path, embed -> score -> normalise -> EER/minDCF (`evaluate`), from flags (`evaluate_encoder`, used
by training and --eval alike) or from a notebook.

Evaluation protocol (as the original ECAPA-TDNN code scores VoxCeleb): each utterance gets a full-length
embedding f and the embeddings c_1..c_5 of five evenly spaced 3 s crops, all L2-normalised; a trial scores
(f_e . f_t + mean_ij c_ei . c_tj) / 2. Since mean_ij c_ei . c_tj = mean_i c_ei . mean_j c_tj, each utterance
is stored as one vector v = [f, mean_i c_i] / sqrt(2), and a trial's score is the dot product v_e . v_t.
"""

import copy
import dataclasses
import hashlib
import math
import os
import pickle
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

from speakerkit import distributed
from speakerkit.checkpoints import atomic_torch_save
from speakerkit.dataLoader import (CUT_SHORT, NEAR_SILENT, EvalDataset, leave_signals_to_parent, unreadable_headers,
                                   wrap_pad)
from speakerkit.errors import UsageError, UserError
from speakerkit.lists import TrainList, cohort_entries, distinct_names, read_train_list, read_trials, require_files
from speakerkit.metrics import Metrics, as_norm, verification_metrics
from speakerkit.model import crop_samples

EVAL_CROPS = 5
EVAL_CROP_FRAMES = 300


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


class EmbeddingsAndVectors(NamedTuple):
    """Of a batch of files (or, row by row, of one): the encoder's `embeddings` [N, D], unnormalised as
    `tools.embed` and the exported models give them, and the evaluation protocol's `protocol_vectors` [N, 2D],
    whose dot products are --eval's scores."""
    embeddings: torch.Tensor
    protocol_vectors: torch.Tensor


def embeddings_and_protocol_vectors(encoder, waveforms, device):
    """The EmbeddingsAndVectors of a list of 1-D waveforms, each whole utterance embedded once."""
    whole = whole_embeddings(encoder, waveforms, device)
    return EmbeddingsAndVectors(whole, protocol_vectors_of(encoder, waveforms, device, whole=whole))


def rows_of(batch):
    """Per file, what `represent` gave for a batch: a tensor's rows, or a NamedTuple of tensors row by row."""
    return list(batch) if isinstance(batch, torch.Tensor) else [type(batch)(*row) for row in zip(*batch)]


def all_finite(row):
    return all(bool(torch.isfinite(part).all()) for part in (row if isinstance(row, tuple) else (row,)))


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
    """`represent(encoder, waveforms, device)` (the protocol vectors, or `embeddings_and_protocol_vectors`) of
    every file, read by `n_cpu` loader
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
                for i, vector in zip(usable, rows_of(batch)):
                    if all_finite(vector):
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


def centred(vectors, mean):
    """Protocol vectors [..., 2D] with the training `mean` [2D] subtracted and each half (whole utterance, crops)
    normalised again: a score is then the mean of the two halves' cosines of centred embeddings (the mean
    subtraction of wespeaker's cosine back end, in this protocol)."""
    moved = vectors - mean
    half = moved.shape[-1] // 2
    return torch.cat((F.normalize(moved[..., :half], dim=-1), F.normalize(moved[..., half:], dim=-1)), -1) \
        / math.sqrt(2)


def mean_vector(vectors):
    """The mean of {name: vector}'s vectors: what `centred` subtracts."""
    return torch.stack(list(vectors.values())).mean(dim=0)


def centred_all(vectors, mean):
    """{name: vector} with every vector `centred`."""
    names = list(vectors)
    return dict(zip(names, centred(torch.stack([vectors[n] for n in names]), mean))) if names else {}


def calibrated_pair(calibration, vectors, seconds):
    """(score, LLR, same speaker) of two recordings `seconds` long, from their protocol vectors [2, 2D], scored
    as the `calibration` (metrics.Calibration) was fitted: with its training mean subtracted where it has one."""
    if calibration.training_mean:
        vectors = centred(vectors, torch.tensor(calibration.training_mean, dtype=vectors.dtype))
    protocol = float(vectors[0] @ vectors[1])
    return protocol, float(calibration.llr([protocol], [seconds])[0]), bool(calibration.decide([protocol], [seconds]))


def score_trials(vectors, enroll, test):
    """Raw scores v_e . v_t for each trial."""
    e = torch.stack([vectors[name] for name in enroll])
    t = torch.stack([vectors[name] for name in test])
    return (e * t).sum(dim=1).numpy()


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


@dataclasses.dataclass(frozen=True)
class Cohort:
    """What scoring takes from the training list: the `entries` (`lists.TrainEntry`) under `root` whose vectors
    form the AS-Norm cohort (`as_norm`: as speaker means or single utterances, `kind`, and the `top_k` scores
    used) and whose mean is subtracted from every vector before scoring (`subtract_mean`)."""
    entries: list
    root: str
    kind: str
    top_k: int
    as_norm: bool = True
    subtract_mean: bool = False


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
    """Score each `lists.TrialList`, embedding each utterance once (`embed_for`), with what a `cohort` asks
    for when one is given (the training mean subtracted, AS-Norm). Returns {list path: ListResult} (empty
    without lists)."""
    if not trial_lists:
        return {}
    files = sorted({f for trials in trial_lists for f in trials.enroll + trials.test})
    vectors = embed_for(encoder, files, eval_path, device, n_cpu, cache_dir, identity)
    if cohort is not None:
        cohort_vectors = embed_for(encoder, [entry.path for entry in cohort.entries], cohort.root, device, n_cpu,
                                   cache_dir, identity)
        if cohort.subtract_mean:
            mean = mean_vector(cohort_vectors)
            vectors, cohort_vectors = centred_all(vectors, mean), centred_all(cohort_vectors, mean)
    results = {trials.path: ListResult(trials, score_trials(vectors, trials.enroll, trials.test))
               for trials in trial_lists}
    if cohort is not None and cohort.as_norm:
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


# ---------------------------------------------------------------- from the flags: training and --eval alike

def read_trial_lists(args, paths=None):
    """Every --eval_list (or the lists `paths`), after checking that each file it names is under --eval_path and
    has a header that decodes, so that a bad file stops a run before its first step, not at its first
    evaluation."""
    trial_lists = distinct_names([read_trials(path) for path in (paths or args.eval_list)])
    for trials in trial_lists:
        references = trials.references()
        require_files(list(references), list(references.values()), args.eval_path, trials.path)
        problems = unreadable_headers(args.eval_path, list(references))
        if problems:
            raise UserError(f'{trials.path}: {len(problems)} files cannot be used, e.g. '
                            + '; '.join(f'line {references[path]}: {path} ({why})' for path, why in problems[:3]))
    return trial_lists


def cohort_of(args, train_entries=None):
    """The Cohort that --snorm, --subtract_mean and the --cohort_* flags describe, or None without either;
    drawn from `train_entries` (a TrainList) when the training list is already read."""
    if not (args.snorm or args.subtract_mean):
        return None
    train_entries = train_entries if isinstance(train_entries, TrainList) else read_train_list(args.train_list)
    entries = cohort_entries(train_entries, args.cohort_size, args.seed)
    size = len({entry.speaker for entry in entries}) if args.cohort == 'speaker' else len(entries)
    if args.snorm and size < 2:
        raise UsageError(f'--snorm: a cohort of {size} {"speaker" if args.cohort == "speaker" else "utterance"} from '
                         f'{args.train_list}; AS-Norm needs at least two to normalise by (their spread would be 0)')
    return Cohort(entries, args.train_path, args.cohort, args.cohort_top_k, args.snorm, args.subtract_mean)


def training_mean(encoder, args, device, identity=None):
    """The mean protocol vector of --subtract_mean's training utterances (cached as `evaluate_encoder` caches)."""
    cohort = cohort_of(args)
    encoder, identity = at_eval_precision(encoder, args, identity)
    vectors = embed_for(encoder, [entry.path for entry in cohort.entries], cohort.root, device,
                        embedding_readers(args, device), os.path.join(args.save_path, 'embeddings'), identity)
    return mean_vector(vectors)


def evaluate_encoder(encoder, args, device, trial_lists, cohort, identity=None):
    """`evaluate` with the flags' settings (--eval_precision bf16: under `Autocast`) and the AS-Norm
    `cohort` (or None); embeddings are cached under save_path/embeddings when the checkpoint's `identity` is
    given, apart for each precision."""
    encoder, identity = at_eval_precision(encoder, args, identity)
    return evaluate(encoder, trial_lists, args.eval_path, device, embedding_readers(args, device), cohort,
                    os.path.join(args.save_path, 'embeddings'), identity)


def at_eval_precision(encoder, args, identity):
    """The encoder run at --eval_precision (bf16: under `Autocast`), and the cache identity of its vectors."""
    if args.eval_precision == 'bf16':
        return Autocast(encoder), identity and f'{identity} bf16'
    return encoder, identity


def embedding_readers(args, device):
    """Reader processes for embedding files: --n_cpu where given or on a GPU; on the CPU by default none, since
    the network takes every core there and readers only slowed it (bench/RESULTS.md)."""
    return args.n_cpu if 'n_cpu' in args.given or torch.device(device).type == 'cuda' else 0
