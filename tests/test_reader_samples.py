"""Tar stream -> samples: our parser against real tar writers, damage, WebDataset shards."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from packer.errors import EmptySplitError, ShardReadError
from reader import ShardReader
from reader.policy import ErrorPolicy
from reader.samples import group_samples, shard_samples, tar_members
from reader.source import ShardRef


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt):
    long_dir = "d" * 120 + "/"  # needs a ustar prefix, a GNU long name or a pax path
    members = [(f"{long_dir}a.jpg", b"x" * 700), (f"{long_dir}a.cls", b"1"), ("b.c.json", b"{}"),
               ("empty.txt", b"")]
    data = _tar(members, fmt)
    got = list(tar_members(io.BytesIO(data), shard="t"))
    assert [(m.name, m.data) for m in got] == members
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [m.offset for m in got] == [m.offset for m in tar.getmembers()]
    samples = list(group_samples(got, shard="t"))
    assert [s["__key__"] for s in samples] == [f"{long_dir}a", "b", "empty"]
    assert samples[1]["c.json"] == b"{}"  # webdataset's rule: key ends at the first dot


def test_truncated_and_corrupted_shards_name_shard_and_offset():
    data = _tar([("k.jpg", b"x" * 2000), ("k.cls", b"0"), ("m.jpg", b"y" * 100), ("m.cls", b"1")])
    with pytest.raises(ShardReadError, match=r"shard s1, sample k, byte offset 1200: truncated") as info:
        list(tar_members(io.BytesIO(data[:1200]), shard="s1"))
    assert info.value.shard == "s1" and info.value.offset == 1200 and info.value.key == "k"
    with pytest.raises(ShardReadError, match="end-of-archive"):
        list(tar_members(io.BytesIO(data[:3584]), shard="s1"))  # cut at a member boundary
    damaged = bytearray(data)
    damaged[3584 + 10] ^= 0xFF  # inside the third member's header (after 512 + 2048 + 512 + 512)
    with pytest.raises(ShardReadError, match="byte offset 3584: corrupted tar header"):
        list(tar_members(io.BytesIO(bytes(damaged)), shard="s1"))


@pytest.mark.parametrize("cut, offset, words", [
    (2560 + 1000, 2560 + 1000, "needs 2000 bytes"),  # inside m.jpg's data
    (2560 + 2000, 2560 + 2000, "in the padding after member 'm.jpg'"),  # right after it
    (2560 + 2020, 2560 + 2020, "in the padding after member 'm.jpg'"),  # inside its padding
])
def test_a_shard_cut_inside_the_next_sample_keeps_the_samples_before(tmp_path, cut, offset, words):
    """k's members all come before m's: a shard cut anywhere in m keeps k (skip the rest),
    and the error gives the exact byte where the shard ends."""
    data = _tar([("k.jpg", b"x" * 500), ("k.cls", b"0"), ("m.jpg", b"y" * 2000), ("m.cls", b"1")])
    assert data[2560:2564] == b"yyyy"  # headers and data of k.jpg, k.cls, then m.jpg's header
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    with pytest.raises(ShardReadError, match=words) as info:
        list(tar_members(io.BytesIO(data[:cut]), shard="s"))
    assert info.value.offset == offset
    policy = ErrorPolicy(on_shard_error="ignore")
    kept = list(shard_samples(ShardRef(str(path), "cut.tar"), policy=policy))
    assert [k["__key__"] for k in kept] == ["k"] and policy.skipped_shards == 1


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_shard_cut_at_any_byte_yields_every_whole_member_and_names_where_it_ends(fmt):
    """Small members are read together with their padding and the next header, large ones
    alone: wherever the shard ends, every member whose data is whole comes out, and the
    error's offset is that byte (or the start of the header it cuts)."""
    members = [("a.jpg", bytes(range(256)) * 20), ("a.cls", b"1"), ("b" * 120 + ".json", b"{}" * 15),
               ("c.jpg", b"c" * 4096), ("c.cls", b""), ("d.txt", b"d" * 511)]
    data = _tar(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    ends = [(info.offset_data + info.size, info.name) for info in infos]
    end_marker = infos[-1].offset_data + -(-infos[-1].size // 512) * 512
    # a member's first header (a pax or GNU long-name one, when there is one) and its own
    headers = {info.offset for info in infos} | {info.offset_data - 512 for info in infos} | {end_marker}
    for cut in range(0, end_marker + 512):
        got = []
        with pytest.raises(ShardReadError) as error:
            got.extend(m.name for m in tar_members(io.BytesIO(data[:cut]), shard="s"))
        assert got == [name for end, name in ends if end <= cut], cut
        in_header = cut // 512 * 512 in headers
        assert error.value.offset == (cut // 512 * 512 if in_header else cut), cut
    assert [m.name for m in tar_members(io.BytesIO(data[: end_marker + 512]), shard="s")] == \
        [name for name, _ in members]


@pytest.mark.parametrize("checked", [False, True], ids=["plain file", "checked stream"])
def test_a_cut_shard_keeps_every_sample_before_the_cut_on_every_stream(tmp_path, checked, monkeypatch):
    """A sample is kept once the next sample's first header is whole (a cut before that
    could be in one more member of this sample), also where the manifest's size and sha256
    make the shard a checked stream, which fails the read itself at the cut: the bytes
    before it still arrive, and an error met while reading ahead comes after the member.
    A checked stream hands out nothing of its tail (the last 8 MiB; here from inside the
    last sample's image on) unless the hash matched: the samples before the tail are kept,
    the last one never, whatever the cut."""
    import reader.local
    members = [("k.jpg", b"k" * 5000), ("k.cls", b"0"), ("m.jpg", b"m" * 6000), ("m.cls", b"1"),
               ("n.jpg", b"n" * 100), ("n.cls", b"2")]
    data = _tar(members, tarfile.USTAR_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    end_marker = infos[-1].offset_data + 512
    firsts = [infos[0].offset_data, infos[2].offset_data, infos[4].offset_data, end_marker + 512]
    full = hashlib.sha256(data).hexdigest()
    tail_start = infos[4].offset_data + 50
    monkeypatch.setattr(reader.local, "_TAIL_BYTES", len(data) - tail_start)
    cuts = sorted({*range(0, end_marker + 512, 61), *(b + d for b in range(0, end_marker + 512, 512)
                                                       for d in (-1, 0, 1) if b + d >= 0)})
    path = tmp_path / "cut.tar"
    for cut in cuts:
        path.write_bytes(data[:cut])
        ref = ShardRef(str(path), "cut.tar", count=3, nbytes=len(data) if checked else None,
                       sha256=full if checked else None)
        policy = ErrorPolicy(on_shard_error="ignore")
        kept = [s["__key__"] for s in shard_samples(ref, policy=policy)]
        arrived = min(cut, tail_start) if checked else cut
        assert kept == [key for key, after in zip("kmn", firsts[1:], strict=True) if arrived >= after], cut
        assert policy.skipped_shards == 1, cut


def test_a_skipped_member_cut_short_in_a_file_is_named_where_the_file_ends(tmp_path):
    """Members skipped by seeking (scan_shard skips images): a file seeks past its end
    without complaint, so the skip is bounded by the file's size."""
    data = _tar([("a.jpg", b"a" * 100_000), ("a.cls", b"0")])
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:60_000])
    with open(path, "rb") as f, pytest.raises(ShardReadError, match="member 'a.jpg' needs") as info:
        list(tar_members(f, shard="s", want=lambda name: name.endswith(".cls")))
    assert info.value.offset == 60_000


def test_damaged_shard_raises_or_is_skipped(id_shards, tmp_path):
    shards, _ = id_shards
    bad = tmp_path / "bad.tar"
    good = (shards / "test" / "test-000000.tar").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ShardReadError, match=r"bad\.tar, byte offset \d+"):
        list(ShardReader([str(bad)], num_classes=3, image_size=4))
    policy = ErrorPolicy(on_shard_error="ignore")
    partial = list(shard_samples(ShardRef(str(bad), "bad.tar"), policy=policy))
    assert 0 < len(partial) < 16 and policy.skipped_shards == 1


def test_manifest_count_mismatch_is_an_error(id_shards, tmp_path):
    shards, _ = id_shards
    ref = ShardRef(str(shards / "test" / "test-000000.tar"), "test-000000.tar", count=99)
    with pytest.raises(ShardReadError, match="manifest says 99"):
        list(shard_samples(ref, policy=ErrorPolicy()))


def test_webdataset_shardwriter_shards_stream(tmp_path):
    """Shards from the real webdataset.ShardWriter, no manifest, given as a brace pattern."""
    pattern = str(tmp_path / "data-%06d.tar")
    colors = {}
    with wds.ShardWriter(pattern, maxcount=25, verbose=0) as sink:
        for i in range(60):
            colors[i] = (i, 0, 100 * (i % 3))
            sink.write({"__key__": f"sample{i:05d}", "png": _png(colors[i]), "cls": i % 3})
    source = str(tmp_path / "data-{000000..000002}.tar")
    reader = ShardReader(source, image_size=(4, 4), batch_size=16, seed=0, interpolation="nearest")
    assert reader.class_names == ["0", "1", "2"] and reader.samples == 60 and len(reader) == 4
    seen = []
    for x, y in reader:
        for img, label in zip(x, y, strict=True):
            i = int(img[0, 0, 0])
            assert label == i % 3 and img[0, 0, 2] == 100 * label
            seen.append(i)
    assert sorted(seen) == list(range(60))
    ordered = ShardReader(sorted(str(p) for p in tmp_path.glob("*.tar")), image_size=4,
                          shuffle=False, class_names=["a", "b", "c"])
    assert ordered.filenames[:2] == ["sample00000", "sample00001"]
    assert np.array_equal(ordered.labels, np.arange(60) % 3)


def test_our_shards_read_with_webdataset(id_shards):
    shards, paths = id_shards
    ds = wds.WebDataset(str(shards / "train" / "train-{000000..000013}.tar"), shardshuffle=False)
    keys = [s["__key__"] for s in ds]
    reader = ShardReader(shards, split="train", shuffle=False, image_size=4)
    assert len(keys) == reader.samples


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_long_name_on_a_folder_member_names_that_member_only(tmp_path, fmt):
    """A GNU long-name or pax path header names the one member after it. Kept past a
    directory (or link) member, it renamed the next file: a tar of a folder whose path is
    over 100 bytes (GNU tar), or Python's tarfile in pax format adding a folder named 猫,
    lost the next sample's label and its class. webdataset reads both samples."""
    path = tmp_path / "dirs.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in (("d" * 120, None), ("c0.png", _png((1, 0, 0))), ("c0.cls", b"1"),
                           ("猫", None), ("c1.png", _png((2, 0, 0))), ("c1.cls", b"0")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    reader = ShardReader([str(path)], image_size=2, shuffle=False, interpolation="nearest",
                         on_error="raise")
    assert reader.class_names == ["0", "1"] and reader.filenames == ["c0", "c1"]
    x, y = next(iter(reader))
    assert x[:, 0, 0, 0].tolist() == [1, 2] and y.tolist() == [1, 0]
    assert [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)] == ["c0", "c1"]


