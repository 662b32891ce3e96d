"""Lists for a real-speech check on LibriSpeech (one utterance per speaker, e.g. ../shared/data/librispeech_251).

The first `--train_speakers` speakers (sorted by id) form `train_list.txt`; each remaining speaker's
recording is cut into `--pieces` equal parts written under `out/test/`, and `trials.txt` pairs every two
parts: of one speaker (targets) and of two different held-out speakers (non-targets).

  python exps/librispeech/make_lists.py ../shared/data/librispeech_251 exps/librispeech/data
"""

import argparse
import glob
import itertools
import os

import soundfile


def speaker_files(corpus):
    """{speaker: [paths]} of a LibriSpeech-style tree <speaker>/<chapter>/<utt>.flac, speakers in id order."""
    by_speaker = {}
    for path in sorted(glob.glob(os.path.join(corpus, '*', '*', '*.flac'))):
        by_speaker.setdefault(os.path.relpath(path, corpus).split(os.sep)[0], []).append(path)
    return dict(sorted(by_speaker.items(), key=lambda item: int(item[0])))


def make_lists(corpus, out, train_speakers=200, pieces=2):
    """Write out/train_list.txt, out/test/<speaker>/<part>.wav and out/trials.txt; returns the trial count.
    Raises ValueError when the corpus has no more than `train_speakers` speakers."""
    by_speaker = speaker_files(corpus)
    if len(by_speaker) <= train_speakers:
        raise ValueError(f'{corpus}: {len(by_speaker)} speakers of <speaker>/<chapter>/<utt>.flac files, '
                         f'need more than {train_speakers}')
    speakers = list(by_speaker)
    train, held_out = speakers[:train_speakers], speakers[train_speakers:]

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'train_list.txt'), 'w') as f:
        for speaker in train:
            f.writelines(f'{speaker} {os.path.relpath(p, corpus)}\n' for p in by_speaker[speaker])

    parts = []
    for speaker in held_out:
        audio, rate = soundfile.read(by_speaker[speaker][0], dtype='float32')
        os.makedirs(os.path.join(out, 'test', speaker), exist_ok=True)
        for number in range(pieces):
            rel = f'{speaker}/{"abcdefghij"[number]}.wav'
            piece = audio[len(audio) * number // pieces:len(audio) * (number + 1) // pieces]
            soundfile.write(os.path.join(out, 'test', rel), piece, rate)
            parts.append((speaker, rel))
    with open(os.path.join(out, 'trials.txt'), 'w') as f:
        for (s1, r1), (s2, r2) in itertools.combinations(parts, 2):
            f.write(f'{int(s1 == s2)} {r1} {r2}\n')
    return len(parts) * (len(parts) - 1) // 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('corpus', help='LibriSpeech-style tree <speaker>/<chapter>/<utt>.flac')
    parser.add_argument('out', help='folder for the lists and the held-out parts')
    parser.add_argument('--train_speakers', type=int, default=200)
    parser.add_argument('--pieces', type=int, choices=range(2, 11), default=2,
                        help='parts each held-out recording is cut into (default: 2, halves)')
    args = parser.parse_args()
    try:
        trials = make_lists(args.corpus, args.out, args.train_speakers, args.pieces)
    except ValueError as error:
        parser.error(str(error))
    print(f'{args.train_speakers} training speakers, {trials} trials in {args.out}')


if __name__ == '__main__':
    main()
