"""The planner: shards cut while files are still being probed are the shards of the whole plan."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packer.job import normalize_options
from packer.planner import Planner
from packer.probe import Probe
from packer.walk import Candidate, WalkResult


def _walked(layout: str, files: list[tuple[str, str]]) -> WalkResult:
    walked = WalkResult(layout=layout)
    for split, cls in files:
        walked.classes.setdefault(split, [])
        if cls not in walked.classes[split]:
            walked.classes[split].append(cls)
    for n, (split, cls) in enumerate(files):
        rel = f"{split}/{cls}/{n:05d}.jpg" if split else f"{cls}/{n:05d}.jpg"
        walked.candidates.append(Candidate(split, cls, rel, "/nonexistent/" + rel, True))
    return walked


def _probe(ok: bool, n: int) -> Probe:
    if not ok:
        return Probe(False, True, "truncated JPEG")
    return Probe(True, True, "", "jpg", 10 + n % 7, 20 + n % 5, 300 + 97 * n % 2000, f"{n:064x}", f"{n:064x}")


@settings(max_examples=60, deadline=None)
@given(data=st.data(), layout=st.sampled_from(["splits", "flat"]))
def test_shards_cut_while_probing_are_the_whole_plans(data, layout):
    """Fed in any order, the planner hands out every shard exactly once, each only when all
    of its files are probed, in plan order per split; together they are the plan that
    feeding every probe first gives (bad files anywhere, any split sizes)."""
    n = data.draw(st.integers(0, 80))
    if layout == "splits":
        files = [(data.draw(st.sampled_from(["train", "test", "val"])), data.draw(st.sampled_from("abc")))
                 for _ in range(n)]
    else:
        files = [("", data.draw(st.sampled_from("abc"))) for _ in range(n)]
    oks = [data.draw(st.booleans()) or data.draw(st.booleans()) for _ in range(n)]
    options = normalize_options(
        max_count=data.draw(st.integers(1, 9)), max_size=data.draw(st.integers(3000, 40_000)), seed=3,
        resize=None, quality=90, validation_split=0.3 if layout == "flat" else None, layout=layout,
        follow_links=False, validate="structure", max_pixels=10**9,
    )
    walked = _walked(layout, files)
    whole = Planner(walked, options)
    for i in whole.probe_order():
        whole.add(i, _probe(oks[i], i))
    plan, skipped, _ = whole.finish()

    streaming = Planner(walked, options)
    order = list(range(n))
    random.Random(data.draw(st.integers(0, 2**32))).shuffle(order)
    probed: set[int] = set()
    handed: dict[str, list] = {}
    for i in order:
        probed.add(i)
        for shard in streaming.add(i, _probe(oks[i], i)):
            handed.setdefault(shard.split, []).append(shard)
            paths = {s.abs_path for s in shard.samples}
            assert all(c.abs_path not in paths or k in probed for k, c in enumerate(walked.candidates))
    plan2, skipped2, _ = streaming.finish()
    assert plan2.shards == plan.shards
    assert {k: v for k, v in handed.items()} == {k: v for k, v in plan.shards.items() if v}
    assert sorted(skipped2) == sorted(skipped)
    for split, shards in plan.shards.items():
        assert [s.index for s in shards] == list(range(len(shards)))
        keys = [s.key for shard in shards for s in shard.samples]
        assert keys == [f"{split}_{i:09d}" for i in range(len(keys))]  # contiguous, bad files left out
    assert sum(len(s.samples) for shards in plan.shards.values() for s in shards) == sum(oks)


def test_splits_layout_cuts_a_shard_before_the_last_probe():
    """In the splits layout the first shard is ready once its own files are probed."""
    walked = _walked("splits", [("train", "a")] * 30)
    options = normalize_options(max_count=10, max_size=10**9, seed=0, resize=None, quality=90,
                                validation_split=None, layout="splits", follow_links=False,
                                validate="structure", max_pixels=10**9)
    planner = Planner(walked, options)
    order = planner.probe_order()
    made = [shard for i in order[:10] for shard in planner.add(i, _probe(True, i))]
    assert [s.name for s in made] == []  # the 11th sample closes the first shard
    made = planner.add(order[10], _probe(True, order[10]))
    assert [s.name for s in made] == ["train/train-000000.tar"]
    with pytest.raises(ValueError, match="not probed yet"):
        planner.finish()
