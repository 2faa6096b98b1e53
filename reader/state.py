"""Mid-epoch resume: a reader's position as a small JSON-able dict, and a Keras callback.

An epoch's stream is a pure function of the shard list, the options that shape the order
and ``(seed, epoch)``: the shard order, the interleaving, the shuffle buffer and the
augmentation draws are all seeded from them. So a position is just ``(epoch, batches
already consumed)``; resuming re-plays the epoch's compressed samples, drops the first
``batches * batch_size`` of them before decoding (cheap: no pixels are made), and goes on
with exactly the samples, in exactly the order, the interrupted run would have seen.

The state also records what the order depends on, so loading a state into a reader that
would produce another stream fails with a ValueError naming the difference instead of
silently resuming somewhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from dataclasses import field as _field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .shard_reader import ShardReader

__all__ = ["STATE_VERSION", "shard_fingerprint", "content_fingerprint", "reader_streams", "saved_streams", "check_streams",
           "make_state", "check_state", "saved_extras", "saved_position", "own_position", "StreamPosition",
           "StreamLog", "repeat_batches", "save_state", "load_state", "ShardReaderCheckpoint"]

STATE_VERSION = 4  # the newest this code writes; it reads every version from 1
# Version 2 states come from a reader with ``shuffle_initial`` set, whose order shardpack
# before it cannot repeat (it would resume them wrongly, so they must refuse them); version
# 3 from a shuffling reader with ``shuffle_buffer_bytes`` (BYTE_CAP_ORDER); version 4 from
# a shuffling reader read as 2 or more batch streams (SHARED_BUFFER_ORDER); every other
# state is still version 1, which earlier releases resume as before.
_READABLE_VERSIONS = (1, 2, 3, 4)

ShardReaderCheckpoint: type  # made on first access by __getattr__ below (imports Keras)

# Options that change which samples come in which order (a state from a reader with other
# values cannot be resumed exactly). num_workers, rank and decode options do not.
# "streams" is checked apart (see check_streams): it matters only inside an epoch.
_ORDER_FIELDS = ("split", "world_size", "shuffle", "batch_size", "drop_remainder", "uneven",
                 "shuffle_buffer", "shuffle_buffer_bytes", "shuffle_initial", "interleave", "classes")
# What a state saved before a field existed had: its reader behaved as this value does.
_ORDER_FIELD_DEFAULTS: dict[str, Any] = {"shuffle_initial": None}


def shard_fingerprint(reader: ShardReader) -> str:
    """A short hash of the split's shard list (names, sample counts and sizes)."""
    listing = [[ref.name, ref.count, ref.nbytes] for ref in reader.source.shards]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def content_fingerprint(reader: ShardReader) -> str | None:
    """A short hash of the split's shards' sha256s, None where the manifest lacks them.
    Names, counts and sizes alone do not tell a re-pack (another seed: the same images in
    another order) from the original: tar sizes are rounded to 10,240-byte records."""
    hashes = [ref.sha256 for ref in reader.source.shards]
    if not hashes or None in hashes:
        return None
    return hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:16]


def reader_streams(reader: ShardReader) -> int:
    """How many batch streams the reader splits an epoch into and takes batches from in
    turn: its decode processes (``processes=N``), else one. PyTorch's DataLoader workers
    split it the same way (``ShardIterableDataset`` counts them), so a state saved under N
    streams resumes exactly only under N, from processes or loader workers alike."""
    return reader.processes or 1


def saved_streams(state: dict[str, Any]) -> int | None:
    """The streams a state was saved under, None if unknown. States of shardpack 0.2.0
    recorded ``processes`` instead: 2 or more is that many streams, but 0 is unknown (a
    PyTorch dataset's state said 0 under any number of loader workers)."""
    if "streams" in state:
        return int(state["streams"])
    return int(state.get("processes") or 0) or None


def check_streams(saved: int | None, streams: int, batches: int) -> None:
    """Refuse to resume ``batches`` into an epoch saved under ``saved`` batch streams with
    another number: each stream is a share of the epoch, so the batches after the saved
    position would differ, silently. At an epoch boundary (``batches == 0``) any number is
    fine: nothing of the epoch was consumed.

    Raises:
        ValueError: naming both numbers and how to get the saved one back.
    """
    if saved is None or saved == streams or not batches:
        return
    raise ValueError(
        f"the state was saved inside an epoch read as {saved} batch stream(s) "
        f"({_streams_setting(saved)}) but this run reads it as {streams} "
        f"({_streams_setting(streams)}): resume with {_streams_setting(saved)} to continue the "
        "same epoch"
    )


