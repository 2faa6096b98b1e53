"""processes="auto", the default: decode processes where they pay (8 CPUs or more, an epoch
of at least 500 images per process, room in /dev/shm), threads elsewhere; and what comes
with it: the shuffle buffer is the reader's total, shared by its batch streams, and a
resumed "auto" reader takes the number of streams its state was saved under.

Many-CPU machines are faked by their CPU count (``_default_workers``); the processes, the
shards and the readers are real.
"""

from __future__ import annotations

import logging

import pytest
from conftest import sample_ids

import reader.batches as batches
import reader.processes as processes_module
import reader.shard_reader as shard_reader
from reader import ShardReader, image_dataset_from_shards
from reader.batches import auto_processes
from reader.state import SHARED_BUFFER_ORDER, STATE_VERSION, make_state

OPTIONS = dict(split="train", image_size=16, batch_size=50, num_workers=2)


def _ids(batches_) -> list[list[int]]:
    return [sample_ids(x) for x, _y in batches_]


@pytest.mark.parametrize("cpus,samples,want", [
    (16, None, 8), (16, 100_000, 8), (16, 4_000, 8), (16, 3_999, 7), (16, 1_000, 2), (16, 999, 0),
    (64, 12_000, 24), (4, 100_000, 0),
])
def test_auto_gives_each_process_at_least_500_images(cpus, samples, want):
    """A process starts in about half a second of one core, a few hundred decodes: an epoch
    with fewer images per process (a small validation split, a test's) is sooner over on
    threads; one process is none (its threads would do the same in this one)."""
    assert auto_processes(cpus, 50_000, samples=samples) == want


def test_auto_is_the_default_and_threads_below_8_cpus(awkward_shards, monkeypatch):
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 4)
    reader = ShardReader(awkward_shards, **OPTIONS)
    assert reader.processes_auto and reader.processes == 0


def test_on_many_cpus_the_default_reader_and_dataset_decode_in_processes(awkward_shards, monkeypatch):
    """On 16 CPUs (faked) the default picks processes for the 1,001 training images (2 of
    them: 500 images each at least) and none for the 10 of "small"; its epochs are those of
    processes=2, batch for batch, in numpy and through tf.data."""
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    default = ShardReader(awkward_shards, seed=4, **OPTIONS)
    two = ShardReader(awkward_shards, seed=4, processes=2, **OPTIONS)
    assert ShardReader(awkward_shards, **dict(OPTIONS, split="small")).processes == 0
    pytest.importorskip("tensorflow")
    ds = image_dataset_from_shards(awkward_shards, seed=4, verbose=False, **OPTIONS)
    try:
        assert default.processes == 2 and default.num_workers == 2
        want = _ids(two)
        assert _ids(default) == want
        assert ds.shard_reader.processes == 2
        assert [sample_ids(x.numpy()) for x, _y in ds] == want
    finally:
        for r in (default, two, ds.shard_reader):
            r.close()


def test_auto_takes_threads_where_dev_shm_cannot_hold_the_batches(awkward_shards, monkeypatch, caplog):
    """Docker gives a container 64 MB of /dev/shm: too little for one process's float32
    batches of 64 x 224 x 224 (38.5 MB each, four as it starts). "auto" then decodes on
    threads and says why once; explicit processes= are the caller's choice and still fail
    with the remedy when they start. /dev/shm's size counts, shared by the local ranks, not
    its free bytes (the ranks of a job pick alike whenever each makes its reader)."""
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    monkeypatch.setattr(shard_reader, "_said_shared_memory", False)
    options = dict(OPTIONS, image_size=224, batch_size=64, num_workers=None)
    for module in (processes_module, shard_reader):
        monkeypatch.setattr(module, "shared_memory_size", lambda: 64 * 10**6)
    with caplog.at_level(logging.WARNING, logger="shardpack.reader"):
        reader = ShardReader(awkward_shards, **options)
        again = ShardReader(awkward_shards, **options)
    assert reader.processes == again.processes == 0
    said = [r.getMessage() for r in caplog.records if "/dev/shm" in r.getMessage()]
    assert len(said) == 1 and "holds 64 MB" in said[0] and "--shm-size" in said[0]
    assert len(_ids(reader)) == len(reader)  # threads read it
    # room for two processes' starting batches twice over, not for more
    need = processes_module.starting_bytes(2, 8, 64, 64 * 224 * 224 * 3 * 4)
    for module in (processes_module, shard_reader):
        monkeypatch.setattr(module, "shared_memory_size", lambda: 2 * need)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 100)
    assert ShardReader(awkward_shards, **options).processes == 2
    # 4 ranks of this machine share it: none each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 64)
    assert ShardReader(awkward_shards, **options).processes == 0


