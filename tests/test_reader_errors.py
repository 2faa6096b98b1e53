"""Error policy end to end: broken samples skipped and counted (or raised); URLs via fsspec."""

from __future__ import annotations

import io
import shutil

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from packer.errors import SampleDecodeError, ShardReadError
from reader import ShardReader


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def shards_with_a_broken_image(tmp_path):
    with wds.ShardWriter(str(tmp_path / "e-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(20):
            image = b"not an image at all" if i == 13 else _png(i)
            sink.write({"__key__": f"k{i:04d}", "png": image, "cls": i % 2})
    return str(tmp_path / "e-{000000..000001}.tar")


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_broken_sample_is_skipped_with_a_warning_and_counted(shards_with_a_broken_image, dtype):
    reader = ShardReader(shards_with_a_broken_image, num_classes=2, image_size=4, batch_size=8,
                         shuffle=False, dtype=dtype)
    with pytest.warns(RuntimeWarning, match=r"sample k0013 in shard .*e-000001\.tar: cannot decode"):
        batches = list(reader)
    assert {x.dtype for x, _ in batches} == {np.dtype(dtype)}  # the refilled batches too
    values = np.concatenate([x[:, 0, 0, 0] for x, _ in batches]).astype(int).tolist()
    assert values == [i for i in range(20) if i != 13]  # the rest, in order, batches refilled
    assert [len(x) for x, _ in batches] == [8, 8, 3]
    assert reader.policy.skipped_samples == 1


def test_ignore_is_silent_and_warn_says_so_at_the_end_of_the_epoch(shards_with_a_broken_image, caplog):
    """on_error="ignore" skips silently (still counted); the end-of-epoch count was logged
    as a warning under "ignore" too."""
    import warnings as py_warnings

    for on_error, loud in (("ignore", False), ("warn", True)):
        caplog.clear()
        reader = ShardReader(shards_with_a_broken_image, num_classes=2, image_size=4, batch_size=8,
                             shuffle=False, on_error=on_error)
        with py_warnings.catch_warnings():
            py_warnings.simplefilter("ignore" if loud else "error")
            list(reader)
        assert reader.policy.skipped_samples == 1
        at_warning = [r for r in caplog.records if r.levelname == "WARNING" and "skipped 1" in r.getMessage()]
        assert bool(at_warning) is loud, on_error


def test_broken_sample_raises_when_asked(shards_with_a_broken_image):
    reader = ShardReader(shards_with_a_broken_image, num_classes=2, image_size=4, on_error="raise")
    with pytest.raises(SampleDecodeError, match="k0013") as info:
        list(reader)
    assert info.value.key == "k0013" and info.value.shard.endswith("e-000001.tar")


def test_file_url_and_other_fsspec_filesystems(id_shards):
    shards, _ = id_shards
    local = ShardReader(shards, split="test", image_size=4, shuffle=False)
    expected = np.concatenate([y for _, y in local])
    url = ShardReader(f"file://{shards}", split="test", image_size=4, shuffle=False)
    assert np.array_equal(np.concatenate([y for _, y in url]), expected)
    memory = fsspec.filesystem("memory")
    for path in shards.rglob("*"):
        if path.is_file():
            with memory.open(f"/ds/{path.relative_to(shards)}", "wb") as f, open(path, "rb") as src:
                shutil.copyfileobj(src, f)
    mem = ShardReader("memory://ds", split="test", image_size=4, shuffle=False)
    assert np.array_equal(np.concatenate([y for _, y in mem]), expected)
    assert mem.filenames == local.filenames


def _flip_a_payload_byte(shard) -> None:
    """Corrupt one pixel byte and set the mtime back, as a careless copy tool would."""
    import os

    st = shard.stat()
    data = bytearray(shard.read_bytes())
    at = data.index(b"IDAT") + 8  # inside the first image's pixel data: no tar checksum covers it
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_local_shard_checksum_is_verified_and_again_after_a_change(id_shards, tmp_path):
    """A local shard is checked against the manifest's sha256 the first time it is read in a
    process; later epochs skip the hash only while the file is unchanged (its ctime too, so
    a same-size rewrite with the old mtime is caught)."""
    from packer.errors import ChecksumError

    shards = tmp_path / "copy"
    shutil.copytree(id_shards[0], shards)
    reader = ShardReader(shards, split="test", image_size=4, shuffle=False)
    first = np.concatenate([y for _, y in reader])
    assert np.array_equal(np.concatenate([y for _, y in reader]), first)  # the unhashed epoch
    shard = sorted((shards / "test").glob("*.tar"))[0]
    _flip_a_payload_byte(shard)
    with pytest.raises(ChecksumError, match="does not match"):
        list(reader)
    fresh = tmp_path / "fresh"
    shutil.copytree(id_shards[0], fresh)
    _flip_a_payload_byte(sorted((fresh / "test").glob("*.tar"))[0])
    with pytest.raises(ChecksumError):
        list(ShardReader(fresh, split="test", image_size=4, shuffle=False))


def test_checksum_is_compared_when_the_last_read_block_holds_only_tar_padding(id_shards, tmp_path):
    """The reader stops parsing at the end-of-archive marker; the rest of the file (its
    padding) is still read, so the sha256 is compared. Here the shard is 8 MiB + 8 KiB and
    its end-of-archive marker starts in the last 512 bytes of the first 8 MiB read block,
    and a label byte is flipped: without reading the padding after it, the wrong label was
    delivered with no error."""
    import hashlib
    import json

    from packer.errors import ChecksumError

    shards = tmp_path / "copy"
    shutil.copytree(id_shards[0], shards)
    image = _png(7)
    members_end = (8 << 20) - 512  # header + padded image + .cls member (header + one block)
    image = image + b"\0" * (members_end - 3 * 512 - len(image))  # bytes after IEND: ignored
    data = bytearray(_tar([("k0.png", image), ("k0.cls", b"1")]))
    assert len(data) % (8 << 20) == 8192  # the last 8 MiB read block is end-of-archive padding
    manifest = json.loads((shards / "manifest.json").read_text())
    for old in (shards / "test").glob("*.tar"):
        old.unlink()
    manifest["splits"]["test"]["count"] = 1
    manifest["splits"]["test"]["class_counts"] = {"circle": 0, "square": 1, "triangle": 0}
    manifest["splits"]["test"]["shards"] = [{
        "name": "test/test-000000.tar", "count": 1, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cls_at = data.index(b"k0.cls") + 512  # the label's byte, after the member's header
    data[cls_at : cls_at + 1] = b"0"
    (shards / "test" / "test-000000.tar").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="does not match"):
        list(ShardReader(shards, split="test", image_size=4, shuffle=False))


def test_an_unreadable_label_goes_to_the_error_policy(tmp_path):
    """A foreign tar whose ``.cls`` is not a number (or whose ``.json`` is not JSON) loses
    that sample, counted, under on_error="warn" and raises under "raise"; it never ends the
    epoch with a bare ValueError."""
    with wds.TarWriter(str(tmp_path / "foreign.tar")) as sink:
        for key, label in (("a", b"0"), ("b", b"dog"), ("c", b"1")):
            sink.write({"__key__": key, "png": _png(3), "cls": label})
        sink.write({"__key__": "d", "png": _png(4), "json": b"{not json"})
    url = str(tmp_path / "foreign.tar")
    reader = ShardReader([url], num_classes=2, image_size=4, batch_size=8, shuffle=False,
                         on_error="warn", num_workers=1)
    with pytest.warns(RuntimeWarning, match="unreadable label"):
        labels = np.concatenate([y for _, y in reader])
    assert labels.tolist() == [0, 1]
    with pytest.raises(SampleDecodeError, match="unreadable label"):
        list(ShardReader([url], num_classes=2, image_size=4, shuffle=False, on_error="raise"))


@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_nothing_of_a_shard_that_cannot_match_its_checksum_is_read_under_warn(id_shards, tmp_path, damage):
    """A shard file shorter than the manifest says cannot match its sha256, and its last
    8 MiB (all of these small shards) go out only after the hash matched: under
    on_shard_error="warn" nothing of it is read. The samples before the cut used to be
    handed out unchecked, so another shard's file copied over it (shorter) gave that
    shard's samples as its own, twice in one epoch. "raise" names the truncation."""
    from conftest import sample_ids

    from packer.errors import ShardReadError

    shards = tmp_path / "copy"
    shutil.copytree(id_shards[0], shards)
    first, second, *rest = sorted((shards / "train").glob("*.tar"))
    if damage == "truncated":
        first.write_bytes(first.read_bytes()[: first.stat().st_size * 6 // 10])
    else:
        shutil.copy(rest[-1], first)  # the last shard holds fewer samples: a shorter file
    reader = ShardReader(shards, split="train", image_size=4, shuffle=False, on_shard_error="warn",
                         batch_size=16)
    with pytest.warns(RuntimeWarning, match="truncated"):
        ids = [i for x, _ in reader for i in sample_ids(x)]
    whole = ShardReader(id_shards[0], split="train", image_size=4, shuffle=False, batch_size=210)
    others = [i for x, _ in whole for i in sample_ids(x)][whole.shard_counts()[0]:]
    assert ids[: len(others)] == others  # every other shard's samples, once, in order
    assert reader.policy.skipped_shards == 1
    assert ids[len(others):] == others[: 210 - len(others)]  # then the epoch's fill
    with pytest.raises(ShardReadError, match="truncated"):
        list(ShardReader(shards, split="train", image_size=4, shuffle=False))



def _copy_with_a_changed_last_label(shards, tmp_path, split):
    """A copy of ``shards`` whose ``split`` shard has its last sample's .cls digit changed
    (same size, tar structure intact: only the manifest's sha256 can tell)."""
    import tarfile

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = sorted((copy / split).glob("*.tar"))[-1]
    with tarfile.open(shard) as tar:
        last_cls = [m for m in tar.getmembers() if m.name.endswith(".cls")][-1]
    data = bytearray(shard.read_bytes())
    data[last_cls.offset_data] = ord("1") if data[last_cls.offset_data] != ord("1") else ord("2")
    shard.write_bytes(bytes(data))
    return copy


@pytest.fixture(scope="module")
def one_big_shard(tmp_path_factory):
    """A split of 10 noise PNGs (~2 MB each) packed as one ~21 MB shard: more than two of
    the reader's 8 MiB read blocks, so a reader that stops mid-shard never reads its end."""
    from packer import pack

    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / "src" / "big" / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png", compress_level=1)
    pack(root / "src", root / "shards", seed=0, workers=1, quiet=True)
    assert len(list((root / "shards" / "big").glob("*.tar"))) == 1
    return root / "shards"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reading_part_of_a_shard_still_compares_its_checksum(one_big_shard, tmp_path, rank):
    """Two ranks split the one shard; its last label is changed. The rank that reads only
    the first half must fail too: it reads the rest of the shard (without using it) so the
    sha256 is compared, instead of handing on samples from a damaged shard."""
    from packer.errors import ChecksumError

    copy = _copy_with_a_changed_last_label(one_big_shard, tmp_path, "big")
    reader = ShardReader(copy, split="big", image_size=4, batch_size=2, rank=rank, world_size=2)
    (piece,) = reader.epoch_pieces(0)
    assert (piece.start, piece.stop) in ((0, 5), (5, 10))
    with pytest.raises(ChecksumError):
        list(reader)


def test_labels_and_filenames_come_only_from_a_shard_that_matches_its_checksum(one_big_shard, tmp_path):
    from packer.errors import ChecksumError

    copy = _copy_with_a_changed_last_label(one_big_shard, tmp_path, "big")
    with pytest.raises(ChecksumError):
        _ = ShardReader(copy, split="big", shuffle=False).labels
    good = ShardReader(one_big_shard, split="big", shuffle=False)
    assert len(good.labels) == len(good.filenames) == 10


def test_a_piece_of_a_shard_verified_before_reads_only_its_samples(one_big_shard, tmp_path, monkeypatch):
    """Reading the rest of a shard is for its checksum only: once this process has verified
    the (local) shard, a rank reading its first 3 of 10 samples reads about 3/10 of it."""
    import reader.samples

    copy = tmp_path / "shards"
    shutil.copytree(one_big_shard, copy)
    shard_bytes = next((copy / "big").glob("*.tar")).stat().st_size
    read = []
    real_open = reader.samples.open_shard

    class Counting(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def readable(self):
            return True

        def readinto(self, b):
            n = self.f.readinto(b)
            read.append(n or 0)
            return n

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(reader.samples, "open_shard", lambda url, **kw: Counting(real_open(url, **kw)))
    whole = ShardReader(copy, split="big", image_size=4, batch_size=5)
    assert sum(len(y) for _, y in whole) == 10  # verifies the shard
    assert sum(read) >= shard_bytes
    read.clear()
    rank0 = ShardReader(copy, split="big", image_size=4, batch_size=5, rank=0, world_size=4)
    assert [(p.start, p.stop) for p in rank0.epoch_pieces(0)] == [(0, 3)]
    assert sum(len(y) for _, y in rank0) == 3
    assert sum(read) < 0.6 * shard_bytes, f"read {sum(read)} of {shard_bytes} bytes for 3 of 10 samples"


def test_a_damaged_shard_under_warn_does_not_stop_a_class_subset_on_ranks(one_big_shard, tmp_path):
    """A class subset on several ranks sizes its pieces from a scan of the shards; a shard
    failing its checksum there follows on_shard_error as the epoch does: "warn" warns and
    goes on, "raise" raises."""
    from packer.errors import ChecksumError

    copy = _copy_with_a_changed_last_label(one_big_shard, tmp_path, "big")
    options = dict(split="big", image_size=4, batch_size=2, class_names=["a"], rank=0, world_size=2)
    reader = ShardReader(copy, on_shard_error="warn", **options)
    with pytest.warns(RuntimeWarning, match="does not match"):
        assert len(reader) >= 1
    with pytest.raises(ChecksumError):
        len(ShardReader(copy, **options))


@pytest.fixture()
def shards_with_a_foreign_manifest(id_shards, tmp_path):
    """id_shards' test split (3 classes, 30 samples in 2 shards) under a manifest that
    lists only 2 classes: the shards hold label 2, which this manifest does not have."""
    import json

    shards = tmp_path / "copy"
    shutil.copytree(id_shards[0], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:2]
    for info in manifest["splits"].values():
        counts = info["class_counts"]
        info["class_counts"] = {"circle": counts["circle"] + counts.pop("triangle"), "square": counts["square"]}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards


@pytest.mark.parametrize("options", [{}, {"class_names": ["square"]}, {"label_mode": None}])
def test_a_label_outside_the_manifest_classes_is_a_shard_error(shards_with_a_foreign_manifest, options):
    """Shards and manifest that do not belong together: under the default on_error="warn"
    the foreign samples were skipped as undecodable, so len() and the epoch disagreed (and
    a class subset dropped them unseen). It is the shard's error, as a count mismatch is."""
    from packer.errors import ShardReadError

    reader = ShardReader(shards_with_a_foreign_manifest, split="test", image_size=4, shuffle=False,
                         **options)
    with pytest.raises(ShardReadError, match=r"test-00000\d\.tar.*label 2 is outside the manifest's 2 classes"):
        list(reader)
    with pytest.raises(ShardReadError, match="label 2 is outside"):
        reader.labels  # noqa: B018 - the property reads the shards
    skipping = ShardReader(shards_with_a_foreign_manifest, split="test", image_size=4, shuffle=False,
                           on_shard_error="warn", **options)
    with pytest.warns(RuntimeWarning, match="label 2 is outside"):
        list(skipping)
    assert skipping.policy.skipped_shards >= 1 and skipping.policy.skipped_samples == 0


# ---- damaged tar structure in manifest-less shards (no sha256 to catch it first) ----------


def _tar(members: list[tuple[str, bytes]], *, pax_before: int | None = None, pax: bytes = b"") -> bytes:
    """A USTAR tar of ``members``; with ``pax_before``, a raw pax header holding ``pax`` is put
    in front of that member (tarfile writes only well-formed ones)."""
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, (name, data) in enumerate(members):
            if n == pax_before:
                header = tarfile.TarInfo("././@PaxHeader")
                header.size, header.type = len(pax), tarfile.XHDTYPE
                raw = bytearray(header.tobuf(tarfile.USTAR_FORMAT))
                out.write(bytes(raw) + pax + bytes(-len(pax) % 512))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("record", [b"0 path=x\n", b"abc path=x\n", b"20 path=\xff\xfe.png\n", b"999 path=y\n"])
def test_a_damaged_pax_header_is_a_shard_error_not_a_hang(tmp_path, record):
    """A pax record of length 0 never moved the parser on (the reader hung for ever); a
    length that is no number or a path that is no UTF-8 escaped as ValueError or
    UnicodeDecodeError."""
    path = tmp_path / "p-000000.tar"
    path.write_bytes(_tar([("a.png", _png(1)), ("a.cls", b"0"), ("b.png", _png(2)), ("b.cls", b"1")],
                          pax_before=2, pax=record))
    reader = ShardReader(str(path), num_classes=2, image_size=4, batch_size=8, shuffle=False)
    with pytest.raises(ShardReadError, match=r"p-000000\.tar.*corrupted pax header"):
        list(reader)
    skipping = ShardReader(str(path), num_classes=2, image_size=4, batch_size=8, shuffle=False,
                           on_shard_error="ignore")
    assert sum(len(y) for _, y in skipping) <= 1  # at most the sample before the damage
    assert skipping.policy.skipped_shards == 1


def test_a_key_written_twice_in_a_row_is_a_shard_error_not_a_wrong_label(tmp_path):
    """Two adjacent samples with one key were merged, the second's .cls overwriting the
    first's: the first's PNG was yielded with the second's label."""
    path = tmp_path / "d-000000.tar"
    path.write_bytes(_tar([("a.png", _png(1)), ("a.cls", b"0"), ("a.jpg", b"\xff\xd8 another image"),
                           ("a.cls", b"1"), ("b.png", _png(2)), ("b.cls", b"1")]))
    reader = ShardReader(str(path), num_classes=2, image_size=4, batch_size=8, shuffle=False)
    with pytest.raises(ShardReadError, match=r"sample a.*'a\.cls' appears twice"):
        list(reader)
