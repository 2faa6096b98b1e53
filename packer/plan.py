"""The plan: which file goes into which shard, in which order — computed before writing.

The plan is plain data made by pure functions of (probed inputs, options, seed). Every
engine (one process, a process pool, a Dask cluster) and every resume executes the same
plan, which is what makes the output byte-identical whatever the worker count.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .format import sample_json, sample_key, shard_name

__all__ = [
    "PlannedSample",
    "PlannedShard",
    "Plan",
    "class_map",
    "split_flat_pool",
    "order_split",
    "cut_shards",
    "ShardCutter",
    "tar_member_bytes",
    "find_duplicates",
]

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole 10,240-byte records


@dataclass(slots=True)
class PlannedSample:
    """One input file and everything needed to write its three tar members.

    Treated as immutable (nothing assigns to it after planning). Not a frozen dataclass:
    one is made per file in the planning process, and a frozen constructor took 4 µs
    against 0.5 µs.
    """

    key: str
    rel_path: str
    abs_path: str
    ext: str
    label: int
    class_name: str
    width: int
    height: int
    size: int  # stored image bytes
    digest: str  # of the stored image bytes (packer.digest)
    source_digest: str
    source_stamp: tuple[int, ...] | None = None  # probe.read_stamped's stamp
    # computed once, in __post_init__: planning, fingerprinting and writing all use them
    _json: bytes = field(init=False, repr=False, compare=False, default=b"")
    _tar_bytes: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        meta = sample_json(
            path=self.rel_path, class_name=self.class_name, label=self.label,
            width=self.width, height=self.height,
        )
        self._json = meta
        self._tar_bytes = (tar_member_bytes(self.size) + tar_member_bytes(len(str(self.label)))
                           + tar_member_bytes(len(meta)))

    def __reduce__(self) -> tuple[type[PlannedSample], tuple[Any, ...]]:
        # sent to writer processes as the constructor's arguments (a third of the cost of
        # the slots' default state); the writer recomputes the JSON member
        return PlannedSample, (self.key, self.rel_path, self.abs_path, self.ext, self.label,
                               self.class_name, self.width, self.height, self.size,
                               self.digest, self.source_digest, self.source_stamp)

    def json_bytes(self) -> bytes:
        """The ``.json`` member."""
        return self._json

    def tar_bytes(self) -> int:
        """Exact bytes this sample adds to a USTAR archive (3 headers + padded data)."""
        return self._tar_bytes


@dataclass(frozen=True)
class PlannedShard:
    """One shard: its name and the samples it holds, in order."""

    split: str
    index: int
    samples: tuple[PlannedSample, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def planned_bytes(self) -> int:
        return archive_bytes(s.tar_bytes() for s in self.samples)

    def fingerprint(self, options: dict[str, Any]) -> str:
        """Hash of everything that decides this shard's bytes (inputs' content included).

        Two shards with equal fingerprints are byte-identical, so resume can keep a shard
        written earlier if its fingerprint and checksum match.
        """
        h = hashlib.sha256()
        h.update(json.dumps(options, sort_keys=True).encode())
        h.update("".join(map(_fingerprint_line, self.samples)).encode())
        return h.hexdigest()


def _fingerprint_line(s: PlannedSample) -> str:
    """``json.dumps([key, ext, label, digest, json member])``, formatted directly (the same
    text, a test pins it): once per sample, it was a third of the planning time."""
    return (f"[{_ascii(s.key)}, {_ascii(s.ext)}, {int(s.label)}, {_ascii(s.digest)}, "
            f"{_ascii(s.json_bytes().decode())}]")


_ascii = json.encoder.encode_basestring_ascii  # json.dumps' default (ensure_ascii) string encoder


@dataclass
class Plan:
    """The whole pack job, before a byte is written."""

    classes: list[str]
    shards: dict[str, list[PlannedShard]] = field(default_factory=dict)  # split -> shards
    options: dict[str, Any] = field(default_factory=dict)

    def all_shards(self) -> list[PlannedShard]:
        return [shard for shards in self.shards.values() for shard in shards]

    def samples(self, split: str) -> list[PlannedSample]:
        return [s for shard in self.shards[split] for s in shard.samples]


def tar_member_bytes(size: int) -> int:
    """Bytes one tar member occupies: a 512-byte header plus data padded to 512."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def archive_bytes(member_sizes: Any) -> int:
    """Size of a whole archive: members, two zero end blocks, padded to a 10,240 record."""
    total = sum(member_sizes) + 2 * TAR_BLOCK
    return -(-total // TAR_RECORD) * TAR_RECORD


def class_map(class_folders: dict[str, list[str]]) -> list[str]:
    """One class list for every split: the sorted union of class folder names.

    A class missing from one split then never shifts another split's labels, and empty
    class folders keep their index (as Keras does).
    """
    return sorted({name for names in class_folders.values() for name in names})


def split_flat_pool(
    items: list[Any], *, class_of: Any, path_of: Any, validation_split: float, seed: int
) -> dict[str, list[Any]]:
    """Divide a flat pool into train/validation per class, seeded, so each class keeps its
    share in both splits (stratified), reproducibly.
    """
    by_class: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        by_class[class_of(item)].append(item)
    out: dict[str, list[Any]] = {"train": [], "validation": []}
    for name in sorted(by_class):
        members = sorted(by_class[name], key=path_of)
        random.Random(f"{seed}/validation-split/{name}").shuffle(members)
        n_val = math.floor(len(members) * validation_split + 0.5)  # half up, not to even
        out["validation"].extend(members[:n_val])
        out["train"].extend(members[n_val:])
    return out


def order_split(items: list[Any], *, split: str, seed: int, path_of: Any) -> list[Any]:
    """Shuffle a split across classes, seeded by (seed, split name) only.

    Sorting first makes the order independent of how the files were listed; seeding by split
    name means adding a split never reorders another.
    """
    ordered = sorted(items, key=path_of)
    random.Random(f"{seed}/{split}").shuffle(ordered)
    return ordered


class ShardCutter:
    """Cut one split's samples, arriving in plan order, into shards of at most ``max_count``
    samples and ``max_size`` bytes (exact tar size); a single sample larger than
    ``max_size`` gets a shard alone. Each shard is handed out as soon as it is closed, so
    it can be written while later samples are still being checked."""

    def __init__(self, split: str, *, max_count: int, max_size: int) -> None:
        self.split, self.max_count, self.max_size = split, max_count, max_size
        self._current: list[PlannedSample] = []
        self._member_total = 0
        self._made = 0

    def add(self, sample: PlannedSample) -> PlannedShard | None:
        """Take the next sample; return the shard it closed, if it did not fit there."""
        size = sample.tar_bytes()
        closed = None
        too_big = archive_bytes([self._member_total + size]) > self.max_size
        if self._current and (len(self._current) >= self.max_count or too_big):
            closed = self.close()
        self._current.append(sample)
        self._member_total += size
        return closed

    def close(self) -> PlannedShard | None:
        """The shard being filled, if it holds anything (the split's last one, at its end)."""
        if not self._current:
            return None
        shard = PlannedShard(self.split, self._made, tuple(self._current))
        self._made += 1
        self._current, self._member_total = [], 0
        return shard


def cut_shards(
    samples: list[PlannedSample], *, split: str, max_count: int, max_size: int
) -> list[PlannedShard]:
    """All of ShardCutter at once: a whole ordered split into shards."""
    cutter = ShardCutter(split, max_count=max_count, max_size=max_size)
    shards = [shard for sample in samples if (shard := cutter.add(sample)) is not None]
    last = cutter.close()
    return shards + [last] if last is not None else shards


def find_duplicates(
    plan: Plan, sha256_of: Callable[[str, str], str | None]
) -> dict[str, list[dict[str, Any]]]:
    """Exact duplicate images (same source bytes) within a split and across splits.

    The same photo in train and test is a silent evaluation bug no loader warns about.
    Samples are grouped by their probe's content digest (128 bits: equal digests are equal
    bytes, see packer.digest), so a group is what the shards hold even if a source changed
    since. Each group is named by the sha256 of its bytes, from its first file that still
    holds them: ``sha256_of(abs_path, digest)`` is None for a file changed or gone since
    its probe, and the name is None when no file of the group is left as it was packed.
    Typically one file per group is read again.
    """
    where: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for split, shards in plan.shards.items():
        for shard in shards:
            for sample in shard.samples:
                where[sample.source_digest].append((split, sample.rel_path, sample.abs_path))
    groups = []
    for digest, members in where.items():
        if len(members) > 1:
            members.sort()  # by split, then path
            places = [(split, rel) for split, rel, _ in members]
            groups.append((places, _group_sha256(digest, members, sha256_of)))
    within, across = [], []
    for places, sha in sorted(groups, key=lambda group: group[0][0][1]):  # by first path
        splits = sorted({split for split, _ in places})
        for split in splits:
            paths = [p for s, p in places if s == split]
            if len(paths) > 1:
                within.append({"split": split, "sha256": sha, "paths": paths})
        if len(splits) > 1:
            across.append({"splits": splits, "sha256": sha, "paths": [p for _, p in places]})
    return {"within_split": within, "across_splits": across}


def _group_sha256(
    digest: str, members: list[tuple[str, str, str]], sha256_of: Callable[[str, str], str | None]
) -> str | None:
    """sha256 of a duplicate group's bytes, from the first of its (sorted) files that still
    holds them; None if none does."""
    for _, _, abs_path in members:
        if (sha := sha256_of(abs_path, digest)) is not None:
            return sha
    return None


def planned_sample(candidate: Any, probe: Any, *, split: str, position: int, label: int) -> PlannedSample:
    """Join a walked candidate and its probe into the sample at ``position`` of ``split``."""
    return PlannedSample(
        key=sample_key(split, position),
        rel_path=candidate.rel_path,
        abs_path=candidate.abs_path,
        ext=probe.ext,
        label=label,
        class_name=candidate.class_name,
        width=probe.width,
        height=probe.height,
        size=probe.size,
        digest=probe.digest,
        source_digest=probe.source_digest,
        source_stamp=probe.source_stamp,
    )


__all__ += ["planned_sample", "archive_bytes"]
