"""Resolve a SOURCE into the shards of one split, and open a shard as a byte stream.

A SOURCE is either a shardpack output (a local folder or any fsspec URL holding
``manifest.json``) or a set of plain WebDataset tars with no manifest (a list of paths or
URLs, or a brace pattern such as ``data-{000000..000003}.tar``). Every path goes through
fsspec, so ``s3://``, ``gs://``, ``http(s)://`` and ``file://`` work like local paths.

Opening a shard is one small function, :func:`open_shard`, on purpose: retries, read-ahead
and caching for object storage belong there and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import braceexpand

from packer.errors import ManifestError
from packer.format import split_info
from packer.storage import join_url, read_manifest

__all__ = ["ShardRef", "SplitSource", "resolve_source", "open_shard", "expand_urls"]


@dataclass(frozen=True)
class ShardRef:
    """One shard: where it is and what the manifest says about it.

    Plain data (picklable), so it crosses process boundaries; nothing is opened until
    :func:`open_shard` is called.

    Attributes:
        url: full path or URL to open.
        name: name to show in messages (the manifest name, or the URL).
        count: samples in the shard according to the manifest; None without a manifest.
        nbytes: shard size according to the manifest, when known.
        sha256: shard checksum according to the manifest, when known; remote shards are
            verified against it as they stream.
    """

    url: str
    name: str
    count: int | None = None
    nbytes: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class SplitSource:
    """The shards of one split plus what the manifest knows about them.

    Attributes:
        split: the split name (None for manifest-less tar lists).
        shards: the shards in manifest order (the unshuffled stream order).
        classes: class names, index = label; None when there is no manifest.
        count: samples in the split; None when unknown (no manifest).
        class_counts: samples per class name, possibly empty.
        manifest: the parsed manifest, or None.
    """

    split: str | None
    shards: tuple[ShardRef, ...]
    classes: tuple[str, ...] | None
    count: int | None
    class_counts: dict[str, int]
    manifest: dict[str, Any] | None

    def mean_sample_bytes(self) -> float | None:
        """Shard bytes per sample (tar headers and metadata included), where the manifest
        gives both; None for a manifest-less tar list or an empty split."""
        known = [(s.nbytes, s.count) for s in self.shards if s.nbytes is not None and s.count]
        samples = sum(count for _, count in known)
        return sum(nbytes for nbytes, _ in known) / samples if samples else None


def open_shard(
    url: str,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    cache_dir: str | None = None,
    cache_max_bytes: int | None = None,
    **storage_options: Any,
) -> IO[bytes]:
    """Open one shard for a sequential, whole-shard read and return a binary stream.

    The caller closes the stream (it is a context manager). This is the single place where
    a shard's bytes are fetched: local files are opened directly; remote shards go through
    :func:`reader.remote.open_shard_stream` (large ranged reads, retries that resume at the
    failed byte offset, read-ahead in a background thread). With the manifest's size and
    checksum, a remote shard costs no extra HEAD request and is verified as it streams
    (ChecksumError at its end); ``cache_dir`` keeps remote shards on local disk (at most
    ``cache_max_bytes`` of them, least recently used evicted).

    Raises:
        ShardReadError: the shard cannot be opened or read (missing, no permission, network
            still failing after retries); for remote shards it may surface on first read.
    """
    from .remote import open_shard_stream

    return open_shard_stream(
        url, storage_options=storage_options, expected_size=expected_size,
        expected_sha256=expected_sha256, cache_dir=cache_dir, cache_max_bytes=cache_max_bytes,
    )


def expand_urls(source: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``a-{000..003}.tar``) in one or several shard URLs, and
    webdataset's ``a.tar::b.tar`` lists (``_tar_parts``)."""
    items = [source] if isinstance(source, str) else list(source)
    urls: list[str] = []
    for item in items:
        for part in _tar_parts(str(item)):
            urls.extend(braceexpand.braceexpand(part))
    return urls


GZIPPED_TAR_ENDINGS = (".tar.gz", ".tgz")  # shards read decompressed (samples.open_ref)
_TAR_ENDINGS = (".tar", *GZIPPED_TAR_ENDINGS)


def _tar_parts(text: str) -> list[str]:
    """webdataset's ``a.tar::b-{0..9}.tar`` (shards joined by ``::``) as its parts, when
    every part names tars; else ``text`` itself, which may be an fsspec chain such as
    ``simplecache::s3://bucket/a.tar`` (one shard). Kept whole, a list was read as its last
    shard alone: fsspec took it for a chain."""
    parts = text.split("::")
    if len(parts) > 1 and all("{" in part or part.lower().endswith(_TAR_ENDINGS) for part in parts):
        return parts
    return [text]


def _is_tar_list(source: str | Sequence[str]) -> bool:
    if not isinstance(source, str):
        return True
    return "{" in source or source.lower().endswith(_TAR_ENDINGS)


_NOT_SHARDPACK_HINT = (
    "; plain WebDataset shards can be passed as a list of .tar paths or a brace pattern "
    "like 'data-{000000..000009}.tar'"
)


def resolve_source(
    source: str | Sequence[str] | Any,
    *,
    split: str,
    storage_options: dict[str, Any] | None = None,
) -> SplitSource:
    """Find the shards of ``split`` in SOURCE.

    Args:
        source: a shardpack output folder or URL (with ``manifest.json``); or one ``.tar``
            path/URL, a brace pattern, or a list of them (manifest-less WebDataset shards,
            which then form the one and only split whatever ``split`` says).
        split: split name to read from a manifest.
        storage_options: passed to fsspec (e.g. ``{"anon": True}`` or an endpoint).

    Raises:
        ManifestError: no manifest where one is expected, or an invalid one.
        SplitNotFoundError: the manifest has no such split (message lists those there are).
    """
    storage_options = dict(storage_options or {})
    if not isinstance(source, (str, list, tuple)):
        source = str(source)  # os.PathLike
    if _is_tar_list(source):
        urls = expand_urls(source)
        if not urls:
            raise ManifestError("the list of shards is empty")
        shards = tuple(ShardRef(url=u, name=u) for u in urls)
        return SplitSource(None, shards, None, None, {}, None)

    root = str(source)
    manifest = read_manifest(root, storage_options, hint=_NOT_SHARDPACK_HINT)
    info = split_info(manifest, split)
    shards = tuple(
        ShardRef(
            url=join_url(root, entry["name"]),
            name=entry["name"],
            count=entry.get("count"),
            nbytes=entry.get("bytes"),
            sha256=entry.get("sha256"),
        )
        for entry in info["shards"]
    )
    return SplitSource(
        split=split,
        shards=shards,
        classes=tuple(manifest["classes"]),
        count=int(info["count"]),
        class_counts=dict(info.get("class_counts") or {}),
        manifest=manifest,
    )
