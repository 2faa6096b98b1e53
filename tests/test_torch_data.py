"""ShardIterableDataset with a real DataLoader and worker processes."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import sample_ids, write_id_tars

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from reader.torch_data import ShardIterableDataset  # noqa: E402

TRAIN = 1001
OPTIONS = dict(split="train", image_size=16, batch_size=64, shuffle_buffer=200, decode_threads=1)


def _epoch(loader) -> list[list[int]]:
    return [sample_ids(x.permute(0, 2, 3, 1)) for x, _y in loader]


def test_two_workers_cover_every_sample_once_per_epoch(awkward_shards):
    ds = ShardIterableDataset(awkward_shards, seed=3, **OPTIONS)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert len(loader) == len(ds) == 16
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        x, y = batches[0]
        assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.dtype == torch.int64
        ids = [i for x, _y in batches for i in sample_ids(x.permute(0, 2, 3, 1))]
        assert sorted(ids) == list(range(TRAIN))
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # set_epoch gives a new order


def test_ranks_times_workers(awkward_shards):
    seen, lengths = Counter(), set()
    for rank in range(2):
        ds = ShardIterableDataset(awkward_shards, rank=rank, world_size=2, **OPTIONS)
        batches = _epoch(DataLoader(ds, batch_size=None, num_workers=2))
        lengths.add((len(ds), len(batches)))
        seen.update(i for b in batches for i in b)
    assert lengths == {(8, 8)}  # 501 samples per rank
    assert set(seen) == set(range(TRAIN)) and sum(seen.values()) == 1002


def test_no_workers_is_the_shard_reader_stream(awkward_shards):
    from reader import ShardReader

    ds = ShardIterableDataset(awkward_shards, seed=3, channels_last=True, **OPTIONS)
    x, _ = next(iter(ds))
    assert x.shape == (64, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    options = {k: v for k, v in OPTIONS.items() if k != "decode_threads"}
    r = ShardReader(awkward_shards, seed=3, num_workers=1, **options)
    ds.set_epoch(0)
    assert _epoch(DataLoader(ds, batch_size=None)) == [sample_ids(x) for x, _y in r]


def test_uint8_tensors(awkward_shards):
    ds = ShardIterableDataset(awkward_shards, seed=3, dtype="uint8", **OPTIONS)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert {x.dtype for x, _ in batches} == {torch.uint8}
    ids = [i for x, _y in batches for i in sample_ids(x.permute(0, 2, 3, 1))]
    assert sorted(ids) == list(range(TRAIN))


@pytest.mark.parametrize("k", [3, 8])
def test_resume_with_workers(awkward_shards, k):
    ds = ShardIterableDataset(awkward_shards, seed=11, **OPTIONS)
    ds.set_epoch(1)
    full = _epoch(DataLoader(ds, batch_size=None, num_workers=2))
    state = ds.state_dict(batches=k)  # the loop trained on k batches, then the job died
    assert (state["epoch"], state["batches"]) == (1, k)
    again = ShardIterableDataset(awkward_shards, **OPTIONS)
    again.load_state_dict(state)
    again.set_epoch(1)  # as the training loop does: keeps the loaded position
    assert _epoch(DataLoader(again, batch_size=None, num_workers=2)) == full[k:]


def test_persistent_workers_follow_set_epoch_and_state_dict_follows_them(awkward_shards):
    """Persistent loader workers keep their copies of the dataset: they moved on by
    themselves (state_dict then said epoch 0 during epoch 1, and a resume replayed epoch 0)
    and never saw a later set_epoch or load_state_dict."""
    def epoch_of(epoch: int) -> list[list[int]]:  # what a fresh loader reads for that epoch
        ds = ShardIterableDataset(awkward_shards, seed=5, **OPTIONS)
        ds.set_epoch(epoch)
        return _epoch(DataLoader(ds, batch_size=None, num_workers=2))

    ds = ShardIterableDataset(awkward_shards, seed=5, **OPTIONS)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    assert _epoch(loader) == epoch_of(0)
    second = _epoch(loader)  # no set_epoch: the workers move on to epoch 1
    assert second == epoch_of(1)
    state = ds.state_dict(batches=3)
    assert (state["epoch"], state["batches"]) == (1, 3)
    ds.set_epoch(5)  # after the workers started: they follow it
    assert _epoch(loader) == epoch_of(5)
    ds.load_state_dict(state)  # and a resume
    assert _epoch(loader) == second[3:]
    other = ShardIterableDataset(awkward_shards, seed=7, **OPTIONS)  # a state of another seed:
    other.set_epoch(2)
    full = _epoch(DataLoader(other, batch_size=None, num_workers=2))
    ds.load_state_dict(other.state_dict(batches=4))  # the workers take its seed too
    assert _epoch(loader) == full[4:]


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_nchw_is_written_by_the_decode_threads(photo_shards, dtype):
    """Contiguous NCHW tensors come from the reader as they are (its decode threads write
    channel planes; no permute().contiguous() of whole batches): the channels-last
    tensors' pixels, exactly for uint8, within the rounding of a resize for float32."""
    opts = dict(split="train", image_size=(24, 20), batch_size=16, seed=2, dtype=dtype)
    nchw = list(ShardIterableDataset(photo_shards, **opts))
    last = list(ShardIterableDataset(photo_shards, channels_last=True, **opts))
    assert len(nchw) == len(last) > 1
    for (x, y), (xl, yl) in zip(nchw, last, strict=True):
        assert x.shape == xl.shape == (len(y), 3, 24, 20) and x.is_contiguous()
        assert xl.is_contiguous(memory_format=torch.channels_last)
        diff = (x.float() - xl.float()).abs()
        assert diff.max() <= (0 if dtype == "uint8" else 1)
        assert torch.equal(y, yl)
    with pytest.raises(TypeError, match="channels_last"):
        ShardIterableDataset(photo_shards, data_format="channels_first", **opts)


