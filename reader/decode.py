"""Decode one image's bytes into a fixed-size uint8 array, the way Keras would load it.

Everything the packer accepts is decoded (JPEG, PNG, WebP, GIF, BMP, TIFF, PNM), turned
into the requested colour mode, rotated by its EXIF orientation, and resized with the
requested interpolation, optionally keeping the aspect ratio (crop or pad, as Keras'
``crop_to_aspect_ratio`` / ``pad_to_aspect_ratio``).

Choices, made once here so every image is treated alike:

- **Alpha is dropped** for ``rgb`` and ``grayscale`` (the colour channels are kept as
  stored), which is what ``tf.image.decode_image(channels=3)`` does for Keras; ``rgba``
  keeps it and gives opaque images an alpha of 255. Palette images with a transparent
  colour go through RGBA first, so the result is the palette colour either way.
- **16-bit images** (``I;16``, ``I``) are scaled to 8 bits by dividing by 257, as
  TensorFlow does; Pillow's own conversion would clip instead.
- **Animated images** give their first frame (Keras: ``expand_animations=False``).
- **JPEG DCT scaling**: the decoder produces a reduced image directly (libjpeg-turbo's
  scaled IDCT) when that is still at least what the resize needs. With ``simplejpeg``
  installed (``pip install shardpack[fast]``) JPEGs are decoded by it at any of
  libjpeg-turbo's n/8 scales, so the resize has fewer pixels to read (about 25% less CPU per
  ImageNet-sized image than Pillow, measured with ``shardpack bench``; pixels within about
  1/255 on average of Pillow's). Without it, ``Image.draft`` scales by 1/2, 1/4 or 1/8.
  JPEGs simplejpeg cannot take (CMYK, 12-bit, damaged) go to Pillow, which decides.
- **Resize like Keras**: with OpenCV installed (``shardpack[fast]``), ``bilinear``,
  ``nearest`` and ``bicubic`` resize without antialiasing and with half-pixel centres, as
  ``tf.image.resize(antialias=False)`` does inside ``image_dataset_from_directory`` (pixels
  within rounding of Keras', and ~7x cheaper than Pillow's filter on this machine). Without
  OpenCV, and for the other interpolations, Pillow's (antialiased) filters are used.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from packer.headers import ORIENTATION_TAG, jpeg_orientation

try:  # optional: shardpack[fast]
    import simplejpeg
except ImportError:  # pragma: no cover - exercised when the extra is not installed
    simplejpeg = None

__all__ = [
    "INTERPOLATIONS",
    "COLOR_MODES",
    "DECODERS",
    "DecodeOptions",
    "decode_image",
    "jpeg_orientation",
    "to_color_mode",
]

# Keras/TensorFlow interpolation name -> nearest Pillow filter. Pillow's filters are
# antialiased when shrinking (like ``tf.image.resize(antialias=True)``).
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos3": Image.Resampling.LANCZOS,
    "lanczos5": Image.Resampling.LANCZOS,
    "gaussian": Image.Resampling.HAMMING,
    "mitchellcubic": Image.Resampling.BICUBIC,
}

# Keras interpolation name -> OpenCV flag name for the Keras-like (non-antialiased) resize
_CV2_FLAGS = {"bilinear": "INTER_LINEAR", "nearest": "INTER_NEAREST_EXACT", "bicubic": "INTER_CUBIC"}
_cv2: Any = None  # the OpenCV module once imported; False when it is not installed


def _opencv() -> Any:
    global _cv2
    if _cv2 is None:
        try:
            import cv2

            _cv2 = cv2
        except ImportError:
            _cv2 = False
    return _cv2


def resize_image(
    im: Image.Image, size: tuple[int, int], interpolation: str,
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """Resize ``im`` (or the sub-pixel ``box`` of it) to ``size`` = (width, height).

    OpenCV's affine warp samples like ``tf.image.resize(antialias=False)``: output pixel
    centre ``x + 0.5`` maps to input ``x0 + (x + 0.5) * scale``, edges clamped.
    """
    cv2: Any = _opencv() if interpolation in _CV2_FLAGS else False
    if not cv2 or im.mode not in ("L", "RGB", "RGBA"):
        return im.resize(size, INTERPOLATIONS[interpolation], box=box)
    x0, y0, x1, y1 = box or (0.0, 0.0, float(im.width), float(im.height))
    sx, sy = (x1 - x0) / size[0], (y1 - y0) / size[1]
    matrix = np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]])
    flags = getattr(cv2, _CV2_FLAGS[interpolation]) | cv2.WARP_INVERSE_MAP
    if interpolation == "nearest":  # warpAffine has no exact-nearest; remap by index instead
        xs = np.clip(np.floor(x0 + (np.arange(size[0]) + 0.5) * sx), 0, im.width - 1).astype(np.intp)
        ys = np.clip(np.floor(y0 + (np.arange(size[1]) + 0.5) * sy), 0, im.height - 1).astype(np.intp)
        return Image.fromarray(np.asarray(im)[ys[:, None], xs[None, :]])
    out = cv2.warpAffine(np.asarray(im), matrix, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    return Image.fromarray(out)


# Keras colour mode -> (Pillow mode, channels)
COLOR_MODES: dict[str, tuple[str, int]] = {
    "grayscale": ("L", 1),
    "rgb": ("RGB", 3),
    "rgba": ("RGBA", 4),
}

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that exchange width and height
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# JPEG colour spaces simplejpeg turns into RGB/L exactly as Pillow would (not CMYK/YCCK,
# whose Adobe inversion only Pillow handles)
_SIMPLE_SPACES = ("Gray", "YCbCr", "RGB")


@dataclass(frozen=True)
class DecodeOptions:
    """How to turn bytes into an array; the keyword names and meanings are Keras'.

    Attributes:
        image_size: (height, width) of the output.
        color_mode: "grayscale", "rgb" or "rgba".
        interpolation: a Keras interpolation name (see INTERPOLATIONS).
        crop_to_aspect_ratio: centre-crop to the target aspect ratio, then resize.
        pad_to_aspect_ratio: resize to fit inside, then pad with zeros (centred).
        random_crop: if set, (min, max) area fraction of a random crop at the target
            aspect ratio taken before resizing (an augmentation; replaces centre crop).
        random_flip: flip horizontally with probability 1/2 (an augmentation).
        decoder: "auto" (simplejpeg for JPEGs when installed, else Pillow), "pillow" or
            "simplejpeg" (see DECODERS).
    """

    image_size: tuple[int, int] = (256, 256)
    color_mode: str = "rgb"
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False
    pad_to_aspect_ratio: bool = False
    random_crop: tuple[float, float] | None = None
    random_flip: bool = False
    decoder: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            object.__setattr__(self, "image_size", (self.image_size, self.image_size))
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width), got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode must be one of {sorted(COLOR_MODES)}, got {self.color_mode!r}")
        object.__setattr__(self, "interpolation", self.interpolation.lower())
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got {self.decoder!r}")
        if self.crop_to_aspect_ratio and self.pad_to_aspect_ratio:
            raise ValueError("only one of crop_to_aspect_ratio and pad_to_aspect_ratio can be True")
        if self.random_crop is not None:
            lo, hi = self.random_crop
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"random_crop must be (min, max) area fractions in (0, 1], got {self.random_crop}")

    @property
    def channels(self) -> int:
        return COLOR_MODES[self.color_mode][1]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)


def to_color_mode(im: Image.Image, color_mode: str) -> Image.Image:
    """Convert a loaded image to the Keras colour mode ("grayscale", "rgb", "rgba")."""
    target = COLOR_MODES[color_mode][0]
    if im.mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.uint32) // 257
        im = Image.fromarray(np.minimum(arr, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode == target:
        return im
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if im.mode not in ("L", "RGB", "RGBA"):
        # P, PA, LA, CMYK, YCbCr, LAB, HSV, 1, ... -> a mode every target converts from
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif has_alpha and im.mode != "RGBA":
        im = im.convert("RGBA")  # L/RGB with a transparent colour key
    if im.mode == target:
        return im
    if target == "L" and im.mode == "RGBA":
        im = im.convert("RGB")  # drop alpha, then luma
    return im.convert(target)


def _box_fractions(
    width: int, height: int, options: DecodeOptions, rng: random.Random | None
) -> tuple[float, float, float, float]:
    """Region of the (oriented) image to resize, as fractions: (x0, y0, x1, y1)."""
    th, tw = options.image_size
    if options.random_crop is not None and rng is not None:
        area = rng.uniform(*options.random_crop)
        # the largest box at the target aspect ratio, then shrunk to the drawn area share
        cw = min(width, height * tw / th)
        ch = min(height, width * th / tw)
        shrink = math.sqrt(area * width * height / (cw * ch)) if area < cw * ch / (width * height) else 1.0
        fw, fh = cw * shrink / width, ch * shrink / height
        x0, y0 = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
        return x0, y0, x0 + fw, y0 + fh
    if options.crop_to_aspect_ratio:
        # keras.utils.smart_resize: the largest centred box with the target aspect ratio
        ch = max(min(height, int(width * th / tw)), 1)
        cw = max(min(width, int(height * tw / th)), 1)
        y0 = int((height - ch) / 2)
        x0 = int((width - cw) / 2)
        return x0 / width, y0 / height, (x0 + cw) / width, (y0 + ch) / height
    return 0.0, 0.0, 1.0, 1.0


def _fit_size(width: int, height: int, th: int, tw: int) -> tuple[int, int]:
    """Size of ``width x height`` scaled to fit inside ``tw x th`` (tf.image.resize_with_pad)."""
    scale = min(tw / width, th / height)
    return max(1, min(tw, round(width * scale))), max(1, min(th, round(height * scale)))


def _needed_size(
    ow: int, oh: int, box: tuple[float, float, float, float], options: DecodeOptions, swap: bool
) -> tuple[int, int]:
    """Smallest decoded (stored-orientation) size that still has the pixels the resize needs."""
    th, tw = options.image_size
    bw, bh = (box[2] - box[0]) * ow, (box[3] - box[1]) * oh
    if options.pad_to_aspect_ratio:
        sx = sy = min(tw / bw, th / bh)
    else:
        sx, sy = tw / bw, th / bh
    need = (math.ceil(ow * sx), math.ceil(oh * sy))
    return (need[1], need[0]) if swap else need


# what a loader returns: the upright image in the colour mode (maybe DCT-reduced), the box
# to resize (fractions), and the upright size of the stored image
_Loaded = tuple[Image.Image, tuple[float, float, float, float], tuple[int, int]]


def _load_simplejpeg(
    data: bytes, options: DecodeOptions, rng: random.Random | None
) -> _Loaded | None:
    """Decode a JPEG with simplejpeg, upright; None when Pillow must do it instead."""
    if simplejpeg is None or options.color_mode == "rgba" or data[:2] != b"\xff\xd8":
        return None
    try:
        raw_h, raw_w, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if space not in _SIMPLE_SPACES or (limit is not None and raw_w * raw_h > limit):
        return None  # CMYK/YCCK, or a possible bomb: Pillow's rules apply
    orientation = jpeg_orientation(data)
    if orientation is None:
        return None
    swap = orientation in _SWAPPING_ORIENTATIONS
    ow, oh = (raw_h, raw_w) if swap else (raw_w, raw_h)
    box = _box_fractions(ow, oh, options, rng)
    need_w, need_h = _needed_size(ow, oh, box, options, swap)
    gray = options.color_mode == "grayscale"
    try:
        arr = simplejpeg.decode_jpeg(
            data, colorspace="GRAY" if gray else "RGB", min_width=need_w, min_height=need_h
        )
    except ValueError:
        return None  # damaged or unusual: Pillow decides (and names the problem)
    im = Image.fromarray(arr[:, :, 0] if gray else arr, "L" if gray else "RGB")
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    return im, box, (ow, oh)


def _load_pillow(
    data: bytes, options: DecodeOptions, rng: random.Random | None
) -> _Loaded:
    """Decode any format with Pillow (JPEG DCT-scaled by draft), upright, in the colour mode."""
    im = Image.open(io.BytesIO(data))
    orientation = im.getexif().get(ORIENTATION_TAG, 1)
    raw_w, raw_h = im.size
    swap = orientation in _SWAPPING_ORIENTATIONS
    ow, oh = (raw_h, raw_w) if swap else (raw_w, raw_h)
    box = _box_fractions(ow, oh, options, rng)
    if im.format in ("JPEG", "MPO"):
        need = _needed_size(ow, oh, box, options, swap)
        im.draft("L" if options.color_mode == "grayscale" else "RGB", need)
    out = ImageOps.exif_transpose(im) if orientation != 1 else im
    out.load()
    return to_color_mode(out, options.color_mode), box, (ow, oh)


def _load_auto(
    data: bytes, options: DecodeOptions, rng: random.Random | None
) -> _Loaded:
    fast = _load_simplejpeg(data, options, rng) if data[:2] == b"\xff\xd8" else None
    return fast if fast is not None else _load_pillow(data, options, rng)


def _load_simplejpeg_only(
    data: bytes, options: DecodeOptions, rng: random.Random | None
) -> _Loaded:
    if simplejpeg is None:
        raise ImportError("decoder='simplejpeg' needs simplejpeg: pip install shardpack[fast]")
    return _load_auto(data, options, rng)


# decoder name -> loader. "auto": simplejpeg for the JPEGs it can take when installed,
# Pillow for the rest; "pillow": Pillow only (the reference the fast path is tested against).
DECODERS = {
    "auto": _load_auto,
    "pillow": _load_pillow,
    "simplejpeg": _load_simplejpeg_only,
}


def decode_image(data: bytes, options: DecodeOptions, *, rng: random.Random | None = None) -> np.ndarray:
    """Decode image bytes into a ``uint8`` array of shape ``options.shape``.

    Args:
        data: the encoded image (any format Pillow reads).
        options: size, colour mode, interpolation, aspect handling and decoder.
        rng: randomness for the augmentations (random crop / flip); unused otherwise.

    Raises:
        OSError, ValueError, Image.DecompressionBombError: the bytes are not a readable
            image (the caller turns this into SampleDecodeError).
    """
    th, tw = options.image_size
    out, box, full_size = DECODERS[options.decoder](data, options, rng)
    w, h = out.size
    pixel_box = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    if options.pad_to_aspect_ratio and options.random_crop is None:
        # the fitted size from the full-size image, so DCT scaling cannot shift it a pixel
        fw, fh = _fit_size(*full_size, th, tw)
        fitted = resize_image(out, (fw, fh), options.interpolation) if (fw, fh) != (w, h) else out
        canvas = Image.new(out.mode, (tw, th))
        canvas.paste(fitted, ((tw - fw) // 2, (th - fh) // 2))
        out = canvas
    else:
        sub_box = None
        if pixel_box != (0.0, 0.0, float(w), float(h)):
            # Crop first (resize(box=...) alone would blend in pixels from outside the box) to
            # the whole pixels that hold the box; on a DCT-reduced image the box's edges fall
            # inside pixels, and the rest is a sub-pixel box for resize, so the region is the
            # same whatever the decode scale.
            x0, y0, x1, y1 = pixel_box
            ix0, iy0 = math.floor(x0 + 1e-6), math.floor(y0 + 1e-6)
            ix1, iy1 = math.ceil(x1 - 1e-6), math.ceil(y1 - 1e-6)
            out = out.crop((ix0, iy0, ix1, iy1))
            sub_box = (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)
            if all(abs(a - b) < 1e-6 for a, b in zip(sub_box, (0, 0, *out.size), strict=True)):
                sub_box = None
        if sub_box is not None:
            out = resize_image(out, (tw, th), options.interpolation, box=sub_box)
        elif out.size != (tw, th):
            out = resize_image(out, (tw, th), options.interpolation)
    if options.random_flip and rng is not None and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(out)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr
