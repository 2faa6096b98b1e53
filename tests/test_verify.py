"""``info`` and ``verify`` against real shards: good sets pass, flipped bytes name the shard,
a broken image behind a recomputed checksum is caught by --deep and names the sample."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest
from zoo import SMALL

from packer import pack
from packer.examples import make_example_tree
from packer.format import MANIFEST_NAME, manifest_to_bytes
from packer.inspect import info_text, verify
from packer.storage import read_manifest


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    src = make_example_tree(root / "src", classes=["cat", "rocket"], counts={"train": 12, "test": 4},
                            long_side=SMALL, seed=2)
    shutil.copy(src / "train/cat/img_00000.jpg", src / "test/cat/leak.jpg")
    (src / "train/cat/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    pack(src, root / "out", workers=1, quiet=True, max_count=5)
    return root / "out"


@pytest.fixture
def copy(packed, tmp_path) -> Path:
    shutil.copytree(packed, tmp_path / "out")
    return tmp_path / "out"


def test_good_set_verifies(packed):
    report = verify(str(packed), deep=True)
    assert report.ok, report.problems
    assert (report.shards, report.samples, report.images_decoded) == (7, 33, 33)  # train 24 in 5 shards, test 9 in 2
    assert verify(f"file://{packed}").ok


def test_info_text(packed):
    text = info_text(read_manifest(packed), str(packed))
    assert "classes (2): cat, rocket" in text
    assert "train" in text and "24" in text and "cat 12, rocket 12" in text
    assert "skipped: 1 image-like files" in text and "train/cat/broken.jpg" in text
    assert "1 shared between splits" in text and "test/cat/leak.jpg" in text


def test_flipped_byte_names_the_shard(copy):
    victim = copy / "train" / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    report = verify(str(copy))
    assert not report.ok
    assert any(p.startswith("train/train-000002.tar") for p in report.problems), report.problems
    assert all("train-000002" in p or p.startswith("split train") for p in report.problems)


def test_missing_shard_and_manifest(copy):
    (copy / "test" / "test-000000.tar").unlink()
    report = verify(str(copy))
    assert any("test/test-000000.tar: missing" in p for p in report.problems)
    (copy / MANIFEST_NAME).unlink()
    report = verify(str(copy))
    assert not report.ok and "no manifest.json" in report.problems[0]


def test_deep_names_the_broken_sample(copy):
    """Rewrite a shard with one truncated image and patch the manifest to match its bytes:
    only decoding can tell."""
    manifest = json.loads((copy / MANIFEST_NAME).read_bytes())
    entry = manifest["splits"]["train"]["shards"][1]
    path = copy / entry["name"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim_key = members[3][0].name.split(".")[0]  # second sample's image
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name.startswith(f"{victim_key}.") and not info.name.endswith((".cls", ".json")):
                data = data[: len(data) // 2]
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    entry["bytes"] = len(buf.getvalue())
    (copy / MANIFEST_NAME).write_bytes(manifest_to_bytes(manifest))

    assert verify(str(copy)).ok  # checksums and labels all agree
    report = verify(str(copy), deep=True)
    assert len(report.problems) == 1, report.problems
    assert entry["name"] in report.problems[0] and f"sample {victim_key}" in report.problems[0]


def test_label_disagreement_is_reported(copy):
    manifest = json.loads((copy / MANIFEST_NAME).read_bytes())
    manifest["splits"]["test"]["class_counts"]["cat"] += 1
    manifest["splits"]["test"]["class_counts"]["rocket"] -= 1
    (copy / MANIFEST_NAME).write_bytes(manifest_to_bytes(manifest))
    report = verify(str(copy))
    assert any("class cat" in p for p in report.problems)


def test_images_packed_under_a_raised_max_pixels_are_read_and_verified(tmp_path, monkeypatch):
    """--max-pixels above Pillow's own limit packs images Pillow then refused to open (over
    twice its limit): the reader skipped them and `verify --deep` failed. Both now lift
    Pillow's limit to the pack's. Pillow's limit is lowered here to keep the image small."""
    from PIL import Image

    from packer import pack
    from reader import ShardReader

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for cls, side in (("big", 60), ("small", 8)):  # 3,600 pixels: over twice Pillow's limit
        (tmp_path / "src" / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (side, side), "red").save(tmp_path / "src" / "train" / cls / "a.png")
    manifest = pack(tmp_path / "src", tmp_path / "out", max_pixels=5000, workers=1, quiet=True)
    assert manifest["splits"]["train"]["count"] == 2
    reader = ShardReader(tmp_path / "out", split="train", image_size=4, batch_size=2,
                         shuffle=False, on_error="raise")
    # a spawned DataLoader worker unpickles the reader with Pillow's own limit: each epoch
    # lifts it again
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    labels = [y for _, y in reader]
    assert sorted(labels[0].tolist()) == [0, 1]
    # the torch adapter reads epochs without iter(reader)
    torch_data = pytest.importorskip("reader.torch_data")
    dataset = torch_data.ShardIterableDataset(tmp_path / "out", split="train", image_size=4,
                                              batch_size=2, shuffle=False, on_error="raise")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert sorted(int(v) for _, y in dataset for v in y) == [0, 1]
    report = verify(str(tmp_path / "out"), deep=True)
    assert report.ok, report.problems