def test_upper_case_label_members_are_counted_as_an_epoch_reads_them(tmp_path):
    """``KEY.JPG`` / ``KEY.CLS``: the epoch (as webdataset) lower-cases extensions, the
    scan that counts samples and finds classes did not, so such a tar was "no images"."""
    path = tmp_path / "upper.tar"
    path.write_bytes(_tar([("a.PNG", _png((1, 0, 0))), ("a.CLS", b"0"),
                           ("b.PNG", _png((2, 0, 0))), ("b.CLS", b"1")]))
    reader = ShardReader([str(path)], image_size=2, shuffle=False, interpolation="nearest")
    assert reader.samples == 2 and reader.class_names == ["0", "1"] and len(reader) == 1
    assert next(iter(reader))[1].tolist() == [0, 1]


def test_tar_gz_shards_are_read_decompressed_as_webdataset_reads_them(tmp_path):
    """A source of .tar.gz paths was accepted, then parsed as a tar: "corrupted tar header
    ... re-pack it" at byte 0. A gzip file named .tar, a zip, or an HTML error page now say
    what they are; a damaged .tar.gz is a shard error under on_shard_error."""
    import gzip

    members = [(f"k{i}.{ext}", data) for i in range(4)
               for ext, data in (("png", _png((i, 0, 0))), ("cls", str(i % 2).encode()))]
    plain = _tar(members)
    paths = []
    for i, name in enumerate(("a.tar.gz", "b.TGZ")):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_bytes(gzip.compress(plain, mtime=0) if i == 0 else gzip.compress(plain))
    reader = ShardReader(paths, image_size=2, batch_size=8, shuffle=False, interpolation="nearest")
    assert reader.samples == 8 and reader.labels.tolist() == [0, 1, 0, 1] * 2
    x, y = next(iter(reader))
    assert x[:, 0, 0, 0].tolist() == [0, 1, 2, 3] * 2 and y.tolist() == [0, 1, 0, 1] * 2
    assert [s["__key__"] for s in wds.WebDataset(paths[0], shardshuffle=False)] == ["k0", "k1", "k2", "k3"]

    for name, data, words in (("gz.tar", gzip.compress(plain), "gzip-compressed, not a tar"),
                              ("z.tar", b"PK\x03\x04" + bytes(600), "a zip archive"),
                              ("page.tar", b"<html><body>403 Forbidden</body></html>" + bytes(600), "HTML")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ShardReadError, match=words):
            list(ShardReader([str(tmp_path / name)], image_size=2, num_classes=2))
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(plain)[:-300])
    with pytest.raises(ShardReadError, match="damaged gzip data"):
        list(ShardReader([str(tmp_path / "cut.tar.gz")], image_size=2, num_classes=2))


