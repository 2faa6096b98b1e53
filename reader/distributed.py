"""Split one epoch of a split across ranks (and data-loader workers) as plain data.

The plan of an epoch is a list of :class:`Piece` -- ``(shard, start, stop)``: samples
``start:stop`` of one shard -- per rank. It is computed from the per-shard sample counts
alone (the manifest), so every rank computes the same plan without talking to the others,
and ``len(reader)`` is known before a single shard is opened.

How an epoch is split (:func:`rank_pieces`):

1. The shards are put in the epoch's order (shuffled from ``(seed, epoch)``, or manifest
   order), the same on every rank.
2. Every rank gets a target of ``floor(N / W)`` or ``ceil(N / W)`` samples (N samples,
   W ranks; the first ``N % W`` ranks get the larger one). With ``uneven="drop"`` every
   target is ``floor(N / W)``.
3. Whole shards are dealt in that order, each to the rank with the most room left, if the
   whole shard fits there. Ranks read disjoint sets of whole shards.
4. The shards that did not fit anywhere whole (typically a short last shard, or every shard
   when there are fewer shards than ranks) are concatenated and cut into contiguous runs
   that fill each rank up to its target, rank 0 first. So only those shards are read by
   more than one rank, each rank reading its own contiguous run of samples in them (the
   run's start is skipped without decoding); at most ``W - 1`` extra shard reads in all.
5. ``uneven="pad"`` (default): ranks whose target is ``floor(N / W)`` while others have
   ``ceil(N / W)`` repeat the first sample of their own stream, so every rank reads
   ``ceil(N / W)`` samples: at most ``W - 1`` samples are seen twice per epoch.
   ``uneven="drop"``: the last ``N % W`` samples of step 4's runs are not read that epoch.

Data-loader workers (:func:`worker_pieces`) split their rank's stream again: the rank's
batches are numbered, worker ``w`` of ``K`` owns batches ``w, w + K, ...`` and reads a
contiguous run of the rank's samples of the matching size, so a ``DataLoader`` that takes a
batch from each worker in turn yields exactly the rank's batch count, whatever ``K`` is.
Without shuffling (``strided``) worker ``w`` reads those batches' own samples instead, so
the batches come in the rank's order (what ``filenames`` and ``labels`` list).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DEFAULT_DISTRIBUTED_SEED",
    "Piece",
    "Uneven",
    "detect_rank",
    "rank_samples",
    "rank_pieces",
    "take_range",
    "worker_pieces",
    "batch_count",
]

log = logging.getLogger("shardpack.reader")

Uneven = Literal["pad", "drop"]
UNEVEN = ("pad", "drop")

# The seed of every rank when world_size > 1 and no seed was given: ranks must agree on the
# shard order, and drawing a seed at random would give every rank a different one.
DEFAULT_DISTRIBUTED_SEED = 0


@dataclass(frozen=True)
class Piece:
    """Samples ``start:stop`` (in shard order, after any class subset) of shard ``shard``.

    ``shard`` is an index into the split's shard list in manifest order.
    """

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def check_uneven(uneven: str) -> None:
    if uneven not in UNEVEN:
        raise ValueError(f'uneven must be "pad" or "drop", got {uneven!r}')


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def rank_samples(total: int, world_size: int, uneven: Uneven) -> int:
    """Samples every rank reads per epoch: ``ceil(N / W)`` with "pad", ``floor`` with "drop"."""
    if world_size == 1:
        return total
    return math.ceil(total / world_size) if uneven == "pad" else total // world_size


def batch_count(samples: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches made of ``samples`` samples."""
    return samples // batch_size if drop_remainder else math.ceil(samples / batch_size)


def take_range(pieces: Sequence[Piece], start: int, stop: int) -> list[Piece]:
    """Samples ``start:stop`` of the concatenation of ``pieces``, as pieces."""
    out: list[Piece] = []
    pos = 0
    for p in pieces:
        lo, hi = max(start, pos), min(stop, pos + len(p))
        if lo < hi:
            out.append(Piece(p.shard, p.start + lo - pos, p.start + hi - pos))
        pos += len(p)
        if pos >= stop:
            break
    return out


