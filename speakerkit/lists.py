"""Every list the toolkit reads or writes, through one line reader.

  list_lines         non-blank lines with their numbers; a UTF-8 byte-order mark, CRLF endings and blank
                     lines are accepted; bytes that are not UTF-8 are an error naming the file and line
  read_train_list    `<speaker> <relative path>`                      -> TrainList (numpy arrays; [i]: TrainEntry)
                     or a Kaldi data folder: wav.scp and utt2spk       -> the same
  read_shard_list    `<tar file> <utterances>` + speakers.txt          -> ShardList (tar shards, shards.py)
  read_trials        `<0|1> <enroll> <test>`, Kaldi's `<enroll> <test> <target|nontarget>` or `<enroll> <test>`
                                                                       -> TrialList (distinct_names: outputs)
  read_path_list     the audio paths a list names (each field with an audio extension, or the last); files_to_embed:
                     such a list or a folder (--extract)
  read_score_file    `<enroll> <test> <score> <0|1|target|nontarget>`  -> (scores, labels)
  write_score_file   the same lines, written atomically
  files_under        a folder's audio files, as a list
A malformed line is a `UserError` naming the file and line; `require_files` checks that every file a list
names exists, naming the line of the first missing ones.
"""

import collections.abc
import concurrent.futures
import dataclasses
import math
import os
from typing import NamedTuple

import numpy as np

from speakerkit.checkpoints import atomic_write
from speakerkit.errors import UserError

AUDIO_EXTENSIONS = ('.wav', '.flac')
NAMED_AUDIO = AUDIO_EXTENSIONS + ('.m4a', '.mp3', '.ogg', '.opus', '.aac')  # what marks a list's field as a file


class ListLine(NamedTuple):
    number: int
    fields: list
    text: str


def list_lines(path, what, drop_unfinished=False):
    """The non-blank lines of the list file `path` (a `what`: 'training list', 'trial list', ...). With
    `drop_unfinished`, a last line without its newline (an append that a crash cut short) is left out."""
    try:
        f = open(path, 'rb')
    except OSError as error:
        raise UserError(f'{path}: cannot read the {what}: {error.strerror}') from error
    with f:
        for number, raw in enumerate(f, start=1):
            if drop_unfinished and not raw.endswith(b'\n'):
                return
            try:
                text = raw.decode('utf-8')
            except UnicodeDecodeError as error:
                raise UserError(f'{path}:{number}: the {what} is not UTF-8 text ({error.reason} at byte '
                                f'{error.start})') from error
            if number == 1:
                text = text.removeprefix('\ufeff')
            fields = text.split()
            if fields:
                yield ListLine(number, fields, text.strip())


def malformed(path, line, expected):
    return UserError(f"{path}:{line.number}: expected {expected}, got {line.text!r}")


# ---------------------------------------------------------------- training lists

class TrainEntry(NamedTuple):
    speaker: str
    path: str                   # relative to --train_path
    line: int | None = None  # of the training list


