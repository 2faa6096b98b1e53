"""Upload a shard folder to object storage: shards in parallel, the manifest last.

``upload(OUT, URL)`` sends every shard that ``OUT/manifest.json`` lists, through fsspec (any
URL fsspec knows: ``s3://``, ``gs://``, ``memory://``, ``file://``, a local path), then the
manifest. A reader therefore either finds no manifest or one whose shards are all there.

Re-running is cheap and safe:

* Each local shard is hashed and checked against the manifest's sha256 before it is sent,
  so a shard corrupted on local disk is never uploaded.
* A shard already at the destination is skipped only if its sha256 equals the manifest's.
  On S3 the sha256 travels as object metadata (``x-amz-meta-sha256``), read back with one
  HEAD request. On stores without user metadata (``file://``, ``memory://``, ...) the
  remote copy is re-hashed when its size matches (size alone never decides: tar sizes are
  rounded to 10,240-byte records, so different shards often have equal sizes).
* Before the first shard is replaced, a remote manifest that differs from the local one is
  taken down, so no reader sees an old manifest over new shards.

Credentials come from the store's usual chain (environment, config files, instance role);
they are never printed or logged, and error messages are scrubbed of secrets.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.callbacks import Callback

from .errors import ManifestError, UploadError
from .format import (
    MANIFEST_NAME,
    REPLACED_NAME,
    TAKEN_DOWN,
    is_shard_name,
    is_taken_down,
    named_shards,
    parse_manifest,
)
from .progress import Progress as tqdm
from .storage import is_url, refuse_mistyped_url, storage_options_for
from .write import hash_file, hash_stream

__all__ = ["upload", "send_shards", "ShardFile", "RemoteStore", "SHA256_METADATA_KEY", "scrub_secrets"]

log = logging.getLogger("shardpack")

# S3 user metadata key (sent as the header ``x-amz-meta-sha256``; S3 lower-cases keys).
SHA256_METADATA_KEY = "sha256"
# storage_options / environment entries whose values must never reach a message or a log.
_SECRET_OPTION_NAMES = frozenset(
    {"secret", "key", "token", "password", "aws_secret_access_key", "aws_session_token",
     "session_token", "secret_access_key", "access_key_id", "aws_access_key_id"}
)
_SECRET_ENV_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_HASH_CHUNK = 8 << 20


def scrub_secrets(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """Replace every credential value we know of in ``text`` with ``***``.

    Library error messages do not normally contain secrets, but a message that echoes a
    request or a config can; this is the last line of defence before anything is shown.
    """
    secrets: set[str] = set()

    def collect(options: Any) -> None:
        if isinstance(options, dict):
            for name, value in options.items():
                if isinstance(value, dict):
                    collect(value)
                elif isinstance(value, str) and name.lower() in _SECRET_OPTION_NAMES:
                    secrets.add(value)

    collect(storage_options or {})
    secrets.update(v for v in (os.environ.get(n) for n in _SECRET_ENV_NAMES) if v)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class RemoteStore:
    """One destination root (a URL) and what we need of it: paths, sha256 lookups, puts.

    Args:
        url: the destination root, e.g. ``s3://bucket/prefix``.
        storage_options: fsspec options (credentials, ``client_kwargs``, ...).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") if "://" in url else url
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/")
        protocols = _protocols(self.fs)
        self.has_metadata = any(p in ("s3", "s3a") for p in protocols)
        self.is_local = "file" in protocols or "local" in protocols
        self.unreadable: set[str] = set()  # names read_bytes was denied (absent, or not ours to read)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    def display(self, name: str) -> str:
        """The full URL of ``name``, for messages."""
        return f"{self.url.rstrip('/')}/{name}"

    def remote_sha256(self, name: str, *, local_size: int) -> str | None:
        """sha256 of the object at ``name``, or None if absent or unknown.

        S3: the ``sha256`` user metadata written by :meth:`put`. Other stores: the remote
        bytes are re-hashed, but only when the size matches (a different size proves a
        different shard; an equal size proves nothing).
        """
        if self.has_metadata:
            return (self.remote_metadata(name) or {}).get(SHA256_METADATA_KEY)
        path = self.path(name)
        try:
            if self.fs.size(path) != local_size:
                return None
        except FileNotFoundError:
            return None
        with self.fs.open(path, "rb", block_size=_HASH_CHUNK) as f:
            return hash_stream(f, _HASH_CHUNK)[0]

    def remote_metadata(self, name: str) -> dict[str, str] | None:
        """User metadata of the object at ``name`` (None if absent, unsupported or not
        ours to see: without ``s3:ListBucket`` S3 answers a missing key with 403, which a
        prefix-scoped upload role meets for every shard not sent yet; the shard is sent)."""
        if not self.has_metadata:
            return None
        try:
            return dict(self.fs.metadata(self.path(name)))
        except (FileNotFoundError, PermissionError):
            return None

    def put(
        self, local_path: str, name: str, *, sha256: str, callback: Callback | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Send one local file to ``name``, recording its sha256 (and ``metadata``) where
        the store keeps user metadata."""
        path = self.path(name)
        kwargs: dict[str, Any] = {}
        if self.has_metadata:
            kwargs["Metadata"] = {**(metadata or {}), SHA256_METADATA_KEY: sha256}
            kwargs["ContentType"] = "application/x-tar"
        if self.is_local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        if callback is not None:
            kwargs["callback"] = callback
        self.fs.put_file(local_path, path, **kwargs)

    def record_fingerprint(self, name: str, metadata: dict[str, str], fingerprint: str) -> None:
        """Make the object at ``name``, whose user ``metadata`` is given, carry
        ``fingerprint``: an S3 copy onto itself with the new metadata, server-side.

        A shard whose bytes are already there is not sent again; without this, one whose
        plan fingerprint changed while its bytes did not (a new shardpack version) would
        keep the old fingerprint, and every later pack to the URL would pack it again to
        find it identical. The copy is what a new upload of the shard would be: the same
        ``s3_additional_kwargs`` (ACL, storage class) apply, an ACL or storage class set on
        the object since is not kept, and a versioned bucket keeps the old version. A store
        that refuses only costs a later pack that repacking: the upload goes on.
        """
        if not self.has_metadata:
            return
        path = self.path(name)
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3(
                "copy_object", CopySource={"Bucket": bucket, "Key": key}, Bucket=bucket, Key=key,
                Metadata={**metadata, "fingerprint": fingerprint},
                MetadataDirective="REPLACE", ContentType="application/x-tar",
            )
        except Exception as exc:  # any refusal: see the docstring
            log.warning("could not record the new fingerprint of %s (%s): a later pack to "
                        "this URL packs it again to find it unchanged", self.display(name), exc)
        finally:
            self.fs.invalidate_cache(path)

    def require_bucket(self) -> None:
        """S3: the URL's bucket must exist. (Reading the manifest says only "not found" for a
        missing bucket as for a missing manifest, and a pack would find out after probing.)
        Only a definite "no such bucket" refuses: without the right to ask (a policy scoped
        to a prefix), the writes will tell.

        Raises:
            FileNotFoundError: naming the bucket.
        """
        bucket = self.root.split("/", 1)[0]
        if not self.has_metadata or not bucket:
            return
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise FileNotFoundError(f"bucket {bucket!r} does not exist (create it first)") from None
        except Exception as exc:  # no permission to ask, or the store does not answer it
            log.debug("cannot check bucket %s: %s", bucket, exc)

    def stray_shards(self, named: set[str]) -> set[str]:
        """Shards a stopped pack left under the URL that no manifest names (``named``): shaped
        like shardpack shards (``{split}/{split}-NNNNNN.tar``) and carrying the metadata
        shardpack writes with each shard (S3: ``fingerprint``). Anything else, someone's
        ``backups/backups-000001.tar`` too, is not the pack's to remove."""
        if not self.has_metadata or not self.root:
            return set()
        prefix = f"{self.root}/"
        try:  # one level of folders: not the whole bucket under a bare s3://bucket
            found = self.fs.glob(f"{prefix}*/*.tar")
            names = {path[len(prefix):] for path in found if path.startswith(prefix)}
            candidates = sorted(n for n in names - named if is_shard_name(n))
            return {n for n in candidates if "fingerprint" in (self.remote_metadata(n) or {})}
        except Exception as exc:  # no right to list (a prefix-scoped policy): leave them
            log.warning("cannot list %s for shards a stopped run left (%s); any stay there",
                        self.url, exc)
            return set()

    def read_bytes(self, name: str) -> bytes | None:
        """The object at ``name``; None when it is absent, or when the store will not say
        (a 403: S3 gives one for a missing key to a role without ``s3:ListBucket``, and
        s3fs turns a missing key into a listing that such a role may not make; such names
        are kept in ``unreadable``). Callers treat an unreadable manifest as one that may
        be there: ``take_down_manifest`` deletes it before shards change, and a pack to a
        URL asks for ``overwrite``."""
        try:
            data = self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            log.warning("cannot read %s (%s): absent, or not readable with these rights",
                        self.display(name), exc)
            self.unreadable.add(name)
            return None
        return None if is_taken_down(data) else data  # a stand-in is no manifest

    def take_down_manifest(self, manifest: bytes | None) -> bool:
        """Before shards change: set the published ``manifest`` aside (``set_manifest_aside``);
        one that could not be read is deleted (readers must not meet an old manifest over
        new shards; a delete of a missing key is no error). Returns whether it took one down."""
        if manifest is not None:
            self.set_manifest_aside(manifest)
            return True
        if MANIFEST_NAME not in self.unreadable:
            return False
        self.take_down(MANIFEST_NAME)
        return True

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def remove_stale_shards(self, names: list[str]) -> int:
        """Delete shards the new manifest no longer names; return how many went. Deletes
        the store denies (a role without ``s3:DeleteObject``) leave those shards there,
        with one warning: no reader reads them, as readers read the shards the manifest
        names, and the manifest is still published."""
        kept: list[str] = []
        for name in names:
            try:
                self.remove(name)
            except PermissionError as exc:
                kept.append(name)
                denied = exc
        if kept:
            log.warning("cannot delete %d remote shards the new manifest no longer names (%s; no "
                        "s3:DeleteObject?), %s first: they stay there, read by no reader (readers "
                        "read the shards the manifest names)", len(kept), denied, self.display(kept[0]))
        if len(names) > len(kept):
            log.info("removed %d remote shards the new manifest no longer names", len(names) - len(kept))
        return len(names) - len(kept)

    def remove_replaced_manifest(self) -> None:
        """Delete the copy ``set_manifest_aside`` kept, once the new manifest is up. A denied
        delete (a role without ``s3:DeleteObject``) is only noted: S3 denies the delete of a
        missing key too, and a copy left there is read by no reader."""
        try:
            self.remove(REPLACED_NAME)
        except PermissionError as exc:
            log.info("cannot delete %s (%s; no s3:DeleteObject?): any copy of an old manifest "
                     "stays there, read by no reader", self.display(REPLACED_NAME), exc)

    def set_manifest_aside(self, manifest: bytes) -> None:
        """Take the published manifest down before shards change, keeping it as
        ``REPLACED_NAME`` until the new one is up: a run stopped in between leaves readers
        no manifest over changing shards, and the next run still learns which shards it
        named (to delete those the new plan drops)."""
        self.publish(REPLACED_NAME, manifest)
        self.take_down(MANIFEST_NAME)

    def take_down(self, name: str) -> None:
        """Delete the published manifest before shards change; where the store denies the
        delete (a role without ``s3:DeleteObject``), overwrite it with ``TAKEN_DOWN``, which
        readers refuse: a reader must never read new shards under an old manifest (their
        checksums are compared at each shard's end, after its images went out)."""
        try:
            self.remove(name)
        except PermissionError as exc:
            log.warning("cannot delete %s (%s; no s3:DeleteObject?): a stand-in that readers "
                        "refuse takes its place until the new manifest is up", self.display(name), exc)
            self.publish(name, TAKEN_DOWN)

    def publish(self, name: str, data: bytes) -> None:
        """Write a small object in one step: one PUT on object stores (atomic there), temp
        file + rename on a local file system."""
        path = self.path(name)
        if self.is_local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            temp = f"{self.fs._parent(path)}/.{name.rsplit('/', 1)[-1]}.partial"
            self.fs.pipe_file(temp, data)
            self.fs.mv(temp, path)
        else:
            kwargs = {"ContentType": "application/json"} if self.has_metadata else {}
            self.fs.pipe_file(path, data, **kwargs)