def _edited(copy: Path, edit) -> Path:
    manifest = json.loads((copy / MANIFEST_NAME).read_bytes())
    edit(manifest)
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["splits"]["train"]["class_counts"].update(zzz=50), "extra: ['zzz']"),
    (lambda m: m["splits"]["train"]["class_counts"].pop("cat"), "missing: ['cat']"),
    (lambda m: m["classes"].append("dog"), "missing: ['dog']"),
    (lambda m: m["splits"]["train"]["class_counts"].update(cat=11, rocket=13), "class cat has 12"),
])
def test_class_counts_that_do_not_list_exactly_the_classes_are_reported(copy, edit, words):
    """The reader sizes a class subset from class_counts: counts naming a class that is not
    one, or leaving one out, make len() wrong, so verify must not pass them."""
    report = verify(str(_edited(copy, edit)))
    assert not report.ok and any(words in p for p in report.problems), report.problems


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["splits"]["train"]["shards"][0].pop("name"), "shard 0 has no 'name'"),
    (lambda m: m.update(splits=list(m["splits"].values())), "'splits' must be an object"),
    (lambda m: m["splits"]["train"].update(count="24"), "'count' must be a whole number"),
    (lambda m: m["splits"]["train"].update(shards=None), "lacks a 'shards' list"),
    (lambda m: m["splits"]["test"]["shards"][0].update(bytes=-1), "'bytes' must be a whole number"),
    (lambda m: m.update(classes="cat,rocket"), "'classes' must be a list"),
])
def test_a_malformed_manifest_is_a_clear_error_for_info_verify_and_the_reader(copy, edit, words):
    from packer.errors import ManifestError
    from reader import ShardReader

    _edited(copy, edit)
    report = verify(str(copy))
    assert not report.ok and words in report.problems[0]
    with pytest.raises(ManifestError, match=words.replace("[", r"\[").replace("(", r"\(")):
        read_manifest(copy)
    with pytest.raises(ManifestError):
        ShardReader(copy, split="test")


def test_a_manifest_without_a_shards_sha256_says_so(copy):
    """The reader reads such a shard unchecked; verify said 'sha256 differs' (misleading)."""
    report = verify(str(_edited(copy, lambda m: m["splits"]["train"]["shards"][0].pop("sha256"))))
    assert not report.ok
    assert any("gives no sha256" in p for p in report.problems), report.problems
    assert not any("differs" in p for p in report.problems)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(skipped=[{"path": "train/cat/x.jpg"}]), "'skipped'"),  # no reason
    (lambda m: m.update(skipped="none"), "'skipped'"),
    (lambda m: m.update(ignored="3"), "'ignored'"),
    (lambda m: m.update(duplicates=[]), "'duplicates'"),
    (lambda m: m["duplicates"]["across_splits"][0].pop("splits"), "'duplicates'"),
    (lambda m: m.update(options="packed by hand"), "'options'"),
    (lambda m: m["options"].update(resize="64"), "'options.resize'"),
    (lambda m: m.update(warnings="none"), "'warnings'"),
])
def test_a_malformed_optional_field_is_named_by_info_and_verify_and_never_stops_a_reader(copy, edit, field):
    """Readers need none of the report fields; a hand edit of one crashed `info` with a
    KeyError or AttributeError while `verify` said OK. Now `info` shows what it can and
    names the field, `verify` reports it, and the reader reads as before."""
    from reader import ShardReader

    _edited(copy, edit)
    text = info_text(read_manifest(copy), str(copy))
    assert f"NOTE: manifest field {field} is malformed" in text
    assert "classes (2): cat, rocket" in text and "cat 12, rocket 12" in text
    report = verify(str(copy))
    assert not report.ok and [p for p in report.problems if field in p] == report.problems
    assert len(report.problems) == 1 and report.samples == 33
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either (options.resize is read for one)
        reader = ShardReader(copy, split="test", image_size=(8, 8), batch_size=4, shuffle=False)
    assert sum(len(y) for _, y in reader) == 9
