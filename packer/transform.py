"""Optional pack-time resize: store smaller JPEGs so training decodes less.

Decoding a 500x375 JPEG to train at 224x224 spends most of its time on pixels that the
resize throws away; storing the short side at 256 once, at pack time, makes every epoch
cheaper. Storing exactly the training size (``--resize 224x224``, squashed as Keras'
``image_dataset_from_directory`` squashes by default) goes further: the reader then decodes
small JPEGs and never resizes. The output is deterministic (same Pillow, same input, same
bytes), which keeps shards byte-identical and resumable.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps

__all__ = ["ResizeSpec", "parse_resize", "load_for_resize", "transform_image", "to_8bit",
           "gif_transparent_black"]


@dataclass(frozen=True)
class ResizeSpec:
    """How images are stored: re-encoded at ``quality``, and either shrunk so the short side
    is at most ``short_side`` px (aspect kept, never enlarged) or, with ``size`` = (width,
    height), resized to exactly that size (aspect not kept, enlarged when smaller), which
    is what ``image_dataset_from_directory(image_size=...)`` does to every image by default.
    """

    short_side: int | None = None
    quality: int = 90
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.short_side is None) == (self.size is None):
            raise ValueError("a ResizeSpec takes either short_side or size")

    def as_dict(self) -> dict[str, int]:
        if self.size is not None:
            return {"width": self.size[0], "height": self.size[1], "quality": self.quality}
        return {"short_side": int(self.short_side or 0), "quality": self.quality}

    def stored_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The (width, height) an upright ``width`` x ``height`` image is stored at, or None
        when it is stored at its own size."""
        if self.size is not None:
            return None if (width, height) == self.size else self.size
        scale = int(self.short_side or 0) / min(width, height)
        if scale >= 1:
            return None
        return max(1, round(width * scale)), max(1, round(height * scale))

    def decode_size(self, width: int, height: int) -> tuple[float, float]:
        """The smallest decoded size that covers the stored size on both axes, whichever
        way EXIF turns the ``width`` x ``height`` image (its raw size) upright."""
        if self.size is not None:
            side = max(self.size)
            return float(min(width, side)), float(min(height, side))
        scale = min(1.0, int(self.short_side or 0) / max(1, min(width, height)))
        return width * scale, height * scale


def parse_resize(text: str | int | None, *, quality: int = 90) -> ResizeSpec | None:
    """Parse ``--resize``: ``256`` (short side in pixels), ``224x224`` (exact WIDTHxHEIGHT)
    or None/``""``/``"none"`` for none. ``0`` is refused like any other size that is not
    positive: taking it for "no resize" packed the originals of someone who asked for
    smaller images, and said nothing.

    Raises:
        ValueError: not a positive pixel count or size, or quality outside 1..100.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none")):
        return None
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    words = str(text).lower().removeprefix("short:").removesuffix("px").split("x")
    try:
        sides = [int(word) for word in words]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise ValueError("--resize takes the short side in pixels (e.g. 256) or an exact "
                         f"WIDTHxHEIGHT (e.g. 224x224); got {text!r}")
    if min(sides) <= 0:
        raise ValueError(f"--resize must be positive, got {text!r}")
    if len(sides) == 2:
        return ResizeSpec(quality=quality, size=(sides[0], sides[1]))
    return ResizeSpec(sides[0], quality)


def to_8bit(im: Image.Image) -> Image.Image:
    """Bring 16/32-bit integer images into 0..255 ``L`` by scaling (not clipping to white).
    Float (``F``) images are read as 0..255 values and clipped, as the reader reads them:
    a float image scaled 0..1 comes out nearly black (no format says which scale it used)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if im.mode == "I":
        return im.point(lambda v: v * (1 / 256)).convert("L")
    if im.mode == "F":
        return im.convert("L")
    return im


