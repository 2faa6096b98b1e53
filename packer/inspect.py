"""``shardpack info`` and ``shardpack verify``: read a shard set back and account for it."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from PIL import Image

from .errors import ShardReadError
from .format import optional_fields, split_member_name
from .probe import allow_packed_pixels
from .sizes import format_size
from .storage import is_remote, join_url, open_binary, read_manifest

__all__ = ["info_text", "VerifyReport", "verify"]


def info_text(manifest: dict[str, Any], source: str) -> str:
    """A person-readable account of a manifest: splits, classes, counts, sizes, problems."""
    classes = manifest["classes"]
    lines = [
        f"{source}: shardpack format v{manifest['version']} ({manifest.get('created_by', '?')})",
        f"classes ({len(classes)}): {', '.join(classes)}",
        "",
        f"{'split':<14}{'images':>9}{'shards':>8}{'size':>11}  per class",
    ]
    for name, split in manifest["splits"].items():
        size = sum(s.get("bytes", 0) for s in split["shards"])
        per_class = ", ".join(f"{c} {n}" for c, n in split.get("class_counts", {}).items())
        lines.append(
            f"{name:<14}{split['count']:>9}{len(split['shards']):>8}{format_size(size):>11}  {per_class}"
        )
    fields, malformed = optional_fields(manifest)
    skipped = fields["skipped"]
    lines += ["", f"skipped: {len(skipped)} image-like files"]
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more (see --json)")
    lines.append(f"ignored: {fields['ignored']} non-image or hidden files")
    dup = fields["duplicates"]
    within, across = dup.get("within_split", []), dup.get("across_splits", [])
    lines.append(
        f"duplicates: {len(within)} groups of identical images within a split, "
        f"{len(across)} shared between splits"
    )
    for group in across[:10]:
        lines.append(f"  across {'/'.join(group['splits'])}: {', '.join(group['paths'])}")
    if fields["options"]:
        lines.append(f"packed with: {_options_text(fields['options'])}")
    warnings = fields["warnings"]
    if warnings:
        lines.append(f"warnings ({len(warnings)}), as the pack gave them:")
        lines += [f"  {w}" for w in warnings]
    lines += [f"NOTE: {problem}" for problem in malformed]
    return "\n".join(lines)


def _options_text(options: dict[str, Any]) -> str:
    """The pack options that decide what a reader gets, in the CLI's words: whether images
    are the original bytes or resized (so resized shards are told from originals)."""
    resize = options.get("resize")
    if not resize:
        stored = "original image bytes (no --resize)"
    elif "short_side" in resize:
        stored = f"--resize {resize['short_side']} (short side; JPEG quality {resize.get('quality')})"
    else:
        stored = (f"--resize {resize.get('width')}x{resize.get('height')} (exact size, squashed; "
                  f"JPEG quality {resize.get('quality')})")
    parts = [stored, f"seed {options.get('seed')}"]
    if options.get("validation_split"):
        parts.append(f"--validation-split {options['validation_split']}")
    if options.get("max_count") is not None and options.get("max_size") is not None:
        parts.append(f"shards of at most {options['max_count']:,} images / "
                     f"{format_size(options['max_size'])}")
    if options.get("validate"):
        parts.append(f"--validate {options['validate']}")
    return "; ".join(parts)


@dataclass
class VerifyReport:
    """What ``verify`` checked and every problem it found (empty ``problems`` = all good)."""

    shards: int = 0
    samples: int = 0
    images_decoded: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader(io.RawIOBase):
    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.count += n
        return n


def _check_sample(
    shard: str, key: str, members: dict[str, bytes], classes: list[str], deep: bool, report: VerifyReport
) -> int | None:
    """Check one sample's members; return its label (or None when unusable)."""
    where = f"{shard}: sample {key}"
    images = [ext for ext in members if ext not in ("cls", "json")]
    if len(images) != 1 or "cls" not in members or "json" not in members:
        report.problems.append(f"{where}: members {sorted(members)}; expected image, cls, json")
        return None
    try:
        label = int(members["cls"])
        meta = json.loads(members["json"])
    except ValueError as exc:
        report.problems.append(f"{where}: unreadable cls/json ({exc})")
        return None
    if not 0 <= label < len(classes):
        report.problems.append(f"{where}: class index {label} outside 0..{len(classes) - 1}")
        return None
    if meta.get("label") != label or meta.get("class") != classes[label]:
        report.problems.append(
            f"{where}: label {label} ({classes[label]}) disagrees with json "
            f"{meta.get('label')} ({meta.get('class')})"
        )
    if deep:
        try:
            with Image.open(io.BytesIO(members[images[0]])) as im:
                im.load()
            report.images_decoded += 1
        except Exception as exc:
            report.problems.append(f"{where}: image does not decode ({exc})")
    return label


