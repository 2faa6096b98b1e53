"""Decode throughput: one thread vs a thread pool vs a process pool, and ShardReader end to end.

Why this exists: it is the evidence for decoding on threads (reader/batches.py). Fixed seeds;
prints a table and writes JSON. Usage::

    python scripts/bench_decode.py [--images 600] [--image-size 224] [--workers N] [--out bench_out/decode.json]
    python scripts/bench_decode.py --float-rows SHARDS [--images 400]   # reader.decode._FLOAT_RESIZE_MAX_AREA
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import webdataset as wds

from packer.examples import random_crop_jpeg
from reader import ShardReader
from reader.decode import DecodeOptions, decode_image


def _decode_all(datas: list[bytes], options: DecodeOptions) -> int:
    return sum(decode_image(d, options).shape[0] for d in datas)


def _one(args: tuple[bytes, DecodeOptions]):
    return decode_image(*args)


def gil_probe(work, seconds: float = 0.3) -> float:
    """Speed of a pure-Python thread while ``work`` runs, relative to its speed alone.

    About 0.5 when ``work`` is Python too (the two share the GIL), near 0 when ``work`` is a
    C call that keeps the GIL, clearly above 0.5 when it releases the GIL. Unlike a
    throughput ratio this holds on a busy machine with no idle core.
    """
    import threading

    def rate(run) -> float:
        done, ticks = threading.Event(), [0]

        def count() -> None:
            while not done.is_set():
                ticks[0] += 1

        thread = threading.Thread(target=count)
        thread.start()
        t = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t
        done.set()
        thread.join()
        return ticks[0] / elapsed

    return rate(work) / rate(lambda: time.sleep(seconds))


def float_row_costs(blobs: list[bytes], size: int, thresholds: list[float]) -> dict[float, float]:
    """ms per image of ``decode_image`` into a float32 batch row, for each value of the
    float32-resize threshold (``reader.decode._FLOAT_RESIZE_MAX_AREA``; 0 = never).

    Paired: each image is decoded under every threshold in turn, four times, and its best
    time per threshold counts, so a slow moment on this shared machine hits all alike. Rows
    cycle through 256 batch rows (150 MB), so each write lands in cold memory as in a reader.
    """
    import numpy as np

    import reader.decode as decode

    options = DecodeOptions(image_size=(size, size))
    rows = np.zeros((256, size, size, 3), np.float32)
    total = dict.fromkeys(thresholds, 0.0)
    saved, k = decode._FLOAT_RESIZE_MAX_AREA, 0
    try:
        for data in blobs:
            best = dict.fromkeys(thresholds, float("inf"))
            for _ in range(4):
                for threshold in thresholds:
                    decode._FLOAT_RESIZE_MAX_AREA = threshold
                    k += 1
                    t = time.perf_counter()
                    decode_image(data, options, out=rows[k % len(rows)])
                    best[threshold] = min(best[threshold], time.perf_counter() - t)
            for threshold in thresholds:
                total[threshold] += best[threshold]
    finally:
        decode._FLOAT_RESIZE_MAX_AREA = saved
    return {threshold: seconds / len(blobs) * 1e3 for threshold, seconds in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default="bench_out/decode.json")
    parser.add_argument("--float-rows", metavar="SHARDS",
                        help="only time decode into float32 rows per float32-resize threshold, "
                             "on the train split of these shards")
    parser.add_argument("--thresholds", default="0,1.5,2,2.5,3,3.5")
    args = parser.parse_args()
    if args.float_rows:
        from reader.benchmark import split_image_bytes

        blobs = split_image_bytes(args.float_rows, "train")[: args.images]
        costs = float_row_costs(blobs, args.image_size, [float(t) for t in args.thresholds.split(",")])
        print(f"{len(blobs)} images of {args.float_rows}, decoded into float32 rows of "
              f"{args.image_size}x{args.image_size}; ms per image (best of 4, paired):")
        for threshold, ms in costs.items():
            print(f"  float32 resize up to {threshold:g}x the row's pixels: {ms:.4f}")
        return

    rng = random.Random(0)
    classes = ["astronaut", "cat", "coffee", "rocket"]
    # ImageNet-like: long side 400..500 px, JPEG quality 75..95
    datas = [random_crop_jpeg(rng, classes[i % 4], long_side=(400, 500)) for i in range(args.images)]
    options = DecodeOptions(image_size=(args.image_size, args.image_size))
    results: dict[str, float] = {}

    t = time.perf_counter()
    _decode_all(datas, options)
    results["1 thread"] = args.images / (time.perf_counter() - t)

    with ThreadPoolExecutor(args.workers) as pool:
        t, cpu = time.perf_counter(), time.process_time()
        list(pool.map(decode_image, datas, [options] * len(datas)))
        wall = time.perf_counter() - t
        results[f"{args.workers} threads"] = args.images / wall
        # > 1 means the threads really ran at once: Pillow released the GIL
        results["threads: cores busy (cpu/wall)"] = (time.process_time() - cpu) / wall

    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(_one, [(datas[0], options)] * args.workers))  # start the workers first
        t = time.perf_counter()
        list(pool.map(_one, [(d, options) for d in datas], chunksize=8))
        results[f"{args.workers} processes"] = args.images / (time.perf_counter() - t)

    from PIL import Image

    big = Image.new("RGB", (6000, 4000), "gray")
    results["GIL probe: Python thread speed during decode_image x20"] = gil_probe(
        lambda: [decode_image(d, options) for d in datas[:20]])
    results["GIL probe: during a 6000x4000 resize"] = gil_probe(
        lambda: big.resize((224, 224), Image.Resampling.BILINEAR))

    no_draft = DecodeOptions(image_size=(args.image_size, args.image_size), interpolation="bilinear")
    with tempfile.TemporaryDirectory() as tmp:
        with wds.ShardWriter(str(Path(tmp) / "b-%06d.tar"), maxcount=args.images // 4, verbose=0) as sink:
            for i, d in enumerate(datas):
                sink.write({"__key__": f"s{i:06d}", "jpg": d, "cls": i % 4})
        reader = ShardReader(str(Path(tmp) / "b-{000000..000003}.tar"), num_classes=4,
                             image_size=no_draft.image_size, batch_size=32, seed=0,
                             num_workers=args.workers)
        t = time.perf_counter()
        n = sum(len(x) for x, _ in reader)
        results[f"ShardReader ({args.workers} threads)"] = n / (time.perf_counter() - t)

    mean_kb = sum(map(len, datas)) / len(datas) / 1000
    print(f"{args.images} JPEGs, mean {mean_kb:.0f} kB, decoded to {args.image_size}x{args.image_size}:")
    for name, rate in results.items():
        unit = "" if "cpu/wall" in name or "GIL" in name else " images/s"
        print(f"  {name:56s} {rate:7.2f}{unit}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"images": args.images, "image_size": args.image_size,
                                          "mean_kb": mean_kb, "images_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
