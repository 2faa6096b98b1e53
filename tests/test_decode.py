"""Decoding odd real-world images: colour modes, bit depths, alpha, EXIF, aspect handling."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from reader.decode import INTERPOLATIONS, DecodeOptions, decode_image


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes, size=(8, 8), mode="rgb", **kw) -> np.ndarray:
    out = decode_image(data, DecodeOptions(image_size=size, color_mode=mode, **kw))
    assert out.dtype == np.uint8 and out.shape == (*size, {"grayscale": 1, "rgb": 3, "rgba": 4}[mode])
    return out


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM"])
@pytest.mark.parametrize("mode", ["grayscale", "rgb", "rgba"])
def test_every_format_every_mode(fmt, mode):
    im = Image.new("RGB", (40, 30), (200, 30, 30))
    out = _decode(_encode(im, fmt), mode=mode)
    if mode == "rgb":
        assert abs(int(out[..., 0].mean()) - 200) < 12 and out[..., 1].mean() < 45
    if mode == "rgba":
        assert (out[..., 3] == 255).all()


def test_cmyk_jpeg_becomes_rgb():
    im = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    out = _decode(_encode(im, "JPEG", quality=95))
    r, g, b = out[..., 0].mean(), out[..., 1].mean(), out[..., 2].mean()
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency():
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    im.info["transparency"] = 1
    data = _encode(im, "PNG", transparency=1)
    rgb = _decode(data)
    assert (rgb == (10, 200, 10)).all()  # alpha dropped: the palette colour stays
    rgba = _decode(data, mode="rgba")
    assert (rgba[..., 3] == 0).all()  # (colour of fully transparent pixels: unspecified)
    gray = _decode(data, mode="grayscale")
    assert abs(int(gray.mean()) - round(0.299 * 10 + 0.587 * 200 + 0.114 * 10)) <= 1


def test_gif_transparent_pixels_are_black_as_tensorflow_makes_them():
    """TensorFlow's GIF decoder gives (0, 0, 0) where the GIF is transparent, whatever the
    palette holds there (a PNG keeps the palette colour, test above); shardpack gave the
    palette colour."""
    im = Image.new("P", (16, 16), 1)
    im.paste(2, (0, 0, 8, 16))
    im.putpalette([0, 0, 0, 10, 200, 10, 250, 40, 40] + [0] * 759)
    data = _encode(im, "GIF", transparency=1)
    for mode in ("rgb", "grayscale"):
        out = _decode(data, size=(16, 16), mode=mode, interpolation="nearest")
        assert (out[:, 8:] == 0).all()
        assert (out[:, :8] > 0).all()  # the opaque colour is kept
    rgb = _decode(data, size=(16, 16), interpolation="nearest")
    assert (rgb[:, :8] == (250, 40, 40)).all()


def test_sixteen_bit_grayscale_keeps_the_high_byte_as_tensorflow():
    """Scaled, not clipped, and exactly as TensorFlow (Keras) does: the high byte. Dividing
    by 257 put 7,078 of 11,700 pixels of a real 16-bit PNG one level off Keras'."""
    from packer.transform import to_8bit

    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    im = Image.fromarray(ramp)  # mode I;16
    size = (256, 256)
    out = _decode(_encode(im, "PNG"), size=size, mode="grayscale", interpolation="nearest")
    np.testing.assert_array_equal(out[..., 0], ramp >> 8)
    np.testing.assert_array_equal(_decode(_encode(im, "TIFF"), size=size, interpolation="nearest")[..., 0],
                                  ramp >> 8)
    np.testing.assert_array_equal(np.asarray(to_8bit(im)), ramp >> 8)  # the packer's --resize too


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_dropped_consistently(mode):
    im = Image.new(mode, (16, 16), (90, 0) if mode == "LA" else (90, 90, 90, 0))
    rgb = _decode(_encode(im, "PNG"))
    assert (rgb == 90).all()
    rgba = _decode(_encode(im, "PNG"), mode="rgba")
    assert (rgba[..., 3] == 0).all()


def test_exif_orientation_is_applied():
    # a wide image, left half red: stored 60x30, EXIF says "rotate 90 CW to view" (6)
    im = Image.new("RGB", (60, 30), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(im, "JPEG", exif=exif.tobytes(), quality=95)
    out = _decode(data, size=(60, 30))  # viewed: 30 wide, 60 tall, red on top
    assert out[:25, :, 0].mean() > 200 and out[35:, :, 2].mean() > 200


def test_crop_and_pad_to_aspect_ratio():
    im = Image.new("RGB", (100, 50), (0, 0, 0))
    im.paste((255, 255, 255), (25, 0, 75, 50))  # white centre square
    data = _encode(im, "PNG")
    cropped = _decode(data, size=(10, 10), crop_to_aspect_ratio=True)
    assert (cropped == 255).all()  # the centre square only
    padded = _decode(data, size=(10, 10), pad_to_aspect_ratio=True)
    assert (padded[:2] == 0).all() and (padded[-2:] == 0).all()  # zero bands top and bottom
    assert padded[5, 5].min() == 255
    squashed = _decode(data, size=(10, 10))
    assert squashed[:, 0].max() < 40 and squashed[:, 5].min() > 200


def test_jpeg_draft_keeps_enough_resolution():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (800, 1200, 3), dtype=np.uint8))
    data = _encode(im, "JPEG")
    out = _decode(data, size=(224, 224), crop_to_aspect_ratio=True)
    ref = np.asarray(im.crop((200, 0, 1000, 800)).resize((224, 224), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 25


@pytest.mark.parametrize("name", sorted(INTERPOLATIONS))
def test_keras_interpolation_names(name):
    _decode(_encode(Image.new("RGB", (20, 20), "red"), "PNG"), interpolation=name.upper())


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert _decode(buf.getvalue())[..., 0].min() > 200


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="color_mode"):
        DecodeOptions(color_mode="cmyk")
    with pytest.raises(ValueError, match="interpolation"):
        DecodeOptions(interpolation="cubic-ish")
    with pytest.raises(ValueError, match="only one"):
        DecodeOptions(crop_to_aspect_ratio=True, pad_to_aspect_ratio=True)