def _streams_setting(streams: int) -> str:
    if streams == 1:
        return "processes=0 and, in PyTorch, a DataLoader with at most one worker"
    return f"processes={streams}, or a PyTorch DataLoader with num_workers={streams}"


def _order_fields(reader: ShardReader) -> dict[str, Any]:
    return {
        "split": reader.split,
        "world_size": reader.world_size,
        "shuffle": reader.shuffle,
        "batch_size": reader.batch_options.batch_size,
        "drop_remainder": reader.batch_options.drop_remainder,
        "uneven": reader.uneven,
        "shuffle_buffer": reader.shuffle_buffer,
        "shuffle_buffer_bytes": reader.shuffle_buffer_bytes,
        "shuffle_initial": reader.shuffle_initial,
        "interleave": reader.interleave,
        "classes": list(reader.class_names),
    }


def make_state(reader: ShardReader, *, epoch: int, batches: int, streams: int | None = None,
               position: StreamPosition | None = None) -> dict[str, Any]:
    """The state of ``reader`` positioned after ``batches`` batches of ``epoch``, read as
    ``streams`` batch streams (default: the reader's own, ``reader_streams``). Where each
    stream stood (failed samples, turns) comes from ``position`` when the caller holds it
    (a dataset's loaded state, not read yet), else from what the reader logged.

    After an epoch's last batch that is ``(epoch + 1, 0)``: a state saying "all of epoch
    e, nothing left" would have a resume ask for an epoch of no batches, which a dataset
    of fixed cardinality (and ``fit(steps_per_epoch=0)``) refuses.
    """
    epoch, batches = _canonical(reader, int(epoch), int(batches))
    if streams is None:  # as the epoch was read: tf.data reads ahead of what Keras saves
        logged = reader._stream_logs.get(epoch)
        streams = len(logged.start.counts) if logged is not None else reader_streams(reader)
    streams = int(streams)
    if not batches:
        position = None
    elif position is None or not position.fits(batches, streams):
        position = reader._position(epoch, batches, streams)
    return {
        "version": _version_for(reader, streams),
        "epoch": epoch,
        "batches": batches,
        "seed": reader.seed,
        "rank": reader.rank,
        **_order_fields(reader),
        "streams": streams,
        "shards": shard_fingerprint(reader),
        "shard_hashes": content_fingerprint(reader),
        "unshuffled_split": UNSHUFFLED_SPLIT,
        "byte_cap": BYTE_CAP_ORDER,
        "shared_buffer": SHARED_BUFFER_ORDER,
        # only where a sample failed: states without them (and those of shardpack < 0.4)
        # resume as if none had
        **_position_fields(position),
    }


def _version_for(reader: ShardReader, streams: int) -> int:
    """The lowest state version whose readers resume exactly this reader's states, saved
    under ``streams`` batch streams."""
    if reader.shuffle and streams > 1:
        return 4
    if reader.shuffle and reader.shuffle_buffer_bytes is not None:
        return 3
    return 2 if reader.shuffle_initial is not None else 1


def _position_fields(position: StreamPosition | None) -> dict[str, Any]:
    if position is None:
        return {}
    fields: dict[str, Any] = {}
    if any(position.failed):
        fields["failed_before"] = position.failed
    if not position.is_round_robin():
        fields["stream_batches"], fields["next_stream"] = position.counts, position.next
    if position.lap:
        fields["lap"] = position.lap
    if position.lap_length and position.lap_length != position.lap:
        fields["lap_length"] = position.lap_length
    return fields


def saved_extras(state: dict[str, Any]) -> list[int]:
    """Per batch stream, the samples that failed to decode before the state's position
    (``failed_before``; empty when none did): a resume skips them besides whole batches, so
    that it sees the batches that came next. Without them every failed sample before the
    position shifted the rest of the epoch by one sample. They are the saving rank's own:
    another rank resuming from the same state skips whole batches only.

    Raises:
        ValueError: the field is not a list of whole numbers >= 0.
    """
    extras = state.get("failed_before", [])
    if not isinstance(extras, list) or not _whole(extras):
        raise ValueError(f"failed_before must be a list of whole numbers >= 0, got {extras!r}")
    return list(extras)


