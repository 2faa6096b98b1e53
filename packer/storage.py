"""Where shards live: a local folder or any fsspec URL (s3://, gs://, http(s)://, file://).

Tiny helpers shared by ``info``, ``verify`` and ``upload`` so that every command accepts the
same SOURCE forms and the same ``--endpoint-url``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import ManifestError
from .format import JOURNAL_NAME, MANIFEST_NAME, parse_manifest

__all__ = ["storage_options_for", "one_retry_layer", "join_url", "read_manifest", "open_binary",
           "is_url", "is_remote", "refuse_mistyped_url"]


def is_url(source: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(source)


def is_remote(source: str | os.PathLike[str]) -> bool:
    """A URL of a store, not a local path (``file://`` is one)."""
    return is_url(source) and not os.fspath(source).startswith("file://")


_MISTYPED_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/?(?!/)")


def refuse_mistyped_url(location: str | os.PathLike[str]) -> None:
    """Refuse ``s3:/bucket/x`` or ``s3:bucket``: without ``//`` it is a local path, and a pack
    or upload would quietly make a folder named ``s3:`` in the working directory. (One
    letter before the colon is a Windows drive, ``C:/data``.)"""
    text = os.fspath(location)
    match = _MISTYPED_URL.match(text)
    if match and not is_url(text) and match.group(1).lower() in _KNOWN_SCHEMES:
        raise ValueError(f"{text!r} looks like a mistyped URL: write {match.group(1)}://... "
                         f"(or ./{text} for a local folder of that name)")


_KNOWN_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "http", "https", "file",
                  "memory", "hdfs", "webhdfs", "ftp", "sftp", "ssh", "oss", "r2"}


