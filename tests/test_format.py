"""The on-disk contract: key rules (Hypothesis), sizes, manifest parsing, and a golden
manifest for a tiny tree of hand-written BMPs (no encoder involved, so every byte is pinned)."""

from __future__ import annotations

import json
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zoo import bmp_bytes

from packer import pack
from packer.errors import FormatVersionError, ManifestError, SplitNotFoundError
from packer.format import (
    FORMAT_VERSION,
    IMAGE_MEMBER_EXTS,
    MANIFEST_NAME,
    byte_sum,
    manifest_to_bytes,
    member_names,
    parse_manifest,
    sample_key,
    shard_name,
    split_info,
    split_member_name,
)
from packer.sizes import format_size, parse_size


@given(st.one_of(st.binary(max_size=2000), st.integers(0, 2000).map(lambda n: b"\xff" * n)))
def test_byte_sum_is_the_sum_of_the_bytes_for_any_length(data: bytes) -> None:
    # the tar checksum shortcut (Adler-32 over 256-byte pieces) must never wrap, even when
    # every byte is 255
    assert byte_sum(data) == sum(data)
    assert byte_sum(memoryview(data)) == sum(data)


split_names = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=20)


@given(split=split_names, position=st.integers(0, 10**9 - 1))
def test_sample_key_has_no_dot_and_round_trips(split, position):
    key = sample_key(split, position)
    assert "." not in key and "/" not in key
    for ext in sorted(IMAGE_MEMBER_EXTS) + ["cls", "json"]:
        for name in member_names(key, ext):
            assert split_member_name(name)[0] == key
        assert split_member_name(f"{key}.{ext}") == (key, ext)


@given(split=split_names, a=st.integers(0, 10**9 - 1), b=st.integers(0, 10**9 - 1))
def test_sample_keys_unique_within_a_split(split, a, b):
    assert (sample_key(split, a) == sample_key(split, b)) == (a == b)


@given(
    directory=st.lists(st.text("abc.é_-", min_size=1, max_size=5), max_size=3),
    stem=st.text(st.characters(exclude_characters="./\x00"), min_size=1, max_size=10),
    ext=st.text(st.characters(exclude_characters="/\x00"), max_size=10),
)
def test_split_member_name_like_webdataset(directory, stem, ext):
    """The key ends at the first dot of the base name; directories may hold dots."""
    prefix = "/".join(directory + [stem])
    name = f"{prefix}.{ext}"
    assert split_member_name(name) == (prefix, ext.lower())
    assert split_member_name(prefix) == (prefix, "")


def test_shard_name():
    assert shard_name("train", 3) == "train/train-000003.tar"


