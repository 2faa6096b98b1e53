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
- **JPEG DCT scaling**: ``Image.draft`` decodes at 1/2, 1/4 or 1/8 size when that is still
  at least what the resize needs. That is most of the speed on large photos.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = ["INTERPOLATIONS", "COLOR_MODES", "DecodeOptions", "decode_image", "to_color_mode"]

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

# Keras colour mode -> (Pillow mode, channels)
COLOR_MODES: dict[str, tuple[str, int]] = {
    "grayscale": ("L", 1),
    "rgb": ("RGB", 3),
    "rgba": ("RGBA", 4),
}

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that exchange width and height
_ORIENTATION_TAG = 0x0112


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
    """

    image_size: tuple[int, int] = (256, 256)
    color_mode: str = "rgb"
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False
    pad_to_aspect_ratio: bool = False
    random_crop: tuple[float, float] | None = None
    random_flip: bool = False

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


def decode_image(data: bytes, options: DecodeOptions, *, rng: random.Random | None = None) -> np.ndarray:
    """Decode image bytes into a ``uint8`` array of shape ``options.shape``.

    Args:
        data: the encoded image (any format Pillow reads).
        options: size, colour mode, interpolation and aspect handling.
        rng: randomness for the augmentations (random crop / flip); unused otherwise.

    Raises:
        OSError, ValueError, Image.DecompressionBombError: the bytes are not a readable
            image (the caller turns this into SampleDecodeError).
    """
    th, tw = options.image_size
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
        raw_w, raw_h = im.size
        swap = orientation in _SWAPPING_ORIENTATIONS
        ow, oh = (raw_h, raw_w) if swap else (raw_w, raw_h)
        box = _box_fractions(ow, oh, options, rng)
        if im.format in ("JPEG", "MPO"):
            bw, bh = (box[2] - box[0]) * ow, (box[3] - box[1]) * oh
            if options.pad_to_aspect_ratio:
                scale = min(tw / bw, th / bh)
                sx = sy = scale
            else:
                sx, sy = tw / bw, th / bh
            need = (math.ceil(ow * sx), math.ceil(oh * sy))
            if swap:
                need = (need[1], need[0])
            im.draft("L" if options.color_mode == "grayscale" else "RGB", need)
        out = ImageOps.exif_transpose(im) if orientation != 1 else im
        out.load()
        out = to_color_mode(out, options.color_mode)
        resample = INTERPOLATIONS[options.interpolation]
        w, h = out.size
        pixel_box = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
        if options.pad_to_aspect_ratio and options.random_crop is None:
            fw, fh = _fit_size(w, h, th, tw)
            fitted = out.resize((fw, fh), resample) if (fw, fh) != (w, h) else out
            canvas = Image.new(out.mode, (tw, th))
            canvas.paste(fitted, ((tw - fw) // 2, (th - fh) // 2))
            out = canvas
        else:
            if pixel_box != (0.0, 0.0, float(w), float(h)):
                # crop first: resize(box=...) would blend in pixels from outside the box
                out = out.crop(tuple(round(v) for v in pixel_box))
            if out.size != (tw, th):
                out = out.resize((tw, th), resample)
        if options.random_flip and rng is not None and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(out)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr
