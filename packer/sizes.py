"""Human byte sizes: ``256MB`` (powers of 1000) and ``256MiB`` (powers of 1024)."""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_size", "counted"]

_UNITS = {
    "": 1, "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}
_AMBIGUOUS = {"K", "M", "G", "T"}  # dd and Docker read M as MiB, others as MB
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse ``"256MB"``, ``"1.5GiB"``, ``"4096"`` or an int into bytes.

    Raises:
        ValueError: the text is not a size; the message shows the accepted forms.
    """
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if match and unit in _AMBIGUOUS:
        raise ValueError(f"size {text!r} is ambiguous: write {match.group(1)}{unit}B (powers of "
                         f"1000) or {match.group(1)}{unit.title()}iB (powers of 1024)")
    if not match or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: use a number of bytes or a number with KB/MB/GB "
            "(powers of 1000) or KiB/MiB/GiB (powers of 1024), e.g. 256MB"
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(n: int | float) -> str:
    """Format bytes for people: ``1.5 MB`` (powers of 1000, as parse_size reads them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def counted(n: int, noun: str) -> str:
    """``1 shard``, ``2 shards``: a count with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith(("s", "x", "ch", "sh")) else f"{n} {noun}s"