def test_num_workers_is_the_loaders(awkward_shards):
    with pytest.raises(TypeError, match="decode_threads"):
        ShardIterableDataset(awkward_shards, split="train", num_workers=2)


def test_processes_give_the_loader_workers_stream(awkward_shards):
    """ShardReader(processes=2) in numpy, and ShardIterableDataset(processes=2) in a loader
    without workers, are PyTorch's DataLoader with 2 workers, batch for batch; processes=
    inside loader workers is refused."""
    import numpy as np

    from reader import ShardReader

    opts = dict(image_size=8, batch_size=5, seed=4, random_flip=True)
    ds = ShardIterableDataset(awkward_shards, **opts)
    want = [(x.numpy(), y.numpy()) for x, y in DataLoader(ds, batch_size=None, num_workers=2)]
    reader = ShardReader(awkward_shards, processes=2, data_format="channels_first", **opts)
    in_processes = ShardIterableDataset(awkward_shards, processes=2, **opts)
    try:
        got = [(x.copy(), y) for x, y in reader]
        tensors = [(x.numpy().copy(), y.numpy()) for x, y in DataLoader(in_processes, batch_size=None)]
        with pytest.raises(RuntimeError, match="num_workers=0"):
            next(iter(DataLoader(in_processes, batch_size=None, num_workers=2)))
    finally:
        reader.close()
        in_processes.reader.close()
    assert len(got) == len(tensors) == len(want) == len(reader)
    for (xg, yg), (xt, yt), (xw, yw) in zip(got, tensors, want, strict=True):
        assert np.array_equal(xg, xw) and np.array_equal(yg, yw)
        assert np.array_equal(xt, xw) and np.array_equal(yt, yw)


def test_processes_and_loader_workers_draw_the_same_augmentations_on_photos(photo_shards):
    """The test above reads one-colour images, where a flip does not show: on photos,
    processes=2 in a loader without workers and 2 loader workers give the same crops and
    flips, batch for batch (README: "the same batches as N loader workers")."""
    import numpy as np

    opts = dict(split="train", image_size=(24, 20), batch_size=8, seed=6, random_flip=True,
                random_crop=(0.3, 0.9), dtype="uint8")
    want = [(x.numpy(), y.numpy()) for x, y in DataLoader(ShardIterableDataset(photo_shards, **opts),
                                                          batch_size=None, num_workers=2)]
    in_processes = ShardIterableDataset(photo_shards, processes=2, **opts)
    try:
        got = [(x.numpy().copy(), y.numpy()) for x, y in DataLoader(in_processes, batch_size=None)]
    finally:
        in_processes.reader.close()
    plain = [x.numpy() for x, _ in DataLoader(ShardIterableDataset(
        photo_shards, **dict(opts, random_flip=False, random_crop=None)), batch_size=None, num_workers=2)]
    assert not np.array_equal(want[0][0], plain[0])  # the augmentations show on these images
    assert len(got) == len(want) > 2
    for (x, y), (xw, yw) in zip(got, want, strict=True):
        assert np.array_equal(y, yw) and np.array_equal(x, xw)


