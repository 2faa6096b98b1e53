"""The resize spool: images re-encoded by ``--resize`` kept from the probe for the writer.

With ``--resize`` the plan needs each image's stored size, so the probe must decode, resize
and re-encode it; the writer used to do all of that again (Pillow's LANCZOS resize alone is
~5 ms per ImageNet-sized image here, so a resize pack cost twice that per image). The probe
now leaves the re-encoded bytes in ``OUT/.shardpack-spool/`` under their content digest
(packer.digest), and the writer takes them from there after checking it, falling back to
re-encoding when an entry is missing or damaged. The spool is removed when the shards are
written; a run that stops early leaves it for the next run, which may reuse what it holds
(entries are checked by digest, so a stale one is never used). The writer removes each
entry as it takes it, so the spool shrinks as the shards grow: at no point does a pack hold
much more than one output's worth of bytes in OUT, as without the spool.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from .digest import content_digest

__all__ = ["SPOOL_NAME", "spool_path", "put", "take", "remove"]

SPOOL_NAME = ".shardpack-spool"


def spool_path(out_dir: str) -> str:
    return os.path.join(out_dir, SPOOL_NAME)


def _entry(spool: str, digest: str, ext: str) -> str:
    return os.path.join(spool, digest[:2], f"{digest}.{ext}")


def put(spool: str, data: bytes, digest: str, ext: str) -> None:
    """Keep ``data`` for the writer; a spool that cannot be written is only a lost shortcut."""
    path = _entry(spool, digest, ext)
    if os.path.exists(path):
        return  # the same bytes (a duplicate image) are already there
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temp)


def take(spool: str, digest: str, ext: str) -> bytes | None:
    """The spooled bytes with this digest (the entry is removed: each is used once), or None
    when they are not there intact."""
    path = _entry(spool, digest, ext)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if content_digest(data) != digest:
        return None
    with contextlib.suppress(OSError):
        os.remove(path)  # a duplicate image later in the plan re-encodes instead
    return data


def discard(spool: str, digest: str, ext: str) -> None:
    """Remove an entry no shard will take (its shard is kept from an earlier run): a
    resumed pack re-encodes every image in its probe, and the kept shards' entries held the
    spool at their size until the end, so a re-run after a full disk filled it again."""
    with contextlib.suppress(OSError):
        os.remove(_entry(spool, digest, ext))


def remove(spool: str) -> None:
    shutil.rmtree(spool, ignore_errors=True)
