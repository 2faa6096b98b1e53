"""Plain 8-bit PNGs decode with OpenCV (decoder "auto") to exactly Pillow's pixels; every PNG
whose pixels need more than its IDAT data (an EXIF or XMP orientation, an animation), or
that is damaged, truncated, 16-bit or too large, goes to Pillow as before."""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from zoo import image_bytes, oriented_pngs, png_chunk, png_with_chunk

from packer.examples import photo
from packer.headers import png_is_plain
from reader import decode as decode_module
from reader.decode import DecodeOptions, decode_image, opencv_png

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.asarray(photo("astronaut").convert("RGB"))[40:250, 30:330]


_png = functools.partial(image_bytes, fmt="PNG")  # an image's PNG bytes, Pillow's save options


def _flavours(rgb: np.ndarray) -> dict[str, bytes]:
    im = Image.fromarray(rgb)
    alpha = np.tile((np.arange(rgb.shape[1]) % 256).astype(np.uint8), (rgb.shape[0], 1))
    return {
        "rgb": _png(im),
        "rgba": _png(Image.fromarray(np.dstack([rgb, alpha]))),
        "grey": _png(im.convert("L")),
        "grey-alpha": _png(im.convert("LA")),
        "palette": _png(im.quantize(64)),
        "palette-transparent": _png(im.quantize(64), transparency=3),
        "rgb-colour-key": _png(im, transparency=(10, 20, 30)),
        "grey-colour-key": _png(im.convert("L"), transparency=7),
        "interlaced": _adam7_png(rgb),
        "gamma": png_with_chunk(_png(im), b"gAMA", struct.pack(">I", 22727)),
        "text": png_with_chunk(_png(im), b"tEXt", b"Comment\0made by a test", after_idat=True),
    }


def _adam7_png(rgb: np.ndarray) -> bytes:
    """An interlaced (Adam7) RGB PNG of ``rgb``, every scanline with filter type 0 (Pillow
    and OpenCV write no interlaced PNGs)."""
    h, w, _ = rgb.shape
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_plain_pngs_take_opencv_and_give_pillows_pixels(rgb, size):
    for name, data in _flavours(rgb).items():
        assert opencv_png(data) is not None, name  # the fast path was taken
        options = DecodeOptions(image_size=size)
        fast = decode_image(data, options)
        ref = decode_image(data, dataclasses.replace(options, decoder="pillow"))
        assert fast.shape == ref.shape == (*size, 3)
        assert (fast == ref).all(), name
        whole = opencv_png(data)
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA").convert("RGB"))
        assert (whole == full).all(), name


def test_grey_pngs_in_grayscale_mode(rgb):
    grey = _png(Image.fromarray(rgb).convert("L"))
    options = DecodeOptions(image_size=(64, 64), color_mode="grayscale")
    assert opencv_png(grey, "grayscale") is not None
    assert (decode_image(grey, options) == decode_image(grey, dataclasses.replace(options, decoder="pillow"))).all()
    # a colour PNG's luma is Pillow's own rounding: left to Pillow
    assert opencv_png(_png(Image.fromarray(rgb)), "grayscale") is None
    assert opencv_png(_png(Image.fromarray(rgb)), "rgba") is None


def test_float_rows_match_pillow(rgb):
    data = _flavours(rgb)["palette-transparent"]
    options = DecodeOptions(image_size=(100, 100))
    fast = decode_image(data, options, out=np.zeros((100, 100, 3), np.float32))
    ref = decode_image(data, dataclasses.replace(options, decoder="pillow"), out=np.zeros((100, 100, 3), np.float32))
    assert np.abs(fast - ref).max() == 0


def test_an_opencv_without_rgb_decoding_gives_the_same_pixels(rgb, monkeypatch):
    """OpenCV before 4.11 has no IMREAD_COLOR_RGB: BGR, then converted."""

    class OldOpenCV:
        def __getattr__(self, name):
            if name == "IMREAD_COLOR_RGB":
                raise AttributeError(name)
            return getattr(cv2, name)

    data = _flavours(rgb)["rgba"]
    new = opencv_png(data)
    monkeypatch.setattr(decode_module, "_cv2", OldOpenCV())
    old = opencv_png(data)
    assert old is not None and new is not None and (old == new).all()


def _half_white() -> Image.Image:
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255  # a rotation shows
    return Image.fromarray(a)


