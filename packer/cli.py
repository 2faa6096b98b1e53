"""The ``shardpack`` command: pack, info, verify, upload, bench, preview.

Each sub-command is a thin shell over a Python function; every option shown in ``--help``
is an argument of that function.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import ShardpackError
from .sizes import counted, format_size

__all__ = ["main", "build_parser"]


def _storage(args: argparse.Namespace, source: str) -> dict[str, Any]:
    from .storage import storage_options_for

    return storage_options_for(source, endpoint_url=getattr(args, "endpoint_url", None))


def _cmd_pack(args: argparse.Namespace) -> int:
    from .job import pack, refuse_unused_options
    from .summary import pack_summary

    refuse_unused_options(resize=args.resize, quality=args.quality, engine=args.engine,
                          scheduler=args.scheduler, typed=True)
    manifest = pack(
        args.src, args.out, max_count=args.max_count, max_size=args.max_size,
        workers=args.workers, seed=args.seed, resize=args.resize, quality=args.quality,
        validation_split=args.validation_split, layout=args.layout,
        follow_links=args.follow_links, validate=args.validate, max_pixels=args.max_pixels,
        engine=args.engine, scheduler=args.scheduler, overwrite=args.overwrite,
        quiet=args.quiet, fsync=not args.no_fsync, storage_options=_storage(args, args.out),
    )
    print(pack_summary(manifest, args.out))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .inspect import info_text
    from .storage import read_manifest

    manifest = read_manifest(args.source, _storage(args, args.source))
    print(json.dumps(manifest, indent=2, ensure_ascii=False) if args.json else info_text(manifest, args.source))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .inspect import verify

    report = verify(args.source, deep=args.deep, storage_options=_storage(args, args.source),
                    progress=not args.quiet)
    for problem in report.problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    state = "OK" if report.ok else f"FAILED ({counted(len(report.problems), 'problem')})"
    decoded = f", {report.images_decoded} images decoded" if args.deep else ""
    print(f"verify {state}: {counted(report.shards, 'shard')}, {counted(report.samples, 'sample')} "
          f"checked{decoded}")
    return 0 if report.ok else 1


def _cmd_upload(args: argparse.Namespace) -> int:
    from .uploader import upload

    summary = upload(args.out, args.url, endpoint_url=args.endpoint_url, workers=args.workers,
                     quiet=args.quiet, force=args.force)
    print(json.dumps(summary, indent=2) if args.json else _upload_text(summary))
    return 0


def _upload_text(summary: dict[str, Any]) -> str:
    """One line, as pack and verify print: what was sent, what was already there."""
    text = (f"uploaded {counted(summary['uploaded'], 'shard')} ({format_size(summary['bytes'])}) to "
            f"{summary['url']}; {summary['skipped']} already there ({format_size(summary['bytes_skipped'])})")
    if summary.get("removed"):
        text += f"; removed {counted(summary['removed'], 'shard')} the manifest no longer names"
    return text + f"; manifest {summary['manifest']}"


def _cmd_preview(args: argparse.Namespace) -> int:
    from reader.contact_sheet import preview

    path = preview(args.source, split=args.split, out=args.out, count=args.count,
                   columns=args.columns, seed=args.seed,
                   storage_options=_storage(args, args.source))
    print(f"wrote {path}")
    return 0


def _add_endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (credentials come "
                        "from the usual AWS environment/config chain)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .job import DEFAULT_MAX_COUNT, DEFAULT_MAX_SIZE
    from .probe import DEFAULT_MAX_PIXELS

    parser = argparse.ArgumentParser(
        prog="shardpack",
        description="Pack class-folder image sets into WebDataset tar shards; inspect, "
                    "verify, upload, benchmark and preview them.",
    )
    parser.add_argument("--version", action="version", version=f"shardpack {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # -v after the command too (``shardpack info OUT -v``); SUPPRESS keeps the global one's value
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log more detail")

    p = sub.add_parser("pack", parents=[verbose], help="pack SRC/{split}/{class}/* into shards under OUT")
    p.add_argument("src", help="image tree: SRC/{split}/{class}/... (or SRC/{class}/... with --validation-split)")
    p.add_argument("out", help="output folder, or an object-store URL (s3://bucket/prefix)")
    p.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT, help="most samples per shard (default %(default)s)")
    p.add_argument("--max-size", default=DEFAULT_MAX_SIZE, help="most bytes per shard: 256MB, 1GiB, ... (default %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: CPU count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order in every split (default 0)")
    p.add_argument("--resize", default=None, help="store images re-encoded: N shrinks the short side to N pixels; "
                   "WxH (e.g. 224x224) stores every image at exactly that size, squashed")
    p.add_argument("--quality", type=int, default=None,
                   help="JPEG quality of images re-encoded by --resize (default 90; needs --resize)")
    p.add_argument("--validation-split", type=float, default=None,
                   help="flat SRC/{class}/ tree: share of each class put in 'validation'")
    p.add_argument("--layout", choices=["auto", "splits", "flat"], default="auto",
                   help="splits: SRC/{split}/{class}; flat: SRC/{class}; auto: flat iff --validation-split")
    p.add_argument("--follow-links", action="store_true", help="follow symbolic links to folders (cycles are detected); links to files are read anyway, as Keras reads them")
    p.add_argument("--validate", choices=["structure", "decode", "header"], default="structure",
                   help="structure (default): headers, declared size and end markers, no pixel "
                        "decoding for JPEG/PNG; decode: decode every image (also catches corrupt "
                        "data inside files); header: headers only")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels as decompression bombs (default %(default)s)")
    p.add_argument("--engine", choices=["local", "dask"], default="local", help="local processes or a Dask cluster")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address (tcp://host:8786), with --engine dask; default: a local cluster")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT made with other options")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not wait for shards and manifest to reach the disk (faster; for "
                        "scratch packs: after a power cut, re-run the pack)")
    _add_endpoint(p)
    p.set_defaults(func=_cmd_pack, command_parser=p)

    p = sub.add_parser("info", parents=[verbose], help="splits, classes, counts, shards, skipped files")
    p.add_argument("source", help="shard folder or URL")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_endpoint(p)
    p.set_defaults(func=_cmd_info, command_parser=p)

    p = sub.add_parser("verify", parents=[verbose], help="re-hash every shard and check every sample against the manifest")
    p.add_argument("source", help="shard folder or URL")
    p.add_argument("--deep", action="store_true", help="also decode every image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_endpoint(p)
    p.set_defaults(func=_cmd_verify, command_parser=p)

    p = sub.add_parser("upload", parents=[verbose], help="upload OUT's shards, then its manifest, to a URL")
    p.add_argument("out", help="local shard folder")
    p.add_argument("url", help="destination, e.g. s3://bucket/prefix")
    p.add_argument("--workers", type=int, default=8, help="parallel uploads (default 8)")
    p.add_argument("--force", action="store_true", help="re-send shards even when already there")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_endpoint(p)
    p.set_defaults(func=_cmd_upload, command_parser=p)

    p = sub.add_parser("bench", help="reader throughput (numpy, tf.data, PyTorch) against the "
                       "decode limit of the same shards", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="see `shardpack bench --help`")

    p = sub.add_parser("preview", parents=[verbose], help="contact sheet of decoded samples with class names")
    p.add_argument("source", help="shard folder or URL")
    p.add_argument("--split", default="train", help="the split to show (default: train)")
    p.add_argument("--out", default="grid.png",
                   help="image to write, its format from the extension (default: grid.png)")
    p.add_argument("--count", type=int, default=32, help="samples to show (default: 32)")
    p.add_argument("--columns", type=int, default=8, help="tiles per row (default: 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="which samples are drawn; another seed, others (default: 0)")
    _add_endpoint(p)
    p.set_defaults(func=_cmd_preview, command_parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shardpack`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, a in enumerate(argv) if a not in ("-v", "--verbose")), len(argv))
    if argv[command : command + 1] == ["bench"]:
        # bench owns its options (reader.benchmark); argparse's REMAINDER would swallow
        # neither a leading ``--help`` nor options placed before SOURCE.
        from reader.benchmark import main as bench_main

        logging.basicConfig(level=logging.INFO if command else logging.WARNING,
                            format="%(levelname)s: %(message)s")
        return _guarded(lambda: int(bench_main(argv[command + 1 :]) or 0))
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the command's own usage, not the top level's, names the options it takes
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    return _guarded(lambda: args.func(args), resumes=args.func in (_cmd_pack, _cmd_upload))


def _guarded(run: Callable[[], int], *, resumes: bool = False) -> int:
    """Run a command; what goes wrong for a reason the user can act on is one line on
    stderr and an exit status, not a traceback: our errors and bad values (2), a file the
    command cannot write (``--out`` naming a folder: 2), a reader of our output that went
    away (``info --json | head``: 1, quietly), Ctrl-C or SIGTERM (130; ``resumes``: the
    command picks up where it stopped when run again, and says so)."""
    try:
        with _terminate_as_interrupt():
            return run()
    except BrokenPipeError:
        # stdout's reader is gone: nothing more to say, and Python's own flush of stdout
        # at exit must not fail again (the Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ShardpackError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume" if resumes else "interrupted",
              file=sys.stderr)
        return 130


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what cluster schedulers and ``kill`` send) stops a command as Ctrl-C does:
    its clean-up runs (worker processes, a pack to a URL's staging folder) instead of the
    process vanishing with them left behind. The caller's handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _default_sigterm_in_child() -> None:
    """Worker processes forked meanwhile (the pack's pool) end on SIGTERM as before: the
    pool sends it to the others when one dies, and each printed a KeyboardInterrupt."""
    if signal.getsignal(signal.SIGTERM) is signal.default_int_handler:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


if __name__ == "__main__":
    sys.exit(main())
