"""Engines run the plan's independent tasks: in this process, a process pool, or Dask.

An engine is a function ``run(fn, items, *, workers, **kw) -> iterator of (item, result)``
yielding results as they complete; the caller puts them back in plan order. Engines
never decide anything about the output, so every engine produces the same bytes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["ENGINES", "default_workers", "run_local", "get_engine"]

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_local(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int, **_: Any
) -> Iterator[tuple[T, R]]:
    """Run ``fn`` over ``items`` in ``workers`` processes (inline when workers == 1).

    Uses the ``spawn`` start method: forking a process that has TensorFlow or other threaded
    libraries loaded can deadlock the children.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield item, fn(item)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = {}
        queue = iter(items)
        for item in queue:  # keep a bounded number of tasks in flight
            pending[pool.submit(fn, item)] = item
            if len(pending) >= workers * 4:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                yield item, future.result()
                nxt = next(queue, None)
                if nxt is not None:
                    pending[pool.submit(fn, nxt)] = nxt


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
