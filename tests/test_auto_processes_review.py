"""A review of processes="auto" as the default: what it found, each with a test that failed
on the code reviewed (faked: the CPU count, the size of /dev/shm, LOCAL_WORLD_SIZE; real:
the readers, their decode processes, loader workers and states).

1. A rank resuming rank 0's state under another pick of its own resumed silently wrong.
2. A state saved before streams were recorded (one stream) resumed under "auto"'s pick.
3. The ranks of one machine each sized their processes to all of /dev/shm, and to its free
   bytes (which differ from rank to rank as their pools start).
4. "auto" ran more decode threads than the rank has CPUs, or than ``num_workers`` asked.
5. Streams adopted from a state held for the rest of training, not the resumed epoch.
6. The adapters never applied "auto" to tars without a manifest, which they count anyway.
7. One loader worker decoded on the threads sized for processes.

A second review, of those fixes:

8. PyTorch loader workers: rank 1 refused rank 0's state by "auto"'s pick, which loader
   workers never use.
9. Keras checkpoints saved behind tf.data's read-ahead recorded the next epoch's streams
   for the resumed one.
10. Ranks pinned to their own CPUs by the launcher had them divided by the local ranks again.
11. A 0.2 state of loader workers (their number not recorded) resumed into the shared
    buffer's order, silently.

A third review:

12. The fix of 10 took a container's CPU set, which all ranks share, for a rank's own.
13. A 0.2 state loaded into a dataset and saved again before any pass took "auto"'s pick
    for the streams it was read with.
14. Persistent loader workers missed the refusal of 11 (not published to them).
15. ``ShardReader.state_dict()`` after a loop's ``break`` and ``set_epoch`` gave the
    abandoned epoch's position.
"""

from __future__ import annotations

import pytest
from conftest import sample_ids, write_id_tars

import reader.batches as batches
import reader.processes as processes_module
import reader.shard_reader as shard_reader
from reader import ShardReader
from reader.processes import DecodeProcesses, batch_bytes, starting_bytes
from reader.state import make_state

OPTIONS = dict(split="train", image_size=16, batch_size=50, num_workers=2)


def _ids(reader) -> list[list[int]]:
    return [sample_ids(x) for x, _y in reader]


# ---- 1. another rank's state ---------------------------------------------------------------


def test_a_rank_picking_otherwise_than_rank_0_refuses_its_state(awkward_shards, monkeypatch):
    """Rank 0 (16 CPUs: 2 processes) saves the checkpoint every rank loads; rank 1 ran on a
    4-CPU machine (threads). Resumed, rank 1 took rank 0's 2 streams and saw samples twice;
    now it says so, and ``processes=`` chosen on every rank resumes."""
    options = dict(OPTIONS, world_size=2, seed=3)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 250)
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    rank0 = ShardReader(awkward_shards, rank=0, **options)
    assert rank0.processes == 2
    state = make_state(rank0, epoch=0, batches=4)
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 4)
    rank1 = ShardReader(awkward_shards, rank=1, **options)
    assert rank1.processes == 0
    with pytest.raises(ValueError, match="saved by rank 0.*pass processes=2 on every rank"):
        rank1.load_state_dict(state)
    chosen = ShardReader(awkward_shards, rank=1, **dict(options, processes=2))
    whole = ShardReader(awkward_shards, rank=1, **dict(options, processes=2))
    chosen.load_state_dict(state)
    try:
        want, got = _ids(whole), _ids(chosen)
    finally:
        chosen.close()
        whole.close()
    assert got == want[4:]


# ---- 2. states of before streams were recorded ----------------------------------------------


def test_a_state_without_streams_resumes_as_one_stream_under_auto(awkward_shards, monkeypatch):
    """shardpack 0.2.0 wrote ``processes: 0`` for a plain reader (one stream): "auto" taking
    2 processes on 16 CPUs resumed it as 2, silently another order."""
    one = ShardReader(awkward_shards, seed=7, processes=0, **OPTIONS)
    want = _ids(one)
    state = make_state(one, epoch=0, batches=4)
    legacy = {k: v for k, v in state.items() if k not in ("streams", "shared_buffer")} | {"processes": 0}
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    resumed = ShardReader(awkward_shards, **OPTIONS)
    assert resumed.processes == 2
    resumed.load_state_dict(legacy)
    try:
        assert resumed.processes == 0
        assert _ids(resumed) == want[4:]
    finally:
        resumed.close()


