"""``image_dataset_from_shards``: a ``tf.data.Dataset`` like Keras' image_dataset_from_directory.

TensorFlow is imported here only, when the function is called, so ``import reader`` and
numpy users never pay for it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .batches import DATA_FORMATS
from .checks import check_batch_size, check_image_size
from .shard_reader import ShardReader

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["image_dataset_from_shards", "restore_malloc_thresholds"]

# glibc's mallopt parameters, and the values its adaptive thresholds settle at on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 1 << 20
_TRIM_THRESHOLD = 2 * _MMAP_THRESHOLD
_UNBATCHED_READ = 32  # the reader's batch size behind batch_size=None (then unbatched)


def restore_malloc_thresholds() -> None:
    """Undo the fixed 128 KB malloc thresholds TensorFlow's ``from_generator`` sets (glibc).

    TensorFlow's generator dataset calls ``mallopt(M_TRIM_THRESHOLD, 128 KB)`` when it
    starts ("Memory patch applied" in its log), which also switches off glibc's adaptive
    mmap threshold: from then on every allocation of 128 KB or more is a fresh ``mmap``
    whose pages are faulted in and zeroed, and is unmapped again when freed. Before the
    decode threads had work arrays of their own (``reader.decode._WorkArrays``), each
    decoded and resized image was one: a third more CPU per image on resized shards (1.36
    vs 0.91 ms with ``shardpack bench``). What is left is the compressed samples over 128
    KB, PNG and Pillow decodes, and the ``nearest`` and Pillow interpolations: on the
    originals, 20-25 page faults per image without this. This sets a 1 MB mmap threshold
    (and glibc's 2x trim threshold), so the compressed samples and small decodes are reused
    from the heap again, while anything larger still goes back to the system when freed.
    It used to set what glibc's adaptation converges to (32 MB, 64 MB): then every pass's
    buffers stayed in the decode threads' malloc arenas, and RSS rose pass after pass (by
    282 MB over 30 passes of ``take(3)`` on 2 cores; 71-89 with 1 MB, as with TensorFlow's
    own setting), for no CPU
    measurable here (CPU per image with 1 MB, 32 MB and TensorFlow's setting within noise
    of each other, 3 rounds each, originals and ``--resize 256`` shards, 2026-11-27).
    No effect where malloc is not glibc's; ``SHARDPACK_TF_MALLOC=keep`` leaves it alone.
    """
    if os.environ.get("SHARDPACK_TF_MALLOC") == "keep" or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # a libc without mallopt (musl)
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def image_dataset_from_shards(
    source: str | os.PathLike[str] | Sequence[str],
    *,
    split: str = "train",
    label_mode: str | None = "int",
    class_names: Sequence[str] | None = None,
    color_mode: str = "rgb",
    batch_size: int | None = 32,
    image_size: tuple[int, int] = (256, 256),
    shuffle: bool = True,
    seed: int | None = None,
    interpolation: str = "bilinear",
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
    data_format: str | None = None,
    verbose: bool = True,
    labels: str | None = "inferred",
    validation_split: float | None = None,
    subset: str | None = None,
    follow_links: bool = False,
    format: str = "tf",
    **reader_options: Any,
) -> tf.data.Dataset:
    """Return a ``tf.data.Dataset`` of one split, as ``keras.utils.image_dataset_from_directory`` would.

    The keyword names and meanings are Keras': images are float32 in [0, 255] of shape
    ``(batch, height, width, channels)``; labels are int32 ``(batch,)`` for "int", float32
    one-hot ``(batch, classes)`` for "categorical", float32 ``(batch, 1)`` for "binary";
    ``label_mode=None`` yields images only. ``class_names`` picks a subset of classes (and
    their order): samples of other classes are left out and labels are positions in this
    list (with labels only, as Keras). The dataset has ``class_names`` (None without labels, as Keras) and a known
    cardinality (batches per epoch from the manifest), so ``model.fit`` shows steps per
    epoch. Each pass over the dataset (each
    Keras epoch) is a new epoch with a new shuffle order; ``shuffle=False`` gives the
    manifest order every time: the pack's seeded order, not Keras' class-then-filename
    order (``ds.shard_reader.filenames`` and ``.labels`` list it).

    The cardinality counts every sample in the manifest, and every epoch keeps it: if
    samples are skipped (``on_error="warn"``, a shard damaged after packing; ``shardpack
    verify --deep`` finds it) and that removes a whole batch, the epoch is filled up with
    its first batches again rather than end ``fit`` with TensorFlow's "expected to contain
    N elements" (docs/READING.md, "An epoch that comes short").

    ``data_format`` follows Keras' ``keras.config.image_data_format()`` when None.

    Unlike Keras, ``file_paths`` is not set: the paths are in the shards, and listing them
    reads every shard's small members once, which building the dataset must not cost; use
    ``ds.shard_reader.filenames`` (in the ``shuffle=False`` order). The reader behind the
    dataset is ``ds.shard_reader``.

    Pixels differ from Keras' where shardpack does more or differently: EXIF orientation
    is applied (Keras ignores it), JPEGs shrunk 2x or more are DCT-scaled (``dct_scaling``;
    see ShardReader) and interpolations other than bilinear/nearest are not TensorFlow's.

    Args:
        source: shard folder or URL, or manifest-less tars (see ShardReader).
        split: split to read.
        batch_size: samples per batch, a whole number >= 1; None yields single images.
        image_size: ``(height, width)`` or one int for both (whole numbers >= 1).
        data_format: "channels_last" or "channels_first" (images ``(batch, channels,
            height, width)``, transposed by TensorFlow after the reader); None follows
            ``keras.config.image_data_format()``, as Keras does.
        verbose: print how many files and classes were found, as Keras does.
        labels: Keras' "inferred" (the class folders', fixed at pack time) or None (no
            labels, as ``label_mode=None``); explicit label lists are refused.
        validation_split, subset, follow_links: Keras' directory options, which act when
            packing here: ``shardpack pack --validation-split F`` writes "train" and
            "validation" splits (read with ``split=``), ``--follow-links`` follows links to
            folders (links to files are read anyway).
            Refused (with that advice) unless left at Keras' defaults.
        format: Keras' "tf" (a ``tf.data.Dataset``, the default); Keras' "grain" is
            refused (use ``ShardReader`` or the PyTorch dataset for numpy batches).
        reader_options: more ShardReader options (``shuffle_buffer``, ``num_workers``,
            ``on_error``, ``storage_options``, ``drop_remainder``, ``rescale``, ...).

    Raises:
        ManifestError, SplitNotFoundError, ClassNotFoundError, ValueError: as ShardReader
            (also a ``batch_size`` or ``image_size`` that is not whole numbers >= 1, and a
            ``format`` other than "tf").
        EmptySplitError: the split has no images (of the selected classes), as Keras
            refuses a folder without images.
    """
    import tensorflow as tf

    label_mode = _keras_labels(labels, label_mode)
    if label_mode is None and class_names is not None:
        raise ValueError(  # Keras refuses it too; the reader itself takes it
            "When labels=None or label_mode=None (no labels), class_names cannot be specified, "
            "as in Keras; to read some classes' images without labels, use "
            "reader.ShardReader(..., class_names=[...], label_mode=None)"
        )
    _refuse_directory_options(validation_split, subset, follow_links)
    _refuse_format(format)
    if batch_size is None and reader_options.get("drop_remainder"):
        raise ValueError("drop_remainder=True drops a short last batch; with batch_size=None "
                         "the dataset yields single images and has none")
    reader = ShardReader(
        source,
        split=split,
        image_size=check_image_size(image_size),
        # None: single images, unbatched from the reader's batches of 32 (cheaper per image)
        batch_size=_UNBATCHED_READ if batch_size is None else check_batch_size(batch_size),
        label_mode=label_mode,
        class_names=class_names,
        color_mode=color_mode,
        shuffle=shuffle,
        seed=seed,
        interpolation=interpolation,
        crop_to_aspect_ratio=crop_to_aspect_ratio,
        pad_to_aspect_ratio=pad_to_aspect_ratio,
        **reader_options,
    )
    if verbose:  # Keras' words, so logs read the same
        found = f"Found {reader.samples} files"
        print(f"{found}." if label_mode is None else f"{found} belonging to {len(reader.class_names)} classes.")
    reader.require_samples(scan=True)  # counted for the cardinality anyway
    reader.repick_processes()  # tars without a manifest: "auto" knows their count now
    reader._count_samples = batch_size is None  # the cardinality counts samples then
    h, w, c = reader.decode_options.shape
    x_spec = tf.TensorSpec((None, h, w, c), tf.as_dtype(reader.batch_options.dtype))
    y_specs = {
        "int": tf.TensorSpec((None,), tf.int32),
        "categorical": tf.TensorSpec((None, len(reader.class_names)), tf.float32),
        "binary": tf.TensorSpec((None, 1), tf.float32),
    }
    signature = x_spec if label_mode is None else (x_spec, y_specs[label_mode])
    def epoch() -> Iterator[Any]:
        # Every iteration of the dataset calls this again: a new epoch of the reader. The
        # reader's batch arrays are 64-byte aligned, so TensorFlow takes them without a copy.
        restore_malloc_thresholds()
        yield from reader

    ds = tf.data.Dataset.from_generator(epoch, output_signature=signature)
    if batch_size is None:
        ds = ds.unbatch().apply(tf.data.experimental.assert_cardinality(reader.rank_samples))
    else:
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(reader)))
    if _channels_first(data_format):
        # TensorFlow's own transpose (threaded C++, off the GIL) keeps the reader's float32
        # rows: Keras' unrounded pixels, which ShardReader(data_format=...) rounds
        order = [2, 0, 1] if batch_size is None else [0, 3, 1, 2]
        if label_mode is None:
            ds = ds.map(lambda x: tf.transpose(x, order))
        else:
            ds = ds.map(lambda x, y: (tf.transpose(x, order), y))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # tf.data's autotuning model: ending an iterator over from_generator with it on stalled
    # 0.4-1.2 s in about half the epochs (TensorFlow 2.21; a pure-TensorFlow pipeline did
    # not), so a Keras epoch of 2,400 images took 0.7-1.3 s instead of a steady 0.75. The
    # reader's read-ahead is its own; AUTOTUNE maps and prefetches after it still work
    # (at TensorFlow's default parallelism), and options the user sets later win.
    options.autotune.enabled = False
    if reader.world_size > 1:
        # The reader already gives this rank its own share of the split; a distribution
        # strategy must not shard the stream a second time.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    # Keras: no labels, no class names (the reader keeps them: ds.shard_reader.class_names)
    ds.class_names = None if label_mode is None else list(reader.class_names)
    ds.shard_reader = reader
    # TensorFlow keeps from_generator's generator function (and so the reader) for the rest
    # of the process, whatever becomes of the dataset: a search making one dataset per
    # trial kept every trial's batch arrays (~150-270 MB at 224x224) and decode processes.
    # Once no dataset is built on this one any more (each holds its input), the reader lets
    # them go; it would start them again if anything still read it.
    weakref.finalize(ds, reader.close)
    return ds


def _channels_first(data_format: str | None) -> bool:
    if data_format is None:
        try:
            import keras
        except ImportError:
            return False
        data_format = keras.config.image_data_format()
    if data_format not in DATA_FORMATS:
        raise ValueError(f'data_format must be "channels_last" or "channels_first", got {data_format!r}')
    return data_format == "channels_first"


def _keras_labels(labels: Any, label_mode: str | None) -> str | None:
    """Keras' ``labels``: "inferred" keeps ``label_mode``, None means no labels."""
    if labels is None:
        return None
    if isinstance(labels, str) and labels == "inferred":
        return label_mode
    raise ValueError(
        "labels are the class folders', fixed when packing: pass labels='inferred' (the "
        "default) or None for images only; a list of labels cannot be given to shards"
    )


def _refuse_directory_options(validation_split: float | None, subset: str | None, follow_links: bool) -> None:
    """Keras' directory options act at pack time here: say where, rather than ignore them."""
    if validation_split or subset is not None:  # Keras takes 0 as no split too
        raise ValueError(
            "validation_split/subset divide a folder when Keras reads it; shards are divided "
            "when packed: `shardpack pack SRC OUT --validation-split 0.2` writes 'train' and "
            "'validation' splits, read with split='train' and split='validation'"
        )
    if follow_links:
        raise ValueError("follow_links acts when packing: `shardpack pack --follow-links`")


def _refuse_format(format: str) -> None:
    """Keras 3's ``format=``: "tf" is what this function returns; say so for the rest."""
    if format != "tf":
        raise ValueError(
            f'format={format!r}: image_dataset_from_shards returns a tf.data.Dataset '
            '(format="tf"); for Keras\' "grain" format read numpy batches with '
            "reader.ShardReader (or reader.torch_data.ShardIterableDataset for PyTorch)"
        )
