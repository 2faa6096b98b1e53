"""Walk the source tree: find every file that might be an image, and label it by folder.

Two layouts, chosen explicitly (never guessed from file counts):

* ``splits`` (default): ``SRC/{split}/{class}/**`` — every sub-folder of SRC is a split,
  every sub-folder of a split is a class, files nested deeper belong to that class.
* ``flat``: ``SRC/{class}/**`` — one pool that ``validation_split`` divides (per class,
  seeded) into ``train`` and ``validation``. Chosen by ``layout="flat"`` or implied by a
  ``validation_split``.

In the ``splits`` layout, a split folder that holds images directly but no class folders is
the sign of a flat tree given without ``validation_split``: that raises ``LayoutError``
rather than packing nothing (or, worse, using class names as split names silently).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .errors import LayoutError
from .format import FORMAT_NAME, IMAGE_EXTENSIONS, JOURNAL_NAME, MANIFEST_NAME, split_name_problem
from .headers import starts_like_image
from .lock import LOCK_NAME
from .spool import SPOOL_NAME

__all__ = ["Candidate", "WalkResult", "walk_tree", "is_hidden", "is_utf8", "shown_path", "refuse_split_tree_read_as_flat",
           "shardpack_output_mark",
           "IGNORED_NAMES"]

log = logging.getLogger(__name__)

# ``walk_tree``'s progress callback: candidates found so far.
Found = Callable[[int], object]
_FOUND_EVERY = 10_000  # entries of one folder between progress calls

# Junk that operating systems leave in photo folders; never image data.
# OS and NAS junk (lower case): Windows' thumbnail caches and folder settings, macOS' folder
# icon, and folders of copies no one files as training images: a Synology NAS's
# "@eaDir" (a thumbnail JPEG of every photo, beside it: packed, they were near-duplicates
# of the training set, and of other splits' images), macOS zips' "__MACOSX", recycle bins
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r", "@eadir",
                           "__macosx", "#recycle", "#snapshot", "@recycle", "@recently-snapshot",
                           "$recycle.bin", "system volume information"})


class Candidate(NamedTuple):
    """A file that may hold an image, with the label its folder gives it.

    ``by_name`` is True when the extension says image: such a file must end up packed or
    skipped with a reason. Files with other names are packed when Pillow recognises the
    content and otherwise merely ignored. (A NamedTuple: one is made per file, and a
    frozen dataclass's constructor was a fifth of the walk.)
    """

    group: str  # split name (``splits`` layout) or "" (``flat`` layout, split later)
    class_name: str
    rel_path: str  # POSIX path relative to SRC, as recorded in the manifest
    abs_path: str
    by_name: bool


@dataclass
class WalkResult:
    """Everything the walk found; ``classes`` maps each group to its class folders."""

    layout: str
    classes: dict[str, list[str]] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (rel_path, why)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # image-like, refused
    warnings: list[str] = field(default_factory=list)


def is_hidden(name: str) -> bool:
    """Hidden files and folders (``.DS_Store``, ``._x.jpg``, ``.git``) and OS junk."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def is_utf8(name: str) -> bool:
    """The name (as the OS gave it, undecodable bytes as surrogates) is valid UTF-8: it can
    be written into the manifest and a sample's ``.json``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_path(path: str) -> str:
    """``path`` with bytes that are not UTF-8 written as ``\\xNN`` (for messages and the
    manifest's lists)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def looks_like_image_name(name: str) -> bool:
    """The extension says image (``os.path.splitext``'s rule: a leading dot is no extension)."""
    stem, dot, ext = name.lstrip(".").rpartition(".")
    return bool(dot) and f".{ext.lower()}" in IMAGE_EXTENSIONS


def _holds_images(candidates: list[Candidate]) -> bool:
    """Whether any candidate is an image by its name or by its first bytes (a JPEG named
    ``photo_0001.dat`` is packed too); read only for a folder whose name is refused."""
    return any(c.by_name or _starts_like_image(c.abs_path) for c in candidates)


def _starts_like_image(path: str) -> bool:
    """The regular file at ``path`` begins like an image of a format the packer takes."""
    try:
        with open(path, "rb") as f:
            return starts_like_image(f.read(12))
    except OSError:
        return False


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _image_content(entry: os.DirEntry[str]) -> bool:
    """A regular file that starts like an image of a format the packer takes. Only loose
    files outside any class folder are sniffed (inside one, the probe decides), so an image
    there is reported as skipped, not ignored; a FIFO or device is never opened (that could
    block forever)."""
    try:
        if not entry.is_file(follow_symlinks=False):
            return False
    except OSError:
        return False
    return _starts_like_image(entry.path)


def _rel_posix(path: str, src: str) -> str:
    return Path(os.path.relpath(path, src)).as_posix()


def _dir_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry[str], follow_links: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow_links)
    except OSError:
        return False


def _unfollowed_folder(
    result: WalkResult, entry: os.DirEntry[str], rel: str, *, src: str,
    ancestors: frozenset[tuple[int, int]], skip: frozenset[tuple[int, int]], kind: str = "",
) -> bool:
    """A symbolic link to a folder, left unfollowed without ``--follow-links``: whatever it
    holds is not packed, so it gets a warning (summary, manifest, stderr), not only a line
    among the ignored files. Symlinking split or class folders onto other disks is common.
    A link to a folder of the tree itself (a cycle, or ``validation -> train``) loses
    nothing, and following it would pack its images twice: it is ignored without advice;
    a link to OUT is left out unrecorded, as OUT is. Returns whether ``entry`` was one
    (or a broken link, which ``_broken_link`` reports)."""
    if _broken_link(result, entry, rel):
        return True
    if not _is_dir(entry, True):
        return False
    try:
        identity = _dir_identity(entry.path)
        target = os.path.realpath(entry.path)
    except OSError:
        return False
    if identity in skip:
        return True
    if identity in ancestors:
        result.ignored.append((rel, "symlink cycle"))
        return True
    root = os.path.realpath(src)
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        result.ignored.append((rel, "symbolic link to a folder of this tree, not followed"))
        return True
    what = f"{kind} folder" if kind else "folder"
    result.ignored.append((rel, f"symbolic link to a {what}, not followed (pass --follow-links)"))
    result.warnings.append(
        f"{shown_path(rel)} is a symbolic link to a {what}: not followed, so the images in it "
        "are not packed; pass --follow-links to pack them"
    )
    return True


def _set_aside(
    result: WalkResult, entry: os.DirEntry[str], rel: str, *, src: str,
    ancestors: frozenset[tuple[int, int]], skip: frozenset[tuple[int, int]], follow_links: bool,
    kind: str, hidden: str, unfollowed: str,
) -> bool:
    """Record an entry of a split or class level that is not walked: a hidden one (reason
    ``hidden``), a broken link (skipped when named like an image), a symbolic link to a
    folder left unfollowed (``_unfollowed_folder``), or to something neither a folder nor
    a file (reason ``unfollowed``). Returns whether ``entry`` was one; a link to a file is
    not: it is a loose file as any other (an image there is skipped, not ignored)."""
    if is_hidden(entry.name):
        result.ignored.append((rel, hidden))
        return True
    if not entry.is_symlink():
        return False
    if _broken_link(result, entry, rel, image=looks_like_image_name(entry.name)):
        return True
    if follow_links:
        return False
    if _unfollowed_folder(result, entry, rel, src=src, ancestors=ancestors, skip=skip, kind=kind):
        return True
    try:
        if entry.is_file():
            return False
    except OSError:
        pass
    result.ignored.append((rel, unfollowed))
    return True


def _unlisted(result: WalkResult, rel: str, exc: OSError) -> None:
    """A folder that cannot be listed (no permission): its files cannot be packed, nor even
    named. It is listed in ``skipped`` as a folder, with a warning, so the summary and the
    manifest account for it: a class's images vanished with only a log line before."""
    reason = exc.strerror or str(exc)
    result.skipped.append((rel, f"folder cannot be listed ({reason}): none of its files is packed"))
    result.warnings.append(f"cannot list {shown_path(rel)} ({reason}): none of its files is packed")


def _identity_or_none(result: WalkResult, path: str, rel: str) -> tuple[int, int] | None:
    """A folder's identity, or None (recorded as ignored) when it vanished during the walk."""
    try:
        return _dir_identity(path)
    except OSError as exc:
        result.ignored.append((rel, f"vanished during the walk ({exc.strerror or exc})"))
        return None


def _broken_link(result: WalkResult, entry: os.DirEntry[str], rel: str, *, image: bool = False) -> bool:
    """A symbolic link whose target is gone (a class folder linked from an unmounted disk):
    nothing can be packed from it, which deserves a warning naming the target, not only a
    line among the ignored files. ``image``: the link is named like an image, so it is
    listed in ``skipped`` (every image-like input is packed or skipped). Returns whether
    ``entry`` is one."""
    if not entry.is_symlink():
        return False
    try:
        os.stat(entry.path)
        return False
    except OSError as exc:  # ELOOP: links that lead to each other, nothing at the end
        gone = "is a loop of links" if exc.errno == errno.ELOOP else "does not exist"
    try:
        target = os.readlink(entry.path)
    except OSError:
        target = "?"
    (result.skipped if image else result.ignored).append((rel, f"broken symbolic link (to {target})"))
    result.warnings.append(f"{shown_path(rel)} is a symbolic link to {target}, which {gone}: "
                           "nothing is packed from it")
    return True


def shardpack_output_mark(folder: str) -> str | None:
    """The file that shows ``folder`` holds a shardpack output (a ``manifest.json`` of
    format ``shardpack``, or a pack's journal), or None."""
    for mark in (JOURNAL_NAME, LOCK_NAME, SPOOL_NAME):  # a pack's own, before its manifest
        if os.path.lexists(os.path.join(folder, mark)):
            return mark
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return MANIFEST_NAME if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME else None


def _earlier_output(result: WalkResult, folder: str, rel: str) -> bool:
    """Leave out a folder holding shardpack output, with a warning naming it. An earlier
    pack's OUT inside SRC (``pack d3 d3/shards``, then ``pack d3 o5``) was read as a split
    ``shards`` whose classes ``train``, ``test``... widened every split's class map; the
    current OUT is left out already, unrecorded (``walk_tree``'s ``exclude``)."""
    mark = shardpack_output_mark(folder)
    if mark is None:
        return False
    result.warnings.append(
        f"{shown_path(rel)}/ holds shardpack output ({mark}): left out of the walk, not packed; "
        "move it out of SRC if it is not meant to be there"
    )
    return True


def _collect_class_files(
    result: WalkResult,
    *,
    src: str,
    group: str,
    class_name: str,
    folder: str,
    follow_links: bool,
    ancestors: frozenset[tuple[int, int]],
    skip: frozenset[tuple[int, int]] = frozenset(),
    found: Found | None = None,
) -> None:
    """Add every file below one class folder (any depth) to ``result`` (``skip``: folders
    left out, by identity: OUT when it lies inside SRC; ``found``: see ``walk_tree``)."""
    try:
        entries = _sorted_entries(folder)
    except OSError as exc:
        _unlisted(result, _rel_posix(folder, src), exc)
        return
    prefix = _rel_posix(folder, src) + "/"  # once per folder: relpath per file was a tenth of the walk
    for done, entry in enumerate(entries, 1):
        if found is not None and not done % _FOUND_EVERY:
            found(len(result.candidates))
        rel = prefix + entry.name
        if is_hidden(entry.name):
            result.ignored.append((rel, "hidden or system file"))
            continue
        if not is_utf8(entry.name):  # it could be recorded in no manifest or .json
            what = "folder (its files are not packed)" if _is_dir(entry, follow_links) else "file"
            result.skipped.append((rel, f"{what} name is not valid UTF-8: rename it to pack it"))
            result.warnings.append(f"{shown_path(rel)}: name is not valid UTF-8, skipped")
            continue
        if entry.is_symlink():
            if _broken_link(result, entry, rel, image=looks_like_image_name(entry.name)):
                continue
            if not follow_links and _unfollowed_folder(result, entry, rel, src=src, ancestors=ancestors, skip=skip):
                continue
            # a link to a file is read whatever follow_links says, as Keras reads one (its
            # follow_links, like ours, is about folders): symlink farms are a common way to
            # make splits without copying
        if _is_dir(entry, follow_links):
            identity = _identity_or_none(result, entry.path, rel)
            if identity is None or identity in skip or _earlier_output(result, entry.path, rel):
                continue
            if identity in ancestors:
                result.warnings.append(f"symlink cycle at {rel}: not descended again")
                result.ignored.append((rel, "symlink cycle"))
                continue
            _collect_class_files(
                result, src=src, group=group, class_name=class_name, folder=entry.path,
                follow_links=follow_links, ancestors=ancestors | {identity}, skip=skip, found=found,
            )
            continue
        try:  # the directory entry's type answers without a system call, mostly
            regular = entry.is_file() or stat.S_ISREG(entry.stat().st_mode)
        except OSError as exc:  # permission, or a link broken since the check above
            if looks_like_image_name(entry.name):
                result.skipped.append((rel, f"cannot stat: {exc.strerror or exc}"))
            else:
                result.ignored.append((rel, "unreadable"))
            continue
        if not regular:  # a FIFO, socket or device: never opened (a read could block)
            if looks_like_image_name(entry.name):
                result.skipped.append((rel, "not a regular file (a pipe, socket or device)"))
            else:
                result.ignored.append((rel, "not a regular file"))
            continue
        result.candidates.append(
            Candidate(group, class_name, rel, entry.path, looks_like_image_name(entry.name))
        )
    if found is not None:
        found(len(result.candidates))


def _walk_classes(
    result: WalkResult, *, src: str, group: str, folder: str, follow_links: bool,
    ancestors: frozenset[tuple[int, int]], skip: frozenset[tuple[int, int]] = frozenset(),
    found: Found | None = None,
) -> tuple[list[str], int]:
    """Walk ``folder/{class}/**``; return class names and count of loose image files."""
    classes: list[str] = []
    loose_images = 0
    try:
        entries = _sorted_entries(folder)
    except OSError as exc:
        _unlisted(result, _rel_posix(folder, src), exc)
        return classes, loose_images
    for entry in entries:
        rel = _rel_posix(entry.path, src)
        if _set_aside(result, entry, rel, src=src, ancestors=ancestors, skip=skip, follow_links=follow_links,
                      kind="class", hidden="hidden or system file", unfollowed="symbolic link not followed"):
            continue
        if _is_dir(entry, follow_links):
            identity = _identity_or_none(result, entry.path, rel)
            if identity is None or identity in skip or _earlier_output(result, entry.path, rel):
                continue
            if identity in ancestors:
                result.ignored.append((rel, "symlink cycle"))
                continue
            _require_utf8(entry.name, rel, "class")
            classes.append(entry.name)
            _collect_class_files(
                result, src=src, group=group, class_name=entry.name, folder=entry.path,
                follow_links=follow_links, ancestors=ancestors | {identity}, skip=skip,
                found=found,
            )
        elif looks_like_image_name(entry.name) or _image_content(entry):  # skipped, by name
            loose_images += 1
            result.skipped.append((rel, "outside any class folder: no label to give it"))
            result.warnings.append(f"{rel} lies outside any class folder: skipped")
        else:
            result.ignored.append((rel, "outside any class folder"))
    return classes, loose_images


# folder names that say "split", not "class"
SPLIT_NAMES = frozenset({"train", "training", "test", "testing", "val", "valid", "validation",
                         "dev", "eval", "evaluation"})


def refuse_split_tree_read_as_flat(src: str | os.PathLike[str]) -> None:
    """``--validation-split`` reads SRC as a flat ``{class}/`` tree. A ``{split}/{class}/``
    tree read so packs with its split names as the classes, which trains on nothing but
    noise and says nothing; refuse it when every top folder is named like a split and
    holds folders.

    Raises:
        LayoutError: saying how to pack the tree as it is (or to insist with --layout flat).
    """
    try:
        tops = [e for e in _sorted_entries(os.fspath(src)) if e.is_dir() and not is_hidden(e.name)]
        if not tops or not all(e.name.lower() in SPLIT_NAMES for e in tops):
            return
        if not all(any(child.is_dir() for child in _sorted_entries(e.path)) for e in tops):
            return
    except OSError:  # the walk reports unreadable folders
        return
    names = ", ".join(f"{e.name}/" for e in tops)
    raise LayoutError(
        f"{os.fspath(src)} looks like a {{split}}/{{class}} tree ({names} hold class folders), "
        "but --validation-split reads a flat {class}/ tree: every image would be labelled with "
        "its split's name. Drop --validation-split to pack the splits as they are, or give one "
        "split folder as SRC to divide it (or pass --layout flat if these folders really are "
        "the classes)"
    )


def _require_utf8(name: str, rel: str, kind: str) -> None:
    """Split and class names become labels and manifest keys: one that is not valid UTF-8
    stops the pack with its name, rather than packing its files under a mangled label."""
    if not is_utf8(name):
        raise LayoutError(f"{kind} folder {shown_path(rel)!r}: its name is not valid UTF-8; rename it")


def walk_tree(
    src: str | os.PathLike[str], *, layout: str = "splits", follow_links: bool = False,
    exclude: str | os.PathLike[str] | None = None, found: Found | None = None,
) -> WalkResult:
    """Find every candidate image under ``src`` in sorted, reproducible order.

    ``exclude``: a folder left out wherever it appears, unrecorded (the pack's OUT, when it
    lies inside SRC: a re-run must neither take the shards for a split of the input nor
    give another manifest than the first run, when OUT was not there yet). Any other
    folder holding shardpack output (an earlier pack's OUT) is left out with a warning.

    ``found``: called with the number of candidates found so far, after each folder and
    every ``_FOUND_EVERY`` entries of a large one once it is listed (a progress count for
    trees of many folders: listing a million files takes seconds on a local disk, minutes
    on a network file system; one huge folder counts only after its listing, one
    ``scandir``).

    Raises:
        LayoutError: ``src`` is not a folder, or the layout cannot be read without guessing.
    """
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise LayoutError(f"source {src!r} is not a folder")
    if layout not in ("splits", "flat"):
        raise LayoutError(f"unknown layout {layout!r}: use 'splits' or 'flat'")
    result = WalkResult(layout=layout)
    root_id = frozenset({_dir_identity(src)})
    skip: frozenset[tuple[int, int]] = frozenset()
    if exclude is not None and os.path.isdir(exclude):
        skip = frozenset({_dir_identity(os.fspath(exclude))})
    if layout == "flat":
        classes, _ = _walk_classes(
            result, src=src, group="", folder=src, follow_links=follow_links, ancestors=root_id,
            skip=skip, found=found,
        )
        result.classes[""] = classes
        result.warnings += lookalike_class_warnings(result.classes)
        return result
    try:
        top = _sorted_entries(src)
    except OSError as exc:
        raise LayoutError(f"cannot list {src}: {exc.strerror or exc}; check its permissions") from exc
    for entry in top:
        rel = _rel_posix(entry.path, src)
        if _set_aside(result, entry, rel, src=src, ancestors=root_id, skip=skip, follow_links=follow_links,
                      kind="split", hidden="hidden, system file or symbolic link",
                      unfollowed="hidden, system file or symbolic link"):
            continue
        if not _is_dir(entry, follow_links):
            if looks_like_image_name(entry.name) or _image_content(entry):
                result.skipped.append((rel, "outside any split folder: no split or label to give it"))
                result.warnings.append(f"{rel} lies outside any split folder: skipped")
            else:
                result.ignored.append((rel, "outside any split folder"))
            continue
        identity = _identity_or_none(result, entry.path, rel)
        if identity is None or identity in skip or _earlier_output(result, entry.path, rel):
            continue
        _require_utf8(entry.name, rel, "split")
        before = len(result.candidates)
        classes, loose = _walk_classes(
            result, src=src, group=entry.name, folder=entry.path, follow_links=follow_links,
            ancestors=root_id | {identity}, skip=skip, found=found,
        )
        problem = split_name_problem(entry.name)
        if problem and _holds_images(result.candidates[before:]):  # a folder of notes makes no shard
            raise LayoutError(f"split folder {rel!r}: {problem}; rename it")
        if loose and not classes:
            raise LayoutError(
                f"{rel}/ holds {loose} image files but no class folders. If {src} is a flat "
                f"tree ({{class}}/images), pass --validation-split F (or --layout flat); the "
                "split layout is {split}/{class}/images"
            )
        result.classes[entry.name] = classes
    if not result.classes:
        raise LayoutError(f"no split folders under {src}: expected {src}/{{split}}/{{class}}/...")
    result.warnings += lookalike_class_warnings(result.classes)
    result.warnings += lookalike_warnings(list(result.classes), "split")
    return result


def lookalike_warnings(names: list[str], kind: str) -> list[str]:
    """Folders whose names differ only in case or Unicode normalisation: one warning per
    group (see ``lookalike_class_warnings``)."""
    groups: dict[str, set[str]] = {}
    for name in names:
        groups.setdefault(unicodedata.normalize("NFC", name).casefold(), set()).add(name)
    kinds = f"{kind}es" if kind.endswith("s") else f"{kind}s"
    return [
        f"{kind} folders {', '.join(repr(n) for n in sorted(group))} differ only in case or "
        f"Unicode normalisation: they are packed as different {kinds}; rename them to one "
        f"name if they are one {kind}"
        for group in (groups[key] for key in sorted(groups)) if len(group) > 1
    ]


def lookalike_class_warnings(classes: dict[str, list[str]]) -> list[str]:
    """Class folders whose names differ only in case or Unicode normalisation (``café``
    composed, as Linux keeps it, and decomposed, as macOS writes it) become two classes, as
    in Keras; each such group gets a warning, in the manifest too, since it is most
    likely one class split in two across splits or copies."""
    return lookalike_warnings(sorted({name for names in classes.values() for name in names}), "class")
