"""Batch memory is reused only when nothing holds it: kept batches, views of them and
tensors sharing their memory (TensorFlow's zero-copy hand-off, torch.from_numpy) are never
overwritten by later batches."""

from __future__ import annotations

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
