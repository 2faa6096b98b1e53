"""ShardReader: stream one split's shards as shuffled, decoded numpy batches.

The whole pipeline of an epoch is in :meth:`ShardReader._epoch_batches`, one stage per
line: this rank's pieces of shards for this epoch -> open and read each shard as one stream,
pick and re-index classes, cut out the piece -> interleave a few shards -> shuffle
compressed samples in a buffer -> skip what a resumed run already saw -> decode on a
thread pool -> batches. How ranks and workers split an epoch is in :mod:`reader.distributed`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import warnings
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import IO, Any

import numpy as np

from packer.errors import ClassNotFoundError, EmptySplitError, SampleDecodeError, ShardReadError
from packer.format import optional_fields
from packer.probe import allow_packed_pixels
from packer.sizes import counted, parse_size
from packer.storage import is_remote

from .batches import (
    BatchBuffers,
    BatchOptions,
    auto_processes,
    decode_batches,
    default_decode_threads,
)
from .checks import check_batch_size, check_image_size, whole_number
from .decode import DecodeOptions
from .distributed import (
    DEFAULT_DISTRIBUTED_SEED,
    Piece,
    Uneven,
    batch_count,
    check_rank,
    check_uneven,
    detect_rank,
    rank_pieces,
    rank_samples,
    tf_config_local_tasks,
    worker_pieces,
)
from .policy import ErrorPolicy, OnError
from .processes import DecodeProcesses, processes_that_fit, shared_memory_size
from .remote import OpenAhead
from .samples import (
    READ_THE_REST,
    Sample,
    UnreadableLabels,
    image_member,
    open_ref,
    sample_label,
    scan_shard,
    shard_samples,
)
from .shuffle import DEFAULT_BUFFER, early_start, epoch_rng, interleave, shard_order, shuffle_buffer
from .source import SplitSource, resolve_source
from .state import StreamLog, StreamPosition, reader_streams

__all__ = ["ShardReader"]

log = logging.getLogger("shardpack.reader")

Batch = np.ndarray | tuple[np.ndarray, np.ndarray]


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _local_ranks() -> int:
    """The processes a launcher started on this machine (torchrun's ``LOCAL_WORLD_SIZE``, or
    ``TF_CONFIG``'s training tasks on this host), which share its CPUs and /dev/shm; 1
    without one. Also where each reads the whole split (``rank=0, world_size=1`` under
    torchrun): they share the machine all the same."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    return tf_config_local_tasks() or 1


def _rank_cpus() -> int:
    """The CPUs this process has of its machine: those it may use, shared with the other
    ranks a launcher started there, so that on 8 ranks of a 64-CPU node ``processes="auto"``
    takes 4 processes of 2 threads each, not 32 of 8. Not shared again where the launcher
    pinned each rank to CPUs of its own (torchrun's ``--numa-binding``, ``srun
    --cpu-bind``): this process may then use fewer than its launcher may. A container's or
    a job's CPU set, which every rank has whole, is shared."""
    cpus = _default_workers()
    launcher = _launcher_cpus()
    if launcher is None or cpus >= launcher:
        cpus //= _local_ranks()
    return max(1, cpus)


def _launcher_cpus() -> int | None:
    """The CPUs the process that started this one may use (None where unknown)."""
    try:
        return len(os.sched_getaffinity(os.getppid()))
    except (AttributeError, OSError):  # not on Linux, or the parent is gone
        return None


_said_shared_memory = False  # processes="auto" held back by /dev/shm: said once per process


def _say_shared_memory_once(wanted: int, fitting: int) -> None:
    global _said_shared_memory
    if _said_shared_memory:
        return
    _said_shared_memory = True
    size = shared_memory_size() or 0
    log.warning(
        'processes="auto": /dev/shm holds %d MB (shared by %d process(es) on this machine), too '
        "little for the batches of %d decode processes, so decoding in %s (up to twice as fast "
        "on this machine with room for them: docker run --shm-size=2g; or a smaller "
        'batch_size, or dtype="uint8")',
        size // 10**6, _local_ranks(), wanted, f"{fitting}" if fitting else "threads of this process")


def _image_bytes(item: tuple[Sample, int]) -> int:
    """The bytes a labelled sample holds in the shuffle buffer (its members' data)."""
    total = 0
    for key, value in item[0].items():  # a loop: half a generator expression's cost here
        if not key.startswith("__"):
            total += len(value)
    return total


class ShardReader:
    """Iterate over one split of a shard set as numpy batches ``(x, y)``, epoch by epoch.

    Each ``iter(reader)`` is a new epoch (``reader.epoch`` counts them) with a new shuffle
    order; with ``shuffle=False`` every epoch is the manifest order exactly, so predictions
    line up with :attr:`filenames` and :attr:`labels`. That order is the pack's seeded one,
    not Keras' class-then-filename order. Shards are read sequentially, whole,
    one request per shard, never one seek per sample.

    Args:
        source: shardpack output folder or URL (``s3://``, ``gs://``, ``http(s)://``,
            ``file://``), or manifest-less WebDataset tars: a list of paths/URLs or a brace
            pattern (``"data-{000000..000009}.tar"``).
        split: split to read (ignored for manifest-less tars).
        image_size: ``(height, width)`` of the images, or one int for both, as Keras
            (whole numbers >= 1; a third entry is refused: ``color_mode`` sets channels).
        batch_size: samples per batch, a whole number >= 1 (for single images use
            ``image_dataset_from_shards(batch_size=None)``, or 1).
        label_mode: "int", "categorical", "binary" or None (yield ``x`` only), as Keras.
        class_names: read only these classes, labelled by their position in this list
            (Keras' subset semantics). For manifest-less tars: the names of labels 0..n-1.
        color_mode: "grayscale", "rgb" or "rgba".
        shuffle: shuffle shard order, interleave shards and shuffle samples in a buffer.
        seed: seed of every random choice; None draws one at random once per reader, or,
            with ``world_size > 1``, uses the fixed ``DEFAULT_DISTRIBUTED_SEED`` (0) so that
            every rank agrees on the order.
        interpolation: Keras interpolation name ("bilinear", "nearest", "bicubic", "area",
            "lanczos3", "lanczos5", "gaussian", "mitchellcubic"). Only "bilinear" and
            "nearest" are TensorFlow's resize (with ``shardpack[fast]``); the others are
            Pillow's or OpenCV's filters: on photos shrunk to 224x224 up to 18-151/255 from
            Keras' pixels, 0.4-5.8 on average (docs/READING.md).
        crop_to_aspect_ratio: centre-crop to the target aspect ratio before resizing.
        pad_to_aspect_ratio: resize to fit and pad with zeros, keeping the aspect ratio.
        decoder: "auto" (simplejpeg for JPEGs when installed, else Pillow), or "pillow" for
            the reference path (Pillow for every image; JPEGs still DCT-scaled by draft).
        dct_scaling: decode JPEGs at a reduced DCT scale where the resize allows (default,
            several times cheaper); the pixels then differ visibly from Keras' where a JPEG
            is shrunk 2x or more (150x151 to 64x64: up to 115/255, 8/255 on average). False
            decodes at full size, as Keras does, for Keras' pixels (bilinear within
            0.8/255, nearest equal).
        drop_remainder: drop the last, smaller batch of each epoch.
        shuffle_buffer: samples held (still compressed) for shuffling, the reader's total:
            with N decode processes or N PyTorch loader workers each holds a 1/N share, so
            the memory is the same whichever way it decodes.
        shuffle_buffer_bytes: also cap the buffer at this many compressed bytes, or a size
            such as "1GB" (None: no cap; 10,000 ImageNet JPEGs are about 1.1 GB). A cap is
            the reader's total: N processes or loader workers hold a 1/N share each.
        shuffle_initial: hand samples on to decoding once the buffer holds this many,
            and fill the rest of it while decoding (two samples read for each one handed
            on until it is full). None (default): the whole buffer is read before the
            first sample is decoded, which on a large split means ``shuffle_buffer``
            samples from the disk or the object store before every shuffled epoch (about
            1.1 GB for 10,000 ImageNet JPEGs: ~10 s at 100 MB/s; shared, as the buffer, by
            decode processes or loader workers). A few hundred start an epoch at once; the
            shuffle is narrower while the buffer grows. Ignored (None) without shuffling
            or when not below ``shuffle_buffer``.
        interleave: shards read round robin at once when shuffling.
        num_workers: decoding threads (default: the CPUs this process may use, at most 8
            when the manifest says the images are small: ``batches.default_decode_threads``);
            with ``processes``, all processes' threads together (default: the CPUs). On a
            machine of several torchrun ranks, the CPUs are this rank's share.
        processes: ``"auto"`` (default): decode processes where they pay, else threads of
            this process (``batches.auto_processes``): none below 8 CPUs; from 8 on, one per
            two CPUs, one per CPU on shards packed small, but at most one per 500 images of
            an epoch, and as many as /dev/shm holds twice over (a container's 64 MB: none,
            said once). The number taken is ``reader.processes``; a loaded state brings
            its own. A number: decode in that many processes (2 or more), each with its
            own GIL and ``num_workers // processes`` threads, for machines with many cores
            where one process's Python caps the rate (reader.processes; docs/READING.md);
            0: threads of this process. With processes an epoch is split as PyTorch's
            loader workers split it, so a shuffled order depends on their number (with
            ``shuffle=False`` it is the manifest order all the same): ``processes=0`` gives
            the same epochs on every machine. ``close()`` ends them.
        on_error: a sample that cannot be decoded: "warn" (skip, count, warn), "ignore"
            (skip and count) or "raise" (SampleDecodeError).
        on_shard_error: a shard that cannot be read: "raise" (ShardReadError naming the
            shard and byte offset), or "warn"/"ignore" to skip the rest of that shard. A
            shard that cannot match its sha256 (shorter than the manifest says, or another
            file) gives nothing from its last 8 MiB, all of a smaller shard.
            An epoch that loses a batch to what these skip is filled up with its own first
            batches, so that it keeps ``len(reader)`` (docs/READING.md).
        rescale: multiply pixel values by this (e.g. ``1 / 255``).
        dtype: "float32" (default, as Keras) or "uint8": the decoded pixels unconverted, a
            quarter of the batch memory and of the copy to the GPU (normalise there). The
            two differ by the rounding of a resize: float32 rows may hold a bilinear
            resize's unrounded values, as ``tf.image.resize`` gives.
        data_format: "channels_last" (default: images ``(batch, height, width,
            channels)``, as Keras) or "channels_first" (``(batch, channels, height,
            width)``, as PyTorch): written so by the decode threads, image by image, with
            no transpose of whole batches. Channels-first rows take the uint8 resize, cast.
        random_flip: flip images horizontally at random (augmentation).
        random_crop: ``(min, max)`` area fraction of a random crop (augmentation).
        num_classes: number of classes for manifest-less tars (else found by a scan).
        storage_options: passed to fsspec for every file (credentials, endpoint, ...).
        cache_dir: keep remote shards in this local folder (keyed by URL + sha256), so later
            epochs read them from disk; local shards are never copied.
        cache_max_bytes: bound ``cache_dir`` (bytes, or a size such as "50GB"): least
            recently used shards are evicted beyond it (None: no bound).
        rank, world_size: this process's rank and the number of ranks. Ranks read disjoint
            shards where the counts allow and every rank yields ``len(reader)`` batches
            (docs/READING.md). None (both): found from a ``tf.distribute.InputContext``,
            ``torch.distributed``, ``RANK``/``WORLD_SIZE`` or ``TF_CONFIG``, else 0 / 1;
            pass ``rank=0, world_size=1`` to read the whole split on every process.
        uneven: when the samples do not divide evenly among ranks: "pad" (default) repeats
            the first sample of a short rank's stream (at most ``world_size - 1`` samples
            seen twice an epoch), "drop" leaves the last few (< ``world_size``) unread.
        input_context: a ``tf.distribute.InputContext`` (from
            ``strategy.distribute_datasets_from_function``) giving rank and world size.

    Raises:
        ManifestError: no or invalid manifest at SOURCE.
        SplitNotFoundError: ``split`` is not in the manifest (lists the splits there are).
        ClassNotFoundError: a name in ``class_names`` is not a class (lists those there are).
        ValueError: invalid option values (a class named twice in ``class_names`` too).
        EmptySplitError: when iterated, the split has no images (of the selected classes).
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
        decoder: str = "auto",
        dct_scaling: bool = True,
        drop_remainder: bool = False,
        shuffle_buffer: int = DEFAULT_BUFFER,
        shuffle_buffer_bytes: int | str | None = None,
        shuffle_initial: int | None = None,
        interleave: int = 4,
        num_workers: int | None = None,
        processes: int | str = "auto",
        on_error: OnError = "warn",
        on_shard_error: OnError = "raise",
        rescale: float | None = None,
        dtype: str = "float32",
        data_format: str = "channels_last",
        random_flip: bool = False,
        random_crop: tuple[float, float] | None = None,
        num_classes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        uneven: Uneven = "pad",
        input_context: Any = None,
    ) -> None:
        # refused before any shard or manifest is read
        image_size, batch_size = check_image_size(image_size), check_batch_size(batch_size)
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank= and world_size=, or neither (to detect them)")
        if rank is None or world_size is None:
            rank, world_size = detect_rank(input_context)
        check_rank(int(rank), int(world_size))
        check_uneven(uneven)
        self.rank, self.world_size, self.uneven = int(rank), int(world_size), uneven
        self.storage_options = dict(storage_options or {})
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.cache_max_bytes = None if cache_max_bytes is None else parse_size(cache_max_bytes)
        self.source: SplitSource = resolve_source(
            source if isinstance(source, (str, list, tuple)) else os.fspath(source),  # type: ignore[arg-type]
            split=split,
            storage_options=self.storage_options,
        )
        self.split = split
        self.shuffle = shuffle
        if seed is None:
            seed = DEFAULT_DISTRIBUTED_SEED if self.world_size > 1 else secrets.randbelow(2**31)
        self.seed = int(seed)
        # a buffer of 0 shuffled nothing, silently: an unshuffled training run
        self.shuffle_buffer = whole_number(shuffle_buffer, "shuffle_buffer", minimum=1)
        try:
            self.shuffle_buffer_bytes = None if shuffle_buffer_bytes is None else parse_size(shuffle_buffer_bytes)
        except ValueError as exc:
            raise ValueError(f"shuffle_buffer_bytes: {exc}") from None
        if shuffle_initial is not None and (int(shuffle_initial) != shuffle_initial or shuffle_initial < 1):
            raise ValueError(
                f"shuffle_initial must be a whole number >= 1 (or None), got {shuffle_initial!r}")
        # None where it changes nothing (no shuffle, or a buffer it cannot start before), so
        # such a reader's states stay those of a reader without it (state version 1)
        self.shuffle_initial = early_start(shuffle_initial, self.shuffle_buffer) if shuffle else None
        self.interleave = max(1, int(interleave))
        # "auto" (the default) is picked below, once the batch's size is known; in a
        # PyTorch loader worker's copy it means none (torch_data): the loader's workers
        # are the processes there
        self.processes_auto = isinstance(processes, str) and processes == "auto"
        if not self.processes_auto and (
                isinstance(processes, (str, bool)) or int(processes) < 0 or int(processes) != processes):
            raise ValueError(f'processes must be a whole number >= 0 or "auto", got {processes!r}')
        if num_workers is not None:
            whole_number(num_workers, "num_workers", minimum=0)  # 0: the default, as None
        self._threads_asked = num_workers or None
        self._pool: DecodeProcesses | None = None
        self._adopted_epoch: int | None = None  # the epoch a loaded state's streams hold for
        # this process's batch arrays, kept from epoch to epoch (see _batch_buffers)
        self._buffers: BatchBuffers | None = None
        self._buffers_key: tuple[int, int, int] | None = None  # (pid, threads, batch size)
        self.policy = ErrorPolicy(on_error=on_error, on_shard_error=on_shard_error)
        self.decode_options = DecodeOptions(
            image_size=image_size,
            color_mode=color_mode,
            interpolation=interpolation,
            crop_to_aspect_ratio=crop_to_aspect_ratio,
            pad_to_aspect_ratio=pad_to_aspect_ratio,
            random_crop=(float(random_crop[0]), float(random_crop[1])) if random_crop is not None else None,
            random_flip=random_flip,
            decoder=decoder,
            dct_scaling=dct_scaling,
        )
        _warn_about_squashed_shards(self.source.manifest, self.decode_options)
        self._index: list[list[tuple[str, int | None, str | None]]] | None = None
        # what the scan found of labels, as counts (copies of the reader get no scan:
        # __getstate__): those that are no number, and samples without one
        self._unreadable_labels = UnreadableLabels()
        self._missing_labels = 0
        # what the scan says of the counts, kept apart from the scan itself (see __getstate__)
        self._scanned_counts: list[int] | None = None
        self._scanned_samples: int | None = None
        self.class_names, self._remap = self._resolve_classes(class_names, num_classes)
        self.batch_options = BatchOptions(
            batch_size=batch_size,
            label_mode=label_mode,
            num_classes=len(self.class_names),
            drop_remainder=drop_remainder,
            rescale=rescale,
            dtype=dtype,
            data_format=data_format,
        )
        # "auto"'s pick for this machine, which a loaded state's streams replace for the
        # epoch it resumes (adopt_streams)
        self._own_processes = self._auto_processes() if self.processes_auto else int(processes)
        self._use_processes(self._own_processes)
        self.epoch = 0  # the epoch the next iter() reads
        self.batches_yielded = 0  # batches yielded so far in the current epoch
        self._reading: int | None = None  # the epoch an unfinished iter() is reading
        self._resume_batches = 0  # batches of self.epoch a loaded state says were consumed
        # the loaded state's batch streams (failed samples, turns) when they are this rank's
        self._resume_position: StreamPosition | None = None
        # the last two epochs read: which stream made each batch, after how many failures
        self._stream_logs: dict[int, StreamLog] = {}
        # fill a short epoch up to rank_samples samples, not len() batches (set by
        # image_dataset_from_shards(batch_size=None), whose cardinality counts samples)
        self._count_samples = False
        # passes begun (first batch asked for), and how many had at the last mark
        # (construction, set_epoch, load_state_dict): see _undo_last_pass
        self._passes_begun = self._marked_passes = 0
        # where the last pass began: (epoch, skipped batches, stream position, seed)
        self._before_pass: tuple[int, int, StreamPosition | None, int] = (0, 0, None, self.seed)

    # ---- decode processes --------------------------------------------------------------

    def _use_processes(self, processes: int) -> None:
        """Decode in ``processes`` processes (fewer than 2: threads of this one), on the
        threads asked for, else as many as suit them (``num_workers``'s default)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.processes = processes if processes > 1 else 0
        self.num_workers = self._threads_asked or (
            _rank_cpus() if self.processes else
            default_decode_threads(_rank_cpus(), self.source.mean_sample_bytes()))

    def _auto_processes(self) -> int:
        """``processes="auto"``: ``batches.auto_processes`` for the CPUs this rank has and the
        images of its epoch, and of those as many as /dev/shm holds
        (``processes.processes_that_fit``; said once). Where neither the manifest nor a scan
        made already (tars without a manifest, read with ``num_classes``) tells how many
        images there are, none: a scan to count them would cost more than a small set's
        whole epoch, and processes cost more than they give on one."""
        if not (self._manifest_gives_samples() or self._index is not None):
            return 0
        cpus = _rank_cpus()
        wanted = auto_processes(cpus, self.source.mean_sample_bytes(), samples=self.samples // self.world_size)
        if self._threads_asked:  # num_workers: all the processes' threads together
            wanted = min(wanted, self._threads_asked)
        if wanted < 2:
            return 0
        fitting = processes_that_fit(wanted, self._threads_asked or cpus, self, share=_local_ranks())
        if fitting < wanted:
            _say_shared_memory_once(wanted, fitting)
        return fitting

    def repick_processes(self) -> None:
        """``processes="auto"`` chosen again, now that a scan has counted the images of tars
        without a manifest (the adapters scan them as they are made); where the manifest
        gave the count, the pick made with it stands. Not while a loaded state's streams
        hold, nor while decode processes serve an epoch."""
        if (self.processes_auto and not self._manifest_gives_samples() and self._adopted_epoch is None
                and self._pool is None):
            self._own_processes = self._auto_processes()
            self._use_processes(self._own_processes)

    def adopt_streams(self, saved: int | None, batches: int, *, epoch: int, from_rank: int | None) -> None:
        """With ``processes="auto"``, resume a state saved ``batches`` into ``epoch`` under
        ``saved`` batch streams (decode processes or loader workers; None: a state of before
        streams were recorded, one stream) with that many processes, for that epoch: "auto"
        on another machine picks another number. Nothing to do at an epoch's start, where
        any number resumes exactly.

        Raises:
            ValueError: the state is another rank's (``from_rank``), and this rank's own
                pick differs: ranks pick from their own machines, so how this rank read the
                epoch is not known.
        """
        self._settle_streams(epoch, 0)  # an earlier state's streams go first
        if not (self.processes_auto and batches):
            return
        saved = saved or 1
        mine = self.processes or 1
        if saved == mine:
            return
        if from_rank is not None and from_rank != self.rank:
            raise ValueError(
                f"the state was saved by rank {from_rank}, which read the epoch as {saved} batch "
                f"stream(s), and processes=\"auto\" takes {mine} on this rank (each rank picks from "
                "its own machine's CPUs and /dev/shm), so how this rank read it is not known: pass "
                f"processes={saved if saved > 1 else 0} on every rank to resume exactly (the same on "
                "all ranks), or start the epoch over with reader.set_epoch(epoch)")
        log.info("resuming a state saved under %d batch stream(s): processes=%d for its epoch",
                 saved, saved if saved > 1 else 0)
        self._use_processes(saved)
        self._adopted_epoch = epoch

    def _settle_streams(self, epoch: int, skip: int) -> None:
        """Streams adopted from a state (``adopt_streams``) hold for the epoch it resumes;
        a later epoch, or that one read from its start, goes back to "auto"'s own pick."""
        if self._adopted_epoch is not None and (epoch != self._adopted_epoch or not skip):
            self._adopted_epoch = None
            self._use_processes(self._own_processes)

    # ---- classes, counts and the lazily scanned index -------------------------------

    def _resolve_classes(
        self, class_names: Sequence[str] | None, num_classes: int | None
    ) -> tuple[list[str], dict[int, int] | None]:
        """Return (class names, manifest label -> our label map or None for identity)."""
        available = self.source.classes
        if available is not None:
            if class_names is None:
                return list(available), None
            _refuse_repeated(class_names)
            missing = [c for c in class_names if c not in available]
            if missing:
                raise ClassNotFoundError(missing, list(available))
            return list(class_names), {available.index(c): i for i, c in enumerate(class_names)}
        if class_names is not None:
            _refuse_repeated(class_names)
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
            unreadable = UnreadableLabels()
            index = [
                scan_shard(ref, storage_options=self.storage_options, cache_dir=self.cache_dir,
                           policy=self.policy, cache_max_bytes=self.cache_max_bytes,
                           unreadable=unreadable)
                for ref in self.source.shards
            ]
            unlabelled = sum(1 for entries in index for _p, label, _n in entries if label is None)
            self._unreadable_labels, self._missing_labels = unreadable, unlabelled - unreadable.count
            self._index = index
        return self._index

    def _yielded(self, label: int | None) -> bool:
        """Whether an epoch yields a scanned sample with this label (of the manifest's
        classes, before a class subset): one without a label only when none is asked for
        (``label_mode=None``); an epoch that needs labels skips it as a failed sample. So
        ``len()``, ``filenames`` and ``labels`` count what an epoch yields: an image with a
        caption ``.json`` and no ``.cls`` was counted, then skipped, and images without
        labels read with ``label_mode=None`` were yielded but not counted (Keras' cardinality
        then broke the epoch)."""
        return label is not None or self.batch_options.label_mode is None

    def _entries(self) -> list[tuple[str, int]]:
        """(path, our label) of every sample this rank's unshuffled epoch yields, in its order."""
        per_shard = self._shard_entries()
        if self.world_size == 1:
            return [e for shard in per_shard for e in shard]
        return [per_shard[p.shard][i] for p in self._rank_pieces(0) for i in range(p.start, p.stop)]

    def _shard_entries(self) -> list[list[tuple[str, int]]]:
        """(path, our label) of every selected sample, per shard, in manifest order."""
        shards = []
        for ref, entries in zip(self.source.shards, self._scan(), strict=True):
            out: list[tuple[str, int]] = []
            shards.append(out)
            for path, label, _name in self._known_labels(ref.name, entries):
                if not self._yielded(label):
                    continue
                if self._remap is not None:
                    if label not in self._remap:
                        continue
                    label = self._remap[label]
                out.append((path, -1 if label is None else label))
        return shards

    def _known_labels(
        self, shard: str, entries: list[tuple[str, int | None, str | None]]
    ) -> Iterator[tuple[str, int | None, str | None]]:
        """A shard's scanned entries, cut short (or raising) at a label the manifest lacks."""
        classes = self._manifest_classes()
        for entry in entries:
            if _outside(entry[1], classes):
                self.policy.shard_failed(self._foreign_label(entry[1], shard=shard, key=entry[0]))
                return
            yield entry

    def _manifest_classes(self) -> int | None:
        """How many classes the manifest has; None for manifest-less tars, which have no
        class list to hold labels to (``num_classes`` is checked per sample in ``_select``)."""
        return None if self.source.classes is None else len(self.source.classes)

    def _foreign_label(
        self, label: int | None, *, shard: str, key: str, offset: int | None = None
    ) -> ShardReadError:
        """The error for a label outside the manifest's classes.

        Such a shard was not written with this manifest (a decode failure it is not): every
        label in it is suspect, and skipping those samples one by one would leave ``len()``
        and the epoch disagreeing in silence. So it is a shard error, as a count mismatch is.
        """
        classes = self.source.classes or ()
        return ShardReadError(
            f"label {label} is outside the manifest's {len(classes)} classes (0..{len(classes) - 1}); "
            "the shard and manifest do not belong together: re-pack, or upload the shards "
            "with their own manifest (`shardpack verify SOURCE` lists every such shard)",
            shard=shard, key=key, offset=offset,
        )

    def require_samples(self, *, scan: bool = False) -> None:
        """Refuse a split without images (of the selected classes): an epoch of nothing
        would train on nothing without a word (Keras refuses such a folder too). Where the
        count needs a scan of every shard (manifest-less tars, a class subset of a manifest
        without class counts), only with ``scan=True``: an epoch must not read them twice.

        Raises:
            EmptySplitError: ``samples`` is 0.
        """
        if (scan or self._count_known()) and self.samples == 0:
            raise EmptySplitError(self.split, list(self.class_names) if self._remap is not None else None,
                                  unlabelled=self._missing_labels, unreadable=self._unreadable_labels.count,
                                  first_unreadable=self._unreadable_labels.first)

    def _count_known(self) -> bool:
        """Whether ``samples`` is known without a scan of the shards (the manifest's, or
        the scan was made)."""
        return self._index is not None or self._scanned_samples is not None or self._manifest_gives_samples()

    @property
    def samples(self) -> int:
        """Samples per epoch (from the manifest; manifest-less shards are scanned once)."""
        src = self.source
        if self._manifest_gives_samples():
            assert src.count is not None
            if self._remap is None:
                return src.count
            return sum(src.class_counts.get(c, 0) for c in self.class_names)
        if self._scanned_samples is None:
            self._scanned_samples = sum(map(len, self._shard_entries()))
        return self._scanned_samples

    def shard_counts(self) -> list[int]:
        """Samples (of the selected classes) in each shard, manifest order.

        From the manifest when it has per-shard counts and no class subset is asked for;
        otherwise from the one-time scan of the small members (see :attr:`filenames`).
        """
        if self._manifest_gives_counts():
            return [int(ref.count) for ref in self.source.shards]  # type: ignore[arg-type]
        if self._scanned_counts is None:
            counts = []
            for entries in self._scan():
                if self._remap is None:
                    counts.append(sum(1 for _p, label, _n in entries if self._yielded(label)))
                else:
                    counts.append(sum(1 for _p, label, _n in entries if label in self._remap))
            self._scanned_counts = counts
        return list(self._scanned_counts)

    @property
    def rank_samples(self) -> int:
        """Samples this rank reads per epoch: ``samples`` split over ``world_size`` ranks,
        rounded up with ``uneven="pad"`` (padding included), down with "drop"."""
        if self.world_size == 1:
            return self.samples
        return rank_samples(sum(self.shard_counts()), self.world_size, self.uneven)

    def __len__(self) -> int:
        """Batches per epoch on this rank, the same on every rank (from the manifest): an
        epoch that skipped samples and came short is filled up with its first batches."""
        return batch_count(
            self.rank_samples, self.batch_options.batch_size, self.batch_options.drop_remainder
        )

    @property
    def filenames(self) -> list[str]:
        """Source path of every sample an epoch yields (its ``.json`` "path", else its key),
        manifest order. Of plain tars, those with an image, and with a ``.cls`` unless
        ``label_mode=None``. On a rank (``world_size > 1``) only its own share, in the order
        its unshuffled epoch yields them (a sample ``uneven="pad"`` repeats, again), so that
        predictions line up there too; shuffled, a rank reads other shards each epoch, and
        this lists epoch 0's.

        Costs one pass over every shard of the split the first time (only the small
        ``.json``/``.cls`` members are read; image bytes are skipped by seeking where the
        storage allows it), then it is cached.
        """
        return [path for path, _ in self._entries()]

    @property
    def labels(self) -> np.ndarray:
        """Class index (int32) of every sample of :attr:`filenames`, in that order (-1 for an
        image without a label, read with ``label_mode=None``); same cost as filenames."""
        return np.asarray([label for _, label in self._entries()], dtype=np.int32)

    # ---- iteration ------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` read epoch ``epoch`` (from its start, unless a state
        loaded with :meth:`load_state_dict` is positioned inside that same epoch)."""
        if int(epoch) != self.epoch:
            self._resume_batches, self._resume_position = 0, None
        self.epoch = int(epoch)
        self._reading = None  # a pass left unfinished (a loop's break) is not where states are
        self._mark()

    def _mark(self) -> None:
        """``_undo_last_pass`` undoes no pass begun before this."""
        self._marked_passes = self._passes_begun

    def _undo_last_pass(self) -> bool:
        """Make the next pass begin where the last one began, if one began since the last
        mark; returns whether one had.

        Keras' ``fit`` under a distribution strategy takes one batch from an iterator of
        the dataset it then drops, before training (to build the model): with each pass a
        new epoch, that look used up a loaded position, and training then began the next
        epoch at its start (``ShardReaderCheckpoint`` undoes it at ``on_train_begin``).
        Passes before the look (a fit without the callback) stay done.
        """
        if self._passes_begun == self._marked_passes:
            return False
        epoch, batches, position, seed = self._before_pass
        self.epoch, self._resume_batches, self._resume_position, self.seed = epoch, batches, position, seed
        self._forget_reading()
        self._mark()
        return True

    def state_dict(self) -> dict[str, Any]:
        """The reader's position as a small JSON-able dict, for :meth:`load_state_dict`.

        Inside an epoch: that epoch and the batches yielded so far; between epochs: the next
        epoch and 0. Holds the seed, rank, world size, split, the options that shape the
        order and a fingerprint of the shard list. With ``tf.data`` (which reads ahead) use
        :class:`reader.state.ShardReaderCheckpoint`, which counts the batches the model saw.
        """
        from .state import make_state

        if self._reading is not None:
            return make_state(self, epoch=self._reading, batches=self.batches_yielded)
        return make_state(self, epoch=self.epoch, batches=self._resume_batches)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position from :meth:`state_dict` (of this rank or any other).

        The next ``iter()`` yields the rest of that epoch -- the same samples in the same
        order as the interrupted run would have seen -- and later ones continue as usual.
        The batches already consumed are skipped as compressed samples, never decoded.
        The state's seed replaces the reader's.

        Raises:
            ValueError: the state belongs to another split, shard list, world size or
                order-shaping option (the message names it).
        """
        from .state import check_state, check_streams, own_position, saved_streams

        epoch, batches, seed = check_state(self, state, streams=False)
        self.adopt_streams(saved_streams(state), batches, epoch=epoch, from_rank=state.get("rank"))
        check_streams(saved_streams(state), reader_streams(self), batches)
        self.seed = seed
        self.epoch = epoch
        self._resume_batches = batches
        self._resume_position = own_position(self, state, batches, reader_streams(self))
        self._forget_reading()
        self._mark()

    def _forget_reading(self) -> None:
        """What this reader read before says nothing about a position loaded now."""
        self._reading, self._stream_logs = None, {}

    def __iter__(self) -> Iterator[Batch]:
        epoch, skip, start = self.epoch, self._resume_batches, self._resume_position
        self._before_pass = (epoch, skip, start, self.seed)
        self._passes_begun += 1
        self.epoch += 1
        self._resume_batches, self._resume_position = 0, None
        self._settle_streams(epoch, skip)
        yield from self._read_epoch(epoch, skip, start)

    def _read_epoch(self, epoch: int, skip: int, start: StreamPosition | None) -> Iterator[Batch]:
        """Epoch ``epoch``'s batches after the first ``skip`` (from ``start``, a loaded
        state's position), counted as they go: ``batches_yielded``, and the log of which
        stream made each batch after how many failed samples, for states (``__iter__``, and
        ``ShardIterableDataset`` without loader workers). An epoch that comes short of
        ``len(self)`` is filled up with its first batches (``_repeat_first_batches``)."""
        streams = reader_streams(self)
        self._reading, self.batches_yielded = epoch, skip
        # this iteration's own count (two iterations of one reader may run at once)
        tally = _Tally(skip, skip * self.batch_options.batch_size)
        self._stream_logs = {e: log for e, log in self._stream_logs.items() if e == epoch - 1}
        skipped = self.policy.skipped_samples, self.policy.skipped_shards
        if start is not None and start.lap and start.fits(skip, streams):
            # saved while a short epoch was being filled up: only the repeat is left
            stream_log = StreamLog(StreamPosition.round_robin(0, streams), lap=start.lap,
                                   lap_length=start.lap_length)
            repeat_start: StreamPosition | None = dataclasses.replace(start, lap=0, lap_length=0)
        else:
            stream_log, repeat_start = StreamLog(StreamPosition.at_or_round_robin(start, skip, streams)), None
        self._stream_logs[epoch] = stream_log
        if not stream_log.lap:
            for batch in self._batches(epoch, skip, stream_log.start, note=self._noter(stream_log, tally, 0)):
                self._count(batch, tally)
                yield batch
            stream_log.lap = tally.batches
        before = tally.batches
        # Only an epoch that skipped something (or a resume that skipped it unseen) can come
        # short: only then is a count the shards' manifest lacks worth a scan.
        lost = (self.policy.skipped_samples - skipped[0], self.policy.skipped_shards - skipped[1])
        if self._count_known() or skip or any(lost):
            yield from self._repeat_first_batches(epoch, stream_log, repeat_start, tally)
            if self.world_size > 1 and self._short(tally):  # one short rank hangs the others
                raise self._cannot_keep_len(epoch, tally.batches)
        self._reading = None
        self._log_epoch_end(epoch, lost, tally.batches - before)

    def _log_epoch_end(self, epoch: int, lost: tuple[int, int], repeated: int) -> None:
        """Say what the epoch skipped (samples, shards) and repeated to keep its length."""
        if any(lost) or repeated:  # "ignore" is silent: only "warn" makes this a warning
            loud = (lost[0] and self.policy.on_error == "warn") or (
                lost[1] and self.policy.on_shard_error == "warn")
            log.log(logging.WARNING if loud else logging.DEBUG,
                    "epoch %d of %s: skipped %s and %s%s", epoch, self.split,
                    counted(lost[0], "undecodable sample"), counted(lost[1], "damaged shard"),
                    f"; repeated {counted(repeated, 'batch')} from its start to keep its "
                    f"{counted(len(self), 'batch')}" if repeated else "")

    def _short(self, tally: _Tally) -> bool:
        """Whether an epoch that yielded ``tally`` has fewer batches (samples, where the
        dataset counts samples: ``image_dataset_from_shards(batch_size=None)``) than promised."""
        if self._count_samples:
            return tally.samples < self.rank_samples
        return tally.batches < len(self)

    def _count(self, batch: Batch, tally: _Tally) -> None:
        tally.batches += 1
        tally.samples += len(batch[0] if isinstance(batch, tuple) else batch)
        self.batches_yielded = tally.batches

    def _repeat_first_batches(self, epoch: int, log: StreamLog, start: StreamPosition | None,
                              tally: _Tally) -> Iterator[Batch]:
        """Fill up an epoch that came short after ``log.lap`` batches with its first
        batches again, as often as it takes (from ``start``, a loaded state's position in
        that repeat).

        ``len(self)`` is a promise: Keras sized the epoch by it (tf.data's cardinality,
        which ends ``fit`` with an error when it is not kept), and every rank of a DDP or
        multi-worker job must yield as many batches as the others or the job hangs. A
        sample that fails to decode or a shard cut short (``on_error`` / ``on_shard_error``
        "warn" or "ignore") breaks it; so the epoch is topped up as a short rank is under
        ``uneven="pad"``, from its own stream: the same samples with the same random
        crops and flips as its first batches, whose failures were counted and said when
        they were first read (a state saved in the repeat says so: ``StreamPosition.lap``,
        and resumes it)."""
        streams = reader_streams(self)

        def read(at: int) -> Generator[Batch, None, None]:
            nonlocal start
            begin, start = start or StreamPosition.round_robin(at, streams), None
            note = None
            if log.repeat_from(at) is None:  # not logged from here to the end yet: log it
                note = self._noter(log.new_repeat(begin), tally, tally.batches - at)
            return self._batches(epoch, at, begin, note=note, quiet=True)

        def take(batch: Batch) -> Batch:
            if self._count_samples:
                batch = _first(batch, self.rank_samples - tally.samples)
            self._count(batch, tally)
            return batch

        def ran_out(at: int, got: int) -> None:
            # A whole repeat is as long as the epoch read from its start. A run that began
            # at another rank's position (its skip not its own) came to some other count.
            if at == 0 and got and got != log.lap:
                log.lap_length = got

        if log.lap:
            at = start.batches if start is not None else 0
            yield from _passes(lambda: self._short(tally), read, at, take, ran_out)

    def _filled_worker_share(self, epoch: int, *, worker: int, workers: int, own_skip: int,
                             skip_extra: int) -> Iterator[Batch]:
        """One PyTorch loader worker's share of ``epoch`` after its first ``own_skip``
        batches (``_worker_epoch_batches``), filled up as ``_repeat_first_batches`` fills a
        whole epoch where skipped samples or shards made it come short: with its own first
        batches, or where nothing of its share could be read, with the rank's. The loader
        then yields ``len(self)`` batches, which DDP's ranks wait for. The workers take
        turns as before, so after a share came short the batches are not those of
        ``processes=N``, which fills the epoch at its end."""
        owned = len(range(worker, len(self), workers))
        made = own_skip

        def short() -> bool:
            return made < owned

        def take(batch: Batch) -> Batch:
            nonlocal made
            made += 1
            return batch

        quiet = self.policy.quiet_copy()
        yield from map(take, self._worker_epoch_batches(
            epoch, worker=worker, workers=workers, skip=0, own_skip=own_skip, skip_extra=skip_extra))
        read = made
        yield from _passes(short, lambda at: self._worker_epoch_batches(
            epoch, worker=worker, workers=workers, skip=0, own_skip=at, policy=quiet), 0, take)
        yield from _passes(short, lambda at: self._epoch_batches(epoch, skip_batches=at, policy=quiet), 0, take)
        if self.world_size > 1 and short():
            raise self._cannot_keep_len(epoch, made, worker=worker)
        if made > read:
            loud = "warn" in (self.policy.on_error, self.policy.on_shard_error)
            log.log(logging.WARNING if loud else logging.DEBUG,
                    "epoch %d of %s, loader worker %d: repeated %s to keep its share of %s", epoch,
                    self.split, worker, counted(made - read, "batch"), counted(owned, "batch"))

    def _cannot_keep_len(self, epoch: int, got: int, worker: int | None = None) -> RuntimeError:
        """An epoch that came short with nothing of its own to fill it up with: raise, as a
        silently short rank hangs every other rank of a DDP job at its next step."""
        who = f"rank {self.rank} of {self.world_size}" + ("" if worker is None else f", loader worker {worker}")
        return RuntimeError(
            f"epoch {epoch} of {self.split} ({who}) read no whole batch to fill itself up with "
            f"(got {got}, len(reader) is {len(self)}) after skipping undecodable samples or damaged "
            "shards: it cannot yield the batches the other ranks will; repair the shards "
            "(`shardpack verify --deep`) or read with on_error='raise'")

    @staticmethod
    def _noter(log: StreamLog, tally: _Tally, offset: int) -> Callable[[int, int], None]:
        """``note(stream, failed)`` for ``_batches``: the batch about to be yielded, the
        ``tally.batches - offset``-th of what ``log`` covers, comes from ``stream``, which
        had ``failed`` samples fail by then (reader.state.StreamLog)."""
        return lambda stream, failed: log.note(tally.batches - offset, stream, failed)

    def _batches(self, epoch: int, skip: int, start: StreamPosition | None = None,
                 note: Callable[[int, int], None] | None = None,
                 quiet: bool = False) -> Generator[Batch, None, None]:
        """Epoch ``epoch``'s batches after the first ``skip``: from the decode processes
        (``processes=``) or from this process's decode threads. ``start``: where each batch
        stream stands at ``skip`` (a loaded state's; else the turns of an epoch where
        nothing failed); ``note(stream, failed)``: hears, before each batch, which stream
        made it after how many of its samples failed (for states); ``quiet``: skip what
        fails without counting or saying it (``ErrorPolicy.quiet``)."""
        self.require_samples()
        if not self.processes:
            return self._epoch_batches(epoch, skip_batches=skip, skip_extra=start.failed[0] if start else 0,
                                       on_extra=functools.partial(note, 0) if note else None,
                                       policy=self.policy.quiet_copy() if quiet else None)
        if self._pool is None or not self._pool.alive:
            self._pool = DecodeProcesses(self, self.processes)
        return self._pool.epoch(epoch, skip, start, note=note, quiet=quiet)

    def _position(self, epoch: int, batches: int, streams: int) -> StreamPosition:
        """Where the batch streams of ``epoch`` stood after ``batches`` batches, as read
        here (or as loaded, before the epoch is read); else as if nothing had failed."""
        log = self._stream_logs.get(epoch)
        at = log.position(batches, streams) if log is not None else None
        if at is not None:
            return at
        loaded = self._resume_position
        if loaded is not None and epoch == self.epoch and loaded.fits(batches, streams):
            return loaded
        return StreamPosition.round_robin(batches, streams)

    def close(self) -> None:
        """End the decode processes (``processes=``) and free their shared memory, and let
        go of the batch arrays kept between epochs; a later epoch starts them again."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._buffers = None

    def __getstate__(self) -> dict[str, Any]:
        """What a copy (a decode process, a loader worker) gets: no process pool, and no
        scan of the shards' small members once the counts it gave are kept.

        The scan (``labels``/``filenames``, manifest-less or class-subset counts) holds a
        path, a label and a class name per sample: at ImageNet size (1.28 M samples,
        ImageNet-style paths; measured) 64 MB pickled, sent to every decode process each
        epoch and unpickled there into 250 MB of objects that nothing in a copy reads. A
        copy needs only the counts.
        """
        if self._index is not None:
            self.shard_counts()  # kept from the scan at hand (no I/O, no side effect)
        state = self.__dict__ | {"_pool": None, "_buffers": None}
        if self._index is not None and self._counts_without_scan():
            state["_index"] = None
        return state

    def _counts_without_scan(self) -> bool:
        """Whether ``samples`` and ``shard_counts()`` are known without the scan (from the
        manifest, or kept from the scan when it was read)."""
        return ((self._scanned_samples is not None or self._manifest_gives_samples())
                and (self._scanned_counts is not None or self._manifest_gives_counts()))

    def _manifest_gives_samples(self) -> bool:
        """Whether ``samples`` comes from the manifest alone: its split count, or its
        class counts for a class subset."""
        src = self.source
        return src.count is not None and (self._remap is None or bool(src.class_counts))

    def _manifest_gives_counts(self) -> bool:
        """Whether ``shard_counts()`` comes from the manifest alone (no class subset)."""
        return self._remap is None and all(ref.count is not None for ref in self.source.shards)

    def _select(self, samples: Iterable[Sample], policy: ErrorPolicy) -> Iterator[tuple[Sample, int]]:
        """Keep the classes asked for, re-index labels, and keep only the image bytes.

        A label outside the manifest's classes ends the shard through ``on_shard_error``
        (``_foreign_label``), before the class subset could drop it unseen."""
        need_label = self.batch_options.label_mode is not None
        classes = self._manifest_classes()
        for sample in samples:
            if image_member(sample) is None:
                continue  # no image to decode: nor is it counted (scan_shard), so pieces line up
            try:
                label = sample_label(sample)
            except SampleDecodeError as exc:
                if need_label or self._remap is not None:
                    policy.sample_failed(exc)
                    continue
                label = None  # read without labels, as the scan counted it (_yielded)
            if _outside(label, classes):  # raises unless on_shard_error skips the shard
                policy.shard_failed(self._foreign_label(
                    label, shard=sample["__shard__"], key=sample["__key__"], offset=sample.get("__offset__")))
                return
            if self._remap is not None:
                if label not in self._remap:
                    continue
                label = self._remap[label]
            if label is None:
                if need_label:
                    policy.sample_failed(
                        SampleDecodeError("has no .cls label", key=sample["__key__"], shard=sample["__shard__"])
                    )
                    continue
                label = -1
            elif need_label and not 0 <= label < len(self.class_names):
                policy.sample_failed(
                    SampleDecodeError(
                        f"label {label} is outside the {len(self.class_names)} classes; "
                        "pass num_classes= or class_names=",
                        key=sample["__key__"],
                        shard=sample["__shard__"],
                    )
                )
                continue
            # the labels are read: only the image goes on (the sample is this reader's own)
            sample.pop("cls", None)
            sample.pop("json", None)
            yield sample, label

    def epoch_pieces(self, epoch: int) -> list[Piece] | None:
        """This rank's pieces of shards in ``epoch`` (reader.distributed), in reading order;
        None when there is one rank (then every shard is read whole, no counts needed)."""
        if self.world_size == 1:
            return None
        return self._rank_pieces(epoch)

    def _rank_pieces(self, epoch: int) -> list[Piece]:
        counts = self.shard_counts()
        order = shard_order(len(counts), epoch=epoch, seed=self.seed, shuffle=self.shuffle)
        return rank_pieces(
            counts, order, rank=self.rank, world_size=self.world_size, uneven=self.uneven
        )

    def _piece_samples(
        self, shard: int, ranges: Sequence[tuple[int, int | None]], check_rest: bool = True,
        opened: Callable[[], IO[bytes]] | None = None, policy: ErrorPolicy | None = None,
    ) -> Iterator[tuple[Sample, int]]:
        """Samples ``start:stop`` of one shard for each ``(start, stop)`` of ``ranges``
        (ascending; after the class subset), labelled, in one pass over the shard.

        ``check_rest``: read the rest of a shard this piece ends inside, so its checksum is
        compared (False where this rank reads that shard in another piece anyway).
        ``opened``: gives the shard's stream opened ahead (``_opener``); ``policy``: the
        error policy (default: the reader's)."""
        ref = self.source.shards[shard]
        policy = self.policy if policy is None else policy
        raw = shard_samples(
            ref, policy=policy, storage_options=self.storage_options, cache_dir=self.cache_dir,
            opened=opened, cache_max_bytes=self.cache_max_bytes,
        )
        labelled = self._select(raw, policy)
        whole = len(ranges) == 1 and ranges[0][0] == 0 and (
            ranges[0][1] is None or ranges[0][1] == ref.count and self._remap is None)
        if whole:
            return labelled
        return _only(labelled, ranges, rest=raw if check_rest else None)

    def _worker_epoch_batches(
        self, epoch: int, *, worker: int, workers: int, skip: int, buffers: BatchBuffers | None = None,
        own_skip: int | None = None, skip_extra: int = 0, on_extra: Callable[[int], None] | None = None,
        policy: ErrorPolicy | None = None,
    ) -> Generator[Batch, None, None]:
        """Batches ``worker, worker + workers, ...`` of this rank's ``epoch``, after the first
        ``skip`` batches of the epoch (all workers') were consumed: one loader worker's or
        decode process's share (reader.distributed.worker_pieces). Taking one batch from
        each worker in turn, starting at worker ``skip % workers``, gives the epoch.
        ``own_skip``: this worker's batches already consumed, where failed samples made
        the turns uneven (reader.state.StreamPosition); ``skip_extra``/``on_extra``: see
        ``_decoded``."""
        mine = worker_pieces(
            self._rank_pieces(epoch), worker=worker, num_workers=workers, batch_size=self.batch_options.batch_size,
            drop_remainder=self.batch_options.drop_remainder, strided=not self.shuffle,
        )
        return self._epoch_batches(
            epoch, pieces=mine, skip_batches=len(range(worker, skip, workers)) if own_skip is None else own_skip,
            stream=f"/worker{worker}of{workers}", buffers=buffers, skip_extra=skip_extra, on_extra=on_extra,
            policy=policy, streams=workers,
        )

    def _epoch_batches(
        self,
        epoch: int,
        *,
        pieces: Sequence[Piece] | None = None,
        skip_batches: int = 0,
        stream: str = "",
        buffers: BatchBuffers | None = None,
        skip_extra: int = 0,
        on_extra: Callable[[int], None] | None = None,
        policy: ErrorPolicy | None = None,
        streams: int = 1,
    ) -> Generator[Batch, None, None]:
        """The pipeline of one epoch, stage by stage.

        ``pieces`` overrides this rank's share (a data-loader worker's share); ``stream``
        names that share in the random generators' purposes, one of ``streams`` that share
        the ``shuffle_buffer_bytes`` cap; the first ``skip_batches``
        batches' samples are dropped before decoding (resume); ``buffers`` supplies the
        batch arrays (a decode process's shared memory); ``policy``: the error policy
        (default: the reader's).
        """
        # Here, where every epoch is decoded (iter(), a torch worker, a spawned one with
        # Pillow's own limit): let Pillow open what the pack accepted.
        allow_packed_pixels(self.source.manifest)
        if pieces is None:
            pieces = self.epoch_pieces(epoch)
        if pieces is None:
            order = shard_order(len(self.source.shards), epoch=epoch, seed=self.seed, shuffle=self.shuffle)
            parts: list[tuple[int, list[tuple[int, int | None]]]] = [(s, [(0, None)]) for s in order]
        else:
            parts = _by_shard(pieces)
        first_of_shard = {shard: i for i, (shard, _) in reversed(list(enumerate(parts)))}
        ahead = self._opener([shard for shard, _ in parts])
        policy = self.policy if policy is None else policy
        samples = (self._piece_samples(shard, ranges, check_rest=first_of_shard[shard] == i,
                                       opened=functools.partial(ahead.open, i) if ahead else None,
                                       policy=policy)
                   for i, (shard, ranges) in enumerate(parts))
        try:
            yield from self._decoded(self._shuffled(samples, epoch, stream, share_of=streams), epoch, stream,
                                     skip_batches, buffers, skip_extra, on_extra, policy=policy)
        finally:
            if ahead is not None:
                ahead.close()

    def _opener(self, shards: Sequence[int]) -> OpenAhead | None:
        """Remote shards are opened a piece ahead (reader.remote.OpenAhead); local files
        start at once from the page cache or disk, and open when they start."""
        if not any(is_remote(ref.url) for ref in self.source.shards):
            return None
        refs = [self.source.shards[shard] for shard in shards]
        return OpenAhead(lambda i: open_ref(refs[i], self.storage_options, self.cache_dir,
                                            self.cache_max_bytes), len(refs))

    def _shuffled(
        self, pieces: Iterator[Iterator[tuple[Sample, int]]], epoch: int, stream: str, share_of: int = 1,
    ) -> Iterator[tuple[Sample, int]]:
        """The pieces' samples interleaved, then through the shuffle buffer: one of
        ``share_of`` streams (decode processes or loader workers), each holding its own
        buffer, so each gets that share of ``shuffle_buffer``, ``shuffle_initial`` and the
        ``shuffle_buffer_bytes`` cap (the memory a reader holds is the same whichever way
        it decodes: with "auto", decode processes, the default on 8 CPUs or more)."""
        labelled = interleave(pieces, cycle_length=self.interleave if self.shuffle else 1)
        if self.shuffle:
            # at least 2 a stream: a buffer of 1 shuffles nothing
            cap, size = self.shuffle_buffer_bytes, max(min(2, self.shuffle_buffer), self.shuffle_buffer // share_of)
            initial = None if self.shuffle_initial is None else early_start(
                max(1, self.shuffle_initial // share_of), size)
            labelled = shuffle_buffer(
                labelled, rng=epoch_rng(self.seed, epoch, "samples" + stream),
                size=size, max_bytes=None if cap is None else max(1, cap // share_of),
                nbytes=_image_bytes, initial=initial,
            )
        return labelled

    def _decoded(
        self, labelled: Iterator[tuple[Sample, int]], epoch: int, stream: str, skip_batches: int,
        buffers: BatchBuffers | None, skip_extra: int = 0, on_extra: Callable[[int], None] | None = None,
        *, policy: ErrorPolicy,
    ) -> Iterator[Batch]:
        """Drop the samples of batches a resume skips (still compressed), then decode the
        rest into batches on the decode threads. ``skip_extra``: samples that failed
        before the resume point, skipped too; ``on_extra`` hears, before each batch, how
        many of the stream's samples failed before its end (``decode_batches``)."""
        augment = self.decode_options.random_flip or self.decode_options.random_crop is not None
        rank = f"/rank{self.rank}of{self.world_size}" if self.world_size > 1 else ""
        aug_rng = epoch_rng(self.seed, epoch, "augment" + rank + stream) if augment else None
        if skip_batches:
            skip = skip_batches * self.batch_options.batch_size + skip_extra
            labelled = islice(labelled, skip, None)  # compressed samples: nothing decoded
            if aug_rng is not None:
                for _ in range(skip):  # the skipped samples' draws (one each, as decode_batches)
                    aug_rng.getrandbits(64)
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="shardpack-decode") as pool:
            yield from decode_batches(
                labelled, decode=self.decode_options, batch=self.batch_options, pool=pool,
                policy=policy, workers=self.num_workers, aug_rng=aug_rng,
                buffers=buffers if buffers is not None else self._batch_buffers(),
                on_batch=None if on_extra is None else lambda failed: on_extra(failed + skip_extra),
            )

    def _batch_buffers(self) -> BatchBuffers:
        """The batch arrays this process's epochs decode into, kept across epochs.

        A fresh float32 batch of 64 x 224 x 224 x 3 is 38 MB of pages to fault in, and an
        epoch starts 4-5 of them: 0.15-0.5 s per epoch on a virtual machine that hands freed
        memory back to its host (measured here), a few per cent of a short epoch (a
        validation split read every epoch). Decode processes keep their shared-memory
        slots across epochs likewise. Arrays a caller still holds are never reused, and
        ``close()`` lets go of them; copies of the reader start without them, and so does
        a forked process (a loader worker): its copy of the pool's lock may have been held
        by another thread when the fork happened. A change of decode threads or batch size
        starts a new pool (it is sized for them); a changed batch shape replaces unused
        arrays too small for it (``BatchBuffers.take``).
        """
        key = (os.getpid(), self.num_workers, self.batch_options.batch_size)
        if self._buffers is None or self._buffers_key != key:
            self._buffers = BatchBuffers.for_decoding(self.num_workers, self.batch_options.batch_size)
            self._buffers_key = key
        return self._buffers

    def __repr__(self) -> str:
        return (
            f"ShardReader(split={self.split!r}, samples={self.samples}, batches={len(self)}, "
            f"classes={len(self.class_names)}, shuffle={self.shuffle}, seed={self.seed})"
        )


def _by_shard(pieces: Sequence[Piece]) -> list[tuple[int, list[tuple[int, int | None]]]]:
    """``pieces`` as ``(shard, ranges)``, consecutive pieces of one shard joined, so a
    decode process's every other batch of a shard (``shuffle=False``) is one read of it."""
    out: list[tuple[int, list[tuple[int, int | None]]]] = []
    for p in pieces:
        if out and out[-1][0] == p.shard and (last := out[-1][1][-1])[1] is not None and last[1] <= p.start:
            out[-1][1].append((p.start, p.stop))
        else:
            out.append((p.shard, [(p.start, p.stop)]))
    return out


def _only(
    labelled: Iterator[tuple[Sample, int]], ranges: Sequence[tuple[int, int | None]],
    *, rest: Generator[Sample, Any, None] | None,
) -> Iterator[tuple[Sample, int]]:
    """Yield ``labelled[start:stop]`` for each ascending ``(start, stop)`` of ``ranges``;
    then have the shard's generator ``rest`` read the shard's remaining bytes when its
    stream compares a checksum (samples.READ_THE_REST).

    A piece of a shard (another rank or loader worker reads the rest) is still checked as a
    whole shard is; the rest costs reading, never parsing or decoding, and nothing at all
    for a shard already verified in this process.
    """
    wanted = [(start, stop) for start, stop in ranges if stop is None or start < stop]
    if not wanted:
        return
    k = 0
    start, stop = wanted[0]
    for i, item in enumerate(labelled):
        if i >= start:
            yield item
        if stop is not None and i + 1 >= stop:
            k += 1
            if k == len(wanted):
                break
            start, stop = wanted[k]
    if rest is not None:
        try:
            rest.send(READ_THE_REST)
        except StopIteration:
            pass


def _passes(short: Callable[[], bool], read: Callable[[int], Generator[Batch, None, None]], at: int,
            take: Callable[[Batch], Batch], ran_out: Callable[[int, int], None] | None = None) -> Iterator[Batch]:
    """Batches of a stream read again and again while ``short()``: ``read(at)`` gives its
    batches after the first ``at``; the first pass starts at ``at``, each later one at the
    start, and a pass from the start that yields nothing ends it (nothing can be read).
    ``take`` counts (and may cut) each batch before it is yielded; ``ran_out(at, got)``
    hears of each pass that ran to the stream's end."""
    while short():
        got = 0
        batches = read(at)
        try:
            for batch in batches:
                if not short():
                    return
                got += 1
                yield take(batch)
        finally:
            batches.close()
        if ran_out is not None:
            ran_out(at, got)
        if not got and not at:
            return
        at = 0


@dataclasses.dataclass
class _Tally:
    """Batches and samples one iteration of an epoch has yielded (skipped ones included)."""

    batches: int
    samples: int


def _first(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of ``batch`` (views)."""
    return (batch[0][:n], batch[1][:n]) if isinstance(batch, tuple) else batch[:n]


def _outside(label: int | None, classes: int | None) -> bool:
    """A label that is not an index into the manifest's ``classes`` (None: no manifest)."""
    return classes is not None and label is not None and not 0 <= label < classes


def _refuse_repeated(class_names: Sequence[str]) -> None:
    """A class named twice would be counted twice and read once (labels would be off)."""
    repeated = sorted(c for c, n in Counter(class_names).items() if n > 1)
    if repeated:
        raise ValueError(f"class_names names {repeated} more than once")


def _warn_about_squashed_shards(manifest: dict[str, Any] | None, options: DecodeOptions) -> None:
    """Shards packed with ``--resize WxH`` hold every image squashed to W x H: the original
    aspect ratio is gone. Reading them at another aspect ratio (squashed again, or cropped
    or padded to it) acts on the squashed picture, which nobody expects in silence."""
    packed_with = optional_fields(manifest)[0]["options"] if manifest else None
    resize = (packed_with or {}).get("resize") or {}
    if "width" not in resize or "height" not in resize:
        return
    height, width = options.image_size
    stored = resize["width"] / resize["height"]
    if abs(width / height - stored) <= 0.01 * stored:
        return  # the packed aspect, at any scale: nothing is lost again
    how = ("cropped to it" if options.crop_to_aspect_ratio else
           "padded to it" if options.pad_to_aspect_ratio else "squashed again")
    warnings.warn(
        f"these shards hold every image squashed to {resize['width']}x{resize['height']} at pack "
        f"time (--resize {resize['width']}x{resize['height']}); read at image_size "
        f"{options.image_size}, another aspect ratio, each is {how} from the squashed picture, "
        "not from the original's aspect; pack with --resize N (short side) to keep it",
        stacklevel=3)
