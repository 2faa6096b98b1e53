"""Prototype, for the benchmark only: the threads' epoch, with only the decoding moved out.

Not part of the reader's API. ``scripts/bench_cores.py --contenders shardpack_ordered``
runs it; docs/SPEED.md ("On 16 cores") has what it measured and why it stayed a prototype.

The idea: on many cores one process's decode threads stop at 0.5-0.7x the decode limit
(every image costs Python time under one GIL). ``processes=`` (reader.processes) gets past
that by giving each process a share of the epoch to read and decode, so its shuffled
order depends on how many there are. Here the main process reads, shuffles and batches the
samples exactly as for its own threads -- the same epoch, batch for batch and pixel for
pixel, whatever the number of processes -- and only each decode task (a chunk of a batch's
compressed samples) goes to one of ``count`` single-threaded decode processes, which decode
it straight into the batch's shared memory.

What it showed on 16 cores (2026-11-26, docs/SPEED.md "On 16 cores"): on shards packed at
224x224, 15 processes matched ``processes=8`` (1.06-1.72x the threaded limit against
0.76-1.91x); on the original JPEGs it did no better than threads (0.49-0.78x against
0.51-0.74x; ``processes=8`` 0.83-1.47x), whichever of three ways it handed out the tasks.
The main process handles every compressed byte (read, pickle, pipe). ``by_reference=True``
sends local samples as (file, offset) and the processes read them from the shard
themselves: on 16 cores (2026-11-27, runs 12-13) 0.69-0.89x on the originals against
0.66-0.82x with the bytes piped, so the pipes were not the limit; its single-threaded
decode processes are.

How:
- ``SharedBatchBuffers`` is ``BatchBuffers`` with shared-memory owners, so a batch the
  caller holds is never overwritten, and a block is reused once nobody holds it.
- ``DecodePool`` is an ``Executor`` for ``batches.decode_batches``: ``submit`` queues the
  task (the block's name and offset, the rows, the compressed samples); a process is sent
  the next one when it answers, at most ``_DEPTH`` ahead; one thread reads the answers.
- Decode processes are fresh interpreters (``processes._Process``). A process that dies
  fails the tasks it held, and ``OrderedReader`` starts a new pool for the next epoch.
"""

from __future__ import annotations

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
import io
import os
import pickle
import queue
import selectors
import sys
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packer.errors import ShardReadError  # noqa: E402
from packer.format import split_member_name  # noqa: E402
from reader import ShardReader  # noqa: E402
from reader.batches import BatchBuffers, _decode_into, decode_batches, in_flight_plan  # noqa: E402
from reader.processes import (  # noqa: E402
    _LENGTH,
    _attach,
    _check_shared_memory,
    _portable,
    _Process,
    _ProcessDied,
    _recv,
    _send,
)
from reader.samples import BLOCK, tar_members  # noqa: E402

__all__ = ["DecodePool", "OrderedReader", "SharedBatchBuffers", "serve"]

# blocks a decode process keeps mapped: the main process's pool holds a few (BatchBuffers'
# keep), so this is only ever reached after blocks were replaced
_MAPPED_MAX = 16


def _let_go(shm: shared_memory.SharedMemory) -> None:
    """Remove the block's name and close it here; arrays over it keep the mapping (through
    their memoryview) until the last of them goes."""
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    shm._buf = shm._mmap = None  # type: ignore[attr-defined]  # close() would unmap them
    shm.close()


