"""Resume and overwrite rules for an output folder that already holds something.

* A leftover shard is kept only if it is byte-identical to what the plan would write now:
  its fingerprint (hash of the inputs' content and every byte-deciding option) and sha256
  were recorded in the journal or a previous manifest, and the file on disk still hashes
  to that sha256. Anything else is rewritten.
* Shards the plan no longer names, and ``.partial`` leftovers, are removed before the
  manifest is published: only files that are shardpack's (``remove_stale``), never a
  user's file that merely looks like a shard.
* An OUT made with different options is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from .errors import OutputExistsError, PackError
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    JOURNAL_NAME,
    MANIFEST_NAME,
    is_shard_name,
    sample_key,
    shard_entries,
)
from .lock import LOCK_NAME
from .plan import TAR_BLOCK
from .spool import SPOOL_NAME
from .write import ShardResult, hash_file, ustar_header, write_atomically

__all__ = ["JOURNAL_NAME", "Journal", "check_output", "previous_results", "keepable", "read_manifest",
           "remove_stale", "refuse_other_format_version", "written_by_shardpack"]

JOURNAL_TEMP_NAME = f"{JOURNAL_NAME}.partial"


def _read_json_lines(path: str) -> list[dict[str, Any]]:
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:  # a torn last line after a crash
                    break
    except OSError:
        pass
    return records


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    """OUT's manifest as a dict; None when there is none or it is not valid JSON."""
    try:
        with open(os.path.join(out_dir, MANIFEST_NAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_output(out_dir: str, options: dict[str, Any], *, overwrite: bool) -> None:
    """Refuse an OUT that holds a pack made with other options, or foreign files.

    Raises:
        OutputExistsError: unless ``overwrite``; the message says what differs.
    """
    if overwrite or not os.path.isdir(out_dir):
        return
    ours = (".shardpack-workers-check", SPOOL_NAME, JOURNAL_TEMP_NAME, LOCK_NAME)
    if not [name for name in os.listdir(out_dir) if name not in ours]:
        return
    manifest = read_manifest(out_dir)
    refuse_other_format_version(out_dir, manifest)
    journal = _read_json_lines(os.path.join(out_dir, JOURNAL_NAME))
    previous = ((manifest if isinstance(manifest, dict) else {}).get("options")
                or (journal[0].get("options") if journal and isinstance(journal[0], dict) else None))
    if previous is None and os.path.exists(os.path.join(out_dir, JOURNAL_NAME)):
        return  # an empty or torn journal (an older version killed as it began): ours
    if previous is None and os.path.exists(os.path.join(out_dir, MANIFEST_NAME)) and manifest is None:
        raise OutputExistsError(
            f"{os.path.join(out_dir, MANIFEST_NAME)} is unreadable (not valid JSON: damaged, or "
            "cut short), so the shards beside it cannot be checked for a resume; pass "
            "--overwrite to pack OUT again from scratch, or choose another OUT"
        )
    if previous is None:
        raise OutputExistsError(
            f"{out_dir} is not empty and holds no shardpack output; choose an empty folder "
            "or pass --overwrite to replace its shards"
        )
    if previous != options:
        changed = changed_options(previous, options)
        raise OutputExistsError(
            f"{out_dir} holds a pack made with different options ({', '.join(changed)}); "
            "pass --overwrite to replace it, or choose another OUT"
        )


def changed_options(previous: Any, options: dict[str, Any]) -> list[str]:
    """The options in which a pack's recorded ``previous`` ones differ from ``options``;
    all of them where ``previous`` is no object (a hand edit: it crashed the comparison)."""
    if not isinstance(previous, dict):
        return sorted(options)
    return sorted(k for k in set(previous) | set(options) if previous.get(k) != options.get(k))


def refuse_other_format_version(out_dir: str, manifest: Any) -> None:
    """A shardpack manifest of a format version this code does not write (a newer
    shardpack's) must not be replaced silently by one of this version: readers of the newer
    format would lose what it added. Raises OutputExistsError naming the version."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        return
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise OutputExistsError(
            f"{out_dir} holds a shardpack pack of format version {version!r}; this shardpack "
            f"writes version {FORMAT_VERSION} and would replace it. Pack with the shardpack that "
            f"made it, pass --overwrite to replace it with version {FORMAT_VERSION}, or choose "
            "another OUT"
        )


def previous_results(out_dir: str) -> dict[str, dict[str, Any]]:
    """Shard records from an earlier run: the journal (crashed run) and the manifest."""
    records: dict[str, dict[str, Any]] = {}
    for entry in shard_entries(read_manifest(out_dir)):
        records[entry["name"]] = entry
    for entry in _read_json_lines(os.path.join(out_dir, JOURNAL_NAME))[1:]:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):  # a torn or foreign line: no hint
            records[entry["name"]] = entry
    return records


def keepable(out_dir: str, name: str, fingerprint: str, record: dict[str, Any] | None) -> ShardResult | None:
    """Return the kept shard's result if the file on disk is exactly what the plan wants."""
    if not record or record.get("fingerprint") != fingerprint:
        return None
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        return None
    sha, size = hash_file(path)
    if sha != record.get("sha256") or size != record.get("bytes"):
        return None
    return ShardResult(name, int(record["count"]), size, sha, fingerprint)


class Journal:
    """Append-only record of finished shards, so a crashed run can resume.

    The first line holds the options and is fsynced (without it a later run would not
    recognise OUT as a resumable pack); each later line one finished shard. Those are
    flushed one by one, so a killed run loses none (a torn last line is ignored), but not
    fsynced: every shard file is re-hashed before it is kept, so a line lost or a shard
    left unwritten by a power cut only means that shard is written again. (An fsync per
    line also waited for the shard data ext4 orders before it: a tenth of pack time.)
    ``durable=False`` (``pack(fsync=False)``) leaves the header to the kernel too.
    """

    def __init__(
        self, out_dir: str, options: dict[str, Any], *, durable: bool = True,
        carried: Iterable[dict[str, Any]] = (),
    ) -> None:
        """Start a journal: the options line and the ``carried`` records (from an earlier
        run's manifest and journal) are written to a temporary file and renamed into place,
        so a run killed meanwhile leaves the earlier journal or this whole one, never an
        empty or headless one that would make OUT look foreign to the next run."""
        self.path = os.path.join(out_dir, JOURNAL_NAME)
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in ({"options": options}, *carried))
        write_atomically(self.path, os.path.join(out_dir, JOURNAL_TEMP_NAME), lines.encode("utf-8"),
                         durable=durable)
        self._file = open(self.path, "a", encoding="utf-8")

    def _append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def record(self, result: ShardResult) -> None:
        self._append(result.manifest_entry())

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def discard(out_dir: str) -> None:
        """Remove the journal once the manifest records every shard."""
        try:
            os.remove(os.path.join(out_dir, JOURNAL_NAME))
        except FileNotFoundError:
            pass


def remove_stale(out_dir: str, keep: set[str], *, known: Iterable[str] = ()) -> list[str]:
    """Delete shardpack's shard files that the plan does not name; return them.

    Only files that are ours go: a ``{split}/{split}-NNNNNN.tar`` that an earlier manifest
    or journal of this OUT named (``known``) or whose first tar header is exactly one
    shardpack writes (fixed mode, owner, mtime, a sample key of that split), and
    ``.{split}-NNNNNN.tar.partial`` leftovers. A user's ``archive/x-000001.tar`` or a plain
    tar at a shard's name stays (any file of that shape in any folder used to be deleted),
    and only split folders that this removal emptied are removed (an empty ``logs/`` used
    to go too).
    """
    known = set(known)
    removed = []
    for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False):
            if entry.name == f".{MANIFEST_NAME}.partial":
                os.remove(entry.path)
            continue
        emptied = False
        for child in sorted(os.scandir(entry.path), key=lambda e: e.name):
            rel = f"{entry.name}/{child.name}"
            if rel in keep or not child.is_file(follow_symlinks=False):
                continue
            if _is_partial_shard(rel) or (is_shard_name(rel) and (
                    rel in known or written_by_shardpack(child.path, entry.name))):
                os.remove(child.path)
                removed.append(rel)
                emptied = True
        if emptied and not os.listdir(entry.path):
            os.rmdir(entry.path)
    return removed


def _is_partial_shard(rel: str) -> bool:
    """``split/.split-NNNNNN.tar.partial``: a shard a stopped run was writing."""
    folder, _, name = rel.partition("/")
    return name.startswith(".") and name.endswith(".partial") and is_shard_name(
        f"{folder}/{name[1:].removesuffix('.partial')}")


def written_by_shardpack(path: str, split: str) -> bool:
    """Whether the file starts with the tar header shardpack's writer gives the first
    member of a ``split`` shard: byte for byte ``ustar_header`` of its own name and size,
    so mode 0644, uid/gid 0, empty user and group names, mtime 0, USTAR magic, and a name
    that is one of ``split``'s sample keys. ``tar cf`` never writes that (it records the
    user and the time), so a user's tar is never taken for a leftover shard."""
    try:
        with open(path, "rb") as f:
            head = f.read(TAR_BLOCK)
    except OSError:
        return False
    if len(head) < TAR_BLOCK or not head.startswith(sample_key(split, 0)[:-9].encode()):
        return False
    try:
        name = head[:100].rstrip(b"\0").decode("ascii")
        size = int(head[124:136].rstrip(b"\0 ") or b"0", 8)
        return head == ustar_header(name, size)
    except (ValueError, PackError):
        return False
