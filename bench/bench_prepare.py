"""Data preparation rates per core, the basis of exps/voxceleb/run.sh's estimates for its prepare and check
stages.

  python bench/bench_prepare.py [--files 40] [--seconds 8] [--json FILE]

Files: `--files` AAC (.m4a) files of `--seconds` each of generated speech at 16 kHz, as VoxCeleb2 ships
them (its mean utterance is about 8 s), encoded with PyAV. Timed in this process, per file: `prepare.py m4a`'s
conversion to wav (what each of its workers does); `--check_data`'s header read of a wav; its full decode and
check of a wav.
"""

import argparse
import os
import tempfile
import time

import av
import numpy as np

from common import environment, write_json
from speakerkit import demo
from speakerkit.prepare import convert_one, files_under, inspect_file


def write_m4a(path, audio, rate=16000):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, 'w', format='ipod') as out:
        stream = out.add_stream('aac', rate=rate, layout='mono')
        frame = av.AudioFrame.from_ndarray((audio * 32767).astype(np.int16)[None], format='s16', layout='mono')
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


def per_second(function, jobs):
    start = time.perf_counter()
    for job in jobs:
        function(job)
    return len(jobs) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--files', type=int, default=40)
    parser.add_argument('--seconds', type=float, default=8.0)
    parser.add_argument('--json', help='write the figures here')
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        speaker, session = demo.draw_speaker(rng), demo.draw_session(rng)
        for i in range(args.files):
            audio = demo.synthesize(speaker, session, args.seconds, rng)
            write_m4a(os.path.join(root, 'aac', f'id{i // 10:05d}', 'video', f'{i:05d}.m4a'), audio)
        sources = files_under(os.path.join(root, 'aac'), ('.m4a',))
        conversion = per_second(convert_one, [(os.path.join(root, 'aac', rel),
                                               os.path.join(root, 'wav', rel[:-len('.m4a')] + '.wav'), 16000)
                                              for rel in sources])
        wavs = [os.path.join(root, 'wav', rel) for rel in files_under(os.path.join(root, 'wav'), ('.wav',))]
        headers = per_second(inspect_file, [(path, False, True) for path in wavs * 50])
        decodes = per_second(inspect_file, [(path, True, True) for path in wavs * 5])
    rows = {'m4a_to_wav_files_per_s': conversion, 'header_reads_per_s': headers, 'full_decodes_per_s': decodes}
    for name, rate in rows.items():
        print(f'{name:<24} {rate:8.1f}  (one process, {args.seconds:g} s files)')
    write_json(args.json, {**environment(), 'files': args.files, 'seconds': args.seconds, **rows})


if __name__ == '__main__':
    main()
