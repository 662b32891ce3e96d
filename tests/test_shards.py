"""shards.py: packing a list into tar shards, and the stream read back from them through webdataset."""

import os
import pickle
import shutil
import signal

import numpy as np
import pytest
import torch
import webdataset

from speakerkit import prepare
from conftest import assert_same_checkpoints
from test_trainer import signal_at_step
from speakerkit.augment import Augmenter
from speakerkit.dataLoader import CropMaker, TrainDataset, collate
from speakerkit.errors import UserError
from speakerkit.lists import read_shard_list, read_train_list
from speakerkit.model import crop_samples
from speakerkit.shards import ShardDataset, epoch_shards, steps_per_epoch

RATE = 16000
FRAMES = 40


@pytest.fixture(scope='module')
def packed(tiny_shards):
    """The tiny corpus's 36 utterances in shards of 3 (12 shards)."""
    return read_shard_list(tiny_shards)


def stream(shard_list, augmenter, epoch, world_size, rank, workers, batch_size=3, steps_done=0):
    """The batches process `rank` of `world_size` trains on in `epoch`, made by `workers` loader workers."""
    crops = CropMaker(crop_samples(FRAMES, RATE), RATE, augmenter, len(shard_list.speakers))
    dataset = ShardDataset(shard_list, crops, seed=7, batch_size=batch_size,
                           steps=steps_per_epoch(shard_list, batch_size, world_size), world_size=world_size, rank=rank)
    dataset.set_epoch(epoch, steps_done)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return list(loader)


def test_epoch_shards_split_every_shard_once_over_processes_and_workers():
    for world_size, workers in ((1, 1), (2, 3), (3, 2)):
        for epoch in (1, 2):
            parts = [part for rank in range(world_size)
                     for part in epoch_shards(20, epoch, 5, world_size, rank, workers)]
            assert sorted(np.concatenate(parts).tolist()) == list(range(20))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert not np.array_equal(epoch_shards(20, 1, 5, 2, 0, 2)[0], epoch_shards(20, 2, 5, 2, 0, 2)[0])


def test_packed_shards_hold_every_utterance_once_with_its_speaker_and_path(tiny_corpus, packed):
    train_list = read_train_list(tiny_corpus['train_list'])
    assert packed.counts.tolist() == [3] * 12 and packed.speakers.tolist() == train_list.speakers.tolist()
    seen = {}
    for shard in packed.shards:
        for sample in webdataset.tarfile_samples([{'url': shard}]):
            seen[int(sample['__key__'])] = (sample['spk'].decode(), sample['path'].decode(), sample['wav'])
    assert sorted(seen) == list(range(len(train_list)))
    for index, (speaker, path, audio) in seen.items():
        assert (speaker, path) == train_list[index][:2]
        with open(os.path.join(tiny_corpus['train_path'], path), 'rb') as f:
            assert f.read() == audio


def test_shards_give_each_process_its_part_once_with_the_file_loaders_crops_and_labels(tiny_corpus, packed,
                                                                                         tmp_path):
    """Two processes x two loader workers: every utterance once per epoch, its crop and augmentation exactly
    those the file loader draws for it in that epoch, its label the list's."""
    augmenter = Augmenter(tiny_corpus['musan_path'], tiny_corpus['rir_path'], RATE, str(tmp_path / 'cache'))
    files = TrainDataset(read_train_list(tiny_corpus['train_list']), tiny_corpus['train_path'], FRAMES, RATE,
                         augmenter, seed=7)
    for epoch in (1, 2):
        expected = {i: files[(i, epoch)] for i in range(len(files))}
        found = []
        for rank in (0, 1):
            batches = stream(packed, augmenter, epoch, 2, rank, workers=2)
            assert len(batches) == 6 and all(len(labels) == 3 for _, labels, _ in batches)
            for (crops,), labels, skipped in batches:
                assert skipped == []
                for crop, label in zip(crops, labels.tolist()):
                    match = [i for i, (audio, _, _) in expected.items() if torch.equal(audio, crop)]
                    assert len(match) == 1 and expected[match[0]][1] == label
                    found.append(match[0])
        assert sorted(found) == list(range(len(files)))


