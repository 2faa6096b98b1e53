"""Check one source file before it goes into a shard, and describe what will be stored.

The probe is the packer's gatekeeper: it recognises images by content (not by name), refuses
what a training job would choke on (empty, truncated, corrupt, unsupported, decompression
bombs), and records the facts the plan needs (real format, size after EXIF orientation,
stored byte count, content digest). Three levels of checking:

* ``"structure"`` (default): plain JPEGs and PNGs are checked by ``packer.headers`` without
  Pillow — header fields, declared size, and an end marker after the last scan (catches
  truncation, the common failure of copied or downloaded files) — at a fraction of the
  cost; every other format is fully decoded by Pillow.
* ``"decode"``: every image is decoded (JPEGs at 1/8 scale through libjpeg's DCT scaling,
  which still reads every entropy-coded byte), so corrupt data inside a file is caught too.
* ``"header"``: Pillow reads headers only (fastest, weakest).
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from .digest import content_digest
from .format import PIL_FORMAT_TO_EXT
from .headers import (
    FastInfo,
    fast_jpeg_info,
    fast_png_info,
    heif_kind,
    signature_kind,
)
from .spool import put as spool_put
from .transform import ResizeSpec, load_for_resize, pillow_orientation, transform_image

__all__ = ["Probe", "allow_packed_pixels", "pillow_orientation", "probe_file", "probe_bytes", "read_stamped", "file_stamp", "DEFAULT_MAX_PIXELS", "VALIDATE_MODES", "DEFAULT_VALIDATE"]

# Pillow's own warning threshold (~9459 x 9459); above it a file is a likely decompression
# bomb: a few KB on disk that expand to gigabytes of pixels in every training worker.
DEFAULT_MAX_PIXELS = 89_478_485
VALIDATE_MODES = ("structure", "decode", "header")


def allow_packed_pixels(manifest: dict[str, Any] | None) -> None:
    """Let Pillow open every image the pack accepted: raise its decompression-bomb limit to
    the manifest's ``max_pixels`` when that is higher (never lower it).

    ``--max-pixels`` above Pillow's limit packs images that Pillow then refuses to open
    (above twice ``Image.MAX_IMAGE_PIXELS``) or warns about; the packer already checked
    them against the limit the user chose. Process-wide, as Pillow's limit is.
    """
    options = (manifest or {}).get("options")
    packed = options.get("max_pixels") if isinstance(options, dict) else None
    if isinstance(packed, int) and packed > (Image.MAX_IMAGE_PIXELS or packed):
        Image.MAX_IMAGE_PIXELS = packed
DEFAULT_VALIDATE = "structure"
_ROTATED_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(slots=True)
class Probe:
    """What the probe found out about one file (treated as immutable; not a frozen
    dataclass, whose constructor cost 4 µs per file against 0.5).

    ``is_image`` False means the content is not an image at all (the file is ignored unless
    its name claims an image); ``ok`` False with ``is_image`` True means a broken image,
    which is skipped with ``reason``.
    """

    ok: bool
    is_image: bool
    reason: str = ""
    ext: str = ""
    width: int = 0
    height: int = 0
    size: int = 0  # bytes stored in the shard
    digest: str = ""  # of the stored bytes (packer.digest)
    source_digest: str = ""  # of the source file (duplicate detection)
    # the source file's identity and times as read (see read_stamped): the writer re-reads
    # the file and compares this instead of hashing it again (a tenth of pack time)
    source_stamp: tuple[int, ...] | None = None

    def __reduce__(self) -> tuple[type[Probe], tuple[Any, ...]]:
        # back from worker processes as the constructor's arguments (cheaper than the
        # slots' default state)
        return Probe, (self.ok, self.is_image, self.reason, self.ext, self.width, self.height,
                       self.size, self.digest, self.source_digest, self.source_stamp)


def _upright_size(im: Image.Image, opened: tuple[int, int]) -> tuple[int, int]:
    """``opened`` (the size Pillow gave at open, before any draft) as it is upright.

    Called after the decode: for a PNG, ``getexif`` loads the image itself and swallows a
    decode error, which would let a damaged file through. Some plugins report the upright
    size already (TIFF since Pillow 11, which also drops the tag once it has rotated the
    pixels on load): their stored size differs from ``opened``, which is then kept.
    """
    if getattr(im, "_tile_size", opened) != opened:
        return opened
    w, h = opened
    return (h, w) if pillow_orientation(im) in _ROTATED_ORIENTATIONS else (w, h)


def _full_decode(im: Image.Image) -> None:
    if im.format in ("JPEG", "MPO"):
        im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
    im.load()


def _bomb_reason(w: int, h: int, max_pixels: int) -> str:
    return (
        f"decompression bomb refused: {w}x{h} = {w * h:,} pixels exceeds the limit of "
        f"{max_pixels:,} (raise --max-pixels to pack it)"
    )


def _fast_info(data: bytes) -> FastInfo | None:
    """A JPEG's or PNG's size and completeness from its markers, without Pillow (None for
    other formats, or where the fast parse cannot tell)."""
    return fast_jpeg_info(data) if data[:2] == b"\xff\xd8" else fast_png_info(data)


def _pillow_bomb_reason(exc: Image.DecompressionBombError, data: bytes, max_pixels: int) -> str:
    """Pillow's refusal (at twice the limit) in the words of our own check, so one file gets
    one message whichever path probed it (with or without --resize)."""
    fast = _fast_info(data)
    if fast is not None:
        return _bomb_reason(fast.width, fast.height, max_pixels)
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    said = f"{int(pixels.group(1)):,} pixels" if pixels else str(exc)
    return f"decompression bomb refused: {said} exceeds the limit of {max_pixels:,} (raise --max-pixels to pack it)"


def _probe_fast(
    info: FastInfo, data: bytes, source_digest: str, max_pixels: int, stamp: tuple[int, ...] | None,
) -> Probe:
    if info.width * info.height > max_pixels:
        return Probe(False, True, _bomb_reason(info.width, info.height, max_pixels), source_digest=source_digest)
    if not info.complete:
        return Probe(False, True, "truncated JPEG (no end-of-image marker after the last scan)",
                     source_digest=source_digest)
    w, h = info.width, info.height
    if info.orientation in _ROTATED_ORIENTATIONS:
        w, h = h, w
    return Probe(True, True, "", info.ext, w, h, len(data), source_digest, source_digest, stamp)


def probe_bytes(
    data: bytes,
    *,
    validate: str = DEFAULT_VALIDATE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize: ResizeSpec | None = None,
    keep_stored: list[bytes] | None = None,
    source_stamp: tuple[int, ...] | None = None,
) -> Probe:
    """Probe an image held in memory; see the module docstring.

    ``keep_stored``: with ``resize``, the re-encoded bytes are appended to this list.
    ``source_stamp``: recorded in a good probe (see read_stamped).
    """
    source_digest = content_digest(data)
    if not data:
        # no content says "image": only a name that does makes it a skipped image
        return Probe(False, False, "empty file (0 bytes)", source_digest=source_digest)
    if validate == "structure" and resize is None:
        fast = _fast_info(data)
        if fast is not None:
            return _probe_fast(fast, data, source_digest, max_pixels, source_stamp)
    try:
        # Pillow refuses above twice its own limit at open; make that limit ours, so a
        # raised --max-pixels really lets a large scan through (open reads only headers).
        im = open_with_pixel_limit(data, max_pixels)
    except Image.DecompressionBombError as exc:
        return Probe(False, True, _pillow_bomb_reason(exc, data, max_pixels), source_digest=source_digest)
    except UnidentifiedImageError:
        kind = signature_kind(data)
        if kind is not None:  # an image by its signature, cut or damaged inside its headers
            return Probe(False, True, f"truncated or corrupt {kind} header", source_digest=source_digest)
        heif = heif_kind(data)
        if heif is not None:  # a photo in a format no reader here decodes: skipped, not junk
            return Probe(False, True, f"{heif} image: a format shardpack does not pack (convert it "
                         "to JPEG, e.g. with pillow-heif)", source_digest=source_digest)
        return Probe(False, False, "not an image Pillow can read", source_digest=source_digest)
    except Exception as exc:  # Pillow raises many types on malformed headers
        return Probe(False, True, f"unreadable image header: {exc}", source_digest=source_digest)
    with im:
        fmt = im.format or "?"
        ext = PIL_FORMAT_TO_EXT.get(fmt)
        if ext is None:
            return Probe(False, True, f"unsupported image format {fmt}", source_digest=source_digest)
        w, h = im.size
        if w <= 0 or h <= 0:
            return Probe(False, True, f"image declares size {w}x{h}", source_digest=source_digest)
        if w * h > max_pixels:
            return Probe(False, True, _bomb_reason(w, h, max_pixels), source_digest=source_digest)
        reduced = None
        try:
            if validate != "header" or resize is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    if resize is None:
                        _full_decode(im)
                    else:
                        reduced = load_for_resize(im, resize)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if "truncated" in reason.lower():
                reason = f"truncated {fmt} ({reason})"
            else:
                reason = f"corrupt {fmt} data ({reason})"
            return Probe(False, True, reason, source_digest=source_digest)
        width, height = _upright_size(im, (w, h))
        if resize is not None:
            try:
                data, ext, width, height = transform_image(im, resize, data, reduced)
            except Exception as exc:
                return Probe(False, True, f"cannot resize: {exc}", source_digest=source_digest)
    stored_digest = source_digest if resize is None else content_digest(data)
    if resize is not None and keep_stored is not None:
        keep_stored.append(data)
    return Probe(True, True, "", ext, width, height, len(data), stored_digest, source_digest, source_stamp)


# Pillow's bomb limit is one module attribute: threads that open images (a Dask worker with
# several threads) take turns setting it, so none restores another's value.
_PIXEL_LIMIT_LOCK = threading.Lock()


def open_with_pixel_limit(data: bytes, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (headers only) with Pillow's decompression-bomb limit set to
    ``max_pixels`` (None: none) and its warning silenced; the limit is checked at open."""
    with _PIXEL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pillow_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


