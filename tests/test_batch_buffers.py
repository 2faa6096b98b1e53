"""Batch memory is reused only when nothing holds it: kept batches, views of them and
tensors sharing their memory (TensorFlow's zero-copy hand-off, torch.from_numpy) are never
overwritten by later batches."""

from __future__ import annotations

from concurrent.futures import Executor, Future

import numpy as np
import pytest
from conftest import pixel_ids

from reader import ShardReader
from reader.batches import BatchBuffers


def _all_ids(id_shards) -> list[int]:
    shards, paths = id_shards
    return sorted(i for i, p in paths.items() if p.startswith("train/"))


def test_pool_reuses_only_unreferenced_memory():
    pool = BatchBuffers(keep=2)
    dtype = np.dtype(np.float32)
    first = pool.take((4, 2), dtype)
    address = first.ctypes.data
    view = first[1:]
    del first
    assert pool.take((4, 2), dtype).ctypes.data != address  # a view still holds it
    del view
    assert pool.take((4, 2), dtype).ctypes.data == address  # now it is free again
    short = pool.take((3, 2), dtype)  # the epoch's short last batch: no fresh memory
    assert short.ctypes.data == address and short.shape == (3, 2)
    del short
    assert pool.take((5, 2), dtype).ctypes.data != address  # a larger one does not fit


def test_a_larger_batch_shape_replaces_unused_owners_too_small_for_it():
    """A reader whose batches grow (another image size, float32 after uint8) keeps the
    larger arrays, in place of unused smaller ones, instead of taking fresh memory for
    every batch while the pool stays full of arrays too small to use."""
    pool = BatchBuffers(keep=2)
    dtype = np.dtype(np.float32)
    small = [pool.take((2, 2), dtype) for _ in range(2)]  # the pool is full of small owners
    del small
    big = pool.take((8, 2), dtype)
    held = pool.take((8, 2), dtype)  # the other small owner is replaced too
    assert sorted(o.nbytes for o in pool._owners) == [8 * 2 * 4 + 64] * 2
    address = big.ctypes.data
    del big
    assert pool.take((8, 2), dtype).ctypes.data == address  # and reused
    del held


def test_kept_numpy_batches_and_views_are_never_overwritten(id_shards):
    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=8, seed=3)
    kept = [x for x, _ in reader]  # whole batches
    assert sorted(n for x in kept for n in pixel_ids(x)) == _all_ids(id_shards)
    views = [x[:, :1, :1] for x, _ in reader]  # only views of each batch survive the loop
    assert sorted(n for v in views for n in pixel_ids(v)) == _all_ids(id_shards)


def test_tensorflow_tensors_sharing_batch_memory_are_never_overwritten(id_shards):
    pytest.importorskip("tensorflow")
    from reader import image_dataset_from_shards

    ds = image_dataset_from_shards(id_shards[0], split="train", image_size=(4, 4), batch_size=8,
                                   seed=3, verbose=False)
    tensors = [x for x, _ in ds]  # EagerTensors, not copies
    assert sorted(n for t in tensors for n in pixel_ids(t.numpy())) == _all_ids(id_shards)


def test_torch_tensors_from_numpy_are_never_overwritten(id_shards):
    torch = pytest.importorskip("torch")
    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=8, seed=3)
    tensors = [torch.from_numpy(x) for x, _ in reader]
    assert sorted(n for t in tensors for n in pixel_ids(t.numpy())) == _all_ids(id_shards)


# ---- how much decoding is queued: enough for every pool thread --------------------------

class _DeferredFuture(Future):
    def __init__(self, pool: _DeferredPool) -> None:
        super().__init__()
        self.pool = pool

    def result(self, timeout=None):
        self.pool.run_through(self)
        return super().result(timeout)


class _DeferredPool(Executor):
    """Runs no task until the batch thread waits on one, then runs the tasks up to it, in
    order; records how many images the other blocks' tasks held queued at each wait."""

    def __init__(self) -> None:
        self.pending: list[tuple[_DeferredFuture, object, tuple]] = []
        self.queued_behind: list[int] = []
        self.task_images: set[int] = set()

    def submit(self, fn, /, *args, **kwargs):
        future = _DeferredFuture(self)
        self.pending.append((future, fn, args))
        self.task_images.add(len(args[2]))  # _decode_into(x, first, samples, ...)
        return future

    def run_through(self, target: _DeferredFuture) -> None:
        if target.done():
            return
        block_x = next(args[0] for f, _, args in self.pending if f is target)
        self.queued_behind.append(sum(len(args[2]) for _, _, args in self.pending if args[0] is not block_x))
        while self.pending:
            future, fn, args = self.pending.pop(0)
            future.set_result(fn(*args))
            if future is target:
                return


@pytest.mark.parametrize("workers, batch_size", [(16, 64), (2, 64), (64, 32), (8, 1)])
def test_enough_decoding_is_queued_to_keep_every_thread_busy(workers, batch_size):
    """While the batch thread waits for a block, the blocks behind it hold at least three
    tasks per pool thread (the plan that held two blocks left half of 16 cores idle), and
    the batches are the same whatever the plan."""
    import io
    import random

    from PIL import Image

    from reader.batches import BatchOptions, decode_batches, in_flight_plan
    from reader.decode import DecodeOptions
    from reader.policy import ErrorPolicy

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="JPEG")
    chunk, blocks = in_flight_plan(workers, batch_size)
    n = (blocks + 10) * batch_size + 5
    samples = [({"__key__": f"k{i}", "__shard__": "s", "jpg": buf.getvalue()}, i % 7) for i in range(n)]
    pool = _DeferredPool()
    batches = list(decode_batches(iter(samples), decode=DecodeOptions(image_size=(4, 4)),
                                  batch=BatchOptions(batch_size=batch_size, num_classes=7),
                                  pool=pool, policy=ErrorPolicy(), workers=workers,
                                  aug_rng=random.Random(0)))
    assert np.concatenate([y for _, y in batches]).tolist() == [i % 7 for i in range(n)]
    assert max(pool.task_images) == chunk
    steady = pool.queued_behind[:10]  # before the epoch's tail drains
    assert len(steady) == 10 and min(steady) >= 3 * workers * chunk


