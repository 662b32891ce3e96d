"""Every list the toolkit reads or writes, through one line reader.

  list_lines         non-blank lines with their numbers; a UTF-8 byte-order mark, CRLF endings and blank
                     lines are accepted; bytes that are not UTF-8 are an error naming the file and line
  read_train_list    `<speaker> <relative path>`                      -> [TrainEntry]
  read_trials        `<0|1> <enroll> <test>` or `<enroll> <test>`      -> TrialList (distinct_names: outputs)
  read_path_list     one audio path per line, its last field; files_to_embed: such a list or a folder (--extract)
  read_score_file    `<enroll> <test> <score> <0|1>`                  -> (scores, labels)
  write_score_file   the same lines, written atomically
  files_under        a folder's audio files, as a list
A malformed line is a `UserError` naming the file and line; `require_files` checks that every file a list
names exists, naming the line of the first missing ones.
"""

import dataclasses
import math
import os
from typing import NamedTuple, Optional

import numpy as np

from checkpoints import atomic_write
from errors import UserError

AUDIO_EXTENSIONS = ('.wav', '.flac')


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
    line: Optional[int] = None  # of the training list


def read_train_list(path):
    """The entries of a training list; raises naming a malformed line, or an empty list."""
    entries = []
    for line in list_lines(path, 'training list'):
        if len(line.fields) != 2:
            raise malformed(path, line, "'<speaker> <relative path>'")
        entries.append(TrainEntry(line.fields[0], line.fields[1], line.number))
    if not entries:
        raise UserError(f'{path}: the training list is empty')
    return entries


def without_repeats(entries, path):
    """(`entries` without the lines that repeat an earlier one, how many did). A file listed under two
    speakers is a `UserError` naming both lines of `path`."""
    first, kept = {}, []
    for entry in entries:
        earlier = first.setdefault(entry.path, entry)
        if earlier is entry:
            kept.append(entry)
        elif earlier.speaker != entry.speaker:
            raise UserError(f'{path}:{entry.line}: {entry.path} is listed under speaker {entry.speaker} here and '
                            f'under {earlier.speaker} on line {earlier.line}')
    return kept, len(entries) - len(kept)


def speaker_labels(entries):
    """Speaker name -> class index, in sorted order of the names (as the original assigns them)."""
    return {name: i for i, name in enumerate(sorted({entry.speaker for entry in entries}))}


def cohort_entries(entries, size, seed):
    """Up to `size` training entries (all when 0), taken round-robin over speakers in a seeded order."""
    if size == 0 or size >= len(entries):
        return list(entries)
    rng = np.random.default_rng(seed)
    by_speaker = {}
    for i in rng.permutation(len(entries)):
        by_speaker.setdefault(entries[i].speaker, []).append(entries[i])
    chosen, depth = [], 0
    while len(chosen) < size:
        chosen.extend(utts[depth] for utts in by_speaker.values() if depth < len(utts))
        depth += 1
    return chosen[:size]


# ---------------------------------------------------------------- trial lists

@dataclasses.dataclass(frozen=True)
class TrialList:
    """A trial list: `labels` (int array, 1 = same speaker) is None for a list without labels. `name` names
    its outputs (score files, plots, records): the file name, made distinct by `distinct_names`."""
    path: str
    labels: Optional[np.ndarray]
    enroll: list
    test: list
    lines: list
    name: str = ''

    def references(self):
        """{relative audio path: the first line naming it}."""
        found = {}
        for line, enroll, test in zip(self.lines, self.enroll, self.test):
            found.setdefault(enroll, line)
            found.setdefault(test, line)
        return found


def read_trials(path):
    """`<0|1> <enroll> <test>` lines, or `<enroll> <test>` throughout (the official test-phase format);
    raises naming a malformed line, an empty list, or labels of one class only."""
    rows, width = [], None
    for line in list_lines(path, 'trial list'):
        width = width or len(line.fields)
        if len(line.fields) != width or width not in (2, 3) or (width == 3 and line.fields[0] not in ('0', '1')):
            raise malformed(path, line, "'<0|1> <enroll> <test>' or '<enroll> <test>' on every line")
        rows.append(line)
    if not rows:
        raise UserError(f'{path}: the trial list is empty')
    labels = np.array([int(line.fields[0]) for line in rows]) if width == 3 else None
    if labels is not None:
        require_both_classes(path, labels)
    return TrialList(path, labels, [line.fields[-2] for line in rows], [line.fields[-1] for line in rows],
                     [line.number for line in rows], os.path.basename(path))


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
    """{relative path: its line} of a list whose lines end with an audio path (the last field)."""
    found = {}
    for line in list_lines(path, 'list of files'):
        found.setdefault(line.fields[-1], line.number)
    return found


def read_score_file(path):
    """(scores, labels) of a score file with `enroll test score label` lines, of both classes."""
    scores, labels = [], []
    for line in list_lines(path, 'score file'):
        fields = line.fields
        try:
            if len(fields) != 4 or fields[3] not in ('0', '1') or not math.isfinite(float(fields[2])):
                raise ValueError
            scores.append(float(fields[2]))
            labels.append(int(fields[3]))
        except ValueError:
            raise malformed(path, line, "'<enroll> <test> <finite score> <0|1>'") from None
    if not scores:
        raise UserError(f"{path}: no scores")
    return np.array(scores), require_both_classes(path, np.array(labels))


def require_both_classes(path, labels):
    """`labels`, unless they are all of one class, which makes EER and minDCF meaningless."""
    if labels.min() == labels.max():
        raise UserError(f'{path}: every trial has label {labels[0]}; EER and minDCF need target (1) and '
                        f'non-target (0) trials')
    return labels


def write_score_file(path, enroll, test, scores, labels=None):
    """One `enroll test score [label]` line per trial, written atomically."""
    suffixes = [''] * len(scores) if labels is None else [f' {label}' for label in labels]
    text = ''.join(f'{e} {t} {s:.6f}{suffix}\n' for e, t, s, suffix in zip(enroll, test, scores, suffixes))
    atomic_write(path, lambda f: f.write(text.encode()))


def files_under(root, extensions=AUDIO_EXTENSIONS):
    """The relative paths of the files below `root` whose names end with one of `extensions`, sorted."""
    return sorted(os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root)
                  for name in names if name.lower().endswith(extensions))


def files_to_embed(list_or_folder, root=None):
    """(root, {relative path: line or None}) of the audio files in a folder, or of a list of files (the last
    field of each line, relative to `root` or else to the list's folder); every one of them exists."""
    if os.path.isdir(list_or_folder):
        root, references = list_or_folder, dict.fromkeys(files_under(list_or_folder))
    else:
        root = root or os.path.dirname(os.path.abspath(list_or_folder))
        references = read_path_list(list_or_folder)
    if not references:
        raise UserError(f'{list_or_folder}: no audio files to embed')
    require_files(references, root, list_or_folder)
    return root, references


def require_files(references, root, source):
    """A `UserError` naming `source` unless every file of `references` ({relative path: the line of `source`
    naming it, or None}) exists under `root`."""
    missing = [p for p in references if not os.path.isfile(os.path.join(root, p))]
    if missing:
        shown = [f'{source}:{references[p]}: {p}' if references[p] else p for p in missing[:3]]
        raise UserError(f'{source}: {len(missing)} files not under {root}, e.g. ' + '; '.join(shown))
