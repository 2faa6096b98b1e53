"""ShardReader end to end on real packed shards: epochs, order, labels, options."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from conftest import ID_CLASSES, pixel_ids

from packer.errors import ClassNotFoundError, ManifestError, SplitNotFoundError
from reader import ShardReader, shard_reader
from reader.batches import default_decode_threads


def _epoch_ids(reader: ShardReader) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for x, y in reader:
        ids += pixel_ids(x)
        labels += y.tolist()
    return ids, labels


def _read(**options):
    return dict(image_size=(4, 4), interpolation="nearest", batch_size=10, **options)


def test_every_sample_once_per_epoch_shuffled(id_shards):
    shards, paths = id_shards
    train = {n for n, p in paths.items() if p.startswith("train/")}
    reader = ShardReader(shards, split="train", seed=3, shuffle_buffer=50, **_read())
    assert len(reader) == 21 and reader.samples == 210
    first, labels = _epoch_ids(reader)
    second, _ = _epoch_ids(reader)
    assert sorted(first) == sorted(train) and len(first) == len(train)
    assert sorted(second) == sorted(train)
    assert first != second, "two epochs gave the same order"
    # labels travel with their images: the class folder in the sample's source path
    for n, label in zip(first, labels, strict=True):
        assert paths[n].split("/")[1] == ID_CLASSES[label]
    assert reader.epoch == 2 and reader.batches_yielded == 21


def test_same_seed_same_order_and_new_seed_per_reader(id_shards):
    shards, _ = id_shards
    a = _epoch_ids(ShardReader(shards, split="train", seed=7, **_read()))
    b = _epoch_ids(ShardReader(shards, split="train", seed=7, **_read()))
    c = _epoch_ids(ShardReader(shards, split="train", seed=8, **_read()))
    assert a == b
    assert a[0] != c[0]
    unseeded = ShardReader(shards, split="train", **_read())
    assert isinstance(unseeded.seed, int)


def test_shard_order_is_mixed(id_shards):
    """Interleaving + buffer: the first batch draws from several shards."""
    shards, paths = id_shards
    ids, _ = _epoch_ids(ShardReader(shards, split="train", seed=1, shuffle_buffer=20, **_read()))
    reader = ShardReader(shards, split="train", shuffle=False, **_read())
    position = {path: i for i, path in enumerate(reader.filenames)}
    first_shards = {position[paths[n]] // 16 for n in ids[:10]}
    assert len(first_shards) >= 2


def test_unshuffled_order_is_manifest_order(id_shards):
    shards, paths = id_shards
    reader = ShardReader(shards, split="train", shuffle=False, **_read())
    ids, labels = _epoch_ids(reader)
    assert [paths[n] for n in ids] == reader.filenames
    assert labels == reader.labels.tolist()
    assert _epoch_ids(reader)[0] == ids  # every epoch the same
    # manifest order = the order of the .json members in the shards
    manifest = json.loads((shards / "manifest.json").read_text())
    assert reader.samples == manifest["splits"]["train"]["count"]


def test_class_subset_is_reindexed(id_shards):
    shards, paths = id_shards
    reader = ShardReader(shards, split="train", class_names=["triangle", "circle"], seed=0,
                         label_mode="categorical", **_read())
    assert reader.class_names == ["triangle", "circle"] and reader.samples == 140
    ids, seen = [], []
    for x, y in reader:
        assert y.dtype == np.float32 and y.shape[1] == 2
        ids += pixel_ids(x)
        seen += y.argmax(1).tolist()
    assert len(ids) == 140
    for n, label in zip(ids, seen, strict=True):
        assert paths[n].split("/")[1] == ["triangle", "circle"][label]
    assert Counter(reader.labels.tolist()) == {0: 70, 1: 70}


def test_label_modes_and_drop_remainder(id_shards):
    shards, _ = id_shards
    r = ShardReader(shards, split="test", label_mode=None, shuffle=False, drop_remainder=True,
                    **{**_read(), "batch_size": 7})
    batches = list(r)
    assert len(batches) == len(r) == 30 // 7
    assert all(isinstance(b, np.ndarray) and b.shape == (7, 4, 4, 3) for b in batches)
    r = ShardReader(shards, split="test", class_names=["circle", "square"], label_mode="binary", **_read())
    x, y = next(iter(r))
    assert y.dtype == np.float32 and y.shape == (10, 1) and set(y.ravel()) <= {0.0, 1.0}
    r = ShardReader(shards, split="test", color_mode="grayscale", rescale=1 / 255, **_read())
    x, y = next(iter(r))
    assert x.shape == (10, 4, 4, 1) and x.dtype == np.float32 and x.max() <= 1.0
    assert y.dtype == np.int32


def test_uint8_batches_hold_the_float32_pixels(photo_shards):
    """dtype="uint8" skips the cast: the same pixels up to the rounding of a resize (float32
    rows may take a bilinear resize's unrounded values), batch for batch, with the same
    augmentation draws (a flip or crop drawn differently moves pixels by far more);
    rescale, which needs floats, is refused with it."""
    opts = dict(split="train", image_size=(32, 32), batch_size=16, seed=4, random_flip=True,
                random_crop=(0.5, 1.0))
    floats = list(ShardReader(photo_shards, **opts))
    ints = list(ShardReader(photo_shards, dtype="uint8", **opts))
    assert len(ints) == len(floats) > 1
    for (xi, yi), (xf, yf) in zip(ints, floats, strict=True):
        assert xi.dtype == np.uint8 and xi.shape == xf.shape
        np.testing.assert_allclose(xi.astype(np.float32), xf, rtol=0, atol=1.0)
        assert np.abs(xi.astype(np.float32) - xf).mean() < 0.5
        np.testing.assert_array_equal(yi, yf)
    with pytest.raises(ValueError, match="rescale"):
        ShardReader(photo_shards, dtype="uint8", rescale=1 / 255, **opts)
    with pytest.raises(ValueError, match="dtype"):
        ShardReader(photo_shards, dtype="float16", **opts)


@pytest.mark.parametrize("color_mode", ["rgb", "grayscale", "rgba"])
@pytest.mark.parametrize("processes", [0, 2])
def test_channels_first_batches_are_the_channels_last_ones_transposed(photo_shards, color_mode, processes):
    """data_format="channels_first": (b, c, h, w) batches transposed image by image by the
    decode threads (and decode processes): uint8 ones are exactly the channels-last ones
    transposed; float32 ones are the uint8 resize cast (so within rounding of the
    channels-last float32 rows, and times rescale)."""
    opts = dict(split="train", image_size=(24, 20), batch_size=16, seed=4, random_flip=True,
                color_mode=color_mode)
    last = list(ShardReader(photo_shards, dtype="uint8", **opts))
    first = list(ShardReader(photo_shards, dtype="uint8", data_format="channels_first", **opts))
    channels = {"rgb": 3, "grayscale": 1, "rgba": 4}[color_mode]
    assert len(first) == len(last) > 1
    for (xf, yf), (xl, yl) in zip(first, last, strict=True):
        assert xf.shape == (len(yl), channels, 24, 20) and xf.flags.c_contiguous
        np.testing.assert_array_equal(xf, xl.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(yf, yl)
    if processes:  # their own order: the same images, as a multiset
        unflipped = {**opts, "random_flip": False}
        procs = ShardReader(photo_shards, dtype="uint8", data_format="channels_first",
                            processes=processes, **unflipped)
        threads = ShardReader(photo_shards, dtype="uint8", **unflipped)
        images = sorted(img.transpose(1, 2, 0).tobytes() for x, _ in procs for img in x)
        assert images == sorted(img.tobytes() for x, _ in threads for img in x)
    floats = ShardReader(photo_shards, data_format="channels_first", rescale=0.5, **opts)
    for (x, _), (xl, _) in zip(floats, last, strict=True):
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, xl.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(0.5))
    with pytest.raises(ValueError, match="data_format"):
        ShardReader(photo_shards, data_format="NCHW", **opts)


def test_label_mode_is_checked(photo_shards):
    """A misspelt label_mode, or "binary" with other than 2 classes, is refused up front."""
    with pytest.raises(ValueError, match="label_mode must be one of"):
        ShardReader(photo_shards, split="train", label_mode="Int")
    with pytest.raises(ValueError, match="exactly 2 classes"):
        ShardReader(photo_shards, split="train", label_mode="binary")  # 4 classes


def test_augmentations_are_seeded(photo_shards):
    opts = dict(split="train", image_size=(32, 32), batch_size=16, random_flip=True,
                random_crop=(0.5, 1.0))
    a = next(iter(ShardReader(photo_shards, seed=5, **opts)))[0]
    b = next(iter(ShardReader(photo_shards, seed=5, **opts)))[0]
    np.testing.assert_array_equal(a, b)


def test_missing_split_class_and_manifest(id_shards, tmp_path):
    shards, _ = id_shards
    with pytest.raises(SplitNotFoundError, match=r"available splits: \['test', 'train'\]"):
        ShardReader(shards, split="validation")
    with pytest.raises(ClassNotFoundError, match="available classes"):
        ShardReader(shards, split="train", class_names=["circle", "hexagon"])
    with pytest.raises(ManifestError, match="shardpack pack"):
        ShardReader(tmp_path, split="train")


def test_import_reader_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys, reader; reader.ShardReader; reader.preview; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decoder_option_reaches_the_decoder(photo_shards):
    opts = dict(split="train", image_size=(32, 32), batch_size=16, shuffle=False)
    auto = next(iter(ShardReader(photo_shards, **opts)))[0]
    pillow = next(iter(ShardReader(photo_shards, decoder="pillow", **opts)))[0]
    assert auto.shape == pillow.shape and np.abs(auto - pillow).mean() < 8  # same photos
    with pytest.raises(ValueError, match="decoder"):
        ShardReader(photo_shards, decoder="turbo", **opts)


@pytest.mark.parametrize("cpus, mean_bytes, threads", [
    (16, 16_000, 8), (16, 46_000, 16), (16, None, 16), (4, 16_000, 4), (1, 16_000, 1),
])
def test_default_decode_threads_by_image_size(cpus, mean_bytes, threads):
    assert default_decode_threads(cpus, mean_bytes) == threads


def test_a_reader_of_small_images_on_many_cores_decodes_on_8_threads(id_shards, monkeypatch):
    """Small images on 16 CPUs: 8 threads by default (more wait for the GIL); a number the
    caller gives, decode processes and manifest-less tars keep one thread per CPU."""
    shards, _ = id_shards
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    reader = ShardReader(shards, split="train", image_size=4)
    assert reader.source.mean_sample_bytes() < 32 * 1024
    assert reader.num_workers == 8
    assert ShardReader(shards, split="train", image_size=4, num_workers=16).num_workers == 16
    assert ShardReader(shards, split="train", image_size=4, processes=4).num_workers == 16
    tars = sorted(str(p) for p in (shards / "train").glob("*.tar"))
    assert ShardReader(tars, num_classes=3, image_size=4).num_workers == 16


def test_manifest_less_tars_are_read_once_per_epoch(id_shards, monkeypatch):
    """The empty-split check must not scan every tar before the epoch reads them anyway
    (twice the I/O for streamed or remote tars): without a manifest, no count is known."""
    shards, _ = id_shards
    tars = sorted(str(p) for p in (shards / "train").glob("*.tar"))
    scans = []
    real_scan = shard_reader.scan_shard
    monkeypatch.setattr(shard_reader, "scan_shard", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    reader = ShardReader(tars, num_classes=3, image_size=4, batch_size=16)
    assert sum(len(x) for x, _ in reader) == 210
    assert scans == []


@pytest.mark.parametrize("batch_size", [None, 0, 2.5])
def test_shard_reader_refuses_a_batch_size_that_is_not_a_whole_number(id_shards, batch_size):
    """None used to fail with "'<' not supported between NoneType and int"."""
    with pytest.raises(ValueError, match=r"batch_size.*whole number >= 1"):
        ShardReader(id_shards[0], split="test", image_size=4, batch_size=batch_size)
    assert len(ShardReader(id_shards[0], split="test", image_size=4, batch_size=4.0)) == 8


def test_reading_squashed_shards_at_another_aspect_or_with_crop_warns(tmp_path):
    """`--resize 16x8` shards hold every image squashed: reading at another aspect ratio
    (squashed again, cropped or padded to it) acts on the squashed picture, which is said;
    the packed aspect at any scale loses nothing more and is not."""
    import warnings as py_warnings

    from conftest import write_id_tree

    from packer import pack

    write_id_tree(tmp_path / "src", {"train": 2}, size=20)
    pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True, resize="16x8")
    for options in ({"image_size": (8, 16)}, {"image_size": (4, 8), "crop_to_aspect_ratio": True}):
        with py_warnings.catch_warnings():
            py_warnings.simplefilter("error")
            ShardReader(tmp_path / "out", split="train", **options)
    for options, words in (({"image_size": (16, 16)}, "image_size (16, 16), another aspect ratio, each "
                                                      "is squashed again"),
                           ({"image_size": 8, "crop_to_aspect_ratio": True}, "cropped to it"),
                           ({"image_size": (16, 8), "pad_to_aspect_ratio": True}, "padded to it")):
        with pytest.warns(UserWarning, match=rf"squashed to 16x8 .*{re.escape(words)}"):
            ShardReader(tmp_path / "out", split="train", **options)


@pytest.mark.parametrize("how", ["manifest", "class subset", "manifest-less"])
def test_a_copy_for_decode_processes_carries_the_scans_counts_not_the_scan(id_shards, monkeypatch, how):
    """A reader whose small members were scanned (``labels``, or counts a manifest lacks) is
    pickled to every decode process each epoch: the copy gets the counts, not a path, label
    and class per sample (54 MB at ImageNet size), and reads the same epoch without
    scanning the shards again."""
    import pickle

    shards, _ = id_shards
    if how == "manifest-less":
        source, options = sorted(str(p) for p in (shards / "train").glob("*.tar")), {"num_classes": 3}
    else:
        source, options = shards, {"class_names": ["triangle", "circle"]} if how == "class subset" else {}
    reader = ShardReader(source, shuffle=False, **options, **_read())
    unscanned = len(pickle.dumps(reader))
    labels = reader.labels  # the scan
    reader.require_samples(scan=True)  # as an epoch does before it starts its processes
    copy = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) < unscanned + 500  # 140-210 samples: ~6-9 KB more with the scan
    scans = []
    real_scan = shard_reader.scan_shard
    monkeypatch.setattr(shard_reader, "scan_shard", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    assert (len(copy), copy.samples, copy.shard_counts()) == (len(reader), reader.samples, reader.shard_counts())
    got = [(pixel_ids(x), y.tolist()) for x, y in copy]
    assert scans == []
    assert [label for _, y in got for label in y] == labels.tolist()
    assert got == [(pixel_ids(x), y.tolist()) for x, y in reader]


@pytest.mark.parametrize("option, value, words", [
    ("shuffle_buffer", 0, "shuffle_buffer must be a whole number >= 1"),
    ("shuffle_buffer", -5, "shuffle_buffer must be a whole number >= 1"),
    ("shuffle_buffer_bytes", 0, "size must be positive"),
    ("shuffle_buffer_bytes", -1, "size must be positive"),
    ("shuffle_buffer_bytes", "1G", "ambiguous"),
    ("num_workers", -2, "num_workers must be a whole number >= 0"),
    ("num_workers", 1.5, "num_workers must be a whole number >= 0"),
])
def test_bad_buffer_and_worker_options_are_refused_up_front(id_shards, option, value, words):
    """shuffle_buffer=0 shuffled nothing, silently (a training run unshuffled); a zero or
    negative byte cap failed at the first batch with "empty range for randrange()";
    num_workers=-2 failed in the thread pool without naming the option."""
    with pytest.raises(ValueError, match=words):
        ShardReader(id_shards[0], split="test", image_size=4, **{option: value})


def test_the_shuffle_buffer_byte_cap_takes_a_size_as_cache_max_bytes_does(id_shards):
    reader = ShardReader(id_shards[0], split="test", image_size=4, batch_size=30, seed=0,
                         shuffle_buffer_bytes="1MB")
    assert reader.shuffle_buffer_bytes == 1_000_000
    assert sorted(y for _, ys in reader for y in ys.tolist()) == sorted(reader.labels.tolist())
