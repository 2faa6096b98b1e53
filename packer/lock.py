"""One pack at a time into an OUT folder: an exclusive lock on ``OUT/.shardpack.lock``.

Two packs into one OUT both exited 0, and the manifest the last one published did not
match the shards the other had rewritten meanwhile. The lock is ``flock``, not a file's
mere presence: the operating system drops it when its process dies, however it dies, so
a killed pack never leaves a stale lock that the next run must be told to break. The file
holds the holder's pid (for the refusal's message) and is removed when the pack ends.
Windows has no ``fcntl``: there packs are not locked.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from .errors import OutputLockedError, PackError
from .write import _os_error_message

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "out_lock", "hold", "release", "held_by_another"]

log = logging.getLogger("shardpack")

LOCK_NAME = ".shardpack.lock"
_TRIES = 20  # a holder that ends between our open and our flock removes the file: try again
_HELD: set[int] = set()  # the lock descriptors this process holds


def _close_held_in_child() -> None:
    """A forked child (a pack's worker process) gets copies of the parent's descriptors, and
    an flock belongs to the open file, not the process: a worker outliving its killed
    parent kept OUT locked, and every re-run was refused. Children close their copies."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def hold(path: str) -> int | None:
    """Create ``path`` and hold an exclusive lock on it; None where that is not possible
    (another process holds it, no fcntl, a file system without locks)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    _HELD.add(fd)
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        _HELD.discard(fd)
        os.close(fd)


def held_by_another(path: str) -> bool:
    """Whether a live process (of any PID namespace on this machine) holds ``path``'s lock;
    False for a missing file, or where locks cannot be asked."""
    if fcntl is None or not os.path.exists(path):
        return False
    fd = hold(path)
    if fd is None:
        return True
    release(fd)
    return False


@contextlib.contextmanager
def out_lock(out_dir: str) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the ``with`` block, creating ``out_dir`` if need be (and
    removing it again if it is still empty at the end: a refused pack leaves nothing).

    Raises:
        OutputLockedError: another process holds the lock (refused at once, never waited on).
        PackError: ``out_dir`` cannot be created or written.
    """
    created = not os.path.lexists(out_dir)
    fd = _acquire(out_dir)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):  # removed while held: no one can take it meanwhile
                os.remove(os.path.join(out_dir, LOCK_NAME))
            release(fd)
        if created:
            with contextlib.suppress(OSError):  # only if empty
                os.rmdir(out_dir)


def _acquire(out_dir: str) -> int | None:
    """Open and lock the lock file; return its descriptor (None where locks are unknown)."""
    path = os.path.join(out_dir, LOCK_NAME)
    for _ in range(_TRIES):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise PackError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from exc
        if fcntl is None:
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError as exc:
            if not os.path.isdir(out_dir):
                continue  # OUT was removed meanwhile (an ending pack that had created it)
            raise PackError(_os_error_message(exc, path)) from exc  # /proc/self: no files there
        except OSError as exc:
            raise PackError(_os_error_message(exc, path)) from exc
        if not _lock(fd, path):
            return fd
        if _still_named(fd, path):
            _write_pid(fd)
            _HELD.add(fd)
            return fd
        os.close(fd)  # we locked a file its holder removed as it ended: lock the new one
    raise PackError(f"cannot lock {path}: it keeps being replaced; is another program removing it?")


def _lock(fd: int, path: str) -> bool:
    """Take the lock without waiting; False when the file system has no locks (a warning,
    and the pack goes on unlocked, as before).

    Raises:
        OutputLockedError: another process holds it.
    """
    assert fcntl is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        raise OutputLockedError(os.path.dirname(path), holder) from exc
    except OSError as exc:  # ENOLCK, EOPNOTSUPP: some network file systems
        log.warning("cannot lock %s (%s): not guarded against a second pack into it", path,
                    exc.strerror or exc)
        return False
    return True


def _still_named(fd: int, path: str) -> bool:
    try:
        st, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (named.st_dev, named.st_ino)


def _write_pid(fd: int) -> None:
    with contextlib.suppress(OSError):  # the pid is only for the message
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
