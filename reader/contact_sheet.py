"""A contact sheet of decoded samples, each captioned with its class name.

The quickest way to see that labels travel with their images: ``shardpack preview SOURCE
--split train --out grid.png`` shows what training will really be fed (after decoding,
colour conversion and resizing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from packer.errors import EmptySplitError

from .shard_reader import ShardReader

__all__ = ["preview"]

_CAPTION_HEIGHT = 14  # room for one line of 11 px text
_GAP = 4


def caption_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans where this machine has it (Latin with accents, Greek, Cyrillic: the
    font Pillow ships draws ASCII alone, so ``café`` came out ``caf□``), else Pillow's."""
    for path in _dejavu_paths():
        try:
            return ImageFont.truetype(path, 11)
        except OSError:
            continue
    return ImageFont.load_default()


def _dejavu_paths() -> list[str]:
    """Where DejaVu Sans may be: found by name (Pillow searches the system's font
    folders), Debian's and Fedora's paths, and matplotlib's copy when it is installed."""
    paths = ["DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
             "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf"]
    try:
        import matplotlib

        paths.append(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"))
    except ImportError:
        pass
    return paths


def caption(label: int, names: Sequence[str], width: int) -> str:
    """A tile's caption: the class index, then as much of its name as fits ``width`` px.
    The index reads in any font; a name in a script the font lacks (CJK) shows as boxes."""
    name = names[label] if 0 <= label < len(names) else "?"
    return f"{label} {name}"[: max(1, width // 6)]


def preview(
    source: str | os.PathLike[str] | Sequence[str],
    *,
    split: str = "train",
    out: str | os.PathLike[str] = "grid.png",
    count: int = 32,
    columns: int = 8,
    seed: int = 0,
    tile_size: int = 128,
    shuffle: bool = True,
    **reader_options: Any,
) -> Path:
    """Write a grid image of ``count`` decoded samples of ``split`` with class-name captions.

    Args:
        source: shard folder or URL, or manifest-less tars (see ShardReader).
        split: split to show.
        out: image file to write, in the format its extension names (``.jpg``, ``.webp``,
            ...; PNG for any other name); parent folders are created.
        count: samples to show (fewer if the split is smaller).
        columns: tiles per row.
        seed: which samples are shown (a shuffled draw; ``shuffle=False`` shows the first).
        tile_size: edge of each square tile in pixels (images keep their aspect ratio).
        reader_options: more ShardReader options (``storage_options``, ...).

    Returns:
        The path written.

    Raises:
        ManifestError, SplitNotFoundError, ShardReadError: as ShardReader.
    """
    if count < 1 or columns < 1:
        raise ValueError(f"count and columns must be >= 1, got {count}, {columns}")
    reader = ShardReader(
        source,
        split=split,
        image_size=(tile_size, tile_size),
        pad_to_aspect_ratio=True,
        data_format="channels_last",  # tiles are (h, w, c)
        batch_size=count,
        shuffle=shuffle,
        seed=seed,
        shuffle_buffer=max(count * 8, 256),
        **{"processes": 0, **reader_options},  # one batch: decode processes would only start
    )
    nothing = (np.zeros((0, tile_size, tile_size, 3)), np.zeros(0))
    try:
        images, labels = next(iter(reader), nothing)
    except EmptySplitError:  # an empty split (or class subset) is shown as an empty sheet
        images, labels = nothing
    n = len(images)
    rows = max(1, -(-n // columns))
    cols = min(columns, max(n, 1))
    cell_w, cell_h = tile_size + _GAP, tile_size + _CAPTION_HEIGHT + _GAP
    sheet = Image.new("RGB", (cols * cell_w + _GAP, rows * cell_h + _GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = caption_font()
    for i in range(n):
        x0 = _GAP + (i % columns) * cell_w
        y0 = _GAP + (i // columns) * cell_h
        tile = Image.fromarray(np.clip(images[i], 0, 255).astype(np.uint8).squeeze(-1) if images.shape[-1] == 1
                               else np.clip(images[i], 0, 255).astype(np.uint8))
        sheet.paste(tile.convert("RGB"), (x0, y0))
        draw.text((x0, y0 + tile_size + 1), caption(int(labels[i]), reader.class_names, tile_size),
                  fill="black", font=font)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path
