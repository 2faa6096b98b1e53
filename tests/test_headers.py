"""The fast JPEG/PNG header checks agree with Pillow, and catch truncation."""

from __future__ import annotations

import io
import random

import numpy as np
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
    im = Image.fromarray((np.arange(37 * 21 * 3) * 7919 % 251).astype(np.uint8).reshape(21, 37, 3)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    data = buf.getvalue()
    info = fast_png_info(data)
    assert info is not None and (info.width, info.height) == (37, 21) and info.complete
    cut = data[: data.index(b"IDAT") + 4 + 100]  # inside the pixel data
    assert fast_png_info(cut) is None  # Pillow decides ...
    probe = probe_bytes(cut)
    assert not probe.ok and probe.reason.startswith("truncated PNG")  # ... and refuses it


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
    # cut by its IEND chunk alone, every pixel there: Pillow decides, and takes it (as the
    # reader does, with the whole file's pixels), as it takes a cut inside IEND
    assert fast_png_info(plain[:-12]) is None and probe_bytes(plain[:-12]).ok
    assert fast_png_info(plain[:-4]) is None and probe_bytes(plain[:-4]).ok


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


def _split_jpeg(data: bytes) -> tuple[list[bytes], bytes]:
    """A JPEG's marker segments up to and including its first scan header, and the rest."""
    segments, at = [], 2
    while True:
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        segments.append(data[at:end])
        if data[at + 1] == 0xDA:
            return segments, data[end:]
        at = end


def _segment(data: bytes, marker: int, nth: int = 0) -> int:
    """Offset of the ``nth`` marker segment ``FF marker`` before the first scan."""
    at = 2
    for segment in _split_jpeg(data)[0]:
        if segment[1] == marker:
            if nth == 0:
                return at
            nth -= 1
        at += len(segment)
    raise ValueError(f"no segment FF {marker:02X}")


def _patched(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def _damaged_jpegs() -> dict[str, bytes]:
    """A photo's JPEG with one header damaged as no decoder takes, its end marker intact."""
    data, _ = _jpeg(4)
    sos, dqt, dht, sof = (_segment(data, m) for m in (0xDA, 0xDB, 0xC4, 0xC0))
    sos_length = int.from_bytes(data[sos + 2 : sos + 4], "big")
    progressive, _ = _jpeg(4, progressive=True)
    first_scan = _segment(progressive, 0xDA)
    first_scan_length = int.from_bytes(progressive[first_scan + 2 : first_scan + 4], "big")
    first_scan_end = first_scan + 2 + first_scan_length
    return {
        "scan-header-length": _patched(data, sos + 2, (sos_length + 2).to_bytes(2, "big")),
        "end-marker-before-the-scan": _patched(data, dht + 1, b"\xd9"),  # FF C4 -> FF D9
        "marker-00": _patched(data, dqt + 1, b"\x00"),
        "quantisation-table-missing": _patched(data, dqt + 1, b"\xfe"),  # DQT -> comment
        "huffman-table-class": _patched(data, dht + 4, bytes([data[dht + 4] | 0x20])),  # class 2
        "frame-component-count": _patched(data, sof + 9, b"\x01"),  # 3 components follow
        "sampling-factor-0": _patched(data, sof + 11, b"\x01"),  # H=0, V=1
        "scan-component-not-in-frame": _patched(data, sos + 5, b"\x09"),
        # a progressive DC scan (Ss = Se = 0) made to run to coefficient 5
        "progressive-spectral-selection": _patched(progressive, first_scan_end - 2, b"\x05"),
    }


@pytest.mark.parametrize("name", list(_damaged_jpegs()))
def test_jpeg_header_no_decoder_reads_is_refused_by_the_structure_check(name):
    """A damaged marker, table, frame or scan header with the end marker intact: the fast
    check used to pack it (it only looked for EOI after the scan) and every epoch skipped
    it. Now Pillow is asked, which refuses it, as TensorFlow and the reader do."""
    data = _damaged_jpegs()[name]
    with pytest.raises((OSError, SyntaxError)):  # the premise: Pillow cannot read it
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    assert fast_jpeg_info(data) is None
    probe = probe_bytes(data)
    assert not probe.ok and probe.is_image and "JPEG" in probe.reason


@pytest.mark.parametrize("save", [
    {}, {"progressive": True}, {"optimize": True}, {"subsampling": 0, "quality": 100},
    {"restart_marker_rows": 1}, {"comment": b"hello", "icc_profile": b"\0" * 300},
], ids=["baseline", "progressive", "optimized", "444", "restart-markers", "comment-icc"])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_plain_jpegs_keep_the_fast_path(mode, save):
    """The header rules above must not send ordinary JPEGs to Pillow (the slow path)."""
    _, im = _jpeg(5)
    buf = io.BytesIO()
    im.convert(mode).save(buf, format="JPEG", **save)
    info = fast_jpeg_info(buf.getvalue())
    assert info is not None and info.complete and (info.width, info.height) == im.size


@pytest.mark.parametrize("chunk", ["IHDR", "PLTE"])
def test_png_with_a_bad_header_crc_is_refused_by_the_structure_check(chunk):
    """A bit flipped in IHDR or PLTE (its CRC now wrong): Pillow and libpng refuse the file,
    so the structure check hands it to Pillow instead of packing it."""
    im = Image.new("P", (16, 8), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] * 128)
    data = image_bytes(im, "PNG")
    at = data.index(chunk.encode()) + 4 + 7  # IHDR: the height's low byte; PLTE: a colour
    damaged = _patched(data, at, bytes([data[at] ^ 0x01]))
    with pytest.raises((OSError, SyntaxError)):
        with Image.open(io.BytesIO(damaged)) as ref:
            ref.load()
    assert fast_png_info(damaged) is None
    probe = probe_bytes(damaged)
    assert not probe.ok and probe.is_image


@pytest.mark.parametrize("marker", [0xC4, 0xDB, 0xDA], ids=["DHT", "DQT", "SOS"])
@pytest.mark.parametrize("where", ["after-SOI", "before-the-scan"])
def test_a_jpeg_ending_in_an_empty_segment_is_a_clean_skip(marker, where):
    """A file cut right after a segment of length 2 (no fields): the header rules must not
    read past the end (an IndexError would stop the pack), and the file is skipped."""
    data, _ = _jpeg(4)
    head = data[:2] if where == "after-SOI" else data[: _segment(data, 0xDA)]
    damaged = head + bytes([0xFF, marker, 0, 2])
    assert fast_jpeg_info(damaged) is None
    probe = probe_bytes(damaged)
    assert probe.is_image and not probe.ok and probe.reason


def _encoder_layouts() -> dict[str, bytes]:
    """Header layouts that cameras and other encoders write and Pillow's libjpeg never does,
    each one a JPEG every decoder reads: several tables in one DQT or DHT segment
    (Photoshop, most cameras), tables after the frame header, fill bytes before markers,
    16-bit quantisation tables, component ids counted from 0 or spelled 'R', 'G', 'B', and
    thumbnails inside APP segments (JFIF, EXIF, MPF)."""
    data, im = _jpeg(6)
    segments, rest = _split_jpeg(data)
    kind = [s[1] for s in segments]
    dqt = [s for s in segments if s[1] == 0xDB]
    dht = [s for s in segments if s[1] == 0xC4]
    others = [s for s in segments if s[1] not in (0xDB, 0xC4)]
    sof = kind.index(0xC0)

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    def jpeg(parts: list[bytes]) -> bytes:
        return b"\xff\xd8" + b"".join(parts) + rest

    def renumbered(ids: bytes) -> bytes:
        parts = []
        for s in segments:
            s = bytearray(s)
            for i, new in enumerate(ids):
                if s[1] == 0xC0:
                    s[10 + 3 * i] = new
                elif s[1] == 0xDA:
                    s[5 + 2 * i] = new
            parts.append(bytes(s))
        return jpeg(parts)

    one_dqt = segment(0xDB, b"".join(s[4:] for s in dqt))
    one_dht = segment(0xC4, b"".join(s[4:] for s in dht))
    at_frame = next(i for i, s in enumerate(others) if s[1] == 0xC0)
    thumb, _ = _jpeg(7)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", qtables=[[300] * 64, [400] * 64])  # too coarse for 8 bits
    return {
        "one-DQT-one-DHT": jpeg(others[:at_frame] + [one_dqt, one_dht] + others[at_frame:]),
        "tables-after-the-frame": jpeg(others[: at_frame + 1] + dqt + dht + others[at_frame + 1 :]),
        "fill-bytes": b"\xff\xd8" + b"".join(b"\xff\xff" + s for s in segments) + rest,
        "16-bit-DQT": buf.getvalue(),
        "ids-from-0": renumbered(b"\0\1\2"),
        "ids-RGB": renumbered(b"RGB"),
        "thumbnails": jpeg(segments[:1] + [segment(0xE1, b"Exif\0\0MM\0*\0\0\0\x08\0\0" + thumb),
                                          segment(0xE2, b"MPF\0" + thumb)] + segments[1:]),
        "DRI-and-COM-after-the-frame": jpeg(
            segments[: sof + 1] + [segment(0xDD, b"\0\0"), segment(0xFE, b"x")] + segments[sof + 1 :]),
    }


@pytest.mark.parametrize("name", list(_encoder_layouts()))
def test_encoder_layouts_keep_the_fast_path(name):
    """The header rules must not send these ordinary files to Pillow: a data set of them
    would pack at Pillow's speed (Pillow's own JPEGs, above, never take these paths)."""
    data = _encoder_layouts()[name]
    with Image.open(io.BytesIO(data)) as ref:  # the premise: a JPEG every decoder reads
        ref.load()
        size = ref.size
    info = fast_jpeg_info(data)
    assert info is not None and info.complete and (info.width, info.height) == size
