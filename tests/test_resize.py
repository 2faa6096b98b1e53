"""The reader resizes like Keras' image_dataset_from_directory (tf.image.resize, no
antialiasing) when OpenCV is installed, and falls back to Pillow's filters otherwise."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

import reader.decode as decode
from packer.examples import photo, random_crop
from reader.decode import DecodeOptions, decode_image

tf = pytest.importorskip("tensorflow")
pytest.importorskip("cv2")


def _png(seed: int) -> tuple[bytes, np.ndarray]:
    im = random_crop(random.Random(seed), photo("coffee"), 200 + 57 * seed)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), np.asarray(im)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_matches_tf_image_resize_without_antialias(seed, interpolation):
    data, pixels = _png(seed)
    ours = decode_image(data, DecodeOptions(image_size=(96, 80), interpolation=interpolation))
    ref = tf.image.resize(pixels[None].astype(np.float32), (96, 80), method=interpolation,
                          antialias=False)[0].numpy()
    diff = np.abs(ours.astype(np.float32) - np.round(ref))
    # OpenCV's bilinear weights are 11-bit fixed point: about 1 pixel in 9 rounds the other
    # way (measured 0.12 mean); a wrong sampling grid would be off by far more than 1
    assert diff.max() <= 1 and diff.mean() < 0.15


def test_crop_to_aspect_ratio_box_matches_tf_crop_then_resize():
    data, pixels = _png(1)
    ours = decode_image(data, DecodeOptions(image_size=(64, 64), crop_to_aspect_ratio=True))
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = pixels[top : top + side, left : left + side]
    ref = tf.image.resize(crop[None].astype(np.float32), (64, 64), antialias=False)[0].numpy()
    assert np.abs(ours.astype(np.float32) - np.round(ref)).mean() < 1.0


def test_without_opencv_pillow_filters_are_used(monkeypatch):
    data, pixels = _png(2)
    with_cv2 = decode_image(data, DecodeOptions(image_size=(48, 48)))
    monkeypatch.setattr(decode, "_cv2", False)
    pillow = decode_image(data, DecodeOptions(image_size=(48, 48)))
    ref = np.asarray(Image.fromarray(pixels).resize((48, 48), Image.Resampling.BILINEAR))
    assert np.array_equal(pillow, ref)
    assert pillow.shape == with_cv2.shape and not np.array_equal(pillow, with_cv2)


def test_bad_opencv_thread_setting_warns_and_decodes(monkeypatch):
    data, _ = _png(0)
    monkeypatch.setattr(decode, "_cv2", None)  # import OpenCV afresh, reading the variable
    monkeypatch.setenv("SHARDPACK_CV2_THREADS", "auto")
    with pytest.warns(RuntimeWarning, match="SHARDPACK_CV2_THREADS"):
        out = decode_image(data, DecodeOptions(image_size=(16, 16)))
    assert out.shape == (16, 16, 3)


@pytest.mark.parametrize("size", [(64, 64), (40, 96), (96, 40), (24, 32)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_pad_to_aspect_ratio_matches_image_dataset_from_directory(seed, size, interpolation):
    """Keras' image_dataset_from_directory pads with tf.image.resize_with_pad: resize to
    fit (its float32 rounding), then centre on zeros. (keras.ops.image.resize pads first
    and resizes after: another image, and not the one the dataset gives.)"""
    data, pixels = _png(seed)
    ours = decode_image(data, DecodeOptions(image_size=size, pad_to_aspect_ratio=True,
                                            interpolation=interpolation))
    ref = tf.image.resize_with_pad(pixels.astype(np.float32), *size, method=interpolation)
    diff = np.abs(ours.astype(np.float32) - np.round(ref.numpy()))
    assert diff.max() <= 1 and diff.mean() < 0.15


def test_pad_to_aspect_ratio_on_a_large_jpeg_matches_the_full_size_fit():
    """A JPEG the resize could decode at 1/8 scale: pad mode decodes it at full size, so
    the fitted size and the content's edges are Keras', from the full size."""
    buf = io.BytesIO()
    Image.new("RGB", (2000, 301), (200, 200, 200)).save(buf, format="JPEG", quality=95)
    pixels = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    ours = decode_image(buf.getvalue(), DecodeOptions(image_size=(224, 224), pad_to_aspect_ratio=True))
    ref = tf.image.resize_with_pad(pixels.astype(np.float32), 224, 224, method="bilinear")
    assert np.abs(ours.astype(np.float32) - np.round(ref.numpy())).max() <= 1


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_without_dct_scaling_jpegs_give_keras_pixels(interpolation):
    """dct_scaling=False decodes JPEGs at full size as Keras does (tf.io.decode_jpeg with
    TensorFlow's default fast IDCT, then tf.image.resize): the same pixels within rounding.
    The default DCT-scaled decode is several times cheaper and visibly further off."""
    im = random_crop(random.Random(5), photo("astronaut"), 480)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    ref = np.round(tf.image.resize(tf.io.decode_jpeg(data, channels=3), (64, 64),
                                   method=interpolation).numpy())

    def off(**options):
        ours = decode_image(data, DecodeOptions(image_size=(64, 64), interpolation=interpolation,
                                                **options))
        return np.abs(ours.astype(np.float32) - ref)

    exact, scaled = off(dct_scaling=False), off()
    assert exact.max() <= 2 and exact.mean() < 0.2, (exact.max(), exact.mean())
    assert scaled.mean() > 4 * max(exact.mean(), 0.05)


def _float_row(options: DecodeOptions) -> np.ndarray:
    return np.full(options.shape, -1.0, dtype=np.float32)  # -1: a pixel left unwritten shows


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
def test_float32_rows_get_tf_image_resize_values_unrounded(seed, color_mode):
    """A bilinear resize into a float32 batch row is done in float32 when the image is at
    most _FLOAT_RESIZE_MAX_AREA times the row: Keras' own float values (tf.image.resize
    returns float32), not the uint8 resize's rounded ones, which are up to ~0.8 away."""
    data, pixels = _png(seed)
    h, w = pixels.shape[:2]
    size = (int(h / 1.3), int(w / 1.25))  # 1.6x the row's pixels: the float32 path
    options = DecodeOptions(image_size=size, color_mode=color_mode)
    row = decode_image(data, options, out=_float_row(options))
    source = pixels if color_mode == "rgb" else np.asarray(Image.fromarray(pixels).convert("L"))[:, :, None]
    ref = tf.image.resize(source[None].astype(np.float32), size, antialias=False)[0].numpy()
    assert row.shape == ref.shape and row.dtype == np.float32
    assert np.abs(row - ref).max() < 0.02
    rounded = decode_image(data, options).astype(np.float32)  # the uint8 result: rounded
    assert np.abs(rounded - ref).max() > 0.4
    assert np.abs(rounded - row).max() <= 1


