"""Decode samples in parallel and assemble them into numpy batches.

Decoding runs on a thread pool: Pillow releases the GIL while it decodes and resizes, so
threads use every core without pickling compressed bytes to worker processes and decoded
pixels back (measured: threads are as fast as processes here and start instantly; see
``scripts/bench_decode.py``). Results come back in submission order, so the batch order is
exactly the sample order, which keeps seeded runs reproducible and unshuffled runs aligned
with ``filenames``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
from PIL import Image

from packer.errors import SampleDecodeError

from .decode import DecodeOptions, decode_image
from .policy import ErrorPolicy
from .samples import Sample, image_member

__all__ = ["LABEL_MODES", "BatchOptions", "decode_sample", "decode_batches"]

LABEL_MODES = ("int", "categorical", "binary", None)

# Errors that mean "these bytes are not a readable image" (anything else is a bug).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


@dataclass(frozen=True)
class BatchOptions:
    """How samples become batches.

    Attributes:
        batch_size: samples per batch.
        label_mode: "int" (int32, shape (b,)), "categorical" (float32 one-hot (b, n)),
            "binary" (float32 (b, 1)) or None (images only) -- as Keras.
        num_classes: number of classes (after any class subset), for one-hot labels.
        drop_remainder: drop the last, smaller batch.
        rescale: multiply pixels by this (e.g. 1/255) after decoding, as ImageDataGenerator.
    """

    batch_size: int = 32
    label_mode: str | None = "int"
    num_classes: int = 0
    drop_remainder: bool = False
    rescale: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")
        if self.label_mode == "binary" and self.num_classes != 2:
            raise ValueError(
                f'label_mode="binary" needs exactly 2 classes, got {self.num_classes}; '
                "pass class_names=[negative, positive]"
            )


def decode_sample(sample: Sample, options: DecodeOptions, aug_seed: int | None) -> np.ndarray:
    """Decode the image of one sample (runs on a worker thread).

    Raises:
        SampleDecodeError: no image member, or bytes Pillow cannot decode.
    """
    ext = image_member(sample)
    if ext is None:
        raise SampleDecodeError(
            f"has no image member (members: {sorted(k for k in sample if not k.startswith('__'))})",
            key=sample["__key__"],
            shard=sample.get("__shard__"),
        )
    rng = random.Random(aug_seed) if aug_seed is not None else None
    try:
        return decode_image(sample[ext], options, rng=rng)
    except _DECODE_ERRORS as exc:
        raise SampleDecodeError(
            f"cannot decode .{ext} image ({exc})", key=sample["__key__"], shard=sample.get("__shard__")
        ) from exc


def _labels(labels: list[int], options: BatchOptions) -> np.ndarray:
    ints = np.asarray(labels, dtype=np.int32)
    if options.label_mode == "int":
        return ints
    if options.label_mode == "binary":
        return ints.astype(np.float32)[:, None]
    onehot = np.zeros((len(ints), options.num_classes), dtype=np.float32)
    onehot[np.arange(len(ints)), ints] = 1.0
    return onehot


def decode_batches(
    samples: Iterable[tuple[Sample, int]],
    *,
    decode: DecodeOptions,
    batch: BatchOptions,
    pool: Executor,
    policy: ErrorPolicy,
    window: int,
    aug_rng: random.Random | None = None,
) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Decode ``(sample, label)`` pairs on ``pool`` and yield batches ``(x, y)`` (or ``x``).

    At most ``window`` samples are in flight, which bounds memory and keeps the pool busy
    while the main thread reads and shuffles. Samples that fail to decode go to ``policy``
    (skip and count, or raise), and the batch is filled from the following samples.

    ``x`` is float32 in [0, 255] (times ``rescale`` if set), shape (b, h, w, c), written
    into a preallocated array; ``y`` as ``batch.label_mode`` says.
    """
    in_flight: deque[tuple[Future[np.ndarray], int]] = deque()
    size = batch.batch_size
    x = np.empty((size, *decode.shape), dtype=np.float32)
    labels: list[int] = []

    def finish(n: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        images = x if n == size else x[:n]
        if batch.rescale is not None:
            images *= np.float32(batch.rescale)
        if batch.label_mode is None:
            return images
        return images, _labels(labels, batch)

    def collect() -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
        nonlocal x, labels
        future, label = in_flight.popleft()
        try:
            arr = future.result()
        except SampleDecodeError as exc:
            policy.sample_failed(exc)
            return
        x[len(labels)] = arr
        labels.append(label)
        if len(labels) == size:
            out = finish(size)
            x = np.empty((size, *decode.shape), dtype=np.float32)
            labels = []
            yield out

    try:
        for sample, label in samples:
            seed = aug_rng.getrandbits(64) if aug_rng is not None else None
            in_flight.append((pool.submit(decode_sample, sample, decode, seed), label))
            if len(in_flight) >= window:
                yield from collect()
        while in_flight:
            yield from collect()
    finally:
        for future, _ in in_flight:
            future.cancel()
    if labels and not batch.drop_remainder:
        yield finish(len(labels))
