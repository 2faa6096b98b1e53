#!/usr/bin/env python3
"""shardpack's benchmark: reader and packer throughput against anchors measured in the same run.

Builds (or takes) an ImageNet-like class-folder tree, packs it, and runs every contender in
its own subprocess (so each one's peak RSS is its own):

reader contenders (224x224 RGB batches of 64 by default, warm page cache unless --cache cold,
all cores;
each runs --repeat times, interleaved round by round, and the table shows the median)
  decode_limit       libjpeg-turbo decoding the split's bytes from RAM with DCT scaling
                     (simplejpeg at the reader's or any n/8 scale, or Pillow draft: whichever
                     is fastest on a sample of the images, then timed once over all of them;
                     plain PNGs by OpenCV, as the reader decodes them)
                     + the resize, 16 images per thread task into one array, all cores, no
                     I/O (reader.benchmark, the same as `shardpack bench`)
  keras_directory    keras.utils.image_dataset_from_directory on the original files
  webdataset         WebDataset(...).shuffle().decode("pil") + WebLoader (torch) pipeline
  shardpack_numpy    reader.ShardReader
  shardpack_numpy_uint8  the same with dtype="uint8": no float32 cast, the limit's output
  shardpack_tf       reader.image_dataset_from_shards iterated as Keras would
  shardpack_torch    reader.ShardIterableDataset (NCHW float32) in a DataLoader without
                     loader workers (left out when torch is not installed)
  shardpack_tf_resized   the same on shards packed with `--resize 256 --quality 90` (this
                     script's --resize and --quality choose the size and quality)
  decode_limit_resized   the decode limit of those resized shards (what shardpack_tf_resized
                     can reach at most)

packer contenders
  tar_cf             `tar -cf` over the same tree (leaves the archive in the page cache)
  tar_cf_fsync       the same, then fsync of the archive: on disk, as pack() leaves shards
  wds_shardwriter    a plain webdataset.ShardWriter loop (no validation, one process, no fsync)
  shardpack_pack_nofsync  `pack(fsync=False)` (`--no-fsync`): default validation (structure:
                     headers, declared size, end markers), hashing, all cores; compare
                     with tar -cf and ShardWriter, which do not sync either
  shardpack_pack     the default `pack()`: the same, with every shard and the manifest
                     fsynced before it returns; compare with tar -cf + fsync
  shardpack_pack_decode  the default with validate="decode" (every image decoded)
Every packer contender starts after an os.sync(), so none pays for another's dirty pages.

`--cache cold` reads from the disk instead of the page cache, as training and packing a set
larger than the machine's memory do: the files a contender reads (the tree for Keras and
the packers, the shards for the other readers) are evicted from the page cache
(posix_fadvise, no root needed) before every reader epoch and every pack, and a reader's
images/s then runs from its epoch's start to its last batch, so that every read is inside
(a shuffle buffer larger than the split reads it all before the first batch). The decode
limit still decodes from RAM: it is the decode's own limit, without I/O.

`--only resized` runs keras_directory and the two resized contenders alone: with --resize
and --quality, it measures what a pack-time size and quality buy against Keras.

`--scaling 1000 10000 100000` packs that many small JPEGs (and `tar -cf` + fsync of each
tree), --repeat rounds, and shows whether pack cost grows linearly: the rate after the
fixed start-up (a least-squares line through every run) and between neighbouring sizes
stay flat if it does. `--only scaling` runs that alone.

Each reader contender runs --epochs epochs (default 2) in its process and the last is
timed, as training goes on epoch after epoch: a fresh process's first epoch also builds the
pipeline, faults in fresh batch memory and (shardpack) hashes each shard once, and its
whole-epoch rate has a column of its own.

Prints a table of images/s (the steady state, after 3 warm-up batches and before the
iterator is torn down), ratios to the decode limit and to each anchor, the whole epoch's
images/s (start-up and teardown included: what one epoch costs a training loop), CPU ms per
image (less disturbed than images/s on a shared machine), peak RSS, the load average; writes
JSON and a PNG bar chart; ``--update-readme`` puts the table and chart into README.md.

    python scripts/bench.py --images 2000 --out bench_out --update-readme
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
READER_CONTENDERS = [
    "decode_limit", "keras_directory", "webdataset", "shardpack_numpy", "shardpack_numpy_uint8",
    "shardpack_tf", "shardpack_torch",
    "shardpack_tf_resized", "decode_limit_resized",
]
RESIZED_CONTENDERS = ["keras_directory", "shardpack_tf_resized", "decode_limit_resized"]
PACKER_CONTENDERS = ["tar_cf", "tar_cf_fsync", "wds_shardwriter", "shardpack_pack_nofsync",
                     "shardpack_pack", "shardpack_pack_decode"]
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
COLD_START = "<!-- bench-cold:start -->"  # in docs/SPEED.md
COLD_END = "<!-- bench-cold:end -->"


def cores() -> int:
    from packer.engines import default_workers

    return default_workers()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- dataset


def make_imagenet_like_tree(root: Path, *, images: int, classes: int, seed: int) -> Path:
    """Class-folder tree of JPEG crops: long side mostly 300-640 px, ~10% up to 1400,
    quality 75-95, ~3% PNG; 80% train, 20% validation."""
    from packer.examples import PHOTOS, photo, random_crop

    names = list(PHOTOS)[:classes]
    rng = random.Random(seed)
    for i in range(images):
        split = "train" if i % 5 else "validation"
        name = names[i % len(names)]
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        long_side = rng.randint(640, 1400) if rng.random() < 0.1 else rng.randint(300, 640)
        im = random_crop(rng, photo(name), long_side)
        if rng.random() < 0.03:
            im.save(folder / f"{i:07d}.png", format="PNG")
        else:
            im.save(folder / f"{i:07d}.jpg", format="JPEG", quality=rng.randint(75, 95))
    return root


def make_small_tree(root: Path, *, images: int, seed: int) -> Path:
    """Many small JPEGs (for the pack-cost-is-linear run)."""
    from PIL import Image

    rng = random.Random(seed)
    base = [Image.new("RGB", (96, 72), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
            for _ in range(8)]
    payloads = []
    for im in base:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        payloads.append(buf.getvalue())
    for i in range(images):
        folder = root / "train" / f"c{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        # a varying comment segment keeps every file distinct (no duplicate groups)
        data = payloads[i % 8]
        comment = b"\xff\xfe" + (2 + 8).to_bytes(2, "big") + i.to_bytes(8, "big")
        (folder / f"{i:08d}.jpg").write_bytes(data[:2] + comment + data[2:])
    return root


def warm_cache(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass


# ---------------------------------------------------------------- reader contenders


def c_decode_limit(cfg: dict[str, Any]) -> dict[str, Any]:
    # the same measurement as `shardpack bench`: chunked threads into one array, best variant
    from reader.benchmark import c_decode_limit as limit

    return limit(dict(cfg, source=cfg["shards"]))


def c_keras_directory(cfg: dict[str, Any]) -> dict[str, Any]:
    import keras

    from reader.benchmark import time_contender  # timed as the shardpack readers are

    folder = os.path.join(cfg["src"], cfg["split"])
    ds = keras.utils.image_dataset_from_directory(
        folder, image_size=tuple(cfg["image_size"]),
        batch_size=cfg["batch_size"], shuffle=True, seed=0, verbose=False,
    )
    return time_contender(ds, cfg, [folder])


def c_webdataset(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from reader.benchmark import time_contender  # timed as the shardpack readers are

    size = tuple(cfg["image_size"])
    urls = [str(p) for p in sorted((Path(cfg["shards"]) / cfg["split"]).glob("*.tar"))]

    def to_array(im: Any) -> Any:
        return np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR),
                          dtype=np.float32)

    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg;png;webp", "cls")
        .map_tuple(to_array, int)
        .batched(cfg["batch_size"], partial=True)
    )
    try:
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=min(cores(), len(urls)))
        variant = f"WebLoader num_workers={min(cores(), len(urls))}"
    except Exception:  # torch not installed: the pipeline in this process
        loader, variant = pipeline, "no torch: single process"
    result = time_contender(loader, cfg, urls)
    result["variant"] = variant
    return result


def c_shardpack_numpy(cfg: dict[str, Any]) -> dict[str, Any]:
    from reader.benchmark import c_shardpack_numpy as numpy_epoch

    return numpy_epoch(dict(cfg, source=cfg["shards"]))


def c_shardpack_numpy_uint8(cfg: dict[str, Any]) -> dict[str, Any]:
    from reader.benchmark import c_shardpack_numpy as numpy_epoch

    return numpy_epoch(dict(cfg, source=cfg["shards"], dtype="uint8"))


def c_shardpack_tf(cfg: dict[str, Any]) -> dict[str, Any]:
    from reader.benchmark import c_shardpack_tf as tf_epoch

    return tf_epoch(dict(cfg, source=cfg["shards"]))


def c_shardpack_torch(cfg: dict[str, Any]) -> dict[str, Any]:
    from reader.benchmark import c_shardpack_torch as torch_epoch

    return torch_epoch(dict(cfg, source=cfg["shards"]))


def c_shardpack_tf_resized(cfg: dict[str, Any]) -> dict[str, Any]:
    from reader.benchmark import c_shardpack_tf as tf_epoch

    return tf_epoch(dict(cfg, source=cfg["shards_resized"]))


def c_decode_limit_resized(cfg: dict[str, Any]) -> dict[str, Any]:
    return c_decode_limit(dict(cfg, shards=cfg["shards_resized"]))


# ---------------------------------------------------------------- packer contenders


def _count_images(src: Path) -> int:
    return sum(1 for p in src.rglob("*") if p.is_file())


def _settle(cfg: dict[str, Any]) -> None:
    """Flush every dirty page first: a contender must not pay for the previous one's. With
    ``--cache cold``, evict the tree to pack from the page cache too (after its own sync)."""
    if cfg.get("cache") == "cold":
        from reader.benchmark import evict_from_page_cache

        evict_from_page_cache([cfg["src"]])
    else:
        os.sync()
    time.sleep(0.2)


def c_tar_cf(cfg: dict[str, Any], *, fsync: bool = False) -> dict[str, Any]:
    src = Path(cfg["src"])
    target = Path(cfg["scratch"]) / "tar_cf.tar"
    _settle(cfg)
    start = time.perf_counter()
    subprocess.run(["tar", "-cf", str(target), "-C", str(src), "."], check=True)
    if fsync:
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - start
    target.unlink()
    n = _count_images(src)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def c_tar_cf_fsync(cfg: dict[str, Any]) -> dict[str, Any]:
    """``tar -cf`` and an fsync of the archive: the anchor for the default, durable pack."""
    return c_tar_cf(cfg, fsync=True)


def c_wds_shardwriter(cfg: dict[str, Any]) -> dict[str, Any]:
    import webdataset as wds

    src = Path(cfg["src"])
    out = Path(cfg["scratch"]) / "wds_out"
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted({p.name for split in src.iterdir() for p in split.iterdir()})
    _settle(cfg)
    start = time.perf_counter()
    n = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=10000, maxsize=256e6, verbose=0) as sink:
        for path in sorted(src.rglob("*")):
            if not path.is_file():
                continue
            ext = path.suffix.lower().lstrip(".")
            sink.write({"__key__": f"s{n:09d}", ext: path.read_bytes(),
                        "cls": str(classes.index(path.parent.name))})
            n += 1
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def c_shardpack_pack(cfg: dict[str, Any]) -> dict[str, Any]:
    from packer import pack

    out = Path(cfg["scratch"]) / "pack_out"
    shutil.rmtree(out, ignore_errors=True)
    _settle(cfg)
    start = time.perf_counter()
    manifest = pack(cfg["src"], out, quiet=True, workers=cfg.get("workers") or cores(),
                    max_size="64MB", validate=cfg.get("validate", "structure"),
                    fsync=cfg.get("fsync", True))
    seconds = time.perf_counter() - start
    n = sum(s["count"] for s in manifest["splits"].values())
    shutil.rmtree(out)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def c_shardpack_pack_nofsync(cfg: dict[str, Any]) -> dict[str, Any]:
    """The packer with ``fsync=False``: shards left to the kernel, like tar and ShardWriter."""
    return c_shardpack_pack({**cfg, "fsync": False})


def c_shardpack_pack_decode(cfg: dict[str, Any]) -> dict[str, Any]:
    """The packer with ``validate="decode"``: every image fully decoded before packing."""
    return c_shardpack_pack({**cfg, "validate": "decode"})


CONTENDERS = {name: globals()[f"c_{name}"] for name in READER_CONTENDERS + PACKER_CONTENDERS}


# ---------------------------------------------------------------- orchestration


def run_contender(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one contender in a fresh Python process; return its result with peak RSS."""
    cmd = [sys.executable, __file__, "--contender", name, "--config", json.dumps(cfg)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def _child(name: str, cfg: dict[str, Any]) -> None:
    result = CONTENDERS[name](cfg)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))


