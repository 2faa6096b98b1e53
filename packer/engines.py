"""Engines run the plan's independent tasks: in this process, a process pool, or Dask.

An engine is a function ``run(fn, items, *, workers, **kw) -> iterator of (item, result)``
yielding results as they complete; the caller puts them back in plan order. Engines
never decide anything about the output, so every engine produces the same bytes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["ENGINES", "LocalPool", "default_workers", "run_local", "run_local_fed", "get_engine"]

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start_method() -> str:
    """``fork`` when it is safe (cheap start, no re-import); ``forkserver`` otherwise.

    Forking a process that runs other threads (TensorFlow, PyTorch, a Dask client, a test
    server) can deadlock the children on a lock some thread held at fork time.
    """
    threaded = threading.active_count() > 1 or any(m in sys.modules for m in _THREADED_MODULES)
    if threaded or "fork" not in multiprocessing.get_all_start_methods():
        return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return "fork"


_THREADED_MODULES = ("tensorflow", "torch", "jax", "distributed")


def exit_with_parent(pack: int, every: float = 0.5) -> None:
    """In a pool worker: end when the pack's process ``pack`` is gone. A SIGKILLed pack (the
    OOM killer) left its workers alive for good, holding the caller's output pipes open (a
    ``subprocess.run(capture_output=True)`` of the pack never returned) and free to finish
    a task into OUT while a re-run writes there. A forked worker sees its parent change; one
    started by a forkserver (which outlives the pack) checks the pack's pid."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and _alive(pack):
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="shardpack-parent-watch", daemon=True).start()


_PROC = os.path.isdir("/proc/self")  # Linux; macOS has no /proc


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs. A killed process stays a zombie until its parent reaps it, and
    a parent reading the pack's output to its end reaps it only after that end, which the
    workers hold: on Linux a zombie counts as gone."""
    if _PROC:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
        except FileNotFoundError:
            return False
        except OSError:
            pass  # ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's (a reused pid)
        return True
    return True


class LocalPool:
    """A process pool started on first use and reused by every phase of one pack job
    (starting workers costs more than probing a thousand files)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        # Decided now, before this job starts threads of its own (our progress bars start
        # no monitor thread: packer.progress).
        self._method = _start_method()

    def executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # Pillow's format plugins are not loaded before the fork (Image.init took 40 ms,
            # a tenth of a 3,000-image pack): the structure check reads JPEG and PNG without
            # Pillow, and a child that meets another format loads them itself.
            context = multiprocessing.get_context(self._method)
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                             initializer=exit_with_parent, initargs=(os.getpid(),))
        return self._pool

    def start(self) -> None:
        """Start the worker processes now (they start while the caller walks the tree)."""
        if self.workers > 1:
            executor = self.executor()
            for _ in range(self.workers):  # fork starts all at the first task, others on demand
                executor.submit(int)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def run_local(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int, pool: LocalPool | None = None, **_: Any
) -> Iterator[tuple[T, R]]:
    """Run ``fn`` over ``items`` in ``workers`` processes (inline when workers == 1).

    At most ``4 * workers`` tasks are in flight, so a huge plan never queues at once.
    """
    items = list(items)
    queue = iter(items)

    def next_task() -> tuple[Callable[[T], R], T] | None:
        for item in queue:
            return fn, item
        return None

    inline = workers <= 1 or len(items) <= 1
    for (_fn, item), result in run_local_fed(next_task, workers=1 if inline else workers, pool=pool):
        yield item, result


def run_local_fed(
    next_task: Callable[[], tuple[Callable[[Any], Any], Any] | None], *, workers: int,
    pool: LocalPool | None = None,
) -> Iterator[tuple[tuple[Callable[[Any], Any], Any], Any]]:
    """Like ``run_local``, but each task ``(fn, item)`` comes from ``next_task()``, which is
    asked again after every result: handling a result may make new tasks ready (a shard
    cut once its files are probed). Ends when ``next_task`` returns None and nothing is in
    flight. Yields ``((fn, item), fn(item))`` in completion order.
    """
    if workers <= 1:
        while (task := next_task()) is not None:
            yield task, task[0](task[1])
        return
    own = pool is None
    pool = pool or LocalPool(workers)
    try:
        executor = pool.executor()
        pending: dict[Future[Any], tuple[Callable[[Any], Any], Any]] = {}

        def fill() -> None:  # keep a bounded number of tasks in flight
            while len(pending) < workers * 4 and (task := next_task()) is not None:
                pending[executor.submit(task[0], task[1])] = task

        fill()
        while pending:
            done = wait(pending, return_when=FIRST_COMPLETED).done
            for future in done:
                yield pending.pop(future), future.result()
            fill()
    finally:
        if own:
            pool.close()


def _run_dask(fn: Callable[[T], R], items: Iterable[T], *, workers: int, **kw: Any) -> Iterator[tuple[T, R]]:
    from .dask_engine import run_dask

    return run_dask(fn, items, workers=workers, **kw)


ENGINES: dict[str, Callable[..., Iterator[tuple[Any, Any]]]] = {
    "local": run_local,
    "dask": _run_dask,
}


def get_engine(name: str) -> Callable[..., Iterator[tuple[Any, Any]]]:
    """Look an engine up by name.

    Raises:
        ValueError: unknown engine; the message lists the known ones.
    """
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
