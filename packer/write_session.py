"""Writing a plan's shards into OUT: what is kept from an earlier run, what is written, the
journal, the background fsyncs and the progress bars.

Shards arrive one by one (``add``), from a whole plan or from a planner that cuts them
while files are still being probed; written ones come back through ``done``. OUT is left
as it was until the first shard must be written. ``close`` waits for every fsync, so a
manifest published afterwards never names data still in the page cache, and removes shard
files the plan no longer names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .errors import PackError
from .format import MANIFEST_NAME, shard_entries
from .plan import PlannedShard
from .progress import Progress as tqdm
from .resume import Journal, keepable, previous_results, read_manifest, remove_stale
from .spool import discard as spool_discard
from .transform import ResizeSpec
from .write import ShardResult, _os_error_message, fsync_file, write_shard

__all__ = ["WriteSession", "WriteTask", "write_task", "os_errors_as_pack_error"]

log = logging.getLogger("shardpack")

# (shard, out_dir, fingerprint, resize, fsync in the writer, write-behind, spool)
WriteTask = tuple[PlannedShard, str, str, "ResizeSpec | None", bool, bool, "str | None"]


def write_task(task: WriteTask) -> ShardResult:
    """Write one shard (runs in a worker process)."""
    shard, out_dir, fingerprint, resize, sync_here, write_behind, spool = task
    # unless synced here, fsynced by the session's background thread while the next is written
    return write_shard(shard, out_dir, fingerprint=fingerprint, resize=resize, durable=sync_here,
                       write_behind=write_behind, spool=spool)


class WriteSession:
    """One pack job's shard writing into ``out_dir`` (a context manager).

    ``durable``: every shard (kept or written) is fsynced before ``close`` returns, on
    background threads that overlap the writing of later shards; ``sync_in_writer``: the
    writer does it (Dask workers may be other machines, whose caches an fsync here would
    not flush). ``expected``: a split's sample count so far (for its progress bar);
    ``bar_offset``: progress bars of others shown above this session's.
    """

    def __init__(
        self, out_dir: str, options: dict[str, Any], *, resize: ResizeSpec | None, quiet: bool,
        durable: bool = True, sync_in_writer: bool = False, spool: str | None = None,
        expected: Callable[[str], int] | None = None, bar_offset: int = 0,
    ) -> None:
        self.out_dir, self.options, self.resize, self.spool = out_dir, options, resize, spool
        self.durable, self.sync_in_writer, self.quiet = durable, sync_in_writer, quiet
        self.results: dict[str, ShardResult] = {}
        self._expected = expected
        self._bar_offset = bar_offset  # lines taken by other bars shown meanwhile
        self._bars: dict[str, Any] = {}
        self._started = time.perf_counter()
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise PackError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from exc
        self._previous = previous_results(out_dir)
        self._journal: Journal | None = None  # opened before the first change to OUT
        self._written_bytes: dict[str, int] = {}
        self._syncer = ThreadPoolExecutor(2, thread_name_prefix="shardpack-fsync")
        self._syncing: list[Future[None]] = []

    def __enter__(self) -> WriteSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._syncer.shutdown(wait=True)
        for bar in self._bars.values():
            bar.close()
        if self._journal is not None:
            try:
                with os_errors_as_pack_error(self._journal.path):
                    self._journal.close()  # flushes a line a full disk refused once more
            except PackError:
                if exc_type is None:
                    raise  # else the error on its way out already says what went wrong

    def add(self, shard: PlannedShard) -> WriteTask | None:
        """Keep ``shard`` from an earlier run if it is byte-identical to the plan's, else
        return the task that writes it."""
        fingerprint = shard.fingerprint(self.options)
        kept = keepable(self.out_dir, shard.name, fingerprint, self._previous.get(shard.name))
        if kept is None:
            self._open()
            return (shard, self.out_dir, fingerprint, self.resize,
                    self.durable and self.sync_in_writer, self.durable, self.spool)
        if self.durable:  # kept from an earlier run, which may not have synced it
            self._sync(kept.name)
        if self.spool is not None and self.resize is not None:
            for sample in shard.samples:  # re-encoded by this run's probe for nothing
                spool_discard(self.spool, sample.digest, sample.ext)
        self._record(kept, shard.split)
        return None

    def done(self, task: WriteTask, result: ShardResult) -> None:
        """Record a written shard: results, journal, progress, fsync."""
        if self.durable and not self.sync_in_writer:
            self._sync(result.name)
        self._record(result, task[0].split)

    def close(self) -> dict[str, ShardResult]:
        """Wait until every shard is on disk; remove shard files the plan does not name."""
        for future in self._syncing:
            future.result()
        if not self._manifest_still_true():
            self._open()  # the old manifest names shards that are about to be removed
        known = set(self._previous)
        removed = remove_stale(self.out_dir, keep=set(self.results), known=known)
        _report_removed(removed, known)
        return self.results

    def _manifest_still_true(self) -> bool:
        """Whether OUT's published manifest names only shards this run keeps, byte for byte
        (a re-run that changed nothing): then it stays up until the new one replaces it,
        as ``_open`` promises, instead of leaving a reader none meanwhile (or for good, if
        the re-run is stopped before its manifest is written)."""
        if self._journal is not None:
            return False  # taken down already
        manifest = read_manifest(self.out_dir)
        if manifest is None:
            return False
        for entry in shard_entries(manifest):
            kept = self.results.get(entry["name"])
            if kept is None or (kept.sha256, kept.bytes) != (entry.get("sha256"), entry.get("bytes")):
                return False
        return True

    def _open(self) -> None:
        """Before OUT changes: take the old manifest down and start a new journal.

        Not earlier: while files are still being checked, a published output stays
        published, and an interrupted re-run leaves it as it was. The new journal starts
        with every record the old manifest and journal held (hints only: a shard is kept
        only if its fingerprint, size and sha256 still match), so a run stopped midway
        loses none of them.
        """
        if self._journal is not None:
            return
        with os_errors_as_pack_error(self.out_dir):  # first the journal: then OUT is ours
            carried = [*self._previous.values(),  # and those kept before it was opened:
                       *(result.manifest_entry() for result in self.results.values())]
            self._journal = Journal(self.out_dir, self.options, durable=self.durable, carried=carried)
        _unpublish_manifest(self.out_dir)

    def _sync(self, name: str) -> None:
        self._syncing.append(self._syncer.submit(fsync_file, os.path.join(self.out_dir, name)))

    def _record(self, result: ShardResult, split: str) -> None:
        self.results[result.name] = result
        if self._journal is not None:
            with os_errors_as_pack_error(self._journal.path):
                self._journal.record(result)
        bar = self._bar(split)
        if self._expected is not None:
            bar.total = self._expected(split)
        bar.update(result.count)
        seconds = max(time.perf_counter() - self._started, 1e-9)
        written = self._written_bytes[split] = self._written_bytes.get(split, 0) + result.bytes
        bar.set_postfix_str(f"{written / seconds / 1e6:.1f} MB/s, {written / 1e6:.0f} MB")

    def _bar(self, split: str) -> Any:
        if split not in self._bars:
            total = self._expected(split) if self._expected is not None else None
            self._bars[split] = tqdm(
                total=total, unit="img", desc=f"writing {split}", position=self._bar_offset + len(self._bars),
                disable=True if self.quiet else None, leave=True,
            )
        return self._bars[split]


@contextlib.contextmanager
def os_errors_as_pack_error(path: str) -> Iterator[None]:
    """Disk full or unwritable OUT outside the shard writer: a PackError saying so."""
    try:
        yield
    except OSError as exc:
        raise PackError(_os_error_message(exc, path)) from exc


def _report_removed(removed: list[str], known: set[str]) -> None:
    """One log line for the shard files an earlier run of this OUT recorded (expected after
    fewer shards or other options), a warning for those found by their tar headers only
    (shards copied in by hand, or of a run whose records are lost): deleting files is never
    silent."""
    for level, names, what in (
        (logging.INFO, [n for n in removed if n in known], "of the earlier pack"),
        (logging.WARNING, [n for n in removed if n not in known],
         "that shardpack wrote (by their tar headers) but this OUT's records did not name"),
    ):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            log.log(level, "removed %d shard files %s that this plan does not name: %s%s",
                    len(names), what, ", ".join(names[:5]), more)


def _unpublish_manifest(out_dir: str) -> None:
    """Take an old manifest down before shards change under it: a reader must never see a
    manifest whose shards are being rewritten."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, MANIFEST_NAME))