def storage_options_for(
    source: str, *, endpoint_url: str | None = None, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """fsspec options for ``source``: ``endpoint_url`` becomes s3fs' client_kwargs."""
    options = dict(storage_options or {})
    if endpoint_url:
        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs["endpoint_url"] = endpoint_url
        options["client_kwargs"] = client_kwargs
    return options


def one_retry_layer(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` for ``url`` with botocore's retries off on S3, unless the caller set them:
    for reads that shardpack retries itself (reader.remote's shard stream); on http(s),
    a read timeout (``HTTP_READ_TIMEOUT_S``), so that a stalled server is retried.

    s3fs retries each request (5 times, with backoff, SlowDown and timeouts included) and
    botocore retried each of those up to 5 times more, under shardpack's own retries of a
    shard read: one failing shard took 150 requests and 4 minutes. s3fs's layer is kept.
    Elsewhere (uploads, the manifest) botocore's retries stay: s3fs does not retry a 500 or
    a 503 that is not SlowDown, and nothing of ours would.
    """
    options = dict(options or {})
    if url.startswith(("http://", "https://")):
        return _with_read_timeout(options)
    if not url.startswith(("s3://", "s3a://")):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    options["config_kwargs"] = config
    return options


# Seconds an http(s) server may stay silent in the middle of an answer (or before it
# connects) before the request fails and is retried. aiohttp's only default is 300 s for a
# whole request: a server that stalled half-way through a shard held it for 5 minutes per
# attempt, about half an hour with the retries. s3fs sets 15 s for S3 reads.
HTTP_READ_TIMEOUT_S = 30.0


def _with_read_timeout(options: dict[str, Any]) -> dict[str, Any]:
    """http(s) ``options`` with aiohttp's read and connect timeouts set to
    ``HTTP_READ_TIMEOUT_S`` and no limit on a whole request (a large block on a slow link
    takes what it takes), unless the caller gave a timeout of their own."""
    client_kwargs = dict(options.get("client_kwargs") or {})
    if "timeout" not in client_kwargs:
        import aiohttp

        client_kwargs["timeout"] = aiohttp.ClientTimeout(
            total=None, sock_connect=HTTP_READ_TIMEOUT_S, sock_read=HTTP_READ_TIMEOUT_S)
        options["client_kwargs"] = client_kwargs
    return options


def join_url(base: str | os.PathLike[str], name: str) -> str:
    """Join a shard-relative name onto a folder path or URL with ``/``.

    Onto an ``http(s)://`` URL the name is percent-encoded: a split named ``val#1``,
    ``a?b`` or ``50%off`` (all packed) is a path there, not a fragment, a query or an
    escape. Object stores (``s3://``, ``gs://``...) take keys as they are."""
    base = os.fspath(base)
    if not is_url(base):
        return os.path.join(base, name)
    if base.split("://", 1)[0].lower() in ("http", "https"):
        from urllib.parse import quote

        name = quote(name, safe="/")
    return base.rstrip("/") + "/" + name


def open_binary(url: str, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Open a path or URL for sequential binary reading (an fsspec OpenFile context).

    fsspec is imported here, not with the module: it took a third of ``from packer import
    pack`` (every command and every packer process), which local paths never need."""
    import fsspec

    return fsspec.open(url, "rb", **(storage_options or {}), **kwargs)


def read_manifest(
    source: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    hint: str = "",
) -> dict[str, Any]:
    """Read and check ``SOURCE/manifest.json``.

    Args:
        hint: appended to the "not found" message (the reader adds what else SOURCE may be).

    Raises:
        ManifestError: missing, unreadable or invalid; the message says how to make one.
    """
    url = join_url(source, MANIFEST_NAME)
    try:
        refuse_mistyped_url(source)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None
    _refuse_wrong_local_path(source)
    try:
        with open_binary(url, storage_options) as f:
            data = f.read()
    except FileNotFoundError as exc:
        cause = _connection_failure(exc)
        if cause is not None:
            raise ManifestError(f"cannot reach {url} ({type(cause).__name__}: {cause})") from exc
        _refuse_missing_bucket(os.fspath(source), storage_options)
        if not is_url(source) and os.path.exists(os.path.join(source, JOURNAL_NAME)):
            raise ManifestError(
                f"no {MANIFEST_NAME} at {source} yet: a pack is writing it, or was stopped (its "
                "journal is there). The manifest appears when the pack finishes; re-run a "
                "stopped pack with the same command to finish it"
            ) from exc
        raise ManifestError(
            f"no {MANIFEST_NAME} at {source}: is it a shardpack output? (`shardpack pack SRC OUT` "
            f"writes one; an interrupted pack has none until it finishes){hint}"
        ) from exc
    except OSError as exc:
        raise ManifestError(f"cannot read {url} ({exc})") from exc
    except Exception as exc:  # a store's own errors (botocore: endpoint unreachable, ...)
        if isinstance(exc, (ImportError, ValueError, TypeError, KeyError, AttributeError, NameError)):
            raise  # a missing fsspec backend, bad options or a bug: their own message is clearest
        raise ManifestError(f"cannot read {url} ({type(exc).__name__}: {exc})") from exc
    return parse_manifest(data, where=url)


def _refuse_wrong_local_path(source: str | os.PathLike[str]) -> None:
    """Name the usual wrong local paths: none at all, a file (the manifest itself), or a
    split's folder inside a shard folder."""
    if is_url(source):
        return
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ManifestError(f"{path} does not exist")
    if not os.path.isdir(path):
        folder = os.path.dirname(os.path.abspath(path))
        advice = f"pass its folder, {folder}" if os.path.basename(path) == MANIFEST_NAME else \
            f"pass the folder that holds {MANIFEST_NAME}"
        raise ManifestError(f"{path} is a file, not a shard folder: {advice}")
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(os.path.abspath(path))
    if not os.path.exists(os.path.join(path, MANIFEST_NAME)) and os.path.exists(os.path.join(parent, MANIFEST_NAME)):
        raise ManifestError(f"{path} is a folder inside the shard folder {parent}: pass {parent} "
                            f"(with split={name!r} / --split {name} if {name} is a split)")


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The connection error behind a "not found" (fsspec's HTTP filesystem reports an
    unreachable server as a missing file), or None for a real "not found"."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, FileNotFoundError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _refuse_missing_bucket(source: str, storage_options: dict[str, Any] | None) -> None:
    """On S3 a missing bucket reads as a missing manifest: name the bucket instead."""
    if not source.startswith(("s3://", "s3a://")):
        return
    from .uploader import RemoteStore

    try:
        RemoteStore(source, dict(storage_options or {})).require_bucket()
    except FileNotFoundError as exc:
        raise ManifestError(f"cannot read {source}: {exc}") from None
