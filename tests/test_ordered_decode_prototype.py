"""scripts/ordered_decode.py, the benchmark's prototype of decode processes that keep the
threads' epoch: the same batches as ShardReader's threads (a broken sample skipped alike),
kept batches never overwritten, a killed process reported, and close() frees everything."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jpeg_tars

from reader import ShardReader

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ordered_decode.py"


@pytest.fixture(scope="module")
def ordered():
    spec = importlib.util.spec_from_file_location("ordered_decode", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["ordered_decode"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("ordered_decode", None)


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """50 samples in 4 tars, JPEGs of several sizes, one broken (key s0017)."""
    return write_jpeg_tars(tmp_path_factory.mktemp("ordered"), count=50, classes=3, broken={17},
                           per_tar=13, max_side=120, seed=3)


OPTS = dict(num_classes=3, image_size=(28, 24), batch_size=6, seed=4, on_error="ignore")


@pytest.mark.parametrize("by_reference", [False, True], ids=["bytes", "by-reference"])
def test_the_same_epochs_as_threads_with_a_broken_sample_skipped_alike(ordered, mixed_shards, by_reference):
    threads = ShardReader(mixed_shards, **OPTS)
    pooled = ordered.OrderedReader(mixed_shards, decode_processes=3, by_reference=by_reference, **OPTS)
    try:
        for _ in range(2):
            want, got = list(threads), list(pooled)  # kept whole: nothing overwritten
            assert len(got) == len(want) == 9  # 49 decodable samples, batches of 6
            for (xg, yg), (xw, yw) in zip(got, want, strict=True):
                assert xg.dtype == xw.dtype and np.array_equal(xg, xw)
                assert np.array_equal(yg, yw)
        assert pooled.policy.skipped_samples == threads.policy.skipped_samples == 2
    finally:
        pooled.close()


def test_a_killed_decode_process_is_named_or_routed_around_and_the_next_epoch_starts_a_new_pool(ordered, photo_shards):
    reader = ordered.OrderedReader(photo_shards, split="train", image_size=32, batch_size=8, seed=0,
                                   decode_processes=2)
    try:
        it = iter(reader)
        seen = len(next(it)[1])
        os.kill(reader._ordered[1]._workers[1].proc.popen.pid, signal.SIGKILL)
        try:
            seen += sum(len(y) for _, y in it)
        except RuntimeError as exc:  # it held a task: the epoch fails, naming it
            assert "decode process 1 exited" in str(exc)
        else:  # it held none when it died: the other process decoded the rest, nothing lost
            assert seen == 320
        assert sum(len(y) for _, y in reader) == 320  # 4 classes x 80
    finally:
        reader.close()


def test_close_ends_the_processes_and_removes_the_shared_memory(ordered, photo_shards):
    reader = ordered.OrderedReader(photo_shards, split="train", image_size=32, batch_size=8, seed=0,
                                   decode_processes=2)
    kept = next(iter(reader))
    shared, pool = reader._ordered
    names = [shm.name for shm in shared._blocks.values()]
    procs = [w.proc for w in pool._workers]
    reader.close()
    assert names and not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    assert all(p.popen.poll() is not None for p in procs)
    assert kept[0].shape == (8, 32, 32, 3) and float(kept[0].max()) > 0  # still readable
