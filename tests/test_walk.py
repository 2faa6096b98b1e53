"""Walking the source tree: labels from folders, junk ignored, links and cycles, layouts."""

from __future__ import annotations

import os

import pytest

from packer.errors import LayoutError
from packer.walk import walk_tree


def touch(root, rel, data=b"x"):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_splits_layout_labels_and_junk(tmp_path):
    for rel in ("train/b/1.jpg", "train/a/sub/2.png", "train/a/.DS_Store", "train/a/._2.png",
                "train/a/Thumbs.db", "train/a/notes.txt", "test/c/3.jpg", "train/loose.jpg",
                "train/readme.md", "top.png"):
        touch(tmp_path, rel)
    (tmp_path / "test" / "empty").mkdir()
    walked = walk_tree(tmp_path)
    assert walked.classes == {"test": ["c", "empty"], "train": ["a", "b"]}
    got = [(c.group, c.class_name, c.rel_path, c.by_name) for c in walked.candidates]
    assert got == [("test", "c", "test/c/3.jpg", True), ("train", "a", "train/a/notes.txt", False),
                   ("train", "a", "train/a/sub/2.png", True), ("train", "b", "train/b/1.jpg", True)]
    assert {p for p, _ in walked.ignored} == {"train/a/.DS_Store", "train/a/._2.png", "train/a/Thumbs.db",
                                              "train/readme.md"}
    assert dict(walked.skipped).keys() == {"train/loose.jpg", "top.png"}