def test_plain_tars_count_what_an_epoch_yields(tmp_path):
    """len(), filenames and labels counted the samples holding a .cls or .json member,
    where an epoch yields those holding an image (and, when labels are asked for, a .cls):
    an image with a caption .json but no .cls was listed, then skipped (predictions and
    filenames out of line), and images without labels read with label_mode=None were
    yielded but not counted (Keras' cardinality check then failed the epoch)."""
    from packer.errors import EmptySplitError

    mixed = tmp_path / "mixed.tar"
    with wds.TarWriter(str(mixed)) as sink:
        sink.write({"__key__": "m0", "png": _png((0, 0, 0)), "cls": 0, "json": {"caption": "a"}})
        sink.write({"__key__": "m1", "png": _png((1, 0, 0)), "json": {"caption": "b"}})  # no .cls
        sink.write({"__key__": "m2", "png": _png((2, 0, 0)), "cls": 1, "json": {"caption": "c"}})
        sink.write({"__key__": "m3", "png": _png((3, 0, 0))})  # an image alone
        sink.write({"__key__": "m4", "cls": 1, "json": {"caption": "no image"}})  # no image
    options = dict(image_size=1, batch_size=1, shuffle=False, interpolation="nearest", num_classes=2)
    labelled = ShardReader([str(mixed)], **options)
    assert (len(labelled), labelled.filenames, labelled.labels.tolist()) == (2, ["m0", "m2"], [0, 1])
    assert [(int(x[0, 0, 0, 0]), int(y[0])) for x, y in labelled] == [(0, 0), (2, 1)]
    unlabelled = ShardReader([str(mixed)], label_mode=None, **options)
    assert (len(unlabelled), unlabelled.filenames) == (4, ["m0", "m1", "m2", "m3"])
    assert [int(x[0, 0, 0, 0]) for x in unlabelled] == [0, 1, 2, 3]

    only = tmp_path / "images_only.tar"
    with wds.TarWriter(str(only)) as sink:
        for i in range(3):
            sink.write({"__key__": f"n{i}", "png": _png((i, 0, 0))})
    assert len(ShardReader([str(only)], image_size=1, label_mode=None)) == 1
    with pytest.raises(EmptySplitError, match="3 images have no .cls label: pass label_mode=None"):
        list(ShardReader([str(only)], image_size=1))


