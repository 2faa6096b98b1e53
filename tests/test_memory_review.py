"""Bounded memory while streaming (found by a review, 2026-11-27): the shuffle buffer's byte
cap holds when later samples are larger, decode processes share that cap, and a tf.data
dataset's memory does not climb pass after pass.

Memory is measured in a fresh subprocess (peak RSS sampled every few milliseconds by a
thread, children included where decode processes run), and compared with a generous bound
derived from what the docs promise, so that allocator noise does not decide the outcome.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reader.shuffle import shuffle_buffer

ROOT = Path(__file__).resolve().parent.parent

# Samples peak RSS (this process + its children) on a thread; imported by every probe.
_PEAK = textwrap.dedent("""
    import json, os, sys, threading, time
    import psutil

    class Peak:
        def __init__(self, children=False):
            self.p, self.children = psutil.Process(), children
            self.base = self.peak = self.now()
            self.done = threading.Event()
            self.t = threading.Thread(target=self.watch, daemon=True)
            self.t.start()

        def now(self):
            rss = self.p.memory_info().rss
            if self.children:
                for c in self.p.children(recursive=True):
                    try:
                        rss += c.memory_info().rss
                    except psutil.Error:
                        pass
            return rss

        def watch(self):
            while not self.done.is_set():
                self.peak = max(self.peak, self.now())
                time.sleep(0.003)

        def stop(self):
            self.done.set()
            self.t.join()
            self.peak = max(self.peak, self.now())
            return self.peak - self.base
""")


def _probe(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> dict:
    """Run ``code`` (after the Peak helper) in a fresh interpreter; return the JSON it prints
    last."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    done = subprocess.run([sys.executable, "-c", _PEAK + textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=environ, cwd=str(ROOT), timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _noise_jpeg(rng: np.random.Generator, side: int, quality: int = 95) -> bytes:
    """A JPEG that does not compress: about ``side * side * 1.2`` bytes at quality 95."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _small_jpeg(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24 + n % 17, 24 + n % 13), (n % 256, n * 7 % 256, 80)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---- 1. the shuffle buffer's byte cap ---------------------------------------------------


def test_shuffle_buffer_byte_cap_holds_when_later_items_are_larger():
    """``shuffle_buffer(max_bytes=...)`` "stops growing at that many bytes, so a set of large
    images cannot exhaust memory". Once the buffer is at its cap it swaps one item in for one
    out without looking at sizes: filled with small items, it then takes in large ones in
    their place, and holds far more than the cap (here 62 MB of 100 KB items under a 1 MB
    cap). A stream whose later samples are larger (tars of thumbnails read before tars of
    photos, a tar written per source or per class) is enough."""
    small, large = b"s" * 1_000, b"L" * 100_000
    items = [small] * 1_000 + [large] * 1_000
    cap = 1_000_000
    held = peak = 0

    def entering(stream):
        nonlocal held, peak
        for item in stream:
            held += len(item)
            peak = max(peak, held)
            yield item

    out = []
    for item in shuffle_buffer(entering(items), rng=random.Random(0), size=10**9, max_bytes=cap, nbytes=len):
        held -= len(item)
        out.append(item)
    assert len(out) == len(items)
    # the cap, overshot at most by the item that crossed it and the one being swapped in
    assert peak <= cap + 2 * len(large), f"the buffer held {peak / 1e6:.1f} MB under a {cap / 1e6:.1f} MB cap"


@pytest.fixture(scope="module")
def small_then_large_tars(tmp_path_factory) -> str:
    """Plain WebDataset tars (no manifest), each 400 small JPEGs (~1 KB) then 60 large ones
    (~590 KB): 4 tars, ~140 MB of large images in all."""
    rng = np.random.default_rng(0)
    big = [_noise_jpeg(rng, 700) for _ in range(6)]
    return _jpeg_tars(tmp_path_factory.mktemp("small_then_large"), 460,
                      lambda n: _small_jpeg(n) if n % 460 < 400 else big[n % len(big)])


def _jpeg_tars(folder: Path, per_tar: int, jpeg) -> str:
    """4 plain WebDataset tars of ``per_tar`` samples: sample n is ``jpeg(n)``, class n % 2."""
    import webdataset as wds

    for s in range(4):
        with wds.TarWriter(str(folder / f"t-{s:06d}.tar")) as sink:
            for n in range(s * per_tar, (s + 1) * per_tar):
                sink.write({"__key__": f"s{n:06d}", "jpg": jpeg(n), "cls": n % 2})
    return str(folder / "t-{000000..000003}.tar")


_READ_ONE_EPOCH = """
    from reader import ShardReader
    src, options = sys.argv[1], json.loads(sys.argv[2])
    reader = ShardReader(src, num_classes=2, image_size=(32, 32), batch_size=8, seed=0,
                         num_workers=2, interleave=4, **options)
    peak = Peak()
    n = sum(len(x) for x, _ in reader)
    print(json.dumps({"samples": n, "peak_growth": peak.stop()}))