@pytest.mark.parametrize("name", ["eXIf", "xmp-before-idat", "xmp-after-idat", "raw-profile-exif", "text-exif", "exif-between-idats", "xmp-ending-in-idat"])
def test_oriented_pngs_go_to_pillow_and_come_out_upright(name):
    data = oriented_pngs(_half_white())[name]
    assert not png_is_plain(data) and opencv_png(data) is None
    with Image.open(io.BytesIO(data)) as im:
        pillow = im.getexif().get(0x0112)
    options = DecodeOptions(image_size=(40, 20))
    out = decode_image(data, options)
    assert (out == decode_image(data, dataclasses.replace(options, decoder="pillow"))).all()
    assert pillow == 6
    assert out[:, :, 0].mean(axis=1)[:20].max() < 128 < out[:, :, 0].mean(axis=1)[20:].min()  # turned


def test_animated_16_bit_and_huge_pngs_go_to_pillow(rgb, monkeypatch):
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    animated = buf.getvalue()
    assert b"acTL" in animated and opencv_png(animated) is None
    sixteen = _png(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257))  # I;16
    assert opencv_png(sixteen) is None
    options = DecodeOptions(image_size=(32, 32))
    for data in (animated, sixteen):
        assert (decode_image(data, options) == decode_image(data, dataclasses.replace(options, decoder="pillow"))).all()
    plain = _png(Image.fromarray(rgb))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", rgb.shape[0] * rgb.shape[1] // 4)
    assert opencv_png(plain) is None  # Pillow's bomb rules decide


def test_damaged_pngs_raise_pillows_error(rgb):
    data = _png(Image.fromarray(rgb))
    options = DecodeOptions(image_size=(32, 32))
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    for broken in (data[: len(data) // 2], bytes(corrupt)):
        assert opencv_png(broken) is None
        with pytest.raises((OSError, SyntaxError, ValueError)):
            decode_image(broken, options)
    no_end = data[:-12]  # every pixel there, only IEND missing: Pillow's call, as before
    assert opencv_png(no_end) is None
    assert (decode_image(no_end, options) == decode_image(data, options)).all()


def test_png_is_plain_walks_the_chunks(rgb):
    data = _png(Image.fromarray(rgb))
    assert png_is_plain(data)
    assert png_is_plain(data + bytes(16))  # zero padding after IEND
    assert not png_is_plain(data + b"more")  # something else after IEND: Pillow decides
    assert not png_is_plain(data[:-12])  # no IEND
    assert not png_is_plain(data[:40])
    no_idat = data[: data.find(b"IDAT") - 4] + data[data.rfind(b"IEND") - 4 :]
    assert not png_is_plain(no_idat)


def test_a_damaged_ancillary_chunk_decodes_as_tensorflow_does(rgb):
    """libpng (OpenCV's and TensorFlow's) only warns about a bad CRC on an ancillary chunk
    and drops the chunk, where Pillow refuses the file: the fast path gives TensorFlow's
    pixels (so Keras' on the same file), the reference path an error."""
    tf = pytest.importorskip("tensorflow")
    data = png_with_chunk(_png(Image.fromarray(rgb)), b"tEXt", b"Comment\0hello")
    at = data.find(b"tEXt") + 4 + len(b"Comment\0hello")
    damaged = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]  # the chunk's CRC
    h, w = rgb.shape[:2]
    options = DecodeOptions(image_size=(h, w))  # no resize: the decoders' own pixels
    fast = decode_image(damaged, options)
    assert (fast == tf.io.decode_png(damaged, channels=3).numpy()).all()
    assert (fast == rgb).all()
    with pytest.raises((OSError, SyntaxError, ValueError)):
        decode_image(damaged, dataclasses.replace(options, decoder="pillow"))


def test_the_decode_limit_decodes_pngs_as_the_reader_does(rgb):
    from reader.benchmark import LIMIT_VARIANTS

    data = _flavours(rgb)["palette-transparent"]
    fast = LIMIT_VARIANTS["simplejpeg"](data, (64, 80))
    assert fast.shape == (64, 80, 3)
    assert (fast == LIMIT_VARIANTS["pillow-draft"](data, (64, 80))).all()
    assert (fast == decode_image(data, DecodeOptions(image_size=(64, 80)))).all()


@pytest.mark.parametrize("decoder", ["auto", "pillow"])
def test_an_unreadable_exif_text_chunk_leaves_the_pixels_as_stored(rgb, decoder):
    """An iTXt chunk named "exif" holding text: Pillow's getexif raised TypeError, which
    stopped the reader. The packer records such a file's stored size, the reader its
    stored pixels."""
    from packer.probe import probe_bytes

    plain = _png(Image.fromarray(rgb))
    data = png_with_chunk(plain, b"iTXt", b"exif\0\0\0\0\0hello")
    with pytest.raises(TypeError), Image.open(io.BytesIO(data)) as im:  # Pillow's own failure
        im.getexif()
    probe = probe_bytes(data)
    h, w = rgb.shape[:2]
    assert probe.ok and (probe.width, probe.height) == (w, h)
    out = decode_image(data, DecodeOptions(image_size=(h, w), decoder=decoder))
    assert (out == rgb).all()


def test_a_png_with_an_icc_profile_libpng_dislikes_decodes_quietly(capfd):
    """scikit-image's page.png (a scanned page, grey) carries an ICC profile libpng warns
    about on stderr ("invalid rendering intent") at every decode: once per image and epoch
    in training. Only the chunks the pixels come from reach OpenCV."""
    import os

    skimage = pytest.importorskip("skimage")
    with open(os.path.join(os.path.dirname(skimage.__file__), "data", "page.png"), "rb") as f:
        data = f.read()
    assert b"iCCP" in data
    capfd.readouterr()
    for mode in ("rgb", "grayscale"):
        arr = opencv_png(data, mode)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB" if mode == "rgb" else "L"))
        assert arr is not None and (arr.reshape(ref.shape) == ref).all()
    assert capfd.readouterr().err == ""


def test_ancillary_chunks_libpng_warns_about_are_cut_out(rgb, capfd):
    """Chunks out of place or invalid, which libpng reports on stderr at every decode and
    Pillow ignores: an sRGB with an unknown rendering intent, a second gAMA, an ICC profile
    after the pixel data. The pixels are still Pillow's, and nothing is printed."""
    from packer.headers import png_only

    data = _png(Image.fromarray(rgb))
    data = png_with_chunk(data, b"sRGB", bytes([9]))
    data = png_with_chunk(data, b"gAMA", struct.pack(">I", 45455))
    data = png_with_chunk(data, b"gAMA", struct.pack(">I", 22727))
    data = png_with_chunk(data, b"iCCP", b"bogus\0\0" + zlib.compress(b"not a profile"), after_idat=True)
    critical = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})
    only = png_only(data, critical)
    assert only == _png(Image.fromarray(rgb))  # every added chunk cut, the rest untouched
    assert png_only(only, critical) is only  # nothing to cut: no copy
    capfd.readouterr()
    options = DecodeOptions(image_size=(64, 64))
    fast = decode_image(data, options)
    assert capfd.readouterr().err == ""
    assert opencv_png(data) is not None
    assert (fast == decode_image(data, dataclasses.replace(options, decoder="pillow"))).all()


