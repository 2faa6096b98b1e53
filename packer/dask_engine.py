"""The Dask engine: run the plan's tasks on a Dask cluster (issue #6).

The driver (the process that calls ``pack()``) walks the tree, makes the plan and writes the
manifest; the cluster only executes tasks (probe a chunk of files, write one planned
shard). Workers read the sources and write shards straight into OUT, so SRC and OUT must be
on a filesystem every worker sees under the same path (NFS, Lustre, a shared volume).

Why the output is byte-identical to the local engine: a task's result depends only on its
item, which the plan fixed before anything ran; the engine decides *where* and *when* a
task runs, never *what* it writes. A worker lost mid-task is harmless for the same reason:
shards are written to ``.NAME.partial`` and renamed only when complete, so a killed writer
leaves at most a ``.partial`` file, the scheduler runs the task again elsewhere (the rerun
overwrites the same ``.partial``), and ``pack()`` removes any ``.partial`` leftovers before
it publishes the manifest.
"""

from __future__ import annotations

import logging
import os
import reprlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from .errors import PackError

__all__ = ["run_dask", "local_cluster", "check_workers_see", "DEFAULT_RETRIES", "IN_FLIGHT_PER_THREAD", "MIN_IN_FLIGHT"]

T = TypeVar("T")
R = TypeVar("R")

# Extra attempts for a task that *raised* (a flaky network filesystem, say). A task whose
# worker *died* is rescheduled by the scheduler without using these; Dask gives up on a task
# that has killed ``distributed.scheduler.allowed-failures`` workers (default 3).
DEFAULT_RETRIES = 2
# Tasks kept submitted per worker thread: enough that no worker idles between tasks, few
# enough that a plan of a million tasks never sits in the scheduler's memory at once.
IN_FLIGHT_PER_THREAD = 4
MIN_IN_FLIGHT = 8
CONNECT_TIMEOUT_S = 30


def run_dask(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    scheduler: str | None = None,
    retries: int = DEFAULT_RETRIES,
    max_in_flight: int | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    **_: Any,
) -> Iterator[tuple[T, R]]:
    """Run ``fn`` over ``items`` on a Dask cluster, yielding ``(item, result)`` as completed.

    Args:
        fn: a module-level function (workers import it by name, so ``packer`` must be
            installed on every worker).
        items: task inputs; consumed lazily, at most ``max_in_flight`` submitted at a time.
        workers: worker processes of the local cluster started when ``scheduler`` is None;
            with a ``scheduler`` the cluster's own size decides (``workers`` then only
            sizes the in-flight window while the cluster has no workers yet).
        scheduler: address of a running scheduler (``tcp://host:8786``); None starts a
            ``LocalCluster`` on loopback (one single-threaded process per worker) and shuts
            it down when the iterator finishes.
        retries: extra attempts for a task that raised.
        max_in_flight: most tasks submitted but not yet yielded (default
            ``IN_FLIGHT_PER_THREAD`` per worker thread, at least ``MIN_IN_FLIGHT``).
        connect_timeout: seconds to wait for the ``scheduler``.

    Yields:
        ``(item, fn(item))`` in completion order; the caller restores plan order.

    Raises:
        ImportError: ``dask[distributed]`` is not installed; the message says how to get it.
        PackError: the scheduler cannot be reached, or one task killed every worker that
            tried it (out of memory, a crash in native code).
        Exception: the first task that still fails after its retries, re-raised as is
            (a ``PackError`` from a writer stays a ``PackError``); the remaining tasks are
            cancelled.
    """
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    _require_distributed()
    from distributed import Client, KilledWorker, as_completed
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError

    with ExitStack() as stack:
        if scheduler is None:
            client = stack.enter_context(Client(stack.enter_context(local_cluster(workers))))
        else:
            try:
                client = stack.enter_context(Client(scheduler, timeout=connect_timeout))
            except OSError as exc:
                raise _unreachable(scheduler, exc) from exc
        window = max_in_flight or _default_window(client, workers)

        queue = iter(items)
        pending: dict[Any, T] = {}

        def submit_next() -> Any:
            for item in queue:
                future = client.submit(fn, item, pure=False, retries=retries)
                pending[future] = item
                return future
            return None

        for _slot in range(window):
            if submit_next() is None:
                break
        completed = as_completed(list(pending))
        try:
            for future in completed:
                item = pending.pop(future)
                try:
                    result = future.result()  # re-raises the task's exception
                except KilledWorker as exc:
                    raise PackError(
                        f"task {reprlib.repr(item)} killed every Dask worker that ran it "
                        f"({exc}); look for out-of-memory kills in the worker logs, give "
                        "workers more memory, or raise distributed.scheduler.allowed-failures"
                    ) from exc
                except (CancelledError, CommClosedError) as exc:
                    # the future itself cancelled (nothing here cancels a live task), or the
                    # connection gone: the cluster is lost; a task's own error is its own
                    if isinstance(exc, FutureCancelledError) or future.status not in ("error", "finished"):
                        raise _lost(scheduler, exc) from exc
                    raise
                future.release()  # the scheduler forgets it; memory stays flat
                yield item, result
                nxt = submit_next()
                if nxt is not None:
                    completed.add(nxt)
        finally:
            if pending:  # failed, or the consumer stopped early
                client.cancel(list(pending))


