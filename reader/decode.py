"""Decode one image's bytes into a fixed-size uint8 array (or a float32 batch row), the way
Keras would load it.

Everything the packer accepts is decoded (JPEG, PNG, WebP, GIF, BMP, TIFF, PNM), turned
into the requested colour mode, rotated by its EXIF orientation (Keras ignores EXIF: a
photo stored rotated comes out upright here, up to 240/255 from Keras'), and resized with the
requested interpolation, optionally keeping the aspect ratio (crop or pad, as Keras'
``crop_to_aspect_ratio`` / ``pad_to_aspect_ratio``).

Choices, made once here so every image is treated alike:

- **Alpha is dropped** for ``rgb`` and ``grayscale`` (the colour channels are kept as
  stored), which is what ``tf.image.decode_image(channels=3)`` does for Keras; ``rgba``
  keeps it and gives opaque images an alpha of 255. Palette images with a transparent
  colour go through RGBA first; a PNG's transparent pixels keep their palette colour, as
  with TensorFlow's PNG decoder, while a GIF's become black (0, 0, 0), as TensorFlow's GIF
  decoder makes them (``packer.transform.gif_transparent_black``; ``shardpack pack
  --resize`` stores them so too).
- **16-bit images** (``I;16``, ``I``) keep their high byte (``value >> 8``), as
  TensorFlow's ``decode_png`` to uint8 does (Keras' pixels equal it exactly; dividing by 257
  put 60% of a ramp's pixels one level off); Pillow's own conversion would clip instead.
  ``shardpack pack --resize`` stores them the same way (``packer.transform.to_8bit``).
- **Animated images** give their first frame (Keras: ``expand_animations=False``).
- **JPEG DCT scaling**: the decoder produces a reduced image directly (libjpeg-turbo's
  scaled IDCT) when that is still at least what the resize needs. With ``simplejpeg``
  installed (``pip install shardpack[fast]``) JPEGs are decoded by it at 1/8, 1/4, 1/2 or
  full scale (the scales with SIMD code; 5/8..7/8 are slower than 1/2) with libjpeg's fast
  integer IDCT, TensorFlow's default, so pixels are within a few 1/255 of Pillow's (tested).
  Against Keras, which decodes at full size and samples it, the reduced decode averages:
  shrinking 2x or more differs visibly (150x151 to 64x64 bilinear: up to 115/255, 8/255 on
  average); ``dct_scaling=False`` gives Keras' pixels (bilinear within 0.8/255, nearest
  equal). At 1/2..1/8 scale libjpeg-turbo rounds the decoded size up (301 columns at 1/8
  give 38, of which 37.625 hold the picture); the resize takes the 38 as the whole
  picture, so the far edge shifts by up to ~2.5 source pixels (sampling the true width
  needs the affine warp, about 3x the cost of ``cv2.resize``).
  CMYK and YCCK JPEGs read as RGB are decoded to CMYK and converted in TensorFlow's
  arithmetic (``_tensorflow_rgb``): Keras' pixels exactly. Without it, ``Image.draft``
  scales by 1/2, 1/4 or 1/8. JPEGs simplejpeg cannot take (12-bit, damaged; CMYK read as
  grayscale) go to Pillow, which decides.
- **Plain 8-bit PNGs** decode with OpenCV when it is installed (``opencv_png``): Pillow's
  pixels, without holding the GIL. Oriented, animated, 16-bit or damaged ones go to Pillow.
- **Resize like Keras**: with OpenCV installed (``shardpack[fast]``), ``bilinear``,
  ``nearest`` and ``bicubic`` resize without antialiasing and with half-pixel centres, as
  ``tf.image.resize(antialias=False)`` does inside ``image_dataset_from_directory``:
  bilinear within rounding of Keras' pixels, nearest equal, several times cheaper than
  Pillow's filter on this machine. Bicubic is OpenCV's kernel (a = -0.75, TensorFlow's is
  -0.5): up to ~15/255 apart on sharp edges. Without OpenCV, and for the other
  interpolations, Pillow's (antialiased) filters are used; on RGBA they premultiply by
  alpha, so the colour of nearly transparent pixels differs from Keras'. Measured against
  Keras on photos shrunk to 224x224, the interpolations other than bilinear and nearest
  are up to 18/255 (bicubic) to 151/255 (lanczos3/5) apart, 0.4-5.8/255 on average
  (docs/READING.md), further the more they shrink. Pixels stay numpy
  arrays from decoder to batch on the fast path.
"""

from __future__ import annotations

import io
import math
import os
import random
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
from PIL import Image, ImageOps

