"""Write one planned shard: deterministic USTAR members, temp file, atomic rename, fsync.

A shard file under its final name is always complete: it is written as ``.NAME.partial``
and renamed only after its last byte is written. A crash leaves at most a ``.partial``
file, which the next run removes. Durability is the job's: with ``durable=False`` the
caller fsyncs finished shards (``fsync_file``) on a background thread while the next
shard is being written, and only then publishes the manifest; a shard a power cut
damaged before that is caught by resume, which re-hashes every leftover.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from dataclasses import dataclass
from typing import BinaryIO

from .errors import PackError
from .format import (
    TAR_GID,
    TAR_GNAME,
    TAR_MODE,
    TAR_MTIME,
    TAR_UID,
    TAR_UNAME,
    byte_sum,
    member_names,
    partial_name,
)
from .plan import TAR_BLOCK, PlannedSample, PlannedShard, archive_bytes
from .probe import file_stamp, read_stamped
from .spool import take as spool_take
from .transform import ResizeSpec

__all__ = ["ShardResult", "write_shard", "fsync_file", "partial_name", "hash_file", "hash_stream", "stored_bytes"]


@dataclass(frozen=True)
class ShardResult:
    """What was written: the manifest's per-shard entry."""

    name: str
    count: int
    bytes: int
    sha256: str
    fingerprint: str

    def manifest_entry(self) -> dict[str, object]:
        return {
            "name": self.name, "count": self.count, "bytes": self.bytes,
            "sha256": self.sha256, "fingerprint": self.fingerprint,
        }


class _HashingFile:
    """Writes chunks to a file descriptor with ``os.writev``, hashing and counting them.

    Chunks are gathered (up to ``_GATHER_BYTES`` / ``_GATHER_CHUNKS``) and written in one
    system call without being copied into a buffer first: a BufferedWriter behind a
    Python hashing layer cost a fifth of the writer's time.
    """

    def __init__(self, fd: int, *, write_behind: bool = False) -> None:
        self._fd = fd
        self.sha = hashlib.sha256()
        self.count = 0
        self._chunks: list[bytes] = []
        self._pending = 0
        self._behind = _WriteBehind(fd) if write_behind else None

    def write(self, *chunks: bytes) -> None:
        """Hash, count and gather ``chunks`` (a tar member goes as header, payload, trailer)."""
        update = self.sha.update
        for chunk in chunks:
            update(chunk)
        size = sum(map(len, chunks))
        self.count += size
        self._chunks += chunks
        self._pending += size
        if self._pending >= _GATHER_BYTES or len(self._chunks) >= _GATHER_CHUNKS:
            self.flush()

    def flush(self) -> None:
        chunks, self._chunks, self._pending = self._chunks, [], 0
        while chunks:
            done = os.writev(self._fd, chunks)
            if done == 0:
                raise OSError(errno.ENOSPC, "no bytes written")
            first = 0
            while first < len(chunks) and done >= len(chunks[first]):
                done -= len(chunks[first])
                first += 1
            chunks = chunks[first:]  # after a short write, send the rest
            if chunks and done:
                chunks[0] = chunks[0][done:]
        if self._behind is not None:
            self._behind.written(self.count)

    def wait_behind(self) -> None:
        """Wait for a running write-behind sync: it must end before the fd is closed."""
        if self._behind is not None:
            self._behind.wait()


