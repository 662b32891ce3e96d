"""Lists for a real-speech check on LibriSpeech (one utterance per speaker, e.g. ../shared/data/librispeech_251).

The first `--train_speakers` speakers (sorted by id) form `train_list.txt`; each remaining speaker's
recording is cut into two halves written under `out/test/`, and `trials.txt` pairs the two halves of every
held-out speaker (targets) and the halves of every two different held-out speakers (non-targets).

  python exps/librispeech/make_lists.py ../shared/data/librispeech_251 exps/librispeech/data
"""

import argparse
import glob
import itertools
import os

import soundfile


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('corpus', help='LibriSpeech-style tree <speaker>/<chapter>/<utt>.flac')
    parser.add_argument('out', help='folder for the lists and the held-out halves')
    parser.add_argument('--train_speakers', type=int, default=200)
    args = parser.parse_args()

    files = sorted(glob.glob(os.path.join(args.corpus, '*', '*', '*.flac')))
    if not files:
        parser.error(f'{args.corpus}: no <speaker>/<chapter>/<utt>.flac files')
    by_speaker = {}
    for path in files:
        by_speaker.setdefault(os.path.relpath(path, args.corpus).split(os.sep)[0], []).append(path)
    speakers = sorted(by_speaker, key=int)
    if len(speakers) <= args.train_speakers:
        parser.error(f'{args.corpus}: {len(speakers)} speakers, need more than {args.train_speakers}')
    train, held_out = speakers[:args.train_speakers], speakers[args.train_speakers:]

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'train_list.txt'), 'w') as f:
        for speaker in train:
            f.writelines(f'{speaker} {os.path.relpath(p, args.corpus)}\n' for p in by_speaker[speaker])

    halves = []
    for speaker in held_out:
        audio, rate = soundfile.read(by_speaker[speaker][0], dtype='float32')
        middle = len(audio) // 2
        for part, piece in (('a', audio[:middle]), ('b', audio[middle:])):
            rel = f'{speaker}/{part}.wav'
            os.makedirs(os.path.join(args.out, 'test', speaker), exist_ok=True)
            soundfile.write(os.path.join(args.out, 'test', rel), piece, rate)
            halves.append((speaker, rel))
    with open(os.path.join(args.out, 'trials.txt'), 'w') as f:
        for (s1, r1), (s2, r2) in itertools.combinations(halves, 2):
            f.write(f'{int(s1 == s2)} {r1} {r2}\n')
    print(f'{len(train)} training speakers, {len(held_out)} held-out speakers, '
          f'{len(halves) * (len(halves) - 1) // 2} trials in {args.out}')


if __name__ == '__main__':
    main()