def rank_pieces(
    counts: Sequence[int],
    order: Sequence[int],
    *,
    rank: int,
    world_size: int,
    uneven: Uneven = "pad",
) -> list[Piece]:
    """Return the pieces rank ``rank`` reads this epoch, in reading order (module docstring).

    Args:
        counts: samples in each shard (manifest order).
        order: the epoch's shard order (indices into ``counts``), the same on every rank.
        rank, world_size: this rank and the number of ranks.
        uneven: "pad" or "drop" (see the module docstring).

    The pieces of all ranks hold ``rank_samples(sum(counts), world_size, uneven)`` samples
    each. Pure function of its arguments: every rank computes the same split.
    """
    check_rank(rank, world_size)
    check_uneven(uneven)
    if world_size == 1:
        return [Piece(s, 0, counts[s]) for s in order if counts[s] > 0]
    total = sum(counts[s] for s in order)
    base, extra = divmod(total, world_size)
    targets = [base + (r < extra and uneven == "pad") for r in range(world_size)]
    room = list(targets)
    mine: list[Piece] = []
    position = {s: i for i, s in enumerate(order)}
    leftover: list[Piece] = []
    for s in order:
        c = counts[s]
        if c <= 0:
            continue
        r = max(range(world_size), key=lambda r: (room[r], -r))  # most room, lowest rank
        if c <= room[r]:
            room[r] -= c
            if r == rank:
                mine.append(Piece(s, 0, c))
        else:
            leftover.append(Piece(s, 0, c))
    start = sum(room[:rank])
    mine.extend(take_range(leftover, start, start + room[rank]))
    mine.sort(key=lambda p: (position[p.shard], p.start))
    if uneven == "pad" and targets[rank] < math.ceil(total / world_size):
        if mine:
            first = mine[0]
            mine.append(Piece(first.shard, first.start, first.start + 1))
        elif total:  # fewer samples than ranks: borrow one from the epoch's stream
            everything = [Piece(s, 0, counts[s]) for s in order if counts[s] > 0]
            i = rank % total
            mine.extend(take_range(everything, i, i + 1))
    return mine


def worker_pieces(
    pieces: Sequence[Piece],
    *,
    worker: int,
    num_workers: int,
    batch_size: int,
    drop_remainder: bool,
    strided: bool = False,
) -> list[Piece]:
    """Return worker ``worker``'s share of a rank's pieces (module docstring).

    Worker ``w`` owns the rank's batches ``w, w + num_workers, ...``. By default it reads a
    contiguous run of the rank's samples holding exactly those batches' samples (workers
    before it take the runs before). ``strided``: it reads those batches' own samples
    instead (batch ``b`` holds samples ``b * batch_size ...``), so a loader taking one batch
    from each worker in turn yields the rank's samples in their order; for ``shuffle=False``,
    whose batches must line up with ``filenames`` and ``labels``. Either way a loader taking
    one batch from each worker in turn yields ``batch_count(rank samples)`` batches, and only
    the owner of the last batch makes a short one.
    """
    check_rank(worker, num_workers)
    total = sum(len(p) for p in pieces)
    batches = batch_count(total, batch_size, drop_remainder)
    if strided:
        return [piece for b in range(worker, batches, num_workers)
                for piece in take_range(pieces, b * batch_size, min(total, (b + 1) * batch_size))]

    def samples_of(w: int) -> int:
        owned = range(w, batches, num_workers)
        n = len(owned) * batch_size
        if owned and owned[-1] == batches - 1 and not drop_remainder:
            n -= batches * batch_size - total  # the last batch is short
        return n

    start = sum(samples_of(w) for w in range(worker))
    return take_range(pieces, start, start + samples_of(worker))


# ---- finding this process's rank ------------------------------------------------------


