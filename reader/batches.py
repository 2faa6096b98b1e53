"""Decode samples in parallel and assemble them into numpy batches.

Decoding runs on a thread pool, a chunk of samples per task, each decoded straight into
its row of the batch array: Pillow releases the GIL while it decodes and resizes, so
threads use every core without pickling compressed bytes to worker processes and decoded
pixels back (measured: threads are as fast as processes here and start instantly; see
``scripts/bench_decode.py``). Results come back in submission order, so the batch order is
exactly the sample order, which keeps seeded runs reproducible and unshuffled runs aligned
with ``filenames``.
"""

from __future__ import annotations

import random
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
from PIL import Image

from packer.errors import SampleDecodeError

from .checks import check_batch_size
from .decode import DecodeOptions, decode_image
from .policy import ErrorPolicy
from .samples import Sample, image_member

__all__ = ["LABEL_MODES", "BatchOptions", "aligned_empty", "decode_sample", "decode_batches",
           "in_flight_plan", "default_decode_threads", "auto_processes"]

LABEL_MODES = ("int", "categorical", "binary", None)
DTYPES = ("float32", "uint8")
DATA_FORMATS = ("channels_last", "channels_first")

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
        dtype: "float32" (Keras') or "uint8": the decoded pixels as they are, a quarter of
            the memory and of the host-to-GPU copy, for models that normalise on the GPU.
            The two differ by the rounding of a resize (float32 rows may hold a bilinear
            resize's unrounded values: decode.resize_into).
        data_format: "channels_last" (images (b, h, w, c), Keras' default) or
            "channels_first" ((b, c, h, w), PyTorch's): each image is transposed into its
            row by its decode thread, in the cast of its uint8 resize (so float32 values
            are whole numbers, within 0.8 of a channels-last row's), and no thread
            transposes a whole batch (torch's ``permute().contiguous()`` of a float32
            224x224 batch of 64 took 40-50 ms here, on the one thread that hands batches on).
    """

    batch_size: int = 32
    label_mode: str | None = "int"
    num_classes: int = 0
    drop_remainder: bool = False
    rescale: float | None = None
    dtype: str = "float32"
    data_format: str = "channels_last"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}")
        if self.dtype == "uint8" and self.rescale is not None:
            raise ValueError('rescale needs dtype="float32": uint8 pixels cannot be scaled')
        object.__setattr__(self, "batch_size", check_batch_size(self.batch_size))
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")
        if self.label_mode == "binary" and self.num_classes != 2:
            raise ValueError(
                f'label_mode="binary" needs exactly 2 classes, got {self.num_classes}; '
                "pass class_names=[negative, positive]"
            )

    @property
    def channels_first(self) -> bool:
        return self.data_format == "channels_first"

    def image_shape(self, decoded: tuple[int, int, int]) -> tuple[int, int, int]:
        """One image's shape in a batch, from the decoded ``(h, w, c)``."""
        h, w, c = decoded
        return (c, h, w) if self.channels_first else (h, w, c)


def decode_sample(
    sample: Sample, options: DecodeOptions, aug_seed: int | None, out: np.ndarray | None = None
) -> np.ndarray:
    """Decode the image of one sample (runs on a worker thread), into ``out`` if given
    (see ``decode_image``).

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
        return decode_image(sample[ext], options, rng=rng, out=out)
    except _DECODE_ERRORS as exc:
        raise SampleDecodeError(
            f"cannot decode .{ext} image ({exc})", key=sample["__key__"], shard=sample.get("__shard__")
        ) from exc


# Batch arrays start on a 64-byte boundary: TensorFlow then wraps them as tensors without a
# copy (from_generator copies any other array: measured 10 ms per 224x224x64 uint8 batch
# and 30-50 ms per float32 batch on 2 cores, against under 1 ms aligned).
_ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on a ``_ALIGN``-byte boundary."""
    return _aligned_view(_raw_for(shape, dtype), shape, dtype)


def _raw_for(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(int(np.prod(shape)) * dtype.itemsize + _ALIGN, dtype=np.uint8)


def _aligned_view(raw: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    offset = -raw.ctypes.data % _ALIGN
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class BatchBuffers:
    """Batch arrays whose memory is reused once nobody holds it any more.

    A float32 batch of 64 x 224 x 224 x 3 is 38 MB: a fresh one is fresh pages from the
    kernel, and faulting them in and zeroing them cost 5-7 ms per batch here (about a
    twentieth of the reader's CPU). The pool keeps the memory-owning arrays; every batch,
    every view of a batch, and every TensorFlow/PyTorch tensor sharing a batch's memory
    holds a reference to its owner (numpy points views at the owner), so an owner whose
    only reference is the pool's is unused, and no pixels are overwritten under anyone.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._owners: list[np.ndarray] = []
        # a reader keeps its pool across epochs, and two iterations of it may run at once
        # (two threads, or two tf.data iterators): an owner must go to one of them only
        self._lock = threading.Lock()

    @classmethod
    def for_decoding(cls, workers: int, batch_size: int) -> BatchBuffers:
        """A pool large enough for ``decode_batches`` on ``workers`` threads: the blocks in
        flight, the caller's batch and a prefetch queue (TensorFlow's)."""
        return cls(keep=in_flight_plan(workers, batch_size)[1] + 4)

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array of ``shape``: the start of an unused owner at least that large (the
        epoch's short last batch too: fresh memory must be faulted in, up to 2.5 ms per MB
        on a VM here), else a new one, kept in place of an unused owner too small for it
        (the batch shape changed) or beside the others while fewer than ``keep``."""
        need = int(np.prod(shape)) * dtype.itemsize + _ALIGN
        with self._lock:
            too_small = None
            for i in range(len(self._owners)):
                if sys.getrefcount(self._owners[i]) == _UNUSED_REFS:
                    if self._owners[i].nbytes >= need:
                        return _aligned_view(self._owners[i], shape, dtype)
                    too_small = i
            raw = self._new_owner(need)
            if len(self._owners) < self.keep:
                self._owners.append(raw)
            elif too_small is not None:
                self._owners[too_small] = raw
            return _aligned_view(raw, shape, dtype)

    def _new_owner(self, nbytes: int) -> np.ndarray:
        """A new memory-owning byte array (a subclass may take it elsewhere: shared memory
        in the benchmark's ``scripts/ordered_decode.py``)."""
        return np.empty(nbytes, dtype=np.uint8)


def _references_of_an_unused_owner() -> int:
    """What ``take``'s test reads for an owner only its pool holds, measured with the same
    expression: 2 on CPython 3.10-3.13 (the list's, and the one the subscript makes for
    getrefcount's argument). Measured rather than written down, so that an interpreter
    counting otherwise (3.14 no longer counts some arguments) makes the pool reuse
    nothing instead of reusing memory someone holds."""
    owners = [np.empty(1)]
    i = 0
    return sys.getrefcount(owners[i])


_UNUSED_REFS = _references_of_an_unused_owner()


def _labels(labels: list[int], options: BatchOptions) -> np.ndarray:
    ints = np.asarray(labels, dtype=np.int32)
    if options.label_mode == "int":
        return ints
    if options.label_mode == "binary":
        return ints.astype(np.float32)[:, None]
    onehot = np.zeros((len(ints), options.num_classes), dtype=np.float32)
    onehot[np.arange(len(ints)), ints] = 1.0
    return onehot


def _decode_into(
    x: np.ndarray,
    first: int,
    samples: list[Sample],
    seeds: list[int | None],
    options: DecodeOptions,
    rescale: float | None,
    channels_first: bool = False,
) -> list[tuple[int, SampleDecodeError]]:
    """Decode ``samples`` into rows ``first, first + 1, ...`` of ``x`` (runs on a worker).

    Each image is decoded straight into its row: the uint8 -> float32 cast (and
    ``rescale``) happens here, on the worker, so the thread that assembles batches never
    touches pixels, and a bilinear resize may be done in float32 (``decode.resize_into``).
    A channels-first row takes the uint8 image transposed in the same cast (OpenCV's
    ``split`` was no faster, measured per image).
    Returns the failures as ``(row, error)``; their rows may be partly written (the batch
    leaves them out).
    """
    failed = []
    scale = None if rescale is None else np.float32(rescale)
    # channels first: each image is decoded (h, w, c) into this one array, then transposed
    hwc = np.empty(options.shape, np.uint8) if channels_first else None
    for i, (sample, seed) in enumerate(zip(samples, seeds, strict=True)):
        row = x[first + i]
        try:
            if hwc is not None:
                row[...] = decode_sample(sample, options, seed, out=hwc).transpose(2, 0, 1)
            else:
                decode_sample(sample, options, seed, out=row)
        except SampleDecodeError as exc:
            failed.append((first + i, _without_tracebacks(exc)))
            continue
        if scale is not None:
            np.multiply(row, scale, out=row)
    return failed


# Decode tasks queued behind the block being collected, per pool thread: one keeps a thread
# busy only if the tasks end together; the rest absorb uneven image sizes and this thread's
# own reading, shuffling and hand-over between blocks.
_TASKS_PER_THREAD = 3


def in_flight_plan(workers: int, batch_size: int) -> tuple[int, int]:
    """(images per decode task, blocks of ``batch_size`` in flight) for ``workers`` threads.

    A block is collected whole, so while this thread waits for its slowest task, only the
    later blocks' tasks keep the other threads busy: those must number at least
    ``_TASKS_PER_THREAD`` per thread. Tasks of at most 8 images keep the pool's per-task
    cost negligible; with many threads they shrink (down to 1 image), so that the blocks in
    flight -- the memory this holds -- stay few. With 16 threads, 8-image tasks and two
    blocks in flight (the plan before this one) left half the cores idle.
    """
    workers = max(1, workers)
    chunk = max(1, min(8, batch_size // (2 * workers)))
    blocks = max(2, 1 + -(-_TASKS_PER_THREAD * workers * chunk // batch_size))
    return chunk, blocks


# Stored images below this mean size count as small: packed at training size (`--resize`),
# or small to begin with. Measured on 16-core machines (docs/SPEED.md, "On 16 cores"): on
# 224x224 and short-side-256 shards (16-24 KB a sample) 8 decode threads gave 1.3-1.4x
# what 16 gave, on ImageNet-like originals (~45 KB) 16 gave the most.
_SMALL_SAMPLE_BYTES = 32 * 1024
_SMALL_SAMPLE_THREADS = 8


def default_decode_threads(cpus: int, mean_sample_bytes: float | None) -> int:
    """Decode threads when the caller names none: one per CPU, but at most 8 for small images.

    Every image costs the same Python time under the process's one GIL whatever its size;
    a small one spends little time in libjpeg-turbo and OpenCV besides, so past 8 threads
    they mostly wait for the GIL and hand it over, and more threads decode less. Large
    images keep every thread busy outside the GIL. ``mean_sample_bytes``: the shards' bytes
    per sample from the manifest (None without one: one thread per CPU).
    """
    if mean_sample_bytes is not None and mean_sample_bytes < _SMALL_SAMPLE_BYTES:
        return max(1, min(cpus, _SMALL_SAMPLE_THREADS))
    return max(1, cpus)


def _without_tracebacks(exc: SampleDecodeError) -> SampleDecodeError:
    """``exc`` with its chain's tracebacks dropped: they hold this task's frames, and those
    the batch array, so a kept error kept the whole batch's memory until the cyclic garbage
    collector ran (one array per failing block; shared memory with ``processes=``). The
    messages say what failed."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return exc


@dataclass
class _Block:
    """One batch worth of samples being decoded: its array, labels, chunk futures, and the
    stream index of its first sample."""

    x: np.ndarray
    labels: list[int]
    futures: list[Future[list[tuple[int, SampleDecodeError]]]]
    start: int


def decode_batches(
    samples: Iterable[tuple[Sample, int]],
    *,
    decode: DecodeOptions,
    batch: BatchOptions,
    pool: Executor,
    policy: ErrorPolicy,
    workers: int,
    aug_rng: random.Random | None = None,
    buffers: BatchBuffers | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Decode ``(sample, label)`` pairs on ``pool`` and yield batches ``(x, y)`` (or ``x``).

    Samples are taken a batch at a time (a *block*); the block's array is allocated once
    and its samples go to the pool in chunks of ``chunk`` that decode straight into their
    rows, so there is one task per chunk, not per image, and no per-image copy on this
    thread. ``in_flight_plan`` sizes the chunks and the blocks in flight for the pool's
    ``workers`` threads: enough to keep every one busy while this thread waits for the
    oldest block and reads and shuffles the next, few enough to bound memory. Samples that fail
    to decode go to ``policy`` (skip and count, or raise), and the batch is filled from the
    following samples, in order.

    ``x`` is float32 in [0, 255] (times ``rescale`` if set), or uint8 as ``batch.dtype``
    says, shape (b, h, w, c) or (b, c, h, w) as ``batch.data_format`` says, 64-byte aligned (see ``aligned_empty``); ``y`` as
    ``batch.label_mode`` says.

    ``on_batch``, if given, is called just before each batch is yielded with the samples
    that failed before that batch's end: a resume then skips ``batches * batch_size`` plus
    that many samples of the stream, and sees the batches that came next (reader.state).
    """
    size = batch.batch_size
    dtype = np.dtype(batch.dtype)
    chunk, blocks_ahead = in_flight_plan(workers, size)
    in_flight: deque[_Block] = deque()
    image_shape = batch.image_shape(decode.shape)
    carry = _Carry(size, image_shape, dtype)
    taken = 0  # samples taken from the stream so far
    rows_out = 0  # rows of the batches yielded so far
    if buffers is None:
        buffers = BatchBuffers.for_decoding(workers, size)

    def out(x: np.ndarray, labels: list[int]) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return x if batch.label_mode is None else (x, _labels(labels, batch))

    def yielded(rows: int, end: int) -> None:
        """A batch of ``rows`` rows whose last sample is the stream's ``end - 1``."""
        nonlocal rows_out
        rows_out += rows
        if on_batch is not None:
            on_batch(end - rows_out)

    def submit(block_samples: list[Sample], labels: list[int], seeds: list[int | None]) -> None:
        nonlocal taken
        x = buffers.take((len(block_samples), *image_shape), dtype)
        futures = [
            pool.submit(_decode_into, x, i, block_samples[i : i + chunk], seeds[i : i + chunk],
                        decode, batch.rescale, batch.channels_first)
            for i in range(0, len(block_samples), chunk)
        ]
        in_flight.append(_Block(x, labels, futures, taken))
        taken += len(block_samples)

    def collect() -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
        block = in_flight.popleft()
        failed = [f for future in block.futures for f in future.result()]
        for _, exc in failed:
            policy.sample_failed(exc)
        x, labels = block.x, block.labels
        ends: Sequence[int] = range(block.start + 1, block.start + len(labels) + 1)  # each row's end in the stream
        if failed:
            keep = np.ones(len(labels), dtype=bool)
            keep[[row for row, _ in failed]] = False
            x, labels = x[keep], [label for label, k in zip(labels, keep, strict=True) if k]
            ends = [end for end, k in zip(ends, keep, strict=True) if k]
        if not carry.labels and not failed and (len(labels) == size or not batch.drop_remainder):
            # the common case: the block is the batch, no copy (a short block is the
            # epoch's last, kept as it is unless drop_remainder)
            yielded(len(labels), ends[-1])
            yield out(x, labels)
        else:
            for full_x, full_labels, end in carry.add(x, labels, list(ends)):
                yielded(len(full_labels), end)
                yield out(full_x, full_labels)

    try:
        block_samples: list[Sample] = []
        labels: list[int] = []
        seeds: list[int | None] = []
        for sample, label in samples:
            block_samples.append(sample)
            labels.append(label)
            seeds.append(aug_rng.getrandbits(64) if aug_rng is not None else None)
            if len(block_samples) == size:
                submit(block_samples, labels, seeds)
                block_samples, labels, seeds = [], [], []
                if len(in_flight) >= blocks_ahead:
                    yield from collect()
        if block_samples:
            submit(block_samples, labels, seeds)
        while in_flight:
            yield from collect()
    finally:
        for block in in_flight:
            for future in block.futures:
                future.cancel()
    if carry.labels and not batch.drop_remainder:
        yielded(len(carry.labels), carry.ends[-1])
        yield out(carry.x[: len(carry.labels)], carry.labels)


class _Carry:
    """Rows left over after a block lost samples: re-cut into full batches, in order."""

    def __init__(self, size: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.size, self.shape, self.dtype = size, shape, dtype
        self.x = aligned_empty((size, *shape), dtype)
        self.labels: list[int] = []
        self.ends: list[int] = []  # each row's end in the sample stream (its index + 1)

    def add(self, x: np.ndarray, labels: list[int], ends: list[int]) -> Iterator[tuple[np.ndarray, list[int], int]]:
        """Full batches ``(x, labels, end)``: ``end`` is the stream index just past the last row."""
        start = 0
        while start < len(labels):
            n = min(self.size - len(self.labels), len(labels) - start)
            self.x[len(self.labels) : len(self.labels) + n] = x[start : start + n]
            self.labels.extend(labels[start : start + n])
            self.ends.extend(ends[start : start + n])
            start += n
            if len(self.labels) == self.size:
                full, full_labels, end = self.x, self.labels, self.ends[-1]
                self.x, self.labels, self.ends = aligned_empty((self.size, *self.shape), self.dtype), [], []
                yield full, full_labels, end


# ``processes="auto"`` decodes in processes from this many CPUs on. Measured on 2 cores, one
# process's threads reach 0.93-0.96x the decode limit; on 16, 0.40-0.74x on ImageNet-like
# JPEGs, where 8 processes reached 0.83-1.47x (docs/SPEED.md, "On 16 cores").
_AUTO_PROCESSES_MIN_CPUS = 8
# ... and gives each process at least this many of an epoch's images: a process starts in
# about half a second of one core (a fresh interpreter importing numpy, OpenCV and Pillow),
# the time it takes to decode a few hundred ImageNet-like JPEGs, so a smaller epoch (a
# small validation split) is over sooner on threads.
_AUTO_MIN_SAMPLES_PER_PROCESS = 500


def auto_processes(cpus: int, mean_sample_bytes: float | None, samples: int | None = None) -> int:
    """Decode processes for ``processes="auto"`` on ``cpus`` CPUs: none below 8 CPUs; from 8
    on, one per two CPUs (two threads each), or one per CPU when the manifest says the
    images are small (under 32 KB a sample: packed at training size), whose Python weighs
    more against their decode (on 16 cores, 16 processes gave 1.26-1.36x the limit on
    short-side-256 shards, where 8 gave 0.61-1.32x). ``mean_sample_bytes``: as for
    ``default_decode_threads``. ``samples``: an epoch's images (None: unknown), of which
    each process gets at least ``_AUTO_MIN_SAMPLES_PER_PROCESS``; fewer than 2 processes
    is none."""
    if cpus < _AUTO_PROCESSES_MIN_CPUS:
        return 0
    wanted = cpus if mean_sample_bytes is not None and mean_sample_bytes < _SMALL_SAMPLE_BYTES else cpus // 2
    if samples is not None:
        wanted = min(wanted, samples // _AUTO_MIN_SAMPLES_PER_PROCESS)
    return wanted if wanted >= 2 else 0