"""


@pytest.mark.slow
def test_byte_capped_reader_stays_near_its_cap_when_large_images_come_later(small_then_large_tars):
    """A user caps the shuffle buffer at 2 MB (``shuffle_buffer_bytes="2MB"``) for a set of
    manifest-less tars. The same reader with ``shuffle_buffer=1`` (the same reads and
    interleave, no buffer) is the baseline: the capped one may hold 2 MB more (plus noise).
    Measured: 156 MB peak RSS growth against 38 MB; the buffer held 131 MB of compressed
    samples (counted as they entered and left it)."""
    capped = _probe(_READ_ONE_EPOCH, small_then_large_tars,
                    json.dumps({"shuffle_buffer": 10**6, "shuffle_buffer_bytes": "2MB"}))
    unbuffered = _probe(_READ_ONE_EPOCH, small_then_large_tars, json.dumps({"shuffle_buffer": 1}))
    assert capped["samples"] == unbuffered["samples"] == 4 * 460
    over = (capped["peak_growth"] - unbuffered["peak_growth"]) / 1e6
    assert over < 2 + 30, (
        f"a 2 MB shuffle buffer cost {over:.0f} MB more peak RSS than no buffer "
        f"({capped['peak_growth'] / 1e6:.0f} vs {unbuffered['peak_growth'] / 1e6:.0f} MB)")


# ---- 2. processes=N multiplies the shuffle buffer's cap ---------------------------------


@pytest.fixture(scope="module")
def uniform_large_tars(tmp_path_factory) -> str:
    """Plain tars: 4 x 150 JPEGs of ~270 KB (~162 MB)."""
    rng = np.random.default_rng(1)
    images = [_noise_jpeg(rng, 480) for _ in range(8)]
    return _jpeg_tars(tmp_path_factory.mktemp("uniform_large"), 150, lambda n: images[n % len(images)])


_READ_WITH_PROCESSES = """
    from reader import ShardReader
    src, cap = sys.argv[1], sys.argv[2]
    reader = ShardReader(src, num_classes=2, image_size=(32, 32), batch_size=16, seed=0,
                         num_workers=2, processes=2, shuffle_buffer_bytes=cap)
    reader.shard_counts()  # the scan a manifest-less set needs, before measuring
    peak = Peak(children=True)
    n = sum(len(x) for x, _ in reader)
    print(json.dumps({"samples": n, "peak": peak.peak, "growth": peak.stop()}))
    reader.close()
"""


@pytest.mark.slow
def test_processes_keep_the_shuffle_buffer_bytes_cap(uniform_large_tars):
    """``shuffle_buffer_bytes`` is how a user bounds the buffer's memory; with
    ``processes=N`` every decode process fills a buffer of its own up to that cap, so the
    reader holds N times it (README's processes memory paragraph lists blocks in flight and
    shared-memory batches, no buffers). Raising the cap from 1 MB to 60 MB must cost about
    59 MB, not 2 x 59 MB (measured here: +115 MB; on another set +29 MB for a 30 MB cap with
    processes=0, +58 MB with processes=2)."""
    small = _probe(_READ_WITH_PROCESSES, uniform_large_tars, "1MB")
    large = _probe(_READ_WITH_PROCESSES, uniform_large_tars, "60MB")
    assert small["samples"] == large["samples"] == 600
    extra = (large["peak"] - small["peak"]) / 1e6
    assert extra < 59 + 16, f"a 60 MB cap cost {extra:.0f} MB more than a 1 MB one with processes=2"


# ---- 3. image_dataset_from_shards: RSS ratchets epoch over epoch -------------------------


@pytest.fixture(scope="module")
def photo_split(tmp_path_factory) -> tuple[Path, int]:
    """800 realistic JPEGs (600-900 px) packed into 4 shards: (shards, compressed bytes)."""
    from packer import pack
    from packer.examples import make_example_tree

    root = tmp_path_factory.mktemp("photo_split")
    make_example_tree(root / "src", counts={"train": 200}, long_side=(600, 900), seed=2)
    manifest = pack(root / "src", root / "shards", max_size="16MB", workers=1, quiet=True)
    return root / "shards", sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])


_TF_ROUNDS = """
    import gc
    from reader import image_dataset_from_shards
    src, rounds = sys.argv[1], int(sys.argv[2])
    ds = image_dataset_from_shards(src, image_size=(64, 64), batch_size=32, seed=0,
                                   num_workers=4, verbose=False)
    proc = Peak().p
    rss = []
    for _ in range(rounds):  # Keras with steps_per_epoch / validation_steps: 3 batches a pass
        for batch in ds.take(3):
            pass
        gc.collect()
        rss.append(proc.memory_info().rss)
    print(json.dumps({"rss": rss}))
"""


@pytest.mark.slow
def test_tf_dataset_memory_does_not_ratchet_from_pass_to_pass(photo_split):
    """Each pass over ``image_dataset_from_shards`` fills the shuffle buffer again (here the
    whole split, 48 MB) and lets it go; after the first pass the process has everything it
    will ever need, and RSS should stay flat. ``restore_malloc_thresholds`` (run at every
    pass) sets glibc's mmap threshold to 32 MB and trim threshold to 64 MB for the whole
    process, so the samples, decode and batch arrays that used to be mmapped go to the
    threads' malloc arenas, which keep them: RSS rose by ~280 MB over 30 passes (+186 with 2
    decode threads), plateauing only when every arena holds its share (on 2 cores; more
    arenas on more cores). With ``SHARDPACK_TF_MALLOC=keep`` the same loop grew by at most
    ~95 MB, and the numpy ShardReader stays flat."""
    shards, dataset_bytes = photo_split
    rss = _probe(_TF_ROUNDS, str(shards), "30")["rss"]
    growth = (max(rss[-10:]) - rss[0]) / 1e6
    assert growth < dataset_bytes / 1e6 + 100, (
        f"RSS grew {growth:.0f} MB after the first pass ({[round(r / 1e6) for r in rss[::3]]} MB); "
        f"the split is {dataset_bytes / 1e6:.0f} MB")
