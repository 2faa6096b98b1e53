"""The shardpack on-disk format, defined in one place.

Everything both sides must agree on lives here: the format version, the manifest's name and
fields, how shards are named, how sample keys are made and split from member names, which
members a sample has, and the fixed tar header values that make shards byte-identical.
``docs/FORMAT.md`` describes the same contract in prose.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from .errors import FormatVersionError, ManifestError

__all__ = [
    "optional_fields",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "IMAGE_EXTENSIONS",
    "PIL_FORMAT_TO_EXT",
    "TAR_MTIME",
    "TAR_MODE",
    "byte_sum",
    "shard_name",
    "is_shard_name",
    "named_shards",
    "shard_entries",
    "partial_name",
    "split_name_problem",
    "sample_key",
    "split_member_name",
    "member_names",
    "sample_json",
    "parse_manifest",
    "manifest_to_bytes",
    "split_info",
]

FORMAT_NAME = "shardpack"
# Bump when a reader of the previous version would misread new output. Readers refuse
# versions above this one with FormatVersionError rather than guessing.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The manifest a pack to a URL or an upload took down while it replaces shards, kept until
# the new one is published (so a stopped run still tells the next which shards it named).
REPLACED_NAME = ".shardpack-replaced-manifest.json"
# What stands in for the published manifest while shards change where the store denies
# its delete (a role without s3:DeleteObject may still overwrite it): readers refuse it
# with its reason, and packs and uploads take it for no manifest (is_taken_down).
TAKEN_DOWN = json.dumps({
    "format": FORMAT_NAME, "version": 1,
    "taken_down": "a new pack is being written over this one: read it once its manifest is published",
}).encode()
# A pack's record of finished shards while it runs (packer.resume); with the manifest, the
# mark of a folder that holds shardpack output (the walk leaves such folders out).
JOURNAL_NAME = ".shardpack-journal.jsonl"

# File name extensions that make a file "image-like" (any case). Files with other names are
# still checked by content, so a JPEG called `photo.dat` is packed, not lost.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)

# Pillow's format name -> the member extension we store. The member extension states the real
# format of the bytes, whatever the source file's name claimed.
PIL_FORMAT_TO_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",  # multi-picture JPEG from cameras: the first frame is a plain JPEG
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
}
IMAGE_MEMBER_EXTS = frozenset(PIL_FORMAT_TO_EXT.values()) | {"jpeg", "tif", "ppm", "pgm", "pnm"}

# Fixed tar header values: the same input then gives the same bytes on any machine, at any
# time, as any user.
TAR_MTIME = 0
TAR_MODE = 0o644
TAR_UID = 0
TAR_GID = 0
TAR_UNAME = ""
TAR_GNAME = ""


def byte_sum(data: bytes | memoryview) -> int:
    """The sum of ``data``'s bytes: a tar header's checksum (USTAR: the header's bytes, its
    checksum field counted as spaces).

    ``sum(header)`` walks 512 Python ints, ~4 µs; three headers per sample made it a third
    of the reader's tar parsing, with the GIL held. Adler-32's first half is 1 + that sum
    modulo 65,521, and no 256 bytes add up to that much, so 256-byte pieces give the exact
    sum in C (~0.7 µs a header).
    """
    if len(data) <= _ADLER_PIECE:
        return (zlib.adler32(data) & 0xFFFF) - 1
    if len(data) <= 2 * _ADLER_PIECE:  # a tar header
        return (zlib.adler32(data[:_ADLER_PIECE]) & 0xFFFF) + (zlib.adler32(data[_ADLER_PIECE:]) & 0xFFFF) - 2
    return sum((zlib.adler32(data[i : i + _ADLER_PIECE]) & 0xFFFF) - 1
               for i in range(0, len(data), _ADLER_PIECE))


_ADLER_PIECE = 256  # 1 + 256 * 255 < 65,521: no wrap

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def max_split_name_length() -> int:
    """The longest split name whose samples' member names fit USTAR's 100-byte name field:
    the key embeds the split (one ASCII character per character), then ``_`` + 9 digits,
    ``.`` and the longest member extension."""
    longest_ext = max(len(ext) for ext in (*IMAGE_MEMBER_EXTS, "json", "cls"))
    return 100 - len(sample_key("", 0)) - 1 - longest_ext


_NAME_MAX_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems


def split_name_problem(split: str) -> str | None:
    """Why ``split`` cannot name a split, or None. Its characters are part of every member
    name (USTAR's 100-byte field, one ASCII character each in the key), and its UTF-8 bytes
    part of every shard's file name, which a file system caps at 255 bytes: 82 CJK
    characters fit the first limit and not the second."""
    if len(split) > max_split_name_length():
        return (f"a split name may have at most {max_split_name_length()} characters (it is "
                "part of every sample's tar member name)")
    if split.casefold() == MANIFEST_NAME:  # case too: macOS and Windows file systems ignore it
        return (f"a split may not be named {MANIFEST_NAME}: each split is a folder of OUT, "
                "beside the manifest file of that name")
    if "\\" in split or _DRIVE.match(split):
        return ("a split name may not hold a backslash nor start with a letter and a colon "
                "(a path separator and a drive on Windows)")
    longest_file = len(os.path.basename(partial_name(shard_name(split, 0))).encode())
    if longest_file > _NAME_MAX_BYTES:
        limit = _NAME_MAX_BYTES - (longest_file - len(split.encode()))
        return (f"a split name may have at most {limit} bytes in UTF-8 (it is part of every "
                f"shard's file name); this one has {len(split.encode())}")
    return None


def partial_name(final_path: str) -> str:
    """The name a file is written under until it is whole (then renamed to ``final_path``)."""
    head, tail = os.path.split(final_path)
    return os.path.join(head, f".{tail}.partial")


def shard_name(split: str, index: int) -> str:
    """Return a shard's path relative to the output root, e.g. ``train/train-000003.tar``."""
    return f"{split}/{split}-{index:06d}.tar"


_SHARD_NAME = re.compile(r"(?!\.\.?/)([^/\\]+)/\1-[0-9]{6,}\.tar")


def is_shard_name(name: str) -> bool:
    """Whether a path relative to the output root has the shape :func:`shard_name` gives
    (inside its split's folder: never ``..``)."""
    return _SHARD_NAME.fullmatch(name) is not None


def named_shards(manifest: dict[str, Any] | None) -> set[str]:
    """The shard names a manifest lists that have :func:`shard_name`'s shape: the only
    names a re-pack or upload may delete when the new manifest drops them. Anything else
    a manifest names (edited by hand, or written by something else) is left alone."""
    return {entry["name"] for entry in shard_entries(manifest) if is_shard_name(entry["name"])}


def shard_entries(manifest: Any) -> Iterator[dict[str, Any]]:
    """Every shard entry with a name in a manifest not yet checked (an old OUT's, a remote
    one, another version's or a hand-edited one): what does not have the expected shape is
    passed over, not a KeyError or AttributeError in the pack that reads it."""
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    for split in splits.values() if isinstance(splits, dict) else ():
        listed = split.get("shards") if isinstance(split, dict) else None
        for entry in listed if isinstance(listed, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                yield entry


def sample_key(split: str, position: int) -> str:
    """Return the key of the sample at ``position`` in its split's packed order.

    Keys never contain a dot (webdataset splits key from extension at the first dot of the
    base name), and are unique across splits.
    """
    return f"{_key_prefix(split)}_{position:09d}"


@functools.lru_cache(maxsize=64)
def _key_prefix(split: str) -> str:
    return _UNSAFE_KEY_CHARS.sub("_", split)


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (key, extension) the way webdataset does.

    The key is the directory part plus the base name up to its first dot; the extension is
    the rest, lower-cased. ``a/b.c.jpg`` -> ``("a/b", "c.jpg")``.
    """
    if "/" not in name:  # the common case, our own member names: no directory part
        stem, dot, ext = name.partition(".")
        return stem, ext.lower() if dot else ""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(directory, stem) if directory else stem
    return key, ext.lower() if dot else ""


def member_names(key: str, ext: str) -> tuple[str, str, str]:
    """Return the three member names of one sample: image, class index, metadata."""
    return f"{key}.{ext}", f"{key}.cls", f"{key}.json"


def sample_json(
    *, path: str, class_name: str, label: int, width: int, height: int, **extra: Any
) -> bytes:
    """Return the bytes of a sample's ``.json`` member (sorted keys: reproducible).

    The bytes are ``json.dumps(record, sort_keys=True, ensure_ascii=False)``; without extra
    fields they are formatted directly (the same bytes, a test pins it), because building
    this once per image was a tenth of planning a pack.
    """
    if not extra:
        return (
            f'{{"class": {_json_string(class_name)}, "height": {int(height)}, '
            f'"label": {int(label)}, "path": {_json_string(path)}, "width": {int(width)}}}'
        ).encode()
    record = {
        "path": path,
        "class": class_name,
        "label": label,
        "width": width,
        "height": height,
        **extra,
    }
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")


# the string encoder json.dumps(..., ensure_ascii=False) uses (C-accelerated)
_json_string = json.encoder.encode_basestring


def manifest_to_bytes(manifest: dict[str, Any]) -> bytes:
    """Serialise a manifest the one way we always do (stable, human-readable)."""
    return (json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode(
        "utf-8"
    )


def is_taken_down(data: bytes | None) -> bool:
    """Whether a published manifest's bytes are a ``TAKEN_DOWN`` stand-in: by its field, not
    its bytes, so that a later wording of the reason is one too."""
    if data is None or len(data) > 4096 or b'"taken_down"' not in data:
        return False
    try:
        manifest = json.loads(data)
    except ValueError:
        return False
    return isinstance(manifest, dict) and _stands_in(manifest)


def _stands_in(manifest: dict[str, Any]) -> bool:
    """A parsed manifest is a ``TAKEN_DOWN`` stand-in: its reason, and no splits."""
    return "taken_down" in manifest and "splits" not in manifest


def parse_manifest(data: bytes | str | dict[str, Any], *, where: str = "manifest.json") -> dict[str, Any]:
    """Parse and check a manifest; fill optional fields with defaults.

    Raises:
        ManifestError: not JSON, not a shardpack manifest, or required fields missing.
        FormatVersionError: written by a format version this code does not know.
    """
    if isinstance(data, dict):
        manifest = dict(data)
    else:
        try:
            manifest = json.loads(data)
        except (ValueError, RecursionError) as exc:
            reason = exc if isinstance(exc, ValueError) else "nested too deep"
            raise ManifestError(f"{where} is not valid JSON ({reason}); re-run `shardpack pack`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where} is not a shardpack manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > FORMAT_VERSION:
        raise FormatVersionError(version, FORMAT_VERSION)
    if _stands_in(manifest):
        raise ManifestError(f"{where} was taken down: {manifest['taken_down']}")
    for field in ("classes", "splits"):
        if field not in manifest:
            raise ManifestError(f"{where} lacks the required field {field!r}")
    _check_shape(manifest, where)
    manifest.setdefault("skipped", [])
    manifest.setdefault("ignored", 0)
    manifest.setdefault("duplicates", {"within_split": [], "across_splits": []})
    for split in manifest["splits"].values():
        split.setdefault("count", sum(s.get("count", 0) for s in split["shards"]))
        split.setdefault("class_counts", {})
    return manifest


def _check_shape(manifest: dict[str, Any], where: str) -> None:
    """The types readers and ``verify`` rely on, so a hand-edited manifest fails here with
    the field it got wrong, not later with a KeyError or AttributeError."""

    def bad(what: str) -> ManifestError:
        return ManifestError(f"{where}: {what}; re-run `shardpack pack` (or fix it by hand)")

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    classes = manifest["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise bad("'classes' must be a list of class names")
    if len(set(classes)) != len(classes):
        raise bad("'classes' names a class twice")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        raise bad("'splits' must be an object of split name -> split")
    names: set[str] = set()
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise bad(f"split {name!r} lacks a 'shards' list")
        if "count" in split and not whole(split["count"]):
            raise bad(f"split {name!r}: 'count' must be a whole number")
        counts = split.get("class_counts", {})
        if not isinstance(counts, dict) or not all(whole(v) for v in counts.values()):
            raise bad(f"split {name!r}: 'class_counts' must map class names to whole numbers")
        for i, shard in enumerate(split["shards"]):
            if not isinstance(shard, dict) or not isinstance(shard.get("name"), str):
                raise bad(f"split {name!r}: shard {i} has no 'name'")
            if not _inside_root(shard["name"]):
                raise bad(f"shard {shard['name']!r} is not a relative path inside the shard folder")
            if shard["name"] in names:
                raise bad(f"shard {shard['name']!r} is listed twice")
            names.add(shard["name"])
            for field in ("count", "bytes"):
                if field in shard and not whole(shard[field]):
                    raise bad(f"shard {shard['name']!r}: {field!r} must be a whole number")
            if "sha256" in shard and not isinstance(shard["sha256"], str):
                raise bad(f"shard {shard['name']!r}: 'sha256' must be a hex string")
        _check_counts(name, split, classes, bad)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _good_skipped(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("reason"), str)
        for s in value)


def _good_duplicates(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    within, across = value.get("within_split", []), value.get("across_splits", [])
    return (isinstance(within, list) and isinstance(across, list)
            and all(isinstance(g, dict) and _is_str_list(g.get("paths")) for g in within + across)
            and all(_is_str_list(g.get("splits")) for g in across))


def _good_resize(resize: Any) -> bool:
    sizes = ("short_side",) if isinstance(resize, dict) and "short_side" in resize else ("width", "height")
    return resize is None or (isinstance(resize, dict) and all(isinstance(resize.get(k), int) for k in sizes))


# optional field -> (its default, whether a value has the shape readers and ``info`` use)
_OPTIONAL_FIELDS: dict[str, tuple[Any, Callable[[Any], bool]]] = {
    "skipped": ([], _good_skipped),
    "ignored": (0, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "duplicates": ({"within_split": [], "across_splits": []}, _good_duplicates),
    "options": (None, lambda v: v is None or isinstance(v, dict)),
    "warnings": ([], _is_str_list),
}


def optional_fields(manifest: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The optional fields a manifest's readers only report (``skipped``, ``ignored``,
    ``duplicates``, ``options``, ``warnings``), each as found, or its default where it is
    absent or malformed (a hand edit, another tool), and a line naming each malformed one.

    Readers need none of them to read shards, so a malformed one never stops a reader:
    ``info`` shows what is left and names the rest, ``verify`` reports them as problems.
    """
    fields, problems = {}, []
    for name, (default, good) in _OPTIONAL_FIELDS.items():
        value = manifest.get(name, default)
        if good(value):
            fields[name] = value
        else:
            fields[name] = default
            problems.append(_malformed(name, value))
    options = fields["options"]
    if options is not None and not _good_resize(options.get("resize")):
        fields["options"] = dict(options, resize=None)
        problems.append(_malformed("options.resize", options["resize"]))
    return fields, problems


def _malformed(name: str, value: Any) -> str:
    return f"manifest field {name!r} is malformed ({_short_json(value)}); FORMAT.md gives its shape"


def _short_json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_counts(name: str, split: dict[str, Any], classes: list[str], bad: Any) -> None:
    """A split's counts agree with each other: its shards' counts add up to its count, and
    its class counts name known classes and add up to it too. A reader trusts the count
    for ``len()`` and the cardinality, and the class list for the labels."""
    shard_counts = [shard.get("count") for shard in split["shards"]]
    if "count" in split and None not in shard_counts and sum(shard_counts) != split["count"]:
        raise bad(f"split {name!r}: its shards hold {sum(shard_counts)} samples, its 'count' says "
                  f"{split['count']}")
    class_counts = split.get("class_counts", {})
    if class_counts and set(class_counts) != set(classes):  # a class subset is sized from it
        raise bad(f"split {name!r}: 'class_counts' must list exactly the manifest's classes "
                  f"(extra: {sorted(set(class_counts) - set(classes))}, "
                  f"missing: {sorted(set(classes) - set(class_counts))})")
    if class_counts and "count" in split and sum(class_counts.values()) != split["count"]:
        raise bad(f"split {name!r}: 'class_counts' add up to {sum(class_counts.values())}, its "
                  f"'count' says {split['count']}")
    if not classes and (split.get("count") or any(shard_counts)):
        raise bad(f"split {name!r} holds samples but 'classes' is empty")


def _inside_root(name: str) -> bool:
    """A shard name stays inside the folder or URL prefix it is joined to: relative, no
    ``.``/``..`` or empty part, no URL (``s3://``) or drive (``C:``) of its own, and no
    backslash (a separator on Windows; split names cannot hold one). A colon elsewhere is
    fine: ``train:2024`` is a split a pack may have written."""
    parts = name.split("/")
    return (bool(name) and "\\" not in name and "://" not in name
            and _DRIVE.match(name) is None and all(p not in ("", ".", "..") for p in parts))


_DRIVE = re.compile(r"[A-Za-z]:")


def split_info(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    """Return one split's entry, or raise SplitNotFoundError listing the splits there are."""
    from .errors import SplitNotFoundError

    splits = manifest["splits"]
    if split not in splits:
        raise SplitNotFoundError(split, sorted(splits))
    return splits[split]
