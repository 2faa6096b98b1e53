"""The reader against the decode limit on every core of a large machine, paired by round.

Why this exists: scripts/bench.py needs TensorFlow and Keras for its anchors; a many-core
host (a lent GPU machine here) may not have them. This runs only what needs numpy (and
torch, if installed): the decode limit, ``ShardReader`` (float32 and uint8), and
``ShardIterableDataset`` under a ``DataLoader`` with worker processes (``torch_loader``) or
with shardpack's own decode processes and none (``torch_processes``), each contender in
its own process, ``--repeat`` interleaved rounds; it prints each contender's ratio to the
limit round by round (CPU per image only where one process does all the work; peak RSS
is the contender's own process). ``shardpack_processes`` is ``ShardReader(processes=--processes)``,
``shardpack_processes_per_core`` one process per core; ``decode_limit_processes`` is the
limit decoded by one single-threaded process per core (the threaded limit shares one GIL,
which holds it back on many cores when images are small).

Usage::

    python scripts/bench_cores.py SHARDS [SHARDS ...] [--split train] [--repeat 3]
        [--loader-workers 8] [--processes 8] [--threads N] [--switch-interval 0.0005]
        [--contenders a,b,...]
        [--out FILE.json]
    python scripts/bench_cores.py --build 6000 --work DIR ...   # no SHARDS: make them

``--build N`` makes N ImageNet-like images in DIR (``scripts/bench.py``'s generator, one
process per core) and packs them twice, as they are and ``--resize 224x224 --quality 90``,
then measures both: docs/SPEED.md's "On 16 cores" runs 8-11 in one command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py's image generator

from reader import benchmark  # noqa: E402


def _limit_share(args: tuple[dict[str, Any], int, int, Any]) -> tuple[float, float, int]:
    cfg, index, count, barrier = args
    blobs = benchmark.split_image_bytes(cfg["source"], cfg["split"])[index::count]
    size = tuple(cfg["image_size"])
    variant = cfg["variant"]
    benchmark.decode_limit(blobs[:16], size, variant=variant, workers=1)  # warm
    barrier.wait()
    start = time.time()
    benchmark.decode_limit(blobs, size, variant=variant, workers=1)
    return start, time.time(), len(blobs)


def c_decode_limit_processes(cfg: dict[str, Any]) -> dict[str, Any]:
    """The decode limit with one process per core (one thread each): no GIL shared at all.
    On many cores the threaded limit is itself held back by its one GIL for small images."""
    import multiprocessing

    blobs = benchmark.split_image_bytes(cfg["source"], cfg["split"])
    variant = benchmark.fastest_limit_variant(blobs, tuple(cfg["image_size"]))
    count = benchmark.cores()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(count)
        with ctx.Pool(count) as pool:
            shares = pool.map(_limit_share, [(dict(cfg, variant=variant), i, count, barrier)
                                             for i in range(count)])
    images = sum(n for _, _, n in shares)
    seconds = max(end for _, end, _ in shares) - min(start for start, _, _ in shares)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "variant": variant}


def c_shardpack_numpy(cfg: dict[str, Any]) -> dict[str, Any]:
    return benchmark.c_shardpack_numpy(dict(cfg, processes=0))


def c_shardpack_numpy_uint8(cfg: dict[str, Any]) -> dict[str, Any]:
    return c_shardpack_numpy(dict(cfg, dtype="uint8"))


def c_shardpack_numpy_switch(cfg: dict[str, Any]) -> dict[str, Any]:
    """``shardpack_numpy`` with the interpreter's GIL switch interval set to
    ``--switch-interval`` (Python's own is 5 ms; the option's default 0.5 ms). A test of one explanation for threads staying under the limit on many
    cores while the GIL is held only a third of the time: a decode thread back from
    libjpeg-turbo waits for the GIL while the thread parsing the tars holds it."""
    sys.setswitchinterval(cfg["switch_interval"])
    return c_shardpack_numpy(cfg)


def c_shardpack_processes(cfg: dict[str, Any]) -> dict[str, Any]:
    return benchmark.c_shardpack_numpy(dict(cfg, num_workers=None))  # cfg["processes"]: --processes


def c_torch_loader(cfg: dict[str, Any]) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from reader import ShardIterableDataset

    workers = cfg["loader_workers"]
    ds = ShardIterableDataset(cfg["source"], split=cfg["split"], image_size=tuple(cfg["image_size"]),
                              batch_size=cfg["batch_size"], shuffle=True, seed=0,
                              decode_threads=max(1, benchmark.cores() // workers))
    loader = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4)
    result = benchmark.time_contender(loader, cfg)
    result["cpu_ms_per_image"] = None  # the workers' CPU is not this process's
    return result


def c_torch_processes(cfg: dict[str, Any]) -> dict[str, Any]:
    """``ShardIterableDataset(processes=--processes)`` in a ``DataLoader(num_workers=0)``:
    shardpack's decode processes instead of the loader's workers (NCHW float32)."""
    return benchmark.c_shardpack_torch(cfg)


def c_shardpack_processes_per_core(cfg: dict[str, Any]) -> dict[str, Any]:
    return benchmark.c_shardpack_numpy(dict(cfg, processes=benchmark.cores(), num_workers=None))


def c_shardpack_ordered(cfg: dict[str, Any]) -> dict[str, Any]:
    """The threads' epoch, decoded by ``--ordered`` single-threaded processes
    (``scripts/ordered_decode.py``, a prototype)."""
    from ordered_decode import OrderedReader

    r = OrderedReader(cfg["source"], split=cfg["split"], image_size=tuple(cfg["image_size"]),
                      batch_size=cfg["batch_size"], shuffle=True, seed=0, decode_processes=cfg["ordered"],
                      by_reference=cfg.get("by_reference", False))
    try:
        return benchmark._parent_only(benchmark.time_contender(r, cfg), cfg)
    finally:
        r.close()


def c_shardpack_ordered_2(cfg: dict[str, Any]) -> dict[str, Any]:
    return c_shardpack_ordered(dict(cfg, ordered=cfg["ordered2"]))


def c_shardpack_ordered_refs(cfg: dict[str, Any]) -> dict[str, Any]:
    """``shardpack_ordered`` whose processes read each sample's bytes from the shard file
    by offset (no compressed byte through the pipes)."""
    return c_shardpack_ordered(dict(cfg, by_reference=True))


def c_shardpack_ordered_refs_2(cfg: dict[str, Any]) -> dict[str, Any]:
    return c_shardpack_ordered(dict(cfg, ordered=cfg["ordered2"], by_reference=True))


CONTENDERS = {"decode_limit": benchmark.c_decode_limit, "decode_limit_processes": c_decode_limit_processes,
              "shardpack_numpy": c_shardpack_numpy, "shardpack_numpy_switch": c_shardpack_numpy_switch,
              "shardpack_processes_per_core": c_shardpack_processes_per_core,
              "shardpack_numpy_uint8": c_shardpack_numpy_uint8,
              "shardpack_processes": c_shardpack_processes, "torch_loader": c_torch_loader,
              "torch_processes": c_torch_processes,
              "shardpack_ordered": c_shardpack_ordered, "shardpack_ordered_2": c_shardpack_ordered_2,
              "shardpack_ordered_refs": c_shardpack_ordered_refs,
              "shardpack_ordered_refs_2": c_shardpack_ordered_refs_2}


def _build_part(args: tuple[str, int, int]) -> None:
    from bench import make_imagenet_like_tree

    root, images, seed = args
    make_imagenet_like_tree(Path(root), images=images, classes=8, seed=seed)


def build_shards(work: Path, images: int) -> list[str]:
    """Make ``images`` ImageNet-like images under ``work`` (one part per core, file names
    kept apart) and pack them as they are and at 224x224; the two shard folders."""
    import multiprocessing

    from packer import pack

    tree, parts = work / "tree", max(1, min(benchmark.cores(), 16))
    if not tree.exists():
        with multiprocessing.get_context("spawn").Pool(parts) as pool:
            pool.map(_build_part, [(str(work / f"part{k}"), images // parts, k) for k in range(parts)])
        for k in range(parts):
            for f in sorted((work / f"part{k}").rglob("*.*")):
                dest = tree / f.parent.relative_to(work / f"part{k}") / f"p{k:02d}_{f.name}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                f.replace(dest)
    pack(tree, work / "shards", quiet=True, max_size="64MB", overwrite=True)
    pack(tree, work / "shards_224x224", quiet=True, max_size="64MB", resize="224x224", quality=90,
         overwrite=True)
    return [str(work / "shards"), str(work / "shards_224x224")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="*")
    benchmark.add_epoch_arguments(parser)
    parser.add_argument("--loader-workers", type=int, default=8, help="torch_loader's DataLoader workers")
    parser.add_argument("--processes", type=int, default=8, help="shardpack_processes' processes=")
    parser.add_argument("--threads", type=int, default=None,
                        help="the ShardReader contenders' num_workers (default: the reader's "
                             "own: every CPU, at most 8 on shards packed small)")
    parser.add_argument("--ordered", type=int, default=8, help="shardpack_ordered's decode processes")
    parser.add_argument("--ordered2", type=int, default=15, help="shardpack_ordered_2's decode processes")
    parser.add_argument("--switch-interval", type=float, default=0.0005,
                        help="shardpack_numpy_switch's sys.setswitchinterval, seconds")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated")
    parser.add_argument("--build", type=int, default=0, metavar="N",
                        help="without SHARDS: make N images in --work and pack them (see above)")
    parser.add_argument("--work", default="bench_cores_work", help="--build's folder")
    parser.add_argument("--out", default=None)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.contender:
        benchmark._child(args.contender, json.loads(args.config), CONTENDERS)
        return 0
    names = args.contenders.split(",")
    try:
        import torch  # noqa: F401
    except ImportError:
        names = [n for n in names if not n.startswith("torch_")]
    if not args.shards:
        if not args.build:
            parser.error("give SHARDS, or --build N to make them")
        args.shards = build_shards(Path(args.work).resolve(), args.build)
    size = [args.image_size, args.image_size]
    print(f"{benchmark.cores()} cores, {os.cpu_count()} CPUs", flush=True)
    results = {}
    for shards in args.shards:
        cfg = {"source": shards, "split": args.split, "image_size": size,
               "batch_size": args.batch_size, "loader_workers": args.loader_workers,
               "processes": args.processes, "num_workers": args.threads,
               "ordered": args.ordered, "ordered2": args.ordered2,
               "switch_interval": args.switch_interval}
        res = benchmark.run_rounds(names, cfg, args.repeat, module=[str(Path(__file__).resolve())])
        limit = res["decode_limit"].get("round_rates") or []
        for name in names:
            rates = res[name].get("round_rates") or []
            ratios = [f"{r / lim:.2f}" for r, lim in zip(rates, limit, strict=False) if r and lim]
            print(f"{shards} {name}: {res[name].get('images_per_s', res[name].get('error'))} images/s, "
                  f"÷ limit by round {', '.join(ratios)}, cpu ms/img {res[name].get('cpu_ms_per_image')}",
                  flush=True)
        results[shards] = res
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
