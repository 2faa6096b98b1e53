"""shardpack's exception tree.

Every error the packer or reader raises on purpose is a ``ShardpackError``, so a caller can
catch one type. Subclasses carry the context a user needs to act (which shard, which key,
which byte offset) as attributes, and their messages say what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ShardpackError",
    "PackError",
    "LayoutError",
    "OutputExistsError",
    "OutputLockedError",
    "EmptyPackError",
    "ManifestError",
    "FormatVersionError",
    "ShardReadError",
    "ChecksumError",
    "EmptySplitError",
    "SampleDecodeError",
    "SplitNotFoundError",
    "ClassNotFoundError",
    "UploadError",
]


class ShardpackError(Exception):
    """Base class of every error shardpack raises on purpose.

    Picklable with its attributes, although subclasses take keyword-only arguments (which
    the default pickling of exceptions cannot pass): a reader's decode process hands its
    errors to the main process this way, as Dask hands a worker's errors to the client.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild_error, (type(self), self.args, dict(self.__dict__))


def _rebuild_error(cls: type[ShardpackError], args: tuple[object, ...], state: dict[str, object]) -> ShardpackError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class PackError(ShardpackError):
    """The pack job cannot go on (unwritable output, disk full, bad options)."""


class LayoutError(PackError):
    """The source tree does not have a layout the packer can label without guessing."""


class OutputExistsError(PackError):
    """OUT already holds shards made with different options; pass ``overwrite=True``."""


class OutputLockedError(PackError):
    """Another pack is writing into OUT (it holds ``OUT/.shardpack.lock``).

    Attributes:
        out: the output folder.
        pid: the holder's process id, when it could be read.
    """

    def __init__(self, out: str, pid: int | None) -> None:
        self.out = out
        self.pid = pid
        who = f" (pid {pid})" if pid is not None else ""
        super().__init__(
            f"{out} is being packed by another shardpack process{who}; wait until it ends, or "
            "choose another OUT (the lock goes with that process, however it ends)"
        )


class EmptyPackError(PackError):
    """Not one image of the source could be packed: refused (nothing written), as Keras'
    ``image_dataset_from_directory`` refuses a directory without images, rather than
    publishing a manifest every reader then refuses."""


class ManifestError(ShardpackError):
    """``manifest.json`` is missing, unreadable, or inconsistent with the shards."""


class FormatVersionError(ManifestError):
    """The manifest was written by a newer (or unknown) shardpack format version."""

    def __init__(self, version: object, supported: int) -> None:
        self.version = version
        self.supported = supported
        super().__init__(
            f"manifest format version {version!r} is not supported by this shardpack "
            f"(it reads versions up to {supported}); upgrade shardpack to read it"
        )


class ShardReadError(ShardpackError):
    """A shard cannot be read: missing, truncated or corrupted.

    Attributes:
        shard: the shard's name or URL.
        offset: byte offset in the shard where reading failed, when known.
        key: the sample key being read, when known.
        reason: the message without the shard, key and offset.
    """

    def __init__(
        self, message: str, *, shard: str, offset: int | None = None, key: str | None = None
    ) -> None:
        self.shard = shard
        self.offset = offset
        self.key = key
        self.reason = message
        where = f"shard {shard}"
        if key is not None:
            where += f", sample {key}"
        if offset is not None:
            where += f", byte offset {offset}"
        super().__init__(f"{where}: {message}")


class ChecksumError(ShardReadError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


class SampleDecodeError(ShardpackError):
    """One sample's image could not be decoded.

    Attributes:
        key: the sample key.
        shard: the shard it came from, when known.
    """

    def __init__(self, message: str, *, key: str, shard: str | None = None) -> None:
        self.key = key
        self.shard = shard
        where = f"sample {key}" + (f" in shard {shard}" if shard else "")
        super().__init__(f"{where}: {message}")


class SplitNotFoundError(ShardpackError, KeyError):
    """The requested split does not exist; the message lists those that do."""

    def __init__(self, split: str, available: list[str]) -> None:
        self.split = split
        self.available = list(available)
        super().__init__(f"split {split!r} not found; available splits: {self.available}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class ClassNotFoundError(ShardpackError, ValueError):
    """A requested class name does not exist; the message lists those that do."""

    def __init__(self, names: list[str], available: list[str]) -> None:
        self.names = list(names)
        self.available = list(available)
        super().__init__(f"class names {self.names} not found; available classes: {self.available}")


class EmptySplitError(ShardpackError, ValueError):
    """The split holds no images (of the classes asked for): nothing to train or evaluate
    on, refused as Keras' ``image_dataset_from_directory`` refuses a folder without images."""

    def __init__(self, split: str, classes: list[str] | None = None, *, unlabelled: int = 0,
                 unreadable: int = 0, first_unreadable: str | None = None) -> None:
        self.split = split
        which = f" of classes {classes}" if classes else ""
        hint = (f"; {unlabelled} images have no .cls label: pass label_mode=None to read them "
                "without labels" if unlabelled else "")
        if unreadable:
            hint += (f"; the labels of {unreadable} images are not class indices (a .cls member "
                     f"holds a whole number, as webdataset reads it; the first: {first_unreadable}): "
                     "pack the class folders with shardpack, or pass label_mode=None to read them "
                     "without labels")
        super().__init__(f"no images found in split {split!r}{which}{hint}")


class UploadError(ShardpackError):
    """Uploading shards to object storage failed."""