def _from_torch() -> tuple[int, int] | None:
    torch = sys.modules.get("torch")  # never import torch for this: only if the user did
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()


def _from_env(environ: dict[str, str]) -> tuple[int, int] | None:
    if "WORLD_SIZE" not in environ:
        return None
    if "RANK" not in environ:
        raise ValueError(
            "WORLD_SIZE is set but RANK is not; LOCAL_RANK is the rank on this machine only, "
            "not the global rank. Pass rank= and world_size= to the reader"
        )
    return int(environ["RANK"]), int(environ["WORLD_SIZE"])


def _tf_config(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``TF_CONFIG``'s (cluster, task); None where it is not set.

    Raises:
        ValueError: it is not JSON of a cluster and a task.
    """
    raw = environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        return config.get("cluster", {}), config.get("task", {})
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON of a cluster and a task ({exc})") from exc


def _from_tf_config(environ: dict[str, str]) -> tuple[int, int] | None:
    parsed = _tf_config(environ)
    if parsed is None:
        return None
    cluster, task = parsed
    chiefs = len(cluster.get("chief", []))
    workers = len(cluster.get("worker", []))
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind == "chief":
        return index, chiefs + workers
    if kind == "worker":
        return chiefs + index, chiefs + workers
    return None  # evaluator, ps: not a training input pipeline; read everything


_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


def tf_config_local_tasks(environ: dict[str, str] | None = None) -> int | None:
    """How many of ``TF_CONFIG``'s training tasks (chief and workers) run on this task's
    host, this one included; None without a usable ``TF_CONFIG``.

    ``MultiWorkerMirroredStrategy`` sets no ``LOCAL_WORLD_SIZE``: without this, every worker
    started on one machine counted the whole machine's CPUs and /dev/shm as its own. A host
    is an address's part before its port; the loopback names count as one host.
    """
    try:
        parsed = _tf_config(os.environ if environ is None else environ)
        if parsed is None:
            return None
        cluster, task = parsed
        mine = cluster[task["type"]][int(task.get("index", 0))]
        hosts = [address for kind in ("chief", "worker") for address in cluster.get(kind, [])]
    except (ValueError, AttributeError, KeyError, IndexError, TypeError):
        return None  # detect_rank says what is wrong with it, where it matters

    def host(address: Any) -> str:  # "host:port", "[::1]:port"
        name = str(address).rsplit(":", 1)[0]
        return "localhost" if name in _LOOPBACK else name

    here = host(mine)
    return max(1, sum(host(address) == here for address in hosts))


def detect_rank(input_context: Any = None, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """Return ``(rank, world_size)`` of this process as the launcher set it up.

    In order: a ``tf.distribute.InputContext`` passed in (``input_pipeline_id`` of
    ``num_input_pipelines``); ``torch.distributed`` when the program imported torch and
    initialised a process group; the ``RANK`` / ``WORLD_SIZE`` environment variables
    (torchrun, ``torch.distributed.launch``; ``LOCAL_RANK`` is ignored, it is the rank on one
    machine); ``TF_CONFIG`` (chief, then workers); else ``(0, 1)``.

    Raises:
        ValueError: inconsistent settings (``WORLD_SIZE`` without ``RANK``, bad TF_CONFIG,
            a rank outside ``0..world_size-1``).
    """
    env = dict(os.environ if environ is None else environ)
    found: tuple[int, int] | None
    if input_context is not None:
        found = int(input_context.input_pipeline_id), int(input_context.num_input_pipelines)
        how = "tf.distribute.InputContext"
    elif (found := _from_torch()) is not None:
        how = "torch.distributed"
    elif (found := _from_env(env)) is not None:
        how = "RANK/WORLD_SIZE"
    elif (found := _from_tf_config(env)) is not None:
        how = "TF_CONFIG"
    else:
        return 0, 1
    check_rank(*found)
    if found[1] > 1:
        log.info("reading as rank %d of %d (from %s)", found[0], found[1], how)
    return found
