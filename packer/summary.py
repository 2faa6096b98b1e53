"""The few lines a person reads after ``shardpack pack``."""

from __future__ import annotations

from typing import Any

from .sizes import counted, format_size

__all__ = ["pack_summary"]


def pack_summary(manifest: dict[str, Any], out: str) -> str:
    """Packed/skipped/ignored counts, per-split shards and bytes, and duplicate warnings."""
    lines = []
    packed = 0
    for name, split in manifest["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        packed += split["count"]
        lines.append(f"  {name}: {counted(split['count'], 'image')} in {counted(len(split['shards']), 'shard')} "
                     f"({format_size(size)})")
    skipped = manifest.get("skipped", [])
    head = (f"packed {counted(packed, 'image')} of {counted(len(manifest['classes']), 'class')} into "
            f"{out}; skipped {len(skipped)}; ignored {counted(manifest.get('ignored', 0), 'non-image file')}")
    lines.insert(0, head)
    for item in skipped[:10]:
        lines.append(f"  skipped {item['path']}: {item['reason']}")
    if len(skipped) > 10:
        lines.append(f"  ... {len(skipped) - 10} more skipped (shardpack info {out})")
    dup = manifest.get("duplicates", {})
    across = dup.get("across_splits", [])
    within = dup.get("within_split", [])
    if across:
        lines.append(f"  WARNING: {counted(len(across), 'image')} in more than one split (leakage; the "
                     "same bytes under several paths), e.g. one at " + ", ".join(across[0]["paths"]))
    if within:
        lines.append(f"  note: {len(within)} groups of identical images within a split")
    return "\n".join(lines)
