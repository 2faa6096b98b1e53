"""Fast structural checks of JPEG and PNG files, without decoding pixels.

Pillow's ``Image.open`` costs ~150 µs per JPEG (it walks every marker segment in Python),
which alone would cap the packer far below ``tar`` speed. Almost every input of an image set
is a plain 8-bit JPEG or PNG, so for those two formats we read the few header fields we
need (size, EXIF orientation) and check that the data is complete (an end-of-image marker
after the last scan; chunks whole to ``IEND``). Anything unusual returns None and the caller
asks Pillow, so these parsers never have the last word on a file they do not fully
understand.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FastInfo", "fast_jpeg_info", "fast_png_info", "jpeg_orientation", "tiff_orientation",
    "signature_kind", "starts_like_image", "ORIENTATION_TAG", "PNG_SIGNATURE", "png_header",
    "png_is_plain", "png_only",
]

_SOF_PLAIN = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
# markers without a segment: RSTn, TEM, SOI and EOI (Pillow's header walk steps over each)
_NO_LENGTH = set(range(0xD0, 0xDA)) | {0x01}
# what a plain JPEG holds before its first scan besides its frame header: DHT, DQT, DRI,
# APPn, COM. Anything else there (a marker without a segment, an EOI, DNL, hierarchical or
# reserved codes) no decoder reads as a plain image: the fast check leaves it to Pillow.
_PLAIN_SEGMENTS = frozenset({0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"  # start of image, then the first marker


@dataclass(frozen=True)
class FastInfo:
    """What a fast parse learned: format extension, stored size, EXIF orientation, and
    whether the data runs to its end marker (False: truncated)."""

    ext: str
    width: int
    height: int
    orientation: int
    complete: bool


ORIENTATION_TAG = 0x0112
_BYTE_ORDERS: dict[bytes, Literal["little", "big"]] = {b"II": "little", b"MM": "big"}
_XMP = b"http://ns.adobe.com/xap/1.0/"


def tiff_orientation(tiff: bytes, *, absent: int = 1) -> int | None:
    """Orientation tag of IFD0 in a TIFF (EXIF) block; ``absent`` when it has none, None if
    unreadable."""
    order = _BYTE_ORDERS.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for i in range(count):
        entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        if len(entry) < 12:
            return None
        if int.from_bytes(entry[:2], order) == ORIENTATION_TAG:
            if int.from_bytes(entry[2:4], order) != 3:  # type SHORT
                return None
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return absent


def _segments(data: bytes, only: frozenset[int] | None = None) -> Iterator[tuple[int, int, int]]:
    """Yield (marker, offset, length) of each marker segment up to and including the first
    start-of-scan (of only the markers in ``only``, when given); stop quietly at anything
    malformed (the caller then asks Pillow). A marker without a segment (``_NO_LENGTH``) is
    stepped over, as Pillow does, or yielded with length 0 when ``only`` is None.

    ``only`` keeps the walk in this loop: the reader asks every image for its APP1 segments
    alone, and most images have none, so nothing is yielded (a yield per segment made the
    orientation check 5.8 µs of the reader's per-image Python on the bench's photos; 4.3
    without).
    """
    pos, n = 2, len(data)
    unpack = _MARKER_HEAD.unpack_from
    while pos + 4 <= n:
        ff, marker, length = unpack(data, pos)
        if ff != 0xFF:
            return
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            if only is None:
                yield marker, pos, 0
            pos += 2
            continue
        if length < 2 or pos + 2 + length > n:
            return
        if only is None or marker in only:
            yield marker, pos, length
        if marker == 0xDA:
            return
        pos += 2 + length


_MARKER_HEAD = struct.Struct(">BBH")  # FF, marker, segment length (when it has one)
_APP1 = frozenset({0xE1})  # where EXIF and XMP live


class _OrientationScan:
    """The orientation Pillow would report, from a JPEG's APP1 segments in file order.

    Pillow keeps the first EXIF segment only; when it has no Orientation tag, Pillow reads
    ``tiff:Orientation`` from an XMP packet, which only Pillow parses (``result`` is then
    None: ask Pillow).
    """

    def __init__(self) -> None:
        self._exif_seen = False
        self._exif: int | None = 0  # the first EXIF block's tag; 0: absent, None: unreadable
        self._xmp = False

    def add(self, data: bytes, pos: int, length: int) -> None:
        body = data[pos + 4 : pos + 2 + length]
        if body[:6] == b"Exif\x00\x00":
            if not self._exif_seen:
                self._exif_seen = True
                self._exif = tiff_orientation(body[6:], absent=0)
        elif body.startswith(_XMP):
            self._xmp = True

    def result(self) -> int | None:
        if self._exif is None or self._exif:
            return self._exif
        return None if self._xmp else 1


_APP14 = frozenset({0xEE})  # Adobe's: says whether CMYK is stored inverted


def jpeg_adobe_marker(data: bytes) -> bool:
    """Whether a JPEG's headers hold an Adobe APP14 segment as libjpeg recognises one (its
    ``saw_Adobe_marker``: the identifier and at least 12 bytes of data). Adobe's CMYK and
    YCCK JPEGs store every channel inverted, and decoders convert them to RGB on that
    word (TensorFlow: ``k * c / 255`` with it, ``(255 - k) * (255 - c) / 255`` without)."""
    return any(length >= 14 and data[pos + 4 : pos + 9] == b"Adobe"
               for _, pos, length in _segments(data, _APP14))


def jpeg_orientation(data: bytes) -> int | None:
    """EXIF orientation (1..8, 1 when absent) of JPEG bytes, read from the markers alone.

    Returns None when only Pillow can tell: an XMP packet without an EXIF orientation
    (Pillow then reads ``tiff:Orientation`` from the XMP), or an unreadable EXIF block.
    Costs a few microseconds: it walks the segment headers up to the first scan.
    """
    scan = None
    for _, pos, length in _segments(data, _APP1):
        scan = scan or _OrientationScan()
        scan.add(data, pos, length)
    return 1 if scan is None else scan.result()


# sampling factors (H << 4 | V, each 1-4) and a scan's Huffman table ids (DC << 4 | AC,
# each 0-3) a decoder takes
_SAMPLING = bytes(h << 4 | v for h in range(1, 5) for v in range(1, 5))
_HUFFMAN_IDS = bytes(dc << 4 | ac for dc in range(4) for ac in range(4))


def fast_jpeg_info(data: bytes) -> FastInfo | None:
    """Size and orientation of an 8-bit Huffman JPEG, and whether it is complete.

    Returns None (ask Pillow) for anything else: 12-bit, lossless, arithmetic-coded,
    a height defined later by a DNL marker, malformed segments, and headers no decoder
    reads: a marker out of place before the scan, a frame or scan header whose fields
    disagree with its length or with each other, a quantisation table the frame names but
    nothing defines, a table's class or id out of range. An end marker alone said nothing
    about those, and such files were packed though no reader decodes them. The rules are
    deliberately strict where no encoder goes (an empty DQT, a table defined between
    scans): such a file costs Pillow's decode, never its place. Huffman tables are not
    counted through (docs/SPEED.md, "The packer": what each rule catches and costs).
    """
    if not data.startswith(JPEG_SIGNATURE):
        return None
    scan = _OrientationScan()
    frame: tuple[int, int] | None = None
    ids = tables = b""  # the frame's component ids and their quantisation tables
    defined = b""  # quantisation tables defined so far
    progressive = False
    for marker, pos, length in _segments(data):
        if marker == 0xC4:
            if length > 2 and data[pos + 4] & 0xEC:  # a table's class above 1 or id above 3
                return None
        elif marker == 0xDB:
            if length == 67 and data[pos + 4] < 4:  # one 8-bit table, as libjpeg writes them
                defined += data[pos + 4 : pos + 5]
            elif not (found := _dqt_tables(data, pos, length)):
                return None
            else:
                defined += found
        elif marker == 0xE1:
            scan.add(data, pos, length)
        elif marker == 0xDA:  # first scan: entropy-coded data follows
            orientation = scan.result()
            if frame is None or orientation is None:
                return None  # orientation only Pillow can read
            count = data[pos + 4] if length > 2 else 0
            end = pos + 5 + 2 * count  # each component: its id, then its Huffman tables
            if (length != 6 + 2 * count or not 1 <= count <= 4
                    or data[pos + 5 : end : 2].strip(ids)
                    or data[pos + 6 : end : 2].strip(_HUFFMAN_IDS) or tables.strip(defined)
                    or (progressive and not _spectral_ok(data[end : end + 3]))):
                return None
            # Entropy-coded data never holds FF D9 (FF is stuffed as FF 00), so an EOI marker
            # after the first scan's header means the data runs to its end; a truncated
            # file has none. Searching from the end finds it at once in a complete file.
            complete = data.rfind(b"\xff\xd9") > pos
            return FastInfo("jpg", frame[0], frame[1], orientation, complete)
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SOF_PLAIN or length < 8 or frame is not None:
                return None
            precision, height, width, count = struct.unpack_from(">BHHB", data, pos + 4)
            end = pos + 2 + length  # each component: its id, sampling factors, table id
            ids, tables = data[pos + 10 : end : 3], data[pos + 12 : end : 3]
            if (precision != 8 or height == 0 or width == 0 or count not in (1, 3, 4)
                    or length != 8 + 3 * count or data[pos + 11 : end : 3].strip(_SAMPLING)
                    or tables.strip(b"\0\1\2\3")):
                return None  # (repeated component ids are left to libjpeg, which takes them)
            frame = (width, height)
            progressive = marker == 0xC2
        elif marker not in _PLAIN_SEGMENTS:
            return None
    return None


def _dqt_tables(data: bytes, pos: int, length: int) -> bytes:
    """The ids of the tables a DQT segment defines (8- or 16-bit, id 0-3); empty when its
    tables do not fill it."""
    at, end, found = pos + 4, pos + 2 + length, bytearray()
    while at < end:
        precision, table = divmod(data[at], 16)
        if precision > 1 or table > 3:
            return b""
        found.append(table)
        at += 65 + 64 * precision
    return bytes(found) if at == end else b""


def _spectral_ok(selection: bytes) -> bool:
    """A progressive scan's spectral selection and successive approximation: DC alone or
    a band of AC, bit positions up to 13 (libjpeg only warns about a sequential one's)."""
    start, stop, approx = selection
    return (stop <= 63 and start <= stop and (start == 0) == (stop == 0)
            and max(divmod(approx, 16)) <= 13)


def signature_kind(data: bytes) -> str | None:
    """"JPEG" or "PNG" when the bytes start like one, whatever follows (a file cut inside
    its headers is still a broken image, not junk)."""
    if data.startswith(JPEG_SIGNATURE):
        return "JPEG"
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    return None


# ISO base media file brands of still images (an ``ftyp`` box's major or compatible
# brands) -> the name people know them by
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
                b"hevc": "HEIC", b"hevx": "HEIC", b"hevm": "HEIC", b"hevs": "HEIC",
                b"avif": "AVIF", b"avis": "AVIF", b"mif1": "HEIF", b"msf1": "HEIF"}


