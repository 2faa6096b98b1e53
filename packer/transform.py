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

from .headers import ORIENTATION_TAG, jpeg_adobe_marker

__all__ = ["ResizeSpec", "Reduced", "parse_resize", "load_for_resize", "transform_image", "to_8bit",
           "gif_transparent_black", "pillow_orientation", "stores_plain_cmyk", "ink_as_stored"]


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


def _keyed_to_8bit(im: Image.Image) -> Image.Image:
    """``to_8bit``, keeping a 16-bit grey PNG's colour key (``tRNS``) as alpha: matched
    against the 16-bit values, where the 8-bit image kept the 16-bit key and Pillow then
    took its low byte (4660 as 52) for the key of the 8-bit pixels."""
    key = im.info.get("transparency")
    if im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I") or not isinstance(key, int):
        return to_8bit(im)
    import numpy as np

    alpha = Image.fromarray(np.where(np.asarray(im) == key, 0, 255).astype(np.uint8), "L")
    keyed = Image.merge("LA", (to_8bit(im), alpha))
    keyed.info = {k: v for k, v in im.info.items() if k != "transparency"}  # EXIF turns it upright
    return keyed


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


@dataclass(frozen=True)
class Reduced:
    """A JPEG decoded at a reduced DCT scale: its full (raw) size, and the box of the
    reduced image that holds the picture. libjpeg rounds the reduced size up (1,803 columns
    at 1/2 decode to 902 holding 901.5 of picture), so the box is fractional."""

    size: tuple[int, int]
    box: tuple[float, float, float, float]


def load_for_resize(im: Image.Image, spec: ResizeSpec) -> Reduced | None:
    """Decode ``im`` (not yet loaded), letting a JPEG decode at a reduced DCT scale that
    still leaves ``_REDUCING_GAP`` times the pixels the resize needs; returns what
    ``transform_image`` needs to know of that reduction (None: decoded at full size).

    A 1,400 px photo stored at short side 256 then decodes at 1/2 or 1/4 scale: the
    transform was 9 ms per ImageNet-sized image at full scale on this machine.
    """
    w, h = im.size
    need_w, need_h = spec.decode_size(w, h)
    reduced = None
    if need_w * _REDUCING_GAP < w and need_h * _REDUCING_GAP < h and im.format in ("JPEG", "MPO"):
        drafted = im.draft(None, (math.ceil(need_w * _REDUCING_GAP), math.ceil(need_h * _REDUCING_GAP)))
        if drafted is not None and im.size != (w, h):
            reduced = Reduced((w, h), tuple(float(v) for v in drafted[1]))  # type: ignore[arg-type]
    im.load()
    return reduced


def stores_plain_cmyk(im: Image.Image, data: bytes | None) -> bool:
    """Whether ``im``, opened from ``data``, is a CMYK JPEG without Adobe's marker: Pillow
    reads every CMYK JPEG as Adobe's inverted CMYK, while such a file stores its ink as
    is, as TensorFlow (so Keras) reads it; Pillow's picture of it is a colour negative
    (``ink_as_stored`` turns it back)."""
    return (im.mode == "CMYK" and im.format in ("JPEG", "MPO") and data is not None
            and not jpeg_adobe_marker(data))


def ink_as_stored(im: Image.Image) -> Image.Image:
    """A CMYK image's channels inverted: Pillow's reading of a CMYK JPEG without Adobe's
    marker turned back into the ink its file stores (``stores_plain_cmyk``)."""
    return im.point(lambda v: 255 - v)


# EXIF orientation -> the box (x0, y0, x1, y1) of a (w, h) image as ImageOps.exif_transpose
# turns the image upright (tested against it)
_UPRIGHT_BOX = {
    1: lambda x0, y0, x1, y1, w, h: (x0, y0, x1, y1),
    2: lambda x0, y0, x1, y1, w, h: (w - x1, y0, w - x0, y1),
    3: lambda x0, y0, x1, y1, w, h: (w - x1, h - y1, w - x0, h - y0),
    4: lambda x0, y0, x1, y1, w, h: (x0, h - y1, x1, h - y0),
    5: lambda x0, y0, x1, y1, w, h: (y0, x0, y1, x1),
    6: lambda x0, y0, x1, y1, w, h: (h - y1, x0, h - y0, x1),
    7: lambda x0, y0, x1, y1, w, h: (h - y1, w - x1, h - y0, w - x0),
    8: lambda x0, y0, x1, y1, w, h: (y0, w - x1, y1, w - x0),
}
_SWAPPING = (5, 6, 7, 8)  # orientations that exchange width and height


def pillow_orientation(im: Image.Image) -> int:
    """Pillow's EXIF orientation of ``im`` (1-8), or 1 where its EXIF cannot be read: the
    orientation ``ImageOps.exif_transpose`` turns the image by, and the one rule the
    probe's recorded size and the reader's pixels both follow.

    A broken EXIF block must not hide an otherwise good image, and Pillow can raise
    anything on one (a PNG text chunk named "exif" holding text gave a TypeError, which
    stopped the reader). A tag of another type ("6", 6.5) is no orientation to
    ``ImageOps.exif_transpose`` either; a whole rational (6/1) is one. For a PNG,
    ``getexif`` loads the pixels: a caller that must see their errors loads it first.
    """
    try:
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
    except MemoryError:
        raise  # the process's trouble, not the file's
    except Exception:
        return 1
    return int(orientation) if orientation in _UPRIGHT_BOX else 1


def _resized(
    im: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """LANCZOS-resize (the ``box`` of ``im``, when given), colour and alpha each on its
    own: Pillow premultiplies RGBA by its alpha, which turns the colour under fully
    transparent pixels black, while readers that drop alpha (TensorFlow's rgb decode,
    ours) show the original's colour there; resized shards would otherwise train on other
    pixels than the originals."""
    if im.mode != "RGBA":
        return im.resize(size, Image.Resampling.LANCZOS, box=box)
    rgb = im.convert("RGB").resize(size, Image.Resampling.LANCZOS, box=box)
    rgb.putalpha(im.getchannel("A").resize(size, Image.Resampling.LANCZOS, box=box))
    return rgb


# JPEG's own limit on a side: a larger image is stored as PNG
_JPEG_MAX_SIDE = 65_500


def transform_image(
    im: Image.Image, spec: ResizeSpec, source: bytes | None = None, reduced: Reduced | None = None,
) -> tuple[bytes, str, int, int]:
    """Return (bytes, member extension, width, height) of the image as stored.

    ``source``: the bytes ``im`` was opened from. A JPEG (grey or RGB) already at the stored
    size is then stored as it came: re-encoding it would only lose quality (readers turn it
    upright by its EXIF tag as they would the re-encoded one). ``reduced``: what
    ``load_for_resize`` returned. The stored size is the full image's, and the resize takes
    the reduced image's picture box, as Pillow's ``thumbnail`` does: from the reduced size
    (rounded up) it came out a pixel off on odd sides, the picture stretched.
    """
    as_it_came = source is not None and im.format in ("JPEG", "MPO") and im.mode in ("L", "RGB")
    profile = im.info.get("icc_profile")
    if im.format == "GIF":
        im = gif_transparent_black(im)  # the pixels the reader (and Keras) shows the original with
    orientation = pillow_orientation(im)
    raw_size = im.size
    plain_cmyk = stores_plain_cmyk(im, source)
    im = ImageOps.exif_transpose(_keyed_to_8bit(im))
    if plain_cmyk:
        im = ink_as_stored(im)
    # a colour key (tRNS of a grey or RGB PNG) is alpha too: readers and TensorFlow give it
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)
    if has_alpha:
        im = im.convert("RGBA")
    elif im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    full_size, box = im.size, None
    if reduced is not None:
        full_size = reduced.size[::-1] if orientation in _SWAPPING else reduced.size
        box = _UPRIGHT_BOX[orientation](*reduced.box, *raw_size)
    size = spec.stored_size(*full_size)
    if size is None and as_it_came:
        return bytes(source or b""), "jpg", im.width, im.height
    if size is not None:
        im = _resized(im, size, box)
    buf = io.BytesIO()
    # given always, None too: Pillow's PNG writer otherwise takes the source's from im.info
    kept = kept_profile(profile, im.mode)
    if has_alpha or max(im.size) > _JPEG_MAX_SIDE:
        im.save(buf, format="PNG", optimize=False, icc_profile=kept)
        ext = "png"
    else:
        im.save(buf, format="JPEG", quality=spec.quality, optimize=False, icc_profile=kept)
        ext = "jpg"
    return buf.getvalue(), ext, im.width, im.height


# the ICC colour space each stored mode's pixels are in (bytes 16-19 of a profile's header)
_PROFILE_SPACE = {"RGB": b"RGB ", "RGBA": b"RGB ", "L": b"GRAY"}


def kept_profile(profile: bytes | None, mode: str) -> bytes | None:
    """The source's ICC profile, for the re-encoded image, where it says something: Adobe
    RGB, Display P3 (phones' photos) or a grey dot gain tell a viewer what the pixel values
    mean, and dropping one shifted the colours the image shows (its pixel values, all any
    reader or TensorFlow decodes, are the same either way). Left out: an sRGB profile,
    which says what an untagged image means anyway (3 KB on many photos, a quarter of a
    224-pixel JPEG), and a profile of another colour space than the stored pixels' (a CMYK
    one, after the ink became RGB)."""
    if not profile or len(profile) < 128 or profile[16:20] != _PROFILE_SPACE.get(mode):
        return None
    try:
        from PIL import ImageCms

        description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile)))
    except Exception:  # no LittleCMS, or a profile it cannot read (ImageCms.PyCMSError, ...)
        return profile  # kept as it came: the reader never reads it
    return None if "srgb" in description.lower() else profile