from packer.headers import (
    PNG_SIGNATURE,
    jpeg_adobe_marker,
    jpeg_orientation,
    png_header,
    png_is_plain,
    png_only,
)
from packer.probe import pillow_orientation
from packer.transform import gif_transparent_black, ink_as_stored, stores_plain_cmyk

from .checks import check_image_size

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
    "fast_jpeg_scale",
    "resize_array",
    "resize_into",
    "mirrored",
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
    """OpenCV, imported on first use with its own thread pool turned off.

    The reader already runs one decode per core; OpenCV splitting each small resize
    across its threads as well cost about 20% more CPU per image here (0.64 vs 0.50 ms per
    decode + resize of a 256 px JPEG, measured). ``cv2.setNumThreads`` is process-wide:
    ``SHARDPACK_CV2_THREADS=keep`` leaves OpenCV's setting alone, a number sets it.
    """
    global _cv2
    if _cv2 is None:
        try:
            import cv2
        except ImportError:
            _cv2 = False
            return _cv2
        threads = os.environ.get("SHARDPACK_CV2_THREADS", "1")
        if threads != "keep":
            try:
                cv2.setNumThreads(int(threads))
            except ValueError:
                warnings.warn(
                    f"SHARDPACK_CV2_THREADS={threads!r} is neither a number nor 'keep'; "
                    "OpenCV's thread setting is left alone", RuntimeWarning, stacklevel=2)
        _cv2 = cv2
    return _cv2


class _WorkArrays(threading.local):
    """Each decode thread's own arrays for the in-between images of a decode into a batch
    row, reused from image to image, one per slot: the decoded JPEG ("decoded"), turned
    upright ("turned"), mirrored by ``random_flip`` ("flipped"), its float32 copy ("float"),
    its uint8 resize ("resized"), ``pad_to_aspect_ratio``'s canvas ("padded"). The other
    paths still make their arrays per image: PNGs and what Pillow decodes, and the
    ``nearest`` and Pillow interpolations.

    Why not fresh arrays: glibc serves each large allocation from its heap only while its
    adaptive mmap threshold is in force. Anything that sets a malloc threshold switches that
    off (``MALLOC_TRIM_THRESHOLD_``, which Dask sets for every worker; TensorFlow's
    ``from_generator``, which sets ``M_TRIM_THRESHOLD``), and every array of 128 KB or more
    is then a fresh ``mmap`` whose pages are faulted in and zeroed: measured on 2 cores, the
    reader on ``--resize 256`` shards with ``MALLOC_TRIM_THRESHOLD_=65536`` took 1.03-1.19
    ms of CPU per image, 265 page faults each, against 0.62. These arrays are faulted in
    once per thread. They never leave ``decode_image``: it uses them only when it writes
    into the caller's ``out``.
    """

    def __init__(self) -> None:
        self.raw: dict[str, np.ndarray] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray | None:
        """An array of ``shape`` in this thread's ``slot`` (its contents are garbage); None when it
        would exceed ``_WORK_MAX_BYTES`` (the caller makes its own: a huge image's buffer is
        not kept)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > _WORK_MAX_BYTES:
            return None
        raw = self.raw.get(slot)
        if raw is None or raw.nbytes < nbytes:
            # a quarter more than asked: images of growing size do not reallocate each time
            raw = np.empty(min(_WORK_MAX_BYTES, nbytes + nbytes // 4), dtype=np.uint8)
            self.raw[slot] = raw
        return raw[:nbytes].view(dtype).reshape(shape)


# The largest array a decode thread keeps for reuse (per slot): a 2,000 x 2,000 RGB float32
# copy. A larger one is allocated for its image only.
_WORK_MAX_BYTES = 48 << 20
_work = _WorkArrays()


def resize_array(
    arr: np.ndarray, size: tuple[int, int], interpolation: str,
    box: tuple[float, float, float, float] | None = None, dst: np.ndarray | None = None,
) -> np.ndarray:
    """Resize the (h, w, c) uint8 ``arr`` (or the sub-pixel ``box`` of it) to ``size`` = (width, height).

    ``dst``: a C-contiguous (height, width, c) uint8 array that OpenCV's bilinear and
    bicubic resizes write into (and return); any other resize returns a new array.

    With OpenCV, sampling is ``tf.image.resize(antialias=False)``'s: output pixel centre
    ``x + 0.5`` maps to input ``x0 + (x + 0.5) * scale``, edges clamped. A whole-image resize
    is ``cv2.resize`` (about 3x cheaper than a warp); only a sub-pixel box needs the affine
    warp. Arrays stay arrays: a round trip through a Pillow image copies every pixel twice,
    which cost more than the resize itself (measured with scripts/bench_decode.py).
    """
    cv2: Any = _opencv() if interpolation in _CV2_FLAGS else False
    channels = arr.shape[2]
    if not cv2 or channels not in (1, 3, 4):
        im = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
        out = np.asarray(im.resize(size, INTERPOLATIONS[interpolation], box=box))
    elif interpolation == "nearest":  # OpenCV's nearest rounds differently; index instead
        out = arr[_nearest_rows_cols(arr.shape[:2], size, box)]
    else:
        if dst is not None and not (dst.flags.c_contiguous and dst.shape == (size[1], size[0], channels)):
            dst = None
        return _as_hwc(_opencv_resample(cv2, arr, size, interpolation, box, dst=_opencv_view(dst, channels)), dst)
    return out[:, :, None] if out.ndim == 2 else out


# A float32 batch row takes a bilinear resize computed in float32 when the decoded image has
# at most this many times the row's pixels. Its pixels are then tf.image.resize's own
# unrounded float32 values (within 0.01, where the uint8 resize is up to 0.8 off), at about
# the cost of the uint8 resize plus the cast into the row. Measured on shards packed at 256 px
# going to 224x224 (1.7x), paired: the reader on 2 cores spent 0.78-0.81 against 0.80-0.84 ms
# CPU per image in 5 runs; decode_image alone 0-3% less (scripts/bench_decode.py
# --float-rows), or 2-4% more with the variants' order shuffled per image. Larger images cost
# more to cast than the resize saves: on the original JPEGs 1-2% slower at 3x.
_FLOAT_RESIZE_MAX_AREA = 2.0


def resize_into(
    arr: np.ndarray, out: np.ndarray, interpolation: str,
    box: tuple[float, float, float, float] | None = None, *, flip: bool = False,
) -> None:
    """Resize the (h, w, c) uint8 ``arr`` (or the sub-pixel ``box`` of it) into ``out``,
    mirrored left to right when ``flip``.

    ``out`` is an (height, width, c) uint8 or float32 array, typically a batch row. A
    bilinear resize into float32 is done in float32 by OpenCV when that is cheaper (see
    ``_FLOAT_RESIZE_MAX_AREA``): bilinear weights are a convex combination, so the values
    stay in [0, 255]. Everything else is ``resize_array``'s uint8 result, cast into ``out``.
    The flip happens on the way in (the source and its box mirrored) or on the uint8
    result (``mirrored``), never as a pass over ``out``: flipping a float32 row in place
    cost 0.6 ms with numpy (an overlapping copy) and 0.12 ms with OpenCV, more than the
    resize.
    """
    height, width = out.shape[:2]
    cv2: Any = _opencv() if interpolation == "bilinear" and out.dtype == np.float32 else False
    if (
        cv2
        and arr.shape[2] in (1, 3, 4)
        and out.flags.c_contiguous
        and arr.shape[0] * arr.shape[1] <= _FLOAT_RESIZE_MAX_AREA * height * width
    ):
        if flip:
            arr = mirrored(arr, "flipped")
            if box is not None:
                box = (arr.shape[1] - box[2], box[1], arr.shape[1] - box[0], box[3])
        src = _work.take("float", arr.shape, np.float32)
        if src is None:
            src = arr.astype(np.float32)
        else:
            np.copyto(src, arr)
        dst = _opencv_view(out, arr.shape[2])
        result = _opencv_resample(cv2, src, (width, height), interpolation, box, dst=dst)
        if not np.may_share_memory(result, out):  # OpenCV allocates when dst does not fit
            dst[...] = result
        return
    if out.dtype == np.uint8 and not flip:
        resized = resize_array(arr, (width, height), interpolation, box=box, dst=out)
    else:
        resized = resize_array(arr, (width, height), interpolation, box=box,
                               dst=_work.take("resized", out.shape, np.uint8))
    if flip:
        out[...] = mirrored(resized, "flipped")
    elif resized is not out:
        out[...] = resized


def mirrored(arr: np.ndarray, slot: str | None = None) -> np.ndarray:
    """The (h, w, c) uint8 ``arr`` flipped left to right, as a new contiguous array (in
    this thread's work array ``slot`` when given: see ``_upright``).

    Not numpy's ``arr[:, ::-1]``: copying or casting that view walks the pixels backwards
    three bytes at a time, 0.4 ms into a 224x224 float32 row and 0.8 ms for a 256x341 cast
    here, where ``cv2.flip`` takes 0.02-0.03 ms (measured; it was half the cost of a decode).
    """
    return np.ascontiguousarray(_upright(arr, _MIRRORED, slot))  # a copy only without OpenCV


def _nearest_rows_cols(
    shape: tuple[int, int], size: tuple[int, int], box: tuple[float, float, float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays picking ``tf.image.resize``'s nearest pixels for ``size`` = (width, height)."""
    h, w = shape
    x0, y0, x1, y1 = box or (0.0, 0.0, float(w), float(h))
    xs = _nearest_sources(x0, x1, size[0], w)
    ys = _nearest_sources(y0, y1, size[1], h)
    return ys[:, None], xs[None, :]


def _nearest_sources(start: float, stop: float, out: int, limit: int) -> np.ndarray:
    """TensorFlow's nearest source index of each output pixel along one axis, computed as
    its kernel computes it, in float32: ``floor((i + 0.5) * (in / out))``. In float64 a
    product that lands on a whole number (52.5 * 152/70 = 114) picks the next row, where
    float32's 113.99999 picks the one TensorFlow picks."""
    scale = np.float32(stop - start) / np.float32(out)
    centres = (np.arange(out, dtype=np.float32) + np.float32(0.5)) * scale
    if float(start).is_integer():  # Keras' own crops start on whole pixels
        index = start + np.floor(centres)
    else:
        index = np.floor(np.float32(start) + centres)
    return np.clip(index, 0, limit - 1).astype(np.intp)


def _opencv_resample(
    cv2: Any, arr: np.ndarray, size: tuple[int, int], interpolation: str,
    box: tuple[float, float, float, float] | None, dst: np.ndarray | None = None,
) -> np.ndarray:
    """``cv2.resize`` of the whole image, or an affine warp of a sub-pixel ``box``, with
    half-pixel centres; into ``dst`` when it fits."""
    flag = getattr(cv2, _CV2_FLAGS[interpolation])
    if box is None:
        return cv2.resize(arr, size, dst=dst, interpolation=flag)
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / size[0], (y1 - y0) / size[1]
    matrix = np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]])
    return cv2.warpAffine(np.ascontiguousarray(arr), matrix, size, dst=dst,
                          flags=flag | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


@overload
def _opencv_view(dst: np.ndarray, channels: int) -> np.ndarray: ...
@overload
def _opencv_view(dst: None, channels: int) -> None: ...
def _opencv_view(dst: np.ndarray | None, channels: int) -> np.ndarray | None:
    """The view of the (h, w, c) ``dst`` that OpenCV writes a ``channels``-channel image
    into: (h, w) for one channel, as OpenCV's one-channel images are 2-D."""
    return dst[:, :, 0] if dst is not None and channels == 1 else dst


def _as_hwc(result: np.ndarray, dst: np.ndarray | None) -> np.ndarray:
    """OpenCV's ``result`` as an (h, w, c) array: ``dst`` itself when OpenCV wrote into it
    (it makes a new array when ``dst`` does not fit)."""
    if dst is not None and np.may_share_memory(result, dst):
        return dst
    return result[:, :, None] if result.ndim == 2 else result


# Keras colour mode -> (Pillow mode, channels)
COLOR_MODES: dict[str, tuple[str, int]] = {
    "grayscale": ("L", 1),
    "rgb": ("RGB", 3),
    "rgba": ("RGBA", 4),
}

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that exchange width and height
_MIRRORED = 2  # the EXIF orientation "mirrored left to right": random_flip's turn too
# EXIF orientation -> the view of a decoded (h, w, c) array that shows it upright (the
# arrays equal ImageOps.exif_transpose's); without OpenCV only, see _upright
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
# the same with OpenCV, as new contiguous arrays (tested equal), written into the third
# argument when it is not None
_UPRIGHT_CV2: dict[int, Callable[[Any, np.ndarray, Any], np.ndarray]] = {
    2: lambda cv2, a, d: cv2.flip(a, 1, dst=d),
    3: lambda cv2, a, d: cv2.rotate(a, cv2.ROTATE_180, dst=d),
    4: lambda cv2, a, d: cv2.flip(a, 0, dst=d),
    5: lambda cv2, a, d: cv2.transpose(a, dst=d),
    6: lambda cv2, a, d: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE, dst=d),
    7: lambda cv2, a, d: cv2.flip(cv2.transpose(a), -1, dst=d),
    8: lambda cv2, a, d: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE, dst=d),
}


def _upright(arr: np.ndarray, orientation: int, slot: str | None = None) -> np.ndarray:
    """The decoded (h, w, c) uint8 ``arr`` turned upright for its EXIF ``orientation``.

    With OpenCV a new array, turned by cv2.flip/rotate/transpose; with ``slot``, this
    thread's work array of that name (``_WorkArrays``: for a caller that copies the pixels
    out before its next decode; never ``arr``'s own slot). numpy's reversed or
    transposed views cost nothing here but everything later: the resize or the cast into
    the batch row then walks the pixels backwards or across rows, three bytes at a time
    (a 470x480 JPEG to 224x224: 0.86 ms upright, 1.1-1.7 ms with orientations 2-8, measured).
    """
    cv2: Any = _opencv()
    h, w, channels = arr.shape
    if cv2 and channels in (1, 3, 4):
        shape = (w, h, channels) if orientation in _SWAPPING_ORIENTATIONS else (h, w, channels)
        dst = _work.take(slot, shape, np.uint8) if slot is not None else None
        return _as_hwc(_UPRIGHT_CV2[orientation](cv2, arr, _opencv_view(dst, channels)), dst)
    return _UPRIGHT[orientation](arr)


# libjpeg-turbo's scaled IDCTs with SIMD code: decoding at 5/8..7/8 is slower than at 1/1
_FAST_SCALES = (1 / 8, 1 / 4, 1 / 2, 1.0)
# JPEG colour spaces simplejpeg turns into RGB/L exactly as Pillow would
_SIMPLE_SPACES = ("Gray", "YCbCr", "RGB")
# four-channel ones it decodes to CMYK, which ``_tensorflow_rgb`` turns into RGB (to RGB
# only: TensorFlow decodes none of them to grayscale, and Pillow's grey is its own)
_CMYK_SPACES = ("CMYK", "YCCK")


