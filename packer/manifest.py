"""Build and publish ``manifest.json``: the account of every input and every shard.

The manifest is written last, to a temporary name, and renamed into place, so a reader
either sees no manifest or one whose shards are all complete.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from . import __version__
from .format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, manifest_to_bytes
from .plan import Plan
from .walk import shown_path
from .write import ShardResult, write_atomically

__all__ = ["build_manifest", "write_manifest_atomically"]


def build_manifest(
    plan: Plan,
    results: dict[str, ShardResult],
    *,
    skipped: list[tuple[str, str]],
    ignored: list[tuple[str, str]],
    duplicates: dict[str, list[dict[str, Any]]],
    warnings: list[str],
) -> dict[str, Any]:
    """Assemble the manifest dict (no timestamps: the same pack gives the same manifest)."""
    splits: dict[str, Any] = {}
    for split, shards in plan.shards.items():
        counts = Counter(s.class_name for s in plan.samples(split))
        splits[split] = {
            "count": sum(len(shard.samples) for shard in shards),
            "class_counts": {name: counts.get(name, 0) for name in plan.classes},
            "shards": [results[shard.name].manifest_entry() for shard in shards],
        }
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created_by": f"shardpack {__version__}",
        "classes": list(plan.classes),
        "splits": splits,
        "skipped": [{"path": shown_path(path), "reason": reason} for path, reason in sorted(skipped)],
        "ignored": len(ignored),
        "ignored_examples": [{"path": shown_path(p), "reason": r} for p, r in sorted(ignored)[:50]],
        "duplicates": duplicates,
        "warnings": [shown_path(warning) for warning in warnings[:100]],
        "seed": plan.options.get("seed"),
        "options": plan.options,
    }


def write_manifest_atomically(out_dir: str, manifest: dict[str, Any], *, durable: bool = True) -> str:
    """Write ``manifest.json`` via temp file + fsync (unless not ``durable``) + ``os.replace``;
    return its path."""
    final = os.path.join(out_dir, MANIFEST_NAME)
    write_atomically(final, os.path.join(out_dir, f".{MANIFEST_NAME}.partial"), manifest_to_bytes(manifest),
                     durable=durable)
    return final