@dataclasses.dataclass(frozen=True, eq=False)
class TrainList:
    """A training list in a few numpy arrays instead of a Python object per line: a VoxCeleb2 list (1,092,009
    lines) takes about 50 MB, and loader workers forked from the training process share it. A list of Python
    strings would not stay shared: reading an object writes its reference count, so each worker copies, page by
    page, every part of the list its epoch touches (bench/bench_scale.py measures it).

      speakers     the distinct speaker names, sorted: label k is speakers[k] (the original's class order)
      labels       int32 [N]: each entry's speaker label
      path_bytes   uint8: every relative path in UTF-8, one after another; entry i's ends at path_ends[i]
      lines        int64 [N]: each entry's line in `source` (0 where it has none)
    Indexing gives a `TrainEntry`."""
    source: str
    speakers: np.ndarray
    labels: np.ndarray
    path_bytes: np.ndarray
    path_ends: np.ndarray
    lines: np.ndarray

    @classmethod
    def of(cls, entries, source=''):
        """The TrainList of `TrainEntry`s (or (speaker, path[, line]) tuples) read from `source`."""
        speakers, paths, lines = [], [], []
        for entry in entries:
            speakers.append(entry[0])
            paths.append(entry[1].encode())
            lines.append(entry[2] if len(entry) > 2 and entry[2] is not None else 0)
        names, labels = np.unique(np.array(speakers, dtype=str), return_inverse=True)
        return cls(source, names, labels.astype(np.int32).reshape(-1),
                   np.frombuffer(b''.join(paths), dtype=np.uint8),
                   np.cumsum([len(p) for p in paths], dtype=np.int64), np.array(lines, dtype=np.int64))

    def __len__(self):
        return len(self.labels)

    def path(self, i):
        start = self.path_ends[i - 1] if i > 0 else 0
        return self.path_bytes[start:self.path_ends[i]].tobytes().decode()

    def speaker(self, i):
        return str(self.speakers[self.labels[i]])

    def __getitem__(self, i):
        return TrainEntry(self.speaker(i), self.path(i), int(self.lines[i]) or None)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, indices):
        """The TrainList of the entries at `indices`, in that order; speakers without an entry left go."""
        return TrainList.of((self[int(i)] for i in indices), self.source)

    @property
    def paths(self):
        """The relative paths, as a sequence that decodes each one when asked."""
        return PathColumn(self)

    def by_label(self):
        """(order, starts): the entries of label k are order[starts[k]:starts[k + 1]], in list order."""
        order = np.argsort(self.labels, kind='stable')
        return order, np.searchsorted(self.labels[order], np.arange(len(self.speakers) + 1))


class PathColumn(collections.abc.Sequence):
    """A TrainList's relative paths as a sequence (`TrainList.paths`)."""

    def __init__(self, train_list):
        self.train_list = train_list

    def __len__(self):
        return len(self.train_list)

    def __getitem__(self, i):
        return self.train_list.path(i)


def read_train_list(path):
    """The `TrainList` of a training list, or of a Kaldi data folder (`read_kaldi_data`); raises naming a
    malformed line, or an empty list."""
    if os.path.isdir(path):
        return read_kaldi_data(path)
    entries = []
    for line in list_lines(path, 'training list'):
        if len(line.fields) != 2:
            raise malformed(path, line, "'<speaker> <relative path>'")
        entries.append((line.fields[0], line.fields[1], line.number))
    if not entries:
        raise UserError(f'{path}: the training list is empty')
    return TrainList.of(entries, path)


def read_kaldi_data(folder):
    """The `TrainList` of a Kaldi data folder (Kaldi's and wespeaker's training input): `wav.scp` lines `<utterance>
    <audio path>`, `utt2spk` lines `<utterance> <speaker>`; the entries in wav.scp's order, its lines and paths
    (relative ones are relative to --train_path, or else to the current folder, as Kaldi recipes run). A command
    in place of a path (Kaldi's `sox ... |`), an utterance named twice, or one that the other file lacks is an
    error naming the file and line."""
    scp, speakers_of = os.path.join(folder, 'wav.scp'), os.path.join(folder, 'utt2spk')
    files = read_wav_scp(scp)
    speakers = {}
    for line in list_lines(speakers_of, 'utt2spk'):
        if len(line.fields) != 2:
            raise malformed(speakers_of, line, "'<utterance> <speaker>'")
        if line.fields[0] not in files:
            raise UserError(f'{speakers_of}:{line.number}: utterance {line.fields[0]} is not in {scp}')
        speakers[line.fields[0]] = line.fields[1]
    missing = next((utterance for utterance in files if utterance not in speakers), None)
    if missing is not None:
        raise UserError(f'{scp}:{files[missing][1]}: utterance {missing} has no speaker in {speakers_of}')
    if not files:
        raise UserError(f'{scp}: the training list is empty')
    return TrainList.of([(speakers[u], path, number) for u, (path, number) in files.items()], scp)