def _ratio(rate: float, base: float | None) -> str:
    return f"{rate / base:.2f}" if base else "–"


READER_ANCHORS = [("decode limit", "decode_limit"), ("keras dir", "keras_directory"),
                  ("webdataset", "webdataset")]
PACKER_ANCHORS = [("tar -cf", "tar_cf"), ("tar -cf + fsync", "tar_cf_fsync"),
                  ("wds ShardWriter", "wds_shardwriter")]


def targets(resize: int | str = 256, quality: int = 90) -> list[tuple[str, str, str, float | None]]:
    """The issue's targets: (what, contender, anchor, target ratio or None for context only)."""
    return [
        ("ShardReader ÷ decode limit", "shardpack_numpy", "decode_limit", 0.9),
        ('ShardReader(dtype="uint8") ÷ decode limit (both uint8)', "shardpack_numpy_uint8",
         "decode_limit", None),
        ("image_dataset_from_shards ÷ decode limit", "shardpack_tf", "decode_limit", 0.9),
        ("ShardIterableDataset (PyTorch, NCHW) ÷ decode limit", "shardpack_torch", "decode_limit", None),
        (f"image_dataset_from_shards on `--resize {resize} --quality {quality}` shards ÷ "
         "Keras directory on the originals", "shardpack_tf_resized", "keras_directory", 3.0),
        ("the same ÷ the decode limit of the resized shards", "shardpack_tf_resized",
         "decode_limit_resized", 0.9),
        ("pack `--no-fsync` ÷ tar -cf", "shardpack_pack_nofsync", "tar_cf", 0.5),
        ("pack `--no-fsync` ÷ wds ShardWriter", "shardpack_pack_nofsync", "wds_shardwriter", 2.0),
        ("pack (default, fsynced) ÷ wds ShardWriter", "shardpack_pack", "wds_shardwriter", 2.0),
        ("pack (default, fsynced) ÷ tar -cf + fsync", "shardpack_pack", "tar_cf_fsync", None),
    ]


