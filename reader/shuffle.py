"""Epoch shard order, shard interleaving and the sample shuffle buffer (generator stages).

Randomness always comes from :func:`epoch_rng` -- a ``random.Random`` seeded from
``(seed, epoch, purpose)`` -- never from pid or time, so a seeded run repeats exactly and
each epoch gets its own order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

__all__ = ["epoch_rng", "shard_order", "shards_for_epoch", "interleave", "shuffle_buffer", "early_start",
           "DEFAULT_BUFFER"]

T = TypeVar("T")

# Samples held (compressed) by the shuffle buffer. 10,000 ImageNet JPEGs (~110 kB each) are
# ~1.1 GB; with shards of a few thousand samples interleaved 4 ways this mixes several
# shards' worth of samples.
DEFAULT_BUFFER = 10_000


def epoch_rng(seed: int, epoch: int, purpose: str) -> random.Random:
    """Return the random generator for one purpose in one epoch.

    Seeding from a string is stable across Python runs and machines (it is hashed with
    SHA-512, not with the salted ``hash()``), and tuples are no longer accepted as seeds.
    """
    return random.Random(f"shardpack/{seed}/{epoch}/{purpose}")


def shard_order(n: int, *, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Return the reading order of ``n`` shards in ``epoch`` as indices (manifest order if
    not shuffled); the same on every rank and worker, since it depends on nothing else."""
    order = list(range(n))
    if shuffle:
        epoch_rng(seed, epoch, "shards").shuffle(order)
    return order


def shards_for_epoch(
    shards: Sequence[T],
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
) -> list[T]:
    """Return the shards to read in ``epoch``, in reading order, for one rank.

    Unshuffled, that is the manifest order. Shuffled, the order is redrawn each epoch from
    ``(seed, epoch)``. Shards are shuffled *before* they are dealt to ranks (round robin),
    so every rank sees a fresh, disjoint set each epoch and the ranks together read each
    shard once.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    order = shard_order(len(shards), epoch=epoch, seed=seed, shuffle=shuffle)
    return [shards[i] for i in order[rank::world_size]]


def interleave(sources: Iterable[Iterator[T]], *, cycle_length: int) -> Iterator[T]:
    """Read up to ``cycle_length`` iterators round robin, one item each in turn.

    A new source is started as soon as one is exhausted, so at most ``cycle_length``
    shards are open at once. ``cycle_length=1`` is plain sequential reading.
    """
    pending = iter(sources)
    active: list[Iterator[T]] = []
    for source in pending:
        active.append(source)
        if len(active) >= cycle_length:
            break
    i = 0
    while active:
        i %= len(active)
        try:
            item = next(active[i])
        except StopIteration:
            replacement = next(pending, None)
            if replacement is None:
                del active[i]
            else:
                active[i] = replacement
            continue
        yield item
        i += 1


def shuffle_buffer(
    items: Iterable[T],
    *,
    rng: random.Random,
    size: int,
    max_bytes: int | None = None,
    nbytes: Callable[[T], int] | None = None,
    initial: int | None = None,
) -> Iterator[T]:
    """Shuffle a stream with a buffer of up to ``size`` items (reservoir style).

    The buffer is filled first, then each incoming item replaces a randomly chosen one that
    is yielded; at the end the rest is yielded in random order. The items are still
    compressed samples, so the buffer costs their byte size, not decoded pixels. With
    ``max_bytes`` (and ``nbytes`` to measure an item) the buffer also holds at most that
    many bytes (plus the item that crossed it), so a set of large images cannot exhaust
    memory: it stops growing there, and hands out items until it is under it again when
    a larger item came in for a smaller one.

    ``initial``: start yielding once the buffer holds this many items, and take two items
    for each one yielded until it is full (or at ``max_bytes``; webdataset's ``initial``).
    The first item then waits for ``initial`` reads, not ``size`` (10,000 ImageNet JPEGs are
    1.1 GB to read before every epoch's first batch, ~10 s from an object store); the price
    is a narrower shuffle while the buffer grows. None (default), or ``size`` and more: the
    whole buffer first (``early_start``).
    """
    if size <= 1:
        yield from items
        return
    start = early_start(initial, size)
    buffer: list[T] = []
    sizes: list[int] = []  # nbytes of each buffered item, measured once
    held = 0
    growing = 0  # items taken since the last one yielded while the buffer grows
    for item in items:
        if len(buffer) < size and (max_bytes is None or held < max_bytes):
            buffer.append(item)
            if nbytes is not None:
                sizes.append(nbytes(item))
                held += sizes[-1]
            growing += 1
            if start is None or len(buffer) < start or growing < 2:
                continue
            growing = 0
            taken, taken_bytes = _take_random(buffer, sizes, rng)
            held -= taken_bytes
            yield taken
            continue
        start = None  # full (or at its byte cap): one in, one out from now on
        j = rng.randrange(len(buffer))
        buffer[j], item = item, buffer[j]
        if nbytes is not None:
            new_size = nbytes(buffer[j])
            held += new_size - sizes[j]
            sizes[j] = new_size
        yield item
        # a larger item in for a smaller one: back under the cap (the buffer then grows
        # again as items come); else small items first and large ones later (a tar per
        # class or source) held the buffer's count at large items' sizes, far past the cap
        while max_bytes is not None and held > max_bytes and len(buffer) > 1:
            taken, taken_bytes = _take_random(buffer, sizes, rng)
            held -= taken_bytes
            yield taken
    rng.shuffle(buffer)
    yield from buffer


def early_start(initial: int | None, size: int) -> int | None:
    """The ``initial`` of ``shuffle_buffer`` that changes its stream: None unless it is below
    a buffer of 2 or more (otherwise the whole buffer comes first anyway)."""
    return max(1, int(initial)) if initial is not None and 1 < size and int(initial) < size else None


def _take_random(buffer: list[T], sizes: list[int], rng: random.Random) -> tuple[T, int]:
    """Remove a random item of ``buffer`` and its entry in ``sizes`` (kept beside it when
    bytes are measured, else empty); return it and its size (0 when not measured)."""
    j = rng.randrange(len(buffer))
    buffer[j], buffer[-1] = buffer[-1], buffer[j]
    if not sizes:  # bytes not measured
        return buffer.pop(), 0
    sizes[j], sizes[-1] = sizes[-1], sizes[j]
    return buffer.pop(), sizes.pop()