# ---- 3. /dev/shm on a machine of several ranks ------------------------------------------------


@pytest.mark.parametrize("size", [4 * 10**9, 64 * 10**9])
def test_the_ranks_of_one_machine_share_dev_shm(awkward_shards, monkeypatch, size):
    """8 torchrun ranks made their readers at once, each taking processes for half of all
    /dev/shm: ~4x what the machine had (SIGBUS in the first epoch). Each now has its share,
    and /dev/shm's size counts, not its free bytes, so a rank made after another's pool
    started (less free) picks the same."""
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 64)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 25)  # 125 images a rank
    monkeypatch.setattr(processes_module, "shared_memory_size", lambda: size)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    readers = [ShardReader(awkward_shards, split="train", image_size=224, batch_size=64, rank=r, world_size=8)
               for r in range(8)]
    need = sum(starting_bytes(r.processes, max(1, r.num_workers // r.processes), 64, batch_bytes(r))
               for r in readers if r.processes)
    assert need <= size, f"the 8 ranks start pools of {need / 1e9:.1f} GB in {size / 1e9:.0f} GB"
    assert len({r.processes for r in readers}) == 1
    assert readers[0].processes == (0 if size < 10**10 else 5)


# ---- 4. decode threads ----------------------------------------------------------------------


def test_auto_runs_the_ranks_share_of_threads(awkward_shards, monkeypatch):
    """64 CPUs, 8 local ranks: 8 CPUs each, processes of 1-2 threads, not of 12 (the whole
    machine's CPUs split among a rank's processes); also where each rank reads the whole
    split (rank=0, world_size=1 under torchrun)."""
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 64)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 25)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    for rank, world in ((0, 8), (0, 1)):
        r = ShardReader(awkward_shards, rank=rank, world_size=world, split="train", image_size=16, batch_size=50)
        assert 2 <= r.processes <= 8 and r.num_workers == 8
        pool = DecodeProcesses(r, r.processes)  # sized, not started
        assert pool.count * pool.threads <= 8


def test_num_workers_bounds_the_threads_of_autos_processes(awkward_shards, monkeypatch):
    """``num_workers`` is all the processes' threads together: 2 asked is 2 processes of one
    thread at most (it took 10 of one each)."""
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 100)
    assert ShardReader(awkward_shards, **OPTIONS).processes == 2
    assert ShardReader(awkward_shards, **dict(OPTIONS, num_workers=1)).processes == 0


# ---- 5. streams adopted for one epoch -----------------------------------------------------------


def test_auto_goes_back_to_its_own_pick_after_the_resumed_epoch(awkward_shards):
    """A state of 2 streams resumes under 2 processes; the next epoch "auto" takes what it
    takes on this machine again (a laptop's state kept a 64-core machine on threads). States
    record each epoch's streams as it was read (a Keras checkpoint saves behind tf.data's
    read-ahead, after the next epoch may have begun)."""
    two = ShardReader(awkward_shards, seed=7, processes=2, **OPTIONS)
    state = make_state(two, epoch=0, batches=4)
    own = ShardReader(awkward_shards, **OPTIONS).processes
    r = ShardReader(awkward_shards, **OPTIONS)
    r.load_state_dict(state)
    try:
        assert r.processes == 2
        assert len(_ids(r)) == len(r) - 4
        assert len(_ids(r)) == len(r)  # epoch 1
        assert r.processes == own
        assert make_state(r, epoch=1, batches=3)["streams"] == (own or 1)
        assert make_state(r, epoch=0, batches=len(r) - 1)["streams"] == 2  # epoch 0 as it was read
    finally:
        r.close()
        two.close()


# ---- 6 and 7. the adapters ------------------------------------------------------------------------


def test_the_adapters_count_tars_without_a_manifest_and_then_take_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 30)
    url = write_id_tars(tmp_path, 90, set(), 30)
    assert ShardReader(url, image_size=8, batch_size=10, num_classes=3).processes == 0  # not counted
    pytest.importorskip("torch")
    from reader.torch_data import ShardIterableDataset

    assert ShardIterableDataset(url, image_size=8, batch_size=10, num_classes=3).reader.processes == 3
    pytest.importorskip("tensorflow")
    from reader import image_dataset_from_shards

    ds = image_dataset_from_shards(url, image_size=8, batch_size=10, num_classes=3, verbose=False)
    assert ds.shard_reader.processes == 3


