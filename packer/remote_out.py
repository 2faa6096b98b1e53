"""``pack(src, "s3://bucket/prefix")``: pack straight to object storage, bounded local disk.

Shards are staged in a local folder a batch at a time: the batch is written (same plan,
same bytes as a local pack), uploaded in parallel, and deleted locally before the next
batch is written. Local disk therefore never holds more than ``staging_shards`` shards
(each at most ``max_size``), however big the data set. The manifest is uploaded last,
after every shard is there.

Resume: on S3 each shard object carries its sha256 and its plan fingerprint (the hash of
its inputs and options) as metadata, so a re-run skips a shard whose fingerprint and
sha256 are already at the destination without even writing it again. On stores without
metadata, the shard is written again and uploaded only if its bytes differ (the uploader
re-hashes the remote copy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

from . import lock
from .errors import OutputExistsError, UploadError
from .format import MANIFEST_NAME, REPLACED_NAME, manifest_to_bytes, named_shards
from .plan import Plan, PlannedShard
from .progress import Progress as tqdm
from .resume import changed_options, refuse_other_format_version
from .uploader import SHA256_METADATA_KEY, RemoteStore, ShardFile, scrub_secrets, send_shards
from .write import ShardResult, remove_quietly

__all__ = ["pack_to_url"]

log = logging.getLogger("shardpack")


def pack_to_url(
    src: str | os.PathLike[str],
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    staging_dir: str | os.PathLike[str] | None = None,
    staging_shards: int | None = None,
    upload_workers: int = 8,
    **pack_options: Any,
) -> dict[str, Any]:
    """Pack ``src`` into shards at ``url`` (any fsspec URL), staging them locally.

    Args:
        src: the image tree, as for :func:`packer.pack`.
        url: destination root, e.g. ``s3://bucket/imagenet``.
        storage_options: fsspec options (``client_kwargs={"endpoint_url": ...}``, ...).
        staging_dir: local folder for shards in flight (default: a temporary folder,
            removed afterwards).
        staging_shards: most shards on local disk at once (default: twice the workers,
            at least 4).
        upload_workers: shards uploaded side by side.
        **pack_options: every other :func:`packer.pack` option (``max_count``, ``seed``,
            ``workers``, ``overwrite``, ``quiet``, ...).

    Returns:
        The manifest dict that was uploaded.

    Raises:
        OutputExistsError: ``url`` holds a pack made with other options (pass
            ``overwrite=True``).
        UploadError: the store refused a request; re-running resumes.
        (and everything :func:`packer.pack` raises)
    """
    from .engines import default_workers
    from .job import job_engine, normalize_options, probe_chunk_size, probe_workers
    from .probe import DEFAULT_MAX_PIXELS, DEFAULT_VALIDATE
    from .transform import parse_resize

    quiet = bool(pack_options.pop("quiet", False))
    overwrite = bool(pack_options.pop("overwrite", False))
    workers = pack_options.pop("workers", None) or default_workers()
    engine = pack_options.pop("engine", "local")
    scheduler = pack_options.pop("scheduler", None)
    resize = pack_options.pop("resize", None)
    quality = pack_options.pop("quality", 90)
    options = normalize_options(
        max_count=pack_options.pop("max_count", 10_000),
        max_size=pack_options.pop("max_size", "256MB"),
        seed=pack_options.pop("seed", 0),
        resize=resize,
        quality=quality,
        validation_split=pack_options.pop("validation_split", None),
        layout=pack_options.pop("layout", "auto"),
        follow_links=pack_options.pop("follow_links", False),
        validate=pack_options.pop("validate", DEFAULT_VALIDATE),
        max_pixels=pack_options.pop("max_pixels", DEFAULT_MAX_PIXELS),
        src=src,
    )
    if pack_options:
        raise TypeError(f"pack_to_url() got unexpected options: {sorted(pack_options)}")
    resize_spec = parse_resize(resize, quality=quality)
    batch = max(4, 2 * int(workers)) if staging_shards is None else max(1, int(staging_shards))

    store = RemoteStore(url, storage_options)
    try:
        old_manifest = _check_remote(store, options, overwrite=overwrite)
    except OutputExistsError:
        raise
    except Exception as exc:  # the store cannot be reached: say so before packing anything
        raise UploadError(_message(url, exc, storage_options)) from None

    with contextlib.ExitStack() as stack:
        _, run, check_workers = job_engine(stack, engine, workers=workers, scheduler=scheduler)
        return _pack_and_send(src, store, options, old_manifest, run=run, resize_spec=resize_spec,
                              staging_dir=staging_dir, batch=batch, upload_workers=upload_workers,
                              quiet=quiet, storage_options=storage_options,
                              check_workers=check_workers,
                              probe_chunk=probe_chunk_size(engine, resize=resize_spec,
                                                           validate=options["validate"]),
                              workers=probe_workers(engine, int(workers), scheduler))


def _pack_and_send(
    src: str | os.PathLike[str], store: RemoteStore, options: dict[str, Any],
    old_manifest: dict[str, Any] | None, *, run: Any, resize_spec: Any,
    staging_dir: str | os.PathLike[str] | None, batch: int, upload_workers: int, quiet: bool,
    storage_options: dict[str, Any] | None, check_workers: Any = None, probe_chunk: int,
    workers: int,
) -> dict[str, Any]:
    """walk -> probe -> plan, then write + upload in batches, then the manifest.

    ``check_workers``: called with the paths remote Dask workers must see as this machine
    does (SRC and the staging folder, which must then be a shared one: ``staging_dir``).
    """
    from .job import even_probe_chunk, walk_counted

    walked = walk_counted(src, layout=options["layout"], follow_links=options["follow_links"],
                          quiet=quiet)
    for warning in walked.warnings:
        log.warning(warning)
    own_staging = staging_dir is None
    alive = None
    if staging_dir is None:
        remove_dead_runs_staging()
        staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX)
        alive = lock.hold(os.path.join(staging, _STAGING_LOCK))  # while this run lives
    else:
        staging = os.fspath(staging_dir)
    os.makedirs(staging, exist_ok=True)
    try:
        if check_workers is not None and walked.candidates:
            marker = os.path.join(staging, f".shardpack-workers-check-{uuid.uuid4().hex}")
            with open(marker, "w") as f:
                f.write(marker)
            try:
                check_workers({"SRC": walked.candidates[0].abs_path, "staging folder (staging_dir)": marker})
            finally:
                os.remove(marker)
        return _plan_write_send(walked, store, options, old_manifest, run=run,
                                resize_spec=resize_spec, staging=staging, batch=batch,
                                probe_chunk=even_probe_chunk(probe_chunk, len(walked.candidates),
                                                             workers),
                                upload_workers=upload_workers, quiet=quiet,
                                storage_options=storage_options)
    finally:
        if own_staging:
            lock.release(alive)
            shutil.rmtree(staging, ignore_errors=True)


_STAGING_PREFIX = "shardpack-staging-"
_STAGING_LOCK = ".shardpack-staging.lock"  # held by the run that stages there


def remove_dead_runs_staging() -> list[str]:
    """Remove the temporary staging folders of runs that were killed (SIGKILL, a node's OOM
    killer): each holds up to ``staging_shards`` shards, and every re-run made a new one.
    Each run holds a lock on a file in its folder, which the system drops with the process;
    a folder whose lock can be taken is a dead run's (a pid would not tell, across the PID
    namespaces of containers sharing /tmp). Folders without that file are left alone."""
    removed = []
    root = tempfile.gettempdir()
    for name in sorted(os.listdir(root)):
        marker = os.path.join(root, name, _STAGING_LOCK)
        if not name.startswith(_STAGING_PREFIX) or not os.path.exists(marker) or lock.held_by_another(marker):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(name)
    if removed:
        log.info("removed %d staging folders of killed runs", len(removed))
    return removed


def _plan_write_send(
    walked: Any, store: RemoteStore, options: dict[str, Any], old_manifest: dict[str, Any] | None,
    *, run: Any, resize_spec: Any, staging: str, batch: int, upload_workers: int, quiet: bool,
    storage_options: dict[str, Any] | None, probe_chunk: int,
) -> dict[str, Any]:
    from .job import (
        find_duplicates,
        make_plan,
        plan_warnings,
        probe_all,
        refuse_no_images,
        source_sha256,
    )
    from .manifest import build_manifest

    url = store.url
    probes = probe_all(walked.candidates, run=run, validate=options["validate"],
                       max_pixels=options["max_pixels"], resize=resize_spec, quiet=quiet,
                       chunk=probe_chunk)
    plan, skipped, ignored = make_plan(walked, probes, options)
    refuse_no_images(plan, skipped, ignored)  # before the store changes
    duplicates = find_duplicates(plan, source_sha256)
    aside = False

    def before_change() -> None:
        # Not earlier: a re-run that keeps every shard leaves the published manifest up
        # (readers never find none, also if it is stopped), as a local OUT does.
        nonlocal aside
        if not aside:
            store.take_down_manifest(None if old_manifest is None else json.dumps(old_manifest).encode())
            aside = True

    try:
        results = _write_and_send(plan, store, staging, run=run, resize=resize_spec, batch=batch,
                                  upload_workers=upload_workers, quiet=quiet, before_change=before_change)
        manifest = build_manifest(plan, results, skipped=skipped, ignored=ignored,
                                  duplicates=duplicates,
                                  warnings=walked.warnings + plan_warnings(plan))
        wanted = {s.name for s in plan.all_shards()}
        stale = named_shards(old_manifest) - wanted
        if stale:  # shards the published manifest names: it goes down before they do
            before_change()
        stale |= store.stray_shards(wanted | stale)  # a stopped run's, which no manifest names
        store.remove_stale_shards(sorted(stale))  # shards the plan no longer names
        store.publish(MANIFEST_NAME, manifest_to_bytes(manifest))
        store.remove_replaced_manifest()
    except UploadError as exc:
        raise UploadError(scrub_secrets(str(exc), storage_options)) from None
    except OSError as exc:
        raise UploadError(_message(url, exc, storage_options)) from None
    return manifest


def _message(url: str, exc: BaseException, storage_options: dict[str, Any] | None) -> str:
    text = scrub_secrets(f"{type(exc).__name__}: {exc}", storage_options)
    return f"packing to {url} failed ({text}); check the URL and credentials, then re-run (it resumes)"


def _check_remote(store: RemoteStore, options: dict[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
    """Return the remote manifest, or the one a stopped run took down (if any); refuse one
    made with other options. A bucket that does not exist is an error now, not after the
    whole probe."""
    store.require_bucket()
    data = store.read_bytes(MANIFEST_NAME)
    if data is None:
        data = store.read_bytes(REPLACED_NAME)
    if data is None and store.unreadable and not overwrite:
        raise OutputExistsError(
            f"cannot tell whether {store.url} holds a pack: reading its manifest is denied "
            "(a role without s3:ListBucket is denied a missing key too); pass --overwrite to "
            "pack there anyway (a pack made with other options would be replaced)")
    if data is None:
        return None
    try:
        old = json.loads(data)
    except ValueError:
        old = {}
    if not overwrite:
        refuse_other_format_version(store.url, old)
    previous = old.get("options") if isinstance(old, dict) else None
    if previous is not None and previous != options and not overwrite:
        changed = changed_options(previous, options)
        raise OutputExistsError(
            f"{store.url} holds a pack made with different options ({', '.join(changed)}); "
            "pass --overwrite to replace it, or choose another URL"
        )
    return old if isinstance(old, dict) else {}


def _already_there(store: RemoteStore, shard: PlannedShard, fingerprint: str) -> ShardResult | None:
    """A shard at the destination made from the same inputs and options (S3 metadata)."""
    meta = store.remote_metadata(shard.name)
    if not meta or meta.get("fingerprint") != fingerprint or not meta.get(SHA256_METADATA_KEY):
        return None
    size = store.fs.size(store.path(shard.name))
    if size != shard.planned_bytes:
        return None
    return ShardResult(shard.name, len(shard.samples), int(size), meta[SHA256_METADATA_KEY], fingerprint)


def _write_and_send(
    plan: Plan, store: RemoteStore, staging: str, *, run: Any, resize: Any, batch: int,
    upload_workers: int, quiet: bool, before_change: Callable[[], None],
) -> dict[str, ShardResult]:
    """Pack and send the plan's shards that are not at the store already (same inputs and
    bytes), in groups of ``batch``; ``before_change`` is called before the first is sent."""
    from .job import write_plan

    results: dict[str, ShardResult] = {}
    todo: list[PlannedShard] = []
    for shard in plan.all_shards():
        fingerprint = shard.fingerprint(plan.options)
        kept = _already_there(store, shard, fingerprint)
        if kept is not None:
            results[shard.name] = kept
        else:
            todo.append(shard)
    if results:
        log.info("%d shards already at %s (same inputs and bytes): not packed again",
                 len(results), store.url)
    with tqdm(total=sum(len(s.samples) for s in plan.all_shards()),
              initial=sum(r.count for r in results.values()), unit="img", desc="packing+uploading",
              disable=True if quiet else None) as bar:
        for start in range(0, len(todo), batch):
            group = todo[start : start + batch]
            sub = Plan(classes=plan.classes, options=plan.options)
            for shard in group:
                sub.shards.setdefault(shard.split, []).append(shard)
            written = write_plan(sub, staging, run=run, resize=resize, quiet=True, durable=False)
            before_change()
            files = [
                ShardFile(name, os.path.join(staging, name), r.sha256, r.bytes, r.fingerprint)
                for name, r in written.items()
            ]
            send_shards(store, files, None, workers=upload_workers, quiet=True,
                        on_done=lambda f: remove_quietly(f.local_path))
            results.update(written)
            bar.update(sum(len(s.samples) for s in group))
    return results