def round_ratios(results: dict[str, dict[str, Any]], contender: str, anchor: str) -> list[float]:
    """The contender's rate over the anchor's, round by round (each pair ran minutes apart
    at most, so a slow stretch of a shared machine cancels out more than in a ratio of
    medians)."""
    pairs = zip(results.get(contender, {}).get("round_rates", []),
                results.get(anchor, {}).get("round_rates", []), strict=False)
    return [c / a for c, a in pairs if c and a]


def format_targets(results: dict[str, dict[str, Any]], resize: int | str = 256, quality: int = 90) -> str:
    """A markdown table: each target's ratio in every round, its median, and how many
    rounds met it."""
    rows = ["| ratio | by round | median | target | rounds at or above |", "|---|---|---:|---:|---:|"]
    for label, contender, anchor, target in targets(resize, quality):
        ratios = round_ratios(results, contender, anchor)
        if not ratios:
            continue
        met = f"{sum(r >= target for r in ratios)} of {len(ratios)}" if target else "–"
        rows.append(f"| {label} | {', '.join(f'{r:.2f}' for r in ratios)} | "
                    f"{statistics.median(ratios):.2f} | {f'≥ {target:g}' if target else '–'} | {met} |")
    return "\n".join(rows)


def format_table(results: dict[str, dict[str, Any]], kind: str) -> str:
    """A markdown table of one kind of contender with ratios to that kind's anchors."""
    from reader.benchmark import contender_label

    reader = kind == "reader"
    names, anchors = (READER_CONTENDERS, READER_ANCHORS) if reader else (PACKER_CONTENDERS, PACKER_ANCHORS)
    names = [n for n in names if n in results]
    bases = [results.get(key, {}).get("images_per_s") for _, key in anchors]
    head = (["contender", "images/s", "runs"]
            + [f"× {label}" for label, _ in anchors]
            + (["whole epoch images/s", "first epoch images/s", "cpu ms/img"] if reader else [])
            + ["peak RSS MB"])
    rows = ["| " + " | ".join(head) + " |",
            "|---|" + "|".join("---" if h == "runs" else "---:" for h in head[1:]) + "|"]
    for name in names:
        r = results.get(name, {})
        if "images_per_s" not in r:
            rows.append(f"| {name} | error: {r.get('error')} |" + " |" * (len(head) - 2))
            continue
        rate = r["images_per_s"]
        cells = [contender_label(name, r), f"{rate:.0f}", ", ".join(f"{v:.0f}" for v in r.get("runs", []))]
        cells += [_ratio(rate, base) for base in bases]
        if reader:
            for key in ("images_per_s_with_startup", "first_epoch_images_per_s"):
                cells.append(f"{r[key]:.0f}" if r.get(key) else "–")
            # None where decode processes did the work: this process's CPU is not the reader's
            cpu = r.get("cpu_ms_per_image")
            cells.append(f"{cpu:.2f}" if cpu is not None else "–")
        cells.append(f"{r['peak_rss_mb']:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def draw_chart(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in READER_CONTENDERS if "images_per_s" in results.get(n, {})]
    rates = [results[n]["images_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colors = ["#888888" if not n.startswith("shardpack") else "#2a7ab9" for n in names]
    ax.barh(names[::-1], rates[::-1], color=colors[::-1])
    if "decode_limit" in results and "images_per_s" in results["decode_limit"]:
        ax.axvline(results["decode_limit"]["images_per_s"], color="#c0392b", linestyle="--",
                   label="decode limit")
        ax.legend(loc="lower right")
    ax.set_xlabel("images / s (higher is better)")
    ax.set_title("Reader throughput, one epoch, 224x224 RGB batches")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cache_words(cache: str) -> str:
    """The page cache's state in the table's header."""
    if cache == "cold":
        return ("cold page cache (what each contender reads is evicted before every reader "
                "epoch and every pack, and each reader's images/s runs from its epoch's start to "
                "its last batch, so that every read is inside; the decode limit decodes from RAM)")
    return "warm page cache"


def machine_line() -> str:
    """Cores and CPU, with what tells CPUs of one brand name apart (model number, AVX-512):
    the anchors' ratios differ between them (TensorFlow's decode and resize against
    libjpeg-turbo and OpenCV: docs/SPEED.md, "The decode limit, corrected")."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = info.get("model name", cpu)
        if "model" in info:
            cpu += f", model {info['model']}"
        if "avx512f" in info.get("flags", "").split():
            cpu += ", AVX-512"
    except (OSError, ValueError):
        pass
    return f"{cores()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"


def update_readme(markdown: str) -> None:
    """Put the (warm) benchmark's tables between README's bench markers."""
    replace_between(REPO / "README.md", README_START, README_END, markdown, new_section="## Speed")


def update_cold_record(markdown: str) -> None:
    """Put a ``--cache cold`` run's tables between docs/SPEED.md's cold markers (README's
    table stays the warm one, which its summary describes)."""
    replace_between(REPO / "docs" / "SPEED.md", COLD_START, COLD_END, markdown,
                    new_section="## From the disk (cold page cache)")


def replace_between(path: Path, start: str, end: str, markdown: str, *, new_section: str) -> None:
    """Replace what lies between the ``start`` and ``end`` markers of ``path`` with
    ``markdown`` (appended under ``new_section`` when the markers are not there yet)."""
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{new_section}\n\n" + block + "\n"
    path.write_text(text)


def scaling_run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Pack each ``--scaling`` size of small JPEGs, with ``tar -cf`` + fsync of the same
    tree as its anchor, ``--repeat`` rounds interleaved (every size once per round, so a
    slow minute on a shared machine moves neighbouring sizes alike). Returns one row per
    size: ``n`` and every round's pack and tar seconds (None where a run failed)."""
    trees = {}
    for n in args.scaling:
        src = work / f"small_{n}"
        if not src.exists():
            make_small_tree(src, images=n, seed=args.seed)
        trees[n] = src
    rows = [{"n": n, "pack_seconds": [], "tar_seconds": []} for n in trees]
    for round_ in range(1, args.repeat + 1):
        for row in rows:
            src = trees[row["n"]]
            if args.cache == "warm":
                warm_cache(src)
            cfg = {"src": str(src), "scratch": str(work / "scratch"), "cache": args.cache}
            for key, name in (("pack_seconds", "shardpack_pack"), ("tar_seconds", "tar_cf_fsync")):
                result = run_contender(name, cfg)
                row[key].append(result.get("seconds"))
            pack_s = row["pack_seconds"][-1]
            rate = f"{row['n'] / pack_s:.0f} images/s" if pack_s else "failed"
            print(f"  round {round_}/{args.repeat} pack {row['n']} small images: {rate}", flush=True)
    return rows


def scaling_only(args: argparse.Namespace, work: Path, argv: list[str] | None) -> int:
    """``--only scaling``: the pack-cost-vs-size run alone (no ImageNet-like tree)."""
    load_before = os.getloadavg()
    rows = scaling_run(args, work)
    load_after = os.getloadavg()
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = "\n".join([
        f"Machine: {machine_line()}. Small JPEGs (96x72, about 1 KB), the default fsynced pack, "
        f"{args.repeat} interleaved rounds, {args.cache} page cache. Load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after.", "", "**Pack cost vs size**", "", format_scaling(rows), "",
        f"Produced by `{command.strip()}`."])
    print("\n" + markdown)
    (work / "scaling.json").write_text(json.dumps(
        {"machine": machine_line(), "scaling": rows, "load": {"before": load_before, "after": load_after}},
        indent=2))
    (work / "scaling.md").write_text(markdown + "\n")
    return 0


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` through ``points`` (``statistics.linear_regression``);
    returns ``(a, b)``. Raises ValueError (``StatisticsError``) when every x is the same."""
    slope, intercept = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return intercept, slope


def format_scaling(rows: list[dict[str, Any]]) -> str:
    """The pack-cost-vs-size table: per size the median pack time and rate, the rate
    after the fixed start-up, the rate between this size and the one before, and the
    pack's rate over tar's (paired by round). Linear cost shows as flat columns 3-4.

    The start-up (process pool, walk, manifest, the fsyncs' latency) is the intercept of
    a least-squares line through every round's (images, seconds); a whole-pack rate
    grows with the size while that fixed part is spread over more images, so it alone
    cannot show linearity. The rate after the start-up is left out ("–") for a size
    whose pack is mostly start-up.
    """
    sized = []
    for row in sorted(rows, key=lambda r: r["n"]):
        packs = [s for s in row["pack_seconds"] if s]
        if packs:
            sized.append((row, statistics.median(packs)))
    points = [(float(row["n"]), s) for row, _ in sized for s in row["pack_seconds"] if s]
    if len({x for x, _ in points}) < 2:
        return "(pack cost vs size needs two sizes that packed)"
    start_up, per_image = linear_fit(points)
    lines = ["| images | pack s (median) | images/s | images/s after start-up | images/s since the size above | ÷ tar -cf + fsync, by round |",
             "|---:|---:|---:|---:|---:|---|"]
    previous = None
    for row, seconds in sized:
        n = row["n"]
        # where the start-up is most of the pack, n / (seconds - start_up) is mostly noise
        after = f"{n / (seconds - start_up):.0f}" if seconds - start_up > seconds / 2 else "–"
        since = (f"{(n - previous[0]) / (seconds - previous[1]):.0f}"
                 if previous and seconds > previous[1] else "–")
        ratios = [t / p for p, t in zip(row["pack_seconds"], row["tar_seconds"], strict=True) if p and t]
        lines.append(f"| {n:,} | {seconds:.3f} | {n / seconds:.0f} | {after} | {since} | "
                     f"{', '.join(f'{r:.2f}' for r in ratios) or '–'} |")
        previous = (n, seconds)
    if per_image > 0:
        line = (f"Least-squares line through every round: {start_up * 1e3:.0f} ms of start-up, "
                f"then {per_image * 1e6:.1f} µs per image ({1 / per_image:,.0f} images/s).")
    else:  # the larger packs were not slower: sizes too small for the noise
        line = "Least-squares line through every round: it does not rise; try larger sizes."
    lines += ["", line]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help="existing class-folder tree (default: build one)")
    parser.add_argument("--out", default="bench_out", help="work folder for data and results")
    parser.add_argument("--images", type=int, default=2000, help="images to generate (default 2000)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per reader contender (median)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs each reader contender runs in its process; the last is timed "
                             "(default 2)")
    parser.add_argument("--only", default="reader,packer",
                        help="reader, packer (comma-separated), resized or scaling (see above)")
    parser.add_argument("--resize", default="256",
                        help="the resized shards' short side, or an exact WIDTHxHEIGHT "
                             "(shardpack pack --resize; default 256)")
    parser.add_argument("--quality", type=int, default=90,
                        help="JPEG quality of the resized shards (default 90)")
    parser.add_argument("--scaling", type=int, nargs="*", default=[],
                        help="also pack this many small images each (e.g. 1000 10000 100000), "
                             "--repeat rounds, with tar -cf + fsync of each as its anchor")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm",
                        help="cold: evict what each contender reads from the page cache before "
                             "every reader epoch and every pack (default warm)")
    parser.add_argument("--update-readme", action="store_true",
                        help="write table and chart into README.md (with --cache cold: the tables "
                             "into docs/SPEED.md, 'From the disk')")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.contender:
        _child(args.contender, json.loads(args.config))
        return 0
    kinds = args.only.split(",")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if set(kinds) - {"reader", "packer", "resized", "scaling"}:
        parser.error(f"--only takes reader, packer, resized or scaling, got {args.only!r}")
    if args.update_readme and not {"reader", "packer"} <= set(kinds):
        parser.error("--update-readme writes the full table: --only must include reader and packer")
    if "scaling" in kinds and not args.scaling:
        parser.error("--only scaling needs the sizes: --scaling 1000 10000 100000")

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "scratch").mkdir(exist_ok=True)
    if kinds == ["scaling"]:
        return scaling_only(args, work, argv)
    src = Path(args.src).resolve() if args.src else work / f"imagenet_like_{args.images}"
    if not args.src and not src.exists():
        print(f"building {args.images} ImageNet-like images in {src} ...", flush=True)
        make_imagenet_like_tree(src, images=args.images, classes=args.classes, seed=args.seed)
    from packer import pack

    shards = work / "shards"
    resized = work / ("shards_resized" if (args.resize, args.quality) == ("256", 90)
                      else f"shards_resized_{args.resize}_q{args.quality}")
    print("packing ...", flush=True)
    pack(src, shards, quiet=True, max_size="64MB", overwrite=True)
    pack(src, resized, quiet=True, max_size="64MB", resize=args.resize, quality=args.quality,
         overwrite=True)
    if args.cache == "warm":
        for tree in (src, shards, resized):
            warm_cache(tree)
    size = [args.image_size, args.image_size]
    cfg = {"src": str(src), "shards": str(shards), "shards_resized": str(resized),
           "split": args.split, "image_size": size, "batch_size": args.batch_size,
           "scratch": str(work / "scratch"), "epochs": args.epochs, "cache": args.cache}
    from reader.benchmark import run_rounds

    results: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    reader_names = (READER_CONTENDERS if "reader" in kinds
                    else RESIZED_CONTENDERS if "resized" in kinds else [])
    if importlib.util.find_spec("torch") is None:
        reader_names = [n for n in reader_names if n != "shardpack_torch"]
    if reader_names:
        print(f"reader contenders, {args.repeat} interleaved rounds ...", flush=True)
        results.update(run_rounds(reader_names, cfg, args.repeat, module=[__file__],
                                  log=lambda m: print(m, flush=True)))
    if "packer" in kinds:
        print(f"packer contenders, {args.repeat} interleaved rounds ...", flush=True)
        results.update(run_rounds(PACKER_CONTENDERS, cfg, args.repeat, module=[__file__],
                                  log=lambda m: print(m, flush=True)))
    load_after = os.getloadavg()
    scaling = scaling_run(args, work) if args.scaling else []

    n_train = sum(1 for p in (src / args.split).rglob("*") if p.is_file())
    header = (f"Machine: {machine_line()}. Data: {n_train} ImageNet-like images in `{args.split}` "
              f"(long side 300–1400 px, JPEG q75–95, ~3% PNG), {args.image_size}x{args.image_size} "
              f"RGB batches of {args.batch_size}, {cache_words(args.cache)}, each reader's epoch {args.epochs} in its "
              f"process{'' if args.cache == 'cold' else ' after 3 warm-up batches'}; "
              f"resized shards packed with `--resize {args.resize} --quality {args.quality}`; "
              f"every rate is the median of {args.repeat} interleaved runs. Load average "
              f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared: "
              f"above {cores()} every rate is shared with other work; CPU ms per image is "
              f"disturbed less; it counts the contender's own process, so not webdataset's "
              f"WebLoader worker processes, and none (–) where shardpack decoded in processes).")
    parts = [header, ""]
    if reader_names:
        parts += ["**Reader**", "", format_table(results, "reader"), ""]
    if "packer" in kinds:
        parts += ["**Packer**", "", format_table(results, "packer"), ""]
    parts += ["**Targets** (ratios of rates measured in the same round)", "", format_targets(results, args.resize, args.quality), ""]
    if scaling:
        parts += ["**Pack cost vs size** (small JPEGs, the default fsynced pack)", "",
                  format_scaling(scaling), ""]
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts.append(f"Produced by `{command.strip()}`.")
    markdown = "\n".join(parts)
    print("\n" + markdown)
    (work / "bench.json").write_text(json.dumps(
        {"machine": machine_line(), "config": cfg, "results": results, "scaling": scaling,
         "load": {"before": load_before, "after": load_after}}, indent=2))
    (work / "bench.md").write_text(markdown + "\n")
    if reader_names:
        draw_chart(results, work / "bench.png")
    if args.update_readme:
        publish(markdown, work, cold=args.cache == "cold")
    return 0


def publish(markdown: str, work: Path, *, cold: bool) -> None:
    """``--update-readme``: a warm run's tables, chart and JSON into README.md and docs/; a
    cold run's into docs/SPEED.md's "From the disk" and docs/bench_cold.json (README's table
    stays the warm one, which its summary describes)."""
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    if cold:
        shutil.copy(work / "bench.json", docs / "bench_cold.json")
        update_cold_record(markdown)
        return
    if (work / "bench.png").exists():
        shutil.copy(work / "bench.png", docs / "bench.png")
        markdown += "\n\n![reader throughput](docs/bench.png)"
    shutil.copy(work / "bench.json", docs / "bench.json")
    update_readme(markdown)


if __name__ == "__main__":
    sys.exit(main())
