"""The fast JPEG/PNG header checks agree with Pillow, and catch truncation."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from zoo import image_bytes, oriented_pngs

from packer.examples import PHOTOS, random_crop
from packer.headers import fast_jpeg_info, fast_png_info
from packer.probe import probe_bytes


def _jpeg(seed: int, **save: object) -> tuple[bytes, Image.Image]:
    rng = random.Random(seed)
    from packer.examples import photo

    im = random_crop(rng, photo(rng.choice(list(PHOTOS)[:4])), rng.randint(40, 300))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=rng.randint(60, 95), **save)
    return buf.getvalue(), im


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), progressive=st.booleans(), gray=st.booleans())
def test_jpeg_size_matches_pillow(seed, progressive, gray):
    data, im = _jpeg(seed, progressive=progressive)
    if gray:
        buf = io.BytesIO()
        im.convert("L").save(buf, format="JPEG", progressive=progressive)
        data = buf.getvalue()
    info = fast_jpeg_info(data)
    assert info is not None and info.complete
    with Image.open(io.BytesIO(data)) as ref:
        assert (info.width, info.height) == ref.size


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.floats(0.2, 0.995), progressive=st.booleans())
def test_truncated_jpeg_is_incomplete_and_skipped(seed, cut, progressive):
    data, _ = _jpeg(seed, progressive=progressive)
    truncated = data[: int(len(data) * cut)]
    info = fast_jpeg_info(truncated)
    assert info is None or not info.complete
    probe = probe_bytes(truncated)
    assert not probe.ok and probe.is_image


def test_exif_orientation_is_read():
    data, im = _jpeg(1)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    info = fast_jpeg_info(buf.getvalue())
    assert info is not None and info.orientation == 6
    probe = probe_bytes(buf.getvalue())
    assert (probe.width, probe.height) == (im.height, im.width)


def test_trailing_bytes_after_eoi_are_fine():
    data, _ = _jpeg(2)
    info = fast_jpeg_info(data + b"\x00" * 100 + b"camera trailer")
    assert info is not None and info.complete


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_png_size_and_truncation(mode):
    im = Image.new(mode, (37, 21))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    data = buf.getvalue()
    info = fast_png_info(data)
    assert info is not None and (info.width, info.height) == (37, 21) and info.complete
    assert not probe_bytes(data[:-20]).ok


def test_unusual_jpeg_falls_back_to_pillow():
    # a 12-bit or lossless SOF is not ours to judge: no fast answer
    data, _ = _jpeg(3)
    sof = data.find(b"\xff\xc0")
    lossless = data[:sof] + b"\xff\xc3" + data[sof + 2 :]
    assert fast_jpeg_info(lossless) is None


def test_xmp_only_orientation_packs_with_the_upright_size():
    """Pillow (and so the reader) rotates by an XMP tiff:Orientation; the packer's recorded
    width/height must agree, so the fast path hands such files to Pillow."""
    im = Image.new("RGB", (40, 20), "red")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    data = buf.getvalue()
    assert fast_jpeg_info(data) is None
    with Image.open(io.BytesIO(data)) as ref:
        oriented = ImageOps.exif_transpose(ref).size
    probe = probe_bytes(data)
    assert probe.ok and (probe.width, probe.height) == oriented


@pytest.mark.parametrize("name", ["eXIf", "xmp-before-idat", "xmp-after-idat", "raw-profile-exif", "text-exif", "exif-between-idats", "xmp-ending-in-idat"])
def test_oriented_png_packs_with_the_upright_size(name):
    """A PNG's orientation may sit in an eXIf chunk or in EXIF or XMP text, before or after
    the pixel data; Pillow (and so the reader) reads each, so the fast check hands them all
    to Pillow (it used to look for eXIf only, and recorded 40x20 for the XMP ones)."""
    data = oriented_pngs(Image.new("RGB", (40, 20), "red"))[name]
    assert fast_png_info(data) is None
    probe = probe_bytes(data)
    assert probe.ok and (probe.width, probe.height) == (20, 40)


def test_png_chunk_walk_answers_what_it_can():
    frames = [Image.new("RGB", (30, 10), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    animated = buf.getvalue()
    info = fast_png_info(animated)  # an animation's size is its default image's
    assert info is not None and info.complete and (info.width, info.height) == (30, 10)
    plain = image_bytes(frames[0], "PNG")
    assert fast_png_info(plain + b"camera trailer") is None  # Pillow decides, and takes it
    assert probe_bytes(plain + b"camera trailer").ok
    cut = fast_png_info(plain[:-12])
    assert cut is not None and not cut.complete and not probe_bytes(plain[:-12]).ok


@pytest.mark.parametrize(("at", "value"), [(24, 7), (25, 5), (27, 1), (28, 2)],
                         ids=["depth-7", "colour-type-5", "filter", "interlace"])
def test_png_header_no_decoder_takes_is_refused_by_the_structure_check(at, value):
    """IHDR fields outside the PNG spec (bit depth 7, colour type 5, ...): the fast check
    hands the file to Pillow, which refuses it, instead of packing what no reader decodes."""
    import zlib

    from packer.probe import probe_bytes

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[at] = value
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # a valid chunk CRC
    assert fast_png_info(bytes(data)) is None
    assert not probe_bytes(bytes(data)).ok
