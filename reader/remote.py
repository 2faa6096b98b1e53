"""Read whole shards from object storage: large ranged reads, retries, read-ahead, cache.

A shard is read front to back exactly once, so the stream here is built for that:

* **Large ranged reads** (``block_size``, 8 MiB by default): one request per block instead
  of one per image, each at an exact byte range.
* **Retries that resume**: a transient failure (connection reset, timeout, HTTP 5xx,
  throttling such as S3's 503 SlowDown) re-requests the same block at the same byte
  offset, with bounded exponential backoff. Bytes are never duplicated or skipped, and a
  shard is never restarted from byte 0. A missing object (404) fails at once.
* **Read-ahead**: a background thread fetches the next blocks while the current one is
  consumed, and :func:`prefetch_shards` opens the next shard(s) before the current one is
  finished, so per-request latency (10-50 ms on real object stores) is hidden.
* **Checksums**: with ``expected_sha256`` the bytes are hashed as they stream; a mismatch
  raises :class:`~packer.errors.ChecksumError` instead of delivering the last block.
* **Optional local cache** (``cache_dir``): whole shards, keyed by URL + sha256, written
  atomically, evicted least-recently-used beyond ``cache_max_bytes``.

Local files are opened directly (the OS already reads ahead); the first time a checksum is
asked for in this process they are read through a hash on a background thread
(reader.local), and later epochs open them directly while their stamp (inode, size,
mtime, ctime) stays the same.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import fsspec

from packer.errors import ShardReadError
from packer.probe import file_stamp
from packer.storage import one_retry_layer

from .local import ForwardStream, HashedLocalFile, checksum_mismatch, remedy

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "open_shard_stream",
    "prefetch_shards",
    "OpenAhead",
    "ShardStream",
    "ShardCache",
    "is_transient",
]

DEFAULT_BLOCK_SIZE = 8 << 20
# Blocks fetched ahead of the consumer per stream: with the block being read and the one
# being fetched, at most (READAHEAD_BLOCKS + 2) * block_size bytes are held per stream.
READAHEAD_BLOCKS = 2
MAX_BACKOFF_S = 10.0
# A cache temp file not written to for this long belongs to a reader that died.
STALE_PARTIAL_S = 3600.0
# HTTP statuses worth retrying: throttling (429, S3's 503 SlowDown) and server errors.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "Throttl", "RequestTimeout",
                   "InternalError", "ServiceUnavailable", "timed out", "Connection reset")
_PERMANENT_TEXT = ("not satisfiable", "InvalidRange", "AccessDenied", "NoSuchBucket")
_NETWORK_MODULES = frozenset({"aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "http"})
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    return status if isinstance(status, int) and 100 <= status < 600 else None


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same request may succeed (network trouble, 5xx, throttling).

    Missing objects and permission errors are permanent: retrying them only delays the
    error the user needs to see.
    """
    if isinstance(exc, _PERMANENT) or any(text in str(exc) for text in _PERMANENT_TEXT):
        return False
    status = _http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS or status >= 500
    if any(text in str(exc) for text in _TRANSIENT_TEXT):
        return True
    if isinstance(exc, (OSError, TimeoutError, EOFError, asyncio.TimeoutError)):
        return True  # ConnectionResetError, IncompleteRead, s3fs' translated 5xx, ...
    return type(exc).__module__.split(".")[0] in _NETWORK_MODULES


def _is_bad_range(exc: BaseException) -> bool:
    """HTTP 416: the range starts past the object's end (it is shorter than expected)."""
    return _http_status(exc) == 416 or any(t in str(exc) for t in ("not satisfiable", "InvalidRange"))