@dataclass(frozen=True)
class DecodeOptions:
    """How to turn bytes into an array; the keyword names and meanings are Keras'.

    Attributes:
        image_size: (height, width) of the output.
        color_mode: "grayscale", "rgb" or "rgba".
        interpolation: a Keras interpolation name (see INTERPOLATIONS).
        crop_to_aspect_ratio: centre-crop to the target aspect ratio, then resize.
        pad_to_aspect_ratio: resize to fit, keeping the aspect ratio, and centre on zeros,
            as Keras' ``image_dataset_from_directory`` does (``tf.image.resize_with_pad``).
        random_crop: if set, (min, max) area fraction of a random crop at the target
            aspect ratio taken before resizing (an augmentation; replaces centre crop).
        random_flip: flip horizontally with probability 1/2 (an augmentation).
        decoder: "auto" (simplejpeg for JPEGs when installed, else Pillow), "pillow" or
            "simplejpeg" (see DECODERS).
        dct_scaling: decode JPEGs at the smallest 1/8, 1/4 or 1/2 scale the resize still
            has pixels for (several times cheaper, but visibly off Keras' pixels when
            shrinking 2x or more: see the module notes); False decodes at full size, as
            Keras does, for its pixels (bilinear within 0.8/255, nearest equal).
    """

    image_size: tuple[int, int] = (256, 256)
    color_mode: str = "rgb"
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False
    pad_to_aspect_ratio: bool = False
    random_crop: tuple[float, float] | None = None
    random_flip: bool = False
    decoder: str = "auto"
    dct_scaling: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", check_image_size(self.image_size))
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
        high_byte = np.clip(np.asarray(im), 0, 65535).astype(np.uint16) >> 8  # TensorFlow's
        im = Image.fromarray(high_byte.astype(np.uint8), "L")
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


def _keras_fit(width: int, height: int, th: int, tw: int) -> tuple[int, int, int, int]:
    """``tf.image.resize_with_pad``'s arithmetic (what ``image_dataset_from_directory`` does
    with ``pad_to_aspect_ratio``), in float32 as there: the ``width x height`` image is
    resized to ``(rw, rh)``, fitting ``tw x th``, and placed ``top`` rows down and ``left``
    columns in, on zeros. Returns ``(rw, rh, top, left)``."""
    f32 = np.float32
    ratio = max(f32(width) / f32(tw), f32(height) / f32(th))
    rhf, rwf = f32(height) / ratio, f32(width) / ratio
    rh, rw = max(1, int(np.floor(rhf))), max(1, int(np.floor(rwf)))
    top = max(0, int(np.floor((f32(th) - rhf) / f32(2))))
    left = max(0, int(np.floor((f32(tw) - rwf) / f32(2))))
    return rw, rh, top, left


def _pad_like_keras(
    arr: np.ndarray, size: tuple[int, int], interpolation: str, reuse: bool = False
) -> np.ndarray:
    """``arr`` resized to fit ``size`` = (height, width) and centred on zeros, as Keras'
    ``image_dataset_from_directory(pad_to_aspect_ratio=True)`` does (resize, then pad).
    ``arr`` is the full-size image: pad mode decodes at full size (see ``_needed_size``).
    ``reuse``: the resize and the canvas are this thread's work arrays (``_WorkArrays``)."""
    h, w, channels = arr.shape
    th, tw = size
    rw, rh, top, left = _keras_fit(w, h, th, tw)
    resized = arr if (rh, rw) == (h, w) else resize_array(
        arr, (rw, rh), interpolation, dst=_work.take("resized", (rh, rw, channels), np.uint8) if reuse else None)
    if (rh, rw) == (th, tw):
        return resized
    canvas = _work.take("padded", (th, tw, channels), np.uint8) if reuse else None
    if canvas is None:
        canvas = np.zeros((th, tw, channels), dtype=arr.dtype)
    else:
        canvas.fill(0)
    canvas[top : top + rh, left : left + rw] = resized
    return canvas


