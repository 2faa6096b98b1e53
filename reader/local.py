"""A local shard's first read in a process: straight from the file, hashed beside the reader.

The reader compares each local shard's sha256 with the manifest's the first time a process
reads it (reader.remote.open_shard_stream; later epochs open the file directly). Until
then the file went through the remote reader's 8 MiB blocks: every member was copied out
of a block, and every read ran a Python loop, on the thread that parses the tars and
shares the GIL with every decode thread. Here a read is the file's own: a large one lands
in its own ``bytes`` with the GIL released, and a background thread hashes what was read,
about a megabyte at a time, with the GIL released too.
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

__all__ = ["HashedLocalFile", "checksum_mismatch", "remedy"]

# Bytes handed to the hashing thread at once: few hand-overs (each wakes the thread, whose
# loop takes the GIL), few bytes held (at most _QUEUED + 1 batches wait to be hashed).
_BATCH_BYTES = 1 << 20
_QUEUED = 8


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


class HashedLocalFile(io.RawIOBase):
    """A local shard read front to back while a background thread hashes it.

    Reads stop at the manifest's ``size``. The sha256 is compared when the last byte is
    read: a mismatch raises :class:`ChecksumError` from that read instead of returning its
    bytes (so the last samples are not delivered); a match calls ``on_verified``. A file
    shorter than ``size`` gives its last bytes, then a ``truncated`` error on the next read.
    """

    def __init__(
        self, f: IO[bytes], url: str, *, size: int, sha256: str,
        on_verified: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._f = f
        self.url = url
        self._size = size
        self._sha256 = sha256
        self._on_verified = on_verified
        self._pos = 0
        self._error: Exception | None = None  # raised by every read after a short one
        self._compared = False
        self._hash = hashlib.sha256()
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=_QUEUED)
        self._thread: threading.Thread | None = threading.Thread(
            target=self._hash_batches, name=f"shard-hash {url}", daemon=True)
        self._thread.start()

    @property
    def verifying(self) -> bool:
        """Reading to the end compares a checksum (samples.READ_THE_REST relies on it)."""
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # every byte must pass through the hash

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed shard stream")
        if self._error is not None:
            raise self._error
        left = self._size - self._pos
        n = left if size is None or size < 0 else min(size, left)
        if n <= 0:
            self._compare()
            return b""
        data = self._f.read(n)
        self._pos += len(data)
        if len(data) < n:
            self._error = ShardReadError(
                f"truncated: the file has {self._pos} bytes, the manifest says {self._size} "
                f"(replaced, or still being written?); {remedy(self.url)}",
                shard=self.url,
                offset=self._pos,
            )
            if not data:
                raise self._error
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= _BATCH_BYTES:
            self._hand_over()
        if self._pos >= self._size:
            self._compare()
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(memoryview(b).cast("B")))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if self.closed:
            return
        self._stop_hashing()
        self._f.close()
        super().close()

    def _hash_batches(self) -> None:
        update = self._hash.update
        while (batch := self._queue.get()) is not None:
            for data in batch:
                update(data)

    def _hand_over(self) -> None:
        self._queue.put(self._batch)
        self._batch, self._batch_bytes = [], 0

    def _stop_hashing(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _compare(self) -> None:
        """Hash what is left, wait for the thread, and compare (once)."""
        if self._compared:
            return
        self._compared = True
        self._hand_over()
        self._stop_hashing()
        got = self._hash.hexdigest()
        if got != self._sha256:
            self._error = checksum_mismatch(self.url, got, self._sha256)
            raise self._error
        if self._on_verified is not None:
            self._on_verified()