class _BarCallback(Callback):
    """fsspec progress callback that moves a shared tqdm bar (thread-safe)."""

    def __init__(self, bar: Any, lock: threading.Lock) -> None:
        super().__init__()
        self._bar = bar
        self._lock = lock
        self.reported = 0

    def call(self, *args: Any, **kwargs: Any) -> None:
        delta = int(self.value or 0) - self.reported
        if delta > 0:
            with self._lock:
                self._bar.update(delta)
            self.reported += delta


@dataclass(frozen=True)
class ShardFile:
    name: str
    local_path: str
    sha256: str
    bytes: int
    fingerprint: str | None = None  # recorded beside the sha256 (lets pack_to_url resume)


def _manifest_shards(manifest: dict[str, Any], out_dir: str) -> list[ShardFile]:
    shards = []
    for split in sorted(manifest["splits"]):
        for entry in manifest["splits"][split]["shards"]:
            shards.append(ShardFile(entry["name"], os.path.join(out_dir, entry["name"]),
                                 entry["sha256"], int(entry["bytes"]), entry.get("fingerprint")))
    return shards


def _check_local(shard: ShardFile) -> None:
    """Refuse to send a shard that is missing locally or differs from the manifest."""
    try:
        sha, size = hash_file(shard.local_path)
    except FileNotFoundError as exc:
        raise UploadError(
            f"shard {shard.name} is listed in the manifest but missing from the local folder; "
            "re-run `shardpack pack` (it resumes) before uploading"
        ) from exc
    if sha != shard.sha256 or size != shard.bytes:
        raise UploadError(
            f"local shard {shard.name} does not match the manifest (sha256 {sha[:12]}..., "
            f"manifest says {shard.sha256[:12]}...): it is corrupted or stale, so it was not "
            "uploaded; re-run `shardpack pack` (resume rewrites it), then upload again"
        )