def test_a_split_whose_cls_members_hold_class_names_says_so(tmp_path):
    """A foreign tar whose ``.cls`` members hold class names ("cat"), not indices: the split
    was refused as "N images have no .cls label", which they have. It now says what the
    labels are, quoting the first, and still offers label_mode=None."""
    import webdataset as wds

    named = tmp_path / "names.tar"
    with wds.TarWriter(str(named)) as sink:
        for i in range(3):
            sink.write({"__key__": f"n{i}", "png": _png((i, 0, 0)), "cls": "cat" if i % 2 else "dog"})
    with pytest.raises(EmptySplitError) as caught:
        list(ShardReader([str(named)], image_size=1))
    message = str(caught.value)
    assert "the labels of 3 images are not class indices" in message and "b'dog'" in message
    assert "have no .cls label" not in message and "label_mode=None" in message
    assert [x.shape for x in ShardReader([str(named)], image_size=1, label_mode=None)] == [(3, 1, 1, 3)]

    mixed = tmp_path / "mixed.tar"  # a name, a missing label, and one index
    with wds.TarWriter(str(mixed)) as sink:
        sink.write({"__key__": "a", "png": _png((0, 0, 0)), "cls": "cat"})
        sink.write({"__key__": "b", "png": _png((1, 0, 0))})
    with pytest.raises(EmptySplitError, match=r"1 images have no \.cls label.*the labels of 1 images"):
        list(ShardReader([str(mixed)], image_size=1))
    with wds.TarWriter(str(mixed)) as sink:
        sink.write({"__key__": "a", "png": _png((0, 0, 0)), "cls": "cat"})
        sink.write({"__key__": "c", "png": _png((2, 0, 0)), "cls": 1})
    reader = ShardReader([str(mixed)], image_size=1, num_classes=2, on_error="ignore")
    assert len(reader) == 1 and [y.tolist() for _, y in reader] == [[1]]
    assert len(unlabelled := ShardReader([str(mixed)], image_size=1, label_mode=None)) == 1
    assert [x.shape for x in unlabelled] == [(2, 1, 1, 3)]