def test_symlink_cycles_terminate(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    tmp_path = tmp_path / "src"
    touch(tmp_path, "train/a/1.jpg")
    touch(elsewhere, "2.jpg")
    os.symlink(".", tmp_path / "train/a/self")
    os.symlink("..", tmp_path / "train/a/parent")
    os.symlink(tmp_path, tmp_path / "train/a/root")
    os.symlink(elsewhere, tmp_path / "train/a/linked_dir")
    plain = walk_tree(tmp_path)
    assert [c.rel_path for c in plain.candidates] == ["train/a/1.jpg"]
    followed = walk_tree(tmp_path, follow_links=True)
    assert [c.rel_path for c in followed.candidates] == ["train/a/1.jpg", "train/a/linked_dir/2.jpg"]
    assert sorted(p for p, why in followed.ignored if why == "symlink cycle") == [
        "train/a/parent", "train/a/root", "train/a/self"]


def test_flat_layout(tmp_path):
    touch(tmp_path, "dogs/1.jpg")
    touch(tmp_path, "cats/2.jpg")
    walked = walk_tree(tmp_path, layout="flat")
    assert walked.classes == {"": ["cats", "dogs"]}
    assert [c.class_name for c in walked.candidates] == ["cats", "dogs"]


def test_flat_tree_given_as_splits_is_refused_helpfully(tmp_path):
    touch(tmp_path, "dogs/1.jpg")
    touch(tmp_path, "cats/2.jpg")
    with pytest.raises(LayoutError, match="--validation-split"):
        walk_tree(tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(LayoutError, match="not a folder"):
        walk_tree(tmp_path / "missing")
    with pytest.raises(LayoutError, match="no split folders"):
        walk_tree(tmp_path)
    with pytest.raises(LayoutError, match="unknown layout"):
        walk_tree(tmp_path, layout="nested")


def _latin1_name(folder, name: bytes, data: bytes = b"") -> bool:
    """Create a file whose name is not UTF-8; False where the filesystem refuses it."""
    try:
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(data)
    except OSError:
        return False
    return True


def test_a_file_name_that_is_not_utf8_is_skipped_by_name_and_the_rest_packed(tmp_path):
    """A Latin-1 file name (b"caf\\xe9.jpg") cannot go into a manifest or a .json member:
    it is skipped with its name shown as \\xe9, and the pack goes on (it used to stop with
    UnicodeEncodeError, naming no file)."""
    import io
    import json

    from PIL import Image

    from packer import pack

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG")
    for cls in ("red", "blue"):
        (tmp_path / "src" / "train" / cls).mkdir(parents=True)
        (tmp_path / "src" / "train" / cls / "ok.jpg").write_bytes(buf.getvalue())
    if not _latin1_name(tmp_path / "src" / "train" / "blue", b"caf\xe9.jpg", buf.getvalue()):
        pytest.skip("this filesystem refuses names that are not UTF-8")
    manifest = pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True)
    assert manifest["splits"]["train"]["count"] == 2
    assert [s["path"] for s in manifest["skipped"]] == ["train/blue/caf\\xe9.jpg"]
    assert "not valid UTF-8" in manifest["skipped"][0]["reason"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_a_class_folder_name_that_is_not_utf8_stops_the_walk_with_its_name(tmp_path):
    (tmp_path / "train").mkdir()
    try:
        os.mkdir(os.path.join(os.fsencode(tmp_path / "train"), b"caf\xe9"))
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    with pytest.raises(LayoutError, match=r"caf\\\\xe9.*not valid UTF-8"):
        walk_tree(tmp_path)


def test_a_loose_image_without_an_image_name_is_skipped_not_ignored(tmp_path):
    """Outside any class folder a file has no label; one whose content is an image must
    still be accounted for as skipped (as inside a class folder, content decides), while
    other files are ignored."""
    import io

    from PIL import Image

    (tmp_path / "train" / "cat").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    (tmp_path / "train" / "cat" / "a.jpg").write_bytes(buf.getvalue())
    (tmp_path / "train" / "loose.dat").write_bytes(buf.getvalue())
    (tmp_path / "train" / "notes.txt").write_text("BM is not a bitmap here")
    (tmp_path / "top.bin").write_bytes(buf.getvalue())
    result = walk_tree(tmp_path)
    assert dict(result.skipped) == {
        "train/loose.dat": "outside any class folder: no label to give it",
        "top.bin": "outside any split folder: no split or label to give it",
    }
    assert dict(result.ignored)["train/notes.txt"] == "outside any class folder"


def test_a_loose_fifo_is_listed_not_opened(tmp_path):
    """Loose files are sniffed for image content; a named pipe must not be opened (open()
    blocks until a writer comes, and the pack would hang)."""
    import threading

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.jpg").write_bytes(b"\xff\xd8\xff")
    os.mkfifo(tmp_path / "train" / "pipe")
    os.mkfifo(tmp_path / "pipe.jpg")
    done: list = []
    walker = threading.Thread(target=lambda: done.append(walk_tree(tmp_path)), daemon=True)
    walker.start()
    walker.join(timeout=20)
    assert done, "the walk blocked on a FIFO"
    assert dict(done[0].ignored)["train/pipe"] == "outside any class folder"


def test_a_split_name_too_long_for_tar_member_names_is_a_layout_error(tmp_path):
    """The split name is part of every sample's key, and USTAR member names hold 100 bytes:
    a longer split name stops the walk with the limit, not the writer with an internal
    error after every file was probed."""
    from packer.format import max_split_name_length, sample_key

    longest = "s" * max_split_name_length()
    assert len(f"{sample_key(longest, 999_999_999)}.json") == 100
    for name, ok in ((longest, True), (longest + "s", False)):
        (tmp_path / name / "cat").mkdir(parents=True)
        (tmp_path / name / "cat" / "a.jpg").write_bytes(b"x")
        if ok:
            assert name in walk_tree(tmp_path).classes
        else:
            with pytest.raises(LayoutError, match=f"at most {max_split_name_length()} characters"):
                walk_tree(tmp_path)
    # a long-named folder with nothing to pack gives no member names: no reason to refuse
    (tmp_path / (longest + "s") / "cat" / "a.jpg").unlink()
    (tmp_path / (longest + "s") / "cat" / "LICENSE.txt").write_text("text")
    assert walk_tree(tmp_path).classes[longest + "s"] == ["cat"]


def test_a_split_name_too_long_in_bytes_for_shard_file_names_is_a_layout_error(tmp_path):
    """82 CJK characters are within the member-name limit (one ASCII character each in the
    key) but 246 UTF-8 bytes: the folder exists, yet ``.NAME-000000.tar.partial`` would be
    over the file system's 255 bytes, which failed at write time after the whole probe."""
    from packer.format import max_split_name_length, partial_name, shard_name

    for name in ("猫" * 78, "猫" * 79):
        assert len(name) < max_split_name_length()
        (tmp_path / name / "cat").mkdir(parents=True)
        (tmp_path / name / "cat" / "a.jpg").write_bytes(b"x")
        partial = os.path.basename(partial_name(shard_name(name, 0)))
        if len(partial.encode()) <= 255:
            assert name in walk_tree(tmp_path).classes
            (tmp_path / "out").mkdir(exist_ok=True)
            (tmp_path / "out" / partial).write_bytes(b"")  # the file system takes it
        else:
            with pytest.raises(LayoutError, match=r"at most 235 bytes in UTF-8 .* this one has 237"):
                walk_tree(tmp_path)


def test_class_names_that_differ_only_in_normalisation_or_case_are_warned_about(tmp_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    for split, name in (("train", decomposed), ("test", composed), ("test", "Tea"), ("train", "tea")):
        (tmp_path / split / name).mkdir(parents=True)
        (tmp_path / split / name / "a.jpg").write_bytes(b"x")
    walked = walk_tree(tmp_path)
    assert walked.classes == {"test": ["Tea", composed], "train": [decomposed, "tea"]}
    lookalikes = [w for w in walked.warnings if "differ only in case or Unicode" in w]
    assert len(lookalikes) == 2
    assert composed in lookalikes[0] and decomposed in lookalikes[0]
    assert "'Tea'" in lookalikes[1] and "'tea'" in lookalikes[1]
    plain = tmp_path / "plain"
    (plain / "train" / "cat").mkdir(parents=True)
    assert walk_tree(plain).warnings == []


def test_a_symlinked_folder_left_unfollowed_is_warned_about(tmp_path):
    """Split and class folders linked in from another disk are common: without
    --follow-links their images are not packed, which must be said, not only listed among
    the ignored files; links back into the tree (cycles) lose nothing and are not."""
    store = tmp_path / "store"
    touch(store, "big_train/cat/1.jpg")
    touch(store, "dogs/2.jpg")
    touch(store, "more/3.jpg")
    src = tmp_path / "src"
    touch(src, "test/cat/4.jpg")
    os.symlink(store / "big_train", src / "train")
    os.symlink(store / "dogs", src / "test" / "dog")
    os.symlink(store / "more", src / "test" / "cat" / "more")
    os.symlink(".", src / "test" / "cat" / "self")
    os.symlink(src / "test", src / "validation")  # into the tree: following packs it twice
    plain = walk_tree(src)
    assert [c.rel_path for c in plain.candidates] == ["test/cat/4.jpg"]
    warned = [w for w in plain.warnings if "not followed" in w]
    assert len(warned) == 3 and all("--follow-links" in w for w in warned)
    assert any(w.startswith("train is a symbolic link to a split folder") for w in warned)
    assert any(w.startswith("test/dog is a symbolic link to a class folder") for w in warned)
    assert ("test/cat/self", "symlink cycle") in plain.ignored
    assert ("validation", "symbolic link to a folder of this tree, not followed") in plain.ignored
    out = src / "test" / "out_link"  # a link to OUT inside SRC is left out unrecorded
    os.symlink(tmp_path / "out", out)
    (tmp_path / "out").mkdir()
    again = walk_tree(src, exclude=tmp_path / "out")
    assert again.warnings == plain.warnings and "test/out_link" not in dict(again.ignored)
    out.unlink()
    followed = walk_tree(src, follow_links=True)
    assert sorted(c.rel_path for c in followed.candidates if not c.rel_path.startswith("validation")) == [
        "test/cat/4.jpg", "test/cat/more/3.jpg", "test/dog/2.jpg", "train/cat/1.jpg"]
    assert not [w for w in followed.warnings if "not followed" in w]


def test_a_broken_symbolic_link_is_warned_about_naming_its_target(tmp_path):
    """A class or split folder linked from a disk that is not mounted: nothing of it can be
    packed, which was only a line among the ignored files."""
    src = tmp_path / "src"
    touch(src, "train/cat/1.jpg")
    os.symlink(tmp_path / "gone" / "dogs", src / "train" / "dog")
    os.symlink(tmp_path / "gone" / "more", src / "train" / "cat" / "more")
    os.symlink(tmp_path / "gone" / "test", src / "test")
    os.symlink(tmp_path / "gone" / "x.jpg", src / "train" / "cat" / "x.jpg")
    for follow in (False, True):
        walked = walk_tree(src, follow_links=follow)
        broken = sorted(w for w in walked.warnings if "which does not exist" in w)
        assert [w.split(" ")[0] for w in broken] == ["test", "train/cat/more", "train/cat/x.jpg", "train/dog"], follow
        assert f"to {tmp_path / 'gone' / 'dogs'}," in broken[3]
        assert walked.classes["train"] == ["cat"]
        assert "which does not exist" in broken[2]
        # an image by its name: skipped, counted, with the reason that helps
        assert dict(walked.skipped)["train/cat/x.jpg"] == f"broken symbolic link (to {tmp_path / 'gone' / 'x.jpg'})"


def test_a_symbolic_link_to_a_file_is_read_as_keras_reads_it(tmp_path):
    """Splits made of links to files (a symlink farm over one image store) are common, and
    Keras reads such links whatever its follow_links says (that is about folders): the
    packer skipped them without --follow-links."""
    store = tmp_path / "store"
    touch(store, "1.jpg")
    touch(store, "notes.txt")
    src = tmp_path / "src"
    touch(src, "train/cat/0.jpg")
    os.symlink(store / "1.jpg", src / "train" / "cat" / "1.jpg")
    os.symlink("0.jpg", src / "train" / "cat" / "again.jpg")  # relative, within the class
    os.symlink(store / "notes.txt", src / "train" / "cat" / "notes.txt")
    os.mkfifo(src / "train" / "cat" / "pipe.jpg")
    for follow in (False, True):
        walked = walk_tree(src, follow_links=follow)
        assert [(c.rel_path, c.abs_path) for c in walked.candidates] == [
            ("train/cat/0.jpg", str(src / "train/cat/0.jpg")),
            ("train/cat/1.jpg", str(src / "train/cat/1.jpg")),
            ("train/cat/again.jpg", str(src / "train/cat/again.jpg")),
            ("train/cat/notes.txt", str(src / "train/cat/notes.txt")),  # the probe decides
        ], follow
        # named like an image but never opened (a read could block): skipped, not ignored
        assert dict(walked.skipped) == {"train/cat/pipe.jpg": "not a regular file (a pipe, socket or device)"}
        assert walked.warnings == []


def test_an_earlier_pack_inside_src_is_left_out_with_a_warning(tmp_path):
    """`pack d3 d3/shards` then `pack d3 o5`: the first OUT was packed as a split "shards"
    with classes test/train, widening the class map. A folder holding a shardpack manifest
    or a pack's journal, at any level, is left out and named in a warning."""
    from conftest import write_id_tree

    from packer import pack

    src = tmp_path / "d3"
    write_id_tree(src, {"train": 3, "test": 2})
    first = pack(src, src / "shards", workers=1, quiet=True)
    stopped = src / "train" / "circle" / "old_out"  # a stopped pack's OUT: a journal only
    touch(stopped, ".shardpack-journal.jsonl", b'{"options": {}}\n')
    touch(stopped, "train/keep.png", (src / "train" / "circle" / "img_0000.png").read_bytes())
    second = pack(src, tmp_path / "o5", workers=1, quiet=True)
    assert second["classes"] == first["classes"] == ["circle", "square", "triangle"]
    assert sorted(second["splits"]) == ["test", "train"]
    assert second["splits"]["train"]["count"] == first["splits"]["train"]["count"]
    warned = [w for w in second["warnings"] if "holds shardpack output" in w]
    assert len(warned) == 2
    assert warned[0].startswith("shards/ holds shardpack output (manifest.json)")
    assert warned[1].startswith("train/circle/old_out/ holds shardpack output (.shardpack-journal.jsonl)")
    (src / "notes").mkdir()  # a manifest.json that is not shardpack's leaves its folder walked
    touch(src, "notes/c/manifest.json", b'{"format": "other"}')
    assert "notes" in walk_tree(src, exclude=src / "shards").classes


def test_folders_that_cannot_be_listed_are_accounted_for_not_a_traceback(tmp_path, monkeypatch):
    """An unreadable split folder ended the pack in a PermissionError traceback, and an
    unreadable class folder's images vanished with exit 0 and one log line. (Root reads
    any folder, so the refusal is stood in for, at the listing.)"""
    import packer.walk as walk

    for rel in ("train/cat/a.jpg", "train/dog/b.jpg", "test/cat/c.jpg", "val/cat/d.jpg"):
        touch(tmp_path, rel)
    real = walk._sorted_entries
    refused = {str(tmp_path / "train" / "dog"), str(tmp_path / "test")}

    def listing(folder):
        if str(folder) in refused:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(folder)

    monkeypatch.setattr(walk, "_sorted_entries", listing)
    walked = walk_tree(tmp_path)
    assert sorted(c.rel_path for c in walked.candidates) == ["train/cat/a.jpg", "val/cat/d.jpg"]
    skipped = dict(walked.skipped)
    for rel in ("train/dog", "test"):
        assert skipped[rel] == "folder cannot be listed (Permission denied): none of its files is packed"
        assert any(w.startswith(f"cannot list {rel} (Permission denied)") for w in walked.warnings)
    refused.add(str(tmp_path))
    with pytest.raises(LayoutError, match="cannot list .*Permission denied.*check its permissions"):
        walk_tree(tmp_path)


def test_a_folder_that_vanishes_during_the_walk_is_ignored_not_a_traceback(tmp_path, monkeypatch):
    import packer.walk as walk

    touch(tmp_path, "train/cat/a.jpg")
    touch(tmp_path, "train/gone/b.jpg")
    real = walk._dir_identity

    def identity(path):
        if str(path).endswith("gone"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(walk, "_dir_identity", identity)
    walked = walk_tree(tmp_path)
    assert [c.rel_path for c in walked.candidates] == ["train/cat/a.jpg"]
    assert dict(walked.ignored)["train/gone"].startswith("vanished during the walk")


def test_a_killed_packs_out_inside_src_and_lookalike_split_names_are_warned_about(tmp_path):
    """A pack SIGKILLed before its journal existed leaves OUT with only its lock or spool:
    that folder became an empty split of the next pack. Split folders differing only in
    Unicode normalisation got no warning (class folders did)."""
    touch(tmp_path, "train/cat/a.jpg")
    for mark in (".shardpack.lock", ".shardpack-spool"):
        (tmp_path / f"out{mark}").mkdir()
        (tmp_path / f"out{mark}" / mark).write_text("")
    composed, decomposed = "t\u00e9st", "te\u0301st"
    touch(tmp_path, f"{composed}/cat/b.jpg")
    touch(tmp_path, f"{decomposed}/cat/c.jpg")
    walked = walk_tree(tmp_path)
    assert sorted(walked.classes) == sorted(["train", composed, decomposed])
    assert sum("holds shardpack output" in w for w in walked.warnings) == 2
    (split_warning,) = [w for w in walked.warnings if w.startswith("split folders")]
    assert "differ only in case or Unicode normalisation" in split_warning


def test_the_walk_reports_its_running_count_and_the_pack_shows_it(tmp_path, monkeypatch, capsys):
    """Listing a huge tree said nothing until the first file was checked: the walk reports
    how many files it has found after each folder and every few thousand entries of a big
    one, ending at the total; the count changes nothing it finds. A pack on a terminal
    shows it as a "listing" count."""
    import packer.walk as walk

    for i in range(7):
        touch(tmp_path, f"train/big/{i}.jpg")
    for rel in ("train/a/sub/1.jpg", "train/a/2.png", "val/a/3.jpg", "val/a/.hidden.jpg"):
        touch(tmp_path, rel)
    monkeypatch.setattr(walk, "_FOUND_EVERY", 3)
    counts: list[int] = []
    walked = walk_tree(tmp_path, found=counts.append)
    assert walked.candidates == walk_tree(tmp_path).candidates
    assert counts == sorted(counts) and counts[-1] == len(walked.candidates) == 10
    # train/a/sub after train/a/2.png (2), train/a (2), train/big before its 3rd and 6th
    # entries (4, 7) and at its end (9), val/a (10)
    assert counts == [2, 2, 4, 7, 9, 10]
    flat: list[int] = []
    assert len(walk_tree(tmp_path / "train", layout="flat", found=flat.append).candidates) == 9
    assert flat[-1] == 9

    from packer import job
    from packer.progress import Progress

    shown = []

    class Shown(Progress):  # a terminal's bar, recorded with the ``disable`` asked for
        def __init__(self, *args, **kwargs):
            asked = kwargs.get("disable")
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)
            shown.append((asked, self))

    monkeypatch.setattr(job, "tqdm", Shown)
    assert walk_tree(tmp_path, found=counts.append) == walk_tree(tmp_path)  # everything it finds
    assert len(job.walk_counted(tmp_path, layout="splits", follow_links=False).candidates) == 10
    asked, listing = next((a, bar) for a, bar in shown if bar.desc == "listing")
    assert asked is None and listing.n == 10 and listing.unit == "file"  # None: shown on a terminal
    shown.clear()
    job.walk_counted(tmp_path, layout="splits", follow_links=False, quiet=True)
    assert [asked for asked, _ in shown] == [True]
    capsys.readouterr()


def test_nas_and_os_junk_folders_are_ignored_not_packed(tmp_path):
    """A Synology NAS keeps an "@eaDir" beside every photo folder, holding a thumbnail JPEG
    of each photo: packed (as Keras lists them), they were near-duplicates of the training
    images, in every split. macOS zips' "__MACOSX" and recycle bins are no data either."""
    touch(tmp_path, "train/cat/1.jpg")
    touch(tmp_path, "train/cat/@eaDir/1.jpg/SYNOPHOTO_THUMB_M.jpg")
    touch(tmp_path, "train/@eaDir/cat/SYNOPHOTO_THUMB_S.jpg")  # a would-be class
    touch(tmp_path, "train/dog/#recycle/2.jpg")
    touch(tmp_path, "__MACOSX/train/cat/._1.jpg")  # a would-be split
    touch(tmp_path, "$RECYCLE.BIN/x/3.jpg")
    touch(tmp_path, "train/cat/@Recycle/4.jpg")  # QNAP's
    touch(tmp_path, "train/cat/#snapshot/5.jpg")  # Synology's snapshots
    walked = walk_tree(tmp_path)
    assert [c.rel_path for c in walked.candidates] == ["train/cat/1.jpg"]
    assert walked.classes == {"train": ["cat", "dog"]}
    assert {p for p, _ in walked.ignored} == {"train/cat/@eaDir", "train/@eaDir", "train/dog/#recycle",
                                              "__MACOSX", "$RECYCLE.BIN", "train/cat/@Recycle",
                                              "train/cat/#snapshot"}


def test_links_named_like_images_outside_class_folders_are_skipped_as_loose_images(tmp_path):
    """Every image-like input is packed or skipped: a link to an image (or a broken one
    named like an image) at the split or class level, or a flat tree's top, was only
    ignored ("symbolic link not followed"), where a loose image there is skipped."""
    store = tmp_path / "store"
    touch(store, "x.jpg")
    for layout, tops in (("splits", ["top_link.jpg", "train/loose_link.jpg"]), ("flat", ["loose_link.jpg"])):
        src = tmp_path / layout
        touch(src, "train/cat/1.jpg" if layout == "splits" else "cat/1.jpg")
        for rel in tops:
            os.symlink(store / "x.jpg", src / rel)
            os.symlink(store / "gone.jpg", src / rel.replace("link", "broken"))
        os.symlink(store / "x.jpg", src / "notes.txt")  # not an image by its name: ignored
        for follow in (False, True):
            walked = walk_tree(src, layout=layout, follow_links=follow)
            skipped = dict(walked.skipped)
            want = sorted(tops + [rel.replace("link", "broken") for rel in tops])
            assert sorted(skipped) == want, (layout, follow)
            assert all("broken symbolic link" in skipped[rel] for rel in want if "broken" in rel)
            assert "notes.txt" in dict(walked.ignored)


def test_a_loop_of_links_is_called_a_loop(tmp_path):
    """a.jpg -> b.jpg -> a.jpg was "a symbolic link to b.jpg, which does not exist"."""
    touch(tmp_path, "train/cat/1.jpg")
    os.symlink("b.jpg", tmp_path / "train" / "cat" / "a.jpg")
    os.symlink("a.jpg", tmp_path / "train" / "cat" / "b.jpg")
    walked = walk_tree(tmp_path)
    assert sorted(dict(walked.skipped)) == ["train/cat/a.jpg", "train/cat/b.jpg"]
    assert all("is a loop of links" in w for w in walked.warnings) and len(walked.warnings) == 2