def heif_kind(data: bytes) -> str | None:
    """"HEIC", "AVIF" or "HEIF" when the bytes start with the ``ftyp`` box of a HEIF-family
    still image (iPhone photos are HEIC), else None. Pillow without a plugin cannot tell
    such a file from junk, so a phone's photos were counted as non-image files."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, min(size, len(data), 64) - 3, 4)]
    kinds = [_HEIF_BRANDS[b] for b in brands if b in _HEIF_BRANDS]
    named = [k for k in kinds if k != "HEIF"]  # mif1 says HEIF; a later brand may say which
    return named[0] if named else (kinds[0] if kinds else None)


# how the other formats the packer takes begin (JPEG and PNG: their signatures above)
_OTHER_MAGIC = (b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def starts_like_image(head: bytes) -> bool:
    """``head`` (a file's first 12 bytes or more) begins like an image of a format the
    packer takes: JPEG, PNG, GIF, TIFF, WebP or BMP (its reserved fields zero, so text
    that happens to start "BM" is not one)."""
    return (signature_kind(head) is not None or head.startswith(_OTHER_MAGIC)
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (head[:2] == b"BM" and head[6:10] == b"\0\0\0\0"))


# PNG colour type -> the bit depths the format allows with it
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """A PNG's (width, height, bit depth, colour type) from a valid ``IHDR``; None when the
    bytes are not a PNG or its header is one no decoder takes (Pillow then decides)."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if (width == 0 or height == 0 or depth not in _PNG_DEPTHS.get(colour, ()) or compression
            or filtering or interlace > 1):
        return None
    return width, height, depth, colour


