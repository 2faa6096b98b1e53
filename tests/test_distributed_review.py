"""Multi-rank reading found by a review (2026-11-27): a rank with no whole batch to fill its
epoch with raises instead of ending short (a DDP hang), ranks draw their own augmentations,
and a rank's filenames/labels are its own share. Real parts: shards from packer.pack or
webdataset's ShardWriter, the real ShardReader, a real torch DataLoader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ID_CLASSES, write_id_tars
from PIL import Image

from reader import ShardReader


def _pack_ids(root: Path, per_class: tuple[int, ...], max_count: int) -> Path:
    """Pack id-coded 16x16 PNGs (pixel (id % 256, id // 256, 0)) into shards of max_count."""
    from packer import pack

    n = 0
    for name, count in zip(ID_CLASSES, per_class, strict=False):
        folder = root / "src" / "train" / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (16, 16), (n % 256, n // 256, 0)).save(folder / f"i{i:04d}.png")
            n += 1
    pack(root / "src", root / "shards", seed=0, max_count=max_count, workers=1, quiet=True)
    return root / "shards"


def _epoch_or_error(reader) -> int | None:
    """Batches one epoch yields, or None where it raised the error that names the short
    rank (a silently short epoch hangs every other DDP rank)."""
    try:
        return sum(1 for _ in reader)
    except RuntimeError as exc:
        assert "read no whole batch" in str(exc) and "other ranks" in str(exc), exc
        return None


def test_a_rank_whose_only_shard_is_cut_short_still_keeps_len(tmp_path):
    """Two ranks, two shards: each rank reads one whole shard. Rank 1's shard was cut short
    after packing (a partial copy); with on_shard_error="warn" rank 0 yields len(reader)
    = 4 batches and rank 1 yields 0, with a log line only. READING.md promises every rank
    keeps len(reader) ("a rank with a batch less hangs the job"); the fill-up repeats
    "the epoch's own first batches", and an epoch that made none is not filled at all."""
    shards = _pack_ids(tmp_path / "a", (12, 12, 8), 16)  # 32 samples: 2 shards of 16
    p = shards / "train" / "train-000001.tar"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    got = []
    for rank in range(2):
        r = ShardReader(shards, split="train", image_size=4, batch_size=4, rank=rank, world_size=2,
                        shuffle=False, on_shard_error="warn", num_workers=1)
        assert len(r) == 4
        got.append(_epoch_or_error(r))
    assert got[0] == 4
    assert got[1] is None, f"rank 1 yielded {got[1]} of len(reader)=4 batches in silence"


@pytest.mark.parametrize("processes", [0, 2])
def test_drop_remainder_a_rank_losing_one_sample_still_keeps_len(tmp_path, processes):
    """drop_remainder=True, 2 ranks of 4 samples, batch_size=4: len(reader) is 1 on each.
    One undecodable sample on rank 0 (on_error="warn", the default) leaves it 3 samples,
    no whole batch: rank 0 yields 0 batches, rank 1 yields 1 (a DDP hang at the first
    step's all-reduce). Nothing to repeat from its first batches, so nothing is filled."""
    url = write_id_tars(tmp_path, 8, {1}, 4)
    got = []
    for rank in range(2):
        r = ShardReader(url, num_classes=3, image_size=4, batch_size=4, rank=rank, world_size=2,
                        shuffle=False, drop_remainder=True, on_error="ignore", processes=processes,
                        num_workers=1)
        try:
            assert len(r) == 1
            got.append(_epoch_or_error(r))
        finally:
            r.close()
    assert got[1] == 1
    assert got[0] is None, f"rank 0 yielded {got[0]} of len(reader)=1 batches in silence"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_loader_rank_losing_its_only_batch_still_keeps_len(tmp_path, num_workers):
    """The same through ShardIterableDataset and a real DataLoader (with and without loader
    workers): 2 ranks of 3 samples, batch_size=3, drop_remainder=True; one broken sample in
    rank 0's share leaves it no whole batch, and it yields 0 of len(ds)=1 batches."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    url = write_id_tars(tmp_path, 6, {0}, 3)
    got = []
    for rank in range(2):
        ds = ShardIterableDataset(url, num_classes=3, image_size=4, batch_size=3, rank=rank, world_size=2,
                                  shuffle=False, drop_remainder=True, on_error="ignore", decode_threads=1)
        assert len(ds) == 1
        got.append(_epoch_or_error(DataLoader(ds, batch_size=None, num_workers=num_workers)))
    assert got[1] == 1
    assert got[0] is None, f"rank 0 yielded {got[0]} of len(ds)=1 batches in silence"


@pytest.fixture(scope="module")
def half_white_shards(tmp_path_factory) -> Path:
    """64 8x8 images, left half black, right half white: a flipped one is white at (0, 0)."""
    from packer import pack

    root = tmp_path_factory.mktemp("halves")
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, 4:] = 255
    for c in ("a", "b"):
        folder = root / "src" / "train" / c
        folder.mkdir(parents=True)
        for i in range(32):
            Image.fromarray(a).save(folder / f"{i:03d}.png")
    pack(root / "src", root / "shards", seed=0, max_count=16, workers=1, quiet=True)
    return root / "shards"


def test_ranks_draw_their_own_random_flips(half_white_shards):
    """random_flip on 4 ranks (seed=None: the shared default seed, as every rank must
    have): the k-th image of every rank's epoch is flipped or not alike on all ranks, so
    a DDP global batch holds batch_size flip draws instead of world_size x batch_size
    (the augmentation RNG is seeded from (seed, epoch, "augment") with no rank in it;
    random_crop's boxes are shared the same way). 16 images per rank: independent draws
    agree on all 4 ranks with probability 2**-48."""
    flips = []
    for rank in range(4):
        r = ShardReader(half_white_shards, split="train", image_size=8, batch_size=16, rank=rank,
                        world_size=4, random_flip=True, num_workers=1)
        flips.append(tuple(int(x[i, 0, 0, 0] > 127) for x, _ in r for i in range(len(x))))
    assert all(len(f) == 16 for f in flips)
    assert len(set(flips)) > 1, f"all 4 ranks flipped the same positions: {flips[0]}"


def test_labels_and_filenames_of_a_rank_line_up_with_its_unshuffled_epoch(tmp_path):
    """README: with shuffle=False "predict lines up with filenames and labels", and
    "len(), filenames and labels count what an epoch yields". On rank 1 of 2 (set
    explicitly, or detected from torchrun's RANK/WORLD_SIZE) the epoch yields that rank's
    half, but filenames/labels list the whole split: 32 entries for 16 yielded samples,
    and the first 16 are rank 0's, so zipping predictions with them scores rank 1's images
    against rank 0's labels."""
    shards = _pack_ids(tmp_path / "a", (12, 12, 8), 16)
    for rank in range(2):
        r = ShardReader(shards, split="train", image_size=4, batch_size=4, rank=rank, world_size=2,
                        shuffle=False, num_workers=1)
        ys = [int(v) for _, y in r for v in y]
        assert len(ys) == r.rank_samples == 16
        assert len(r.filenames) == len(ys), (rank, len(r.filenames), len(ys))
        assert r.labels.tolist() == ys, rank
