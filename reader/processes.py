"""Decode processes: one reader's epoch decoded by several processes, each with its own GIL.

Why: in one process every image costs Python time under one GIL (the thread that reads and
shuffles the tars, and each decode thread's calls into libjpeg-turbo and OpenCV). On a
16-core machine that capped ``ShardReader`` at 0.6-0.8x the decode limit (docs/SPEED.md, "On 16
cores"), where PyTorch's loader processes reached 0.84x. ``ShardReader(processes=N)``
does the same for numpy and tf.data, without PyTorch.

How:
- Each process is a fresh interpreter started with ``subprocess``: no fork of a process
  that holds TensorFlow's threads, and no re-import of the user's ``__main__`` (which
  ``multiprocessing``'s spawn does, and which breaks scripts without a main guard). It gets
  the pickled reader with every epoch (so options changed since apply) and reads one share
  of it, batches ``w, w + N, ...``
  (``ShardReader._worker_epoch_batches``: the split PyTorch's loader workers use), decoding
  on ``num_workers // N`` threads.
- Batches are decoded straight into shared-memory slots that the main process made; a
  pipe of its own (not stdout, where an interpreter's start-up may print) carries only the
  slot number, the labels and the skip counts. The main process
  yields a view of the slot and gives the slot back once nothing holds the batch (the
  ``BatchBuffers`` rule), so kept batches are never overwritten; a process short of free
  slots is given a new one, and once a caller holds ``_HELD_MAX`` of a process's batches,
  further ones are handed out as copies.
- The main process takes one batch from each process in turn, as PyTorch's loader does, so
  an epoch is the stream of ``ShardIterableDataset`` under a ``DataLoader`` with N workers
  (with ``shuffle=False``, the manifest order: see ``distributed.worker_pieces``).
- An error in a process (``on_error="raise"``, a damaged shard) is raised by ``next()`` in
  the main process at that process's turn; a process that dies is reported as such, and
  one found dead when an epoch starts is replaced (nothing of an epoch was lost).
  Leaving an epoch early cancels it in every process. The processes serve every epoch and
  end with ``ShardReader.close()``, when the reader is garbage-collected, or at exit.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from packer.errors import ShardReadError

from .batches import aligned_empty
from .policy import MAX_MESSAGES, ErrorPolicy
from .state import StreamPosition

if TYPE_CHECKING:
    from .shard_reader import ShardReader

__all__ = ["DecodeProcesses", "worker_main", "shared_memory_free", "shared_memory_size", "starting_bytes", "batch_bytes",
           "processes_that_fit"]

_LENGTH = struct.Struct("<Q")
# slots each process starts with beyond the blocks its decode threads fill: the batch on
# its way and the batch the caller holds; more are made when a caller keeps batches
_EXTRA_SLOTS = 2
_SHM_DIR = "/dev/shm"
# this process's pools whose processes run, with the shared memory they started with
# (DecodeProcesses.reserved): what a new pick must leave them (processes_that_fit)
_LIVE_POOLS: weakref.WeakSet[DecodeProcesses] = weakref.WeakSet()
# batches of one process a caller may hold as views of shared memory; past that (a caller
# keeping the epoch, `list(reader)`), batches are handed out as copies and the slot reused:
# each slot is a mapping and a file descriptor (mmap keeps one), so they must stay few
_HELD_MAX = 8


def _send(stream: IO[bytes], lock: threading.Lock, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        stream.write(_LENGTH.pack(len(data)))
        stream.write(data)
        stream.flush()


def _recv(stream: IO[bytes]) -> Any:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (shardpack's errors do), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _ProcessDied(RuntimeError):
    """A decode process ended in the middle of an epoch."""


class _Slot:
    """One batch-sized block of shared memory and the byte array over it.

    The mapping stays while anything views it: the array's base is the block's memoryview,
    which keeps the mmap alive. The block's file descriptor is closed at once (the mapping
    does not need it), so holding many batches does not use up the process's descriptors.
    These reach into ``SharedMemory``'s private ``_fd``/``_buf``/``_mmap``: its public
    ``close()`` would unmap the memory under batches a caller still holds.
    """

    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        self.shm = shm
        self.array = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
        fd = getattr(shm, "_fd", -1)
        if fd >= 0:
            os.close(fd)
            shm._fd = -1  # type: ignore[attr-defined]

    def view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self.array[:nbytes].view(dtype).reshape(shape)

    def free_here(self) -> bool:
        # 2 references when unused: the attribute's, and getrefcount's argument; every view
        # of the slot (a batch, a slice of one, a tensor sharing its memory) adds one
        return sys.getrefcount(self.array) == 2

    def close(self, unlink: bool) -> None:
        """Let go of the block: in the process that made it, remove its name; unmap it now
        if nothing views it, else when the last batch of it goes."""
        held = not self.free_here()
        del self.array
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
        if held and hasattr(self.shm, "_mmap"):
            self.shm._buf = self.shm._mmap = None  # type: ignore[attr-defined]
        self.shm.close()


# ---------------------------------------------------------------- the main process's side


class _Process:
    """One decode process, as the main process sees it."""

    def __init__(self, index: int, command: list[str], env: dict[str, str]) -> None:
        self.index = index
        # Messages come back on a pipe of their own, whose descriptor the command's {fd}
        # names: on stdout, anything printed as the interpreter starts (a sitecustomize, an
        # import-time banner) was read as a message length (a hang, or a MemoryError).
        read_end, write_end = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [part.replace("{fd}", str(write_end)) for part in command], stdin=subprocess.PIPE,
                env=env, start_new_session=True, pass_fds=(write_end,))
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        assert self.popen.stdin is not None
        self.stdin, self.stdout = self.popen.stdin, os.fdopen(read_end, "rb")
        self.lock = threading.Lock()
        self.slots: dict[int, _Slot] = {}
        self.held: set[int] = set()  # slots whose batch the main process handed out
        self.returned = 0  # slots given to the process so far (new, or given back)

    def send(self, message: Any) -> None:
        try:
            _send(self.stdin, self.lock, message)
        except OSError:  # a broken pipe: the process is gone
            raise self._died() from None

    def recv(self) -> Any:
        try:
            return _recv(self.stdout)
        except (EOFError, OSError):
            raise self._died() from None

    def _died(self) -> _ProcessDied:
        code = self.popen.wait()
        if code == -signal.SIGBUS:  # a write into a shared-memory slot /dev/shm had no room for
            return _ProcessDied(
                f"shardpack decode process {self.index} ran out of shared memory (/dev/shm is "
                "full; SIGBUS) in the middle of an epoch: give the container more (docker run "
                '--shm-size=2g), or use fewer processes, a smaller batch_size or dtype="uint8"')
        return _ProcessDied(
            f"shardpack decode process {self.index} exited (code {code}) in the middle of "
            "an epoch: killed, out of memory, or crashed (its error is above in stderr)")

    def new_slot(self, nbytes: int) -> None:
        _check_shared_memory(nbytes)
        shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
        sid = len(self.slots)
        self.slots[sid] = _Slot(shm)
        self.send(("slot", sid, shm.name))
        self.returned += 1

    def give_back(self, sid: int) -> None:
        self.held.discard(sid)
        self.send(("free", sid))
        self.returned += 1

    def give_back_unused(self) -> int:
        """Tell the process about the slots it handed out that nobody holds now."""
        unused = [sid for sid in self.held if self.slots[sid].free_here()]
        for sid in unused:
            self.give_back(sid)
        return len(unused)


def _shm_stat() -> os.statvfs_result | None:
    """/dev/shm's file system, where decode processes' batches live; None where there is no
    such folder (macOS: the system's own limits apply)."""
    try:
        return os.statvfs(_SHM_DIR)
    except OSError:
        return None


def shared_memory_free() -> int | None:
    """Bytes free in /dev/shm now (None: no /dev/shm)."""
    stat = _shm_stat()
    return None if stat is None else stat.f_bavail * stat.f_frsize


def shared_memory_size() -> int | None:
    """Bytes /dev/shm holds in all (its size, not what is free now: the same on every
    machine of a kind, so that ranks of one job pick alike); None where there is none."""
    stat = _shm_stat()
    return None if stat is None else stat.f_blocks * stat.f_frsize


def _starting_slots(threads: int, batch_size: int) -> int:
    """Shared-memory batches a decode process of ``threads`` threads starts with: one per
    block its threads fill (``batches.in_flight_plan``), and ``_EXTRA_SLOTS``."""
    from .batches import in_flight_plan

    _, blocks = in_flight_plan(threads, batch_size)
    return blocks + _EXTRA_SLOTS


def starting_bytes(processes: int, threads: int, batch_size: int, slot_bytes: int) -> int:
    """Shared memory ``processes`` decode processes of ``threads`` threads each take as they
    start (``_starting_slots`` each, one batch of ``slot_bytes`` a slot)."""
    return processes * _starting_slots(threads, batch_size) * slot_bytes


def batch_bytes(reader: ShardReader) -> int:
    """Bytes of one of ``reader``'s batches: the size of a shared-memory slot."""
    options = reader.batch_options
    shape = (options.batch_size, *options.image_shape(reader.decode_options.shape))
    return int(np.prod(shape)) * np.dtype(options.dtype).itemsize


def processes_that_fit(wanted: int, threads: int, reader: ShardReader, *, share: int = 1) -> int:
    """Of ``wanted`` decode processes sharing ``threads`` decode threads, as many as /dev/shm
    holds twice over as they start (``starting_bytes``; the rest is room for the batches a
    caller keeps, which take more slots); fewer than 2 is none. Docker gives a container
    64 MB of /dev/shm, less than one process's float32 batches of 64 x 224 x 224.

    What counts: /dev/shm's size, not its free bytes, so that the ranks of a job on machines
    of one kind pick alike whenever each makes its reader (a state saved by rank 0 resumes
    them all; the free bytes are checked as the processes start), divided among ``share``
    processes of this machine (torchrun's local ranks), less what this process's running
    pools hold."""
    size = shared_memory_size()
    if size is None:
        return wanted
    free = max(0, size // max(1, share) - sum(pool.reserved for pool in list(_LIVE_POOLS) if pool.alive))
    count, slot, batch_size = wanted, batch_bytes(reader), reader.batch_options.batch_size
    while count >= 2 and 2 * starting_bytes(count, max(1, threads // count), batch_size, slot) > free:
        count -= 1
    return count if count >= 2 else 0


def _check_shared_memory(nbytes: int) -> None:
    """Refuse, with the remedy, what would fill /dev/shm: writing past its end kills the
    process with SIGBUS (Docker gives containers 64 MB of it by default)."""
    free = shared_memory_free()
    if free is not None and free < nbytes:
        raise RuntimeError(
            f"shared memory ({_SHM_DIR}) has {free / 1e6:.0f} MB free, and a decode process "
            f"needs another batch of {nbytes / 1e6:.0f} MB: give the container more "
            "(docker run --shm-size=2g), or use fewer processes, a smaller batch_size or "
            'dtype="uint8" (a quarter of float32)'
        )


def _shut_down(processes: list[_Process], owner_pid: int) -> None:
    if os.getpid() != owner_pid:
        # a forked copy (os.fork, a DataLoader worker) letting go of the pool: the
        # processes, pipes and shared memory are the parent's, still in use there
        processes.clear()
        return
    try:
        for proc in processes:
            try:
                proc.send(("stop",))
                proc.stdin.close()
            except (OSError, ValueError, _ProcessDied):
                pass
    finally:  # a second Ctrl-C here still ends them all and frees their memory
        for proc in processes:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            proc.stdout.close()
            for slot in proc.slots.values():
                slot.close(unlink=True)
        processes.clear()


class DecodeProcesses:
    """``processes`` decode processes serving one reader's epochs (module docstring).

    One epoch at a time: an epoch started while another is unfinished (an iterator still
    held, perhaps suspended on another thread, as tf.data's generator threads do) takes the
    processes over; the old iterator raises at its next step, rather than end short in
    silence. Pipe traffic is under one lock, so two never read the same pipe at once.
    """

    def __init__(self, reader: ShardReader, processes: int) -> None:
        self.count = int(processes)
        self.threads = max(1, reader.num_workers // self.count)
        # a weak reference: the reader owns this pool, and `del reader` ends the processes
        self._reader = weakref.ref(reader)
        self._procs: list[_Process] = []
        self.slot_bytes = batch_bytes(reader)
        self.reserved = 0  # shared memory its processes started with (while they run)
        self._io = threading.RLock()
        self._owner: object | None = None  # the epoch now reading; _CLOSED after close()
        self._live: list[bool] = []
        self._failed_shards: set[str] = set()  # shards this epoch skipped, counted once
        self._note: Callable[[int, int], None] | None = None  # this epoch's, see epoch()
        self._quiet = False  # this epoch's: its skips are not counted or said
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _shut_down, self._procs, self._pid)

    @property
    def alive(self) -> bool:
        """False once closed (by ``close()`` or after a process died), or in a forked copy
        of the process that made it (whose processes are the parent's): start a new pool."""
        return self._finalizer.alive and os.getpid() == self._pid

    def _reader_now(self) -> ShardReader:
        reader = self._reader()
        if reader is None:
            raise RuntimeError("the ShardReader of these decode processes is gone")
        return reader

    def _start(self) -> None:
        reader = self._reader_now()
        root = str(Path(__file__).resolve().parent.parent)
        boot = (f"import sys; sys.path.insert(0, {root!r}); from reader.processes import worker_main; "
                "worker_main({fd})")
        slots = _starting_slots(self.threads, reader.batch_options.batch_size)
        self.reserved = self.count * slots * self.slot_bytes
        _check_shared_memory(self.reserved)
        _LIVE_POOLS.add(self)
        try:
            for index in range(self.count):
                proc = _Process(index, [sys.executable, "-c", boot], dict(os.environ))
                self._procs.append(proc)
                proc.send(("init", self.threads))
                for _ in range(slots):
                    proc.new_slot(self.slot_bytes)
        except BaseException:
            self.close()  # no half-started set: the next epoch starts a whole one
            raise

    def _pickled_reader(self) -> bytes:
        reader = self._reader_now()
        reader.shard_counts()  # manifest-less or a class subset: scanned once, here, and sent
        try:
            return pickle.dumps(reader, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"processes= sends the reader to its decode processes, and it "
                            f"cannot be pickled: {exc}") from exc

    def close(self) -> None:
        """End the processes and free their shared memory (idempotent); an epoch being read
        raises at its next step. In a forked copy, only lets go of it (without the lock: a
        thread of the parent may have held it at the fork, and it is nobody's here)."""
        if os.getpid() != self._pid:
            self._owner = _CLOSED
            self._finalizer()
            return
        with self._io:
            self._owner = _CLOSED
            self._finalizer()
            _LIVE_POOLS.discard(self)

    def epoch(self, epoch: int, skip: int, start: StreamPosition | None = None, *,
              note: Callable[[int, int], None] | None = None, quiet: bool = False) -> Generator[Any, None, None]:
        """The batches of ``epoch`` after its first ``skip``, one process at a time in turn;
        ``start``: where each process's stream stood there (its batches and failed samples,
        and whose turn it is), when failed samples made the turns uneven; ``note(process,
        failed)`` hears, before each batch, which process made it after how many of its
        samples failed; ``quiet``: what the processes skip is not counted or said here
        (see ShardReader._repeat_first_batches)."""
        start = StreamPosition.at_or_round_robin(start, skip, self.count)
        me = object()
        with self._io:
            self._cancel_epoch()
            blob = self._pickled_reader()  # each epoch: options changed since (on_error...) apply
            if any(proc.popen.poll() is not None for proc in self._procs):
                # one ended since the last epoch (the OOM killer while the caller validated
                # or saved a checkpoint): no epoch loses anything, so a new set starts
                _shut_down(self._procs, self._pid)
            if not self._procs:
                self._start()
            self._failed_shards = set()
            self._note, self._quiet = note, quiet  # after _cancel_epoch: the last epoch's were its own
            try:
                for proc in self._procs:
                    proc.send(("epoch", epoch, proc.index, self.count, skip, blob,
                               start.counts[proc.index], start.failed[proc.index]))
            except BaseException:  # a message half sent: see _step
                self.close()
                raise
            self._owner, self._live = me, [True] * self.count
        turn = start.next
        try:
            while True:
                with self._io:
                    batch = self._step(me, turn)
                if batch is _DONE:
                    return
                if batch is not None:
                    yield batch
                turn = (turn + 1) % self.count
        finally:
            with self._io:
                if self._owner is me:
                    self._cancel_epoch()

    def _step(self, me: object, turn: int) -> Any:
        """The next batch of process ``turn`` (None if it has ended), or _DONE."""
        if self._owner is _CLOSED:
            raise RuntimeError("the reader was closed while this epoch was being read")
        if self._owner is not me:
            raise RuntimeError(
                "another epoch of this reader started before this one finished: with "
                "processes=, a reader reads one epoch at a time (two readers read two)")
        if not any(self._live):
            return _DONE
        if not self._live[turn]:
            return None
        proc = self._procs[turn]
        try:
            message = self._next_message(proc)
            if message[0] == "batch":
                return self._batch(proc, *message[1:-1])
        except BaseException:
            # A process died, or a message was half read or sent (Ctrl-C inside a pipe
            # call) and the pipe is out of step: end them all, so the next epoch starts a
            # new set rather than read a length out of the middle of a message (a hang).
            self.close()
            raise
        self._live[turn] = False
        if message[0] == "error":
            raise message[1]
        return None

    def _next_message(self, proc: _Process) -> tuple[Any, ...]:
        """The process's next batch, end or error; its skip counts (every message carries
        them) are added up here, and requests for slots answered."""
        while True:
            message = proc.recv()
            self._count_skips(message[-1])
            if message[0] != "need":
                return message
            if proc.returned > message[1]:
                continue  # slots given back since it asked are on their way to it
            if not proc.give_back_unused():
                proc.new_slot(self.slot_bytes)

    def _batch(self, proc: _Process, sid: int, shape: tuple[int, ...], dtype: str, labels: Any,
               failed: int) -> Any:
        if self._note is not None:  # before the batch is yielded
            self._note(proc.index, failed)
        for other in self._procs:
            other.give_back_unused()
        x = proc.slots[sid].view(shape, np.dtype(dtype))
        if len(proc.held) < _HELD_MAX:
            proc.held.add(sid)
        else:  # the caller keeps batches: a copy, and the slot goes straight back
            x, view = aligned_empty(x.shape, x.dtype), x
            x[...] = view
            del view
            proc.give_back(sid)
        return x if labels is None else (x, labels)

    def _count_skips(self, skips: tuple[int, list[ShardReadError], list[str], list[str]]) -> None:
        """Add a process's skips to the reader's policy, and give its warnings here, where
        the caller's warning filters (and ``pytest.warns``) are."""
        reader = self._reader()
        if reader is None or self._quiet:
            return
        policy = reader.policy
        policy.skipped_samples += skips[0]
        policy.messages.extend(skips[2][: max(0, MAX_MESSAGES - len(policy.messages))])
        for message in skips[3]:
            warnings.warn(f"skipped: {message}", RuntimeWarning, stacklevel=2)
        for exc in skips[1]:  # a shard split between processes fails in each: once here
            shard = getattr(exc, "shard", None) or str(exc)
            if shard not in self._failed_shards:
                self._failed_shards.add(shard)
                policy.shard_failed(exc)

    def _cancel_epoch(self) -> None:
        """Stop the epoch being read (if any) in the processes still reading it, and take
        what they had sent, so the next starts clean; if one cannot be reached, end them
        all (the next epoch starts a new set)."""
        procs = [p for p in self._procs if p.index < len(self._live) and self._live[p.index]]
        self._live = []
        if self._owner is not _CLOSED:
            self._owner = None
        if not self.alive:
            return
        try:
            for proc in procs:
                proc.send(("cancel",))
            for proc in procs:
                while True:
                    message = self._next_message(proc)
                    if message[0] == "batch":
                        proc.give_back(message[1])
                    else:
                        break
        except (OSError, _ProcessDied):
            self.close()
        except BaseException:  # interrupted while draining: what is left would start the next epoch
            self.close()
            raise


_DONE = object()
_CLOSED = object()


# ---------------------------------------------------------------- the decode process's side


class _Cancelled(Exception):
    pass


class _SlotBuffers:
    """The decode process's batch arrays: the shared-memory slots the main process gave it.

    Same rule as ``BatchBuffers``: a slot is reused once nothing here holds it and the main
    process has given it back; when none is, ask the main process for one and wait.
    """

    def __init__(self, side: _DecodeSide) -> None:
        self.side = side

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        side = self.side
        nbytes = int(np.prod(shape)) * dtype.itemsize
        asked = False
        while True:
            side.handle_pending()
            for sid, slot in side.slots.items():
                if sid not in side.handed and slot.shm.size >= nbytes and slot.free_here():
                    return slot.view(shape, dtype)
            if not asked:  # with how many slots it was given so far, to answer only once
                side.send(("need", side.returned, side.skips()))
                asked = True
            side.handle(side.inbox.get())

    def slot_of(self, x: np.ndarray) -> int | None:
        for sid, slot in self.side.slots.items():
            if x.base is slot.array and x.__array_interface__["data"][0] == slot.array.ctypes.data:
                return sid
        return None


class _DecodeSide:
    """The decode process: its reader, its slots, and the messages from the main process."""

    def __init__(self, threads: int, channel: IO[bytes], commands: IO[bytes]) -> None:
        self.threads = threads
        self.reader: ShardReader  # each epoch's, sent with it
        self.channel = channel
        self.lock = threading.Lock()
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.slots: dict[int, _Slot] = {}
        self.handed: set[int] = set()  # slots whose batch is with the main process
        self.returned = 0  # slots the main process gave (new, or given back) so far
        self.cancelled = False
        self.buffers = _SlotBuffers(self)
        self.failed = 0  # samples of this epoch's stream that failed before the last batch's end
        self._sent = (0, 0)
        threading.Thread(target=self._listen, args=(commands,), daemon=True).start()

    def _listen(self, commands: IO[bytes]) -> None:
        while True:
            try:
                message = _recv(commands)
            except (EOFError, OSError):
                self.inbox.put(("stop",))
                return
            self.inbox.put(message)

    def send(self, message: Any) -> None:
        _send(self.channel, self.lock, message)

    def skips(self) -> tuple[int, list[ShardReadError], list[str], list[str]]:
        """What the policy skipped since the last message (the main process adds it up):
        samples skipped, shards cut short (the errors, which the main process counts once
        per shard), sample messages, and the warnings it owes."""
        policy = self.reader.policy
        assert isinstance(policy, _ProcessPolicy)
        samples, messages = self._sent
        self._sent = (policy.skipped_samples, len(policy.messages))
        owed, policy.owed = policy.owed, []
        failed, policy.failed_shards = policy.failed_shards, []
        return (policy.skipped_samples - samples, failed, policy.messages[messages:], owed)

    def handle(self, message: tuple[Any, ...]) -> None:
        """Take one slot message; a cancel or stop ends the epoch being read."""
        kind = message[0]
        if kind == "slot":
            self.slots[message[1]] = _Slot(_attach(message[2]))
            self.returned += 1
        elif kind == "free":
            self.handed.discard(message[1])
            self.returned += 1
        elif kind in ("cancel", "stop"):
            if kind == "stop":
                self.inbox.put(message)  # seen again by serve(), after the epoch ends
            if not self.cancelled:
                self.cancelled = True
                raise _Cancelled

    def handle_pending(self) -> None:
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.handle(message)

    def serve(self) -> None:
        while True:
            message = self.inbox.get()
            if message[0] == "stop":
                return
            if message[0] == "epoch":
                self.run_epoch(*message[1:])
            elif message[0] in ("slot", "free"):
                self.handle(message)
            # a cancel that crossed this process's "end" on the way: nothing to stop

    def run_epoch(self, epoch: int, worker: int, workers: int, skip: int, blob: bytes, own_skip: int,
                  extra: int) -> None:
        self.cancelled = False
        self.reader = _process_reader(blob, self.threads)
        self._sent = (0, 0)
        self.failed = extra

        def note(failed: int) -> None:
            self.failed = failed

        try:
            batches = self.reader._worker_epoch_batches(
                epoch, worker=worker, workers=workers, skip=skip, buffers=self.buffers,  # type: ignore[arg-type]
                own_skip=own_skip, skip_extra=extra, on_extra=note)
            for batch in batches:
                self.handle_pending()
                x, labels = batch if isinstance(batch, tuple) else (batch, None)
                sid = self.buffers.slot_of(x)
                if sid is None:  # a batch re-cut after failed samples: copy it into a slot
                    sid = self.buffers.slot_of(self.buffers.take(x.shape, x.dtype))
                    assert sid is not None
                    self.slots[sid].view(x.shape, x.dtype)[...] = x
                self.handed.add(sid)
                self.send(("batch", sid, x.shape, x.dtype.str, labels, self.failed, self.skips()))
                del batch, x, labels  # the slot is free here again once the main process says so
            self.send(("end", self.skips()))
        except _Cancelled:
            self.send(("end", self.skips()))
        except Exception as exc:
            self.send(("error", _portable(exc), self.skips()))


@dataclass
class _ProcessPolicy(ErrorPolicy):
    """A decode process's policy: it counts and keeps messages as the reader's does, but
    owes its warnings to the main process instead of printing them on its own stderr."""

    owed: list[str] = field(default_factory=list)
    failed_shards: list[ShardReadError] = field(default_factory=list)

    def _warn(self, message: str) -> None:
        self.owed.append(message)

    def shard_failed(self, exc: ShardReadError) -> None:
        """Raise, or hand the error to the main process, which counts and reports each
        shard once (a shard split between processes fails in each of them)."""
        if self.on_shard_error == "raise":
            raise exc
        self.failed_shards.append(_portable(exc))  # type: ignore[arg-type]  # as sent


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach to the main process's block without this process's resource tracker
    unlinking it at exit (Python < 3.13 registers attached blocks too)."""
    shm = shared_memory.SharedMemory(name=name)
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
    return shm


def _process_reader(blob: bytes, threads: int) -> ShardReader:
    """The main process's reader as this process reads with it: its threads, no processes
    of its own, and a policy that counts only this process's skips (the main process adds
    them to what it had)."""
    reader: ShardReader = pickle.loads(blob)
    reader.num_workers = threads
    reader.processes = 0
    reader.policy = _ProcessPolicy(on_error=reader.policy.on_error,
                                   on_shard_error=reader.policy.on_shard_error)
    return reader


def worker_main(fd: int) -> None:
    """Entry point of a decode process (started by DecodeProcesses): messages go out on
    ``fd``, a pipe of their own."""
    channel = os.fdopen(fd, "wb")
    os.dup2(2, 1)  # its prints go to stderr, beside its errors, not into the caller's stdout
    commands = os.fdopen(0, "rb")
    kind, threads = _recv(commands)
    assert kind == "init"
    try:
        _DecodeSide(threads, channel, commands).serve()
    except (BrokenPipeError, EOFError):  # the main process is gone: nobody to tell
        pass
