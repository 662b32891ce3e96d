"""A corpus with VoxCeleb2's shape, by simulation: the lists are full size, the audio is a small pool.

  python bench/simulate_voxceleb2.py DIR [--utterances 1092009] [--speakers 5994] [--pool_speakers 100]
                                         [--pool_utterances 20] [--trials 579818] [--trial_files 145160]

Writes under DIR:
  pool/<speaker>/<session>/<utt>.wav   generated speech (demo.py's synthesis), 4-8 s at 16 kHz
  train/wav/idXXXXX/<video>/NNNNN.wav  `--utterances` symbolic links into the pool, VoxCeleb2's layout and
                                       counts: `--speakers` speakers (id00012 on), about 7.5 utterances a video
  train_list.txt                       `<speaker> <relative path>`, one line per link
  test/wav/idXXXXX/<video>/NNNNN.wav   `--trial_files` links, VoxCeleb1's layout (id10001 on)
  trials.txt                           `--trials` lines `<0|1> <enroll> <test>`, half of them targets (Vox1-E's size)
Training speaker k's links point at pool speaker k mod `--pool_speakers`, so labels and audio agree up to that
wrap-around. Running it again on a finished DIR does nothing. bench/bench_scale.py measures the trainer on it.
"""

import argparse
import os
import string
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from speakerkit import demo  # noqa: E402

VIDEO_ID_LETTERS = np.array(list(string.ascii_letters + string.digits + '-_'))
UTTERANCES_PER_VIDEO = 7.5  # VoxCeleb2 dev: 1,092,009 utterances from 145,569 videos


def utterance_counts(total, speakers, rng):
    """Utterances per speaker: log-normal shares (VoxCeleb2's counts are skewed, mean 182), at least 2 each,
    summing exactly to `total`."""
    if total < 2 * speakers:
        raise SystemExit(f'{total} utterances cannot give each of {speakers} speakers two')
    shares = rng.lognormal(0.0, 0.5, size=speakers)
    counts = np.maximum(2, np.floor(shares / shares.sum() * total).astype(np.int64))
    while counts.sum() != total:
        step = np.sign(total - counts.sum())
        candidates = np.flatnonzero(counts > 2) if step < 0 else np.arange(speakers)
        chosen = rng.choice(candidates, size=min(len(candidates), abs(int(total - counts.sum()))), replace=False)
        counts[chosen] += step
    return counts


def video_id(rng):
    return ''.join(rng.choice(VIDEO_ID_LETTERS, size=11))


def link_tree(root, first_id, counts, pool, rng):
    """Links root/idXXXXX/<video>/NNNNN.wav -> pool files; returns the relative paths, speaker by speaker."""
    paths = []
    pool_root = os.path.join(os.path.abspath(root), '..', '..', 'pool')
    per_speaker = {}
    for _, rel in pool:
        per_speaker.setdefault(rel.split('/')[0], []).append(rel)
    pool_speakers = [per_speaker[name] for name in sorted(per_speaker)]
    for k, count in enumerate(counts):
        speaker = f'id{first_id + k:05d}'
        sources = pool_speakers[k % len(pool_speakers)]
        videos = [video_id(rng) for _ in range(int(np.ceil(count / UTTERANCES_PER_VIDEO)))]
        for video in videos:
            os.makedirs(os.path.join(root, speaker, video), exist_ok=True)
        for n in range(count):
            rel = f'{speaker}/{videos[n % len(videos)]}/{n // len(videos) + 1:05d}.wav'
            os.symlink(os.path.join(pool_root, sources[n % len(sources)]), os.path.join(root, rel))
            paths.append(rel)
    return paths


def write_trials(path, files, trials, rng):
    """`trials` lines, half targets (two files of one speaker), half non-targets, each file used alike."""
    speaker_of = np.array([rel.split('/')[0] for rel in files])
    first = np.searchsorted(speaker_of, speaker_of)  # link_tree writes each speaker's files together, in order
    size = np.searchsorted(speaker_of, speaker_of, side='right') - first  # two or more
    enroll = rng.integers(len(files), size=trials)
    other = first[enroll] + (enroll - first[enroll] + rng.integers(1, size[enroll])) % size[enroll]
    target = np.arange(trials) % 2 == 0
    test = np.where(target, other, rng.integers(len(files), size=trials))
    labels = (speaker_of[test] == speaker_of[enroll]).astype(int)
    with open(path, 'w') as f:
        f.writelines(f'{label} {files[e]} {files[t]}\n' for label, e, t in zip(labels, enroll, test))


def simulate(out, utterances=1092009, speakers=5994, pool_speakers=100, pool_utterances=20, trials=579818,
             trial_files=145160, seed=0):
    done = os.path.join(out, 'done')
    if os.path.exists(done):
        return
    rng = np.random.default_rng(seed)
    started = time.time()
    pool = demo.write_speakers(os.path.join(out, 'pool'), 1, pool_speakers, pool_utterances, rng, seconds=(4.0, 8.0))
    print(f'pool: {len(pool)} files in {time.time() - started:.0f} s', flush=True)
    paths = link_tree(os.path.join(out, 'train', 'wav'), 12, utterance_counts(utterances, speakers, rng), pool, rng)
    with open(os.path.join(out, 'train_list.txt'), 'w') as f:
        f.writelines(f'{rel.split("/")[0]} {rel}\n' for rel in paths)
    print(f'train_list.txt: {len(paths)} lines of {speakers} speakers ({time.time() - started:.0f} s)', flush=True)
    test_speakers = 1251  # VoxCeleb1's
    files = link_tree(os.path.join(out, 'test', 'wav'), 10001,
                      utterance_counts(trial_files, test_speakers, rng), pool, rng)
    write_trials(os.path.join(out, 'trials.txt'), files, trials, rng)
    print(f'trials.txt: {trials} trials over {len(files)} files ({time.time() - started:.0f} s)', flush=True)
    open(done, 'w').close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('out')
    parser.add_argument('--utterances', type=int, default=1092009)
    parser.add_argument('--speakers', type=int, default=5994)
    parser.add_argument('--pool_speakers', type=int, default=100)
    parser.add_argument('--pool_utterances', type=int, default=20)
    parser.add_argument('--trials', type=int, default=579818)
    parser.add_argument('--trial_files', type=int, default=145160)
    args = parser.parse_args()
    simulate(args.out, args.utterances, args.speakers, args.pool_speakers, args.pool_utterances, args.trials,
             args.trial_files)


if __name__ == '__main__':
    main()
