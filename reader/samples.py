"""Tar stream -> members -> samples grouped by key (plain generator stages).

A small USTAR parser instead of :mod:`tarfile`: it reads each shard front to back in
one pass (no seeks, so it works on any stream, e.g. an HTTP body), verifies every header
checksum, knows the byte offset of every member for error messages, and costs about a
third of ``tarfile.open(mode="r|")`` per member. It understands what tar writers put in
WebDataset shards: ustar/gnu/pax headers, GNU long names (``L``) and pax ``path`` records.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import struct
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

from packer.errors import SampleDecodeError, ShardReadError
from packer.format import IMAGE_MEMBER_EXTS, byte_sum, split_member_name

from .policy import ErrorPolicy
from .source import GZIPPED_TAR_ENDINGS, ShardRef, open_shard

__all__ = [
    "Member",
    "Sample",
    "tar_members",
    "group_samples",
    "shard_samples",
    "image_member",
    "sample_label",
    "scan_shard",
    "UnreadableLabels",
]

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_SKIP_SEEK_MIN = 64 * 1024  # below this, reading is cheaper than a seek (and works on pipes)

# A sample is a dict like webdataset's: "__key__", "__shard__", "__offset__", then one entry
# per member extension ("jpg", "cls", "json", ...) holding the raw bytes.
Sample = dict[str, Any]


class Member(NamedTuple):
    """One regular-file tar member: its name, its bytes and its header's byte offset.

    A NamedTuple, not a frozen dataclass: one is made per member on the reader's hot path,
    and it is three times cheaper to build.
    """

    name: str
    data: bytes
    offset: int


def _skip(stream: IO[bytes], n: int) -> int:
    """Skip ``n`` bytes; return how many were really there."""
    if n >= _SKIP_SEEK_MIN and getattr(stream, "seekable", lambda: False)():
        here = stream.tell()
        try:
            end = stream.seek(n, 1)
        except (OSError, ValueError):  # claims to seek but cannot seek relative: read
            stream.seek(here)
        else:  # files seek past their end silently: bound the skip by their size
            size = _stream_size(stream)
            return min(n, end - here, (size - here) if size is not None else n)
    got = 0
    while got < n:  # in chunks: a skip must not hold a whole large member in memory
        chunk = stream.read(min(n - got, 1 << 20))
        if not chunk:
            break
        got += len(chunk)
    return got


def _stream_size(stream: IO[bytes]) -> int | None:
    size = getattr(stream, "size", None)  # fsspec files
    if isinstance(size, int):
        return size
    try:  # a local file
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _parse_number(field: bytes) -> int:
    try:  # the usual field: octal digits, then NUL or space
        return int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        pass
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_ok(header: bytes, checksum_field: bytes) -> bool:
    try:
        stored = _parse_number(checksum_field)
    except ValueError:
        return False
    # the checksum field itself counts as 8 spaces
    return stored == byte_sum(header) - byte_sum(checksum_field) + 8 * 32


# The fields of a tar header the parser reads, in one unpack (slicing them one by one was
# a fifth of the per-member cost): name, size, checksum, type flag, magic ("ustar\0" for
# POSIX) and the POSIX name prefix.
_HEADER = struct.Struct("100s24x12s12x8sc100x6s82x155s12x")


def _pax_path(data: bytes) -> str | None:
    """The ``path`` of pax records (``"LENGTH key=value\\n"``, LENGTH counting the whole record).

    Raises:
        ValueError: a record whose length is not a number, does not reach past its own
            length field or runs past the data, or a path that is not UTF-8 (a damaged
            header: a length of 0 would otherwise never move on).
    """
    path = None
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        digits = data[pos:space]
        length = int(digits) if digits.isdigit() else -1
        if length <= space - pos or pos + length > len(data):
            raise ValueError(f"bad pax record length {digits[:20]!r} at byte {pos}")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")  # UnicodeDecodeError is a ValueError
        pos += length
    return path


def tar_members(
    stream: IO[bytes], *, shard: str, want: Callable[[str], bool] | None = None,
    named: Callable[[str], bool] | None = None,
) -> Iterator[Member]:
    """Yield the regular-file members of a tar stream in order.

    Args:
        stream: binary stream positioned at the start of the tar.
        shard: name used in error messages.
        want: if given, members whose name it rejects are skipped without being yielded
            (and, on seekable streams, without being read).
        named: of the members ``want`` rejects, those yielded all the same, with empty
            data (skipped as the others are): their names alone tell what a sample holds.

    Raises:
        ShardReadError: bad header checksum, or the stream ends before the end-of-archive
            marker (truncated); ``offset`` is where the damage starts.
    """
    offset = 0
    long_name: str | None = None
    start: int | None = None  # where the first (long-name / pax) header of a member began
    header: bytes | None = None  # the next header, when it was read with the member before
    unpack = _HEADER.unpack
    while True:
        if header is None:
            header, failed = _read_upto(stream, BLOCK)
            if failed is not None:
                raise failed
        if len(header) < BLOCK:
            raise ShardReadError(
                (offset == 0 and _not_a_tar(header)) or
                "truncated: the shard ends before the tar end-of-archive marker "
                "(re-upload or re-pack it)",
                shard=shard,
                offset=offset,
            )
        if header == _ZERO_BLOCK:
            return
        name_field, size_field, checksum_field, kind, magic, prefix = unpack(header)
        if not _header_ok(header, checksum_field):
            raise ShardReadError(
                (offset == 0 and _not_a_tar(header)) or
                "corrupted tar header (checksum mismatch); the shard is damaged, "
                "re-pack or re-upload it",
                shard=shard,
                offset=offset,
            )
        name = name_field.split(b"\0", 1)[0].decode("utf-8", "replace")
        if magic == b"ustar\0" and prefix[0] != 0:  # POSIX only: GNU puts atime here
            name = prefix.split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        size = _parse_number(size_field)
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data_offset = offset + BLOCK
        header = None
        if kind in _FILE_TYPES:
            member = long_name or name
            if want is None or want(member):
                data, pad, header, failed = _read_member(stream, size, padded)
                if len(data) < size:
                    raise _member_cut(failed, member, size, len(data), shard, data_offset)
                yield Member(member, data, offset if start is None else start)
                long_name = start = None
                if failed is not None or pad < padded - size:
                    _raise_after_member(failed, member, pad, padded - size, shard, data_offset + size)
                offset = data_offset + padded
                continue
        elif kind in _NAME_TYPES:
            member = long_name or name
            data, pad, header, failed = _read_member(stream, size, padded)
            if len(data) < size:
                raise _member_cut(failed, member, size, len(data), shard, data_offset)
            start = offset if start is None else start
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                try:
                    long_name = _pax_path(data) or long_name
                except ValueError as exc:
                    raise ShardReadError(
                        f"corrupted pax header ({exc}); the shard is damaged, re-pack or re-upload it",
                        shard=shard,
                        offset=offset,
                    ) from exc
            _raise_after_member(failed, member, pad, padded - size, shard, data_offset + size)
            offset = data_offset + padded
            continue
        got = _skip(stream, padded)
        if got < size:
            raise ShardReadError(
                f"truncated: member {long_name or name!r} needs {size} bytes",
                shard=shard,
                offset=data_offset + got,
            )
        if kind in _FILE_TYPES and named is not None and named(long_name or name):
            yield Member(long_name or name, b"", offset if start is None else start)
        # a long name or pax header names the one member after it, whatever its kind: kept
        # past a directory or link member, it renamed the next file (a sample lost its label)
        long_name = start = None
        offset = data_offset + padded


def _not_a_tar(head: bytes) -> str | None:
    """What a "shard" whose first block is no tar header is, when its first bytes say so."""
    if head.startswith(b"\x1f\x8b"):
        return ("gzip-compressed, not a tar: name it .tar.gz (read decompressed) or gunzip it; "
                "uncompressed tars read fastest (JPEG and PNG do not compress further)")
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, not a tar: shards are tar files"
    if head.lstrip()[:1] == b"<":
        return ("an HTML or XML document, not a tar (an error page from a server? check the "
                "URL and credentials)")
    return None


_NAME_TYPES = (b"L", b"x")  # a GNU long name, a pax header: they name the member that follows


def _member_cut(
    failed: Exception | None, member: str, size: int, got: int, shard: str, data_offset: int
) -> ShardReadError:
    """The error for a member whose data the stream ended (or failed) inside."""
    if failed is not None:  # the stream's own error, naming the member's key
        error = _in_member(failed, split_member_name(member)[0], shard, data_offset + got)
        error.__cause__ = failed
        return error
    return ShardReadError(
        f"truncated: member {member!r} needs {size} bytes, only {got} are there",
        shard=shard,
        offset=data_offset + got,
        key=split_member_name(member)[0],
    )


def _raise_after_member(
    failed: Exception | None, member: str, pad: int, padding: int, shard: str, data_end: int
) -> None:
    """Raise what a whole member's read met after its data: the stream's error while reading
    ahead, or the shard ending inside its padding."""
    if failed is not None:  # met reading ahead: raised where reading on would meet it
        raise failed
    if pad < padding:
        raise ShardReadError(
            f"truncated: the shard ends in the padding after member {member!r}",
            shard=shard,
            offset=data_end + pad,
        )


def _read_member(
    stream: IO[bytes], size: int, padded: int
) -> tuple[bytes, int, bytes, Exception | None]:
    """A member's data, how much of its padding was there, the next header, and the error
    that stopped the reads short, if one did.

    Three reads per member (data, padding, next header) were a fifth of the tar parsing:
    the padding and the next header come in one read, and a small member (``.cls``,
    ``.json``) comes with both. A large one is read on its own: slicing it out of a bigger
    read would copy every image twice. An error met while reading ahead (a remote or
    checked stream failing in the next header) comes back instead of being raised, so the
    caller still yields the whole member first, as a reader that had not read ahead would.
    """
    if padded <= _SMALL_MEMBER:
        chunk, failed = _read_upto(stream, padded + BLOCK)
        data = chunk[:size]
        return data, max(0, min(len(chunk), padded) - size), chunk[padded:], failed
    data, failed = _read_upto(stream, size)
    if len(data) < size:
        return data, 0, b"", failed
    rest, failed = _read_upto(stream, padded - size + BLOCK)
    return data, min(len(rest), padded - size), rest[padded - size :], failed


def _read_upto(stream: IO[bytes], n: int) -> tuple[bytes, Exception | None]:
    """Up to ``n`` bytes (fewer at the end), and the error that ended the reading early."""
    try:
        chunk = stream.read(n)
    except Exception as exc:  # an OSError, or a checked/remote stream's ShardReadError
        return b"", exc
    if len(chunk) == n or not chunk:  # the usual case: one read
        return chunk, None
    parts = [chunk]
    got = len(chunk)
    while got < n:
        try:
            chunk = stream.read(n - got)
        except Exception as exc:
            return b"".join(parts), exc
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts), None


def _in_member(error: Exception, key: str, shard: str, offset: int) -> ShardReadError:
    """A stream error met inside a member, with the member's key: the sample before it is
    then whole and kept (group_samples)."""
    if isinstance(error, ShardReadError):
        return type(error)(error.reason, shard=error.shard, offset=error.offset, key=key)
    return ShardReadError(f"read failed ({error})", shard=shard, offset=offset, key=key)


_SMALL_MEMBER = 8 * BLOCK


def group_samples(members: Iterable[Member], *, shard: str) -> Iterator[Sample]:
    """Group adjacent members that share a key into one sample dict (webdataset's rule).

    A shard cut short inside a member of the next sample still gives the sample before it:
    its members all came first (the error names the member's key)."""
    current: Sample | None = None
    # each earlier sample's key -> its members' extensions: a key met again with a member
    # its sample lacked is one sample's members apart (a tar made with plain `tar -cf`);
    # met again with members its sample had, it is another sample (webdataset allows that)
    seen: dict[str, frozenset[str]] = {}
    try:
        for member in members:
            key, ext = split_member_name(member.name)
            if current is None or current["__key__"] != key:
                if current is not None:
                    done, current = current, None
                    seen[done["__key__"]] = frozenset(done)  # before the reader takes members out
                    yield done
                if key in seen and ext not in seen[key]:
                    raise ShardReadError(
                        f"sample {key!r} has its .{ext} member apart from its others: a "
                        "sample's members must be adjacent in the tar (a tar of a folder made "
                        "with `tar -cf` lists files in folder order; make it with "
                        "`tar --sort=name -cf`, or webdataset's ShardWriter)",
                        shard=shard, offset=member.offset, key=key)
                current = {"__key__": key, "__shard__": shard, "__offset__": member.offset}
            elif ext in current:  # one key written twice in a row: whose label goes with which image?
                raise ShardReadError(
                    f"member {member.name!r} appears twice in one sample (a duplicate key); "
                    "the shard is damaged or was not written by one writer, re-pack it",
                    shard=shard,
                    offset=member.offset,
                    key=key,
                )
            current[ext] = member.data
    except ShardReadError as exc:
        if current is not None and exc.key is not None and exc.key != current["__key__"]:
            yield current
        raise
    if current is not None:
        yield current


# Sent into a shard_samples generator by a reader that needs no more of its samples: the
# generator then reads the shard's remaining bytes, unparsed, when (and only when) its
# stream is comparing a checksum, and stops.
READ_THE_REST = object()


def shard_samples(
    ref: ShardRef,
    *,
    policy: ErrorPolicy,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    opened: Callable[[], IO[bytes]] | None = None,
    cache_max_bytes: int | None = None,
) -> Generator[Sample, Any, None]:
    """Open one shard, stream its samples, and check the count against the manifest.

    ``opened``: gives the shard's stream, already opened ahead (reader.remote.OpenAhead);
    by default :func:`open_ref` opens it as the first sample is asked for.

    Errors are handed to ``policy``: with ``on_shard_error="raise"`` a ShardReadError
    naming the shard and byte offset propagates; otherwise the shard is cut short there.
    A reader that wants only the first samples sends ``READ_THE_REST`` (see there).
    """
    count = 0
    try:
        with _checked_shard(ref, storage_options, cache_dir, opened, cache_max_bytes) as stream:
            for sample in group_samples(tar_members(stream, shard=ref.name), shard=ref.name):
                count += 1
                if (yield sample) is READ_THE_REST:
                    if getattr(stream, "verifying", False):
                        _read_to_end(stream)  # unparsed: only for the checksum
                    return
            _read_to_end(stream)
        if ref.count is not None and count != ref.count:
            raise ShardReadError(
                f"holds {count} samples but the manifest says {ref.count}; "
                "the shard and manifest do not belong together (re-pack or re-upload)",
                shard=ref.name,
            )
    except ShardReadError as exc:
        policy.shard_failed(exc)


@contextlib.contextmanager
def _checked_shard(
    ref: ShardRef, storage_options: dict[str, Any] | None, cache_dir: str | None,
    opened: Callable[[], IO[bytes]] | None = None, cache_max_bytes: int | None = None,
) -> Iterator[IO[bytes]]:
    """One shard opened for a whole read checked against the manifest's size and sha256
    (and kept in ``cache_dir``); an OSError while it is read becomes a ShardReadError
    naming the shard and the byte offset."""
    with (opened() if opened is not None else
          open_ref(ref, storage_options, cache_dir, cache_max_bytes)) as stream:
        try:
            yield stream
        except OSError as exc:
            raise ShardReadError(f"read failed ({exc})", shard=ref.name, offset=_tell(stream)) from exc


def open_ref(
    ref: ShardRef, storage_options: dict[str, Any] | None, cache_dir: str | None,
    cache_max_bytes: int | None = None,
) -> IO[bytes]:
    """Open a shard of the manifest for a whole read, checked against its size and sha256;
    a plain ``.tar.gz`` / ``.tgz`` shard (webdataset reads them) decompressed as it streams."""
    stream = open_shard(ref.url, expected_size=ref.nbytes, expected_sha256=ref.sha256,
                        cache_dir=cache_dir, cache_max_bytes=cache_max_bytes, **(storage_options or {}))
    if ref.url.lower().endswith(GZIPPED_TAR_ENDINGS):
        return _Gunzipped(stream)  # type: ignore[return-value]  # a readable binary stream
    return stream


class _Gunzipped(gzip.GzipFile):
    """A gzip-compressed tar, decompressed as it is read; closing it closes the stream it
    reads (GzipFile leaves a given file open). Byte offsets in errors are those of the
    decompressed tar. A ``.tar.gz`` was taken as a shard and read as a tar: "corrupted tar
    header ... re-pack it" at byte 0."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def seekable(self) -> bool:
        return False  # skips read forward: the file's own size is the compressed one

    def read(self, size: int | None = -1) -> bytes:
        try:
            return super().read(-1 if size is None else size)
        except (EOFError, zlib.error) as exc:  # cut short, or damaged inside
            raise OSError(f"damaged gzip data ({exc})") from exc

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def _read_to_end(stream: IO[bytes]) -> None:
    """Read what follows the end-of-archive marker (its second block, record padding).

    A checked stream compares the sha256 and commits its cache copy only once its last
    byte is read; a shard whose last read block held nothing but this padding would
    otherwise be used without its checksum ever being compared.
    """
    while stream.read(1 << 20):
        pass


def _tell(stream: IO[bytes]) -> int | None:
    try:
        return stream.tell()
    except (OSError, ValueError):
        return None


def image_member(sample: Sample) -> str | None:
    """Return the extension of the sample's image member, or None if it has none."""
    for ext in sample:
        if ext in IMAGE_MEMBER_EXTS:
            return ext
    return None


def sample_label(sample: Sample) -> int | None:
    """Return the sample's class index from ``.cls`` (or ``.json``'s "label"), if any.

    Raises:
        SampleDecodeError: the ``.cls`` is not a whole number, or the ``.json`` is not a
            JSON object with a whole-number "label" (a foreign or damaged tar).
    """
    cls = sample.get("cls")
    try:
        if cls is not None:
            return int(cls)
        meta = sample.get("json")
        if meta is not None:
            label = json.loads(meta).get("label")
            return None if label is None else int(label)
    except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        member = "cls" if cls is not None else "json"
        raise SampleDecodeError(
            f"unreadable label in its .{member} member ({exc})",
            key=sample.get("__key__", "?"), shard=sample.get("__shard__"),
        ) from exc
    return None


@dataclass
class UnreadableLabels:
    """Samples a scan found whose label is no whole number (a ``.cls`` holding a class
    name): how many, and the first one's message. Counts only: an error per sample (with
    its traceback) cost 1.5 KB each, and rode along in every copy of the reader."""

    count: int = 0
    first: str | None = None

    def add(self, exc: SampleDecodeError) -> None:
        self.count += 1
        if self.first is None:
            self.first = str(exc)


def scan_shard(
    ref: ShardRef, *, storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
    policy: ErrorPolicy | None = None, cache_max_bytes: int | None = None,
    unreadable: UnreadableLabels | None = None,
) -> list[tuple[str, int | None, str | None]]:
    """List ``(path, label, class name)`` of every sample with an image member in one
    shard, in shard order (an epoch skips the others: no image to decode).

    ``path`` is the ``.json`` "path" (the source file relative to the packed tree), or the
    sample key when there is no ``.json``; label and class name are None when absent.
    Keeps only the small ``.cls``/``.json`` members and the image members' names; image
    bytes are skipped (by seeking
    where the stream allows it: a local shard already verified in this process). The shard
    is checked against the manifest's size and sha256 as an epoch's read is (and cached in
    ``cache_dir`` on the way), so labels are never taken from a damaged shard. Used for
    ``filenames``/``labels`` and for manifest-less shards whose length and classes are
    unknown.

    Errors go to ``policy`` as an epoch's do (the entries before the damage are kept under
    "warn"/"ignore", as an epoch keeps those samples); without one they are raised. A
    label that is no whole number (a ``.cls`` holding a class name) is listed as None and
    counted in ``unreadable``, so that a split of nothing else can say why.

    Raises:
        ShardReadError, ChecksumError: as reading the shard in an epoch.
    """

    def want(name: str) -> bool:
        return name.lower().endswith((".cls", ".json"))  # an epoch takes KEY.CLS as .cls

    def image(name: str) -> bool:
        return split_member_name(name)[1] in IMAGE_MEMBER_EXTS

    out: list[tuple[str, int | None, str | None]] = []
    try:
        with _checked_shard(ref, storage_options, cache_dir, cache_max_bytes=cache_max_bytes) as stream:
            members = tar_members(stream, shard=ref.name, want=want, named=image)
            for sample in group_samples(members, shard=ref.name):
                if image_member(sample) is None:
                    continue  # no epoch yields it: not counted (a caption, a stray .cls)
                meta = _json_object(sample.get("json"))
                try:
                    label = sample_label(sample)
                except SampleDecodeError as exc:  # reading the epoch reports it, through on_error
                    label = None
                    if unreadable is not None:
                        unreadable.add(exc)
                out.append((str(meta.get("path", sample["__key__"])), label, meta.get("class")))
            _read_to_end(stream)
    except ShardReadError as exc:
        if policy is None:
            raise
        policy.shard_failed(exc)
    return out


def _json_object(data: bytes | None) -> dict[str, Any]:
    """A ``.json`` member as a dict; empty when absent or not a JSON object."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
