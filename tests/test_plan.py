"""The plan as data: shard cutting (Hypothesis), class map, seeded orders, flat splits,
duplicate detection; and that the planned tar size is the real tar size."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from packer.plan import (
    Plan,
    PlannedSample,
    PlannedShard,
    archive_bytes,
    class_map,
    cut_shards,
    find_duplicates,
    order_split,
    split_flat_pool,
)
from packer.write import ustar_header


def sample(i: int, size: int, *, label: int = 0, path: str | None = None, digest: str = "") -> PlannedSample:
    rel_path = path or f"train/c/{i}.jpg"
    return PlannedSample(
        key=f"train_{i:09d}", rel_path=rel_path, abs_path=f"/nonexistent/{rel_path}",
        ext="jpg", label=label, class_name="c", width=1, height=1, size=size,
        digest=f"{i:032x}", source_digest=digest or f"{i:032x}",
    )


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60_000), max_size=60),
    max_count=st.integers(1, 12),
    max_size=st.integers(1, 200_000),
)
def test_cut_shards_respects_limits_and_keeps_order(sizes, max_count, max_size):
    samples = [sample(i, s) for i, s in enumerate(sizes)]
    shards = cut_shards(samples, split="train", max_count=max_count, max_size=max_size)
    flat = [s for shard in shards for s in shard.samples]
    assert flat == samples  # every sample once, order preserved
    assert [shard.index for shard in shards] == list(range(len(shards)))
    for shard in shards:
        assert 1 <= len(shard.samples) <= max_count
        assert shard.planned_bytes <= max_size or len(shard.samples) == 1
    for a, b in zip(shards, shards[1:], strict=False):  # greedy: a shard closes only when the next sample does not fit
        fits = len(a.samples) < max_count and archive_bytes(
            [s.tar_bytes() for s in a.samples] + [b.samples[0].tar_bytes()]) <= max_size
        assert not fits


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=8))
def test_planned_bytes_equal_real_tar_bytes(sizes):
    """The exact-size arithmetic the cut relies on agrees with tarfile's USTAR output."""
    shard = PlannedShard("train", 0, tuple(sample(i, s) for i, s in enumerate(sizes)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for s in shard.samples:
            for name, payload in ((f"{s.key}.jpg", b"x" * s.size), (f"{s.key}.cls", str(s.label).encode()),
                                  (f"{s.key}.json", s.json_bytes())):
                tar.addfile(_member(name, len(payload)), io.BytesIO(payload))
    assert len(buf.getvalue()) == shard.planned_bytes


def _member(name: str, size: int) -> tarfile.TarInfo:
    """The reference: CPython's tarfile with our fixed header fields."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@settings(max_examples=100, deadline=None)
@given(key=st.from_regex(r"[a-z_]{1,20}_[0-9]{9}", fullmatch=True),
       ext=st.sampled_from(["jpg", "png", "cls", "json"]), size=st.integers(0, 8**11 - 1))
def test_hand_written_ustar_header_equals_tarfile(key, ext, size):
    name = f"{key}.{ext}"
    assert ustar_header(name, size) == _member(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_class_map_is_sorted_union():
    assert class_map({"train": ["b", "a"], "test": ["c", "a"], "val": []}) == ["a", "b", "c"]


@given(st.lists(st.text("abcdef/", min_size=1, max_size=6), unique=True, max_size=30), st.randoms())
def test_order_split_ignores_listing_order(paths, rnd):
    shuffled = list(paths)
    rnd.shuffle(shuffled)
    a = order_split(paths, split="train", seed=0, path_of=str)
    assert a == order_split(shuffled, split="train", seed=0, path_of=str)
    assert sorted(a) == sorted(paths)


def test_order_split_seeded_by_split_name():
    items = [f"x/{i}" for i in range(50)]
    train = order_split(items, split="train", seed=0, path_of=str)
    assert train != order_split(items, split="test", seed=0, path_of=str)
    assert train != order_split(items, split="train", seed=1, path_of=str)
    assert train == order_split(items, split="train", seed=0, path_of=str)


def test_split_flat_pool_is_stratified_and_seeded():
    items = [(c, f"{c}/{i}") for c, n in (("a", 50), ("b", 20), ("c", 3)) for i in range(n)]
    kw = {"class_of": lambda it: it[0], "path_of": lambda it: it[1], "validation_split": 0.2}
    one = split_flat_pool(items, seed=0, **kw)
    assert Counter(c for c, _ in one["validation"]) == {"a": 10, "b": 4, "c": 1}
    assert sorted(one["train"] + one["validation"]) == sorted(items)
    assert one == split_flat_pool(list(reversed(items)), seed=0, **kw)
    assert one["validation"] != split_flat_pool(items, seed=1, **kw)["validation"]


def test_find_duplicates():
    plan = Plan(classes=["c"])
    plan.shards["train"] = [PlannedShard("train", 0, (
        sample(0, 1, path="train/c/a.jpg", digest="aa"), sample(1, 1, path="train/c/b.jpg", digest="aa"),
        sample(2, 1, path="train/c/x.jpg", digest="bb"), sample(3, 1, path="train/c/y.jpg", digest="cc")))]
    plan.shards["test"] = [PlannedShard("test", 0, (sample(4, 1, path="test/c/x2.jpg", digest="bb"),))]
    read = []

    def sha256_of(abs_path, digest):
        read.append(abs_path)
        return f"sha-of-{digest}"

    dup = find_duplicates(plan, sha256_of)
    assert dup["within_split"] == [{"split": "train", "sha256": "sha-of-aa", "paths": ["train/c/a.jpg", "train/c/b.jpg"]}]
    assert dup["across_splits"] == [{"splits": ["test", "train"], "sha256": "sha-of-bb",
                                     "paths": ["test/c/x2.jpg", "train/c/x.jpg"]}]
    # one file per group is read again (the first by split and path); never a unique one
    assert sorted(read) == ["/nonexistent/test/c/x2.jpg", "/nonexistent/train/c/a.jpg"]


def test_find_duplicates_reports_what_was_packed_when_sources_change_afterwards():
    """A group is its samples' digests, i.e. what the shards hold: a file changed or gone
    since it was packed stays in its group, which is named by a file still as packed (or
    None when none is)."""
    plan = Plan(classes=["c"])
    plan.shards["train"] = [PlannedShard("train", 0, (
        *(sample(i, 1, path=f"train/c/{name}.jpg", digest="dd") for i, name in enumerate("abc")),
        sample(3, 1, path="train/c/p.jpg", digest="ee"), sample(4, 1, path="train/c/q.jpg", digest="ee")))]
    plan.shards["test"] = [PlannedShard("test", 0, (sample(5, 1, path="test/c/z.jpg", digest="dd"),))]
    as_packed = {"c": "s-dd"}  # a and b changed or vanished after their shard was written

    dup = find_duplicates(plan, lambda abs_path, digest: as_packed.get(abs_path.rsplit("/", 1)[1][:-4]))
    assert dup == {
        "within_split": [{"split": "train", "sha256": "s-dd", "paths": ["train/c/a.jpg", "train/c/b.jpg", "train/c/c.jpg"]},
                         {"split": "train", "sha256": None, "paths": ["train/c/p.jpg", "train/c/q.jpg"]}],
        "across_splits": [{"splits": ["test", "train"], "sha256": "s-dd",
                           "paths": ["test/c/z.jpg", "train/c/a.jpg", "train/c/b.jpg", "train/c/c.jpg"]}],
    }


def test_source_sha256_only_of_a_file_still_as_packed(tmp_path):
    from packer.digest import content_digest
    from packer.job import source_sha256

    path = tmp_path / "a.jpg"
    path.write_bytes(b"packed bytes")
    digest = content_digest(b"packed bytes")
    assert source_sha256(str(path), digest) == hashlib.sha256(b"packed bytes").hexdigest()
    path.write_bytes(b"edited later")
    assert source_sha256(str(path), digest) is None
    path.unlink()
    assert source_sha256(str(path), digest) is None


def test_fingerprint_depends_on_content_and_options():
    shard = PlannedShard("train", 0, (sample(0, 10),))
    other = PlannedShard("train", 0, (sample(1, 10),))
    assert shard.fingerprint({"seed": 0}) == shard.fingerprint({"seed": 0})
    assert shard.fingerprint({"seed": 0}) != shard.fingerprint({"seed": 1})
    assert shard.fingerprint({"seed": 0}) != other.fingerprint({"seed": 0})


@settings(max_examples=200, deadline=None)
@given(path=st.text(min_size=1, max_size=40), class_name=st.text(min_size=1, max_size=20),
       label=st.integers(0, 10_000), ext=st.sampled_from(["jpg", "png", "webp"]))
def test_fingerprint_line_is_json_dumps(path, class_name, label, ext):
    """Fingerprints format each sample's line directly; the text must stay json.dumps' (a
    fingerprint recorded by an earlier version must still match on resume)."""
    import json

    from packer.plan import _fingerprint_line

    s = PlannedSample(key="train_000000001", rel_path=path, abs_path="/x", ext=ext, label=label,
                      class_name=class_name, width=3, height=4, size=10, digest="ab" * 16,
                      source_digest="ab" * 16)
    assert _fingerprint_line(s) == json.dumps([s.key, s.ext, s.label, s.digest, s.json_bytes().decode()])
    assert s.tar_bytes() == sum(-(-n // 512) * 512 + 512 for n in (10, len(str(label)), len(s.json_bytes())))
