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