def _exif_with_orientation_of_type(kind: str) -> bytes:
    """A big-endian TIFF block whose only tag is the orientation, stored as ASCII "6" or as
    the RATIONAL 13/2 (writers get this wrong; Pillow hands either over as stored)."""
    if kind == "ascii":
        entry, extra = struct.pack(">HHI", 0x0112, 2, 2) + b"6\0\0\0", b""
    else:  # its value lies after the IFD: 8 (header) + 2 + 12 + 4
        entry, extra = struct.pack(">HHII", 0x0112, 5, 1, 26), struct.pack(">II", 13, 2)
    return b"MM\0*" + struct.pack(">IH", 8, 1) + entry + b"\0\0\0\0" + extra


@pytest.mark.parametrize("kind", ["ascii", "rational"])
def test_an_orientation_tag_of_another_type_is_no_orientation(kind):
    """``ImageOps.exif_transpose`` and the packer do not turn an image for an orientation
    of another type ("6", 6.5), so the reader must not swap its crop box's sides either
    (``int()`` made both 6: a squashed crop)."""
    from packer.probe import probe_bytes

    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 255  # a centred white band: a 1:1 centre crop is all white
    data = png_with_chunk(_png(Image.fromarray(a)), b"eXIf", _exif_with_orientation_of_type(kind))
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) in ("6", 6.5)  # handed over as stored
    probe = probe_bytes(data)
    assert probe.ok and (probe.width, probe.height) == (40, 20)
    out = decode_image(data, DecodeOptions(image_size=(8, 8), crop_to_aspect_ratio=True))
    assert (out == 255).all()