# How an unshuffled epoch is split among batch streams: 2 since each stream decodes the
# batches w, w + N, ... of the manifest order (distributed.worker_pieces ``strided``);
# before (no field), each read a contiguous run.
UNSHUFFLED_SPLIT = 2
# How a shuffle buffer keeps its byte cap (``shuffle_buffer_bytes``): 2 since it hands out
# samples to get back under the cap when a larger sample came in for a smaller one, and N
# decode processes or loader workers share the cap; before (no field), neither.
BYTE_CAP_ORDER = 2
# How N batch streams (decode processes, loader workers) share the shuffle buffer: 1 since
# each holds 1/N of ``shuffle_buffer`` (and of ``shuffle_initial``), as of the byte cap;
# before (no field), each held all of it.
SHARED_BUFFER_ORDER = 1


@dataclass
class StreamPosition:
    """Where each batch stream of an epoch stands after its first ``batches`` batches.

    ``counts[w]``: batches stream ``w`` made; ``next``: the stream asked for the next batch;
    ``failed[w]``: stream ``w``'s samples that failed to decode before its last batch's end.
    Streams take turns (``processes=N``: the decode processes; one stream otherwise), so
    without failures the counts and turn follow from ``batches`` (``round_robin``). A
    stream that lost a batch to failed samples ends early, and the turns after it shift:
    then a resume needs them as they were.
    """

    batches: int
    counts: list[int]
    next: int
    failed: list[int]
    # 0, or: the epoch came short after ``lap`` batches (samples or shards were skipped)
    # and is being filled up with its first batches again (ShardReader._repeat_first_batches);
    # this position is ``batches`` into that repeat: batch ``lap + batches`` of the epoch, or
    # a whole number of repeats later; each repeat is ``lap_length`` batches (0: ``lap``; it
    # differs in a run that started from another rank's state, whose skip is not its own)
    lap: int = 0
    lap_length: int = 0

    @classmethod
    def round_robin(cls, batches: int, streams: int) -> StreamPosition:
        return cls(batches, [len(range(w, batches, streams)) for w in range(streams)],
                   batches % streams, [0] * streams)

    def is_round_robin(self) -> bool:
        rr = StreamPosition.round_robin(self.batches, len(self.counts))
        return self.counts == rr.counts and self.next == rr.next

    def fits(self, batches: int, streams: int) -> bool:
        """Whether this is a position ``batches`` into an epoch read as ``streams`` streams."""
        if len(self.counts) != streams:
            return False
        if self.lap:
            return batches > self.lap and repeat_batches(batches, self.lap, self.lap_length) == self.batches
        return self.batches == batches

    @classmethod
    def at_or_round_robin(cls, start: StreamPosition | None, batches: int, streams: int) -> StreamPosition:
        """``start`` where it fits ``batches`` and ``streams`` (a loaded state's), else the
        turns of an epoch where nothing failed (a state of another reading, or none). A
        position in an epoch's repeat (``lap``) is for ``ShardReader._read_epoch`` alone."""
        if start is not None and not start.lap and start.fits(batches, streams):
            return start
        return cls.round_robin(batches, streams)


def repeat_batches(batches: int, lap: int, length: int = 0) -> int:
    """How far into a repeat of its first batches an epoch that came short after ``lap``
    batches is, ``batches`` (> ``lap``) into it: every repeat is the same ``length``
    batches (0: ``lap``, as in a run that read the epoch from its start)."""
    return (batches - lap) % (length or lap)