def test_one_loader_worker_decodes_on_the_threads_default(awkward_shards, monkeypatch):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    class Probe(ShardIterableDataset):
        """Yields the decode threads the worker's reader used for its first batch."""

        def __iter__(self):
            for _batch in super().__iter__():
                yield torch.tensor(self.reader.num_workers)
                return

    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    options = dict(split="train", image_size=16, batch_size=50)
    threads = ShardReader(awkward_shards, processes=0, **options).num_workers  # 8: shards packed small
    ds = Probe(awkward_shards, **options)
    assert ds.reader.processes == 2
    got = int(next(iter(DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork"))))
    assert got == threads


# ---- second review ------------------------------------------------------------------------------


def test_rank_1_resumes_rank_0s_loader_worker_state(awkward_shards):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    options = dict(split="train", image_size=16, batch_size=50, world_size=2, seed=3)

    def loader(ds):
        return DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")

    def ids(batches_):
        return [sample_ids(x.permute(0, 2, 3, 1)) for x, _y in batches_]

    rank0 = ShardIterableDataset(awkward_shards, rank=0, **options)
    for i, _ in enumerate(loader(rank0)):
        if i + 1 == 4:
            break
    state = rank0.state_dict(4)
    assert state["streams"] == 2 and state["rank"] == 0 and torch is not None
    whole = ids(loader(ShardIterableDataset(awkward_shards, rank=1, **options)))
    rank1 = ShardIterableDataset(awkward_shards, rank=1, **options)
    rank1.load_state_dict(state)
    assert ids(loader(rank1)) == whole[4:]


def test_keras_checkpoints_behind_the_read_ahead_keep_the_resumed_epochs_streams(awkward_shards, monkeypatch):
    """The docs' Keras recipe (load, ``fit(ds.take(rest))``) with a prefetch and a step that
    takes a while: tf.data ends the resumed epoch's pass while Keras still trains on it,
    and the checkpoints of its last batches must record the streams it was read with."""
    import time

    keras = pytest.importorskip("keras")
    import tensorflow as tf

    from reader import image_dataset_from_shards
    from reader.state import ShardReaderCheckpoint

    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    one = ShardReader(awkward_shards, seed=7, processes=0, **OPTIONS)  # the interrupted run
    want = _ids(one)
    ds = image_dataset_from_shards(awkward_shards, seed=7, verbose=False, **OPTIONS)
    reader = ds.shard_reader
    assert reader.processes == 2
    reader.load_state_dict(make_state(one, epoch=0, batches=4))
    assert reader.processes == 0
    saved = []

    class Recording(ShardReaderCheckpoint):
        def _save(self):
            saved.append(make_state(self.reader, epoch=self._epoch, batches=self._position))

    class Step(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.1)

    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds.prefetch(tf.data.AUTOTUNE).take(len(reader) - 4), epochs=1, verbose=0,
              callbacks=[Step(), Recording(reader, "unused.json", every=1)])
    inside = [s for s in saved if s["epoch"] == 0 and s["batches"]]
    assert inside and all(s["streams"] == 1 for s in inside), [(s["batches"], s["streams"]) for s in inside]
    resumed = ShardReader(awkward_shards, **OPTIONS)
    resumed.load_state_dict(inside[-1])
    try:
        assert _ids(resumed) == want[inside[-1]["batches"]:]
    finally:
        resumed.close()
        reader.close()


def test_a_rank_pinned_to_its_own_cpus_decodes_on_all_of_them(awkward_shards, monkeypatch):
    """torchrun --numa-binding, srun --cpu-bind: the affinity mask is the rank's share
    already (narrower than its launcher's). A container's CPU set (16 of a 64-CPU host),
    which every rank and the launcher have whole, is shared among the 8 ranks."""
    options = dict(processes=0, rank=0, world_size=8, split="train", image_size=16, batch_size=50)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 8)  # its mask
    monkeypatch.setattr(shard_reader, "_launcher_cpus", lambda: 64)
    assert ShardReader(awkward_shards, **options).num_workers == 8
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 64)  # not pinned: its share
    assert ShardReader(awkward_shards, **options).num_workers == 8
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)  # a 16-CPU container
    monkeypatch.setattr(shard_reader, "_launcher_cpus", lambda: 16)
    assert ShardReader(awkward_shards, **options).num_workers == 2