def test_a_webdataset_list_joined_by_double_colons_is_every_shard(tmp_path):
    """webdataset reads "a.tar::b.tar" as two shards; it was kept as one URL, which fsspec
    took for a chain and read as its last shard alone, without a word. A chain whose parts
    are not all tars (``simplecache::s3://...``) stays one shard."""
    from reader.source import expand_urls

    with wds.ShardWriter(str(tmp_path / "part-%d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "png": _png((i, 0, 0)), "cls": i % 2})
    joined = f"{tmp_path}/part-0.tar::{tmp_path}/part-1.tar"
    reader = ShardReader(joined, image_size=1, shuffle=False, num_classes=2)
    assert reader.filenames == [s["__key__"] for s in wds.WebDataset(joined, shardshuffle=False)]
    assert reader.filenames == [f"k{i}" for i in range(6)]
    assert expand_urls(f"{tmp_path}/part-{{0..1}}.tar::{tmp_path}/part-0.tar") == [
        f"{tmp_path}/part-0.tar", f"{tmp_path}/part-1.tar", f"{tmp_path}/part-0.tar"]
    assert expand_urls("simplecache::s3://bucket/a.tar") == ["simplecache::s3://bucket/a.tar"]


def test_a_tar_whose_samples_are_not_adjacent_is_named_as_such(tmp_path):
    """`tar -cf DIR` lists files in folder order: a key's members end up apart, and every
    sample was reported as "has no .cls label" and "has no image member (members: [])",
    then an empty epoch. Now the shard fails once, saying how to make such a tar, and
    the sample before the error is yielded once (it came twice). A key used again for
    another whole sample (a writer counting per class) is webdataset's right and reads."""
    path = tmp_path / "unsorted.tar"
    path.write_bytes(_tar([("a.png", _png((1, 0, 0))), ("b.png", _png((2, 0, 0))),
                           ("a.cls", b"0"), ("b.cls", b"1")]))
    with pytest.raises(ShardReadError, match=r"sample 'a' has its .cls member apart.*tar --sort=name"):
        list(ShardReader([str(path)], image_size=2, num_classes=2))
    got = []
    with pytest.raises(ShardReadError):
        for sample in group_samples(tar_members(io.BytesIO(path.read_bytes()), shard="s"), shard="s"):
            got.append(sample["__key__"])
    assert got == ["a", "b"]

    again = tmp_path / "per_class_keys.tar"
    with wds.TarWriter(str(again)) as sink:
        for cls in range(2):
            for i in range(2):  # the key counter starts again for each class
                sink.write({"__key__": f"{i:06d}", "png": _png((10 * cls + i, 0, 0)), "cls": cls})
    reader = ShardReader([str(again)], image_size=1, shuffle=False, num_classes=2, interpolation="nearest")
    x, y = next(iter(reader))
    assert x[:, 0, 0, 0].tolist() == [0, 1, 10, 11] and y.tolist() == [0, 0, 1, 1]
    assert reader.filenames == [s["__key__"] for s in wds.WebDataset(str(again), shardshuffle=False)]


def test_samples_without_an_image_are_left_out_of_every_piece(tmp_path):
    """The scan leaves a sample without an image member out of the counts; the epoch's
    pieces (ranks, decode processes, loader workers) were cut from a stream that still
    held it, one off: the shard's last image was never read."""
    from conftest import sample_ids

    path = tmp_path / "meta.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(8):
            sink.write({"__key__": f"k{i}", "png": _png((i, 0, 0)), "cls": i % 2})
            if i == 2:
                sink.write({"__key__": "notes", "txt": "a note", "cls": 0})
    options = dict(image_size=1, batch_size=2, shuffle=False, num_classes=2, interpolation="nearest")
    ranks = [i for rank in range(2)
             for x, _ in ShardReader([str(path)], rank=rank, world_size=2, **options) for i in sample_ids(x)]
    assert sorted(ranks) == list(range(8))
    reader = ShardReader([str(path)], processes=2, **options)
    try:
        assert sorted(i for x, _ in reader for i in sample_ids(x)) == list(range(8))
    finally:
        reader.close()