@dataclass
class StreamLog:
    """The batch streams of one epoch as it is read: which stream made each batch, and
    each stream's failed samples where they changed (``ShardReader`` keeps one per epoch,
    for states saved behind the reader, as tf.data's read-ahead makes)."""

    start: StreamPosition  # where the reading began (a resume's position, or the epoch's start)
    order: list[int] = _field(default_factory=list)  # the stream of each batch since
    changes: list[tuple[int, int, int]] = _field(default_factory=list)  # (batch, stream, failed)
    lap: int = 0  # the batches the epoch came to, where it came short; then:
    lap_length: int = 0  # the batches of one whole repeat, once read, where not ``lap``
    repeats: list[StreamLog] = _field(default_factory=list)  # its first batches' repeats, as read
    _last: list[int] = _field(init=False, repr=False)  # each stream's latest failed count

    def __post_init__(self) -> None:
        self._last = list(self.start.failed)

    def note(self, batch: int, stream: int, failed: int) -> None:
        """Batch ``batch`` of the epoch came from ``stream``, after ``failed`` of its samples failed."""
        self.order.append(stream)
        if failed != self._last[stream]:
            self._last[stream] = failed
            self.changes.append((batch, stream, failed))

    def position(self, batches: int, streams: int) -> StreamPosition | None:
        """The position after the epoch's first ``batches`` batches under ``streams``
        streams, if this log holds it (also inside a repeat of the first batches)."""
        if len(self.start.counts) != streams:
            return None
        if not self.lap or batches <= self.lap:
            return self.at(batches) if self.start.batches <= batches else None
        within = repeat_batches(batches, self.lap, self.lap_length)
        log = next((log for log in self.repeats if log.holds(within)), None)
        at = log.at(within) if log is not None else StreamPosition.round_robin(within, streams)
        at.lap, at.lap_length = self.lap, self.lap_length
        return at

    def holds(self, batches: int) -> bool:
        """Whether the position after ``batches`` batches is in this log."""
        return self.start.batches <= batches <= self.start.batches + len(self.order)

    def repeat_from(self, batches: int) -> StreamLog | None:
        """A log of a repeat of the first batches that holds every position from
        ``batches`` into it to the repeat's end (``lap`` batches)."""
        length = self.lap_length or self.lap
        return next((log for log in self.repeats if log.holds(batches) and log.holds(length)), None)

    def new_repeat(self, start: StreamPosition) -> StreamLog:
        """Start logging a repeat of the first batches at ``start`` (the last two are kept:
        a resumed one from the middle, and the whole one after it)."""
        log = StreamLog(start)
        self.repeats = [*self.repeats[-1:], log]
        return log

    def at(self, batches: int) -> StreamPosition:
        """The position after the first ``batches`` batches (at least ``start.batches``)."""
        begin = self.start
        counts, failed, nxt = list(begin.counts), list(begin.failed), begin.next
        taken = self.order[: batches - begin.batches]
        for stream in taken:
            counts[stream] += 1
        if taken:
            nxt = (taken[-1] + 1) % len(counts)
        for batch, stream, n in self.changes:
            if batch < batches:
                failed[stream] = n
        return StreamPosition(batches, counts, nxt, failed)


def saved_position(state: dict[str, Any], batches: int, streams: int) -> StreamPosition:
    """The position of ``state`` (``batches`` in, under ``streams`` batch streams): its
    ``failed_before``, ``stream_batches`` and ``next_stream`` where it has them (the
    saving rank's own), else the turns of an epoch where nothing failed. With ``lap`` (an
    epoch that came short, saved while its first batches were repeated), the streams'
    position is the one in that repeat.

    Raises:
        ValueError: a field is malformed or does not fit ``batches`` and ``streams``.
    """
    lap, length = state.get("lap", 0), state.get("lap_length", 0)
    if not _whole([lap]) or lap and not lap < batches:
        raise ValueError(f"lap {lap!r} is not a whole number of batches below batches={batches}")
    if not _whole([length]) or length and not (lap and length <= lap):
        raise ValueError(f"lap_length {length!r} is not a whole number of batches up to lap={lap!r}")
    batches = repeat_batches(batches, lap, length) if lap else batches  # the position's, in the repeat
    position = StreamPosition.round_robin(batches, streams)
    position.lap, position.lap_length = lap, length
    failed = saved_extras(state)
    if failed:
        if len(failed) != streams:
            raise ValueError(f"failed_before has {len(failed)} entries for {streams} batch stream(s)")
        position.failed = failed
    if "stream_batches" in state or "next_stream" in state:
        counts, nxt = state.get("stream_batches"), state.get("next_stream")
        if (not isinstance(counts, list) or len(counts) != streams or not _whole(counts)
                or sum(counts) != batches or not isinstance(nxt, int) or not _whole([nxt])
                or nxt >= streams):
            raise ValueError(f"stream_batches {counts!r} and next_stream {nxt!r} do not fit "
                             f"{batches} batches in {streams} batch stream(s)")
        position.counts, position.next = list(counts), nxt
    return position