def test_a_legacy_loader_worker_state_is_refused_under_loader_workers(awkward_shards):
    """shardpack 0.2 wrote ``processes: 0`` under any number of loader workers, each of
    which held the whole buffer: inside a shuffled epoch, refused under loader workers."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    options = dict(split="train", image_size=16, batch_size=50, seed=5)
    ds = ShardIterableDataset(awkward_shards, **options)
    state = make_state(ds.reader, epoch=0, batches=4, streams=2)
    legacy = {k: v for k, v in state.items() if k not in ("streams", "shared_buffer")} | {"processes": 0}
    again = ShardIterableDataset(awkward_shards, **options)
    again.load_state_dict(legacy)
    with pytest.raises(ValueError, match="did not record how many loader workers"):
        next(iter(DataLoader(again, batch_size=None, num_workers=2)))


# ---- third review -------------------------------------------------------------------------------


def test_a_legacy_state_saved_again_before_any_pass_keeps_one_stream(awkward_shards, monkeypatch):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    options = dict(split="train", image_size=16, batch_size=50, seed=5)
    one = ShardReader(awkward_shards, processes=0, **options)
    want = _ids(one)
    legacy = {k: v for k, v in make_state(one, epoch=0, batches=4).items()
              if k not in ("streams", "shared_buffer")} | {"processes": 0}
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    ds = ShardIterableDataset(awkward_shards, channels_last=True, **options)
    assert ds.reader.processes == 2
    ds.load_state_dict(legacy)
    again = ds.state_dict(4)
    assert again["streams"] == 1
    resumed = ShardIterableDataset(awkward_shards, channels_last=True, **options)
    resumed.load_state_dict(again)
    try:
        got = [sample_ids(x.permute(0, 2, 3, 1).numpy()) for x, _y in DataLoader(resumed, batch_size=None)]
    finally:
        resumed.reader.close()
    assert got == want[4:]


def test_persistent_loader_workers_refuse_a_legacy_state_loaded_after_they_started(awkward_shards):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    options = dict(split="train", image_size=16, batch_size=50, seed=5)
    ds = ShardIterableDataset(awkward_shards, **options)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    assert sum(1 for _ in loader) == len(ds)
    legacy = {k: v for k, v in make_state(ds.reader, epoch=0, batches=4, streams=2).items()
              if k not in ("streams", "shared_buffer")} | {"processes": 0}
    ds.load_state_dict(legacy)
    with pytest.raises(ValueError, match="did not record how many loader workers"):
        next(iter(loader))


def test_state_after_a_break_and_set_epoch_is_the_new_epochs_start(awkward_shards):
    reader = ShardReader(awkward_shards, seed=1, processes=0, **OPTIONS)
    for i, _ in enumerate(reader):
        if i == 2:
            break
    reader.set_epoch(1)
    state = reader.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 0)


def test_processes_auto_shares_the_machine_with_tf_config_workers_on_the_same_host(awkward_shards, monkeypatch):
    """MultiWorkerMirroredStrategy with 4 workers on one 64-CPU machine (and 2 elsewhere)
    sets TF_CONFIG and no LOCAL_WORLD_SIZE: each worker's "auto" took processes for all 64
    CPUs, 4 x 32 processes. It now counts the training tasks TF_CONFIG puts on its host."""
    import json

    from reader.distributed import tf_config_local_tasks

    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 64)
    monkeypatch.setattr(shard_reader, "_launcher_cpus", lambda: 64)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 1)
    for name in ("LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cluster = {"chief": ["localhost:2000"],
               "worker": ["127.0.0.1:2001", "localhost:2002", "localhost:2003", "gpu7:2000", "gpu7:2001"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 2}}))
    assert tf_config_local_tasks() == 4
    reader = ShardReader(awkward_shards, split="train", image_size=4, batch_size=8, processes="auto")
    try:
        assert (reader.rank, reader.world_size) == (3, 6)
        assert 2 <= reader.processes and reader.processes * 4 <= 64
    finally:
        reader.close()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 3}}))
    assert tf_config_local_tasks() == 2  # gpu7's two workers
    monkeypatch.setenv("TF_CONFIG", "{not json")
    assert tf_config_local_tasks() is None
