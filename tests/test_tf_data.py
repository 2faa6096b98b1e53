"""image_dataset_from_shards: Keras' contract, real TensorFlow, a real model that learns."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ID_CLASSES, pixel_ids, sample_ids, small_cnn, write_id_tars

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from reader import ShardReader, image_dataset_from_shards  # noqa: E402


def test_specs_like_image_dataset_from_directory(id_shards):
    shards, _ = id_shards
    ds = image_dataset_from_shards(shards, split="train", image_size=(4, 6), batch_size=16, seed=0)
    assert ds.class_names == ID_CLASSES
    assert int(ds.cardinality()) == len(ds) == 14  # ceil(210 / 16)
    x, y = next(iter(ds))
    assert x.dtype == tf.float32 and tuple(x.shape) == (16, 4, 6, 3)
    assert y.dtype == tf.int32 and tuple(y.shape) == (16,)
    assert 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255
    cat = image_dataset_from_shards(shards, split="test", image_size=4, label_mode="categorical",
                                    color_mode="grayscale")
    x, y = next(iter(cat))
    assert tuple(x.shape[1:]) == (4, 4, 1) and y.dtype == tf.float32 and tuple(y.shape[1:]) == (3,)
    binary = image_dataset_from_shards(shards, split="test", image_size=4, label_mode="binary",
                                       class_names=["square", "circle"], color_mode="rgba")
    x, y = next(iter(binary))
    assert tuple(x.shape[1:]) == (4, 4, 4) and y.dtype == tf.float32 and tuple(y.shape[1:]) == (1,)
    assert binary.class_names == ["square", "circle"] and len(binary) == 1
    images = image_dataset_from_shards(shards, split="test", image_size=4, label_mode=None,
                                       batch_size=None)
    assert int(images.cardinality()) == 30 and tuple(next(iter(images)).shape) == (4, 4, 3)
    assert images.class_names is None  # as Keras without labels
    assert images.shard_reader.class_names == ID_CLASSES


def test_uint8_dataset(id_shards):
    shards, _ = id_shards
    ds = image_dataset_from_shards(shards, split="train", image_size=4, batch_size=16, seed=0,
                                   dtype="uint8")
    assert ds.element_spec[0].dtype == tf.uint8
    floats = image_dataset_from_shards(shards, split="train", image_size=4, batch_size=16, seed=0)
    for (xi, yi), (xf, yf) in zip(ds, floats, strict=True):
        assert xi.dtype == tf.uint8
        np.testing.assert_array_equal(xi.numpy().astype(np.float32), xf.numpy())
        np.testing.assert_array_equal(yi.numpy(), yf.numpy())


def test_each_pass_is_a_new_epoch(id_shards):
    shards, paths = id_shards
    ds = image_dataset_from_shards(shards, split="train", image_size=(4, 4), batch_size=30,
                                   interpolation="nearest", seed=1)
    epochs = [[n for x, _ in ds for n in pixel_ids(x.numpy())] for _ in range(2)]
    train = sorted(n for n, p in paths.items() if p.startswith("train/"))
    assert sorted(epochs[0]) == sorted(epochs[1]) == train
    assert epochs[0] != epochs[1]


def test_tf_data_autotuning_is_off_behind_the_reader_and_can_be_turned_back_on(id_shards):
    """With tf.data's autotuning on, ending an iterator over ``from_generator`` stalled for
    0.4-1.2 s in about half the epochs (a pure-TensorFlow pipeline: never): every Keras
    epoch and validation pass paid it. The reader tunes its own read-ahead, so the dataset
    turns autotuning off; a map or prefetch with AUTOTUNE after it still runs, and a
    user's own options win."""
    shards, _ = id_shards
    ds = image_dataset_from_shards(shards, split="train", image_size=(4, 4), batch_size=16, seed=0)
    assert ds.options().autotune.enabled is False
    scaled = ds.map(lambda x, y: (x / 255.0, y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    assert scaled.options().autotune.enabled is False
    assert sum(int(y.shape[0]) for _, y in scaled) == 210
    assert max(float(tf.reduce_max(x)) for x, _ in scaled) <= 1.0
    on = tf.data.Options()
    on.autotune.enabled = True
    assert ds.with_options(on).options().autotune.enabled is True


@pytest.mark.slow
def test_fit_evaluate_predict_on_real_photos(photo_shards):
    keras.utils.set_random_seed(0)
    opts = dict(image_size=(32, 32), batch_size=32, seed=0)
    train = image_dataset_from_shards(photo_shards, split="train", **opts)
    val = image_dataset_from_shards(photo_shards, split="validation", shuffle=False, **opts)
    model = small_cnn(keras)

    steps = []

    class Steps(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            steps.append(self.params["steps"])

    history = model.fit(train, validation_data=val, epochs=8, verbose=0, callbacks=[Steps()])
    assert steps[0] == len(train) == 10  # 320 samples / 32: Keras knew the epoch length
    assert history.history["val_accuracy"][-1] > 0.6, history.history  # chance is 0.25

    test = image_dataset_from_shards(photo_shards, split="test", shuffle=False, **opts)
    _, accuracy = model.evaluate(test, verbose=0)
    reader = ShardReader(photo_shards, split="test", shuffle=False, **opts)
    predicted = model.predict(test, verbose=0).argmax(1)
    assert len(predicted) == len(reader.filenames) == 80
    # rows line up with filenames: the class folder in the path is the true label
    truth = np.array([reader.class_names.index(f.split("/")[1]) for f in reader.filenames])
    assert np.array_equal(truth, reader.labels)
    assert abs((predicted == truth).mean() - accuracy) < 1e-6


def _short_epoch(kind, id_shards, tmp_path):
    """A source whose epoch comes short of its promised batches of 8, and the options that
    skip what is damaged: a sample no decoder reads under the default on_error="warn", or
    a shard cut short under on_shard_error="ignore"."""
    import shutil

    if kind == "sample":  # 33 samples, one broken: 4 batches of 8, not 5
        return write_id_tars(tmp_path, 33, {5}, 16), dict(num_classes=3)
    shards = tmp_path / "copy"
    shutil.copytree(id_shards[0], shards)
    last = sorted((shards / "test").glob("*.tar"))[-1]  # 14 of the split's 30 samples
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    return shards, dict(split="test", on_shard_error="ignore")


@pytest.mark.parametrize("kind", ["sample", "shard"])
def test_fit_goes_on_past_an_epoch_that_came_short(id_shards, tmp_path, kind):
    """Keras sizes its epochs by the dataset's cardinality, which fit holds the data to:
    an epoch that lost a batch to what it skipped ended fit at the first epoch's end
    ("expected to contain 5 elements but contained only 4"). The epoch is filled up with
    its own first batches, so it keeps its length."""
    source, options = _short_epoch(kind, id_shards, tmp_path)
    opts = dict(image_size=(16, 16), batch_size=8, shuffle=False, **options)
    ds = image_dataset_from_shards(source, **opts)
    batches = [sample_ids(x) for x, _ in ds]
    lap = next(k for k in range(1, len(batches)) if batches[k] == batches[0])
    assert len(batches) == len(ds) and 0 < lap < len(ds)
    assert batches[lap:] == batches[: len(ds) - lap]  # the first batches again
    assert len({i for ids in batches[:lap] for i in ids}) == sum(map(len, batches[:lap]))

    keras.utils.set_random_seed(0)
    model = small_cnn(keras, image_size=(16, 16), classes=3)
    steps = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append(batch)

    history = model.fit(image_dataset_from_shards(source, **dict(opts, shuffle=True)),
                        epochs=2, verbose=0, callbacks=[Steps()])
    assert len(history.history["loss"]) == 2 and len(steps) == 2 * len(ds)

    # single images (batch_size=None): the cardinality counts samples, kept to the sample
    single = image_dataset_from_shards(source, **dict(opts, batch_size=None))
    images = [sample_ids(x[None])[0] for x, _ in single]
    assert len(images) == single.cardinality() == single.shard_reader.rank_samples
    kept = len(set(images))
    assert images[kept:] == images[: len(images) - kept]


def test_channels_first_as_keras(id_shards):
    """data_format="channels_first", or Keras' global image data format, gives (batch,
    channels, height, width) images holding the channels-last pixels."""
    shards, _ = id_shards
    opts = dict(split="test", image_size=(4, 6), batch_size=8, shuffle=False)
    last = next(iter(image_dataset_from_shards(shards, **opts)))[0].numpy()
    first = image_dataset_from_shards(shards, data_format="channels_first", **opts)
    assert tuple(first.element_spec[0].shape) == (None, 3, 4, 6)
    np.testing.assert_array_equal(next(iter(first))[0].numpy(), last.transpose(0, 3, 1, 2))
    single = image_dataset_from_shards(shards, data_format="channels_first", label_mode=None,
                                       **{**opts, "batch_size": None})
    assert tuple(next(iter(single)).shape) == (3, 4, 6)
    keras.config.set_image_data_format("channels_first")
    try:
        assert tuple(image_dataset_from_shards(shards, **opts).element_spec[0].shape) == (None, 3, 4, 6)
    finally:
        keras.config.set_image_data_format("channels_last")
    with pytest.raises(ValueError, match="data_format"):
        image_dataset_from_shards(shards, data_format="nchw", **opts)


def test_channels_first_keeps_keras_unrounded_pixels(photo_shards):
    """On photos resized in float32 (values that are not whole numbers), channels_first is
    exactly the channels-last batch transposed: Keras' pixels either way."""
    opts = dict(split="train", image_size=(56, 60), batch_size=16, shuffle=False)
    last = np.concatenate([x.numpy() for x, _ in image_dataset_from_shards(photo_shards, **opts)])
    first = np.concatenate([x.numpy() for x, _ in image_dataset_from_shards(
        photo_shards, data_format="channels_first", **opts)])
    assert not np.array_equal(last, np.round(last))  # the float32 resize was taken
    np.testing.assert_array_equal(first, last.transpose(0, 3, 1, 2))


def test_keras_directory_options_are_taken_or_refused_with_advice(id_shards):
    """labels="inferred"/None are Keras' and work; a label list, validation_split/subset
    and follow_links act at pack time here and are refused saying so; drop_remainder with
    batch_size=None (no batches) is refused instead of losing samples."""
    shards, _ = id_shards
    opts = dict(split="test", image_size=4, verbose=False)
    assert len(list(image_dataset_from_shards(shards, labels="inferred", **opts))[0]) == 2
    images = image_dataset_from_shards(shards, labels=None, **opts)
    assert tuple(next(iter(images)).shape) == (30, 4, 4, 3)
    with pytest.raises(ValueError, match="labels='inferred'"):
        image_dataset_from_shards(shards, labels=[0, 1, 2], **opts)
    for bad in (dict(validation_split=0.2, subset="training"), dict(subset="both")):
        with pytest.raises(ValueError, match="--validation-split"):
            image_dataset_from_shards(shards, **bad, **opts)
    with pytest.raises(ValueError, match="--follow-links"):
        image_dataset_from_shards(shards, follow_links=True, **opts)
    with pytest.raises(ValueError, match="batch_size=None"):
        image_dataset_from_shards(shards, batch_size=None, drop_remainder=True, **opts)
    one_by_one = image_dataset_from_shards(shards, batch_size=None, **opts)
    assert int(one_by_one.cardinality()) == len(list(one_by_one)) == 30


def test_found_line_and_class_names_without_labels_as_keras(id_shards, tmp_path, capsys):
    """Keras prints "Found N files belonging to C classes." (or "Found N files." without
    labels) and refuses class_names without labels; the dataset printed its own line and
    read a silent class subset whose class_names it then hid (None without labels)."""
    from conftest import write_id_tree

    shards, _ = id_shards
    src = tmp_path / "src"
    write_id_tree(src, {"test": 2})
    for kwargs in ({}, {"label_mode": None}, {"labels": None}):
        keras.utils.image_dataset_from_directory(src / "test", image_size=(4, 4), **kwargs)
        keras_line = capsys.readouterr().out.strip().splitlines()[-1]
        image_dataset_from_shards(shards, split="test", image_size=4, **kwargs)
        ours = capsys.readouterr().out.strip().splitlines()[-1]
        n, c = keras_line.split()[1], "3"
        assert (keras_line, ours) == (
            (f"Found {n} files belonging to {c} classes.", "Found 30 files belonging to 3 classes.")
            if not kwargs else (f"Found {n} files.", "Found 30 files.")), kwargs
        if kwargs:
            with pytest.raises(ValueError, match="cannot be specified") as keras_error:
                keras.utils.image_dataset_from_directory(src / "test", class_names=["circle"], **kwargs)
            with pytest.raises(ValueError, match="class_names cannot be specified, as in Keras"):
                image_dataset_from_shards(shards, split="test", class_names=["circle"], **kwargs)
            assert "`labels=None`" in str(keras_error.value)


def test_an_empty_split_and_repeated_class_names_are_refused(tmp_path):
    """Keras refuses a folder without images; a class named twice would be counted twice."""
    from conftest import write_id_tree

    from packer import pack
    from packer.errors import EmptySplitError

    write_id_tree(tmp_path / "src", {"train": 3})
    (tmp_path / "src" / "test" / "circle").mkdir(parents=True)  # a split of empty folders
    pack(tmp_path / "src", tmp_path / "shards", workers=1, quiet=True)
    with pytest.raises(EmptySplitError, match="no images found in split 'test'"):
        image_dataset_from_shards(tmp_path / "shards", split="test", verbose=False)
    reader = ShardReader(tmp_path / "shards", split="test")
    with pytest.raises(EmptySplitError):
        next(iter(reader))
    from reader.contact_sheet import preview  # a preview of nothing is an empty sheet

    assert preview(tmp_path / "shards", split="test", out=tmp_path / "empty.png").exists()
    torch = pytest.importorskip("torch")
    from reader.torch_data import ShardIterableDataset

    for workers in (0, 2):  # loader workers read the split too
        loader = torch.utils.data.DataLoader(ShardIterableDataset(tmp_path / "shards", split="test"),
                                             batch_size=None, num_workers=workers)
        with pytest.raises(EmptySplitError):
            next(iter(loader))
    with pytest.raises(ValueError, match=r"\['circle'\] more than once"):
        ShardReader(tmp_path / "shards", class_names=["circle", "square", "circle"])


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "32", True])
def test_a_batch_size_that_is_not_a_whole_number_is_refused_up_front(id_shards, batch_size):
    """batch_size=0 used to mean 32 and 2.5 failed at the first batch inside TensorFlow."""
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        image_dataset_from_shards(id_shards[0], split="test", image_size=4, verbose=False,
                                  batch_size=batch_size)


@pytest.mark.parametrize("image_size", [(20, 20, 3), (20.7, 20), (0, 4), (4,), "20", (4, None)])
def test_an_image_size_keras_refuses_is_refused(id_shards, image_size):
    """(20, 20, 3) and (20.7, 20) used to give 20x20 batches without a word."""
    with pytest.raises(ValueError, match="image_size"):
        image_dataset_from_shards(id_shards[0], split="test", verbose=False, image_size=image_size)
    with pytest.raises(ValueError, match="image_size"):
        ShardReader(id_shards[0], split="test", image_size=image_size)


def test_keras_format_keyword(id_shards):
    """Keras 3's format="tf" is what we return; "grain" is refused saying what to use."""
    ds = image_dataset_from_shards(id_shards[0], split="test", image_size=4, verbose=False,
                                   format="tf")
    assert int(ds.cardinality()) == 1
    with pytest.raises(ValueError, match="ShardReader"):
        image_dataset_from_shards(id_shards[0], split="test", image_size=4, verbose=False,
                                  format="grain")


# ---- the pixels of image_dataset_from_directory, kind by kind ----------------------------


def _image_kinds() -> dict[str, tuple[str, bytes]]:
    """One small image of each kind a class folder collects that Keras reads (name -> (ext,
    bytes)): JPEG baseline 4:2:0 / 4:4:4, progressive and grey; PNG RGB, RGBA with graded
    alpha, LA, L, palette, palette with a transparent colour, 16-bit grey; GIF, GIF with a
    transparent colour; BMP; tiny (1x1, 1xN, Nx1), very wide, and smaller than the batch;
    CMYK JPEGs: Adobe's inverted CMYK (as Pillow and Photoshop write it), YCCK, and CMYK
    without the Adobe marker (not inverted)."""
    import io

    import simplejpeg
    from PIL import Image

    from packer.examples import photo
    from packer.headers import _segments

    def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    cat, coffee = photo("cat").resize((150, 100)), photo("coffee").resize((120, 80))
    rgba = np.asarray(cat.convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, 150, dtype=np.uint8)[None]
    grey = np.asarray(coffee.convert("L"))
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=48)
    deep = grey.astype(np.uint16) * 257 + (np.arange(120, dtype=np.uint16)[None] % 256)  # low byte varies
    adobe = encoded(cat.convert("CMYK"), "JPEG", quality=90)
    ycck = simplejpeg.encode_jpeg(np.ascontiguousarray(255 - np.asarray(coffee.convert("CMYK"))),
                                  colorspace="CMYK", quality=90)  # inverted, as Adobe stores it
    app14 = next((pos, length) for marker, pos, length in _segments(adobe) if marker == 0xEE)
    plain_cmyk = adobe[: app14[0]] + adobe[app14[0] + 2 + app14[1] :]
    return {
        "cmyk_adobe.jpg": ("jpg", adobe),
        "ycck.jpg": ("jpg", ycck),
        "cmyk_plain.jpg": ("jpg", plain_cmyk),
        "baseline.jpg": ("jpg", encoded(cat, "JPEG", quality=85)),
        "444.jpg": ("jpg", encoded(coffee, "JPEG", quality=90, subsampling=0)),
        "progressive.jpg": ("jpg", encoded(cat, "JPEG", quality=85, progressive=True)),
        "grey.jpg": ("jpg", encoded(coffee.convert("L"), "JPEG", quality=90)),
        "rgb.png": ("png", encoded(coffee, "PNG")),
        "rgba.png": ("png", encoded(Image.fromarray(rgba), "PNG")),
        "la.png": ("png", encoded(Image.fromarray(np.stack([grey, grey[::-1]], -1), "LA"), "PNG")),
        "l.png": ("png", encoded(Image.fromarray(grey), "PNG")),
        "palette.png": ("png", encoded(palette, "PNG")),
        "palette_trns.png": ("png", encoded(palette, "PNG", transparency=3)),
        "deep.png": ("png", encoded(Image.fromarray(deep), "PNG")),
        "plain.gif": ("gif", encoded(palette, "GIF")),
        "trns.gif": ("gif", encoded(palette, "GIF", transparency=3)),
        "pic.bmp": ("bmp", encoded(coffee, "BMP")),
        "1x1.png": ("png", encoded(cat.resize((1, 1)), "PNG")),
        "1x9.jpg": ("jpg", encoded(cat.resize((1, 9)), "JPEG", quality=95)),
        "9x1.png": ("png", encoded(cat.resize((9, 1)), "PNG")),
        "wide.jpg": ("jpg", encoded(coffee.resize((300, 12)), "JPEG", quality=90)),
        "small.png": ("png", encoded(cat.resize((21, 14)), "PNG")),
    }


