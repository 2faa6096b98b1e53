"""The reader with and without a malloc threshold set, paired by round.

Why this exists: glibc serves an allocation of 128 KB or more from its heap only while it
adapts its mmap threshold to what the program frees, and setting any malloc threshold
switches that adaptation off. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every
worker; TensorFlow's ``from_generator`` calls ``mallopt(M_TRIM_THRESHOLD, 128 KB)``. From
then on every such allocation is a fresh ``mmap``, its pages faulted in and zeroed, and
unmapped again when freed: a reader that made an array per decoded image paid that per
image (1.7x the CPU on 256 px shards). The decode threads now reuse work arrays of their
own (``reader.decode._WorkArrays``); this measures what is left.

``ShardReader`` (float32, and uint8 rows: ``--dtypes``) reads the split in child
processes, each once as the environment has it and once with
``MALLOC_TRIM_THRESHOLD_=--threshold``, ``--repeat`` interleaved rounds; one untimed epoch
first (batch arrays and threads made), then one timed. Prints images/s, CPU ms and page
faults per image, and the CPU per image with the threshold over without it, round by round.

Usage::

    python scripts/bench_malloc.py SHARDS [--split train] [--repeat 3] [--threshold 65536]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reader import benchmark  # noqa: E402

_VARIABLE = "MALLOC_TRIM_THRESHOLD_"


def measure(cfg: dict[str, Any], dtypes: list[str], threshold: int, repeat: int) -> dict[str, list[dict[str, Any]]]:
    """Every (dtype, environment) run ``repeat`` times, interleaved; runs by label."""
    env = {_VARIABLE: str(threshold)}
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(repeat):
        for dtype in dtypes:
            for label, extra in ((f"{dtype}", None), (f"{dtype} + {_VARIABLE}={threshold}", env)):
                # threads of the child itself (processes=0): its own CPU and page faults are
                # what is measured, and "auto" takes decode processes on 8 CPUs or more
                result = benchmark.run_contender("shardpack_numpy", dict(cfg, dtype=dtype, processes=0),
                                                 env=extra)
                runs.setdefault(label, []).append(result)
                rate = f"{result['images_per_s']:.0f} images/s" if "images_per_s" in result else result.get("error")
                print(f"  round {round_ + 1}/{repeat} {label}: {rate}", flush=True)
    return runs


def table(runs: dict[str, list[dict[str, Any]]], dtypes: list[str]) -> str:
    lines = ["| reader | images/s (median) | cpu ms/img | page faults/img | cpu ÷ without, by round |",
             "|---|---:|---:|---:|---|"]
    for label, results in runs.items():
        ok = [r for r in results if "images_per_s" in r]
        if not ok:
            lines.append(f"| {label} | failed | | | |")
            continue
        plain = runs[next(d for d in dtypes if label.startswith(d))]
        ratios = [r["cpu_ms_per_image"] / p["cpu_ms_per_image"] for r, p in zip(results, plain, strict=True)
                  if "cpu_ms_per_image" in r and "cpu_ms_per_image" in p]
        lines.append(
            f"| {label} | {statistics.median(r['images_per_s'] for r in ok):.0f} "
            f"| {statistics.median(r['cpu_ms_per_image'] for r in ok):.3f} "
            f"| {statistics.median(r['minor_faults_per_image'] for r in ok):.1f} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="shard folder or URL")
    benchmark.add_epoch_arguments(parser)
    parser.add_argument("--threshold", type=int, default=65536,
                        help=f"{_VARIABLE} for the second run of each pair (default: Dask's, 65536)")
    parser.add_argument("--dtypes", default="float32,uint8", help="ShardReader dtypes (default: float32,uint8)")
    args = parser.parse_args(argv)
    if _VARIABLE in os.environ:
        parser.error(f"{_VARIABLE} is set here already: unset it, the first run of each pair goes without")
    source = args.source if "://" in args.source else os.path.abspath(args.source)
    cfg = {"source": source, "split": args.split, "image_size": [args.image_size] * 2,
           "batch_size": args.batch_size, "warmup": 3, "epochs": 2}
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    print(f"bench_malloc: {source} [{args.split}], {benchmark.cores()} cores, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    runs = measure(cfg, dtypes, args.threshold, args.repeat)
    print()
    print(table(runs, dtypes))
    print(f"\nload average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0 if all("images_per_s" in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
