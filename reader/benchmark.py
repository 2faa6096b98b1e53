"""``shardpack bench``: reader throughput on a shard set, next to the JPEG-decode limit.

Four contenders read the same split of SOURCE, each in its own Python process (so each
one's peak RSS is its own and TensorFlow is loaded only where it is used); the Keras and
webdataset anchors are ``scripts/bench.py``'s, which builds the data they need:

- ``decode_limit``: the split's image bytes already in RAM, decoded and resized to the
  batch shape on every core with libjpeg-turbo's DCT scaling (simplejpeg when installed,
  else Pillow's ``draft``), straight into one preallocated array: no I/O, no shuffling, no
  batching, no per-image task. The reader cannot beat it; it tells how close it comes.
- ``shardpack_numpy``: :class:`reader.ShardReader` (float32 batches).
- ``shardpack_tf``: :func:`reader.image_dataset_from_shards`, iterated as
  Keras does (``for x, y in ds``).
- ``shardpack_torch``: :class:`reader.ShardIterableDataset` (NCHW float32) in a
  ``DataLoader`` without loader workers.

The machine may be shared, so every contender runs ``--repeat`` times, interleaved (one
round of all, then the next), and the table shows the median; the load average is printed
with it. Each reader runs ``--epochs`` epochs (default 2) in its process and the last is
timed, as training goes on epoch after epoch (``time_epochs``; the first epoch's whole rate
is reported too). ``images/s`` is the steady state of that epoch (from its ``--warmup``-th
batch to its last; see ``time_epoch``); with ``--cache cold`` the shards are evicted from
the page cache before every epoch, as for a set larger than memory, and ``images/s`` runs
from the epoch's start (the shuffle buffer's fill from the disk included). ``cpu ms/img``
is the process's CPU time per image over the epoch (or the timed decode), which a busy
machine disturbs less than the rate.

    shardpack bench shards/ --split train --image-size 224 --batch-size 64
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import re
import resource
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from packer.errors import ShardpackError

from .checks import whole_number

__all__ = ["CONTENDERS", "decode_limit", "evict_from_page_cache", "run_contender", "time_contender",
           "time_epoch", "time_epochs", "main"]

_CHUNK = 16  # images per task of the decode-limit pool: no per-image scheduling cost


def cores() -> int:
    """CPUs this process may use (the packer's default worker count)."""
    from packer.engines import default_workers

    return default_workers()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split_image_bytes(source: str, split: str, storage_options: dict[str, Any] | None = None) -> list[bytes]:
    """The image member of every sample of ``split``, read into memory (any SOURCE/URL)."""
    from .policy import ErrorPolicy
    from .samples import image_member, shard_samples
    from .source import resolve_source

    src = resolve_source(source, split=split, storage_options=storage_options or {})
    out = []
    for ref in src.shards:
        for sample in shard_samples(ref, policy=ErrorPolicy(), storage_options=storage_options):
            ext = image_member(sample)
            if ext is not None:
                out.append(sample[ext])
    return out


def _limit_simplejpeg(data: bytes, size: tuple[int, int], *, any_scale: bool = False) -> Any:
    import simplejpeg

    from .decode import fast_jpeg_scale, opencv_png, resize_array

    if data[:2] != b"\xff\xd8":
        arr = opencv_png(data)  # as the reader decodes plain PNGs
        return _limit_pillow(data, size) if arr is None else resize_array(arr, (size[1], size[0]), "bilinear")
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    min_w, min_h = (size[1], size[0]) if any_scale else fast_jpeg_scale(w, h, size[1], size[0])
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=min_w, min_height=min_h,
                                 fastdct=True)
    return resize_array(arr, (size[1], size[0]), "bilinear")


def _limit_simplejpeg_any_scale(data: bytes, size: tuple[int, int]) -> Any:
    return _limit_simplejpeg(data, size, any_scale=True)


def _limit_pillow(data: bytes, size: tuple[int, int]) -> Any:
    import numpy as np
    from PIL import Image

    from .decode import resize_array

    im: Image.Image = Image.open(io.BytesIO(data))
    im.draft("RGB", (size[1], size[0]))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return resize_array(np.asarray(im), (size[1], size[0]), "bilinear")


