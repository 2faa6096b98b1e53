"""Checks of the numeric options every reader entry point shares (batch and image size).

One place, so ``ShardReader``, ``image_dataset_from_shards`` and the PyTorch dataset refuse
the same values with the same words, before any shard is opened. Keras refuses these values
too; silently truncating ``20.7`` or ignoring a third ``image_size`` entry would train on
images of a size nobody asked for.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["whole_number", "check_batch_size", "check_image_size"]


def whole_number(value: Any, name: str, *, minimum: int) -> int:
    """``value`` as an int when it is a whole number >= ``minimum`` (``2`` or ``2.0``).

    Raises:
        ValueError: not a number, a bool, a fraction, or below ``minimum``.
    """
    whole = (
        isinstance(value, numbers.Integral)
        or (isinstance(value, numbers.Real) and float(value).is_integer())
    ) and not isinstance(value, bool)
    if not whole or int(value) < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` as an int >= 1.

    Raises:
        ValueError: anything else; None names the reader that yields single images.
    """
    if batch_size is None:
        raise ValueError(
            "ShardReader needs a batch_size (a whole number >= 1); for single images use "
            "image_dataset_from_shards(..., batch_size=None), or batch_size=1"
        )
    return whole_number(batch_size, "batch_size", minimum=1)


def check_image_size(image_size: Any) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``: Keras takes an int or a pair of them.

    Raises:
        ValueError: not an int >= 1 or a pair of whole numbers >= 1 (a third entry such as
            channels is refused: ``color_mode`` sets those).
    """
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        side = whole_number(image_size, "image_size", minimum=1)
        return side, side
    if isinstance(image_size, (str, bytes)) or not hasattr(image_size, "__len__") or len(image_size) != 2:
        raise ValueError(
            f"image_size must be an int or (height, width), got {image_size!r}; channels "
            "come from color_mode"
        )
    height = whole_number(image_size[0], "image_size height", minimum=1)
    width = whole_number(image_size[1], "image_size width", minimum=1)
    return height, width
