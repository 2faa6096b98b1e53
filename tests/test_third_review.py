"""Found by a third review (2026-11-27): a byte-capped state of the release before the cap's
new rule is refused mid-epoch, not resumed into another order, and a Dask task's own
CancelledError is its own error, not a lost cluster. Real parts: trees packed with
packer.pack, the real ShardReader and its state_dict/load_state_dict, the real run_dask on
a loopback LocalCluster."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_ids
from PIL import Image


def _varied_tree(root: Path) -> Path:
    """300 16x16 id-coded PNGs (pixel (0, 0) = (id % 256, id // 256, 0)); every third one is
    noise (~800 bytes, the rest ~100): sizes that vary as real photos' do. Packed in shards
    of 40."""
    from packer import pack

    rng = np.random.default_rng(0)
    n = 0
    for name in ("a", "b", "c"):
        folder = root / "src" / "train" / name
        folder.mkdir(parents=True)
        for i in range(100):
            arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) if n % 3 == 0 else np.zeros((16, 16, 3), np.uint8)
            arr[0, 0] = (n % 256, n // 256, 0)
            Image.fromarray(arr).save(folder / f"i{i:04d}.png")
            n += 1
    pack(root / "src", root / "shards", seed=0, max_count=40, workers=1, quiet=True)
    return root / "shards"


def _shuffle_buffer_before_521156c(
    items: Iterable, *, rng: random.Random, size: int, max_bytes: int | None = None,
    nbytes: Callable | None = None, initial: int | None = None,
) -> Iterator:
    """reader.shuffle.shuffle_buffer as released before 521156c (git show
    8a69e0d:reader/shuffle.py), unchanged but for ``initial`` (unused here): the buffer
    stopped growing at the byte cap and did not shed items after a swap."""
    assert initial is None
    if size <= 1:
        yield from items
        return
    buffer: list = []
    sizes: list[int] = []
    held = 0
    for item in items:
        if len(buffer) < size and (max_bytes is None or held < max_bytes):
            buffer.append(item)
            sizes.append(nbytes(item))
            held += sizes[-1]
            continue
        j = rng.randrange(len(buffer))
        buffer[j], item = item, buffer[j]
        new_size = nbytes(buffer[j])
        held += new_size - sizes[j]
        sizes[j] = new_size
        yield item
    rng.shuffle(buffer)
    yield from buffer


def test_a_byte_capped_state_of_the_earlier_release_is_not_resumed_into_another_order(tmp_path, monkeypatch):
    """521156c changed the order of every shuffled epoch whose ``shuffle_buffer_bytes`` cap
    binds (the buffer now sheds items after a larger one swapped in; with processes=N or
    loader workers each stream also gets cap/N), but its states keep the same version (1)
    and fields. A training job upgraded between a checkpoint and its resume (the usual
    way to pick up a fix) loads the earlier release's mid-epoch state without a word and
    skips ``batches`` batches of the *new* order: the rest of the epoch repeats samples the
    model already saw and never shows others. (The other way round, an earlier release
    resumes this one's states wrongly too.) shardpack refuses such states elsewhere
    (STATE_VERSION 2 for shuffle_initial, ``unshuffled_split``); it should here: either
    refuse the state or resume it exactly."""
    import reader.shard_reader as shard_reader_module
    from reader import ShardReader

    shards = _varied_tree(tmp_path)
    options = dict(split="train", image_size=16, batch_size=10, shuffle=True, seed=3, shuffle_buffer=50,
                   shuffle_buffer_bytes=8000, interleave=2, num_workers=1)

    # the earlier release: its epoch, and the checkpoint it saved after 12 batches (as it
    # wrote it: version 1, no byte_cap field)
    with monkeypatch.context() as m:
        m.setattr(shard_reader_module, "shuffle_buffer", _shuffle_buffer_before_521156c)
        before = ShardReader(shards, **options)
        seen, state = [], None
        for batch in before:
            seen.append(sample_ids(batch[0]))
            if len(seen) == 12:
                state = json.loads(json.dumps(before.state_dict()))
        assert state is not None
        state["version"] = 1
        del state["byte_cap"]

    # the upgraded job resumes from that checkpoint
    after = ShardReader(shards, **options)
    with pytest.raises(ValueError, match="kept its byte cap"):
        after.load_state_dict(state)

    # this release's own states say so (version 3, which the earlier one refuses), and
    # resume exactly
    now, seen = ShardReader(shards, **options), []
    for batch in now:
        seen.append(sample_ids(batch[0]))
        if len(seen) == 12:
            state = json.loads(json.dumps(now.state_dict()))
    assert state["version"] == 3 and state["byte_cap"] == 2
    resumed = ShardReader(shards, **options)
    resumed.load_state_dict(state)
    assert [sample_ids(batch[0]) for batch in resumed] == seen[12:]


def test_a_task_raising_cancelled_error_is_not_reported_as_a_lost_cluster():
    """4924516 maps any CancelledError out of ``future.result()`` to "lost the local Dask
    cluster mid-pack ... start it again and re-run the same command to resume". But
    ``future.result()`` re-raises the task's own exception: a task that raised
    ``concurrent.futures.CancelledError`` (a library inside it cancelling its own work)
    on a cluster that is alive and well is reported as a lost cluster, with advice to
    restart a cluster that never went away, and the task's real error is only the
    PackError's cause. Only the future's own cancellation (distributed's
    FutureCancelledError / a cancelled future's status) means the cluster went away."""
    pytest.importorskip("distributed")
    from packer.dask_engine import run_dask

    with pytest.raises(Exception) as caught:
        list(run_dask(_raise_cancelled, [1, 2, 3], workers=1, retries=0))
    assert "lost" not in str(caught.value), f"a task's own error reported as a lost cluster: {caught.value}"


def _raise_cancelled(x: int) -> int:
    import concurrent.futures

    if x == 2:
        raise concurrent.futures.CancelledError("the task's own work was cancelled")
    return x
