"""Pack throughput by engine and worker count, against ``tar -cf`` of the same tree.

Builds a realistic example tree (random JPEG crops of real photographs, fixed seed), warms
the page cache, then times ``pack()`` with the local engine and the Dask engine at 1 and 2
workers, each into a fresh folder, and ``tar -cf`` of the source as the anchor. The Dask
rows include starting a ``LocalCluster`` (the price a ``--engine dask`` user pays without
``--scheduler``); the ``dask (warm cluster)`` row packs on an already running cluster
given as ``scheduler``, which is the steady-state cost of the engine itself. Every output is
checked byte-identical to the first one.

    python scripts/bench_pack_scaling.py [--images 3000] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from packer import pack
from packer.examples import PHOTOS, make_example_tree

MB = 1e6


def tree_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="total images (train 80%%)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--max-size", default="16MB", help="shard size (several shards per split)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row; the median is shown")
    parser.add_argument("--workdir", help="where to build the tree (default: a temp folder)")
    parser.add_argument("--json", default="bench_out/pack_scaling.json")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="shardpack-bench-"))
    src = work / "src"
    per_class = args.images // args.classes
    counts = {"train": per_class * 4 // 5, "validation": per_class - per_class * 4 // 5}
    if not src.exists():
        make_example_tree(src, classes=list(PHOTOS)[: args.classes], counts=counts, seed=0)
    n_files, n_bytes = tree_bytes(src)
    print(f"tree: {n_files} images, {n_bytes / MB:.1f} MB at {src}")

    def tar_once() -> None:
        subprocess.run(["tar", "-cf", str(work / "anchor.tar"), "-C", str(src), "."], check=True)

    tar_once()  # warms the page cache for every row
    load_before = os.getloadavg()[0]
    rows = [{"engine": "tar -cf", "workers": 1, "times": timed(tar_once, args.repeats)}]
    (work / "anchor.tar").unlink()

    reference: dict[str, str] | None = None

    def pack_row(label: str, engine: str, workers: int, scheduler: str | None = None) -> None:
        nonlocal reference
        out = work / "out"

        def once() -> None:
            shutil.rmtree(out, ignore_errors=True)
            pack(src, out, engine=engine, workers=workers, scheduler=scheduler,
                 max_size=args.max_size, quiet=True)

        times = timed(once, args.repeats)
        got = digests(out)
        reference = reference or got
        assert got == reference, f"{label} with {workers} workers wrote different bytes"
        rows.append({"engine": label, "workers": workers, "times": times,
                     "shards": sum(1 for k in got if k.endswith(".tar"))})

    for workers in (1, 2):
        pack_row("local", "local", workers)
    for workers in (1, 2):
        pack_row("dask", "dask", workers)
    from distributed import LocalCluster

    with LocalCluster(host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster:
        pack_row("dask (warm cluster)", "dask", 2, scheduler=cluster.scheduler_address)
    shutil.rmtree(work / "out", ignore_errors=True)

    load_after = os.getloadavg()[0]
    print(f"\n1-minute load average: {load_before:.1f} before, {load_after:.1f} after "
          f"({os.cpu_count()} CPUs; other jobs on this machine skew the rows)")
    tar_s = statistics.median(rows[0]["times"])
    print("\n| engine | workers | seconds | images/s | MB/s | time vs tar -cf |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        s = statistics.median(row["times"])
        row.update(seconds=round(s, 2), images_per_s=round(n_files / s),
                   mb_per_s=round(n_bytes / MB / s, 1), vs_tar=round(s / tar_s, 1))
        print(f"| {row['engine']} | {row['workers']} | {row['seconds']} | {row['images_per_s']} "
              f"| {row['mb_per_s']} | {row['vs_tar']}x |")
    result = {
        "images": n_files, "source_mb": round(n_bytes / MB, 1), "max_size": args.max_size,
        "repeats": args.repeats, "cpus": os.cpu_count(),
        "load_average": [round(load_before, 2), round(load_after, 2)], "python": platform.python_version(),
        "rows": rows,
    }
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
