"""ShardReader: stream one split's shards as shuffled, decoded numpy batches.

The whole pipeline of an epoch is in :meth:`ShardReader._epoch_batches`, one stage per
line: shards for this epoch -> open and read each shard as one stream -> interleave a few
shards -> pick and re-index classes -> shuffle compressed samples in a buffer -> decode on
a thread pool -> batches.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from packer.errors import ClassNotFoundError, SampleDecodeError

from .batches import BatchOptions, decode_batches
from .decode import DecodeOptions
from .policy import ErrorPolicy, OnError
from .samples import Sample, sample_label, scan_shard, shard_samples
from .shuffle import DEFAULT_BUFFER, epoch_rng, interleave, shards_for_epoch, shuffle_buffer
from .source import SplitSource, resolve_source

__all__ = ["ShardReader"]

log = logging.getLogger("shardpack.reader")

Batch = np.ndarray | tuple[np.ndarray, np.ndarray]


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _image_bytes(item: tuple[Sample, int]) -> int:
    return sum(len(v) for k, v in item[0].items() if not k.startswith("__"))


class ShardReader:
    """Iterate over one split of a shard set as numpy batches ``(x, y)``, epoch by epoch.

    Each ``iter(reader)`` is a new epoch (``reader.epoch`` counts them) with a new shuffle
    order; with ``shuffle=False`` every epoch is the manifest order exactly, so predictions
    line up with :attr:`filenames` and :attr:`labels`. Shards are read sequentially, whole,
    one request per shard, never one seek per sample.

    Args:
        source: shardpack output folder or URL (``s3://``, ``gs://``, ``http(s)://``,
            ``file://``), or manifest-less WebDataset tars: a list of paths/URLs or a brace
            pattern (``"data-{000000..000009}.tar"``).
        split: split to read (ignored for manifest-less tars).
        image_size: ``(height, width)`` of the images, as Keras.
        batch_size: samples per batch.
        label_mode: "int", "categorical", "binary" or None (yield ``x`` only), as Keras.
        class_names: read only these classes, labelled by their position in this list
            (Keras' subset semantics). For manifest-less tars: the names of labels 0..n-1.
        color_mode: "grayscale", "rgb" or "rgba".
        shuffle: shuffle shard order, interleave shards and shuffle samples in a buffer.
        seed: seed of every random choice; None draws one at random once per reader.
        interpolation: Keras interpolation name ("bilinear", "nearest", "bicubic", "area",
            "lanczos3", "lanczos5", "gaussian", "mitchellcubic").
        crop_to_aspect_ratio: centre-crop to the target aspect ratio before resizing.
        pad_to_aspect_ratio: resize to fit and pad with zeros, keeping the aspect ratio.
        drop_remainder: drop the last, smaller batch of each epoch.
        shuffle_buffer: samples held (still compressed) for shuffling.
        shuffle_buffer_bytes: also cap the buffer at this many compressed bytes (None: no
            cap; 10,000 ImageNet JPEGs are about 1.1 GB).
        interleave: shards read round robin at once when shuffling.
        num_workers: decoding threads (default: the CPUs this process may use).
        on_error: a sample that cannot be decoded: "warn" (skip, count, warn), "ignore"
            (skip and count) or "raise" (SampleDecodeError).
        on_shard_error: a shard that cannot be read: "raise" (ShardReadError naming the
            shard and byte offset), or "warn"/"ignore" to skip the rest of that shard.
        rescale: multiply pixel values by this (e.g. ``1 / 255``).
        random_flip: flip images horizontally at random (augmentation).
        random_crop: ``(min, max)`` area fraction of a random crop (augmentation).
        num_classes: number of classes for manifest-less tars (else found by a scan).
        storage_options: passed to fsspec for every file (credentials, endpoint, ...).
        rank, world_size: reserved for distributed reading (only 0 / 1 for now).

    Raises:
        ManifestError: no or invalid manifest at SOURCE.
        SplitNotFoundError: ``split`` is not in the manifest (lists the splits there are).
        ClassNotFoundError: a name in ``class_names`` is not a class (lists those there are).
        ValueError: invalid option values.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str],
        *,
        split: str = "train",
        image_size: tuple[int, int] | int = (256, 256),
        batch_size: int = 32,
        label_mode: str | None = "int",
        class_names: Sequence[str] | None = None,
        color_mode: str = "rgb",
        shuffle: bool = True,
        seed: int | None = None,
        interpolation: str = "bilinear",
        crop_to_aspect_ratio: bool = False,
        pad_to_aspect_ratio: bool = False,
        drop_remainder: bool = False,
        shuffle_buffer: int = DEFAULT_BUFFER,
        shuffle_buffer_bytes: int | None = None,
        interleave: int = 4,
        num_workers: int | None = None,
        on_error: OnError = "warn",
        on_shard_error: OnError = "raise",
        rescale: float | None = None,
        random_flip: bool = False,
        random_crop: tuple[float, float] | None = None,
        num_classes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if (rank, world_size) != (0, 1):
            raise NotImplementedError("distributed reading (rank/world_size) is not implemented yet")
        self.storage_options = dict(storage_options or {})
        self.source: SplitSource = resolve_source(
            source if isinstance(source, (str, list, tuple)) else os.fspath(source),
            split=split,
            storage_options=self.storage_options,
        )
        self.split = split
        self.shuffle = shuffle
        self.seed = int(seed) if seed is not None else secrets.randbelow(2**31)
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_buffer_bytes = shuffle_buffer_bytes
        self.interleave = max(1, int(interleave))
        self.num_workers = num_workers or _default_workers()
        self.rank, self.world_size = rank, world_size
        self.policy = ErrorPolicy(on_error=on_error, on_shard_error=on_shard_error)
        self.decode_options = DecodeOptions(
            image_size=image_size if not isinstance(image_size, int) else (image_size, image_size),
            color_mode=color_mode,
            interpolation=interpolation,
            crop_to_aspect_ratio=crop_to_aspect_ratio,
            pad_to_aspect_ratio=pad_to_aspect_ratio,
            random_crop=tuple(random_crop) if random_crop is not None else None,
            random_flip=random_flip,
        )
        self._index: list[list[tuple[str, int | None, str | None]]] | None = None
        self.class_names, self._remap = self._resolve_classes(class_names, num_classes)
        self.batch_options = BatchOptions(
            batch_size=batch_size,
            label_mode=label_mode,
            num_classes=len(self.class_names),
            drop_remainder=drop_remainder,
            rescale=rescale,
        )
        self.epoch = 0  # the epoch the next iter() reads
        self.batches_yielded = 0  # batches yielded so far in the current epoch

    # ---- classes, counts and the lazily scanned index -------------------------------

    def _resolve_classes(
        self, class_names: Sequence[str] | None, num_classes: int | None
    ) -> tuple[list[str], dict[int, int] | None]:
        """Return (class names, manifest label -> our label map or None for identity)."""
        available = self.source.classes
        if available is not None:
            if class_names is None:
                return list(available), None
            missing = [c for c in class_names if c not in available]
            if missing:
                raise ClassNotFoundError(missing, list(available))
            return list(class_names), {available.index(c): i for i, c in enumerate(class_names)}
        if class_names is not None:
            return list(class_names), None
        if num_classes is not None:
            return [str(i) for i in range(num_classes)], None
        # manifest-less and nothing said: find the classes in the shards (one scan)
        named: dict[int, str] = {}
        for entries in self._scan():
            for _path, label, name in entries:
                if label is not None:
                    named.setdefault(label, name if name is not None else str(label))
        n = max(named) + 1 if named else 0
        return [named.get(i, str(i)) for i in range(n)], None

    def _scan(self) -> list[list[tuple[str, int | None, str | None]]]:
        """Read every shard's small members once (cached): paths, labels, class names."""
        if self._index is None:
            self._index = [
                scan_shard(ref, storage_options=self.storage_options) for ref in self.source.shards
            ]
        return self._index

    def _entries(self) -> list[tuple[str, int]]:
        """(path, our label) of every selected sample, in manifest (unshuffled) order."""
        out = []
        for entries in self._scan():
            for path, label, _name in entries:
                if self._remap is not None:
                    if label not in self._remap:
                        continue
                    label = self._remap[label]
                out.append((path, -1 if label is None else label))
        return out

    @property
    def samples(self) -> int:
        """Samples per epoch (from the manifest; manifest-less shards are scanned once)."""
        src = self.source
        if src.count is not None and self._remap is None:
            return src.count
        if src.count is not None and src.class_counts:
            return sum(src.class_counts.get(c, 0) for c in self.class_names)
        return len(self._entries())

    def __len__(self) -> int:
        """Batches per epoch (as the manifest says; samples that fail to decode not subtracted)."""
        size = self.batch_options.batch_size
        if self.batch_options.drop_remainder:
            return self.samples // size
        return math.ceil(self.samples / size)

    @property
    def filenames(self) -> list[str]:
        """Source path of every sample (its ``.json`` "path", else its key), manifest order.

        Costs one pass over every shard of the split the first time (only the small
        ``.json``/``.cls`` members are read; image bytes are skipped by seeking where the
        storage allows it), then it is cached.
        """
        return [path for path, _ in self._entries()]

    @property
    def labels(self) -> np.ndarray:
        """Class index (int32) of every sample in manifest order; same cost as filenames."""
        return np.asarray([label for _, label in self._entries()], dtype=np.int32)

    # ---- iteration ------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` read epoch ``epoch`` (e.g. when resuming training)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        self.batches_yielded = 0
        skipped = self.policy.skipped_samples, self.policy.skipped_shards
        for batch in self._epoch_batches(epoch):
            self.batches_yielded += 1
            yield batch
        lost = (self.policy.skipped_samples - skipped[0], self.policy.skipped_shards - skipped[1])
        if any(lost):
            log.warning(
                "epoch %d of %s: skipped %d undecodable samples and %d damaged shards",
                epoch, self.split, *lost,
            )

    def _select(self, samples: Iterator[Sample]) -> Iterator[tuple[Sample, int]]:
        """Keep the classes asked for, re-index labels, and keep only the image bytes."""
        need_label = self.batch_options.label_mode is not None
        for sample in samples:
            label = sample_label(sample)
            if self._remap is not None:
                if label not in self._remap:
                    continue
                label = self._remap[label]
            if label is None:
                if need_label:
                    self.policy.sample_failed(
                        SampleDecodeError("has no .cls label", key=sample["__key__"], shard=sample["__shard__"])
                    )
                    continue
                label = -1
            elif need_label and not 0 <= label < len(self.class_names):
                self.policy.sample_failed(
                    SampleDecodeError(
                        f"label {label} is outside the {len(self.class_names)} classes; "
                        "pass num_classes= or class_names=",
                        key=sample["__key__"],
                        shard=sample["__shard__"],
                    )
                )
                continue
            yield {k: v for k, v in sample.items() if k not in ("cls", "json")}, label

    def _epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """The pipeline of one epoch, stage by stage."""
        shards = shards_for_epoch(
            self.source.shards, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
            rank=self.rank, world_size=self.world_size,
        )
        streams = (
            shard_samples(ref, policy=self.policy, storage_options=self.storage_options)
            for ref in shards
        )
        samples = interleave(streams, cycle_length=self.interleave if self.shuffle else 1)
        labelled = self._select(samples)
        if self.shuffle:
            labelled = shuffle_buffer(
                labelled, rng=epoch_rng(self.seed, epoch, "samples"), size=self.shuffle_buffer,
                max_bytes=self.shuffle_buffer_bytes, nbytes=_image_bytes,
            )
        augment = self.decode_options.random_flip or self.decode_options.random_crop is not None
        aug_rng = epoch_rng(self.seed, epoch, "augment") if augment else None
        window = max(2 * self.batch_options.batch_size, 4 * self.num_workers)
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="shardpack-decode") as pool:
            yield from decode_batches(
                labelled, decode=self.decode_options, batch=self.batch_options, pool=pool,
                policy=self.policy, window=window, aug_rng=aug_rng,
            )

    def __repr__(self) -> str:
        return (
            f"ShardReader(split={self.split!r}, samples={self.samples}, batches={len(self)}, "
            f"classes={len(self.class_names)}, shuffle={self.shuffle}, seed={self.seed})"
        )