def _resume_from(awkward_shards, state, loader_workers, **options):
    again = ShardIterableDataset(awkward_shards, **OPTIONS, **options)
    again.load_state_dict(state)
    try:
        return _epoch(DataLoader(again, batch_size=None, num_workers=loader_workers))
    finally:
        again.reader.close()


def test_a_state_records_the_loader_workers_and_a_resume_under_others_is_refused(awkward_shards):
    """The epoch is split among the loader's workers, so a state from 2 workers continues
    the same epoch only with 2; with 3, or with 0 and no decode processes, the rest would be
    other batches: refused. With 0, a dataset left to processes="auto" (the default) takes
    2 decode processes, the same stream."""
    ds = ShardIterableDataset(awkward_shards, seed=5, **OPTIONS)
    full = _epoch(DataLoader(ds, batch_size=None, num_workers=2))
    state = ds.state_dict(batches=5)
    assert state["streams"] == 2
    assert _resume_from(awkward_shards, state, 2) == full[5:]
    for workers, options in ((0, {"processes": 0}), (3, {})):
        with pytest.raises(ValueError, match="num_workers=2"):
            _resume_from(awkward_shards, state, workers, **options)
    assert _resume_from(awkward_shards, state, 0) == full[5:]
    next(iter(ds))  # a look at a batch in this process does not change what the workers said
    assert ds.state_dict(batches=5)["streams"] == 2
    ds.set_epoch(1)  # a new epoch read without loader workers: the dataset's own streams
    assert len(_epoch(DataLoader(ds, batch_size=None))) == len(ds)
    assert ds.state_dict(batches=5)["streams"] == (ds.reader.processes or 1)  # "auto": 1 below 8 CPUs
    # saved again after a resume, before any batch: still the loaded number
    again = ShardIterableDataset(awkward_shards, **OPTIONS)
    again.load_state_dict(state)
    assert again.state_dict(batches=5)["streams"] == 2


def test_a_state_of_shardpack_0_2_0_from_loader_workers_resumes(awkward_shards):
    """0.2.0 wrote ``processes: 0`` for a dataset read by any number of loader workers:
    unknown, so not held against the resume."""
    ds = ShardIterableDataset(awkward_shards, seed=5, **OPTIONS)
    full = _epoch(DataLoader(ds, batch_size=None, num_workers=2))
    state = ds.state_dict(batches=5)
    legacy = {k: v for k, v in state.items() if k != "streams"} | {"processes": 0}
    assert _resume_from(awkward_shards, legacy, 2) == full[5:]


def test_processes_and_loader_workers_resume_each_other(awkward_shards):
    """processes=2 without loader workers and 2 loader workers are one stream: a state of
    either resumes under the other, batch for batch; not under processes=0 without loader
    workers, and "auto" (the default) takes the state's 2."""
    opts = dict(seed=6)
    in_processes = ShardIterableDataset(awkward_shards, processes=2, **OPTIONS, **opts)
    try:
        full = _epoch(DataLoader(in_processes, batch_size=None))
        state = in_processes.state_dict(batches=4)
    finally:
        in_processes.reader.close()
    assert state["streams"] == 2
    assert _resume_from(awkward_shards, state, 2) == full[4:]
    with pytest.raises(ValueError, match="processes=2"):
        _resume_from(awkward_shards, state, 0, processes=0)
    assert _resume_from(awkward_shards, state, 0) == full[4:]
    workers = ShardIterableDataset(awkward_shards, **OPTIONS, **opts)
    assert _epoch(DataLoader(workers, batch_size=None, num_workers=2)) == full
    assert _resume_from(awkward_shards, workers.state_dict(batches=7), 0, processes=2) == full[7:]


def test_an_epoch_boundary_resumes_under_any_workers(awkward_shards):
    ds = ShardIterableDataset(awkward_shards, seed=7, **OPTIONS)
    _epoch(DataLoader(ds, batch_size=None, num_workers=2))
    state = ds.state_dict(batches=len(ds))  # the whole epoch: (1, 0)
    assert (state["epoch"], state["batches"], state["streams"]) == (1, 0, 2)
    ds.set_epoch(1)
    want = _epoch(DataLoader(ds, batch_size=None, num_workers=3))
    assert _resume_from(awkward_shards, state, 3) == want