@pytest.fixture(scope="module")
def kinds_tree(tmp_path_factory):
    """The image kinds in two class folders, and their shards."""
    from packer import pack

    root = tmp_path_factory.mktemp("kinds")
    for i, (name, (_ext, data)) in enumerate(sorted(_image_kinds().items())):
        folder = root / "src" / "train" / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    pack(root / "src", root / "shards", seed=0, max_count=8, workers=1, quiet=True)
    return root


@pytest.mark.parametrize("options", [
    dict(image_size=(48, 40)),
    dict(image_size=(48, 40), interpolation="nearest"),
    dict(image_size=(40, 64), crop_to_aspect_ratio=True),
    dict(image_size=(40, 64), pad_to_aspect_ratio=True, interpolation="nearest"),
], ids=["bilinear", "nearest", "crop", "pad-nearest"])
def test_without_dct_scaling_every_kind_gets_keras_directory_pixels(kinds_tree, options):
    """dct_scaling=False promises image_dataset_from_directory's pixels (README, "Decoding"):
    bilinear within 0.8/255 (OpenCV's fixed-point weights: 0.77 measured), nearest equal,
    on every kind Keras reads, whichever decoder takes it (simplejpeg, OpenCV's PNG, Pillow
    for GIF, BMP, 16-bit, palette+alpha): alpha dropped as TensorFlow drops it, a GIF's
    transparent pixels black, 16-bit as its high byte, tiny and wide images, upscaling, and
    Keras' crop box and padding arithmetic. Images matched by file name (the orders
    differ)."""
    src = kinds_tree / "src" / "train"
    keras_ds = keras.utils.image_dataset_from_directory(src, shuffle=False, batch_size=None, verbose=False,
                                                        **options)
    want = {str(Path(p).relative_to(src)): x.numpy() for p, (x, _) in zip(keras_ds.file_paths, keras_ds, strict=True)}
    ours = image_dataset_from_shards(kinds_tree / "shards", split="train", shuffle=False, batch_size=None,
                                     dct_scaling=False, verbose=False, **options)
    names = [name.split("/", 1)[1] for name in ours.shard_reader.filenames]
    assert sorted(names) == sorted(want)
    exact = options.get("interpolation") == "nearest"
    for name, (x, _) in zip(names, ours, strict=True):
        diff = np.abs(x.numpy() - want[name])
        assert diff.max() <= (0 if exact else 0.8), (name, diff.max())