def _is_missing(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or _http_status(exc) == 404


class ShardCache:
    """Whole shards on local disk, keyed by URL + sha256, least-recently-used eviction.

    Writes go to a unique temporary name and are renamed into place only once the shard
    was read completely (and its checksum matched), so a crash or an early close never
    leaves a partial shard under a final name; several processes may share one folder.

    Args:
        cache_dir: the folder (created).
        max_bytes: keep the cache at most this big by deleting the least recently used
            shards after each new one; None means unbounded.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.dir = os.fspath(cache_dir)
        self.max_bytes = max_bytes
        os.makedirs(self.dir, exist_ok=True)

    @staticmethod
    def key(url: str, sha256: str | None, size: int | None) -> str:
        """Cache key. Without a sha256 the cache trusts the URL (and size, when known)."""
        return hashlib.sha256(f"{url}\0{sha256 or ''}\0{size or ''}".encode()).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}.tar")

    def lookup(self, key: str) -> str | None:
        """Path of a cached shard (marked as just used), or None."""
        path = self.path(key)
        try:  # the LRU clock is the access time: the modification time tells a copy changed
            os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
        except FileNotFoundError:
            return None
        except PermissionError:  # another user's copy in a shared cache: only its owner may
            pass  # set times; the hit stands, unrecorded by the LRU clock
        return path

    def writer(self, key: str, sha256: str | None = None) -> _CacheWriter:
        return _CacheWriter(self, key, sha256)

    def evict(self, *, keep: str | None = None) -> list[str]:
        """Delete least recently used shards until the cache fits ``max_bytes``, and the
        temporary files of writers that stopped (killed readers) whatever the bound."""
        entries, partial_bytes = [], 0
        stale_before = time.time() - STALE_PARTIAL_S
        for entry in os.scandir(self.dir):
            if not entry.is_file() or not entry.name.endswith((".tar", ".partial")):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.endswith(".tar"):
                entries.append((max(st.st_atime, st.st_mtime), entry.path, st.st_size))
            elif st.st_mtime < stale_before:
                _remove_quietly(entry.path)
            else:
                partial_bytes += st.st_size  # being written: counts, is not ours to delete
        if self.max_bytes is None:
            return []
        total = partial_bytes + sum(size for _, _, size in entries)
        removed = []
        for _, path, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if keep is not None and path == self.path(keep):
                continue
            _remove_quietly(path)
            total -= size
            removed.append(path)
        return removed


class _CacheWriter:
    """One stream's copy of a shard into the cache, under a temporary name of its own (two
    streams of one shard, even in one thread, never share it). The cache is only a copy: a
    write or rename that fails (full disk, a folder removed) leaves the shard uncached and
    the read goes on."""

    def __init__(self, cache: ShardCache, key: str, sha256: str | None = None) -> None:
        self.cache = cache
        self.key = key
        self.sha256 = sha256  # the stream compares it before it commits
        self.temp = os.path.join(cache.dir, f".{key}.{uuid.uuid4().hex}.partial")
        # os.open, not mkstemp: the umask decides the mode (0600 would lock a cache folder
        # shared by a group out of every copy but its writer's)
        fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self._file is not None:
            try:
                self._file.write(data)
            except OSError:
                self.abort()

    def commit(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
            self._file = None
            os.replace(self.temp, self.cache.path(self.key))
        except OSError:
            self._file = None
            _remove_quietly(self.temp)
            return
        if self.sha256 is not None:  # just hashed on the way in: no second hash on a hit
            final = self.cache.path(self.key)
            with contextlib.suppress(OSError):
                _remember_verified(_cache_identity(os.stat(final), final, self.sha256), final,
                                   _cache_identity)
        self.cache.evict(keep=self.key)

    def abort(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None
        _remove_quietly(self.temp)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


_EOF = object()


class ShardStream(ForwardStream):
    """A read-only, forward-only byte stream over one remote shard.

    Fetches ``[offset, offset + block_size)`` ranges in order (in a background thread when
    ``readahead``), retrying each failed range at its own offset. Use
    :func:`open_shard_stream` rather than this class.

    Attributes:
        retried: how many requests were retried (for tests and benchmarks).
        requests: how many range requests were made.
    """

    def __init__(
        self,
        url: str,
        fs: Any,
        path: str,
        *,
        expected_size: int | None,
        expected_sha256: str | None,
        retries: int,
        backoff: float,
        readahead: bool,
        block_size: int,
        cache_writer: _CacheWriter | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self._fs = fs
        self._path = path
        self._size = expected_size
        self._sha256 = expected_sha256
        self._retries = max(0, int(retries))
        self._backoff = float(backoff)
        self._block_size = max(1, int(block_size))
        self._cache = cache_writer
        self._jitter = random.Random(url)  # jitter only spreads retries; it decides no data
        self.retried = 0
        self.requests = 0
        self._buf = memoryview(b"")
        self._eof = False
        self._stop = threading.Event()
        self._blocks: Iterator[bytes] | None = None
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        if readahead:
            self._queue = queue.Queue(maxsize=READAHEAD_BLOCKS)
            self._thread = threading.Thread(
                target=self._produce_into_queue, name=f"shard-readahead {url}", daemon=True
            )
            self._thread.start()
        else:
            self._blocks = self._produce()

    # ---- producer: blocks in order, retried at their own offset ---------------------------

    def _retrying(self, what: str, offset: int, fn: Callable[[], Any]) -> Any:
        for attempt in range(self._retries + 1):
            if self._stop.is_set():
                raise ShardReadError("stream closed", shard=self.url, offset=offset)
            try:
                return fn()
            except Exception as exc:
                if _is_missing(exc):
                    raise ShardReadError(
                        "not found: the object does not exist (deleted, or the manifest "
                        "and the shards do not belong together); re-upload the shards",
                        shard=self.url,
                    ) from exc
                if not is_transient(exc) or attempt == self._retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise ShardReadError(
                        f"{what} failed{tries} ({type(exc).__name__}: {exc})",
                        shard=self.url,
                        offset=offset,
                    ) from exc
                self.retried += 1
                delay = min(self._backoff * 2**attempt, MAX_BACKOFF_S)
                self._stop.wait(delay * (0.5 + self._jitter.random() / 2))
        raise AssertionError("unreachable")

    def _produce(self) -> Iterator[bytes]:
        if self._size is None:
            self._size = int(self._retrying("size lookup", 0, lambda: self._fs.size(self._path)))
        size = self._size
        sha = hashlib.sha256() if self._sha256 else None
        pos = 0
        while pos < size and not self._stop.is_set():
            start, end = pos, min(pos + self._block_size, size)
            self.requests += 1
            try:
                data = self._retrying(
                    "read", start, functools.partial(self._fs.cat_file, self._path, start=start, end=end)
                )
            except ShardReadError as exc:
                if exc.__cause__ is None or not _is_bad_range(exc.__cause__):
                    raise
                data = b""  # the object ends before this block: found out and said below
            if len(data) > end - start:
                if len(data) != size:
                    raise ShardReadError(
                        f"asked for bytes {start}-{end} and got {len(data)} bytes; the server "
                        "does not answer range requests correctly",
                        shard=self.url,
                        offset=start,
                    )
                data = data[start:]  # Range ignored, whole object sent: keep the rest at once
            data = bytes(data)
            if len(data) < end - start:
                # A short answer is fine if the object is really this long (the next range
                # starts where it ended); if the object is shorter than expected, say so.
                actual = int(self._retrying("size lookup", pos, functools.partial(self._fs.size, self._path)))
                if actual < size:
                    # the object cannot match its sha256: this block is not handed out (all
                    # of a shard of one block: another shard copied over it was read as it)
                    raise ShardReadError(
                        f"truncated: the object has {actual} bytes, the manifest says {size} "
                        f"(replaced or partly uploaded?); {remedy(self.url)}",
                        shard=self.url,
                        offset=actual,
                    )
                if not data:
                    raise ShardReadError("read returned no data", shard=self.url, offset=pos)
            pos += len(data)
            if sha is not None:
                sha.update(data)
                if pos >= size and sha.hexdigest() != self._sha256:
                    raise checksum_mismatch(self.url, sha.hexdigest(), str(self._sha256))
            if self._cache is not None:
                self._cache.write(data)
            yield data
        if self._cache is not None and pos >= size:
            self._cache.commit()

    def _produce_into_queue(self) -> None:
        assert self._queue is not None
        try:
            for block in self._produce():
                if not self._put(block):
                    return
            self._put(_EOF)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item: Any) -> bool:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # ---- consumer -----------------------------------------------------------------------

    def _next_block(self) -> bool:
        """Load the next block into the buffer; False at the end of the shard."""
        if self._eof:
            return False
        if self._queue is not None:
            item = self._queue.get()
        else:
            assert self._blocks is not None
            item = next(self._blocks, _EOF)
        if item is _EOF:
            self._eof = True
            return False
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        self._buf = memoryview(item)
        return True

    @property
    def verifying(self) -> bool:
        """Whether reading to the end compares a checksum (a plain file does not)."""
        return self._sha256 is not None

    def readinto(self, b: Any) -> int:
        if self._error is not None:
            raise self._error
        target = memoryview(b).cast("B")
        if not self._buf and not self._next_block():
            return 0
        n = min(len(target), len(self._buf))
        target[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        self._check_readable()
        if size is None or size < 0:
            return self.readall()
        buf = self._buf
        if 0 < size <= len(buf):  # the usual read: inside the current block, one copy
            self._buf = buf[size:]
            self._pos += size
            return buf[:size].tobytes()
        parts: list[memoryview] = []
        wanted = size
        while wanted > 0:
            try:
                if not self._buf and not self._next_block():
                    break
            except Exception as exc:
                if not parts:
                    raise
                # the bytes before the failing block are returned; the error is raised by
                # the next read (and every one after it), as a file's short read then EIO
                self._error = exc
                break
            part = self._buf[:wanted]
            self._buf = self._buf[len(part):]
            parts.append(part)
            wanted -= len(part)
        self._pos += size - wanted
        return b"".join(parts)

    def readall(self) -> bytes:
        if self._error is not None:
            raise self._error
        parts = []
        while self._buf or self._next_block():
            parts.append(bytes(self._buf))
            self._pos += len(self._buf)
            self._buf = memoryview(b"")
        return b"".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._cache is not None:
            self._cache.abort()  # no-op once committed
        self._buf = memoryview(b"")
        super().close()


def open_shard_stream(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    retries: int = 5,
    backoff: float = 0.2,
    readahead: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_max_bytes: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> IO[bytes]:
    """Open one shard for a sequential whole-shard read.

    Args:
        url: the shard's path or fsspec URL.
        storage_options: fsspec options (credentials, ``client_kwargs``, ...).
        expected_size: the shard's size from the manifest; saves a HEAD request and
            detects a truncated object.
        expected_sha256: the manifest's checksum; the bytes are verified as they stream.
        retries: retries per request for transient errors (0 disables).
        backoff: first retry delay in seconds; doubled per retry (with jitter), at most
            10 s.
        readahead: fetch the next blocks in a background thread.
        cache_dir: keep whole shards here and read them from here next time.
        cache_max_bytes: bound for ``cache_dir`` (LRU eviction of whole shards).
        block_size: bytes per range request.

    Returns:
        A binary, forward-only file-like object (a context manager). Errors of a remote
        shard surface on the first ``read`` when ``readahead`` is on.

    Raises:
        ShardReadError: the shard is missing (no retries), or still fails after
            ``retries`` retries; the message names the URL and the byte offset.
        ChecksumError: ``expected_sha256`` is given and the bytes do not match.
    """
    url = os.fspath(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **one_retry_layer(url, storage_options))
    except (ImportError, ValueError, TypeError) as exc:
        raise ShardReadError(
            f"cannot open ({exc}); check the URL and storage options (s3:// needs s3fs)",
            shard=url,
        ) from exc
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    cache = None
    if "file" in protocols:  # never copied to the cache: it would only be a second copy
        return _open_local(url, path, expected_sha256, expected_size)
    if cache_dir is not None:
        cache = ShardCache(cache_dir, cache_max_bytes)
        key = ShardCache.key(url, expected_sha256, expected_size)
        if (hit := cache.lookup(key)) is not None and _cached_copy_is_good(hit, expected_sha256):
            try:
                return open(hit, "rb")
            except FileNotFoundError:  # evicted by another reader since: fetch it
                pass
    return ShardStream(  # type: ignore[return-value]  # a readable binary stream
        url,
        fs,
        path,
        expected_size=expected_size,
        expected_sha256=expected_sha256,
        retries=retries,
        backoff=backoff,
        readahead=readahead,
        block_size=block_size,
        cache_writer=cache.writer(key, expected_sha256) if cache is not None else None,
    )


# Local shards whose bytes matched the manifest's sha256 in this process, by (realpath,
# the packer's file stamp: device, inode, size, mtime_ns, ctime_ns; sha256): later epochs
# open them directly instead of hashing 100+ MB again (a tenth of the reader's CPU on 2
# cores). A file written, replaced or touched since has another ctime (which no tool can
# set back) and is verified again.
_LocalIdentity = tuple[str, tuple[int, ...], str]
_VERIFIED_LOCAL: set[_LocalIdentity] = set()
_VERIFIED_LOCAL_MAX = 1_000_000


def _open_local(url: str, path: str, sha256: str | None, size: int | None) -> IO[bytes]:
    """A local shard opened directly when there is nothing to verify or it was verified in
    this process; else read through its hash once (reader.local), and remembered when the
    hash matched."""
    try:
        f = open(path, "rb")
    except FileNotFoundError as exc:
        raise ShardReadError("not found", shard=url) from exc
    except OSError as exc:
        raise ShardReadError(f"cannot open ({exc})", shard=url) from exc
    if sha256 is None:
        return f
    st = os.fstat(f.fileno())
    identity = _local_identity(st, path, sha256)
    if identity in _VERIFIED_LOCAL:
        return f
    return HashedLocalFile(  # type: ignore[return-value]  # a readable binary stream
        f, url, size=st.st_size if size is None else size, sha256=sha256,
        on_verified=functools.partial(_remember_verified, identity, path))


def _cached_copy_is_good(path: str, sha256: str | None) -> bool:
    """Whether a cached shard may be read instead of the remote one.

    Its name comes from the manifest's sha256, but a disk can still rot or a process
    scribble on it: it is hashed once per process (as a local shard is) and, when it no
    longer matches, deleted so the caller fetches the shard again.
    """
    if sha256 is None:
        return True
    from packer.write import hash_file  # here: the reader's start-up needs none of the writer

    try:
        identity = _cache_identity(os.stat(path), path, sha256)
        if identity in _VERIFIED_LOCAL:
            return True
        digest, _size = hash_file(path)
    except FileNotFoundError:  # evicted by another reader meanwhile
        return False
    if digest != sha256:
        _remove_quietly(path)
        return False
    _remember_verified(identity, path, _cache_identity)
    return True


def _local_identity(st: os.stat_result, path: str, sha256: str) -> _LocalIdentity:
    return (os.path.realpath(path), file_stamp(st), sha256)


def _cache_identity(st: os.stat_result, path: str, sha256: str) -> _LocalIdentity:
    """A cached copy's identity: its file and modification time. Every hit sets its access
    time only (the LRU clock), so a copy written in place since it was hashed (a scribbling
    process, a restored backup) has another mtime and is hashed again; its ctime, which
    each hit changes, is left out."""
    return (os.path.realpath(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), sha256)


def _remember_verified(
    identity: _LocalIdentity, path: str,
    identify: Callable[[os.stat_result, str, str], _LocalIdentity] = _local_identity,
) -> None:
    """Called when the hash matched: remember the file if it is still the one hashed."""
    try:
        now = identify(os.stat(path), path, identity[-1])
    except OSError:
        return
    if now != identity:
        return  # changed while it was being read: verify it again next time
    if len(_VERIFIED_LOCAL) >= _VERIFIED_LOCAL_MAX:
        _VERIFIED_LOCAL.clear()
    _VERIFIED_LOCAL.add(identity)


def prefetch_shards(
    urls: Iterable[Any], open_fn: Callable[[Any], IO[bytes]], *, depth: int = 1
) -> Iterator[IO[bytes]]:
    """Yield ``open_fn(url)`` for each url, keeping the next ``depth`` shards already open.

    With read-ahead streams, "open" starts fetching, so the next shard's first blocks
    arrive while the current one is being consumed. The caller closes each yielded stream;
    streams opened ahead but never yielded are closed here.
    """
    pending: collections.deque[IO[bytes]] = collections.deque()
    it = iter(urls)
    try:
        for url in it:
            pending.append(open_fn(url))
            if len(pending) > depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        for stream in pending:
            stream.close()


class OpenAhead:
    """Open an epoch's shard streams one step ahead of the reader.

    An epoch's shard pieces start in order (``shuffle.interleave`` takes them so); when
    piece ``i`` starts, piece ``i + 1`` is opened too, and a remote stream starts fetching
    as it opens (its read-ahead thread), so the next shard's first blocks are there when
    it starts instead of one time-to-first-byte stall per shard. An error of an early open
    is raised when its piece starts, in that piece (and so under its shard's policy). Runs
    on the thread that iterates the epoch; :meth:`close` closes what was never started.
    """

    def __init__(self, open_piece: Callable[[int], IO[bytes]], pieces: int, depth: int = 1) -> None:
        self._open_piece = open_piece
        self._pieces = pieces
        self._depth = depth
        self._opened: dict[int, IO[bytes] | BaseException] = {}

    def open(self, piece: int) -> IO[bytes]:
        """The stream of ``piece``, opened now or earlier; the next ones start opening."""
        for ahead in range(piece + 1, min(piece + 1 + self._depth, self._pieces)):
            if ahead not in self._opened:
                try:
                    self._opened[ahead] = self._open_piece(ahead)
                except Exception as exc:  # its own piece raises it, under its policy
                    self._opened[ahead] = exc
        got = self._opened.pop(piece, None)
        if got is None:
            return self._open_piece(piece)
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self) -> None:
        for got in self._opened.values():
            if not isinstance(got, BaseException):
                got.close()
        self._opened.clear()
