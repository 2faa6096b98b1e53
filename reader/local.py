"""A local shard's first read in a process: straight from the file, hashed beside the reader.

The reader compares each local shard's sha256 with the manifest's the first time a process
reads it (reader.remote.open_shard_stream; later epochs open the file directly). Until
then the file went through the remote reader's 8 MiB blocks: every member was copied out
of a block, and every read ran a Python loop, on the thread that parses the tars and
shares the GIL with every decode thread. Here a read is the file's own: a large one lands
in its own ``bytes`` with the GIL released, and a background thread hashes what was read,
about a megabyte at a time, with the GIL released too. The last 8 MiB are held back until
the hash matched, as the remote reader's last block is: a damaged shard under 8 MiB gives
no sample at all.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Callable
from typing import IO, Any

from packer.errors import ChecksumError, ShardReadError
from packer.storage import is_remote

__all__ = ["ForwardStream", "HashedLocalFile", "checksum_mismatch", "remedy"]

# Bytes handed to the hashing thread at once: few hand-overs (each wakes the thread, whose
# loop takes the GIL), few bytes held (at most _QUEUED + 1 batches wait to be hashed).
_BATCH_BYTES = 1 << 20
_QUEUED = 8
# Withheld until the hash matched, as the remote reader withholds its last block.
_TAIL_BYTES = 8 << 20


def remedy(url: str) -> str:
    """What to do about a damaged shard: upload again to object storage, pack again on disk."""
    if is_remote(url):
        return "re-upload it (`shardpack upload` re-sends changed shards)"
    return "pack it again (re-running `shardpack pack` rewrites damaged shards)"


def checksum_mismatch(url: str, got: str, expected: str) -> ChecksumError:
    """The error for a shard whose bytes do not hash to the manifest's sha256."""
    return ChecksumError(
        f"sha256 {got[:16]}... does not match the manifest's {expected[:16]}...: the object "
        f"is corrupted or was replaced; {remedy(url)}",
        shard=url,
    )


class ForwardStream(io.RawIOBase):
    """What the reader's checked shard streams share (this module's and
    ``reader.remote.ShardStream``): read front to back only, never seekable, a position,
    and an error that, once met, every later read raises."""

    _pos = 0  # bytes handed to the consumer
    _error: Exception | None = None  # raised by every read after a short or failed one

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # every byte must pass through the checks

    def tell(self) -> int:
        return self._pos

    def _check_readable(self) -> None:
        """Raise what a read may not go past: the stream closed, or an earlier error."""
        if self.closed:
            raise ValueError("read from a closed shard stream")
        if self._error is not None:
            raise self._error


class HashedLocalFile(ForwardStream):
    """A local shard read front to back while a background thread hashes it.

    Reads stop at the manifest's ``size``. As the remote reader withholds its last block,
    the last ``_TAIL_BYTES`` (the whole of a smaller shard) are read at once and handed out
    only after the sha256 matched: a mismatch raises :class:`ChecksumError` instead, so the
    samples there are never delivered (the reader stops parsing at the end-of-archive
    marker, so without this it would have handed out every sample before the comparison).
    A match calls ``on_verified``. A file shorter than ``size`` cannot match: it raises a
    ``truncated`` error where its tail would begin (what came before, in a shard larger than
    the tail, was handed out as it streamed), so nothing of a smaller shard is delivered:
    another shard's file copied over it gave its samples as this one's.
    """

    def __init__(
        self, f: IO[bytes], url: str, *, size: int, sha256: str,
        on_verified: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._f = f
        self.url = url
        self._size = size
        self._tail_start = max(0, size - _TAIL_BYTES)
        self._tail: memoryview | None = None  # the checked last bytes, once read
        self._sha256 = sha256
        self._on_verified = on_verified
        self._hash = hashlib.sha256()
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=_QUEUED)
        # the thread holds the queue and the hash, not the stream: a stream dropped
        # without close() is collected, and closing it ends the thread
        self._thread: threading.Thread | None = threading.Thread(
            target=_hash_batches, args=(self._queue, self._hash), name=f"shard-hash {url}",
            daemon=True)
        self._thread.start()

    @property
    def verifying(self) -> bool:
        """Reading to the end compares a checksum (samples.READ_THE_REST relies on it)."""
        return True

    def read(self, size: int | None = -1) -> bytes:
        self._check_readable()
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(_TAIL_BYTES), b""))
        if size == 0:
            return b""
        if self._pos >= self._tail_start:
            return self._read_tail(size)
        n = min(size, self._tail_start - self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        if len(data) < n:
            self._error = self._truncated()
            if not data:
                raise self._error
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= _BATCH_BYTES:
            self._hand_over()
        return data

    def readinto(self, b: Any) -> int:
        target = memoryview(b).cast("B")
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if self.closed:
            return
        self._stop_hashing()
        self._f.close()
        super().close()

    def _read_tail(self, size: int) -> bytes:
        """The next bytes of the checked tail (read and checked first, once)."""
        if self._tail is None:
            self._tail = memoryview(self._check_tail())
        part = self._tail[:size]
        self._tail = self._tail[len(part):]
        self._pos += len(part)
        return part.tobytes()

    def _check_tail(self) -> bytes:
        """Read the rest of the shard, wait for the hash, and compare; the rest's bytes once
        they matched."""
        want = self._size - self._pos
        data = self._f.read(want)
        if len(data) < want:  # the file ends early: it cannot match, so none of it goes out
            self._stop_hashing()
            self._error = self._truncated(self._pos + len(data))
            raise self._error
        self._batch.append(data)
        self._hand_over()
        self._stop_hashing()
        got = self._hash.hexdigest()
        if got != self._sha256:
            self._error = checksum_mismatch(self.url, got, self._sha256)
            raise self._error
        if self._on_verified is not None:
            self._on_verified()
        return data

    def _truncated(self, end: int | None = None) -> ShardReadError:
        end = self._pos if end is None else end
        return ShardReadError(
            f"truncated: the file has {end} bytes, the manifest says {self._size} "
            f"(replaced, or still being written?); {remedy(self.url)}",
            shard=self.url,
            offset=end,
        )

    def _hand_over(self) -> None:
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def _stop_hashing(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


def _hash_batches(batches: queue.Queue[list[bytes] | None], digest: Any) -> None:
    """The hashing thread: ``digest.update`` each batch's bytes in order (the GIL is
    released for all but the smallest), until None."""
    update = digest.update
    while (batch := batches.get()) is not None:
        for data in batch:
            update(data)