def read_stamped(path: str) -> tuple[bytes, tuple[int, ...]]:
    """The file's bytes and its stamp: (device, inode, size, mtime_ns, ctime_ns).

    Taken from the open file before and after the read; a file written meanwhile is an
    OSError ("changed while being read"). ctime moves on every write, rename over and
    metadata change, and no tool can set it back (unlike mtime with ``cp -p``/``touch``).
    Plain ``os`` calls, sized by the first fstat: ``open().read()`` cost a third more per
    file, and every file is read twice per pack.
    """
    fd = os.open(path, _READ_FLAGS)
    try:
        before = file_stamp(os.fstat(fd))
        data = _read_all(fd, before[2])
        if file_stamp(os.fstat(fd)) != before:
            raise OSError(f"{path} changed while being read")
        return data, before
    finally:
        os.close(fd)


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)


def _read_all(fd: int, size: int) -> bytes:
    """Everything in ``fd``, expected to be ``size`` bytes: one read when the kernel allows
    (Linux caps one read near 2 GiB; bigger files are read into one preallocated buffer,
    not into parts joined by a copy). A file that says 0 bytes is read to its end anyway
    (proc-like and some FUSE files report no size)."""
    if size == 0:
        return b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    data = os.read(fd, size)
    if len(data) == size or not data:
        return data
    buffer = bytearray(size)
    view = memoryview(buffer)
    view[: len(data)] = data
    done = len(data)
    del data
    while done < size and (got := os.readv(fd, [view[done:]])):
        done += got
    view.release()
    if done < size:  # the file shrank meanwhile (the caller's stamps say it changed)
        del buffer[done:]
    return buffer  # type: ignore[return-value]  # bytes-like: hashing, parsing and writing take it


def file_stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def probe_file(
    path: str,
    *,
    validate: str = DEFAULT_VALIDATE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize: ResizeSpec | None = None,
    spool: str | None = None,
) -> Probe:
    """Probe one file on disk; an unreadable file is a broken image, not a crash.

    ``spool``: with ``resize``, leave the re-encoded bytes there for the writer
    (packer.spool).
    """
    try:
        data, stamp = read_stamped(path)
    except OSError as exc:
        return Probe(False, True, f"cannot read file: {exc.strerror or exc}")
    stored: list[bytes] = []
    probe = probe_bytes(data, validate=validate, max_pixels=max_pixels, resize=resize,
                        keep_stored=stored if spool is not None else None, source_stamp=stamp)
    if probe.ok and stored and spool is not None:
        spool_put(spool, stored[0], probe.digest, probe.ext)
    return probe