def own_position(reader: ShardReader, state: dict[str, Any], batches: int, streams: int) -> StreamPosition | None:
    """``state``'s position for ``reader`` to resume from ``batches`` in, under ``streams``
    streams: None at an epoch's start, or when another rank saved it (failed samples, and
    the turns they shifted, are a rank's own: that rank's state resumes this one by whole
    batches, in turn)."""
    if not batches or state.get("rank") != reader.rank:
        return None
    return saved_position(state, batches, streams)


def _whole(values: list[Any]) -> bool:
    return all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in values)


def check_state(reader: ShardReader, state: dict[str, Any], *, streams: bool = True) -> tuple[int, int, int]:
    """Validate ``state`` against ``reader``; return ``(epoch, batches, seed)``.

    ``rank`` may differ (every rank is at the same batch count, so one saved state serves
    all ranks); anything that changes the stream may not. ``streams=False`` leaves the
    batch streams to the caller, who learns them only when the epoch is read (PyTorch's
    loader workers).

    Raises:
        ValueError: not a shardpack reader state, another version, another shard list, or
            an option that shapes the order differs (the message names it).
    """
    if not isinstance(state, dict) or "epoch" not in state or "batches" not in state:
        raise ValueError("not a ShardReader state (expected the dict from reader.state_dict())")
    if state.get("version") not in _READABLE_VERSIONS:
        raise ValueError(
            f"reader state version {state.get('version')!r} is not supported "
            f"(this shardpack reads versions {_READABLE_VERSIONS[0]} to {STATE_VERSION})"
        )
    mine = _order_fields(reader)
    for field in _ORDER_FIELDS:  # first: a different split or option is the likelier mistake
        if field not in state and field not in _ORDER_FIELD_DEFAULTS:
            continue
        saved = state.get(field, _ORDER_FIELD_DEFAULTS.get(field))
        if saved != mine[field]:
            raise ValueError(
                f"the state was saved with {field}={saved!r} but this reader has "
                f"{field}={mine[field]!r}; create the reader with the same value to resume"
            )
    # states of shardpack 0.2.x have no shard_hashes: they are held to the listing only
    if state.get("shards") != shard_fingerprint(reader) or (
            state.get("shard_hashes") is not None and state["shard_hashes"] != content_fingerprint(reader)):
        raise ValueError(
            f"the state was saved for other shards of split {state.get('split')!r} (re-packed, "
            "or another source): it cannot be resumed exactly; start the epoch over with "
            "reader.set_epoch(epoch)"
        )
    epoch, batches = int(state["epoch"]), int(state["batches"])
    if epoch < 0 or not 0 <= batches <= len(reader):
        raise ValueError(f"state position epoch={epoch}, batches={batches} is out of range "
                         f"(this reader has {len(reader)} batches per epoch)")
    saved_position(state, batches, saved_streams(state) or 1)  # refused here if malformed
    epoch, batches = _canonical(reader, epoch, batches)
    if streams:
        check_streams(saved_streams(state), reader_streams(reader), batches)
    saved = saved_streams(state) or 1
    if batches and saved > 1 and not reader.shuffle and state.get("unshuffled_split") != UNSHUFFLED_SPLIT:
        raise ValueError(
            f"the state was saved inside an unshuffled epoch read as {saved} batch streams by an "
            "earlier shardpack, which split such an epoch among them in another way: the rest "
            "of that epoch cannot be resumed exactly; start it over with reader.set_epoch(epoch)")
    if (batches and reader.shuffle and reader.shuffle_buffer_bytes is not None
            and state.get("byte_cap") != BYTE_CAP_ORDER):
        raise ValueError(
            "the state was saved inside a shuffled epoch by an earlier shardpack, whose shuffle "
            "buffer kept its byte cap (shuffle_buffer_bytes) another way: the rest of that epoch "
            "cannot be resumed exactly; start it over with reader.set_epoch(epoch)")
    if (batches and reader.shuffle and saved > 1
            and state.get("shared_buffer") != SHARED_BUFFER_ORDER):
        raise ValueError(
            f"the state was saved inside a shuffled epoch read as {saved} batch streams by an "
            "earlier shardpack, whose streams each held the whole shuffle buffer (now they "
            "share it): the rest of that epoch cannot be resumed exactly; start it over with "
            "reader.set_epoch(epoch)")
    return epoch, batches, int(state["seed"])