# decode-limit variant -> function(bytes, (h, w)) -> resized (h, w, 3) uint8 array; the
# fastest variant (fastest_limit_variant) is the limit. The resize is the reader's own (resize_array: OpenCV's
# Keras-like bilinear when installed, else Pillow), so limit and reader pay for the same
# pixels; "simplejpeg" picks the DCT scale as the reader does (1/8, 1/4, 1/2, 1),
# "simplejpeg-n8" any n/8 scale; both decode plain PNGs with OpenCV as the reader does.
LIMIT_VARIANTS = {"simplejpeg": _limit_simplejpeg, "simplejpeg-n8": _limit_simplejpeg_any_scale,
                  "pillow-draft": _limit_pillow}


def decode_limit(
    blobs: list[bytes], size: tuple[int, int], *, variant: str, workers: int | None = None
) -> tuple[float, float]:
    """Decode and resize every blob into one uint8 array on ``workers`` threads.

    Returns (wall seconds, process CPU seconds).

    Each task takes ``_CHUNK`` consecutive images and writes them into their rows, so the
    pool adds nothing per image: the time is decode + resize + one copy into the array.
    The array is written once before the clock starts: the first write to fresh memory
    faults its pages in, which is no part of decoding, and which a reader recycling a few
    batch arrays pays once. On a virtual machine that hands freed memory back to its host
    it cost up to 0.38 ms per 224x224 image (a 180 MB array written in a new process:
    72-453 ms, 26 ms right after the same memory had been written), as much as decoding a
    256 px JPEG.
    """
    import numpy as np

    fn = LIMIT_VARIANTS[variant]
    out = np.empty((len(blobs), size[0], size[1], 3), dtype=np.uint8)
    out.fill(0)  # every page written before the clock starts

    def run(start: int) -> None:
        for i in range(start, min(start + _CHUNK, len(blobs))):
            out[i] = fn(blobs[i], size)

    with ThreadPoolExecutor(workers or cores()) as pool:
        list(pool.map(run, range(0, min(len(blobs), 4 * _CHUNK), _CHUNK)))  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        list(pool.map(run, range(0, len(blobs), _CHUNK)))
        return time.perf_counter() - start, time.process_time() - cpu


def time_epoch(batches: Any, warmup: int = 3) -> dict[str, Any]:
    """Iterate one epoch and time it.

    ``images_per_s`` is the steady state: from the end of batch ``warmup`` to the arrival of
    the last batch (start-up, i.e. filling the shuffle buffer and starting threads, left
    out; so is tearing the iterator down, which for a tf.data pipeline can take seconds,
    see ``teardown_s``). ``images_per_s_with_startup`` is the whole loop;
    ``images_per_s_to_last_batch`` runs from the loop's start to the last batch's arrival:
    start-up in, teardown out, so every read of the epoch is inside (a reader that fills its
    shuffle buffer first reads all of a split smaller than the buffer before batch 0).
    ``minor_faults_per_image``: the process's page faults per image over the loop (fresh
    memory paged in; see ``scripts/bench_malloc.py``).
    """
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu = time.perf_counter(), time.process_time()
    images = steady_images = 0
    steady_start = last = None
    for i, batch in enumerate(batches):
        last = time.perf_counter()
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = int(x.shape[0])
        images += n
        if i == warmup - 1:
            steady_start = last
        elif i >= warmup:
            steady_images += n
    end, cpu = time.perf_counter(), time.process_time() - cpu
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    whole = images / (end - start)
    steady = (steady_images / (last - steady_start)
              if steady_start and last and steady_images and last > steady_start else whole)
    to_last = images / (last - start) if last and last > start else whole
    return {"images": images, "seconds": end - start, "images_per_s": steady,
            "images_per_s_with_startup": whole, "images_per_s_to_last_batch": to_last,
            "teardown_s": end - (last or end),
            "cpu_ms_per_image": cpu / max(images, 1) * 1e3,
            "minor_faults_per_image": faults / max(images, 1)}


DEFAULT_EPOCHS = 2


def time_epochs(
    batches: Any, epochs: int = DEFAULT_EPOCHS, warmup: int = 3, *,
    before_epoch: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Time ``epochs`` passes over ``batches`` (each ``iter()`` a new epoch) and report the
    last one (``time_epoch``): what training runs at once its process is going, as Keras
    iterates one dataset epoch after epoch.

    A fresh process's first pass also builds the pipeline (tf.data's, a DataLoader's),
    faults in fresh batch memory and, for shardpack, hashes each local shard against the
    manifest once; measured here, 7-34% more CPU per image than the next epoch. That
    pass's whole-epoch rate is kept as ``first_epoch_images_per_s``.

    ``before_epoch``: called before each pass, off the clock (``evict_from_page_cache``
    for a cold-cache run).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    results = []
    for _ in range(epochs):
        if before_epoch is not None:
            before_epoch()
        results.append(time_epoch(batches, warmup))
    first, last = results[0], results[-1]
    return dict(last, epochs=epochs, first_epoch_images_per_s=first["images_per_s_with_startup"])


def evict_from_page_cache(paths: Sequence[str | os.PathLike[str]]) -> int:
    """Drop every file under ``paths`` (files or folders, links followed) from the page
    cache, so the next read comes from the disk, as it does for a data set larger than the
    machine's memory.

    ``posix_fadvise(DONTNEED)`` after a ``sync`` (dirty pages are not dropped): no root
    needed, unlike ``/proc/sys/vm/drop_caches``, and nothing else's cache is touched;
    directory entries and inodes stay cached. A file system whose pages are the files
    (tmpfs) or that caches outside the page cache (ZFS) keeps them. Files that cannot be
    opened (a dangling link, no permission) are left out: a reader or packer skips them too.
    Returns the number of files evicted.

    Raises:
        TypeError: ``paths`` is one path, not a list of them.
        FileNotFoundError: a path in ``paths`` does not exist.
        OSError: the platform has no ``posix_fadvise`` (not Linux).
    """
    paths = _path_list(paths)
    if not hasattr(os, "posix_fadvise"):
        raise OSError("a cold page cache needs os.posix_fadvise (Linux)")
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"nothing to evict at {os.fspath(path)}")
    os.sync()
    return sum(_evict_file(file) for file in _files_under(paths))


