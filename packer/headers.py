"""Fast structural checks of JPEG and PNG files, without decoding pixels.

Pillow's ``Image.open`` costs ~150 µs per JPEG (it walks every marker segment in Python),
which alone would cap the packer far below ``tar`` speed. Almost every input of an image set
is a plain 8-bit JPEG or PNG, so for those two formats we read the few header fields we
need (size, EXIF orientation) and check that the data is complete (an end-of-image marker
after the last scan, an ``IEND`` chunk). Anything unusual returns None and the caller asks
Pillow, so these parsers never have the last word on a file they do not fully understand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["FastInfo", "fast_jpeg_info", "fast_png_info"]

_SOF_PLAIN = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
_NO_LENGTH = set(range(0xD0, 0xD8)) | {0x01, 0xD8}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class FastInfo:
    """What a fast parse learned: format extension, stored size, EXIF orientation, and
    whether the data runs to its end marker (False: truncated)."""

    ext: str
    width: int
    height: int
    orientation: int
    complete: bool


def _exif_orientation(payload: bytes) -> int:
    """Orientation tag (0x0112) from an APP1 ``Exif`` payload; 1 when absent or malformed."""
    tiff = payload[6:]
    if len(tiff) < 8:
        return 1
    endian = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if endian is None:
        return 1
    (ifd,) = struct.unpack_from(endian + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(endian + "H", tiff, ifd)
    for i in range(count):
        at = ifd + 2 + 12 * i
        if at + 12 > len(tiff):
            return 1
        tag, kind = struct.unpack_from(endian + "HH", tiff, at)
        if tag == 0x0112 and kind == 3:  # SHORT
            (value,) = struct.unpack_from(endian + "H", tiff, at + 8)
            return value if 1 <= value <= 8 else 1
    return 1


def fast_jpeg_info(data: bytes) -> FastInfo | None:
    """Size and orientation of an 8-bit Huffman JPEG, and whether it is complete.

    Returns None (ask Pillow) for anything else: 12-bit, lossless, arithmetic-coded,
    a height defined later by a DNL marker, malformed segments.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, n, orientation = 2, len(data), 1
    frame: tuple[int, int] | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > n:
            return None
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            try:
                orientation = _exif_orientation(data[pos + 4 : pos + 2 + length])
            except struct.error:
                orientation = 1
        elif marker == 0xDA:  # first scan: entropy-coded data follows
            if frame is None:
                return None
            # Entropy-coded data never holds FF D9 (FF is stuffed as FF 00), so an EOI marker
            # after the first scan's header means the data runs to its end; a truncated
            # file has none. Searching from the end finds it at once in a complete file.
            complete = data.rfind(b"\xff\xd9") > pos
            return FastInfo("jpg", frame[0], frame[1], orientation, complete)
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SOF_PLAIN or length < 8:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 4)
            if precision != 8 or height == 0 or width == 0 or components not in (1, 3, 4):
                return None
            frame = (width, height)
        pos += 2 + length
    return None


def fast_png_info(data: bytes) -> FastInfo | None:
    """Size of a PNG and whether its ``IEND`` chunk is there; None for PNGs with an eXIf
    chunk (orientation needs Pillow) or a malformed header."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height = struct.unpack_from(">II", data, 16)
    if width == 0 or height == 0 or b"eXIf" in data:
        return None
    complete = data.rfind(b"IEND") > 33
    return FastInfo("png", width, height, 1, complete)