def upload(
    out_dir: str | os.PathLike[str],
    url: str,
    *,
    endpoint_url: str | None = None,
    storage_options: dict[str, Any] | None = None,
    workers: int = 8,
    quiet: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Upload the shards listed in ``out_dir/manifest.json`` to ``url``, then the manifest.

    Args:
        out_dir: a local shardpack output folder (with ``manifest.json``).
        url: destination root, e.g. ``s3://bucket/imagenet`` (any fsspec URL).
        endpoint_url: an S3-compatible endpoint (MinIO, Ceph, R2, ...); becomes
            ``client_kwargs={"endpoint_url": ...}``.
        storage_options: more fsspec options (``{"profile": "..."}``, ``{"anon": True}``).
        workers: shards sent side by side (threads).
        quiet: no progress bar.
        force: send every shard even when an identical one is already there.

    Returns:
        ``{"url", "uploaded", "skipped", "removed", "bytes", "bytes_skipped", "manifest"}``:
        shards sent, shards already there (same sha256), shards an earlier manifest named
        that the new one does not (deleted), bytes sent and bytes skipped, and whether the
        manifest was ``"uploaded"`` or ``"unchanged"``.

    Raises:
        ManifestError: ``out_dir`` has no valid manifest.
        ValueError: ``workers`` below 1, or a URL like ``s3:/bucket`` (missing a slash).
        UploadError: a local shard is missing or corrupted, or the store refused a request;
            the manifest is then not uploaded, and a re-run resumes (sends only what is
            missing or different).
    """
    out_dir = os.fspath(out_dir)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    refuse_mistyped_url(url)
    _refuse_same_folder(out_dir, url)
    options = storage_options_for(url, endpoint_url=endpoint_url, storage_options=storage_options)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    try:
        with open(manifest_path, "rb") as f:
            manifest_bytes = f.read()
    except FileNotFoundError as exc:
        raise ManifestError(
            f"no {MANIFEST_NAME} in {out_dir}: upload sends a finished pack "
            "(run `shardpack pack SRC OUT` first; an interrupted pack has no manifest yet)"
        ) from exc
    manifest = parse_manifest(manifest_bytes, where=manifest_path)
    shards = _manifest_shards(manifest, out_dir)
    try:
        store = RemoteStore(url, options)
        store.require_bucket()  # at once, not as every shard's failure with "re-run to resume"
    except FileNotFoundError as exc:
        raise UploadError(f"cannot upload to {url}: {exc}") from None
    except Exception as exc:  # reaching the store at all failed (bad URL, no credentials)
        raise UploadError(_failure_message(url, exc, options)) from None
    try:
        summary = send_shards(store, shards, manifest_bytes, workers=workers, quiet=quiet, force=force)
    except UploadError as exc:
        raise UploadError(scrub_secrets(str(exc), options)) from None
    except Exception as exc:  # reaching the store at all failed (bad URL, no credentials)
        raise UploadError(_failure_message(url, exc, options)) from None
    return {"url": url, **summary}


def _refuse_same_folder(out_dir: str, url: str) -> None:
    """An upload onto its own folder would copy each shard onto itself (shutil refuses,
    shard by shard, with an advice to re-run that cannot help)."""
    local = url[len("file://"):] if url.startswith("file://") else None if is_url(url) else url
    if local is not None and os.path.exists(local) and os.path.samefile(local, out_dir):
        raise ValueError(f"{url} is {out_dir} itself: upload copies a pack to another place")


def _failure_message(url: str, exc: BaseException, options: dict[str, Any]) -> str:
    text = scrub_secrets(f"{type(exc).__name__}: {exc}", options)
    return (f"upload to {url} failed ({text}); check the URL, credentials and --endpoint-url, "
            "then re-run (shards already there are skipped)")


def _refresh_fingerprint(store: RemoteStore, shard: ShardFile, metadata: dict[str, str]) -> None:
    """Give an identical shard already at the destination this plan's fingerprint, if its
    own (in its ``metadata``) differs; see ``RemoteStore.record_fingerprint``. Not above
    5 GiB, the most S3 copies in one request: such a shard is packed again by a later
    pack to the URL, as before."""
    if not shard.fingerprint or metadata.get("fingerprint") == shard.fingerprint:
        return
    if shard.bytes > _MAX_SINGLE_COPY:
        log.info("%s: over 5 GiB, its new fingerprint is not recorded", store.display(shard.name))
        return
    store.record_fingerprint(shard.name, metadata, shard.fingerprint)


_MAX_SINGLE_COPY = 5 << 30


def send_shards(
    store: RemoteStore,
    shards: list[ShardFile],
    manifest_bytes: bytes | None,
    *,
    workers: int = 8,
    quiet: bool = False,
    force: bool = False,
    on_done: Callable[[ShardFile], None] | None = None,
) -> dict[str, Any]:
    """Send ``shards`` in parallel (skipping identical ones), then publish the manifest.

    The manifest is published only after every shard succeeded; before the first shard is
    replaced, a differing remote manifest is taken down, kept aside as ``REPLACED_NAME``
    until the new one is up, so a run stopped in between still tells the next one which
    shards the old manifest named (to delete those the new one drops). With
    ``manifest_bytes=None`` the manifest is left alone (the caller handles it). ``on_done``
    is called with each shard once it is safely at the destination (sent or skipped).
    """
    lock = threading.Lock()
    unpublished = threading.Event()
    current = store.read_bytes(MANIFEST_NAME) if manifest_bytes is not None else None
    aside = store.read_bytes(REPLACED_NAME) if manifest_bytes is not None else None
    old_manifest = current if current is not None else aside
    stats = {"uploaded": 0, "skipped": 0, "bytes": 0, "bytes_skipped": 0, "removed": 0}
    total = sum(s.bytes for s in shards)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="uploading",
               disable=True if quiet else None)

    def take_down_old_manifest() -> None:
        with lock:
            if unpublished.is_set():
                return
            if manifest_bytes is not None and current != manifest_bytes and store.take_down_manifest(current):
                log.info("took down the old remote manifest while shards change")
            unpublished.set()

    def send(shard: ShardFile) -> None:
        _check_local(shard)
        try:
            meta: dict[str, str] | None = None
            if force:
                there = None
            elif store.has_metadata:  # S3: one HEAD gives the sha256 and the fingerprint
                meta = store.remote_metadata(shard.name)
                there = (meta or {}).get(SHA256_METADATA_KEY)
            else:
                there = store.remote_sha256(shard.name, local_size=shard.bytes)
            if there == shard.sha256:
                if meta is not None:
                    _refresh_fingerprint(store, shard, meta)
                with lock:
                    stats["skipped"] += 1
                    stats["bytes_skipped"] += shard.bytes
                    bar.update(shard.bytes)
            else:
                take_down_old_manifest()
                callback = _BarCallback(bar, lock)
                extra = {"fingerprint": shard.fingerprint} if shard.fingerprint else None
                store.put(shard.local_path, shard.name, sha256=shard.sha256, callback=callback,
                          metadata=extra)
                with lock:
                    bar.update(max(0, shard.bytes - callback.reported))
                    stats["uploaded"] += 1
                    stats["bytes"] += shard.bytes
        except Exception as exc:  # any store/client error: name the shard, resume on re-run
            raise UploadError(
                f"sending shard {shard.name} to {store.display(shard.name)} failed "
                f"({type(exc).__name__}: {exc}); re-run to resume"
            ) from exc
        if on_done is not None:
            on_done(shard)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="upload") as pool:
            futures = [pool.submit(send, shard) for shard in shards]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: stop after the shards being sent, not all
                for future in futures:
                    future.cancel()
                raise
            if any(f.done() and f.exception() is not None for f in futures):
                for future in futures:
                    future.cancel()  # queued shards are not started; running ones finish
                wait(futures)
                errors = [e for f in futures if not f.cancelled() and (e := f.exception())]
                if len(errors) > 1:
                    raise UploadError(
                        f"{len(errors)} shards failed, manifest not uploaded; first: {errors[0]}"
                    ) from errors[0]
                raise errors[0]
    finally:
        bar.close()
    manifest_state = "unchanged"
    if manifest_bytes is not None and (current != manifest_bytes or stats["uploaded"]):
        take_down_old_manifest()  # a published manifest must never name a removed shard
        stats["removed"] = _remove_unnamed_shards(store, old_manifest, shards)
        store.publish(MANIFEST_NAME, manifest_bytes)
        manifest_state = "uploaded"
    if manifest_bytes is not None and (aside is not None or (current is not None and current != manifest_bytes)):
        store.remove_replaced_manifest()
    return {**stats, "manifest": manifest_state}


def _remove_unnamed_shards(store: RemoteStore, old_manifest: bytes | None, shards: list[ShardFile]) -> int:
    """Delete the shards an earlier remote manifest named and the new one does not (a
    smaller re-pack), and those a stopped upload of another pack left that no manifest
    names (``RemoteStore.stray_shards``), before the new manifest is published; return how
    many."""
    try:  # an unreadable old manifest names nothing we can trust to delete
        old = parse_manifest(old_manifest) if old_manifest is not None else None
    except Exception:
        old = None
    keep = {shard.name for shard in shards}
    dropped = named_shards(old) - keep
    stale = sorted(dropped | store.stray_shards(keep | dropped))
    return store.remove_stale_shards(stale)
