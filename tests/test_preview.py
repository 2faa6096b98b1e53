"""preview(): a captioned contact sheet of decoded samples."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from reader.contact_sheet import preview


def test_contact_sheet(photo_shards, tmp_path):
    out = preview(photo_shards, split="validation", out=tmp_path / "sub" / "grid.png", count=10,
                  columns=4, tile_size=48)
    assert out == tmp_path / "sub" / "grid.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        # 4 columns x 3 rows of 48 px tiles with captions and gaps
        assert im.size == (4 + 4 * 52, 4 + 3 * (48 + 14 + 4))
        sheet = np.asarray(im.convert("RGB"))
    caption = sheet[4 + 48 : 4 + 48 + 14, 4 : 4 + 48]
    assert (caption < 100).any(), "no caption text under the first tile"
    assert sheet[4:52, 4:52].std() > 10, "first tile is blank"


def test_same_seed_same_sheet(photo_shards, tmp_path):
    a = preview(photo_shards, out=tmp_path / "a.png", count=4, seed=3, tile_size=32)
    b = preview(photo_shards, out=tmp_path / "b.png", count=4, seed=3, tile_size=32)
    assert a.read_bytes() == b.read_bytes()


def test_the_sheet_is_written_in_the_format_its_name_says(photo_shards, tmp_path):
    """`--out grid.jpg` held PNG bytes: viewers that trust the name refused it."""
    for name, kind in (("g.jpg", "JPEG"), ("g.JPEG", "JPEG"), ("g.webp", "WEBP"), ("grid", "PNG")):
        out = preview(photo_shards, out=tmp_path / name, count=2, tile_size=16)
        with Image.open(out) as im:
            assert im.format == kind, name


def test_from_reader_import_preview_is_the_function():
    """``reader.__all__`` names the function ``preview``; a sub-module of the same name
    took its place once imported, so ``from reader import preview`` gave a module."""
    import subprocess
    import sys

    code = ("import reader.contact_sheet; from reader import preview; import reader; "
            "assert callable(preview) and reader.preview is preview, preview")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_captions_show_the_class_index_and_accented_names():
    """Pillow's own font draws ASCII alone: café came out caf□. The caption font is DejaVu
    Sans wherever this machine has it, and each caption starts with the class index, which
    reads in any font (a name in a script the font lacks, such as CJK, shows as boxes)."""
    from reader.contact_sheet import _dejavu_paths, caption, caption_font

    assert caption(1, ["cat", "猫"], 128) == "1 猫"
    assert caption(7, ["cat"], 128) == "7 ?"
    assert caption(0, ["a" * 50], 60) == "0 " + "a" * 8
    font = caption_font()
    found = [p for p in _dejavu_paths() if os.path.isabs(p) and os.path.exists(p)]
    if found:  # this machine has DejaVu (Debian's fonts-dejavu-core, or matplotlib's copy)
        missing = bytes(font.getmask("\U0010fffd"))  # a code point no font draws: the box
        assert bytes(font.getmask("é")) != missing and bytes(font.getmask("ж")) != missing