def _needed_size(
    ow: int, oh: int, box: tuple[float, float, float, float], options: DecodeOptions, swap: bool
) -> tuple[int, int]:
    """Smallest decoded (stored-orientation) size that still has the pixels the resize needs.

    With ``pad_to_aspect_ratio``, the full size: Keras computes the fitted size (and so
    the content's edges in the padding) from the full size, with its own rounding, which a
    DCT-reduced image cannot reproduce.
    """
    if not options.dct_scaling or (options.pad_to_aspect_ratio and options.random_crop is None):
        return (oh, ow) if swap else (ow, oh)
    th, tw = options.image_size
    bw, bh = (box[2] - box[0]) * ow, (box[3] - box[1]) * oh
    sx, sy = tw / bw, th / bh
    need = (math.ceil(ow * sx), math.ceil(oh * sy))
    return (need[1], need[0]) if swap else need


# what a loader returns: the upright (h, w, c) uint8 array in the colour mode (maybe
# DCT-reduced) and the box to resize (fractions)
_Loaded = tuple[np.ndarray, tuple[float, float, float, float]]


def fast_jpeg_scale(width: int, height: int, need_w: int, need_h: int) -> tuple[int, int]:
    """Decoded size (min_width, min_height for simplejpeg) at the cheapest sufficient scale.

    The smallest of 1/8, 1/4, 1/2, 1 that still gives ``need_w x need_h``: those scales have
    SIMD IDCTs in libjpeg-turbo, and decoding at 1/2 is cheaper than at 5/8 even though it
    makes more pixels (measured: 0.67 vs 0.91 ms per ImageNet-sized image here).
    """
    for scale in _FAST_SCALES:
        w, h = math.ceil(width * scale), math.ceil(height * scale)
        if w >= need_w and h >= need_h:
            return w, h
    return width, height


def _load_simplejpeg(
    data: bytes, options: DecodeOptions, rng: random.Random | None, reuse: bool = False
) -> _Loaded | None:
    """Decode a JPEG with simplejpeg, upright; None when Pillow must do it instead.

    ``fastdct`` is libjpeg's fast integer IDCT, TensorFlow's default for ``decode_jpeg``
    (so Keras' pixels come from it too). ``reuse``: decode into this thread's work array
    (``_WorkArrays``), for a caller that copies the pixels out before its next decode.
    """
    if simplejpeg is None or options.color_mode == "rgba" or data[:2] != b"\xff\xd8":
        return None
    try:
        raw_h, raw_w, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    limit = Image.MAX_IMAGE_PIXELS
    cmyk = space in _CMYK_SPACES and options.color_mode == "rgb"
    if not (space in _SIMPLE_SPACES or cmyk) or (limit is not None and raw_w * raw_h > limit):
        return None  # CMYK/YCCK to grey, or a possible bomb: Pillow's rules apply
    orientation = jpeg_orientation(data)
    if orientation is None:
        return None
    swap = orientation in _SWAPPING_ORIENTATIONS
    ow, oh = (raw_h, raw_w) if swap else (raw_w, raw_h)
    box = _box_fractions(ow, oh, options, rng)
    min_w, min_h = fast_jpeg_scale(raw_w, raw_h, *_needed_size(ow, oh, box, options, swap))
    gray = options.color_mode == "grayscale"
    # simplejpeg decodes exactly min_w x min_h here (fast_jpeg_scale rounds as libjpeg-turbo
    # does; checked for 3,600 sizes and scales), so the work array always holds it
    buffer = _work.take("decoded", (min_h, min_w, 1 if gray else 3), np.uint8) if reuse and not cmyk else None
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="CMYK" if cmyk else "GRAY" if gray else "RGB",
                                     buffer=buffer, min_width=min_w, min_height=min_h, fastdct=True)
    except ValueError:
        return None  # damaged or unusual: Pillow decides (and names the problem)
    if cmyk:
        arr = _tensorflow_rgb(arr, inverted=jpeg_adobe_marker(data))
    if orientation in _UPRIGHT:
        arr = _upright(arr, orientation, "turned" if reuse else None)
    return arr, box