def fast_png_info(data: bytes) -> FastInfo | None:
    """Size of a plain PNG, whole to its ``IEND`` chunk; None (Pillow decides, decoding it)
    for a malformed header, an orientation (an eXIf chunk, or EXIF or XMP in a text chunk:
    Pillow reads it), or chunks that do not walk cleanly to ``IEND``. A file cut short is
    one of those: Pillow refuses it when pixels are missing, and takes it when only the end
    chunk is (the reader then decodes every pixel, as from the whole file).

    The chunk walk (``png_is_plain``) replaced scanning the whole file for ``eXIf``: per
    PNG of the benchmark's set (255 KB on average) 4.6 µs instead of 163, a JPEG's 4.9.
    """
    header = png_header(data)
    if header is None:
        return None  # Pillow decides (it refuses a header no decoder takes)
    width, height = header[:2]
    if png_is_plain(data, animation_ok=True):
        return FastInfo("png", width, height, 1, True)
    return None


# chunks that make a PNG's pixels more than its IDAT data: an EXIF orientation (eXIf, or a
# text chunk holding EXIF or XMP, which Pillow also reads it from) or an animation
_PNG_ORIENTING = frozenset({b"eXIf", b"acTL"})
_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})
# critical chunks whose CRC the walk checks (small, and a bad one fails every decoder; a bad
# IDAT CRC only libpng refuses, and checking it would cost a pass over the file)
_PNG_HEADER_CHUNKS = frozenset({b"IHDR", b"PLTE"})
_PNG_EXIF_KEYWORDS = frozenset({b"exif", b"XML:com.adobe.xmp", b"Raw profile type exif"})


