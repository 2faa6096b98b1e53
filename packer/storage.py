"""Where shards live: a local folder or any fsspec URL (s3://, gs://, http(s)://, file://).

Tiny helpers shared by ``info``, ``verify`` and ``upload`` so that every command accepts the
same SOURCE forms and the same ``--endpoint-url``.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

from .errors import ManifestError
from .format import MANIFEST_NAME, parse_manifest

__all__ = ["storage_options_for", "one_retry_layer", "join_url", "read_manifest", "open_binary",
           "is_url"]


def is_url(source: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(source)


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
    for reads that shardpack retries itself (reader.remote's shard stream).

    s3fs retries each request (5 times, with backoff, SlowDown and timeouts included) and
    botocore retried each of those up to 5 times more, under shardpack's own retries of a
    shard read: one failing shard took 150 requests and 4 minutes. s3fs's layer is kept.
    Elsewhere (uploads, the manifest) botocore's retries stay: s3fs does not retry a 500 or
    a 503 that is not SlowDown, and nothing of ours would.
    """
    options = dict(options or {})
    if not url.startswith(("s3://", "s3a://")):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    options["config_kwargs"] = config
    return options


def join_url(base: str | os.PathLike[str], name: str) -> str:
    """Join a shard-relative name onto a folder path or URL with ``/``."""
    base = os.fspath(base)
    return base.rstrip("/") + "/" + name if is_url(base) else os.path.join(base, name)


def open_binary(url: str, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Open a path or URL for sequential binary reading (an fsspec OpenFile context)."""
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
        with open_binary(url, storage_options) as f:
            data = f.read()
    except FileNotFoundError as exc:
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