@pytest.mark.slow
def test_spawned_loader_workers_and_copies_are_recorded(awkward_shards):
    """Workers started by spawn (forkserver: the default from Python 3.14) get the dataset
    pickled; the worker count still reaches the main process's state. A pickled or deep-
    copied dataset counts its own loader's workers."""
    ds = ShardIterableDataset(awkward_shards, seed=8, **OPTIONS)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert len(_epoch(loader)) == len(ds)
    assert ds.state_dict(batches=3)["streams"] == 2
    import copy
    import pickle

    for other in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert other.state_dict(batches=3)["streams"] == 2  # a copy of what it knew
        other.set_epoch(1)
        assert other.state_dict(batches=3)["streams"] == (other.reader.processes or 1)
        assert len(_epoch(DataLoader(other, batch_size=None, num_workers=3))) == len(ds)
        assert other.state_dict(batches=3)["streams"] == 3  # its own loader's workers
        assert ds.state_dict(batches=3)["streams"] == 2


def test_shuffle_false_through_loader_workers_follows_the_readers_labels(id_shards):
    """Loader workers decode the batches w, w + K, ... of the manifest order with
    shuffle=False, so the loader's batches line up with ``reader.labels`` (predictions)."""
    import torch

    ds = ShardIterableDataset(id_shards[0], split="test", image_size=4, batch_size=4, shuffle=False)
    labels = torch.cat([y for _, y in DataLoader(ds, batch_size=None, num_workers=3)])
    assert labels.tolist() == ds.reader.labels.tolist()


def test_spawned_loader_workers_get_the_counts_of_a_scan_not_the_scan(id_shards):
    """Manifest-less tars are scanned once, when the dataset is made; a spawned loader
    worker's pickled copy carries the counts, not a path, label and class per sample."""
    import pickle

    tars = sorted(str(p) for p in (id_shards[0] / "train").glob("*.tar"))
    ds = ShardIterableDataset(tars, num_classes=3, image_size=4, batch_size=16, shuffle=False)
    ds.reader.labels  # noqa: B018 - the scan itself stays in this process
    # the copy is the options and counts (~2.5 KB); the scan of 210 samples would add ~9 KB
    assert len(pickle.dumps(ds)) < 5000
    copy = pickle.loads(pickle.dumps(ds))
    assert len(copy) == len(ds) == 14
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    labels = [y for _, y in loader]
    assert len(labels) == 14 and sum(len(y) for y in labels) == 210


@pytest.mark.parametrize("processes", [0, 3])
def test_without_loader_workers_a_resume_after_failed_samples_is_exact(tmp_path, processes):
    """Without loader workers the reader counts the batches: failed samples before the
    position (and, with processes=, the turns they shifted) are in the state; so is the
    repeat of the first batches that fills up the epoch the failures made short."""
    tars = write_id_tars(tmp_path, 120, set(range(20, 30)) | {3, 71, 72}, 40)
    opts = dict(num_classes=3, image_size=16, batch_size=4, shuffle_buffer=32, on_error="ignore",
                decode_threads=2, seed=4, processes=processes)
    ds = ShardIterableDataset(tars, **opts)
    try:
        full = _epoch(DataLoader(ds, batch_size=None))
        states = {k: ds.state_dict(batches=k) for k in (2, 9, len(full) - 4, len(full) - 2)}
    finally:
        ds.reader.close()
    assert len(full) == len(ds)
    assert states[len(full) - 4].get("failed_before")  # by then most have failed
    if not processes:  # 107 samples: 27 batches of 4, then the first 3 again
        assert states[len(full) - 2]["lap"] == 27 and full[27:] == full[:3]
    for k, state in states.items():
        again = ShardIterableDataset(tars, **opts)
        try:
            again.load_state_dict(state)
            assert again.state_dict(batches=k) == state  # saved again before reading
            assert _epoch(DataLoader(again, batch_size=None)) == full[k:], k
        finally:
            again.reader.close()


