"""ShardIterableDataset with a real DataLoader and worker processes."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import sample_ids

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
