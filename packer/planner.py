"""Turn probed candidates into planned shards, each as soon as the files in it are known.

In the ``splits`` layout the walk alone fixes every split's order: its candidates sorted by
path, then shuffled by (seed, split name). A candidate whose probe fails drops out, and the
good ones take positions 0, 1, 2, ... in that order. So shard k of a split is cut as soon
as every candidate up to its end has been probed, and can be written while later files
are still being checked (``probe_order`` asks for them in plan order). In the ``flat``
layout the train/validation division needs every good file first, so its shards are cut
once the last probe is in.

The local pack feeds probes as they complete and writes shards as they appear; the Dask
and object-store packs feed every probe, then write. One planner serves both, so both
write the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import LayoutError
from .format import sample_key
from .plan import (
    Plan,
    PlannedShard,
    ShardCutter,
    class_map,
    order_split,
    planned_sample,
    split_flat_pool,
)
from .probe import Probe
from .walk import WalkResult

__all__ = ["Planner"]


@dataclass
class _Split:
    """One split's progress: its candidates in plan order, and how far they are cut."""

    order: list[int]  # candidate indices
    cutter: ShardCutter
    shards: list[PlannedShard] = field(default_factory=list)
    next: int = 0  # first candidate of ``order`` not yet placed
    count: int = 0  # good samples placed (the next one's position)
    done: bool = False


class Planner:
    """Collects probes (in any order) and hands out the plan's shards in order."""

    def __init__(self, walked: WalkResult, options: dict[str, Any]) -> None:
        self.walked = walked
        self.options = options
        self.classes = class_map(walked.classes)
        self._label_of = {name: i for i, name in enumerate(self.classes)}
        self._probes: list[Probe | None] = [None] * len(walked.candidates)
        self._missing = len(walked.candidates)
        self._splits: dict[str, _Split] = {}
        self._split_of: list[str] = []
        self._flat = options["layout"] == "flat"
        if not self._flat:
            groups: dict[str, list[int]] = {group: [] for group in walked.classes}
            for i, candidate in enumerate(walked.candidates):
                groups[candidate.group].append(i)
            self._start({split: self._ordered(split, members) for split, members in groups.items()})
        elif self._missing == 0:
            self._start_flat()

    # ---------------------------------------------------------------- feeding

    def probe_order(self) -> list[int]:
        """Candidate indices in the order probing them lets shards be cut soonest."""
        if self._flat and self._missing:  # nothing can be cut before the last probe
            return list(range(len(self.walked.candidates)))
        return [i for split in sorted(self._splits) for i in self._splits[split].order]

    def add(self, index: int, probe: Probe) -> list[PlannedShard]:
        """Record candidate ``index``'s probe; return the shards that became complete."""
        if self._probes[index] is not None:
            raise ValueError(f"candidate {index} was probed twice")
        self._probes[index] = probe
        self._missing -= 1
        if self._flat:  # the train/validation division waits for the last probe
            if self._missing:
                return []
            self._start_flat()
            return [shard for split in sorted(self._splits) for shard in self._advance(split)]
        return self._advance(self._split_of[index])

    def expected(self, split: str) -> int:
        """Samples the split will hold at most (exactly, once it is finished)."""
        state = self._splits[split]
        return state.count if state.done else state.count + len(state.order) - state.next

    # ---------------------------------------------------------------- results

    def finish(self) -> tuple[Plan, list[tuple[str, str]], list[tuple[str, str]]]:
        """The whole plan, once every candidate is probed, with skipped and ignored files.

        Raises:
            ValueError: a candidate has no probe yet.
        """
        if self._missing:
            raise ValueError(f"{self._missing} candidates are not probed yet")
        skipped = list(self.walked.skipped)
        ignored = list(self.walked.ignored)
        for candidate, probe in zip(self.walked.candidates, self._probes, strict=True):
            assert probe is not None
            if probe.ok:
                continue
            if probe.is_image or candidate.by_name:
                skipped.append((candidate.rel_path, probe.reason))
            else:
                ignored.append((candidate.rel_path, "not an image"))
        plan = Plan(classes=self.classes, options=self.options)
        for split in sorted(self._splits):
            plan.shards[split] = self._splits[split].shards
        return plan, skipped, ignored

    # ---------------------------------------------------------------- internals

    def _ordered(self, split: str, members: list[int]) -> list[int]:
        candidates = self.walked.candidates
        return order_split(members, split=split, seed=self.options["seed"],
                           path_of=lambda i: candidates[i].rel_path)

    def _start(self, orders: dict[str, list[int]]) -> None:
        _check_split_keys(sorted(orders))
        self._split_of = [""] * len(self.walked.candidates)
        for split, order in orders.items():
            self._splits[split] = _Split(order, ShardCutter(
                split, max_count=self.options["max_count"], max_size=self.options["max_size"]))
            for i in order:
                self._split_of[i] = split

    def _start_flat(self) -> None:
        candidates = self.walked.candidates
        good = [i for i, probe in enumerate(self._probes) if probe is not None and probe.ok]
        path_of: Callable[[int], str] = lambda i: candidates[i].rel_path  # noqa: E731
        pools = split_flat_pool(
            good, class_of=lambda i: candidates[i].class_name, path_of=path_of,
            validation_split=self.options["validation_split"] or 0.0, seed=self.options["seed"],
        )
        self._start({k: self._ordered(k, v) for k, v in pools.items() if v or k == "train"})

    def _advance(self, split: str) -> list[PlannedShard]:
        """Place the split's probed candidates, in order, up to the first one not probed."""
        state = self._splits[split]
        candidates, probes = self.walked.candidates, self._probes
        made = []
        while state.next < len(state.order):
            index = state.order[state.next]
            probe = probes[index]
            if probe is None:
                break
            state.next += 1
            if not probe.ok:
                continue
            candidate = candidates[index]
            sample = planned_sample(candidate, probe, split=split, position=state.count,
                                    label=self._label_of[candidate.class_name])
            state.count += 1
            closed = state.cutter.add(sample)
            if closed is not None:
                made.append(closed)
        if state.next == len(state.order) and not state.done:
            state.done = True
            last = state.cutter.close()
            if last is not None:
                made.append(last)
        state.shards.extend(made)
        return made


def _check_split_keys(splits: list[str]) -> None:
    """Keys embed the split name with odd characters replaced; two splits that would share
    keys (``a.b`` and ``a_b``) are refused rather than packed with colliding keys."""
    seen: dict[str, str] = {}
    for split in splits:
        prefix = sample_key(split, 0)
        if prefix in seen:
            raise LayoutError(
                f"split folders {seen[prefix]!r} and {split!r} would give samples the same keys; "
                "rename one of them"
            )
        seen[prefix] = split
