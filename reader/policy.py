"""The one error policy the reader applies at every stage: raise, or warn, skip and count.

Stages never decide on their own whether an error is fatal; they hand the exception to the
policy the caller chose (``on_error`` for samples, ``on_shard_error`` for shards).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Literal

from packer.errors import SampleDecodeError, ShardReadError

__all__ = ["OnError", "ErrorPolicy"]

OnError = Literal["raise", "warn", "ignore"]
_CHOICES = ("raise", "warn", "ignore")
MAX_MESSAGES = 100  # skip messages kept for a summary

log = logging.getLogger("shardpack.reader")


@dataclass
class ErrorPolicy:
    """Decide what a sample or shard error does, and count what was skipped.

    Attributes:
        on_error: for a sample that cannot be decoded: "raise" SampleDecodeError, or
            "warn" (skip it with a warning) or "ignore" (skip it silently; still counted).
        on_shard_error: the same for a shard that cannot be read (ShardReadError); a skipped
            shard loses the samples after the failure point.
        skipped_samples: samples skipped so far (over every epoch).
        skipped_shards: shards cut short so far (over every epoch).
        messages: the last few skip messages, for a summary.
        quiet: skip without counting or saying it (``quiet_copy``).
    """

    on_error: OnError = "warn"
    on_shard_error: OnError = "raise"
    skipped_samples: int = 0
    skipped_shards: int = 0
    messages: list[str] = field(default_factory=list)
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("on_error", "on_shard_error"):
            if getattr(self, name) not in _CHOICES:
                raise ValueError(f"{name} must be one of {_CHOICES}, got {getattr(self, name)!r}")

    def quiet_copy(self) -> ErrorPolicy:
        """The same choices, skipping without a count or a word: for an epoch that came
        short and repeats its first batches (``ShardReader._repeat_first_batches``), whose
        failures were counted and said when they were first read. A copy, not a flag on
        this policy: another iteration of the reader may be counting meanwhile."""
        return ErrorPolicy(on_error=self.on_error, on_shard_error=self.on_shard_error, quiet=True)

    def _skip(self, exc: Exception, how: OnError) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(str(exc))
        if how == "warn":
            self._warn(str(exc))
        else:
            log.debug("skipped: %s", exc)

    def _warn(self, message: str) -> None:
        warnings.warn(f"skipped: {message}", RuntimeWarning, stacklevel=4)

    def sample_failed(self, exc: SampleDecodeError) -> None:
        """Raise ``exc`` or count it as a skipped sample, as the policy says."""
        if self.on_error == "raise":
            raise exc
        if self.quiet:
            return
        self.skipped_samples += 1
        self._skip(exc, self.on_error)

    def shard_failed(self, exc: ShardReadError) -> None:
        """Raise ``exc`` or count it as a skipped (cut short) shard, as the policy says."""
        if self.on_shard_error == "raise":
            raise exc
        if self.quiet:
            return
        self.skipped_shards += 1
        self._skip(exc, self.on_shard_error)