def test_a_stream_resumed_after_some_batches_gives_the_same_batches(packed):
    whole = stream(packed, None, 3, 1, 0, workers=2)
    assert len(whole) == 12
    for done in (1, 4, 7):
        rest = stream(packed, None, 3, 1, 0, workers=2, steps_done=done)
        assert len(rest) == 12 - done
        for ((a,), la, _), ((b,), lb, _) in zip(whole[done:], rest):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_every_process_takes_the_same_steps_when_shards_hold_unequal_counts(tiny_corpus, tmp_path):
    prepare.main(['shards', tiny_corpus['train_list'], tiny_corpus['train_path'], str(tmp_path), '--per_shard', '5',
                  '--workers', '1'])
    shard_list = read_shard_list(str(tmp_path / 'shards.txt'))
    assert shard_list.counts.tolist() == [5] * 7 + [1]
    for epoch in (1, 2, 3):
        counts = [len(stream(shard_list, None, epoch, 3, rank, workers=2, batch_size=2)) for rank in range(3)]
        assert counts == [36 // 3 // 2] * 3


def write_tar(path, samples):
    writer = webdataset.TarWriter(str(path))
    for sample in samples:
        writer.write(sample)
    writer.close()


def test_bad_shards_are_skipped_and_named_like_bad_files(tiny_corpus, packed, tmp_path):
    """A truncated tar file, a sample without a speaker, one of an unknown speaker and one whose audio does not
    decode are each reported with the shard and the reason; the stream goes on with the next good sample."""
    folder = tmp_path / 'bad'
    shutil.copytree(os.path.dirname(packed.path), folder)
    good = open(packed.shards[0], 'rb').read()
    (folder / 'shard-000000.tar').write_bytes(good[:len(good) // 2])  # cut in the middle of a member
    first = next(webdataset.tarfile_samples([{'url': packed.shards[1]}]))
    write_tar(folder / 'shard-000001.tar', [
        {'__key__': '000000900', 'wav': first['wav'], 'path': b'x/no_speaker.wav'},
        {'__key__': '000000901', 'wav': first['wav'], 'spk': b'nobody', 'path': b'x/unknown.wav'},
        {'__key__': '000000902', 'wav': b'not audio at all', 'spk': first['spk'], 'path': b'x/garbage.wav'},
        {'__key__': '000000903', 'pyd': pickle.dumps((os.system, (f'touch {tmp_path / "executed"}',))),
         'spk': first['spk'], 'path': b'x/pickled.wav'}])  # a pickle is never loaded
    shard_list = read_shard_list(str(folder / 'shards.txt'))
    batches = stream(shard_list, None, 1, 1, 0, workers=0)
    assert len(batches) == 12 and all(len(labels) == 3 for _, labels, _ in batches)
    skipped = [entry for _, _, found in batches for entry in found]
    reasons = {path.split(str(folder) + os.sep)[-1]: why for path, why in skipped}
    assert reasons['shard-000001.tar:x/no_speaker.wav'] == 'no speaker label (.spk member)'
    assert reasons['shard-000001.tar:x/unknown.wav'] == "speaker 'nobody' is not in speakers.txt"
    assert reasons['shard-000001.tar:x/garbage.wav'].startswith('unreadable: ')
    truncated = [(path, why) for path, why in skipped if path == str(folder / 'shard-000000.tar')]
    assert len(truncated) == 1 and truncated[0][1].startswith('unreadable tar file: '), skipped
    assert reasons['shard-000001.tar:x/pickled.wav'].startswith('unreadable: neither libsndfile nor FFmpeg reads')
    assert not (tmp_path / 'executed').exists()


def test_a_shard_list_names_its_bad_lines_and_speakers(packed, tmp_path):
    folder = tmp_path / 'list'
    shutil.copytree(os.path.dirname(packed.path), folder)
    (folder / 'shards.txt').write_text('shard-000000.tar 3\nshard-000001.tar three\n')
    with pytest.raises(UserError, match=r"shards.txt:2: expected '<tar file> <number of utterances in it>'"):
        read_shard_list(str(folder / 'shards.txt'))
    (folder / 'shards.txt').write_text('shard-000000.tar 3\nshard-999999.tar 3\n')
    with pytest.raises(UserError, match=r'shards.txt: 1 files not under .*shards.txt:2: .*shard-999999.tar'):
        read_shard_list(str(folder / 'shards.txt'))
    (folder / 'shards.txt').write_text('shard-000000.tar 3\n')
    (folder / 'speakers.txt').write_text('id2\nid1\n')
    with pytest.raises(UserError, match=r"speakers.txt: speaker 'id1' \(entry 2\) is not after 'id2'"):
        read_shard_list(str(folder / 'shards.txt'))


@pytest.mark.slow
def test_training_from_shards_stopped_inside_an_epoch_continues_exactly_and_refuses_the_pair_modes(
        packed, tiny_corpus, tmp_path, cli_error, monkeypatch):
    """Two loader workers, stopped by SIGTERM after step 3 of epoch 2 (6 steps an epoch): the workers' turns
    and the batches already trained are taken up where they were."""
    from speakerkit import cli
    from speakerkit.trainer import TrainingStep

    def argv(save_path, *extra):
        return ['--train_shards', packed.path, '--eval_list', tiny_corpus['eval_list'], '--eval_path',
                tiny_corpus['eval_path'], '--save_path', str(save_path), '--C', '16', '--num_frames', '40',
                '--batch_size', '6', '--n_cpu', '2', '--seed', '5', '--max_epoch', '2', *extra]
    cli.main(argv(tmp_path / 'straight'))
    _, original_step = signal_at_step(monkeypatch, 9, signal.SIGTERM)
    assert cli.main(argv(tmp_path / 'stopped')) is False
    state = torch.load(tmp_path / 'stopped' / 'model' / 'resume.pt', weights_only=True)
    assert state['epoch'] == 1 and state['partial_epoch'][0]['step'] == 3
    monkeypatch.setattr(TrainingStep, '__call__', original_step)
    cli.main(argv(tmp_path / 'stopped'))
    assert_same_checkpoints(tmp_path / 'straight' / 'model' / 'model_0002.model',
                            tmp_path / 'stopped' / 'model' / 'model_0002.model')
    assert (tmp_path / 'straight' / 'score.txt').read_text() == (tmp_path / 'stopped' / 'score.txt').read_text()
    status, err, _ = cli_error(argv(tmp_path / 'clip', '--mode', 'clip'))
    assert status == 2 and '--train_shards streams utterances in a shuffled order' in err
    status, err, _ = cli_error(argv(tmp_path / 'both', '--train_list', tiny_corpus['train_list']))
    assert status == 2 and 'give one of them' in err