def png_is_plain(data: bytes, *, animation_ok: bool = False) -> bool:
    """True when a PNG's chunks are well formed through ``IEND``, its IDAT chunks form one
    run, and no chunk orients (EXIF, XMP) or animates the image: its pixels are then the
    IDAT data alone, which any PNG decoder gives alike; the CRCs of IHDR and PLTE are
    checked (a bad one makes every decoder refuse the file). False sends the file to Pillow.
    ``animation_ok``: an animation (whose default image is still the IDAT data) does not
    count.

    Reads every chunk's header (IDAT bodies skipped by their length): 3-22 µs on an 820 KB
    PNG in 13 or 103 IDAT chunks, where scanning the whole file for the chunk names cost
    1.5 ms. Only zero bytes may follow ``IEND``.
    """
    refused = _PNG_ORIENTING - {b"acTL"} if animation_ok else _PNG_ORIENTING
    before, in_idat, after = 0, 1, 2
    state = before
    for kind, pos, end in _png_chunks(data):
        if end > len(data) or kind in refused:
            return False
        if kind in _PNG_HEADER_CHUNKS and (zlib.crc32(data[pos + 4 : end - 4])
                                           != int.from_bytes(data[end - 4 : end], "big")):
            return False  # a damaged header or palette, which Pillow and libpng both refuse
        if kind == b"IDAT":
            if state == after:
                return False  # a second run of image data: not a plain PNG
            state = in_idat
        else:
            state = after if state == in_idat else state
            if kind in _PNG_TEXT and data[pos + 8 : min(end - 4, pos + 88)].split(b"\0", 1)[0] in _PNG_EXIF_KEYWORDS:
                return False
            if kind == b"IEND":
                return state == after and not data[end:].strip(b"\0")
    return False


_CHUNK_HEAD = struct.Struct(">I4s")


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """Each chunk's (type, start, end) from the first on, through ``IEND``: headers only,
    the bodies skipped by their length. Stops early where a header is cut off, and after a
    chunk that runs past the data (its ``end`` then exceeds ``len(data)``)."""
    pos, end_of_data = 8, len(data)
    unpack = _CHUNK_HEAD.unpack_from
    while pos + 12 <= end_of_data:
        length, kind = unpack(data, pos)
        end = pos + 12 + length
        yield kind, pos, end
        if kind == b"IEND" or end > end_of_data:
            return
        pos = end


def png_only(data: bytes, kinds: frozenset[bytes]) -> bytes:
    """``data`` (a PNG that ``png_is_plain`` accepted) with only its chunks of ``kinds``;
    ``data`` itself when it has no other."""
    cuts = [(pos, end) for kind, pos, end in _png_chunks(data) if kind not in kinds]
    if not cuts:
        return data
    kept, start = [], 0
    for begin, end in cuts:
        kept.append(data[start:begin])
        start = end
    kept.append(data[start:])
    return b"".join(kept)
