"""The generated demo corpus behind `trainECAPAModel.py --demo`.

A module of its own because speech synthesis is not part of the training data path: it only writes files
in the layouts the real data comes in, so that the demo exercises exactly the code a VoxCeleb run uses:

  voxceleb/train/wav/<speaker>/<session>/<utt>.wav + voxceleb/train_list.txt   (training speakers)
  voxceleb/test/wav/<speaker>/<session>/<utt>.wav  + voxceleb/trials.txt       (held-out speakers)
  musan_split/{noise,speech,music}/<subset>/<stem>/<chunk>.wav                 (5 s chunks)
  RIRS_NOISES/simulated_rirs/{smallroom,mediumroom}/<room>/<rir>.wav

Speech is a source-filter synthesis. Every speaker draws, from distributions shared by all speakers, a
mean f0, an intonation range, a vocal-tract length (scaling all formants), a spectral tilt, a speaking rate,
a breathiness and small personal shifts of each vowel's formants; each utterance is a fresh random
sequence of phone-like segments (vowels, nasals, fricatives, pauses); each session adds its own channel
colouring and level. Speakers therefore overlap: neighbours in this trait space are hard to tell apart
and the identity is never in one feature alone.
"""

import os

import numpy as np
import soundfile

RATE = 16000
# (F1, F2, F3) in Hz of a reference adult vocal tract, roughly the English monophthongs.
VOWELS = np.array([
    (730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (660, 1720, 2410), (570, 840, 2410),
    (440, 1020, 2240), (300, 870, 2240), (640, 1190, 2390), (490, 1350, 1690), (390, 1990, 2550),
])
NASALS = np.array([(280, 1300, 2300), (300, 1600, 2600)])
FRICATIVES = np.array([(4500, 2500), (6000, 1500), (2500, 1200), (3500, 3000)])  # centre, bandwidth


def lfilter(b, a, signal):
    """scipy.signal.lfilter, imported on the first call: every command imports this module (for the --demo
    corpus's paths), and scipy.signal takes 2 s to import."""
    from scipy.signal import lfilter as iir_filter
    return iir_filter(b, a, signal)


def draw_speaker(rng):
    return {
        'f0': float(np.exp(rng.normal(np.log(150), 0.3))),
        'f0_range': float(rng.uniform(0.05, 0.25)),
        'vocal_tract': float(rng.normal(1.0, 0.08)),
        'tilt': float(rng.uniform(0.55, 0.95)),
        'rate': float(rng.normal(11.0, 2.0)),
        'breath': float(rng.uniform(0.02, 0.25)),
        'vowel_shift': rng.normal(1.0, 0.06, size=VOWELS.shape),
        'bandwidth': float(rng.uniform(0.7, 1.4)),
    }


def draw_session(rng):
    """A recording condition: microphone tilt, one resonance of the room or device, background noise, level."""
    return {'channel': float(rng.uniform(-0.7, 0.7)), 'resonance': float(rng.uniform(300, 3000)),
            'resonance_gain': float(rng.uniform(0.0, 0.8)), 'snr': float(rng.uniform(10, 35)),
            'gain': float(10 ** rng.uniform(-1.3, -0.5))}


def resonate(signal, frequencies, bandwidths):
    """A cascade of two-pole resonators, each with unit gain at DC."""
    for f, b in zip(frequencies, bandwidths):
        f = min(f, 0.45 * RATE)
        r = np.exp(-np.pi * b / RATE)
        a = [1.0, -2 * r * np.cos(2 * np.pi * f / RATE), r * r]
        signal = lfilter([sum(a)], a, signal)
    return signal


def glottal_source(f0_track, tilt, breath, rng):
    """A pulse train following `f0_track` (Hz per sample), low-passed by the tilt, plus aspiration."""
    phase = np.cumsum(f0_track / RATE)
    pulses = np.diff(np.floor(phase), prepend=0.0)
    pulses *= 1 + 0.1 * rng.standard_normal(len(pulses))
    voiced = lfilter([1 - tilt], [1, -tilt], lfilter([1.0], [1, -0.9], pulses - pulses.mean()))
    voiced /= np.std(voiced) + 1e-9
    return voiced + breath * rng.standard_normal(len(voiced))


def synthesize(speaker, session, seconds, rng):
    """One utterance of about `seconds` by `speaker` in `session`, float32 in [-1, 1]."""
    n = int(seconds * RATE)
    ramp = int(0.008 * RATE)
    out = np.zeros(n + RATE)
    t = np.arange(n + RATE) / RATE
    contour = np.interp(t, np.linspace(0, t[-1], 8), rng.normal(0, 1, 8))
    f0_track = speaker['f0'] * (1 + speaker['f0_range'] * contour) * (1 - 0.1 * t / t[-1])
    source = glottal_source(f0_track, speaker['tilt'], speaker['breath'], rng)
    position = 0
    while position < n:
        length = int(RATE * rng.gamma(4.0, 0.25) / speaker['rate'])
        length = max(length, 3 * ramp)
        kind = rng.choice(['vowel', 'vowel', 'vowel', 'nasal', 'fricative', 'pause'], p=[.25, .25, .2, .1, .12, .08])
        segment_range = slice(position, position + length + ramp)
        excitation = source[segment_range]
        if kind == 'vowel':
            i = rng.integers(len(VOWELS))
            formants = VOWELS[i] * speaker['vowel_shift'][i] / speaker['vocal_tract']
            segment = resonate(excitation, formants, speaker['bandwidth'] * np.array([80, 100, 140]))
        elif kind == 'nasal':
            formants = NASALS[rng.integers(len(NASALS))] / speaker['vocal_tract']
            segment = 0.4 * resonate(excitation, formants, speaker['bandwidth'] * np.array([60, 200, 300]))
        elif kind == 'fricative':
            centre, width = FRICATIVES[rng.integers(len(FRICATIVES))]
            noise = rng.standard_normal(len(excitation))
            segment = 0.15 * resonate(noise, [centre / speaker['vocal_tract']], [width]) / 10
        else:
            segment = np.zeros(len(excitation))
        envelope = np.ones(len(segment))
        envelope[:ramp] = np.linspace(0, 1, ramp)
        envelope[-ramp:] = np.linspace(1, 0, ramp)
        out[segment_range] += segment * envelope * rng.uniform(0.6, 1.0)
        position += length
    out = out[:n]
    out = lfilter([1.0, -session['channel']], [1.0], out)
    out += session['resonance_gain'] * resonate(out, [session['resonance']], [200.0])
    noise = lfilter([1.0], [1.0, -0.7], rng.standard_normal(n))
    out += noise * np.sqrt(np.mean(out ** 2) / np.mean(noise ** 2) / 10 ** (session['snr'] / 10))
    return (session['gain'] * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def write(path, audio):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, audio, RATE)


def write_speakers(root, first_id, count, utterances, rng, seconds=(2.5, 6.0)):
    """`count` speakers, each with `utterances` files over up to three sessions, each lasting a uniform draw
    from `seconds`; returns the (speaker, relative path) pairs."""
    entries = []
    for s in range(count):
        name = f'id{first_id + s:05d}'
        speaker = draw_speaker(rng)
        sessions = [(f'session{k}', draw_session(rng)) for k in range(3)]
        for u in range(utterances):
            session_name, session = sessions[u % len(sessions)]
            rel = f'{name}/{session_name}/{u:05d}.wav'
            write(os.path.join(root, rel), synthesize(speaker, session, rng.uniform(*seconds), rng))
            entries.append((name, rel))
    return entries


def write_trials(path, entries, nontargets_per_target, rng):
    """Every same-speaker pair of utterances from different sessions, and `nontargets_per_target` times as
    many random different-speaker pairs."""
    trials = []
    for i, (si, ri) in enumerate(entries):
        for sj, rj in entries[i + 1:]:
            if si == sj and ri.split('/')[1] != rj.split('/')[1]:
                trials.append((1, ri, rj))
    n_target = len(trials)
    while len(trials) < n_target * (1 + nontargets_per_target):
        (si, ri), (sj, rj) = (entries[k] for k in rng.choice(len(entries), 2, replace=False))
        if si != sj:
            trials.append((0, ri, rj))
    with open(path, 'w') as f:
        f.writelines(f'{label} {a} {b}\n' for label, a, b in trials)


def write_musan(root, rng, chunks=12):
    for k in range(chunks):
        white = rng.standard_normal(5 * RATE)
        coloured = lfilter([1.0], [1, -rng.uniform(-0.5, 0.98)], white)
        hum = np.sin(2 * np.pi * rng.uniform(50, 60) * np.arange(5 * RATE) / RATE * np.arange(1, 4)[:, None]).sum(0)
        noise = coloured / np.std(coloured) + rng.uniform(0, 1) * hum
        write(os.path.join(root, 'noise', 'free-sound', f'noise-{k:04d}', '00000.wav'),
              (0.1 * noise / np.abs(noise).max()).astype(np.float32))
        t = np.arange(5 * RATE) / RATE
        notes = 110 * 2 ** (rng.integers(0, 24, size=10) / 12)
        pitch = notes[np.minimum((t * 2).astype(int), 9)]
        music = sum(np.sin(2 * np.pi * h * np.cumsum(pitch) / RATE) / h for h in range(1, 6))
        write(os.path.join(root, 'music', 'fma', f'music-{k:04d}', '00000.wav'),
              (0.1 * music / np.abs(music).max()).astype(np.float32))
        babble = synthesize(draw_speaker(rng), draw_session(rng), 5.0, rng)
        write(os.path.join(root, 'speech', 'librivox', f'speech-{k:04d}', '00000.wav'), babble)


def write_rirs(root, rng, rooms=6):
    for k in range(rooms):
        kind = 'smallroom' if k % 2 == 0 else 'mediumroom'
        rt60 = rng.uniform(0.2, 0.5) if kind == 'smallroom' else rng.uniform(0.4, 0.9)
        length = int(rt60 * RATE)
        decay = np.exp(-6.9 * np.arange(length) / length)
        rir = 0.3 * rng.standard_normal(length) * decay
        delay = int(rng.uniform(0.001, 0.005) * RATE)
        rir = np.concatenate([np.zeros(delay), [1.0], rir])
        write(os.path.join(root, kind, f'Room{k + 1:03d}', f'Room{k + 1:03d}-00001.wav'),
              (0.9 * rir / np.abs(rir).max()).astype(np.float32))


def corpus_paths(root):
    """Where `make_corpus(root)` puts each input, keyed by the training flag that takes it."""
    return {
        'train_list': os.path.join(root, 'voxceleb', 'train_list.txt'),
        'train_path': os.path.join(root, 'voxceleb', 'train', 'wav'),
        'eval_list': os.path.join(root, 'voxceleb', 'trials.txt'),
        'eval_path': os.path.join(root, 'voxceleb', 'test', 'wav'),
        'musan_path': os.path.join(root, 'musan_split'),
        'rir_path': os.path.join(root, 'RIRS_NOISES', 'simulated_rirs'),
    }


def make_corpus(root, train_speakers=80, test_speakers=20, utterances=24, seconds=(2.5, 6.0), seed=0):
    """Write the corpus under `root` unless a finished one is there, and return `corpus_paths(root)`."""
    paths = corpus_paths(root)
    done = os.path.join(root, 'COMPLETE')
    if os.path.exists(done):
        return paths
    rng = np.random.default_rng(seed)
    train = write_speakers(paths['train_path'], 10000, train_speakers, utterances, rng, seconds)
    with open(paths['train_list'], 'w') as f:
        f.writelines(f'{speaker} {rel}\n' for speaker, rel in train)
    test = write_speakers(paths['eval_path'], 20000, test_speakers, max(3, utterances // 4), rng, seconds)
    write_trials(paths['eval_list'], test, 3, rng)
    write_musan(paths['musan_path'], rng)
    write_rirs(paths['rir_path'], rng)
    open(done, 'w').close()
    return paths