def _tensorflow_rgb(cmyk: np.ndarray, *, inverted: bool) -> np.ndarray:
    """RGB of a decoded (h, w, 4) CMYK array, in TensorFlow's integer arithmetic
    (``decode_jpeg``, so Keras'): ``r = k * c / 255`` for Adobe's inverted channels,
    ``(255 - k) * (255 - c) / 255`` otherwise, rounded down. With the fast IDCT before it
    these are TensorFlow's pixels exactly (tested); Pillow's accurate IDCT and its own
    conversion were up to 16/255 from them on photos."""
    channels = cmyk.astype(np.uint16)
    if not inverted:
        np.subtract(255, channels, out=channels)
    return (channels[:, :, :3] * channels[:, :, 3:] // 255).astype(np.uint8)


def _load_pillow(
    data: bytes, options: DecodeOptions, rng: random.Random | None, reuse: bool = False
) -> _Loaded:
    """Decode any format with Pillow (JPEG DCT-scaled by draft), upright, in the colour mode."""
    im = Image.open(io.BytesIO(data))
    if im.format == "PNG":
        im.load()  # its getexif loads it otherwise, where a pixel error would pass for an EXIF one
    orientation = pillow_orientation(im)
    raw_w, raw_h = im.size
    swap = orientation in _SWAPPING_ORIENTATIONS
    ow, oh = (raw_h, raw_w) if swap else (raw_w, raw_h)
    box = _box_fractions(ow, oh, options, rng)
    if im.format in ("JPEG", "MPO"):
        need = _needed_size(ow, oh, box, options, swap)
        im.draft("L" if options.color_mode == "grayscale" else "RGB", need)
    out = ImageOps.exif_transpose(im) if orientation != 1 else im
    out.load()
    if stores_plain_cmyk(im, data):  # read as TensorFlow reads it, not as a colour negative
        out = ink_as_stored(out)
    if im.format == "GIF":
        out = gif_transparent_black(out)
    arr = np.asarray(to_color_mode(out, options.color_mode))
    return (arr[:, :, None] if arr.ndim == 2 else arr), box


# PNG colour types OpenCV decodes to each colour mode with Pillow's pixels (tested): any
# 8-bit PNG to RGB (alpha dropped, palette and grey expanded); to grayscale only the grey
# types, whose stored value is the pixel (a colour PNG's luma is Pillow's rounding)
_OPENCV_PNG_TYPES = {"rgb": (0, 2, 3, 4, 6), "grayscale": (0, 4)}


# The chunks a PNG's 8-bit pixels come from, as OpenCV and Pillow decode them (neither
# applies gamma, colour profiles, significant bits; tRNS only makes alpha, which "rgb" and
# "grayscale" drop). libpng, under OpenCV, warns on stderr about any other chunk it finds
# wrong (an ICC profile: "iCCP: known incorrect sRGB profile", "invalid rendering intent" on
# scikit-image's page.png; sRGB, gAMA or text chunks out of place or invalid), at every
# decode, so once per image and epoch; it also inflates every compressed text chunk. The
# others are cut out before OpenCV decodes (a copy of the file, far cheaper than the decode).
_PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})


