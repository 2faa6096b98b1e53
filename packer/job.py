"""``pack()``: the offline pack job, composed in one visible function.

walk -> probe (parallel) -> plan -> resume check -> write (parallel) -> manifest. On the
local process pool, probing and writing overlap: a shard is cut and written as soon as
its files are probed (packer.planner), while later files are still being checked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .digest import content_digest
from .engines import LocalPool, default_workers, get_engine, run_local_fed
from .errors import EmptyPackError, PackError
from .format import MANIFEST_NAME
from .lock import out_lock
from .manifest import build_manifest, write_manifest_atomically
from .plan import Plan, find_duplicates
from .planner import Planner
from .probe import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_VALIDATE,
    VALIDATE_MODES,
    Probe,
    probe_file,
    read_stamped,
)
from .progress import Progress as tqdm
from .resume import Journal, check_output
from .sizes import counted, format_size, parse_size
from .spool import remove as spool_remove
from .spool import spool_path
from .storage import is_remote, refuse_mistyped_url
from .transform import ResizeSpec, parse_resize
from .walk import Candidate, WalkResult, refuse_split_tree_read_as_flat, walk_tree
from .write import ShardResult
from .write_session import WriteSession, os_errors_as_pack_error, write_task

__all__ = ["pack", "DEFAULT_MAX_COUNT", "DEFAULT_MAX_SIZE"]

log = logging.getLogger("shardpack")

DEFAULT_MAX_COUNT = 10_000
DEFAULT_MAX_SIZE = "256MB"
DEFAULT_QUALITY = 90  # JPEG quality of images re-encoded by --resize
# Files per probe task. A task costs the parent about 0.3 ms however many files it holds
# (submitting, pickling, the result's hand-back, the wait): with 64 files that was a
# sixth of the parent's time per file. 256 cheap probes (header or structure checks,
# ~35-110 us a file) cut it: packs of 3,000 ImageNet-like files, 2 workers, 20 of each
# alternating, went from medians of ~12,000-12,300 to ~13,250-13,450 images/s (the
# parent's median 26.5-28 -> 22.5-23 us of CPU a file, in two runs of 10). A probe that
# decodes or re-encodes every image takes milliseconds a file: there the hand-off is
# nothing, and smaller tasks keep progress smooth and the workers' last tasks even.
PROBE_CHUNK = 256
PROBE_CHUNK_COSTLY = 64  # validate="decode" or --resize
PROBE_CHUNK_DASK = 1024  # a Dask task costs more: a million files stay ~1,000 tasks
# Probe tasks each worker gets at least, where there are files enough: with fewer, the
# last wave of tasks leaves workers idle (6,000 files in tasks of 256 are 24 tasks, a
# wave and a half on 16 workers).
PROBE_TASKS_PER_WORKER = 4


def pack(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    max_size: int | str = DEFAULT_MAX_SIZE,
    workers: int | None = None,
    seed: int = 0,
    resize: int | str | None = None,
    quality: int | None = None,
    validation_split: float | None = None,
    layout: str = "auto",
    follow_links: bool = False,
    validate: str = DEFAULT_VALIDATE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    engine: str = "local",
    scheduler: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    fsync: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pack ``src/{split}/{class}/*`` into WebDataset shards under ``out``.

    Args:
        src: the image tree (``{split}/{class}/...``, or ``{class}/...`` with
            ``validation_split`` / ``layout="flat"``).
        out: output folder (created), or an object-store URL (shards are staged locally,
            then uploaded; the manifest goes last).
        max_count: most samples per shard.
        max_size: most bytes per shard (``"256MB"``, ``"1GiB"`` or an int); exceeded only by
            a shard holding one sample that is bigger on its own.
        workers: processes that probe and write side by side (default: CPU count).
        seed: decides the order of samples in every split (and the validation split).
        resize: store images with their short side shrunk to this many pixels, or
            ``"WxH"`` for exactly that size (re-encoded as JPEG at ``quality``; as PNG where
            there is alpha, a PNG colour key included, or a side over 65,500 px; a JPEG or
            MPO already at the size is stored as it came); None keeps original bytes.
        quality: JPEG quality for ``resize`` (default 90); refused without ``resize``,
            where nothing is re-encoded.
        validation_split: for a flat tree, the share of each class that goes to
            ``validation`` (the rest to ``train``).
        layout: ``"splits"``, ``"flat"``, or ``"auto"`` (flat exactly when a
            ``validation_split`` is given).
        follow_links: follow symbolic links to folders below the class folders, and split
            and class folders that are links (cycles are detected and broken). A link to
            a file is read either way, as Keras reads one.
        validate: ``"structure"`` (default) checks headers, declared size and end
            markers of JPEG/PNG without decoding (catches truncation) and decodes other
            formats; ``"decode"`` decodes every image (also catches corrupt data inside a
            file); ``"header"`` only reads headers (fastest, weakest).
        max_pixels: images with more pixels are refused as decompression bombs.
        engine: ``"local"`` (process pool) or ``"dask"``.
        scheduler: Dask scheduler address (``tcp://host:8786``); default a local cluster.
            Refused unless ``engine="dask"``.
        overwrite: replace an OUT made with other options.
        quiet: no progress bars.
        fsync: flush every shard, the journal's header and the manifest to disk before
            returning, so a power cut never leaves a manifest naming data that is not
            there. False (``--no-fsync``, like ``tar`` and webdataset's ShardWriter) leaves
            that to the kernel: faster, for scratch packs. After a power cut, re-run the
            pack: it rewrites whatever does not hash to its record (if the cut also lost
            the journal, it asks for ``overwrite``); readers verify each shard's sha256
            before using it. An object-store OUT ignores it.
        storage_options: passed to fsspec when ``out`` is a URL.

    Returns:
        The manifest dict that was written.

    Raises:
        LayoutError: the tree cannot be labelled without guessing.
        PackError: OUT is SRC or holds it (see ``refuse_out_over_src``).
        OutputExistsError: OUT holds something else and ``overwrite`` is False (at a URL
            also: its manifest may not be read, so what is there cannot be checked).
        OutputLockedError: another pack is writing into OUT (``packer.lock``).
        PackError: OUT cannot be written (disk full, permissions) or inputs changed mid-run.
        ValueError: invalid options, or an OUT like ``s3:/bucket`` (a URL missing a slash).
    """
    out_str = os.fspath(out)
    refuse_mistyped_url(out_str)  # s3:/bucket (one slash) would pack into a local folder "s3:"
    if workers is not None and int(workers) < 0:
        raise ValueError(f"workers must be 0 or more (0: one per CPU), got {workers}")
    refuse_unused_options(resize=resize, quality=quality, engine=engine, scheduler=scheduler)
    quality = DEFAULT_QUALITY if quality is None else quality
    if engine == "dask":  # a Dask worker resolves a relative path in its own working folder
        src = os.path.abspath(src)
        if not is_remote(out_str):
            out_str = os.path.abspath(out_str.removeprefix("file://"))
    if is_remote(out_str):
        from .remote_out import pack_to_url

        with a_dead_worker_is_a_pack_error():
            return pack_to_url(
                src, out_str, storage_options=storage_options, max_count=max_count,
                max_size=max_size, workers=workers, seed=seed, resize=resize, quality=quality,
                validation_split=validation_split, layout=layout, follow_links=follow_links,
                validate=validate, max_pixels=max_pixels, engine=engine, scheduler=scheduler,
                overwrite=overwrite, quiet=quiet,
            )
    out_dir = out_str.removeprefix("file://")
    refuse_out_over_src(src, out_dir)
    options = normalize_options(
        max_count=max_count, max_size=max_size, seed=seed, resize=resize, quality=quality,
        validation_split=validation_split, layout=layout, follow_links=follow_links,
        validate=validate, max_pixels=max_pixels, src=src,
    )
    resize_spec = parse_resize(resize, quality=quality)
    workers = workers or default_workers()
    with contextlib.ExitStack() as stack:
        stack.enter_context(out_lock(out_dir))  # until the manifest is published
        check_output(out_dir, options, overwrite=overwrite)
        pool, run, check_workers = job_engine(stack, engine, workers=workers, scheduler=scheduler)
        if engine == "local":
            pool.start()
        with a_dead_worker_is_a_pack_error():
            return _pack_with(
                src, out_dir, options, resize_spec=resize_spec, quiet=quiet, run=run,
                probe_chunk=probe_chunk_size(engine, resize=resize_spec, validate=validate),
                workers=probe_workers(engine, workers, scheduler),
                check_workers=check_workers, sync_in_writer=engine != "local", durable=fsync,
                fed=_fed_runner(workers, pool) if engine == "local" else None,
            )
    raise AssertionError("unreachable")


@contextlib.contextmanager
def a_dead_worker_is_a_pack_error() -> Iterator[None]:
    """A pool worker killed mid-pack (the OOM killer) ends the pack with a PackError that
    says what happened and that a re-run resumes, not a BrokenProcessPool traceback; to a
    local OUT and to a URL alike."""
    try:
        yield
    except BrokenProcessPool as exc:
        raise PackError(
            "a worker process of the pack died (killed, or out of memory: fewer --workers "
            "use less); re-run the same command to resume"
        ) from exc


def probe_chunk_size(engine: str, *, resize: ResizeSpec | None, validate: str) -> int:
    """Files per probe task (see ``PROBE_CHUNK``): large for cheap probes, small for probes
    that decode or re-encode every image, larger still for Dask's costlier tasks."""
    if engine == "dask":
        return PROBE_CHUNK_DASK
    if resize is not None or validate == "decode":
        return min(PROBE_CHUNK, PROBE_CHUNK_COSTLY)
    return PROBE_CHUNK


def probe_workers(engine: str, workers: int, scheduler: str | None) -> int:
    """The workers that probe tasks are spread over: the local pool's, or the Dask cluster
    this job starts; a cluster named by ``scheduler`` has a size of its own, unknown here,
    so its tasks keep their size (1)."""
    return 1 if engine == "dask" and scheduler is not None else workers


def even_probe_chunk(chunk: int, files: int, workers: int) -> int:
    """``chunk``, or fewer files per task where that leaves a worker fewer than
    ``PROBE_TASKS_PER_WORKER`` tasks (6,000 files on 16 workers: 94 a task)."""
    return max(1, min(chunk, -(-files // (max(1, workers) * PROBE_TASKS_PER_WORKER))))


def refuse_out_over_src(src: str | os.PathLike[str], out_dir: str) -> None:
    """Refuse an OUT that is SRC itself or a folder SRC lies in (compared by identity, so
    symbolic links and other spellings of one folder count).

    Either way the shards (and, on a re-pack, the clean-up of old ones) would go among the
    source images: ``pack data data --overwrite`` wrote shards into the tree it packed, and
    its next walk would read them back. OUT inside SRC is fine: the walk leaves it out.

    Raises:
        PackError: saying which folder to choose instead.
    """
    try:
        out_stat = os.stat(out_dir)
    except OSError:
        return  # OUT does not exist yet: SRC cannot be in it
    folder = os.path.realpath(src)
    while True:
        try:
            if os.path.samestat(os.stat(folder), out_stat):
                break
        except OSError:
            return  # SRC is missing: the walk says so
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent
    if folder == os.path.realpath(src):
        raise PackError(
            f"SRC and OUT are the same folder ({os.fspath(src)}): the shards would be written "
            "among the images. Choose another OUT, e.g. a new folder beside SRC (or inside it: "
            "the walk leaves OUT out)"
        )
    raise PackError(
        f"SRC {os.fspath(src)} lies inside OUT {out_dir}: the shards would be written among the "
        "source folders. Choose an OUT that does not hold SRC, e.g. a new folder beside it"
    )


def refuse_unused_options(
    *, resize: int | str | None, quality: int | None, engine: str, scheduler: str | None,
    typed: bool = False,
) -> None:
    """Refuse an option that the rest of the command would ignore: ``quality`` without
    ``resize`` (only re-encoded images have a JPEG quality; the originals are stored as
    they are) and ``scheduler`` without the Dask engine (the pack would run locally). A
    user who passed one expects it to act; packing without saying so hides the mistake.
    ``pack(quality=90)``, the old default, is let through for code that always passes it;
    ``typed`` (the command line, where the user typed it) refuses any quality.

    Raises:
        ValueError: naming the option and what to do.
    """
    if quality is not None and (typed or quality != DEFAULT_QUALITY) and parse_resize(resize) is None:
        raise ValueError(
            f"--quality {quality} applies only to images re-encoded by --resize; without "
            "--resize the original bytes are stored. Add --resize N (or WxH), or drop --quality"
        )
    if scheduler is not None and engine != "dask":
        raise ValueError(
            f"--scheduler {scheduler} is a Dask scheduler, but the engine is {engine!r}: the "
            "pack would run on local processes. Add --engine dask, or drop --scheduler"
        )


def job_engine(
    stack: contextlib.ExitStack, engine: str, *, workers: int, scheduler: str | None
) -> tuple[LocalPool, Callable[..., Any], Callable[[dict[str, str]], None] | None]:
    """What a whole pack job (to a folder or a URL) runs on, held by ``stack`` until it ends:
    the local pool; with Dask and no scheduler, one LocalCluster for every phase and batch
    (not one per call); with a scheduler, the check that its workers see the job's paths as
    this machine does. Returns ``(pool, run, check_workers or None)``."""
    pool = LocalPool(workers)
    stack.callback(pool.close)
    check_workers = None
    if engine == "dask" and scheduler is None:
        from .dask_engine import local_cluster

        scheduler = stack.enter_context(local_cluster(workers))
    elif engine == "dask":
        from .dask_engine import check_workers_see

        check_workers = functools.partial(check_workers_see, str(scheduler))
    return pool, _engine_runner(engine, workers=workers, scheduler=scheduler, pool=pool), check_workers


def _pack_with(
    src: str | os.PathLike[str], out_dir: str, options: dict[str, Any], *,
    resize_spec: ResizeSpec | None, quiet: bool, run: Callable[..., Any], probe_chunk: int,
    check_workers: Callable[[dict[str, str]], None] | None, sync_in_writer: bool = False,
    durable: bool = True, fed: Callable[..., Any] | None = None, workers: int = 1,
) -> dict[str, Any]:
    """The pipeline itself: walk -> probe -> plan -> write -> manifest.

    ``probe_chunk``: files per probe task, fewer where ``workers`` would not each get a few
    tasks (``even_probe_chunk``).

    ``sync_in_writer``: each writer fsyncs its own shard (Dask workers may be other
    machines, whose caches an fsync here would not flush). ``durable``: see pack's
    ``fsync``. ``fed``: a runner that takes tasks as they become ready
    (``engines.run_local_fed``): probing and writing then overlap.
    """
    follow_links, validate, max_pixels = (
        options["follow_links"], options["validate"], options["max_pixels"]
    )
    walked = walk_counted(src, layout=options["layout"], follow_links=follow_links, exclude=out_dir,
                          quiet=quiet)
    for warning in walked.warnings:
        log.warning(warning)
    if check_workers is not None and walked.candidates:
        # A remote worker that does not mount SRC would report its files unreadable (and
        # they would be skipped); one that does not mount OUT would write shards elsewhere.
        check_workers({"SRC": walked.candidates[0].abs_path, "OUT": _out_marker(out_dir)})
    spool = spool_path(out_dir) if resize_spec is not None else None
    probe_chunk = even_probe_chunk(probe_chunk, len(walked.candidates), workers)
    try:
        if fed is not None:
            plan, skipped, ignored, results = probe_and_write(
                walked, out_dir, options, fed=fed, chunk=probe_chunk, resize=resize_spec,
                quiet=quiet, durable=durable, sync_in_writer=sync_in_writer, spool=spool)
        else:
            probes = probe_all(
                walked.candidates, run=run, validate=validate, max_pixels=max_pixels,
                resize=resize_spec, quiet=quiet, chunk=probe_chunk, spool=spool,
            )
            plan, skipped, ignored = make_plan(walked, probes, options)
            refuse_no_images(plan, skipped, ignored)
            results = write_plan(plan, out_dir, run=run, resize=resize_spec, quiet=quiet,
                                 durable=durable, sync_in_writer=sync_in_writer, spool=spool)
    except EmptyPackError:
        spool_remove(spool_path(out_dir))  # refused: OUT is left as it was
        raise
    spool_remove(spool_path(out_dir))  # this run's, or one an interrupted --resize run left
    noticed = plan_warnings(plan)
    for warning in noticed:
        log.warning(warning)
    manifest = build_manifest(
        plan, results, skipped=skipped, ignored=ignored, duplicates=find_duplicates(plan, source_sha256),
        warnings=walked.warnings + noticed,
    )
    with os_errors_as_pack_error(os.path.join(out_dir, MANIFEST_NAME)):
        write_manifest_atomically(out_dir, manifest, durable=durable)
    Journal.discard(out_dir)  # the manifest now records every shard
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, ".shardpack-workers-check"))
    return manifest


def walk_counted(
    src: str | os.PathLike[str], *, layout: str, follow_links: bool,
    exclude: str | os.PathLike[str] | None = None, quiet: bool = False,
) -> WalkResult:
    """``walk_tree`` with a running count of the files found ("listing"; none when
    ``quiet``): listing a huge tree before the first file is checked said nothing."""
    with tqdm(unit="file", desc="listing", disable=True if quiet else None, leave=False) as bar:
        return walk_tree(src, layout=layout, follow_links=follow_links, exclude=exclude,
                         found=lambda n: bar.update(n - bar.n))


def source_sha256(path: str, digest: str) -> str | None:
    """sha256 of a source file that still holds the bytes packed from it (their content
    digest is ``digest``); None when it changed or cannot be read (``find_duplicates``)."""
    try:
        data, _ = read_stamped(path)
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest() if content_digest(data) == digest else None


def refuse_no_images(plan: Plan, skipped: list[tuple[str, str]], ignored: list[tuple[str, str]]) -> None:
    """Refuse a pack in which not one image could be packed, before OUT changes: its
    manifest would only make every reader fail later (``EmptySplitError``), far from the
    cause. Keras refuses such a directory at once ("No images found").

    Raises:
        EmptyPackError: saying what was found instead.
    """
    if any(shard.samples for shards in plan.shards.values() for shard in shards):
        return
    found = f"{len(plan.shards)} split(s) and {len(plan.classes)} class folder name(s)"
    why = (f"; {len(skipped)} image-like files were skipped, e.g. {skipped[0][0]}: {skipped[0][1]}"
           if skipped else "")
    raise EmptyPackError(
        f"no images found to pack: {found}, {len(ignored)} non-image files ignored{why}. "
        "Nothing was written. Expected image files (.jpg, .png, ...) in SRC/{split}/{class}/ "
        "(or SRC/{class}/ with --validation-split)"
    )


def plan_warnings(plan: Plan) -> list[str]:
    """What the plan does that the options did not ask for. A split without images packs
    (the others are usable), with a warning: readers refuse it (``EmptySplitError``), as
    Keras refuses a folder without images. A sample bigger than ``max_size`` goes alone
    into a shard over the limit (``--max-size 1KB``: every shard over it), which is said."""
    warnings = [f"split {split!r} holds no images (its class folders are empty or all their "
                "files were skipped): readers refuse it"
                for split, shards in sorted(plan.shards.items()) if not any(s.samples for s in shards)]
    max_size = int(plan.options.get("max_size") or 0)
    over = [shard for shard in plan.all_shards() if max_size and shard.planned_bytes > max_size]
    if over:
        warnings.append(
            f"{counted(len(over), 'shard')} {'exceeds' if len(over) == 1 else 'exceed'} --max-size "
            f"{format_size(max_size)}, each holding "
            f"one image bigger than that (e.g. {over[0].samples[0].rel_path}): raise --max-size")
    return warnings


def normalize_options(
    *, max_count: int, max_size: int | str, seed: int, resize: int | str | None, quality: int,
    validation_split: float | None, layout: str, follow_links: bool, validate: str,
    max_pixels: int, src: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Check the options and return those that decide the output's bytes (recorded in the
    manifest, compared on resume). With ``src``, an automatic layout that reads it flat
    (``validation_split``) is also checked against the tree.

    Raises:
        ValueError: an option is out of range; the message says the accepted values.
        LayoutError: ``validation_split`` on a ``{split}/{class}`` tree (see
            ``walk.refuse_split_tree_read_as_flat``).
    """
    if int(max_count) < 1:
        raise ValueError(f"max_count must be at least 1, got {max_count}")
    if int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels} (it would refuse every image)")
    if not 1 <= int(quality) <= 100:  # checked with --resize too, but a wrong value is wrong without
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if validation_split is not None and not 0 <= float(validation_split) < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
    if layout == "auto":
        layout = "flat" if validation_split is not None else "splits"
        if layout == "flat" and src is not None:
            refuse_split_tree_read_as_flat(src)
    if layout not in ("splits", "flat"):
        raise ValueError(f"layout must be 'auto', 'splits' or 'flat', got {layout!r}")
    if layout == "splits" and validation_split is not None:
        raise ValueError(
            "validation_split divides a flat {class}/ tree; a {split}/{class}/ tree already "
            "has its splits (drop --validation-split, or pass --layout flat)"
        )
    spec: ResizeSpec | None = parse_resize(resize, quality=quality)
    return {
        "max_count": int(max_count),
        "max_size": parse_size(max_size),
        "seed": int(seed),
        "resize": spec.as_dict() if spec else None,
        "validation_split": None if validation_split is None else float(validation_split),
        "layout": layout,
        "follow_links": bool(follow_links),
        "validate": validate,
        "max_pixels": int(max_pixels),
    }


def _engine_runner(
    engine: str, *, workers: int, scheduler: str | None, pool: LocalPool
) -> Callable[..., Any]:
    run_engine = get_engine(engine)

    def run(fn: Callable[[Any], Any], items: Iterable[Any]) -> Any:
        return run_engine(fn, items, workers=workers, scheduler=scheduler, pool=pool)

    return run


def _fed_runner(workers: int, pool: LocalPool) -> Callable[..., Any]:
    def fed(next_task: Callable[[], Any]) -> Any:
        return run_local_fed(next_task, workers=workers, pool=pool)

    return fed


def _probe_chunk(
    task: tuple[int, list[str], str, int, ResizeSpec | None, str | None],
) -> tuple[int, list[Probe]]:
    start, paths, validate, max_pixels, resize, spool = task
    return start, [probe_file(p, validate=validate, max_pixels=max_pixels, resize=resize, spool=spool)
                   for p in paths]


def _out_marker(out_dir: str) -> str:
    """A small file in OUT that every Dask worker must see (removed with the journal)."""
    with os_errors_as_pack_error(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        marker = os.path.join(out_dir, ".shardpack-workers-check")
        with open(marker, "w") as f:
            f.write("shardpack: every worker must see this file\n")
    return marker


def probe_all(
    candidates: list[Candidate], *, run: Callable[..., Any], validate: str, max_pixels: int,
    resize: ResizeSpec | None, quiet: bool, chunk: int = PROBE_CHUNK, spool: str | None = None,
) -> list[Probe]:
    """Probe every candidate in parallel; results in candidate order (``spool``: see
    packer.spool)."""
    tasks = [
        (i, [c.abs_path for c in candidates[i : i + chunk]], validate, max_pixels, resize, spool)
        for i in range(0, len(candidates), chunk)
    ]
    probes: list[Probe | None] = [None] * len(candidates)
    with tqdm(total=len(candidates), unit="img", desc="checking", disable=True if quiet else None) as bar:
        for _, (start, results) in run(_probe_chunk, tasks):
            probes[start : start + len(results)] = results
            bar.update(len(results))
    return probes  # type: ignore[return-value]


def make_plan(
    walked: WalkResult, probes: list[Probe], options: dict[str, Any],
) -> tuple[Plan, list[tuple[str, str]], list[tuple[str, str]]]:
    """Turn walked candidates and all their probes into the plan; also return
    skipped/ignored files."""
    planner = Planner(walked, options)
    for index in planner.probe_order():
        planner.add(index, probes[index])
    return planner.finish()


def write_plan(
    plan: Plan, out_dir: str, *, run: Callable[..., Any], resize: ResizeSpec | None, quiet: bool,
    durable: bool = True, sync_in_writer: bool = False, spool: str | None = None,
) -> dict[str, ShardResult]:
    """Write every shard the plan names, keeping identical leftovers; return results by name.

    ``durable``: every shard is fsynced (on a background thread, overlapping the writing
    of the next ones) before this returns, so a manifest written afterwards never names
    data still in the page cache; staging copies that are uploaded and deleted skip it."""
    totals = {split: sum(len(s.samples) for s in shards) for split, shards in plan.shards.items()}
    with WriteSession(out_dir, plan.options, resize=resize, quiet=quiet, durable=durable,
                      sync_in_writer=sync_in_writer, spool=spool, expected=totals.__getitem__) as session:
        tasks = [task for shard in plan.all_shards() if (task := session.add(shard)) is not None]
        for task, result in run(write_task, tasks):
            session.done(task, result)
        return session.close()


def probe_and_write(
    walked: WalkResult, out_dir: str, options: dict[str, Any], *, fed: Callable[..., Any],
    chunk: int, resize: ResizeSpec | None, quiet: bool, durable: bool, sync_in_writer: bool,
    spool: str | None,
) -> tuple[Plan, list[tuple[str, str]], list[tuple[str, str]], dict[str, ShardResult]]:
    """Probe and write at once: files are probed in plan order, and each shard is written
    as soon as its files are known, while later files are still being probed.

    On 3,000 images and 2 workers the phases one after the other left the workers idle
    for a fifth of the pack: while the plan was made, and while the last shard was
    written alone.
    """
    planner = Planner(walked, options)
    candidates = walked.candidates
    order = planner.probe_order()
    chunks = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    probes_left = deque(
        (n, [candidates[i].abs_path for i in indices], options["validate"], options["max_pixels"],
         resize, spool)
        for n, indices in enumerate(chunks)
    )
    writes: deque[Any] = deque()

    def next_task() -> tuple[Callable[[Any], Any], Any] | None:
        if writes:  # a ready shard goes first: its samples' memory is freed sooner
            return write_task, writes.popleft()
        if probes_left:
            return _probe_chunk, probes_left.popleft()
        return None

    with WriteSession(out_dir, options, resize=resize, quiet=quiet, durable=durable,
                      sync_in_writer=sync_in_writer, spool=spool, expected=planner.expected,
                      bar_offset=1) as session, \
            tqdm(total=len(candidates), unit="img", desc="checking",
                 disable=True if quiet else None) as bar:
        for (fn, task), result in fed(next_task):
            if fn is write_task:
                session.done(task, result)
                continue
            number, probes = result
            for index, probe in zip(chunks[number], probes, strict=True):
                for shard in planner.add(index, probe):
                    if (ready := session.add(shard)) is not None:
                        writes.append(ready)
            bar.update(len(probes))
        plan, skipped, ignored = planner.finish()
        refuse_no_images(plan, skipped, ignored)  # before close: it would take OUT's manifest down
        results = session.close()
    return plan, skipped, ignored, results