def test_float32_rows_of_a_crop_box_get_tf_values():
    """A crop (here crop_to_aspect_ratio's centre square) goes through the float32 path too."""
    data, pixels = _png(1)
    h, w = pixels.shape[:2]
    side = min(h, w)
    size = (int(side / 1.2), int(side / 1.2))
    options = DecodeOptions(image_size=size, crop_to_aspect_ratio=True)
    row = decode_image(data, options, out=_float_row(options))
    top, left = (h - side) // 2, (w - side) // 2
    crop = pixels[top : top + side, left : left + side]
    ref = tf.image.resize(crop[None].astype(np.float32), size, antialias=False)[0].numpy()
    assert np.abs(row - ref).max() < 0.02
    assert np.abs(row - decode_image(data, options).astype(np.float32)).max() <= 1


@pytest.mark.parametrize("case", ["large image", "strided row", "nearest", "exact size"])
def test_rows_outside_the_float32_path_hold_the_uint8_pixels(case):
    """Images much larger than the row (the cast would cost more than it saves), rows that
    are not contiguous, other interpolations and images already at size: the uint8
    pixels, cast, exactly."""
    data, pixels = _png(2)
    h, w = pixels.shape[:2]
    size = {"large image": (h // 3, w // 3), "exact size": (h, w)}.get(case, (h - 7, w - 9))
    options = DecodeOptions(image_size=size, interpolation="nearest" if case == "nearest" else "bilinear")
    if case == "strided row":
        row = np.full((size[0], size[1] * 2, 3), -1.0, np.float32)[:, ::2]
    else:
        row = _float_row(options)
    out = decode_image(data, options, out=row)
    assert out is row
    np.testing.assert_array_equal(row, decode_image(data, options).astype(np.float32))


def _jpeg_480() -> bytes:
    im = random_crop(random.Random(3), photo("astronaut"), 480)  # 470 x 480
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _took_float_path(row: np.ndarray) -> bool:
    return not np.array_equal(row, np.round(row))  # the uint8 path gives whole numbers only


@pytest.mark.parametrize("random_crop", [None, (0.4, 0.9)])
def test_flip_into_a_float32_row_mirrors_the_source(random_crop):
    """The flip is done on the way into the float32 resize (the source mirrored, and its
    crop box), never as a pass over the row: the same image as flipping the uint8 result,
    within its rounding, with the same random draws."""
    data = _jpeg_480()
    size = (400, 400) if random_crop is None else (100, 100)
    options = DecodeOptions(image_size=size, random_flip=True, random_crop=random_crop)
    plain = DecodeOptions(image_size=size, random_crop=random_crop)
    flipped_floats = flips = 0
    for seed in range(12):
        row = decode_image(data, options, rng=random.Random(seed), out=_float_row(options))
        uint8 = decode_image(data, options, rng=random.Random(seed)).astype(np.float32)
        assert np.abs(row - uint8).max() <= 1 and np.abs(row - uint8).mean() < 0.5
        # the crop is drawn first, the flip after it: plain draws the same crop
        unflipped = decode_image(data, plain, rng=random.Random(seed)).astype(np.float32)
        flipped = not np.array_equal(uint8, unflipped)
        flips += flipped
        flipped_floats += flipped and _took_float_path(row)
        if flipped:
            np.testing.assert_array_equal(uint8, unflipped[:, ::-1])
    assert 0 < flips < 12 and flipped_floats > 0


def test_float32_rows_of_a_random_crop_on_a_dct_scaled_jpeg():
    """A random crop of a JPEG decoded at a reduced scale leaves a sub-pixel box: the
    float32 warp samples the same region as the uint8 one."""
    data = _jpeg_480()
    options = DecodeOptions(image_size=(100, 100), random_crop=(0.4, 0.9))
    floats = 0
    for seed in range(6):
        row = decode_image(data, options, rng=random.Random(seed), out=_float_row(options))
        uint8 = decode_image(data, options, rng=random.Random(seed)).astype(np.float32)
        floats += _took_float_path(row)
        assert row.min() >= 0 and row.max() <= 255
        assert np.abs(row - uint8).max() <= 1 and np.abs(row - uint8).mean() < 0.5
    assert floats > 0


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("opencv", [True, False])
def test_mirrored_is_the_left_right_flip(channels, opencv, monkeypatch):
    """``mirrored`` (cv2.flip: numpy's reversed view is ~20x slower to copy) equals
    ``arr[:, ::-1]``, on whole arrays and on crops of them, with OpenCV or without."""
    if not opencv:
        monkeypatch.setattr(decode, "_cv2", False)
    arr = np.random.default_rng(channels).integers(0, 256, (37, 53, channels), dtype=np.uint8)
    for view in (arr, arr[3:30, 5:41]):
        out = decode.mirrored(view)
        assert out.shape == view.shape and out.flags.c_contiguous
        np.testing.assert_array_equal(out, view[:, ::-1])


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_upright_with_opencv_equals_the_numpy_views(channels, monkeypatch):
    """EXIF orientations 2-8 are turned by cv2.flip/rotate/transpose into new arrays (the
    resize and the cast then read them forwards); the pixels are those of the numpy views
    that match ImageOps.exif_transpose (test_fast_paths.py checks all 8 against Pillow)."""
    arr = np.random.default_rng(channels).integers(0, 256, (37, 53, channels), dtype=np.uint8)
    for orientation in range(2, 9):
        turned = decode._upright(arr, orientation)
        assert turned.flags.c_contiguous
        np.testing.assert_array_equal(turned, decode._UPRIGHT[orientation](arr))
    monkeypatch.setattr(decode, "_cv2", False)
    for orientation in range(2, 9):
        np.testing.assert_array_equal(decode._upright(arr, orientation), decode._UPRIGHT[orientation](arr))


def test_nearest_picks_tensorflows_pixels_where_the_position_is_a_whole_number():
    """TensorFlow computes a nearest pixel's source in float32: where (i + 0.5) * in/out is
    a whole number in exact arithmetic (52.5 * 152/70 = 114), float32 lands just below it
    and picks the pixel before. Every row and column is told apart by its value."""
    rng = random.Random(5)
    sizes = [((152, 160), (70, 40))] + [
        ((rng.randint(20, 250), rng.randint(20, 250)), (rng.randint(3, 120), rng.randint(3, 120)))
        for _ in range(60)
    ]
    for (h, w), (oh, ow) in sizes:
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[..., 0] = np.arange(h)[:, None]
        pixels[..., 1] = np.arange(w)[None, :]
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        ours = decode_image(buf.getvalue(), DecodeOptions(image_size=(oh, ow), interpolation="nearest"))
        ref = tf.image.resize(pixels[None], (oh, ow), method="nearest", antialias=False)[0].numpy()
        assert np.array_equal(ours, ref.astype(np.uint8)), ((h, w), (oh, ow))