def opencv_png(data: bytes, color_mode: str = "rgb") -> np.ndarray | None:
    """Decode a plain 8-bit PNG with OpenCV into an (h, w, c) uint8 array in ``color_mode``;
    None when Pillow must do it (OpenCV missing, another depth or colour mode, an EXIF or
    XMP orientation or an animation to honour, a possible bomb, a truncated file, damage).

    Why not Pillow: OpenCV's decode runs without the GIL from the compressed bytes to the
    array, where Pillow's PNG decode and its copy into numpy (``tobytes``) hold it. With
    ~3% PNGs among the benchmark's photos, those held a quarter of the reader's GIL time
    (py-spy ``--gil``), the wall that many decode threads of one process meet.

    Pixels are Pillow's wherever Pillow reads the file. A damaged ancillary chunk (a bad
    CRC, a tRNS of the wrong length) makes Pillow refuse the whole file, while libpng,
    OpenCV's as TensorFlow's, warns on stderr, drops the chunk and decodes the pixels: so
    such a file decodes here as Keras decodes it, and fails only with ``decoder="pillow"``.
    """
    header = png_header(data)
    if header is None or header[2] != 8 or header[3] not in _OPENCV_PNG_TYPES.get(color_mode, ()):
        return None
    width, height = header[:2]
    limit = Image.MAX_IMAGE_PIXELS
    if (limit is not None and width * height > limit) or not png_is_plain(data):
        return None  # a possible bomb, a truncated file, an orientation or an animation
    cv2 = _opencv()
    if not cv2:
        return None
    gray = color_mode == "grayscale"
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11
    flag = cv2.IMREAD_GRAYSCALE if gray else (cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag)
    plain = png_only(data, _PNG_PIXEL_CHUNKS)
    arr = cv2.imdecode(np.frombuffer(plain, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None or arr.shape[:2] != (height, width):
        return None  # damaged: Pillow decides, and names the problem
    if gray:
        return arr[:, :, None]
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if rgb_flag is None else arr


def _load_opencv_png(
    data: bytes, options: DecodeOptions, rng: random.Random | None
) -> _Loaded | None:
    arr = opencv_png(data, options.color_mode)
    if arr is None:
        return None
    return arr, _box_fractions(arr.shape[1], arr.shape[0], options, rng)


def _load_auto(
    data: bytes, options: DecodeOptions, rng: random.Random | None, reuse: bool = False
) -> _Loaded:
    fast = None
    if data[:2] == b"\xff\xd8":
        fast = _load_simplejpeg(data, options, rng, reuse)
    elif data[:8] == PNG_SIGNATURE:
        fast = _load_opencv_png(data, options, rng)
    return fast if fast is not None else _load_pillow(data, options, rng)


def _load_simplejpeg_only(
    data: bytes, options: DecodeOptions, rng: random.Random | None, reuse: bool = False
) -> _Loaded:
    if simplejpeg is None:
        raise ImportError("decoder='simplejpeg' needs simplejpeg: pip install shardpack[fast]")
    return _load_auto(data, options, rng, reuse)


# decoder name -> loader. "auto": simplejpeg for the JPEGs it can take and OpenCV for
# plain 8-bit PNGs, when installed, Pillow for the rest; "pillow": Pillow only (the
# reference the fast path is tested against).
DECODERS = {
    "auto": _load_auto,
    "pillow": _load_pillow,
    "simplejpeg": _load_simplejpeg_only,
}


def decode_image(
    data: bytes, options: DecodeOptions, *, rng: random.Random | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode image bytes into a ``uint8`` array of shape ``options.shape``, or into ``out``.

    Args:
        data: the encoded image (any format Pillow reads).
        options: size, colour mode, interpolation, aspect handling and decoder.
        rng: randomness for the augmentations (random crop / flip); unused otherwise.
        out: an array of shape ``options.shape`` (uint8 or float32, e.g. a batch row) to
            write the pixels into, and return. A float32 ``out`` may get a bilinear resize's
            unrounded values, as Keras' ``tf.image.resize`` gives (``resize_into``). On an
            error it may be partly written.

    Raises:
        OSError, ValueError, Image.DecompressionBombError: the bytes are not a readable
            image (the caller turns this into SampleDecodeError).
    """
    th, tw = options.image_size
    # with ``out``, every path below copies the pixels into it: the loader may decode into
    # this thread's work array
    arr, box = DECODERS[options.decoder](data, options, rng, out is not None)
    h, w = arr.shape[:2]
    pixel_box = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    sub_box = None
    if options.pad_to_aspect_ratio and options.random_crop is None:
        arr = _pad_like_keras(arr, (th, tw), options.interpolation, reuse=out is not None)
    elif pixel_box != (0.0, 0.0, float(w), float(h)):
        # Crop first (resizing a box alone would blend in pixels from outside it) to the
        # whole pixels that hold the box; on a DCT-reduced image the box's edges fall inside
        # pixels, and the rest is a sub-pixel box for resize. The box is a fraction of the
        # decoded size, which libjpeg-turbo rounds up (W=301 at 1/8: 38 columns, 37.625 of
        # picture), so on a reduced decode the region's far edge lies up to a fraction of a
        # decoded pixel past the picture's: the picture shifts by up to ~2.5 source pixels
        # there (as without a box; the module notes say why it is not corrected).
        x0, y0, x1, y1 = pixel_box
        ix0, iy0 = math.floor(x0 + 1e-6), math.floor(y0 + 1e-6)
        ix1, iy1 = math.ceil(x1 - 1e-6), math.ceil(y1 - 1e-6)
        arr = arr[iy0:iy1, ix0:ix1]
        sub_box = (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)
        if all(abs(a - b) < 1e-6 for a, b in zip(sub_box, (0, 0, ix1 - ix0, iy1 - iy0), strict=True)):
            sub_box = None
    resize = sub_box is not None or arr.shape[:2] != (th, tw)
    # drawn before the resize, which draws nothing: the same draws as flipping after it
    flip = options.random_flip and rng is not None and rng.random() < 0.5
    if out is not None and resize:
        resize_into(arr, out, options.interpolation, box=sub_box, flip=flip)
        return out
    if resize:
        arr = resize_array(arr, (tw, th), options.interpolation, box=sub_box)
    if flip:
        arr = mirrored(arr, None if out is None else "flipped")
    if out is None:
        return arr
    out[...] = arr
    return out
