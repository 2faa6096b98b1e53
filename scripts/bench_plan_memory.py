"""Driver memory of a pack job per input file: what the plan costs before a byte is written.

The driver (``pack()``'s process, on any engine) holds every walked ``Candidate``, every
``Probe`` and the whole ``Plan`` (one ``PlannedSample`` per image) until the manifest is
written. This script synthesises an ImageNet-like listing (1000 classes, ImageNet-style
paths, realistic sizes and unique content digests) of N files, runs the real planning code
on it (``make_plan``, ``find_duplicates``, shard fingerprints), and reports resident memory
per file after each stage and at the peak. No files are touched.

    python scripts/bench_plan_memory.py --files 1000000 [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import sys
import tempfile
import time

import psutil

from packer import job, plan, probe, walk
from packer.digest import content_digest

MB = 1 << 20


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux



def synthesize_walk(n: int, classes: int = 1000) -> walk.WalkResult:
    names = [f"n{c:08d}" for c in range(classes)]
    walked = walk.WalkResult(layout="splits", classes={"train": names})
    for i in range(n):
        name = names[i % classes]
        rel = f"train/{name}/{name}_{i}.JPEG"
        walked.candidates.append(
            walk.Candidate("train", name, rel, f"/data/imagenet/{rel}", True)
        )
    return walked


def synthesize_probes(n: int) -> list[probe.Probe]:
    rng = random.Random(0)
    probes = []
    for i in range(n):
        digest = content_digest(i.to_bytes(8, "little"))
        probes.append(
            probe.Probe(
                True, True, "", "jpg", rng.randint(300, 500), rng.randint(300, 500),
                rng.randint(20_000, 250_000), digest, digest,
            )
        )
    return probes


def measure_walk(n: int, classes: int = 100) -> dict:
    """Walk a real tree of ``n`` empty files: listing speed and memory of ``walk_tree``."""
    with tempfile.TemporaryDirectory(prefix="shardpack-walk-") as root:
        for i in range(n):
            folder = os.path.join(root, "train", f"n{i % classes:08d}")
            if i < classes:
                os.makedirs(folder)
            open(os.path.join(folder, f"img_{i}.JPEG"), "wb").close()
        base = rss()
        t = time.perf_counter()
        walked = walk.walk_tree(root)
        seconds = time.perf_counter() - t
        figures = {
            "files": len(walked.candidates),
            "walk_s": round(seconds, 2),
            "files_per_s": round(n / seconds),
            "walk_bytes_per_file": round((rss() - base) / n),
        }
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument(
        "--walk-files", type=int, default=0,
        help="instead: create this many empty files in a temp tree and time walk_tree on it",
    )
    args = parser.parse_args(argv)
    if args.walk_files:
        return measure_walk(args.walk_files)
    options = job.normalize_options(
        max_count=job.DEFAULT_MAX_COUNT, max_size=job.DEFAULT_MAX_SIZE, seed=0, resize=None,
        quality=90, validation_split=None, layout="splits", follow_links=False,
        validate="decode", max_pixels=probe.DEFAULT_MAX_PIXELS,
    )
    n = args.files
    t0 = time.perf_counter()
    base = rss()
    walked = synthesize_walk(n)
    after_walk = rss()
    probes = synthesize_probes(n)
    after_listing = rss()
    t1 = time.perf_counter()
    the_plan, _, _ = job.make_plan(walked, probes, options)
    t2 = time.perf_counter()
    after_plan = rss()
    duplicates = plan.find_duplicates(the_plan, job.source_sha256)  # no duplicates: no reads
    fingerprints = [s.fingerprint(the_plan.options) for s in the_plan.all_shards()]
    t3 = time.perf_counter()
    del duplicates, fingerprints
    figures = {
        "files": n,
        "python": sys.version.split()[0],
        "candidate_bytes_per_file": round((after_walk - base) / n),
        "probe_bytes_per_file": round((after_listing - after_walk) / n),
        "plan_bytes_per_file": round((after_plan - after_listing) / n),
        "retained_bytes_per_file": round((after_plan - base) / n),
        "peak_bytes_per_file": round((peak_rss() - base) / n),
        "retained_mb_per_million": round((after_plan - base) / n * 1e6 / MB),
        "peak_mb_per_million": round((peak_rss() - base) / n * 1e6 / MB),
        "synth_s": round(t1 - t0, 1),
        "make_plan_s": round(t2 - t1, 1),
        "duplicates_and_fingerprints_s": round(t3 - t2, 1),
        "shards": len(the_plan.all_shards()),
    }
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