def test_loader_workers_resume_a_worker_less_state_after_failed_samples(tmp_path):
    """A state of processes=3 without loader workers (failed samples) resumes under 3
    loader workers batch for batch: they take the same turns, until a share of the epoch
    comes short. From there each worker fills up its own share with its first batches (the
    loader still yields len() batches, which DDP's ranks wait for), where processes=3 lets
    the turns shift and fills the epoch up at its end: a resume gives the loader workers'
    own batches, as many as are left. A state of shardpack 0.2 (no streams) resumes under
    processes=2 without workers."""
    tars = write_id_tars(tmp_path, 120, set(range(20, 30)) | set(range(70, 76)), 40)
    opts = dict(num_classes=3, image_size=16, batch_size=4, shuffle_buffer=32, on_error="ignore",
                decode_threads=1, seed=4)
    ds = ShardIterableDataset(tars, processes=3, **opts)
    try:
        full = _epoch(DataLoader(ds, batch_size=None))
        states = {k: ds.state_dict(batches=k) for k in range(1, len(full))}
    finally:
        ds.reader.close()
    assert any("stream_batches" in state for state in states.values())
    lap = next(state["lap"] for state in states.values() if "lap" in state)
    assert len(full) == len(ds) and full[lap:] == full[: len(full) - lap]
    workers = _epoch(DataLoader(ShardIterableDataset(tars, **opts), batch_size=None, num_workers=3))
    same = next(k for k, (a, b) in enumerate(zip(workers, full, strict=True)) if a != b)
    assert len(workers) == len(full) and 3 < same < lap
    for k in (3, same - 1, same, lap + 1):
        again = ShardIterableDataset(tars, **opts)
        again.load_state_dict(states[k])
        got = _epoch(DataLoader(again, batch_size=None, num_workers=3))
        assert len(got) == len(full) - k, k
        if k <= same:
            assert got == workers[k:] and got[: same - k] == full[k:same], k
    legacy = {key: v for key, v in states[5].items()
              if key not in ("streams", "failed_before", "stream_batches", "next_stream")} | {"processes": 0}
    old = ShardIterableDataset(tars, processes=2, **opts)
    try:
        old.load_state_dict(legacy)
        assert len(_epoch(DataLoader(old, batch_size=None))) > 0  # no IndexError
    finally:
        old.reader.close()


def test_loader_workers_fill_up_a_share_that_came_short_so_every_rank_keeps_its_length(tmp_path):
    """DDP waits at every step for every rank: a rank whose loader workers lost batches to
    samples that fail to decode hung the job at the epoch's end. Each worker fills up its
    own share with its own first batches, so every rank's loader yields len() batches."""
    tars = write_id_tars(tmp_path, 96, set(range(3, 15)), 24)  # 12 broken, all in rank 0's first shard
    opts = dict(num_classes=3, image_size=8, batch_size=4, on_error="ignore", shuffle=False,
                decode_threads=1, world_size=2)
    for rank in range(2):
        ds = ShardIterableDataset(tars, rank=rank, **opts)
        got = _epoch(DataLoader(ds, batch_size=None, num_workers=2))
        assert len(got) == len(ds) == 12, rank
        seen = [i for ids in got for i in ids]
        assert not set(range(3, 15)) & set(seen)
        if rank == 0:  # 36 samples left: 9 batches, and 3 of its workers' first ones again
            assert len(seen) > len(set(seen)) == 36


def test_a_worker_with_nothing_readable_fills_from_the_rank_and_resumes_keep_the_length(tmp_path):
    """A worker none of whose share decodes fills up from the rank's first batches (it had
    none of its own: the loader came 12 batches short); and a state saved under loader
    workers past a worker's last good batch resumes with len() - k batches (it counted its
    repeat from the skip, and came short)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole_shard_broken = write_id_tars(tmp_path / "a", 96, set(range(48)), 48)
    opts = dict(num_classes=3, image_size=8, batch_size=4, on_error="ignore", decode_threads=1)
    for seed in (1, 2):
        ds = ShardIterableDataset(whole_shard_broken, seed=seed, shuffle_buffer=16, **opts)
        got = _epoch(DataLoader(ds, batch_size=None, num_workers=2))
        assert len(got) == len(ds) == 24 and not {i for ids in got for i in ids} & set(range(48))
    worker0_tail = write_id_tars(tmp_path / "b", 96, {8 * j + i for j in range(2, 12) for i in range(4)}, 96)
    ds = ShardIterableDataset(worker0_tail, shuffle=False, **opts)
    full = _epoch(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(full) == len(ds) == 24
    for k in (5, 12, 18):
        again = ShardIterableDataset(worker0_tail, shuffle=False, **opts)
        again.load_state_dict(ds.state_dict(k))
        assert len(_epoch(DataLoader(again, batch_size=None, num_workers=2))) == len(full) - k, k


def test_a_state_of_batches_outside_the_epoch_is_refused_when_saved(awkward_shards):
    """``state_dict(batches=...)`` takes the batches the loop consumed of this epoch. A
    global step passed by mistake made a state at the next epoch's start (the rest of this
    epoch skipped on resume), and a negative count was refused only at load, after a crash."""
    ds = ShardIterableDataset(awkward_shards, seed=11, **OPTIONS)
    ds.set_epoch(1)
    assert ds.state_dict(batches=len(ds))["epoch"] == 2  # a whole epoch: the next one's start
    for bad in (len(ds) + 3, -1, 2.5):
        with pytest.raises(ValueError, match="batches"):
            ds.state_dict(batches=bad)