class _WriteBehind:
    """Start the disk writing of a shard while it is still being written.

    The kernel holds written pages back for up to 30 s, so without this the fsync before
    the manifest waited for every byte of the job at the end (measured on a 3,000-image
    pack, median of 8 runs each: 0.71 s without, 0.64 s with).
    Every ``_BEHIND_BYTES`` a thread runs ``fdatasync`` on the file (at most one at a
    time): the disk works while this process goes on hashing and writing, and the final
    fsync finds little left to do.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._synced_at = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def written(self, total: int) -> None:
        if total - self._synced_at < _BEHIND_BYTES:
            return
        if self._thread is not None:
            if self._thread.is_alive():
                return  # the previous sync is still running; try again later
            self._thread.join()
        self._raise_error()
        self._synced_at = total
        self._thread = threading.Thread(target=self._sync, name="shardpack-write-behind", daemon=True)
        self._thread.start()

    def _sync(self) -> None:
        try:
            _datasync(self._fd)
        except OSError as exc:  # full disk, I/O error: the writer raises it
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


# 256 KB a system call, not 1 MB: a write that large gets the page cache's large folios,
# and on the virtual machines here (Firecracker) copying into them right after another
# program freed its memory was slow (3,000 images, 2 workers, after webdataset's
# ShardWriter: 167-202 ms with 1 MB, 140-166 with 256 KB; the same otherwise). See
# docs/SPEED.md, "Run order, and 1 MB writes on a virtual machine".
_GATHER_BYTES = 256 << 10
_GATHER_CHUNKS = 512  # well under IOV_MAX (1024 on Linux)
_BEHIND_BYTES = 8 << 20
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def stored_bytes(sample: PlannedSample, resize: ResizeSpec | None, spool: str | None = None) -> bytes:
    """The image bytes that go into the shard, from a source that has not changed since probed.

    "Not changed" is the file's inode, size, mtime and ctime as the probe read it (see
    ``probe.read_stamped``; ctime cannot be set back by ``touch`` or ``cp -p``): hashing
    every file a second time cost a tenth of the pack. With ``resize``, the bytes the probe
    re-encoded are taken from ``spool`` when they are there intact (packer.spool).

    Raises:
        PackError: the source file changed (or vanished) since it was probed.
    """
    spooled = spool_take(spool, sample.digest, sample.ext) if resize is not None and spool else None
    try:
        if spooled is not None:
            stamp = file_stamp(os.stat(sample.abs_path))
        else:
            data, stamp = read_stamped(sample.abs_path)
    except OSError as exc:
        raise PackError(f"{sample.rel_path}: cannot read it any more ({exc}); re-run the pack") from exc
    # the device number left out: each host of a Dask cluster numbers a shared mount (NFS,
    # Lustre) its own way, and a file probed on one host is written on another
    if sample.source_stamp is not None and stamp[1:] != sample.source_stamp[1:]:
        raise PackError(
            f"{sample.rel_path} changed since it was scanned (size or change time differs); "
            "re-run the pack when the source tree is no longer being modified"
        )
    if spooled is not None:
        return spooled
    return data if resize is None else stored_bytes_of(data, resize)


def stored_bytes_of(data: bytes, resize: ResizeSpec) -> bytes:
    """Re-encode a source the probe already accepted (the spool had no copy: a duplicate's
    entry was taken by its twin, or an earlier run's was damaged). The probe held these
    very bytes (the stamps say so) to ``--max-pixels``, so Pillow's own bomb limit and
    warning, lower than a raised ``--max-pixels``, must not refuse them here."""
    from .probe import open_with_pixel_limit
    from .transform import load_for_resize, transform_image

    with open_with_pixel_limit(data, None) as im:
        reduced = load_for_resize(im, resize)
        return transform_image(im, resize, data, reduced)[0]


def _octal(value: int, width: int) -> bytes:
    """A USTAR number field: zero-padded octal digits and a NUL, as ``tarfile`` writes it."""
    return b"%0*o\0" % (width - 1, value)


_HEADER_HEAD = _octal(TAR_MODE, 8) + _octal(TAR_UID, 8) + _octal(TAR_GID, 8)
_HEADER_TAIL = (
    b"0" + b"\0" * 100 + b"ustar\x0000"
    + TAR_UNAME.encode().ljust(32, b"\0") + TAR_GNAME.encode().ljust(32, b"\0")
    + b"\0" * 16 + b"\0" * 155 + b"\0" * 12  # devmajor/devminor empty, prefix, pad
)
_TAIL_SUM = sum(_HEADER_TAIL)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file with our fixed fields.

    Byte-identical to ``tarfile.TarInfo.tobuf(USTAR_FORMAT)`` for the same fields (a test
    pins that), but ~10x cheaper: per-member header building was a third of pack time.
    Member names are short ASCII keys, so no prefix/long-name handling is needed.
    """
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise PackError(
            f"tar member name {name!r} is over USTAR's 100 bytes: its split folder's name is too "
            "long; shorten it"
        )
    head = encoded.ljust(100, b"\0") + _HEADER_HEAD + _octal(size, 12) + _octal(TAR_MTIME, 12)
    checksum = byte_sum(head) + sum(b"        ") + _TAIL_SUM
    return head + b"%06o\0 " % checksum + _HEADER_TAIL


def _padding(size: int) -> bytes:
    return b"\0" * (-size % TAR_BLOCK)


def write_tar(
    shard: PlannedShard, fileobj: _HashingFile, resize: ResizeSpec | None,
    spool: str | None = None,
) -> None:
    """Write the shard's members, end-of-archive blocks and record padding to ``fileobj``.

    Each sample goes out as three chunks: the image's header, the image's bytes, and one
    piece holding the image's padding plus the whole ``.cls`` and ``.json`` members (nine
    writes per sample cost a tenth of the writer's time).
    """
    written = 0
    for sample in shard.samples:
        image_name, cls_name, json_name = member_names(sample.key, sample.ext)
        image = stored_bytes(sample, resize, spool)
        label = str(sample.label).encode("ascii")
        meta = sample.json_bytes()
        tail = b"".join((
            _padding(len(image)),
            ustar_header(cls_name, len(label)), label, _padding(len(label)),
            ustar_header(json_name, len(meta)), meta, _padding(len(meta)),
        ))
        fileobj.write(ustar_header(image_name, len(image)), image, tail)
        written += TAR_BLOCK + len(image) + len(tail)
    fileobj.write(b"\0" * (archive_bytes([written]) - written))  # end blocks + record padding


def write_shard(
    shard: PlannedShard, out_dir: str, *, fingerprint: str, resize: ResizeSpec | None = None,
    durable: bool = True, write_behind: bool = False, spool: str | None = None,
) -> ShardResult:
    """Write ``shard`` under ``out_dir`` atomically and return its manifest entry.

    ``durable``: fsync before the rename; a caller that passes False must ``fsync_file``
    the shard before anything (a manifest) vouches for it. ``write_behind``: start the
    disk writing while the shard is written (see ``_WriteBehind``); off for throw-away
    staging copies.

    Raises:
        PackError: disk full, unwritable output, or a source changed since it was scanned;
            no partial file is left under the final name.
    """
    final = os.path.join(out_dir, shard.name)
    temp = partial_name(final)
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with open(temp, "wb", buffering=0) as raw:
            hashing = _HashingFile(raw.fileno(), write_behind=write_behind)
            try:
                write_tar(shard, hashing, resize, spool)
                hashing.flush()
            finally:
                hashing.wait_behind()
            if durable:
                os.fsync(raw.fileno())
        os.replace(temp, final)
    except BaseException as exc:
        remove_quietly(temp)
        if isinstance(exc, OSError):
            raise PackError(_os_error_message(exc, final)) from exc
        raise
    if hashing.count != shard.planned_bytes:
        raise PackError(
            f"internal error: {shard.name} has {hashing.count} bytes, plan said {shard.planned_bytes}"
        )
    return ShardResult(shard.name, len(shard.samples), hashing.count, hashing.sha.hexdigest(), fingerprint)


def fsync_file(path: str) -> None:
    """Flush a written file to disk (its data, whichever process wrote it).

    Raises:
        PackError: the disk refused (full, I/O error), as the writer would have said. The
            file is removed then: its pages may never reach the disk, and a later run
            must not keep it on the strength of a checksum read from the page cache.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        remove_quietly(path)
        raise PackError(_os_error_message(exc, path)) from exc


def write_atomically(final: str, temp: str, data: bytes, *, durable: bool) -> None:
    """Write ``data`` to ``temp``, fsync it (if ``durable``) and rename it to ``final``: a
    reader sees the old file or the whole new one. A write that fails (a full disk) or is
    stopped leaves no ``temp`` behind."""
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(temp, final)
    except BaseException:
        remove_quietly(temp)
        raise


def remove_quietly(path: str) -> None:
    """Delete a file if it is there; a leftover that cannot be removed is not an error."""
    try:
        os.remove(path)
    except OSError:
        pass


def _os_error_message(exc: OSError, path: str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {path}: free space or choose another OUT; re-running resumes"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {exc.strerror}; choose a writable OUT"
    return f"cannot write {path}: {exc}"


def hash_stream(f: BinaryIO, chunk: int = 1 << 20) -> tuple[str, int]:
    """sha256 and size of what an open binary stream holds, read sequentially."""
    sha = hashlib.sha256()
    size = 0
    while block := f.read(chunk):
        sha.update(block)
        size += len(block)
    return sha.hexdigest(), size


def hash_file(path: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """sha256 and size of a local file."""
    with open(path, "rb") as f:
        return hash_stream(f, chunk)