def gif_transparent_black(im: Image.Image) -> Image.Image:
    """A loaded GIF frame with its transparent pixels black (a palette frame's transparent
    entry is made black in place; a grey one, which Pillow opens as L when the palette is a
    grey ramp, comes back as LA, those pixels 0 and transparent).

    TensorFlow's GIF decoder (and so Keras) writes (0, 0, 0) for transparent pixels,
    whatever colour the palette holds there; Pillow keeps the palette colour. The reader
    decodes GIFs so, and ``--resize`` stores them so: its PNG keeps the colour under
    alpha 0, which a reader in ``rgb`` mode shows (it drops alpha, as TensorFlow does).
    """
    index = im.info.get("transparency")
    if not isinstance(index, int):
        return im
    if im.mode == "L":
        shown = im.point(lambda v: 0 if v == index else v)
        return Image.merge("LA", (shown, im.point(lambda v: 0 if v == index else 255)))
    palette = im.getpalette() if im.mode == "P" else None
    if palette is not None and 3 * index + 3 <= len(palette):
        palette[3 * index : 3 * index + 3] = (0, 0, 0)
        im.putpalette(palette)
    return im


# How far above the target size the JPEG decoder may stop shrinking by DCT scaling before
# the LANCZOS resize takes over: Pillow's own ``thumbnail`` default (its docs: the result
# is indistinguishable from a full-size resize at 2.0).
_REDUCING_GAP = 2.0


def load_for_resize(im: Image.Image, spec: ResizeSpec) -> None:
    """Decode ``im`` (not yet loaded), letting a JPEG decode at a reduced DCT scale that
    still leaves ``_REDUCING_GAP`` times the pixels the resize needs.

    A 1,400 px photo stored at short side 256 then decodes at 1/2 or 1/4 scale: the
    transform was 9 ms per ImageNet-sized image at full scale on this machine.
    """
    w, h = im.size
    need_w, need_h = spec.decode_size(w, h)
    if need_w * _REDUCING_GAP < w and need_h * _REDUCING_GAP < h and im.format in ("JPEG", "MPO"):
        im.draft(None, (math.ceil(need_w * _REDUCING_GAP), math.ceil(need_h * _REDUCING_GAP)))
    im.load()


def _resized(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """LANCZOS-resize, colour and alpha each on its own: Pillow premultiplies RGBA by its
    alpha, which turns the colour under fully transparent pixels black, while readers that
    drop alpha (TensorFlow's rgb decode, ours) show the original's colour there; resized
    shards would otherwise train on other pixels than the originals."""
    if im.mode != "RGBA":
        return im.resize(size, Image.Resampling.LANCZOS)
    rgb = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    rgb.putalpha(im.getchannel("A").resize(size, Image.Resampling.LANCZOS))
    return rgb


def transform_image(im: Image.Image, spec: ResizeSpec, source: bytes | None = None) -> tuple[bytes, str, int, int]:
    """Return (bytes, member extension, width, height) of the image as stored.

    ``source``: the bytes ``im`` was opened from. A JPEG (grey or RGB) already at the stored
    size is then stored as it came: re-encoding it would only lose quality (readers turn it
    upright by its EXIF tag as they would the re-encoded one).
    """
    as_it_came = source is not None and im.format == "JPEG" and im.mode in ("L", "RGB")
    if im.format == "GIF":
        im = gif_transparent_black(im)  # the pixels the reader (and Keras) shows the original with
    im = ImageOps.exif_transpose(to_8bit(im))
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        im = im.convert("RGBA")
    elif im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    size = spec.stored_size(*im.size)
    if size is None and as_it_came:
        return bytes(source or b""), "jpg", im.width, im.height
    if size is not None:
        im = _resized(im, size)
    buf = io.BytesIO()
    if has_alpha:
        im.save(buf, format="PNG", optimize=False)
        ext = "png"
    else:
        im.save(buf, format="JPEG", quality=spec.quality, optimize=False)
        ext = "jpg"
    return buf.getvalue(), ext, im.width, im.height