def check_workers_see(
    scheduler: str, paths: dict[str, str], *, connect_timeout: float = CONNECT_TIMEOUT_S
) -> None:
    """Check that every worker sees each of ``paths`` exactly as the driver does.

    A worker that does not mount SRC would report its files unreadable (and the pack would
    skip them); one that does not mount OUT would write shards onto its own disk. Both are
    silent, so ``pack()`` should call this before probing on a remote cluster, with one
    file from SRC and a marker file it wrote into OUT.

    Args:
        scheduler: the cluster's scheduler address.
        paths: label (``"SRC"``, ``"OUT"``) -> a file the driver can see.

    Raises:
        PackError: a worker lacks a path or sees a different file there; the message names
            the worker and the path.
    """
    _require_distributed()
    from distributed import Client

    labels = list(paths)
    expected = _stat_keys([paths[label] for label in labels])
    for label, want in zip(labels, expected, strict=True):
        if want is None:
            raise PackError(f"{label} path {paths[label]} cannot be read on this machine")
    try:
        with Client(scheduler, timeout=connect_timeout) as client:
            seen = client.run(_stat_keys, [paths[label] for label in labels])
    except OSError as exc:
        raise _unreachable(scheduler, exc) from exc
    for worker, keys in sorted(seen.items()):
        for label, want, got in zip(labels, expected, keys, strict=True):
            if got != want:
                raise PackError(
                    f"Dask worker {worker} does not see {label} as this machine does "
                    f"({paths[label]} is {'missing' if got is None else 'a different file'} "
                    f"there); mount {label} on every worker under the same path"
                )


def _stat_keys(paths: list[str]) -> list[tuple[int, int] | None]:
    """(size, mtime in ns) of each path, or None when it cannot be seen."""
    keys: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            keys.append(None)
        else:
            keys.append((st.st_size, st.st_mtime_ns))
    return keys


@contextmanager
def local_cluster(workers: int) -> Iterator[str]:
    """Start a ``LocalCluster`` on loopback (``workers`` single-threaded processes) and
    yield its scheduler address; shut it down on exit.

    ``pack()`` can hold one for the whole job and pass the address as ``scheduler`` to
    every phase, so the cluster starts once rather than once per phase.
    """
    _require_distributed()
    chatter = logging.getLogger("distributed")
    level = chatter.level
    # The cluster is ours, its INFO lines (workers registering, closing) are not news to
    # the user; they would otherwise reach the CLI's root handler through propagation.
    chatter.setLevel(max(logging.WARNING, chatter.getEffectiveLevel()))
    try:
        with _local_cluster(workers) as address:
            yield address
    finally:
        chatter.setLevel(level)


@contextmanager
def _local_cluster(workers: int) -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(
        host="127.0.0.1", n_workers=max(1, workers), threads_per_worker=1, processes=True,
        dashboard_address=None, silence_logs=logging.WARNING,
        # no dashboard; the scheduler's health endpoint on a free loopback port rather than
        # 8787, which another cluster on this host may hold
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        yield cluster.scheduler_address


def _require_distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the dask engine needs dask.distributed: pip install 'shardpack[dask]'"
        ) from exc


def _default_window(client: Any, workers: int) -> int:
    threads = sum(client.nthreads().values())
    return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_THREAD * max(threads, workers, 1))


def _lost(scheduler: str | None, exc: BaseException) -> PackError:
    """The error for a cluster lost mid-pack (its scheduler restarted or was killed): a
    one-line PackError that says a re-run resumes, as for a scheduler unreachable at the
    start, instead of distributed's FutureCancelledError traceback."""
    where = f"the Dask scheduler at {scheduler}" if scheduler else "the local Dask cluster"
    return PackError(
        f"lost {where} mid-pack ({type(exc).__name__}: {exc}); the shards written so far are "
        "kept: start it again and re-run the same command to resume"
    )


def _unreachable(scheduler: str, exc: OSError) -> PackError:
    return PackError(
        f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one with "
        "`dask scheduler` (and `dask worker ADDRESS` on each machine), or leave "
        "out --scheduler to pack on a local cluster"
    )