def read_wav_scp(scp):
    """{utterance: (audio path, line)} of a Kaldi `wav.scp`; a command in place of a path or an utterance named
    twice is an error naming the line."""
    files = {}
    for line in list_lines(scp, 'wav.scp'):
        if len(line.fields) != 2:
            raise malformed(scp, line, "'<utterance> <audio path>' (a command in place of the path is not run: "
                                       "give the audio file)")
        if line.fields[0] in files:
            raise UserError(f'{scp}:{line.number}: utterance {line.fields[0]} is named again (first on line '
                            f'{files[line.fields[0]][1]})')
        files[line.fields[0]] = (line.fields[1], line.number)
    return files


def without_repeats(train_list):
    """(`train_list` without the lines that repeat an earlier one, how many did). A file listed under two
    speakers is a `UserError` naming both lines of the list."""
    first, kept = {}, []
    for i in range(len(train_list)):
        earlier = first.setdefault(train_list.path(i), i)
        if earlier == i:
            kept.append(i)
        elif train_list.labels[earlier] != train_list.labels[i]:
            entry, other = train_list[i], train_list[earlier]
            raise UserError(f'{train_list.source}:{entry.line}: {entry.path} is listed under speaker {entry.speaker} '
                            f'here and under {other.speaker} on line {other.line}')
    if len(kept) == len(train_list):
        return train_list, 0
    return train_list.take(kept), len(train_list) - len(kept)


def cohort_entries(train_list, size, seed):
    """Up to `size` `TrainEntry`s of a TrainList (all when 0), taken round-robin over speakers in a seeded
    order: the first utterance of each speaker in the order a seeded permutation meets them, then the second,
    and so on."""
    if size == 0 or size >= len(train_list):
        return list(train_list)
    order = np.random.default_rng(seed).permutation(len(train_list))
    speaker = train_list.labels[order]
    _, first_seen = np.unique(speaker, return_index=True)
    by_speaker = np.argsort(speaker, kind='stable')
    depth = np.empty(len(order), dtype=np.int64)
    depth[by_speaker] = np.arange(len(order)) - np.searchsorted(speaker[by_speaker], speaker[by_speaker])
    seen_rank = np.empty(len(train_list.speakers), dtype=np.int64)
    seen_rank[np.unique(speaker)] = np.argsort(np.argsort(first_seen))
    chosen = order[np.lexsort((seen_rank[speaker], depth))[:size]]
    return [train_list[int(i)] for i in chosen]


# ---------------------------------------------------------------- shard lists

@dataclasses.dataclass(frozen=True)
class ShardList:
    """A list of tar shards (shards.py): `shards` the tar files, `counts` the utterances in each, `speakers`
    the sorted speaker names of speakers.txt beside the list (label k is speakers[k], as in a TrainList)."""
    path: str
    shards: list
    counts: np.ndarray
    speakers: np.ndarray

    def __len__(self):
        """The utterances of every shard."""
        return int(self.counts.sum())


def read_shard_list(path):
    """shards.txt (`<tar file, relative to the list's folder> <utterances>` per line) and the speakers.txt
    beside it; raises naming a malformed line, a missing shard, or speakers not sorted and distinct."""
    folder = os.path.dirname(os.path.abspath(path))
    shards, counts, lines = [], [], []
    for line in list_lines(path, 'shard list'):
        if len(line.fields) != 2 or not line.fields[1].isdigit() or int(line.fields[1]) == 0:
            raise malformed(path, line, "'<tar file> <number of utterances in it>'")
        shards.append(os.path.join(folder, line.fields[0]))
        counts.append(int(line.fields[1]))
        lines.append(line.number)
    if not shards:
        raise UserError(f'{path}: the shard list is empty')
    require_files(shards, lines, folder, path)
    speakers_path = os.path.join(folder, 'speakers.txt')
    speakers = [line.fields[0] for line in list_lines(speakers_path, 'speaker list (written with the shards)')]
    for k in range(1, len(speakers)):
        if speakers[k] <= speakers[k - 1]:
            raise UserError(f'{speakers_path}: speaker {speakers[k]!r} (entry {k + 1}) is not after '
                            f'{speakers[k - 1]!r}: the names must be sorted and distinct, one a line')
    if len(speakers) < 2:
        raise UserError(f'{speakers_path}: training a speaker encoder needs at least two speakers')
    return ShardList(path, shards, np.array(counts, dtype=np.int64), np.array(speakers, dtype=str))