def _let_go_all(blocks: dict[int, shared_memory.SharedMemory], owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked copy's blocks are the parent's
        for shm in blocks.values():
            _let_go(shm)
    blocks.clear()


def _owner_gone(blocks: dict[int, shared_memory.SharedMemory], address: int, owner_pid: int) -> None:
    """The last array over a block went: let the block go (kept by the pool or made for
    one batch while all kept ones were held)."""
    shm = blocks.pop(address, None)
    if shm is not None and os.getpid() == owner_pid:
        _let_go(shm)


class SharedBatchBuffers(BatchBuffers):
    """``BatchBuffers`` whose arrays are shared memory that decode processes write into."""

    def __init__(self, keep: int) -> None:
        super().__init__(keep)
        self._blocks: dict[int, shared_memory.SharedMemory] = {}  # owner address -> block
        self._finalizer = weakref.finalize(self, _let_go_all, self._blocks, os.getpid())

    def _new_owner(self, nbytes: int) -> np.ndarray:
        _check_shared_memory(nbytes)
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        owner = np.ndarray((nbytes,), dtype=np.uint8, buffer=shm.buf)
        self._blocks[owner.ctypes.data] = shm
        weakref.finalize(owner, _owner_gone, self._blocks, owner.ctypes.data, os.getpid())
        return owner

    def locate(self, x: np.ndarray) -> tuple[str, int]:
        """The name of the block ``x`` is in, and ``x``'s byte offset in it."""
        owner = x.base
        if not isinstance(owner, np.ndarray) or owner.ctypes.data not in self._blocks:
            raise ValueError("not an array of this pool's shared memory")
        return self._blocks[owner.ctypes.data].name, x.ctypes.data - owner.ctypes.data

    def close(self) -> None:
        """Remove every block's name (batches still held keep their memory until they go)."""
        self._finalizer()


# tasks sent to a decode process before it answers: the one it decodes and the next, so
# that it never waits for the main process between two
_DEPTH = 2


def _send_pickled(proc: _Process, data: bytes) -> None:
    """``processes._send`` of a message pickled already (outside the pool's lock)."""
    try:
        with proc.lock:
            proc.stdin.write(_LENGTH.pack(len(data)))
            proc.stdin.write(data)
            proc.stdin.flush()
    except OSError:  # a broken pipe: the process is gone
        raise proc._died() from None


def _complete_messages(data: bytearray) -> Iterator[Any]:
    """The whole messages at the start of ``data`` (``processes._send``'s framing), taken
    out of it; a partial one stays for the next read."""
    while len(data) >= _LENGTH.size:
        (size,) = _LENGTH.unpack_from(data)
        if len(data) < _LENGTH.size + size:
            return
        message = pickle.loads(data[_LENGTH.size : _LENGTH.size + size])
        del data[: _LENGTH.size + size]
        yield message


# a task's compressed samples (8 ImageNet-size JPEGs are about 400 KB) in one write, where
# a pipe holds 64 KB by default: each further 64 KB waited for the process to read
_PIPE_BYTES = 1 << 20


def _widen_pipe(fd: int) -> None:
    """Let the pipe hold ``_PIPE_BYTES`` (Linux; the system's cap, 1 MB by default, or as
    much as it allows; elsewhere as it is)."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setsize is None:
        return
    for size in (_PIPE_BYTES, _PIPE_BYTES // 4):
        try:
            fcntl.fcntl(fd, setsize, size)
            return
        except OSError:
            continue


def _stop(processes: list[_Process], owner_pid: int) -> None:
    if os.getpid() != owner_pid:
        processes.clear()
        return
    for proc in processes:
        try:
            _send(proc.stdin, proc.lock, ("stop",))
            proc.stdin.close()
        except (OSError, ValueError):
            pass
    for proc in processes:
        try:
            proc.popen.wait(timeout=5)
        except Exception:
            proc.popen.kill()
            proc.popen.wait()
    processes.clear()


@dataclass
class _Worker:
    """A decode process and the tasks it was sent, in the order it answers them (each
    with its array, so the block stays busy until the process is done writing)."""

    proc: _Process
    pending: deque[tuple[Future[Any], np.ndarray]] = field(default_factory=deque)
    dead: BaseException | None = None


class DecodePool(Executor):
    """``count`` decode processes behind an ``Executor`` that ``decode_batches`` submits its
    ``_decode_into`` tasks to (module docstring).

    ``submit`` queues the task and ``_dispatch`` sends queued tasks to processes with
    fewer than ``_DEPTH`` (from the caller's thread, or from the one thread here that
    reads every process's answers and completes the futures).
    """

    def __init__(self, count: int, buffers: SharedBatchBuffers, paths: dict[str, str] | None = None) -> None:
        self.count = int(count)
        self.buffers = buffers
        # shard name -> local file: samples of these go by reference (``_by_reference``)
        self.paths = paths or {}
        self._workers: list[_Worker] = []
        procs: list[_Process] = []
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _stop, procs, self._pid)
        self._lock = threading.Lock()
        self._queue: deque[tuple[Future[Any], np.ndarray, bytes]] = deque()
        here = str(Path(__file__).resolve().parent)
        boot = f"import sys; sys.path.insert(0, {here!r}); from ordered_decode import serve; serve({{fd}})"
        try:
            for index in range(self.count):
                procs.append(_Process(index, [sys.executable, "-c", boot], dict(os.environ)))
                _widen_pipe(procs[-1].stdin.fileno())
                self._workers.append(_Worker(procs[-1]))
        except BaseException:
            self._finalizer()
            raise
        self._collector = threading.Thread(target=self._collect, name="shardpack-decode-pool", daemon=True)
        self._collector.start()

    @property
    def alive(self) -> bool:
        """False once closed, after a process ended, or in a forked copy."""
        return (self._finalizer.alive and os.getpid() == self._pid
                and all(w.dead is None and w.proc.popen.poll() is None for w in self._workers))

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        if fn is not _decode_into or kwargs:
            raise TypeError("DecodePool runs batches._decode_into tasks only")
        x, first, samples, seeds, options, rescale, channels_first = args
        name, offset = self.buffers.locate(x)
        if self.paths:
            samples = [_by_reference(s, self.paths) for s in samples]
        task = pickle.dumps(("decode", name, offset, x.shape, x.dtype.str, first, samples, seeds,
                             options, rescale, channels_first, Image.MAX_IMAGE_PIXELS),
                            protocol=pickle.HIGHEST_PROTOCOL)
        future: Future[Any] = Future()
        with self._lock:
            self._queue.append((future, x, task))
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Send queued tasks to processes with fewer than ``_DEPTH`` (under ``_lock``, so
        each process gets its tasks in the order of its ``pending``). A process is sent
        a task when it finishes one, not a share of the block up front: images differ in
        size, and a process behind a large one would hold up the block while others idle."""
        while self._queue:
            worker = min(self._workers, key=lambda w: (w.dead is not None, len(w.pending)))
            if worker.dead is not None:  # every process is gone
                for future, _, _ in self._queue:
                    if future.set_running_or_notify_cancel():
                        future.set_exception(worker.dead)
                self._queue.clear()
                return
            if len(worker.pending) >= _DEPTH:
                return
            future, x, task = self._queue.popleft()
            if future.cancelled():  # its epoch was left
                continue
            worker.pending.append((future, x))
            try:
                _send_pickled(worker.proc, task)
            except BaseException as exc:  # dead, or a message half sent: out of step for good
                self._fail(worker, exc if isinstance(exc, _ProcessDied) else None)
                if not isinstance(exc, (_ProcessDied, OSError)):
                    raise

    def _fail(self, worker: _Worker, exc: BaseException | None) -> None:
        """The process is gone (or out of step): end it, fail what it was sent, and send
        the queue to the others (under ``_lock``)."""
        worker.proc.popen.kill()
        worker.proc.popen.wait()  # no longer writing into any block
        if worker.dead is None:
            worker.dead = exc or worker.proc._died()
        pending, worker.pending = worker.pending, deque()
        for future, _ in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(worker.dead)

    def _collect(self) -> None:
        """Read every process's answers (this thread only) and complete their futures; if
        this thread fails, fail every task and process rather than leave them waiting."""
        try:
            self._read_answers()
        except BaseException as exc:
            error = RuntimeError(f"the decode pool's answer thread failed: {exc!r}")
            with self._lock:
                for worker in self._workers:
                    self._fail(worker, error)
                self._dispatch()  # fails the queue: every process is dead now
            raise

    def _read_answers(self) -> None:
        """Straight from the pipes' descriptors: a buffered reader may take two answers in
        one read, and the second would wait unseen by ``select`` for one that never comes."""
        with selectors.DefaultSelector() as selector:
            for worker in self._workers:
                selector.register(worker.proc.stdout.fileno(), selectors.EVENT_READ, (worker, bytearray()))
            while selector.get_map():
                for key, _ in selector.select():
                    worker, data = key.data
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fd)
                        worker.proc.stdout.close()
                        with self._lock:
                            self._fail(worker, None)
                            self._dispatch()
                        continue
                    data += chunk
                    for reply in _complete_messages(data):
                        self._answer(worker, reply)

    def _answer(self, worker: _Worker, reply: tuple[Any, ...]) -> None:
        with self._lock:
            if worker.dead is not None or not worker.pending:
                return  # its tasks were failed when it was found dead (a send to it broke)
            future, _ = worker.pending.popleft()
            self._dispatch()
        if future.set_running_or_notify_cancel():
            if reply[0] == "error":
                future.set_exception(reply[1])
            else:
                future.set_result(reply[1])

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """End the decode processes (idempotent); their answer thread ends with them."""
        self._finalizer()
        if wait and threading.current_thread() is not self._collector:
            self._collector.join(timeout=10)


# ---------------------------------------------------------------- the decode process's side


def _by_reference(sample: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """A local shard's sample as (file, offset, span, members): the decode process reads its
    bytes from the file itself (the page cache), so no compressed byte goes through the
    pipe. The span covers every member's header and padded data, plus room for long-name
    headers (a pax header takes three blocks); members the reader dropped (the label) make
    the process read more. Other samples go as they are."""
    path = paths.get(sample["__shard__"])
    if path is None:
        return sample
    members = [k for k in sample if not k.startswith("__")]
    span = sum(4 * BLOCK + -(-len(sample[k]) // BLOCK) * BLOCK for k in members)
    return {"__key__": sample["__key__"], "__shard__": sample["__shard__"],
            "__ref__": (path, sample["__offset__"], span, members)}


_OPEN_FILES = 8  # shard files a decode process keeps open (by_reference)


def _read_reference(sample: dict[str, Any], files: dict[str, int]) -> dict[str, Any]:
    """The sample ``_by_reference`` made, with its members' bytes read from its shard."""
    if "__ref__" not in sample:
        return sample
    path, offset, span, members = sample.pop("__ref__")
    fd = files.pop(path, None)  # the most recent shards' files stay open, a few at most
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        while len(files) >= _OPEN_FILES:
            os.close(files.pop(next(iter(files))))
    files[path] = fd
    while True:  # members the reader left out (the label) lie in the span too: read more
        data = os.pread(fd, span, offset)
        found: dict[str, bytes] = {}
        try:
            for member in tar_members(io.BytesIO(data), shard=sample["__shard__"]):
                ext = split_member_name(member.name)[1]
                if ext in members:
                    found[ext] = member.data
                    if len(found) == len(members):
                        break
        except ShardReadError:
            if len(data) == span:
                span *= 2
                continue
            raise
        sample.update(found)
        return sample


def _task_array(blocks: OrderedDict[str, shared_memory.SharedMemory], name: str, offset: int,
                shape: tuple[int, ...], dtype: str) -> np.ndarray:
    shm = blocks.get(name)
    if shm is None:
        shm = blocks[name] = _attach(name)
        while len(blocks) > _MAPPED_MAX:
            blocks.popitem(last=False)[1].close()
    blocks.move_to_end(name)
    return np.ndarray(shape, dtype=np.dtype(dtype), buffer=shm.buf, offset=offset)


def _listen(commands: IO[bytes], inbox: queue.SimpleQueue[Any]) -> None:
    """Take the main process's messages as they come, so that its writes never wait for
    a decode to end (a task's compressed samples are far more than a pipe holds)."""
    while True:
        try:
            inbox.put(_recv(commands))
        except (EOFError, OSError):
            inbox.put(("stop",))
            return


def _serve(channel: IO[bytes], commands: IO[bytes]) -> None:
    blocks: OrderedDict[str, shared_memory.SharedMemory] = OrderedDict()
    lock = threading.Lock()
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    files: dict[str, int] = {}
    threading.Thread(target=_listen, args=(commands, inbox), daemon=True).start()
    while True:
        message = inbox.get()
        if message[0] == "stop":
            return
        _, name, offset, shape, dtype, first, samples, seeds, options, rescale, cf, max_pixels = message
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            x = _task_array(blocks, name, offset, shape, dtype)
            samples = [_read_reference(s, files) for s in samples]
            reply: tuple[Any, ...] = ("done", _decode_into(x, first, samples, seeds, options, rescale, cf))
            del x
        except Exception as exc:
            reply = ("error", _portable(exc))
        del message, samples
        _send(channel, lock, reply)


def serve(fd: int) -> None:
    """Entry point of a decode process (started by DecodePool): tasks come on stdin,
    replies go out on ``fd``."""
    channel = os.fdopen(fd, "wb")
    os.dup2(2, 1)  # its prints go to stderr, not into the caller's stdout
    try:
        _serve(channel, os.fdopen(0, "rb"))
    except (BrokenPipeError, EOFError):  # the main process is gone
        pass


class OrderedReader(ShardReader):
    """``ShardReader`` whose decode tasks go to ``decode_processes`` processes of a
    ``DecodePool`` (kept across epochs; ``close()`` ends them)."""

    def __init__(self, *args: Any, decode_processes: int = 2, by_reference: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decode_processes = int(decode_processes)
        self.by_reference = by_reference
        self._ordered: tuple[SharedBatchBuffers, DecodePool] | None = None

    def _decoded(self, labelled: Any, epoch: int, stream: str, skip_batches: int, buffers: Any,
                 skip_extra: int = 0, on_extra: Any = None, *, policy: Any) -> Any:
        # tasks of at least 4 images: the pool's cost per task is the main process's
        workers = min(8, self.decode_processes)
        if self._ordered is not None and not self._ordered[1].alive:
            self.close()  # a process died: end the others and free the blocks
        if self._ordered is None:
            shared = SharedBatchBuffers(in_flight_plan(workers, self.batch_options.batch_size)[1] + 4)
            paths = ({ref.name: ref.url for ref in self.source.shards if os.path.isfile(ref.url)}
                     if self.by_reference else None)
            self._ordered = (shared, DecodePool(self.decode_processes, shared, paths))
        shared, pool = self._ordered
        if skip_batches or self.decode_options.random_flip or self.decode_options.random_crop:
            raise NotImplementedError("the prototype reads whole epochs without augmentation")
        yield from decode_batches(labelled, decode=self.decode_options, batch=self.batch_options,
                                  pool=pool, policy=policy, workers=workers, buffers=shared,
                                  on_batch=on_extra)

    def close(self) -> None:
        if self._ordered is not None:
            self._ordered[1].shutdown()
            self._ordered[0].close()
            self._ordered = None
        super().close()

    def __getstate__(self) -> dict[str, Any]:
        return super().__getstate__() | {"_ordered": None}