def _checked_label(
    shard: str, key: str, members: dict[str, bytes], classes: list[str], deep: bool, report: VerifyReport
) -> list[int]:
    label = _check_sample(shard, key, members, classes, deep, report)
    return [] if label is None else [label]


def _open_shard(url: str, storage_options: dict[str, Any] | None) -> Any:
    """A shard's bytes, front to back: a local file as it is; a URL through the reader's
    stream, which retries a dropped connection or a 503 where the request failed and reads
    from servers that ignore Range (verify gave up, or a traceback, where training read on).
    Its checks are verify's own (sha256, size): none is asked of the stream."""
    if not is_remote(url):
        return open_binary(url, storage_options)
    from reader.remote import open_shard_stream

    return open_shard_stream(url, storage_options=storage_options)


def _verify_shard(
    url: str, entry: dict[str, Any], classes: list[str], deep: bool,
    storage_options: dict[str, Any] | None, report: VerifyReport,
) -> list[int]:
    name = entry["name"]
    labels: list[int] = []
    try:
        with _open_shard(url, storage_options) as raw:
            hashing = _HashingReader(raw)
            stream = io.BufferedReader(hashing, buffer_size=1 << 20)
            current_key, members = None, {}
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    key, ext = split_member_name(info.name)
                    if key != current_key and current_key is not None:
                        labels += _checked_label(name, current_key, members, classes, deep, report)
                        members = {}
                    current_key = key
                    data = tar.extractfile(info)
                    members[ext] = data.read() if data else b""
                if current_key is not None:
                    labels += _checked_label(name, current_key, members, classes, deep, report)
            while stream.read(1 << 20):  # hash the end-of-archive padding too
                pass
    except FileNotFoundError:
        report.problems.append(f"{name}: missing")
        return labels
    except ShardReadError as exc:
        missing = isinstance(exc.__cause__, FileNotFoundError) or ": not found:" in str(exc)
        report.problems.append(f"{name}: missing" if missing else f"{name}: unreadable ({exc})")
        return labels
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.problems.append(f"{name}: unreadable tar ({exc})")
        return labels
    report.shards += 1
    report.samples += len(labels)
    if "sha256" not in entry:
        report.problems.append(f"{name}: the manifest gives no sha256, so the shard cannot be "
                               "checked (readers read it unchecked); re-run `shardpack pack`")
    elif hashing.sha.hexdigest() != entry["sha256"]:
        report.problems.append(f"{name}: sha256 differs from the manifest (corrupted or replaced)")
    if "bytes" in entry and hashing.count != entry["bytes"]:
        report.problems.append(f"{name}: {hashing.count} bytes, manifest says {entry['bytes']}")
    if len(labels) != entry.get("count"):
        report.problems.append(f"{name}: {len(labels)} good samples, manifest says {entry.get('count')}")
    return labels


def verify(
    source: str, *, deep: bool = False, storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Re-hash every shard against the manifest, check every sample's members and labels and
    the per-split and per-class counts; ``deep`` also decodes every image.

    Problems are collected, not raised, so one run names every bad shard and sample.
    """
    from .progress import Progress as tqdm

    report = VerifyReport()
    try:
        manifest = read_manifest(source, storage_options)
    except Exception as exc:
        report.problems.append(str(exc))
        return report
    allow_packed_pixels(manifest)
    report.problems += optional_fields(manifest)[1]
    classes = manifest["classes"]
    entries = [(split, e) for split, info in manifest["splits"].items() for e in info["shards"]]
    counts: dict[str, list[int]] = {split: [0] * len(classes) for split in manifest["splits"]}
    for split, entry in tqdm(entries, desc="verifying", unit="shard", disable=not progress or None):
        labels = _verify_shard(join_url(source, entry["name"]), entry, classes, deep, storage_options, report)
        for label in labels:
            counts[split][label] += 1
    for split, info in manifest["splits"].items():
        total = sum(counts[split])
        if total != info["count"] and not any(p.startswith(f"{split}/") for p in report.problems):
            report.problems.append(f"split {split}: {total} samples, manifest says {info['count']}")
        expected = info.get("class_counts", {})  # consistent with count and classes: parse_manifest
        for index, name in enumerate(classes):
            if name in expected and expected[name] != counts[split][index] and total == info["count"]:
                report.problems.append(
                    f"split {split}: class {name} has {counts[split][index]} samples, "
                    f"manifest says {expected[name]}"
                )
    return report