def test_failed_samples_do_not_keep_their_batch_arrays_alive():
    """A decode error's traceback held the decode task's frames, and so the batch array:
    every block with a failure then needed a new array, all alive until the cyclic
    collector ran (with processes=, a new shared-memory slot each)."""
    import gc
    import io
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from reader.batches import BatchOptions, decode_batches
    from reader.decode import DecodeOptions
    from reader.policy import ErrorPolicy

    class Recording(BatchBuffers):
        def __init__(self) -> None:
            super().__init__(keep=4)
            self.handed: list[weakref.ref] = []

        def take(self, shape, dtype):
            x = super().take(shape, dtype)
            self.handed.append(weakref.ref(x.base))
            return x

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    samples = [({"__key__": f"k{i}", "__shard__": "s",
                 "jpg": b"\xff\xd8 bad" if i % 3 == 0 else buf.getvalue()}, 0) for i in range(300)]
    buffers = Recording()
    gc.disable()
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in decode_batches(iter(samples), decode=DecodeOptions(image_size=(4, 4)),
                                    batch=BatchOptions(batch_size=4, num_classes=1), pool=pool,
                                    policy=ErrorPolicy(on_error="ignore"), workers=2,
                                    buffers=buffers):
                pass
        alive = {id(ref()) for ref in buffers.handed if ref() is not None}
    finally:
        gc.enable()
    assert len(buffers.handed) == 75 and len(alive) <= 4  # the pool's own, not one per block


def test_batch_memory_is_kept_across_epochs_but_never_under_a_kept_batch(id_shards):
    """A reader decodes each epoch into the batch arrays of the one before (fresh 38 MB
    arrays are pages to fault in every epoch); batches a caller kept from an earlier epoch
    still hold their own pixels after later epochs."""
    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=8, seed=3)
    list(reader)  # nothing kept: the arrays go back each time
    owners = [id(o) for o in reader._buffers._owners]
    list(reader)
    assert [id(o) for o in reader._buffers._owners] == owners  # no fresh array
    kept = [x for x, _ in reader]
    for _ in range(2):
        list(reader)
    assert sorted(n for x in kept for n in pixel_ids(x)) == _all_ids(id_shards)
    reader.close()  # lets go of them; the next epoch starts afresh
    assert reader._buffers is None
    assert sorted(n for x, _ in reader for n in pixel_ids(x)) == _all_ids(id_shards)


def test_copies_of_a_reader_do_not_carry_its_batch_arrays(id_shards):
    import pickle

    reader = ShardReader(id_shards[0], split="train", image_size=64, batch_size=8, seed=3)
    list(reader)  # 8 x 64 x 64 x 3 float32 arrays kept: ~100 KB each
    assert reader._buffers is not None
    assert len(pickle.dumps(reader)) < 50_000
    assert pickle.loads(pickle.dumps(reader))._buffers is None


def test_two_threads_reading_one_reader_never_share_a_batch_array(id_shards):
    """Two iterations of one reader at once (two threads, two tf.data iterators) take
    batch arrays from the same kept pool: each array must go to one of them only."""
    import threading

    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=2, seed=3,
                         shuffle=False)
    list(reader)  # the pool now holds arrays
    results: list[list[int]] = [[], []]

    def read(slot: int) -> None:
        for _ in range(3):
            got = [x for x, _ in reader]  # kept: no array may be handed to the other thread
            results[slot].extend(n for x in got for n in pixel_ids(x))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ids in results:
        assert sorted(ids) == sorted(_all_ids(id_shards) * 3)


_FORK_SCRIPT = r"""
import os, signal, sys, time
from reader import ShardReader

reader = ShardReader(sys.argv[1], split="train", image_size=4, batch_size=8, seed=3, shuffle=False)
want = sorted(int(y) for _, ys in reader for y in ys)
parent_pool = reader._buffers
parent_pool._lock.acquire()  # as if another thread were inside take() at the fork
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the child: read an epoch, report, leave without cleanup
    try:
        got = sorted(int(y) for _, ys in reader for y in ys)
        os.write(write, b"1" if got == want and reader._buffers is not parent_pool else b"0")
    finally:
        os._exit(0)
os.close(write)
deadline = time.monotonic() + 60
while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
if done[0] == 0:
    os.kill(pid, signal.SIGKILL)
    print("hung")
else:
    print("ok" if os.read(read, 1) == b"1" and done[1] == 0 else "wrong")
"""


def test_a_forked_process_starts_its_own_batch_arrays(id_shards):
    """A loader worker forked from a process that read the reader gets its own pool: the
    parent's (and its lock, which another thread may have held at the fork) stays behind.

    In a fresh interpreter: forked from pytest's own process, the child inherited whatever
    locks other tests' leftover decode threads held at that instant, a hazard of any fork of
    a threaded process (caught once: the child's decode threads stuck in OpenCV's resize and
    Pillow's PNG load, its main thread waiting for a new thread to start)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, str(id_shards[0])],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    # "hung": the child waited on the parent's batch pool, the bug this test is for
    assert done.stdout.strip() == "ok", done.stdout + done.stderr