@pytest.mark.parametrize("text, value", [
    ("256MB", 256_000_000), ("1KiB", 1024), ("1kib", 1024), ("4096", 4096), (4096, 4096),
    ("1.5GiB", 3 * 2**29), ("2 GB", 2 * 10**9), ("10KB", 10_000), ("1B", 1), ("3MiB", 3 * 2**20),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MB", "12XB", "-5MB", "0", 0, -1, "1.5.5MB", "ten MB", "0.0001KB"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_a_one_letter_unit_is_ambiguous_and_refused_with_both_spellings():
    with pytest.raises(ValueError, match="256MB .* or 256MiB"):
        parse_size("256M")
    with pytest.raises(ValueError, match="1.5GB .* or 1.5GiB"):
        parse_size("1.5g")


def test_format_size():
    assert format_size(999) == "999 B"
    assert format_size(256_000_000) == "256.0 MB"


def test_parse_manifest_checks_and_defaults():
    minimal = {"format": "shardpack", "version": 1, "classes": ["a"],
               "splits": {"train": {"shards": [{"name": "train/train-000000.tar", "count": 3}]}}}
    manifest = parse_manifest(json.dumps(minimal))
    assert manifest["skipped"] == [] and manifest["ignored"] == 0
    assert manifest["splits"]["train"]["count"] == 3
    assert manifest["duplicates"] == {"within_split": [], "across_splits": []}
    with pytest.raises(FormatVersionError, match="upgrade"):
        parse_manifest({**minimal, "version": FORMAT_VERSION + 1})
    with pytest.raises(ManifestError, match="not a shardpack manifest"):
        parse_manifest({"format": "mds"})
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{")
    with pytest.raises(ManifestError, match="classes"):
        parse_manifest({"format": "shardpack", "version": 1, "splits": {}})
    with pytest.raises(SplitNotFoundError, match=r"available splits: \['train'\]"):
        split_info(manifest, "test")


def _with_train(**split):
    shards = split.pop("shards", [{"name": "train/train-000000.tar", "count": 3}])
    return {"format": "shardpack", "version": 1, "classes": ["a", "b"],
            "splits": {"train": {"shards": shards, **split}}}


@pytest.mark.parametrize("manifest, words", [
    # a reader trusts these: len() and the cardinality from count, labels from classes
    (_with_train(count=4), "its shards hold 3 samples, its 'count' says 4"),
    (_with_train(count=3, class_counts={"a": 1, "b": 1}), "'class_counts' add up to 2"),
    (_with_train(class_counts={"a": 3, "c": 0}), r"extra: \['c'\], missing: \['b'\]"),
    ({**_with_train(), "classes": []}, "holds samples but 'classes' is empty"),
    (_with_train(shards=[{"name": "train/train-000000.tar", "count": 1}] * 2), "listed twice"),
    # names are joined to the source: none may leave it (an upload deletes dropped ones)
    (_with_train(shards=[{"name": "../outside.tar", "count": 3}]), "not a relative path inside"),
    (_with_train(shards=[{"name": "/etc/x.tar", "count": 3}]), "not a relative path inside"),
    (_with_train(shards=[{"name": "train//x.tar", "count": 3}]), "not a relative path inside"),
    (_with_train(shards=[{"name": "s3://b/x.tar", "count": 3}]), "not a relative path inside"),
    (_with_train(shards=[{"name": "train\\..\\x.tar", "count": 3}]), "not a relative path inside"),
    ({**_with_train(), "version": True}, "version"),
    ("[" * 100_000 + "]" * 100_000, "nested too deep"),
])
def test_a_manifest_that_contradicts_itself_is_refused(manifest, words):
    with pytest.raises(ManifestError, match=words):
        parse_manifest(manifest if isinstance(manifest, str) else json.dumps(manifest))


def test_every_split_name_the_walk_takes_gives_shard_names_a_reader_takes(tmp_path):
    """`train:2024` packed, then info, verify and every reader refused the manifest (a colon
    was taken for a drive or URL); a backslash or a drive-like start is refused at the walk."""
    from packer.errors import LayoutError
    from packer.format import split_name_problem
    from packer.walk import walk_tree

    for split in ("train:2024", "val.1", "a b", "xy:z", "ab:c"):
        assert split_name_problem(split) is None
        parse_manifest(json.dumps(_with_train(shards=[{"name": shard_name(split, 0), "count": 3}])))
    for split in ("a\\b", "c:x", "C:"):
        assert split_name_problem(split) is not None
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.jpg").write_bytes(b"x")
        with pytest.raises(LayoutError, match="backslash nor start with a letter and a colon"):
            walk_tree(tmp_path)
        (tmp_path / split / "cat" / "a.jpg").unlink()
    # a split folder named like OUT's manifest: every shard was written, then the manifest
    # could not be (a folder had its name), and a re-run crashed
    for split in ("manifest.json", "Manifest.JSON"):  # images by name, then by content alone
        assert "may not be named manifest.json" in split_name_problem(split)
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.jpg").write_bytes(b"x")
        with pytest.raises(LayoutError, match=f"split folder '{split}': a split may not be named manifest.json"):
            walk_tree(tmp_path)
        (tmp_path / split / "cat" / "a.jpg").unlink()  # a JPEG named otherwise: packed by content
        (tmp_path / split / "cat" / "photo_0001.dat").write_bytes(b"\xff\xd8\xff\xe0" + bytes(16))
        with pytest.raises(LayoutError, match="a split may not be named manifest.json"):
            walk_tree(tmp_path)
        (tmp_path / split / "cat" / "photo_0001.dat").unlink()


def test_only_shard_shaped_names_inside_the_root_are_ones_a_repack_may_delete():
    from packer.format import is_shard_name, named_shards

    assert is_shard_name("train/train-000001.tar") and is_shard_name("a b/a b-1234567.tar")
    for name in ("../..-000001.tar", "./.-000001.tar", "notes/precious.txt", "train/val-000001.tar",
                 "x\\y/x\\y-000001.tar", "train/train-000001.tar.bak"):
        assert not is_shard_name(name), name
    manifest = {"splits": {"train": {"shards": [{"name": "train/train-000001.tar"},
                                                {"name": "notes/precious.txt"}, {"count": 1}]}}}
    assert named_shards(manifest) == {"train/train-000001.tar"}


# ---- golden manifest -------------------------------------------------------------------

GOLDEN_TREE = {  # rel path -> pixel colour of a 2x2 BMP
    "train/blue/a.bmp": (0, 0, 255),
    "train/blue/b.bmp": (0, 0, 200),
    "train/red/c.bmp": (255, 0, 0),
    "test/red/d.bmp": (200, 0, 0),
}

GOLDEN = {
    "format": "shardpack",
    "version": 1,
    "classes": ["blue", "red"],
    "splits": {
        "test": {"count": 1, "class_counts": {"blue": 0, "red": 1}, "shards": [
            {"name": "test/test-000000.tar", "count": 1, "bytes": 10240,
             "sha256": "969b7ca471d88543ef7a94a8503ffbb3196c6543a4df6f3ecdaacb804001b362"}]},
        "train": {"count": 3, "class_counts": {"blue": 2, "red": 1}, "shards": [
            {"name": "train/train-000000.tar", "count": 2, "bytes": 10240,
             "sha256": "b48f7b47dec419aa31eea97b65ce444fc39f79cd31d1c4ed48cfb0ec3c0b247b"},
            {"name": "train/train-000001.tar", "count": 1, "bytes": 10240,
             "sha256": "678bce87d4128afbf0cb17d76abb056948ce82298ab2cbfd716513040a16cd8e"}]},
    },
    "skipped": [],
    "ignored": 0,
    "duplicates": {"within_split": [], "across_splits": []},
    "seed": 0,
    "options": {"max_count": 2, "max_size": 256_000_000, "seed": 0, "resize": None,
                "validation_split": None, "layout": "splits", "follow_links": False,
                "validate": "structure", "max_pixels": 89_478_485},
}
GOLDEN_ORDER = {  # shard -> source paths in member order (seeded shuffle, seed 0)
    "test/test-000000.tar": ["test/red/d.bmp"],
    "train/train-000000.tar": ["train/blue/b.bmp", "train/red/c.bmp"],
    "train/train-000001.tar": ["train/blue/a.bmp"],
}

GOLDEN_KEYS = {
    "test/test-000000.tar": ["test_000000000"],
    "train/train-000000.tar": ["train_000000000", "train_000000001"],
    "train/train-000001.tar": ["train_000000002"],
}


def test_golden_manifest(tmp_path):
    for rel, rgb in GOLDEN_TREE.items():
        path = tmp_path / "src" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bmp_bytes(2, 2, rgb))
    manifest = pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True, max_count=2)
    on_disk = (tmp_path / "out" / MANIFEST_NAME).read_bytes()
    assert on_disk == manifest_to_bytes(manifest)
    assert json.loads(on_disk) == manifest
    assert list(manifest)[:5] == ["format", "version", "created_by", "classes", "splits"]
    for field, expected in GOLDEN.items():
        if field == "splits":
            assert list(manifest["splits"]) == list(expected)
            for split, info in expected.items():
                got = manifest["splits"][split]
                assert {k: got[k] for k in ("count", "class_counts")} == {k: info[k] for k in ("count", "class_counts")}
                for got_shard, want_shard in zip(got["shards"], info["shards"], strict=True):
                    assert {k: got_shard[k] for k in want_shard} == want_shard
                    assert len(got_shard["fingerprint"]) == 64
        else:
            assert manifest[field] == expected, field
    for shard, paths in GOLDEN_ORDER.items():
        with tarfile.open(tmp_path / "out" / shard) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 and m.uname == "" for m in members)
            metas = [json.loads(tar.extractfile(m).read()) for m in members if m.name.endswith(".json")]
            assert [m["path"] for m in metas] == paths
            assert [m.name for m in members][::3] == [f"{k}.bmp" for k in GOLDEN_KEYS[shard]]
        assert metas[0]["width"] == metas[0]["height"] == 2
    assert manifest["splits"]["train"]["shards"][1]["name"] == "train/train-000001.tar"


