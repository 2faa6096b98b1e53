"""Memory while streaming: the shuffle buffer holds compressed bytes, nothing else grows."""

from __future__ import annotations

import random
import threading
import time

import psutil
import pytest
import webdataset as wds

from packer.examples import random_crop_jpeg
from reader import ShardReader

SAMPLES = 4000


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """4,000 realistic JPEGs (400 distinct crops, each written 10 times) in 8 shards."""
    root = tmp_path_factory.mktemp("many")
    rng = random.Random(0)
    classes = ["astronaut", "cat", "coffee", "rocket"]
    crops = [(c, random_crop_jpeg(rng, classes[c], long_side=(160, 240))) for c in range(4) for _ in range(100)]
    total = 0
    with wds.ShardWriter(str(root / "m-%06d.tar"), maxcount=SAMPLES // 8, verbose=0) as sink:
        for i in range(SAMPLES):
            label, data = crops[i % len(crops)]
            total += len(data)
            sink.write({"__key__": f"s{i:06d}", "jpg": data, "cls": label})
    return str(root / "m-{000000..000007}.tar"), total


def _peak_rss_growth(reader: ShardReader, epochs: int) -> list[int]:
    proc = psutil.Process()
    base = proc.memory_info().rss
    peaks = []
    for _ in range(epochs):
        peak = [base]
        done = threading.Event()

        def watch(peak=peak, done=done):
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        n = sum(len(x) for x, _ in reader)
        done.set()
        watcher.join()
        assert n == SAMPLES
        peaks.append(peak[0] - base)
    return peaks


@pytest.mark.slow
def test_rss_bounded_with_a_full_buffer(many_shards, capsys):
    source, dataset_bytes = many_shards
    reader = ShardReader(source, num_classes=4, image_size=(64, 64), batch_size=64,
                         shuffle_buffer=10_000, seed=0)
    peaks = _peak_rss_growth(reader, epochs=2)
    small = _peak_rss_growth(ShardReader(source, num_classes=4, image_size=(64, 64), batch_size=64,
                                         shuffle_buffer=100, seed=0), epochs=1)
    with capsys.disabled():
        print(f"\n[memory] dataset {dataset_bytes / 1e6:.1f} MB compressed, {SAMPLES} samples; "
              f"peak RSS growth with 10,000-sample buffer: {[f'{p / 1e6:.1f} MB' for p in peaks]}; "
              f"with 100-sample buffer: {small[0] / 1e6:.1f} MB")
    # the whole split fits in the buffer: its compressed bytes plus fixed overhead,
    # not decoded pixels (4,000 x 64x64x3 float32 would be 197 MB)
    assert max(peaks) < 1.5 * dataset_bytes + 80e6
    assert peaks[1] < peaks[0] + 20e6  # a second epoch does not pile up