def _streams(reader: ShardReader, streams: int) -> list[list[int]]:
    """Each batch stream's samples, in the order it made them (the streams take turns)."""
    out: list[list[int]] = [[] for _ in range(streams)]
    for i, ids in enumerate(_ids(reader)):
        out[i % streams] += ids
    return out


def _earliest(awkward_shards, stream: list[int]) -> int:
    """How many places at most a sample of ``stream`` came out before its place in what the
    stream read (a run of the epoch's shards: each shard's part of it one after the other,
    in the order of their middle samples' places): at most the shuffle buffer's size less
    one, whatever the random draws."""
    listing = ShardReader(awkward_shards, **dict(OPTIONS, shuffle=False, processes=0))
    where = {}
    for shard, ids in enumerate(_chunks([i for b in _ids(listing) for i in b], listing.shard_counts())):
        where.update({sid: (shard, n) for n, sid in enumerate(ids)})
    places: dict[int, list[tuple[int, int]]] = {}  # shard -> (index, place out) of its part
    for out, sid in enumerate(stream):
        shard, n = where[sid]
        places.setdefault(shard, []).append((n, out))
    start, read = {}, 0
    for shard, part in sorted(places.items(), key=lambda kv: sorted(o for _, o in kv[1])[len(kv[1]) // 2]):
        first, last = min(n for n, _ in part), max(n for n, _ in part)
        start[shard], read = read - first, read + last - first + 1
    return max(start[where[sid][0]] + where[sid][1] - out for out, sid in enumerate(stream))


def _chunks(items: list[int], counts: list[int]) -> list[list[int]]:
    out, start = [], 0
    for count in counts:
        out.append(items[start:start + count])
        start += count
    return out


def test_decode_processes_share_the_shuffle_buffer(awkward_shards):
    """``shuffle_buffer`` is the reader's total, as ``shuffle_buffer_bytes`` is: 2 decode
    processes hold 1/2 each. With 4 samples and no interleaving, a sample comes out at most
    1 place early in its stream (a buffer of 2), where a buffer of 4 each (before: N times
    the memory; with "auto" the default, 8 processes would hold 80,000 ImageNet JPEGs,
    about 9 GB) lets it come 3 early. A buffer of 2 is the least a stream gets (1 would
    shuffle nothing)."""
    shared = ShardReader(awkward_shards, seed=3, processes=2, shuffle_buffer=4, interleave=1, **OPTIONS)
    wider = ShardReader(awkward_shards, seed=3, processes=2, shuffle_buffer=8, interleave=1, **OPTIONS)
    least = ShardReader(awkward_shards, seed=3, processes=3, shuffle_buffer=3, interleave=1, **OPTIONS)
    try:
        assert [_earliest(awkward_shards, s) for s in _streams(shared, 2)] == [1, 1]
        assert [_earliest(awkward_shards, s) for s in _streams(wider, 2)] == [3, 3]
        assert [_earliest(awkward_shards, s) for s in _streams(least, 3)] == [1, 1, 1]
    finally:
        for r in (shared, wider, least):
            r.close()


def test_pytorch_loader_workers_share_the_shuffle_buffer(awkward_shards):
    """The same for a DataLoader's workers (whose stream a state saved under processes=2
    resumes: they are the same batches, in the same order)."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    ds = ShardIterableDataset(awkward_shards, seed=3, shuffle_buffer=4, interleave=1, channels_last=True,
                              **{k: v for k, v in OPTIONS.items() if k != "num_workers"})
    got: list[list[int]] = [[], []]
    for i, (x, _y) in enumerate(DataLoader(ds, batch_size=None, num_workers=2)):
        got[i % 2] += sample_ids(x.permute(0, 2, 3, 1).numpy())
    assert [_earliest(awkward_shards, s) for s in got] == [1, 1]


def test_states_of_shared_buffers_are_version_4_and_earlier_ones_are_refused_inside_an_epoch(awkward_shards):
    """A state saved inside a shuffled epoch under 2 streams by an earlier release (no
    ``shared_buffer``: each stream held the whole buffer) cannot be resumed exactly now, and
    says so; earlier releases refuse the new ones by their version. States of one stream,
    and any at an epoch's start, are as before."""
    two = ShardReader(awkward_shards, seed=7, processes=2, **OPTIONS)
    state = make_state(two, epoch=0, batches=4)
    assert state["version"] == STATE_VERSION == 4 and state["shared_buffer"] == SHARED_BUFFER_ORDER
    earlier = {k: v for k, v in state.items() if k != "shared_buffer"} | {"version": 1}
    with pytest.raises(ValueError, match="each held the whole shuffle buffer"):
        ShardReader(awkward_shards, processes=2, **OPTIONS).load_state_dict(earlier)
    at_start = make_state(two, epoch=1, batches=0) | {"version": 1}
    at_start.pop("shared_buffer")
    ShardReader(awkward_shards, processes=2, **OPTIONS).load_state_dict(at_start)
    one = make_state(ShardReader(awkward_shards, seed=7, processes=0, **OPTIONS), epoch=0, batches=4)
    assert one["version"] == 1
    unshuffled = make_state(ShardReader(awkward_shards, processes=2, shuffle=False, **OPTIONS), epoch=0, batches=4)
    assert unshuffled["version"] == 1


def test_a_resumed_default_dataset_takes_the_saved_streams(awkward_shards):
    """PyTorch: a state saved by 2 loader workers, loaded into a dataset left to "auto" and
    read without loader workers, resumes under 2 decode processes: the rest of the epoch."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    options = {k: v for k, v in OPTIONS.items() if k != "num_workers"}
    whole = ShardIterableDataset(awkward_shards, seed=5, channels_last=True, **options)
    want = [sample_ids(x.permute(0, 2, 3, 1).numpy()) for x, _y in DataLoader(whole, batch_size=None, num_workers=2)]
    saved = make_state(whole.reader, epoch=0, batches=3, streams=2)
    resumed = ShardIterableDataset(awkward_shards, channels_last=True, **options)
    resumed.load_state_dict(saved)
    try:
        got = [sample_ids(x.permute(0, 2, 3, 1).numpy()) for x, _y in DataLoader(resumed, batch_size=None)]
        assert resumed.reader.processes == 2  # taken as the pass began, for this epoch
    finally:
        resumed.reader.close()
    assert got == want[3:]


def test_single_images_from_processes_keep_the_datasets_cardinality(awkward_shards, monkeypatch):
    """``image_dataset_from_shards(batch_size=None)`` counts samples, not batches; read by
    the decode processes "auto" takes on 16 CPUs it yields every training image once."""
    pytest.importorskip("tensorflow")
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    ds = image_dataset_from_shards(awkward_shards, seed=2, verbose=False,
                                   **dict(OPTIONS, batch_size=None))
    try:
        assert ds.shard_reader.processes == 2
        ids = [sample_ids(x.numpy()[None])[0] for x, _y in ds]
    finally:
        ds.shard_reader.close()
    assert len(ids) == int(ds.cardinality()) == 1001 and len(set(ids)) == 1001


def test_tars_without_a_manifest_take_processes_only_once_counted(tmp_path, monkeypatch):
    """Tars without a manifest say how many images they hold only once scanned: "auto"
    counts them where the reader scans anyway (no ``num_classes``: the classes are found in
    the shards), and stays on threads where it would have to scan to count."""
    from conftest import write_id_tars

    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 30)
    url = write_id_tars(tmp_path, 90, set(), 30)
    scanned = ShardReader(url, image_size=8, batch_size=10)
    assert scanned.processes == 3  # 90 images, 30 each
    assert ShardReader(url, image_size=8, batch_size=10, num_classes=3).processes == 0