# ---------------------------------------------------------------- trial lists

@dataclasses.dataclass(frozen=True)
class TrialList:
    """A trial list: `labels` (int array, 1 = same speaker) is None for a list without labels. `name` names
    its outputs (score files, plots, records): the file name, made distinct by `distinct_names`. `kaldi`: its
    labels are written Kaldi's way (`target`/`nontarget`), and so are those of its score files."""
    path: str
    labels: np.ndarray | None
    enroll: list
    test: list
    lines: list
    name: str = ''
    kaldi: bool = False

    def references(self):
        """{relative audio path: the first line naming it}."""
        found = {}
        for line, enroll, test in zip(self.lines, self.enroll, self.test):
            found.setdefault(enroll, line)
            found.setdefault(test, line)
        return found


KALDI_LABELS = {'nontarget': 0, 'target': 1}


def trial_form(fields):
    """The form of a trial line: 'labelled' (`<0|1> <enroll> <test>`: VoxCeleb's), 'kaldi' (`<enroll> <test>
    <target|nontarget>`: Kaldi's and wespeaker's), 'unlabelled' (`<enroll> <test>`), or None."""
    if len(fields) == 2:
        return 'unlabelled'
    if len(fields) == 3 and fields[0] in ('0', '1'):
        return 'labelled'
    if len(fields) == 3 and fields[2] in KALDI_LABELS:
        return 'kaldi'
    return None


def read_trials(path):
    """Lines in one form throughout: `<0|1> <enroll> <test>` (VoxCeleb's), `<enroll> <test> <target|nontarget>`
    (Kaldi's and wespeaker's `.kaldi` lists) or `<enroll> <test>` (the official test-phase format, no labels);
    raises naming a malformed line, an empty list, or labels of one class only."""
    rows, form = [], None
    for line in list_lines(path, 'trial list'):
        form = form or trial_form(line.fields)
        if form is None or trial_form(line.fields) != form:
            raise malformed(path, line, "'<0|1> <enroll> <test>', '<enroll> <test> <target|nontarget>' or "
                                        "'<enroll> <test>' on every line")
        rows.append(line)
    if not rows:
        raise UserError(f'{path}: the trial list is empty')
    if form == 'unlabelled':
        labels = None
    else:
        labels = np.array([int(line.fields[0]) if form == 'labelled' else KALDI_LABELS[line.fields[2]]
                           for line in rows])
        require_both_classes(path, labels)
    pairs = [line.fields[1:] if form == 'labelled' else line.fields[:2] for line in rows]
    return TrialList(path, labels, [e for e, _ in pairs], [t for _, t in pairs], [line.number for line in rows],
                     os.path.basename(path), kaldi=form == 'kaldi')


def distinct_names(trial_lists):
    """The lists with names that differ: a file name shared by several lists gets as many of their folders in
    front as it takes, joined by '_' (O/trials.txt and E/trials.txt become O_trials.txt and E_trials.txt)."""
    parts = [os.path.normpath(os.path.abspath(t.path)).split(os.sep) for t in trial_lists]
    names = []
    for own in parts:
        depth = 1
        while depth < len(own) and any(other != own and other[-depth:] == own[-depth:] for other in parts):
            depth += 1
        names.append('_'.join(own[-depth:]))
    return [dataclasses.replace(t, name=name) for t, name in zip(trial_lists, names)]


# ---------------------------------------------------------------- other lists

def read_path_list(path):
    """{relative path: its first line} of a list of audio files: of each line, every field that names an audio
    file by its extension (a trial's enrolment and test files, a training line's path), or else the last field."""
    found = {}
    for line in list_lines(path, 'list of files'):
        for name in [f for f in line.fields if f.lower().endswith(NAMED_AUDIO)] or line.fields[-1:]:
            found.setdefault(name, line.number)
    return found


