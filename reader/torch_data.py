"""``ShardIterableDataset``: a split as a PyTorch ``IterableDataset`` of ready batches.

Needs the optional ``shardpack[torch]`` extra; torch is imported in this module only.
Use it with ``DataLoader(ds, batch_size=None, num_workers=N)``: the dataset makes whole
batches (decoding on a few threads inside each worker), the loader only moves them.

Ranks split the epoch as :class:`reader.ShardReader` does (:mod:`reader.distributed`); the
loader's workers then split their rank's share again, each reading a contiguous run of it,
and owning every ``num_workers``-th batch, so that the loader -- which takes one batch from
each worker in turn -- yields exactly ``len(ds)`` batches per epoch on every rank, whatever
``num_workers`` is.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .checks import whole_number
from .shard_reader import ShardReader, _default_workers
from .state import StreamPosition

__all__ = ["ShardIterableDataset"]


def _to_torch(x: np.ndarray, channels_last: bool) -> torch.Tensor:
    """NCHW without a copy: the reader made (b, c, h, w) batches, or (b, h, w, c) ones to be
    seen as NCHW in channels-last memory."""
    t = torch.from_numpy(x)
    return t.permute(0, 3, 1, 2) if channels_last else t


# slots of ShardIterableDataset._control
_GENERATION, _EPOCH, _SKIP, _SEED, _STREAMS, _READ, _WORKERS, _UNSHARED = range(8)
_NO_SEED = -(2**63)


class ShardIterableDataset(IterableDataset):
    """Iterate over one split as batches of torch tensors, epoch by epoch.

    Images are float32 tensors of shape ``(batch, channels, height, width)``, as
    torchvision models expect, with values in [0, 255] (pass ``rescale=1/255`` for [0, 1],
    as ``ToTensor`` gives), or uint8 with ``dtype="uint8"`` (as torchvision's ``decode_jpeg``
    and FFCV give: a quarter of the memory and of the copy to the GPU; normalise there). By
    default they are contiguous NCHW, written so by the decode threads from the uint8 resize
    (no transpose of whole batches; whole-number values, within 0.8 of the channels-last
    float32 rows, which may hold a bilinear resize's unrounded values);
    ``channels_last=True`` returns NHWC memory as an NCHW tensor in
    ``torch.channels_last`` memory format (use with ``model.to(memory_format=
    torch.channels_last)``). Labels: int64 ``(batch,)`` for ``label_mode="int"`` (what
    ``CrossEntropyLoss`` wants), float32 for "categorical"/"binary"; no labels for None.

    On many cores (8 CPUs or more: ``processes="auto"``, the default; or ``processes=N``),
    ``DataLoader(ds, batch_size=None, num_workers=0)`` decodes in N processes of
    shardpack's own (``ShardReader(processes=N)``), which write
    into shared-memory batches that are reused once the tensor is freed: the same batches,
    in the same order, as ``num_workers=N`` loader workers, without their cost of moving
    every batch into fresh shared memory (torch's ``share_memory_``: 45 ms per float32
    224x224 batch of 64 here, on each worker's one thread). Measured on 2 cores, shards
    packed at 256, epochs after the first: 2,070-2,600 images/s against 850-1,010 with 2
    loader workers.

    Epochs work like ``DistributedSampler``: call :meth:`set_epoch` at the start of every
    epoch so each gets a new order (with ``persistent_workers=True`` the workers move on to
    the next epoch by themselves after each pass, and still follow a :meth:`set_epoch` or
    :meth:`load_state_dict` made after they started).

    Args:
        source: shard folder or URL, or manifest-less tars (see ShardReader).
        split: split to read.
        channels_last: NCHW tensors in channels-last memory (no copy) instead of
            contiguous NCHW.
        decode_threads: decoding threads in each loader worker (default: the CPUs this
            process may use, divided among the workers; with one worker or none, as
            ``ShardReader``'s ``num_workers``: at most 8 for small images).
        reader_options: ShardReader options (``image_size``, ``batch_size``, ``shuffle``,
            ``seed``, ``rank``, ``world_size``, ``uneven``, ``label_mode``, ...). Rank and
            world size are detected when the dataset is made, in the main process.

    Raises:
        TypeError: ``num_workers`` given (it is the DataLoader's; use ``decode_threads``).
        RuntimeError: when iterated in a DataLoader worker with ``processes=`` set.
        ManifestError, SplitNotFoundError, ClassNotFoundError, ValueError: as ShardReader.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str],
        *,
        split: str = "train",
        channels_last: bool = False,
        decode_threads: int | None = None,
        **reader_options: Any,
    ) -> None:
        super().__init__()
        if "data_format" in reader_options:
            raise TypeError("the images are NCHW; channels_last=True picks their memory layout")
        if "num_workers" in reader_options:
            raise TypeError(
                "num_workers is the DataLoader's option (processes); pass decode_threads= "
                "for the decoding threads inside each of them"
            )
        self.reader = ShardReader(
            source, split=split, num_workers=decode_threads,
            data_format="channels_last" if channels_last else "channels_first", **reader_options)
        # manifest-less or a class subset: scan once, before workers, and keep the counts
        # (a spawned worker's copy then gets them instead of the scan: ShardReader.__getstate__)
        self.reader.shard_counts()
        self.reader.samples  # noqa: B018 - counted now (an empty split is refused when read)
        self.reader.repick_processes()  # tars without a manifest: "auto" knows their count now
        self.channels_last = channels_last
        self.decode_threads = decode_threads
        self.epoch = 0  # set by set_epoch
        self._passes = 0  # passes over this copy since set_epoch / load_state_dict
        self._resume_batches = 0
        self._resume_streams: int | None = None  # the loaded state's, checked as a pass starts
        self._resume_rank: int | None = None  # the rank that saved it
        self._resume_shared = True  # whether its streams shared the shuffle buffer (state.SHARED_BUFFER_ORDER)
        # the loaded state's batch streams (failed samples, turns): the pass that resumes
        # it starts there, without loader workers or with as many as the state's streams
        self._resume_position: StreamPosition | None = None
        # Shared memory the loader workers inherit, between this (the main) process, which
        # never sees the loader, and them. Written here by set_epoch / load_state_dict, for
        # persistent workers whose copies were made before: generation, epoch, resume
        # batches, seed, resume streams (0: unknown). Written by the workers' passes, for
        # state_dict: the epoch they last read (-1: none since) and the DataLoader's worker
        # count (0: none since), so a state records how the epoch was split.
        self._control: Any = multiprocessing.RawArray("q", 8)
        self._control[_READ] = -1
        self._seen = 0  # the generation this copy follows

    @property
    def class_names(self) -> list[str]:
        return list(self.reader.class_names)

    def __len__(self) -> int:
        """Batches per epoch on this rank (all workers together), as ``len(reader)``."""
        return len(self.reader)

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` in the next pass (as ``DistributedSampler.set_epoch``); a
        position loaded with :meth:`load_state_dict` inside that same epoch is kept."""
        if int(epoch) != self.epoch or self._passes:
            self._resume_batches, self._resume_position = 0, None
        self.epoch = int(epoch)
        self._passes = 0
        self._publish()

    def _publish(self) -> None:
        """Hand this process's position to loader workers made before it was set
        (``persistent_workers=True``): they adopt it as their next pass starts."""
        control = self._control
        control[_GENERATION] += 1
        control[_EPOCH], control[_SKIP] = self.epoch, self._resume_batches
        seed = self.reader.seed
        control[_SEED] = seed if -(2**63) < seed < 2**63 else _NO_SEED  # else: the copies' own
        control[_STREAMS] = self._resume_streams or 0
        control[_UNSHARED] = 0 if self._resume_shared else 1
        control[_READ], control[_WORKERS] = -1, 0
        self._seen = control[_GENERATION]

    def _adopt_published(self) -> None:
        """In a loader worker: take a position published since this copy was made."""
        control = self._control
        if control[_GENERATION] != self._seen:
            self._seen = control[_GENERATION]
            self.epoch, self._passes, self._resume_batches = control[_EPOCH], 0, control[_SKIP]
            if control[_SEED] != _NO_SEED:
                self.reader.seed = control[_SEED]
            self._resume_streams = control[_STREAMS] or None
            self._resume_shared = not control[_UNSHARED]
            self._resume_position = None  # not published: the copy's is another state's

    def state_dict(self, batches: int) -> dict[str, Any]:
        """The position after the training loop consumed ``batches`` batches of the current
        epoch (the loader reads ahead, so only the loop knows). JSON-able.

        It records the loader's ``num_workers`` (the epoch is split among them), as its
        workers reported it since :meth:`set_epoch` or :meth:`load_state_dict`, so that
        resuming under another number is refused instead of giving other batches;
        ``processes=N`` counts as N workers (the same stream). Saved again before any pass
        after a load, it keeps the loaded state's number.

        Raises:
            ValueError: ``batches`` is not a whole number in ``0..len(self)``: a global
                step passed by mistake made a state at the next epoch's start, which
                skipped the rest of this epoch on resume, and a negative one was refused
                only when loaded, after a crash.
        """
        from .state import make_state

        if whole_number(batches, "batches", minimum=0) > len(self):
            raise ValueError(f"batches is what the loop consumed of this epoch, 0..{len(self)} "
                             f"(len of this dataset), got {batches}: pass the count since the "
                             "epoch began, not a global step")

        workers, read = self._control[_WORKERS], self._control[_READ]
        # before any pass after a load: the loaded state's streams (one, where it did not
        # record them: what a pass without loader workers takes it for)
        streams = workers or ((self._resume_streams or (1 if self._resume_batches else None))
                              if not self._passes else None)
        # persistent workers move on without this process
        epoch = read if workers and read >= 0 else self.epoch + max(self._passes - 1, 0)
        loaded = self._resume_position if not self._passes and not workers else None  # not read yet
        return make_state(self.reader, epoch=epoch, batches=batches, streams=streams, position=loaded)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position from :meth:`state_dict` (or ``ShardReader.state_dict``): the
        next pass yields the rest of that epoch, batch for batch as the interrupted run.

        Raises:
            ValueError: the state does not belong to this split / shard list / options.
        """
        from .state import SHARED_BUFFER_ORDER, check_state, own_position, saved_streams

        epoch, batches, seed = check_state(self.reader, state, streams=False)
        # adopted (decode processes for the saved streams) only when read without loader
        # workers, whose number says how it is read (__iter__)
        self._resume_rank = state.get("rank")
        self._resume_shared = state.get("shared_buffer") == SHARED_BUFFER_ORDER
        self.reader.seed = seed
        self.epoch, self._passes, self._resume_batches = epoch, 0, batches
        self._resume_streams = saved_streams(state)
        self._resume_position = own_position(self.reader, state, batches, self._resume_streams or 1)
        self.reader._forget_reading()
        self._publish()

    def __iter__(self) -> Iterator[Any]:
        self._adopt_published()
        epoch = self.epoch + self._passes
        skip = self._resume_batches if self._passes == 0 else 0
        self._passes += 1
        info = get_worker_info()
        workers = 1 if info is None else info.num_workers
        worker = 0 if info is None else info.id
        reader = self.reader
        if info is not None and reader.processes_auto:
            # "auto" in a loader worker: the loader's workers are the processes
            reader._adopted_epoch = None
            if reader.processes:
                reader._use_processes(0)
        elif info is None:
            reader._settle_streams(epoch, skip)
            if skip:  # resumed here: "auto" takes the state's streams (for this epoch)
                reader.adopt_streams(self._resume_streams, skip, epoch=epoch, from_rank=self._resume_rank)
        if skip and workers > 1 and self._resume_streams is None and reader.shuffle and not self._resume_shared:
            raise ValueError(
                "the state was saved inside a shuffled epoch by shardpack 0.2, which did not record "
                "how many loader workers read it, and whose workers each held the whole shuffle "
                "buffer (now they share it): the rest of that epoch cannot be resumed exactly under "
                "loader workers; start it over with set_epoch(epoch)")
        if reader.processes and info is not None:
            raise RuntimeError(
                "ShardIterableDataset(processes=N) decodes in its own N processes: use it with "
                "DataLoader(num_workers=0), or drop processes= and give the loader num_workers")
        if info is not None:
            self._control[_WORKERS], self._control[_READ] = workers, epoch
        if skip:
            from .state import check_streams, reader_streams

            check_streams(self._resume_streams, workers if info else reader_streams(reader), skip)
        if workers == 1:
            # the loaded state's failed samples and turns (a persistent worker's copy drops
            # them when it adopts a position published since: _adopt_published)
            start = self._resume_position if skip else None
            batches = reader._read_epoch(epoch, skip, start)  # refuses an empty split
        else:
            reader.require_samples()
            if self.decode_threads is None:
                reader.num_workers = max(1, _default_workers() // workers)
            # After a resume at batch k, the loader's worker 0 must make batch k: loader
            # worker w plays the stream w places after the one whose turn is next, from
            # that stream's own batches and failed samples (the loaded state's, where it
            # fits; else the turns of an epoch where nothing failed)
            at = StreamPosition.at_or_round_robin(self._resume_position if skip else None, skip, workers)
            stream = (worker + at.next) % workers
            batches = reader._filled_worker_share(
                epoch, worker=stream, workers=workers, own_skip=at.counts[stream], skip_extra=at.failed[stream])
        for batch in batches:
            if isinstance(batch, tuple):
                x, y = batch
                y = y.astype(np.int64) if y.dtype == np.int32 else y
                yield _to_torch(x, self.channels_last), torch.from_numpy(y)
            else:
                yield _to_torch(batch, self.channels_last)

    def __getstate__(self) -> dict[str, Any]:
        """Loader workers started by spawn (or forkserver) share ``_control`` with the dataset
        they were made from; any other copy (pickle, ``copy.deepcopy``: frameworks that ship
        datasets so) gets one of its own (__setstate__), for its own loader."""
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            state["_control"] = list(state["_control"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_control"], list):
            state["_control"] = multiprocessing.RawArray("q", state["_control"])
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"ShardIterableDataset({self.reader!r}, channels_last={self.channels_last})"