def test_a_dataset_let_go_lets_its_readers_processes_and_arrays_go(id_shards):
    """TensorFlow keeps from_generator's generator (and so the reader) for the rest of the
    process: a search making a dataset per trial kept every trial's decode processes and
    batch arrays. Once nothing holds the dataset any more, they go; a dataset built on it
    keeps it (and would start them again)."""
    import gc

    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    readers = []
    def held(reader):  # decode processes, or (threads) batch arrays kept between epochs
        return reader._pool is not None or reader._buffers is not None

    for trial, processes in enumerate((2, 0, 2)):
        ds = image_dataset_from_shards(id_shards[0], split="train", image_size=8, batch_size=32,
                                       seed=trial, verbose=False, processes=processes)
        readers.append(ds.shard_reader)
        assert sum(int(tf.shape(y)[0]) for _, y in ds) == 210 and held(readers[-1])
        kept = ds.map(lambda x, y: (x, y))  # holds ds: nothing is let go
        del ds
        gc.collect()
        assert held(readers[-1])
        del kept
        gc.collect()

    def left() -> list[int]:  # our children still running, but multiprocessing's tracker
        running = []
        for child in me.children(recursive=True):
            try:
                if (child.pid not in before and child.status() != psutil.STATUS_ZOMBIE
                        and "resource_tracker" not in " ".join(child.cmdline())):
                    running.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return running

    deadline = time.monotonic() + 20  # TensorFlow's iterator threads may still hold a dataset
    while (any(held(r) for r in readers) or left()) and time.monotonic() < deadline:
        time.sleep(0.2)
        gc.collect()
    assert not any(held(r) for r in readers)
    assert not left()