def read_score_file(path):
    """(scores, labels) of a score file with `enroll test score label` lines, the label 0|1 or (Kaldi's and
    wespeaker's) target|nontarget, of both classes."""
    scores, labels = [], []
    for line in list_lines(path, 'score file'):
        fields = line.fields
        try:
            if len(fields) != 4 or fields[3] not in ('0', '1', *KALDI_LABELS) or not math.isfinite(float(fields[2])):
                raise ValueError
            scores.append(float(fields[2]))
            labels.append(KALDI_LABELS[fields[3]] if fields[3] in KALDI_LABELS else int(fields[3]))
        except ValueError:
            raise malformed(path, line, "'<enroll> <test> <finite score> <0|1|target|nontarget>'") from None
    if not scores:
        raise UserError(f"{path}: no scores")
    return np.array(scores), require_both_classes(path, np.array(labels))


def require_both_classes(path, labels):
    """`labels`, unless they are all of one class, which makes EER and minDCF meaningless."""
    if labels.min() == labels.max():
        raise UserError(f'{path}: every trial has label {labels[0]}; EER and minDCF need target (1) and '
                        f'non-target (0) trials')
    return labels


def write_score_file(path, enroll, test, scores, labels=None, kaldi=False):
    """One `enroll test score [label]` line per trial, written atomically; the label 0|1, or with `kaldi`
    target|nontarget (what wespeaker's scoring reads)."""
    words = ('nontarget', 'target') if kaldi else ('0', '1')
    suffixes = [''] * len(scores) if labels is None else [f' {words[int(label)]}' for label in labels]
    text = ''.join(f'{e} {t} {s:.6f}{suffix}\n' for e, t, s, suffix in zip(enroll, test, scores, suffixes))
    atomic_write(path, lambda f: f.write(text.encode()))


def files_under(root, extensions=AUDIO_EXTENSIONS):
    """The relative paths of the files below `root` whose names end with one of `extensions`, sorted. Folders
    that are symbolic links are followed (datasets are often laid out so), each real folder once: a link
    back to a folder above is not entered again."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        found += [os.path.relpath(os.path.join(folder, name), root) for name in names
                  if name.lower().endswith(extensions)]
    return sorted(found)


class FilesToEmbed(NamedTuple):
    """--extract's input: `references` {path relative to `root`: its line, or None}, and `names` {path: the
    name its vectors are written under: its utterance in a wav.scp, else the path itself}."""
    root: str
    references: dict
    names: dict


def files_to_embed(source, root=None):
    """The FilesToEmbed of `source`: the audio files of a folder; the utterances of a Kaldi data folder's
    wav.scp (paths relative to `root`, or else to the current folder); or the files a list names
    (`read_path_list`, relative to `root` or else to the list's folder). Every one of them exists."""
    scp = os.path.join(source, 'wav.scp')
    if os.path.isfile(scp):
        root, listed = root or os.curdir, read_wav_scp(scp)
        references = {path: number for path, number in listed.values()}
        names = {path: utterance for utterance, (path, _) in listed.items()}
        source = scp
    elif os.path.isdir(source):
        root, references = source, dict.fromkeys(files_under(source))
        names = {path: path for path in references}
    else:
        root = root or os.path.dirname(os.path.abspath(source))
        references = read_path_list(source)
        names = {path: path for path in references}
    if not references:
        raise UserError(f'{source}: no audio files to embed')
    require_files(list(references), list(references.values()), root, source)
    return FilesToEmbed(root, references, names)


def require_files(paths, lines, root, source, threads=8):
    """A `UserError` naming `source` unless every file of `paths` (relative to `root`; `lines[i]`: the line of
    `source` naming paths[i], or None) exists. Checked on a few threads: a cluster's file system answers slowly
    one file at a time, and a VoxCeleb2 list names a million."""
    def missing_of(start):
        return [i for i in range(start, min(start + 4096, len(paths)))
                if not os.path.isfile(os.path.join(root, paths[i]))]
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    try:
        missing = [i for part in pool.map(missing_of, range(0, len(paths), 4096)) for i in part]
    finally:
        pool.shutdown(cancel_futures=True)  # a stop signal ends the check at once
    if missing:
        shown = [f'{source}:{lines[i]}: {paths[i]}' if lines is not None and lines[i] else paths[i]
                 for i in missing[:3]]
        raise UserError(f'{source}: {len(missing)} files not under {root}, e.g. ' + '; '.join(shown))