def _path_list(paths: Sequence[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
    """``paths`` as a list, refusing one bare path (a string is a sequence of characters).

    Raises:
        TypeError: ``paths`` is one path.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"pass a list of paths, not one path: [{paths!r}]")
    return list(paths)


def _files_under(paths: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """Every file under ``paths``, folder links followed, each folder once (a link cycle
    is not walked twice)."""
    seen: set[tuple[int, int]] = set()
    for given in paths:
        path = os.fspath(given)
        if not os.path.isdir(path):
            yield path
            continue
        for folder, dirs, names in os.walk(path, followlinks=True):
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                dirs.clear()
                continue
            seen.add((st.st_dev, st.st_ino))
            yield from (os.path.join(folder, name) for name in names)


def _evict_file(path: str) -> int:
    """Evict one regular file (1), or leave it (0): a FIFO or device (nothing cached, and
    opening one may block), or a file that cannot be opened."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return 0
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return 1


# ---------------------------------------------------------------- contenders (child side)


def fastest_limit_variant(blobs: list[bytes], size: tuple[int, int]) -> str:
    """The decode-limit variant that decodes a sample of ``blobs`` (every 8th, at least 64)
    fastest, each tried twice, interleaved.

    The limit is then timed once, over every image, with that variant alone: timing all
    the variants over everything and keeping the best would report the luckiest of several
    noisy runs (on this shared machine the same variant varied by a third between runs, and
    two variants often do the same work), an anchor biased upward as no contender is.
    """
    sample = blobs[:: 8] if len(blobs) >= 512 else blobs[:64]
    best: dict[str, float] = {}
    for _ in range(2):
        for variant in LIMIT_VARIANTS:
            try:
                seconds, _cpu = decode_limit(sample, size, variant=variant)
            except ImportError:  # simplejpeg not installed
                continue
            best[variant] = min(best.get(variant, seconds), seconds)
    return min(best, key=best.__getitem__)


def c_decode_limit(cfg: dict[str, Any]) -> dict[str, Any]:
    size = tuple(cfg["image_size"])
    blobs = split_image_bytes(cfg["source"], cfg["split"], cfg.get("storage_options"))
    variant = fastest_limit_variant(blobs, size)
    seconds, cpu = decode_limit(blobs, size, variant=variant)
    return {"images": len(blobs), "seconds": seconds, "images_per_s": len(blobs) / seconds,
            "variant": variant, "cpu_ms_per_image": cpu / len(blobs) * 1e3}


def time_contender(
    batches: Any, cfg: dict[str, Any], reads: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """``time_epochs`` with a contender's ``epochs`` and ``warmup`` from its ``cfg`` (every
    reader contender, here and in ``scripts/``, is timed through this). With
    ``cfg["cache"] == "cold"`` the files it ``reads`` (local paths) are evicted from the
    page cache before every epoch, and its rate runs from each epoch's start.

    Raises:
        TypeError: ``reads`` is one path, not a list of them.
        ValueError: a cold run of a contender that names nothing it reads.
    """
    if cfg.get("cache") != "cold":
        return time_epochs(batches, cfg.get("epochs", DEFAULT_EPOCHS), cfg.get("warmup", 3))
    reads = _path_list(reads)
    if not reads:
        raise ValueError("a cold-cache run needs the local paths the contender reads "
                         "(a URL has no page cache here)")
    result = time_epochs(batches, cfg.get("epochs", DEFAULT_EPOCHS), cfg.get("warmup", 3),
                         before_epoch=functools.partial(evict_from_page_cache, reads))
    # every read inside the clock: the steady window after the warm-up batches would leave
    # out a shuffle buffer's fill, which reads all of a split smaller than the buffer
    return dict(result, images_per_s=result["images_per_s_to_last_batch"],
                steady_images_per_s=result["images_per_s"])


def _local_reads(cfg: dict[str, Any]) -> list[str]:
    """What a shardpack contender reads from local disk: its ``source`` (a shard folder, or
    a list of shard files); none for URLs, which have no page cache here."""
    source = cfg["source"]
    paths = [p.removeprefix("file://") for p in ([source] if isinstance(source, str) else source)]
    return [p for p in paths if "://" not in p]


def _parent_only(result: dict[str, Any], cfg: dict[str, Any], processes: int | None = None) -> dict[str, Any]:
    """With decode processes this process's CPU time is not the reader's: leave it out
    (peak RSS, also this process's alone, is marked by ``parent_only``). ``processes``: how
    many the reader took (``"auto"`` may take none), else ``cfg``'s; recorded for the
    tables (``contender_label``), which would otherwise leave a reader on 16 cores
    unexplained."""
    if processes is not None:
        result["processes"] = int(processes)
    if cfg.get("processes") if processes is None else processes:
        result["cpu_ms_per_image"] = result["minor_faults_per_image"] = None
        result["parent_only"] = True
    return result


def c_shardpack_numpy(cfg: dict[str, Any]) -> dict[str, Any]:
    from .shard_reader import ShardReader

    r = ShardReader(cfg["source"], split=cfg["split"], image_size=tuple(cfg["image_size"]),
                    batch_size=cfg["batch_size"], shuffle=True, seed=0,
                    storage_options=cfg.get("storage_options"), dtype=cfg.get("dtype", "float32"),
                    processes=cfg.get("processes", "auto"), num_workers=cfg.get("num_workers"))
    try:
        return _parent_only(time_contender(r, cfg, _local_reads(cfg)), cfg, r.processes)
    finally:
        r.close()


def c_shardpack_tf(cfg: dict[str, Any]) -> dict[str, Any]:
    from .tf_data import image_dataset_from_shards

    ds = image_dataset_from_shards(cfg["source"], split=cfg["split"],
                                   image_size=tuple(cfg["image_size"]),
                                   batch_size=cfg["batch_size"], shuffle=True, seed=0,
                                   verbose=False, storage_options=cfg.get("storage_options"),
                                   processes=cfg.get("processes", "auto"))
    try:
        return _parent_only(time_contender(ds, cfg, _local_reads(cfg)), cfg, ds.shard_reader.processes)
    finally:
        ds.shard_reader.close()


def c_shardpack_torch(cfg: dict[str, Any]) -> dict[str, Any]:
    """PyTorch's way: ``ShardIterableDataset`` (contiguous NCHW float32) in a
    ``DataLoader(batch_size=None, num_workers=0)``, decoding on this process's threads (or
    in ``processes=`` of shardpack's own)."""
    from torch.utils.data import DataLoader

    from .torch_data import ShardIterableDataset

    ds = ShardIterableDataset(cfg["source"], split=cfg["split"], image_size=tuple(cfg["image_size"]),
                              batch_size=cfg["batch_size"], shuffle=True, seed=0,
                              storage_options=cfg.get("storage_options"),
                              processes=cfg.get("processes", "auto"))
    try:
        return _parent_only(time_contender(DataLoader(ds, batch_size=None), cfg, _local_reads(cfg)), cfg,
                            ds.reader.processes)
    finally:
        ds.reader.close()


CONTENDERS = {"decode_limit": c_decode_limit, "shardpack_numpy": c_shardpack_numpy,
              "shardpack_tf": c_shardpack_tf, "shardpack_torch": c_shardpack_torch}


def _child(name: str, cfg: dict[str, Any], contenders: dict[str, Any]) -> None:
    result = contenders[name](cfg)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))


# ---------------------------------------------------------------- orchestration (parent side)


def run_contender(
    name: str, cfg: dict[str, Any], *, module: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one contender in a fresh Python process; return its result (with peak RSS).

    ``module``: the command that runs the child (default: ``python -m reader.benchmark``).
    ``env``: variables set for the child on top of this process's.
    """
    cmd = [sys.executable, *(module or ["-m", "reader.benchmark"]), "--contender", name,
           "--config", json.dumps(cfg)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": ((proc.stderr or proc.stdout).strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, plus every run's rate and the spread."""
    ok = [r for r in runs if "images_per_s" in r]
    if not ok:
        return runs[-1] if runs else {"error": "no run"}
    ok.sort(key=lambda r: r["images_per_s"])
    out = dict(ok[(len(ok) - 1) // 2])
    out["images_per_s"] = statistics.median(r["images_per_s"] for r in ok)
    out["runs"] = [round(r["images_per_s"], 1) for r in runs if "images_per_s" in r]
    out["round_rates"] = [r.get("images_per_s") for r in runs]  # by round, None where it failed
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    whole = [r["images_per_s_with_startup"] for r in ok if "images_per_s_with_startup" in r]
    if whole:
        out["images_per_s_with_startup"] = statistics.median(whole)
    return out


def _round_order(names: list[str], round_: int) -> list[str]:
    """Round 0: ``names``; 1: reversed; 2 and 3: the same turned one place; ... (for three
    contenders, six rounds run all six orders)."""
    base = names if round_ % 2 == 0 else names[::-1]
    turn = (round_ // 2) % len(base) if base else 0
    return base[turn:] + base[:turn]


def run_rounds(
    names: list[str], cfg: dict[str, Any], repeat: int, *, module: list[str] | None = None,
    log: Any = print,
) -> dict[str, dict[str, Any]]:
    """Run every contender ``repeat`` times, interleaved, and keep the median of each.

    The first round runs them in the order given, the second in reverse, then the same
    two turned one place further on, and so on (``_round_order``): no contender always
    runs right after the same one, and a rerun repeats the orders. On the 2-core virtual
    machine here a pack right after webdataset's ``ShardWriter`` took 185-261 ms where the
    same pack after another pack took 150-161, while ``tar -cf`` took 101-119 after either
    (docs/SPEED.md, "Run order, and 1 MB writes on a virtual machine")."""
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for round_ in range(repeat):
        for name in _round_order(names, round_):
            r = run_contender(name, cfg, module=module)
            runs[name].append(r)
            rate = f"{r['images_per_s']:.0f} images/s" if "images_per_s" in r else r.get("error")
            log(f"  round {round_ + 1}/{repeat} {name}: {rate} (load {os.getloadavg()[0]:.1f})")
    return {n: median_result(rs) for n, rs in runs.items()}


def contender_label(name: str, result: dict[str, Any]) -> str:
    """The contender's name, with the decode processes its reader took, if any ("auto"
    takes them on 8 CPUs or more, as many as the epoch's size allows)."""
    processes = result.get("processes")
    return f"{name} ({processes} processes)" if processes else name


def format_table(results: dict[str, dict[str, Any]]) -> str:
    limit = results.get("decode_limit", {}).get("images_per_s")
    rows = ["| contender | images/s (median) | runs | × decode limit | whole epoch images/s "
            "| first epoch images/s | cpu ms/img | peak RSS MB |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "images_per_s" not in r:
            rows.append(f"| {name} | error: {r.get('error')} | | | | | | |")
            continue
        rate = r["images_per_s"]
        ratio = f"{rate / limit:.2f}" if limit else "–"
        runs = ", ".join(f"{v:.0f}" for v in r.get("runs", []))
        whole, first = (f"{r[key]:.0f}" if r.get(key) else "–"
                        for key in ("images_per_s_with_startup", "first_epoch_images_per_s"))
        cpu = f"{r['cpu_ms_per_image']:.2f}" if r.get("cpu_ms_per_image") is not None else "–"
        rows.append(f"| {contender_label(name, r)} | {rate:.0f} | {runs} | {ratio} | {whole} | {first} | {cpu} | "
                    f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(rows)


def advice(results: dict[str, dict[str, Any]], n_cores: int, processes: int | str, *, cold: bool = False) -> list[str]:
    """What to try when a reader decoded on threads and stays under 0.9x the decode limit:
    on many cores one process's threads share a GIL with the tar reading and shuffling
    (docs/SPEED.md, "On 16 cores"), which decode processes do not. Threads there mean
    ``processes=0``, or "auto" holding back (an epoch under 1,000 images, /dev/shm without
    room). With few cores nothing of ours helps; from the disk (``cold``) the reads are
    timed too, and more processes do not read faster."""
    limit = results.get("decode_limit", {}).get("images_per_s")
    slow = sorted(name for name, r in results.items()
                  if name != "decode_limit" and limit and "images_per_s" in r
                  and r["images_per_s"] < 0.9 * limit and not r.get("parent_only"))
    if not slow or (processes != "auto" and int(processes) > 1) or n_cores < 8 or cold:
        return []
    from .batches import _AUTO_MIN_SAMPLES_PER_PROCESS

    why = ("" if processes != "auto" else
           f' ("auto" took none: it gives each process {_AUTO_MIN_SAMPLES_PER_PROCESS} images of an '
           "epoch, and takes as many as /dev/shm holds; the log says which held it back)")
    return [f"{', '.join(slow)} under 0.9x the decode limit on {n_cores} cores, decoding on threads"
            f"{why}: one process's decode threads share its GIL. Try decode processes: `shardpack "
            f"bench SOURCE --processes {n_cores // 2}` (ShardReader / image_dataset_from_shards / "
            f"ShardIterableDataset(processes={n_cores // 2}); up to {n_cores} for shards packed "
            "small; docs/READING.md)"]


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (``checks.whole_number``), refused up
    front (a 0 or negative size ran every contender in every round to fail each, or timed
    nothing)."""

    def parse(text: str) -> int:
        try:
            return whole_number(int(text), "the value", minimum=minimum)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc) if "must be" in str(exc) else
                                             f"not a whole number: {text!r}") from None

    return parse


def _processes_arg(text: str) -> int | str:
    """``--processes``: a whole number >= 0, or "auto" (the readers' own choice)."""
    return "auto" if text == "auto" else at_least(0)(text)


def add_epoch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an epoch benchmark on a shard set (split, batch shape, rounds), the
    same in ``shardpack bench`` and the scripts that measure beside it."""
    parser.add_argument("--split", default="train", help="the split to read (default: train)")
    parser.add_argument("--image-size", type=at_least(1), default=224,
                        help="square batch images of this side (default: 224)")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="images per batch (default: 64)")
    parser.add_argument("--repeat", type=at_least(1), default=3,
                        help="runs per contender, the median shown (default: 3)")


def _plain(doc: str) -> str:
    """A docstring as ``--help`` prints it: without reST's double backquotes and roles."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", doc or "").replace("``", "")


def _check_source(cfg: dict[str, Any]) -> str | None:
    """Refuse what would fail in every contender (no manifest, no such split) before four
    processes start, TensorFlow among them; warn about a split too small to time."""
    from packer.format import split_info
    from packer.storage import read_manifest

    manifest = read_manifest(cfg["source"], cfg.get("storage_options"))
    count = int(split_info(manifest, cfg["split"])["count"])
    if count < (cfg["warmup"] + 2) * cfg["batch_size"]:
        return (f"warning: split {cfg['split']!r} holds {count} images, under {cfg['warmup'] + 2} "
                f"batches of {cfg['batch_size']}: images/s then includes the start-up (a "
                "larger split, or a smaller --batch-size / --warmup, measures the steady state)")
    return None


def _unwritable(path: str) -> str | None:
    """Why a results file cannot be written at ``path``, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a folder"
    if not os.path.isdir(folder):
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK):
        return f"{folder} is not writable"
    return None


def _cache_words(cache: str) -> str:
    if cache == "cold":
        return "cold page cache (shards evicted before every epoch, readers timed from its start)"
    return "warm page cache"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shardpack bench", description=_plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="shard folder or URL")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    add_epoch_arguments(parser)
    parser.add_argument("--warmup", type=at_least(0), default=3,
                        help="batches left out of images/s (default: 3; with --cache cold none "
                             "are: every read is timed)")
    parser.add_argument("--epochs", type=at_least(1), default=DEFAULT_EPOCHS,
                        help="epochs each reader runs in its process; the last is timed (default: "
                             f"{DEFAULT_EPOCHS}: the first also builds pipelines and hashes shards)")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    parser.add_argument("--processes", type=_processes_arg, default="auto",
                        help='the readers\' processes= (default "auto", as theirs: as many as suit '
                             "this machine, none below 8 CPUs; 0: threads only; or a number)")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm",
                        help="cold: evict the shards from the page cache before every epoch, "
                             "as for a data set larger than memory (local shards, Linux; the "
                             "decode limit still decodes from RAM)")
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.contender:
        _child(args.contender, json.loads(args.config), CONTENDERS)
        return 0
    if args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    if not args.source:
        parser.error("SOURCE is required")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {sorted(CONTENDERS)}")
    if args.json_out and (problem := _unwritable(args.json_out)):
        parser.error(f"--json {args.json_out}: {problem}")  # before the runs, not after them
    source = args.source if "://" in args.source else os.path.abspath(args.source)
    if args.cache == "cold" and not hasattr(os, "posix_fadvise"):
        parser.error("--cache cold evicts files from the page cache with posix_fadvise, which "
                     "this platform lacks (Linux has it)")
    if args.cache == "cold" and "://" in args.source.removeprefix("file://"):
        parser.error("--cache cold evicts local shard files from the page cache: SOURCE must "
                     "be a local folder")
    cfg = {"source": source, "split": args.split, "image_size": [args.image_size] * 2,
           "batch_size": args.batch_size, "warmup": args.warmup, "processes": args.processes,
           "epochs": args.epochs, "cache": args.cache}
    if args.endpoint_url:
        from packer.storage import storage_options_for

        cfg["storage_options"] = storage_options_for(source, endpoint_url=args.endpoint_url)
    try:
        warning = _check_source(cfg)
    except (ShardpackError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if warning:
        print(warning, file=sys.stderr)
    print(f"shardpack bench: {source} [{args.split}], {args.image_size}x{args.image_size} RGB, "
          f"batches of {args.batch_size}, {cores()} cores, {_cache_words(args.cache)}, "
          f"load {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeat} interleaved runs", flush=True)
    results = run_rounds(names, cfg, args.repeat, log=lambda m: print(m, flush=True))
    print()
    print(format_table(results))
    print(f"\nload average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())} "
          f"on {cores()} cores (above the core count, every rate is shared with other work)")
    for line in advice(results, cores(), args.processes, cold=args.cache == "cold"):
        print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"config": cfg, "results": results, "load": os.getloadavg()}, f, indent=2)
    bad = [n for n, r in results.items() if "images_per_s" not in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