def _canonical(reader: ShardReader, epoch: int, batches: int) -> tuple[int, int]:
    """``(epoch, batches)`` with a finished epoch written as the start of the next one."""
    if len(reader) and batches >= len(reader):
        return epoch + 1, 0
    return epoch, batches


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a state as JSON atomically (temp file + rename), so a crash leaves the old one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)  # a checkpoint folder the job has not made yet
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".shardpack-state-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read a state written by :func:`save_state`; None if there is none (a fresh start)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _make_keras_callback() -> type:
    import keras

    class ShardReaderCheckpoint(keras.callbacks.Callback):
        """Keras callback: save the reader's position to JSON every ``every`` batches.

        The position counts the batches *the model* has trained on (``tf.data`` reads
        ahead, so the reader itself is further on); a resumed reader's skipped batches
        count too. When an epoch completes, ``(next epoch, 0)`` is saved. The count is the
        reader's, not Keras' epoch's: with ``fit(steps_per_epoch=...)`` below the reader's
        length Keras goes on with the same pass of the dataset in its next epoch, and with
        ``ds.repeat()`` one Keras epoch may run from one pass into the next.
        Resume recipe: docs/READING.md.

        Under a distribution strategy, Keras' ``fit`` takes a batch from a pass of the
        dataset it then drops, before training and these callbacks begin: at
        ``on_train_begin`` that one pass is undone (``ShardReader._undo_last_pass``), so
        training reads the position it would have read (a loaded one, or the next epoch).

        Args:
            reader: the ShardReader behind the dataset (``ds.shard_reader``).
            path: JSON file to write (atomically).
            every: batches between saves.

        Raises:
            ValueError: the reader behind ``image_dataset_from_shards(batch_size=None)``:
                Keras' steps there are the user's own batches of single images, not the
                reader's, so no position it could count would be right.
        """

        def __init__(self, reader: ShardReader, path: str | os.PathLike[str], *,
                     every: int = 100) -> None:
            super().__init__()
            if reader._count_samples:
                raise ValueError(
                    "ShardReaderCheckpoint counts the reader's batches: a dataset made with "
                    "batch_size=None (single images, batched again after it) has no position "
                    "it can count; use batch_size=N and map per batch")
            self.reader, self.path, self.every = reader, path, max(1, int(every))
            self._epoch, self._position, self._trained, self._in_keras_epoch = reader.epoch, 0, 0, 0

        def on_train_begin(self, logs: Any = None) -> None:
            if getattr(self.model, "_distribute_strategy", None) is not None:
                self.reader._undo_last_pass()  # Keras' look at one batch (its very condition)
            # the epoch the dataset's next pass reads, and batches of it a resume skips
            self._epoch, self._position = self.reader.epoch, self.reader._resume_batches
            self._trained = 0

        def on_train_end(self, logs: Any = None) -> None:
            self.reader._mark()  # a later fit's look is undone back to here, not before

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._in_keras_epoch = 0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            # ``batch``: the Keras epoch's step (the last of them with steps_per_execution;
            # an epoch's last group of steps is reported whole even where it holds fewer)
            steps = (self.params or {}).get("steps")
            if steps:
                batch = min(batch, steps - 1)
            step = batch + 1 - self._in_keras_epoch
            self._in_keras_epoch = batch + 1
            self._position += step
            length = len(self.reader)
            while length and self._position >= length:  # the reader's pass is done
                self._epoch, self._position = self._epoch + 1, self._position - length
            before, self._trained = self._trained, self._trained + step
            if self._trained // self.every > before // self.every:
                self._save()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self._save()

        def _save(self) -> None:
            save_state(make_state(self.reader, epoch=self._epoch, batches=self._position), self.path)

    return ShardReaderCheckpoint


def __getattr__(name: str) -> Any:
    # The Keras callback subclasses keras.callbacks.Callback: build it on first use only,
    # so importing this module never imports Keras / TensorFlow.
    if name == "ShardReaderCheckpoint":
        cls = _make_keras_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
