"""GPU JPEG decode (nvJPEG through torchvision) against the CPU decode limit, same bytes.

Why this exists: the CPU decode limit caps every CPU reader (README, "Speed"), so the
question for a GPU path is how far past that limit nvJPEG gets on the same shards, and
whether its pixels are the CPU decoder's. It measures; shardpack has no GPU reader yet.

For each shard folder it loads the split's JPEG members into RAM (PNG members are counted
and left out: nvJPEG decodes JPEG only), then times, images/s over all of them:

- ``cpu_limit``: reader.benchmark's decode limit (libjpeg-turbo with DCT scaling + OpenCV
  bilinear, every core, into one uint8 array);
- ``gpu_decode``: ``torchvision.io.decode_jpeg(batch, device="cuda")``, batches of
  ``--batch-size``, host bytes in, full-size RGB on the GPU out;
- ``gpu_decode_resize``: the same plus a bilinear resize (no antialias, as Keras) of each
  image into one ``(batch, 3, h, w)`` uint8 tensor.

Pixels: the mean absolute difference between ``gpu_decode_resize`` and the reader's
``dct_scaling=False`` decode (libjpeg-turbo at full size, OpenCV bilinear) over a sample.

Usage::

    python scripts/bench_gpu_decode.py SHARDS [SHARDS ...] [--split train] [--image-size 224]
        [--batch-size 64] [--repeat 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reader import benchmark  # noqa: E402


def _gpu_epoch(tensors: list[Any], size: tuple[int, int], batch: int, resize: bool) -> float:
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(tensors), batch):
        images = decode_jpeg(tensors[i : i + batch], mode=ImageReadMode.RGB, device="cuda")
        if resize:
            out = torch.empty((len(images), 3, *size), dtype=torch.uint8, device="cuda")
            for j, im in enumerate(images):
                resized = F.interpolate(im[None].float(), size=size, mode="bilinear",
                                        align_corners=False, antialias=False)
                out[j] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _pixel_gap(blobs: list[bytes], size: tuple[int, int], sample: int = 64) -> float:
    """Mean |GPU - CPU| over ``sample`` images, both full-size decodes + bilinear resize."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from reader.decode import DecodeOptions, decode_image

    options = DecodeOptions(image_size=size, dct_scaling=False)
    gaps = []
    for data in blobs[:sample]:
        cpu = decode_image(data, options).astype(np.float32)
        im = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                         mode=ImageReadMode.RGB, device="cuda")
        gpu = F.interpolate(im[None].float(), size=size, mode="bilinear", antialias=False)
        gpu_px = gpu[0].round().clamp(0, 255).permute(1, 2, 0).cpu().numpy()
        gaps.append(float(np.abs(gpu_px - cpu).mean()))
    return statistics.mean(gaps)


def measure(shards: str, split: str, size: tuple[int, int], batch: int, repeat: int) -> dict[str, Any]:
    import torch

    blobs = benchmark.split_image_bytes(shards, split)
    jpegs = [b for b in blobs if b[:2] == b"\xff\xd8"]
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    variant = benchmark.fastest_limit_variant(jpegs, size)
    _gpu_epoch(tensors[: 4 * batch], size, batch, resize=True)  # nvJPEG and kernels warm
    rates: dict[str, list[float]] = {"cpu_limit": [], "gpu_decode": [], "gpu_decode_resize": []}
    for _ in range(repeat):
        seconds, _cpu = benchmark.decode_limit(jpegs, size, variant=variant)
        rates["cpu_limit"].append(len(jpegs) / seconds)
        rates["gpu_decode"].append(len(jpegs) / _gpu_epoch(tensors, size, batch, resize=False))
        rates["gpu_decode_resize"].append(len(jpegs) / _gpu_epoch(tensors, size, batch, resize=True))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "shards": shards, "jpegs": len(jpegs), "other_images_left_out": len(blobs) - len(jpegs),
        "mean_jpeg_bytes": sum(map(len, jpegs)) / max(1, len(jpegs)), "cpu_cores": benchmark.cores(),
        "cpu_limit_variant": variant, "gpu": torch.cuda.get_device_name(),
        "rates": rates, "medians": medians,
        "gpu_decode_resize_over_cpu_limit": medians["gpu_decode_resize"] / medians["cpu_limit"],
        "mean_abs_pixel_gap_vs_cpu_full_decode": _pixel_gap(jpegs, size),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+")
    benchmark.add_epoch_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    size = (args.image_size, args.image_size)
    results = []
    for shards in args.shards:
        r = measure(shards, args.split, size, args.batch_size, args.repeat)
        m = r["medians"]
        print(f"{shards}: {r['jpegs']} JPEGs ({r['mean_jpeg_bytes'] / 1e3:.0f} kB), "
              f"cpu_limit {m['cpu_limit']:.0f}/s ({r['cpu_cores']} cores, {r['cpu_limit_variant']}), "
              f"gpu_decode {m['gpu_decode']:.0f}/s, gpu_decode_resize {m['gpu_decode_resize']:.0f}/s "
              f"= {r['gpu_decode_resize_over_cpu_limit']:.2f}x the CPU limit; "
              f"pixel gap {r['mean_abs_pixel_gap_vs_cpu_full_decode']:.2f}/255", flush=True)
        results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