@given(path=st.text(), class_name=st.text(), label=st.integers(0, 10**6),
       width=st.integers(1, 10**5), height=st.integers(1, 10**5))
def test_sample_json_fast_path_is_json_dumps(path, class_name, label, width, height):
    from packer.format import sample_json

    record = {"path": path, "class": class_name, "label": label, "width": width, "height": height}
    try:
        want = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: neither way can encode them
        with pytest.raises(UnicodeEncodeError):
            sample_json(**{"class_name": class_name, "path": path, "label": label,
                           "width": width, "height": height})
        return
    assert sample_json(path=path, class_name=class_name, label=label, width=width,
                       height=height) == want
    assert json.loads(want) == record


def test_a_taken_down_stand_in_is_known_by_its_field_and_refused_by_readers():
    """The stand-in a role without s3:DeleteObject puts over the manifest while shards
    change: known by its "taken_down" field (a later wording of the reason too), refused by
    readers with the reason, and never taken for a real manifest."""
    import json

    from packer.errors import ManifestError
    from packer.format import TAKEN_DOWN, is_taken_down, parse_manifest

    reworded = json.dumps({"format": "shardpack", "version": 1, "taken_down": "being replaced"}).encode()
    assert is_taken_down(TAKEN_DOWN) and is_taken_down(reworded)
    assert not is_taken_down(None) and not is_taken_down(b"{not json")
    assert not is_taken_down(json.dumps({"format": "shardpack", "version": 1, "classes": [],
                                         "splits": {}, "taken_down": "x"}).encode())
    with pytest.raises(ManifestError, match="taken down: being replaced"):
        parse_manifest(reworded)
