"""scripts/bench.py's Targets table: ratios are paired round by round, a failed round drops
out of its pair only, and the rounds that met each target are counted."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from reader.benchmark import median_result

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("shardpack_bench_script", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(*rates: float | None) -> list[dict]:
    return [{"images_per_s": r, "peak_rss_mb": 1.0} if r else {"error": "failed"} for r in rates]


def test_targets_pair_rates_by_round_and_count_the_rounds_met():
    bench = _bench_module()
    results = {
        # round 2 of the reader is fast and round 3 of the limit is slow: a ratio of medians
        # would hide both, the paired ratios show them
        "shardpack_numpy": median_result(_runs(900, 1500, 800, None)),
        "decode_limit": median_result(_runs(1000, 1000, 400, 1000)),
        "shardpack_tf_resized": median_result(_runs(2900, 3100)),
        "keras_directory": median_result(_runs(1000, 1000)),
    }
    assert bench.round_ratios(results, "shardpack_numpy", "decode_limit") == [0.9, 1.5, 2.0]
    table = bench.format_targets(results, resize=224, quality=80)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert rows["ShardReader ÷ decode limit"].endswith("| 0.90, 1.50, 2.00 | 1.50 | ≥ 0.9 | 3 of 3 |")
    resized = next(v for k, v in rows.items() if k.startswith("image_dataset_from_shards on"))
    assert "`--resize 224 --quality 80`" in resized
    assert resized.endswith("| 2.90, 3.10 | 3.00 | ≥ 3 | 1 of 2 |")
    # targets with no measured pair (the packer did not run) are left out, not shown as 0
    assert not any("pack" in k for k in rows)


def test_bench_advises_decode_processes_only_where_they_help():
    """Under 0.9x the limit on 8+ cores, decoding on threads, the advice names the slow
    readers and processes= (half the cores), and why "auto" took none; on fewer cores, with
    processes on (chosen, or taken by "auto": ``parent_only``), or at the limit: none."""
    from reader.benchmark import advice

    results = {"decode_limit": median_result(_runs(10_000)),
               "shardpack_numpy": median_result(_runs(6_000)),
               "shardpack_tf": median_result(_runs(9_500)),
               "shardpack_torch": {"error": "failed"}}
    (line,) = advice(results, 16, 0)
    assert line.startswith("shardpack_numpy under 0.9x") and "--processes 8" in line
    (auto,) = advice(results, 16, "auto")
    assert '"auto" took none' in auto and "500 images" in auto
    assert advice(results, 4, 0) == []
    assert advice(results, 16, 8) == []
    assert advice({**results, "shardpack_numpy": {**results["shardpack_numpy"], "parent_only": True}},
                  16, "auto") == []
    results["shardpack_numpy"] = median_result(_runs(9_000))
    assert advice(results, 16, 0) == []


def test_reader_table_shows_the_whole_epoch_beside_the_steady_rate():
    """Start-up (filling the shuffle buffer, first batches) and teardown are left out of the
    steady rate; the whole-epoch column shows what one epoch costs a training loop."""
    bench = _bench_module()

    def runs(*pairs: tuple[float, float]) -> list[dict]:
        return [{"images_per_s": steady, "images_per_s_with_startup": whole, "peak_rss_mb": 1.0,
                 "cpu_ms_per_image": 1.0} for steady, whole in pairs]

    results = {
        "decode_limit": median_result(_runs(1000, 1000, 1000)),
        "shardpack_numpy": median_result(runs((900, 700), (950, 500), (1000, 800))),
    }
    assert results["shardpack_numpy"]["images_per_s_with_startup"] == 700
    table = bench.format_table(results, "reader")
    head = table.splitlines()[0]
    assert "whole epoch images/s" in head
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    column = [h.strip("| ") for h in head.split(" | ")].index("whole epoch images/s")
    assert cells["shardpack_numpy"][column] == "700"
    assert cells["decode_limit"][column] == "–"  # the limit has no epoch to start


def test_reader_table_leaves_out_the_cpu_of_readers_that_decoded_in_processes():
    """On 8+ cores "auto" takes decode processes, whose CPU the contender's own process does
    not see (``_parent_only`` sets None): the table says "–" there instead of failing, as it
    did on a 16-core machine."""
    bench = _bench_module()
    parent_only = [{"images_per_s": rate, "images_per_s_with_startup": rate, "peak_rss_mb": 1.0,
                    "cpu_ms_per_image": None, "parent_only": True} for rate in (900, 950, 1000)]
    results = {"decode_limit": median_result(_runs(1000, 1000, 1000)),
               "shardpack_numpy": median_result(parent_only)}
    table = bench.format_table(results, "reader")
    head = [h.strip("| ") for h in table.splitlines()[0].split(" | ")]
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert cells["shardpack_numpy"][head.index("cpu ms/img")] == "–"
    assert cells["shardpack_numpy"][head.index("images/s")] == "950"


def test_tables_say_how_many_decode_processes_a_reader_took(id_shards):
    """On 16 cores "auto" took 8 processes on one set of shards and 9 on another: the tables
    name the count beside the contender (none for threads), from a real reader's run."""
    from reader.benchmark import c_shardpack_numpy, format_table

    bench = _bench_module()
    root, _ = id_shards
    cfg = {"source": str(root), "split": "train", "image_size": [32, 32], "batch_size": 8,
           "epochs": 1}
    def run(processes: int) -> dict:  # the peak RSS is the parent's, added as it ends
        return median_result([{**c_shardpack_numpy({**cfg, "processes": processes}), "peak_rss_mb": 1.0}])

    results = {"shardpack_numpy": run(2), "shardpack_numpy_uint8": run(0)}
    assert results["shardpack_numpy"]["processes"] == 2
    assert results["shardpack_numpy_uint8"]["processes"] == 0
    for table in (bench.format_table(results, "reader"), format_table(results)):
        names = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
        assert names == ["shardpack_numpy (2 processes)", "shardpack_numpy_uint8"]


def test_bench_malloc_pairs_each_reader_with_the_threshold_set(id_shards, capsys, monkeypatch):
    """scripts/bench_malloc.py: a real (small) run of each pair, with and without
    MALLOC_TRIM_THRESHOLD_, and the table of both."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    path = BENCH.parent / "bench_malloc.py"
    spec = importlib.util.spec_from_file_location("shardpack_bench_malloc", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(id_shards[0]), "--image-size", "16", "--batch-size", "8",
                        "--repeat", "1", "--dtypes", "uint8", "--threshold", "32768"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| uint8")]
    assert [row[0] for row in rows] == ["| uint8", "| uint8 + MALLOC_TRIM_THRESHOLD_=32768"]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0 and float(row[3]) >= 0
    assert rows[1][4].rstrip(" |") != ""  # the paired ratio


def test_pack_cost_vs_size_separates_the_start_up_from_the_cost_per_image():
    """A pack taking 0.2 s + 100 µs per image has a whole-pack rate that grows with the
    size (the start-up spread thinner); the table's rate after the start-up and its rate
    between neighbouring sizes are flat at 10,000 images/s, which is what linear means."""
    bench = _bench_module()
    rows = [{"n": n, "pack_seconds": [0.2 + n * 1e-4 + noise for noise in (-1e-3, 0.0, 1e-3)],
             "tar_seconds": [0.1 + n * 5e-5] * 3}
            for n in (100_000, 1_000, 10_000)]  # any order
    rows[0]["pack_seconds"][1] = None  # a failed run drops out
    start_up, per_image = bench.linear_fit(
        [(row["n"], s) for row in rows for s in row["pack_seconds"] if s])
    assert abs(start_up - 0.2) < 2e-3 and abs(per_image - 1e-4) < 1e-7
    table = bench.format_scaling(rows)
    lines = [line.split(" | ") for line in table.splitlines()[2:5]]
    assert [line[0].strip("| ") for line in lines] == ["1,000", "10,000", "100,000"]
    whole = [float(line[2]) for line in lines]
    assert whole[0] < 0.4 * whole[2]  # the whole-pack rate is not flat
    after = [line[3] for line in lines]
    assert after[0] == "–"  # 0.3 s, two thirds of it start-up: no rate worth showing
    assert all(abs(float(rate) - 10_000) < 150 for rate in after[1:])
    since = [line[4] for line in lines]
    assert since[0] == "–" and all(abs(float(rate) - 10_000) < 150 for rate in since[1:])
    tar_ratios = lines[1][5].strip("| ").split(", ")
    assert tar_ratios == ["0.50", "0.50", "0.50"]  # tar (0.6 s) over pack (1.2 s), by round
    assert "200 ms of start-up, then 100.0 µs per image (10,000 images/s)" in table


def test_pack_cost_vs_size_needs_two_sizes():
    bench = _bench_module()
    assert "two sizes" in bench.format_scaling([{"n": 1000, "pack_seconds": [0.5], "tar_seconds": [0.1]}])


def test_readers_are_timed_on_their_last_epoch_with_the_first_reported_beside():
    """time_epochs: each pass is a new iter() (an epoch); the result is the last epoch's,
    and the first epoch's whole rate comes with it (a fresh process's first epoch builds
    pipelines and hashes shards, which training pays once)."""
    import numpy as np
    import pytest

    from reader.benchmark import time_epochs

    class Epochs:
        def __init__(self, sizes):
            self.sizes, self.passes = list(sizes), 0

        def __iter__(self):
            n = self.sizes[self.passes]
            self.passes += 1
            return iter([np.zeros((n, 1))] * 5)

    batches = Epochs([4, 2, 3])
    result = time_epochs(batches, epochs=3, warmup=1)
    assert batches.passes == 3
    assert result["images"] == 15 and result["epochs"] == 3  # the last epoch: 5 batches of 3
    assert result["first_epoch_images_per_s"] > 0
    one = time_epochs(Epochs([4]), epochs=1, warmup=1)
    assert one["images"] == 20 and one["first_epoch_images_per_s"] == one["images_per_s_with_startup"]
    with pytest.raises(ValueError, match="epochs"):
        time_epochs(Epochs([4]), epochs=0)


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), asked of the kernel (mincore)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
        return sum(v & 1 for v in vec), pages


def _cached_file(path: Path) -> Path:
    """A 1 MiB file at ``path``, read back into the page cache and written to disk."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(1 << 20))
    path.read_bytes()
    os.sync()
    return path


def _page_cache_droppable(folder: Path) -> None:
    """Skip unless files in ``folder`` live in the page cache and leave it on request, asked
    of the kernel with a plain posix_fadvise (not the code under test): tmpfs keeps them
    (its pages are the files), ZFS caches outside the page cache, macOS has no fadvise."""
    import os
    import sys

    import pytest

    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        pytest.skip("posix_fadvise and mincore are Linux's")
    probe = _cached_file(folder / "probe.bin")
    resident, pages = _resident_pages(probe)
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = _resident_pages(probe)[0]
    probe.unlink()
    if resident < pages or left:
        pytest.skip(f"{folder}'s file system does not keep files in the page cache, or keeps them "
                    f"there when asked to drop them ({resident} of {pages} pages cached, {left} after)")


def test_a_cold_cache_run_evicts_what_each_contender_reads_before_every_epoch(tmp_path, monkeypatch):
    """--cache cold: reader epochs and packs read from the disk. The files a contender reads
    leave the page cache before each epoch (the kernel says so: mincore), and only those;
    each epoch is then timed from its start, so that every read is inside the clock."""
    import os

    import numpy as np
    import pytest

    from reader.benchmark import evict_from_page_cache, time_contender

    _page_cache_droppable(tmp_path)
    folder = tmp_path / "data"
    read, other = _cached_file(folder / "sub" / "read.bin"), _cached_file(folder / "other.bin")
    full = _resident_pages(read)[1]
    seen = []

    class Epochs:  # records how much of ``read`` was cached when each epoch began
        def __iter__(self):
            seen.append(_resident_pages(read)[0])
            read.read_bytes()  # the epoch reads it back in
            return iter([np.zeros((2, 1))] * 3)

    warm = time_contender(Epochs(), {"epochs": 2, "warmup": 1}, [folder / "sub"])
    assert seen == [full, full] and warm["epochs"] == 2 and "steady_images_per_s" not in warm
    seen.clear()
    cold = time_contender(Epochs(), {"epochs": 2, "warmup": 1, "cache": "cold"}, [folder / "sub"])
    assert seen == [0, 0] and cold["images"] == 6
    assert cold["images_per_s"] == cold["images_per_s_to_last_batch"] != cold["steady_images_per_s"]
    assert _resident_pages(other)[0] == full  # not read: left alone

    # links to folders are followed (once, even in a cycle); what cannot be read is left out
    (folder / "linked").symlink_to(folder / "sub")
    (folder / "sub" / "loop").symlink_to(folder)
    (folder / "dangling.bin").symlink_to(folder / "gone.bin")
    os.mkfifo(folder / "fifo")
    read.read_bytes()
    other.read_bytes()
    # linked -> sub (read.bin), whose loop -> data (other.bin; sub again, not walked twice)
    assert evict_from_page_cache([folder / "linked"]) == 2
    assert _resident_pages(read)[0] == _resident_pages(other)[0] == 0
    read.read_bytes()
    assert evict_from_page_cache([folder]) == 2 and _resident_pages(read)[0] == 0
    with pytest.raises(TypeError, match="list of paths"):
        evict_from_page_cache(str(folder))  # type: ignore[arg-type]  # a str is no list of paths
    with pytest.raises(FileNotFoundError):
        evict_from_page_cache([folder / "missing"])

    bench = _bench_module()  # the packers: SRC evicted before each pack (and tar)
    (folder / "fifo").unlink()
    read.read_bytes()
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    bench._settle({"src": str(folder)})
    assert _resident_pages(read)[0] == full
    bench._settle({"src": str(folder), "cache": "cold"})
    assert _resident_pages(read)[0] == 0


def test_every_reader_contender_names_what_it_reads_for_a_cold_run(id_shards, monkeypatch):
    """The contenders hand their own input to the eviction (tested with the kernel above):
    the shard folder for shardpack's readers, the class folders for Keras' loader, the shard
    files for webdataset; a URL has nothing local to evict."""
    import pytest

    import reader.benchmark as benchmark

    evicted: list[list[str]] = []
    monkeypatch.setattr(benchmark, "evict_from_page_cache", lambda paths: evicted.append(list(paths)))
    cfg = {"source": str(id_shards[0]), "split": "train", "image_size": [16, 16], "batch_size": 32,
           "epochs": 2, "warmup": 1, "cache": "cold"}
    result = benchmark.c_shardpack_numpy(cfg)
    assert evicted == [[str(id_shards[0])]] * 2 and result["images_per_s"] > 0
    evicted.clear()
    benchmark.c_shardpack_numpy(dict(cfg, cache="warm"))
    assert evicted == []
    assert benchmark._local_reads({"source": "s3://bucket/shards"}) == []
    assert benchmark._local_reads({"source": ["/a/x.tar", "s3://b/y.tar", "file:///c"]}) == ["/a/x.tar", "/c"]
    with pytest.raises(TypeError, match="list of paths"):  # not a list of its characters
        benchmark.time_contender([], cfg, str(id_shards[0]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local paths"):
        benchmark.time_contender([], cfg, [])

    pytest.importorskip("tensorflow")
    evicted.clear()
    assert benchmark.c_shardpack_tf(cfg)["images_per_s"] > 0
    assert evicted == [[str(id_shards[0])]] * 2
    if importlib.util.find_spec("torch") is not None:
        evicted.clear()
        assert benchmark.c_shardpack_torch(cfg)["images_per_s"] > 0
        assert evicted == [[str(id_shards[0])]] * 2

    bench = _bench_module()
    src = id_shards[0]
    urls = sorted(str(p) for p in (src / "train").glob("*.tar"))
    webdataset = bench.c_webdataset(dict(cfg, shards=str(src), scratch=str(src)))
    assert evicted[-2:] == [urls, urls] and webdataset["images_per_s"] > 0
    pytest.importorskip("keras")
    tree = src.parent / "src"  # the images the shards were packed from
    keras = bench.c_keras_directory(dict(cfg, src=str(tree)))
    assert evicted[-2:] == [[str(tree / "train")]] * 2 and keras["images_per_s"] > 0


def test_a_cold_runs_tables_go_to_the_speed_notes_and_leave_readmes_table_alone(tmp_path, monkeypatch):
    """--update-readme: a warm run replaces README's table (and docs/bench.json); a cold run
    replaces docs/SPEED.md's "From the disk" block (and docs/bench_cold.json), never
    README's table, which README's summary describes."""
    bench = _bench_module()
    repo, work = tmp_path / "repo", tmp_path / "work"
    (repo / "docs").mkdir(parents=True)
    work.mkdir()
    (work / "bench.json").write_text("{}")
    (repo / "README.md").write_text(f"intro\n{bench.README_START}\nold warm\n{bench.README_END}\nsummary\n")
    (repo / "docs" / "SPEED.md").write_text(f"notes\n{bench.COLD_START}\nold cold\n{bench.COLD_END}\nreading\n")
    monkeypatch.setattr(bench, "REPO", repo)
    bench.publish("new cold", work, cold=True)
    assert (repo / "README.md").read_text() == f"intro\n{bench.README_START}\nold warm\n{bench.README_END}\nsummary\n"
    assert (repo / "docs" / "SPEED.md").read_text() == f"notes\n{bench.COLD_START}\nnew cold\n{bench.COLD_END}\nreading\n"
    assert (repo / "docs" / "bench_cold.json").exists() and not (repo / "docs" / "bench.json").exists()
    bench.publish("new warm", work, cold=False)
    assert (repo / "README.md").read_text() == f"intro\n{bench.README_START}\nnew warm\n{bench.README_END}\nsummary\n"
    assert "new cold" in (repo / "docs" / "SPEED.md").read_text() and (repo / "docs" / "bench.json").exists()


def test_bench_takes_processes_auto_as_the_readers_do():
    """``shardpack bench --processes auto`` measures the readers as processes="auto" makes
    them; other words and negative counts are refused up front."""
    import argparse

    from reader.benchmark import _processes_arg

    assert _processes_arg("auto") == "auto" and _processes_arg("3") == 3 and _processes_arg("0") == 0
    for bad in ("-1", "many", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            _processes_arg(bad)


def test_rounds_vary_the_order_so_no_contender_always_follows_the_same_one(tmp_path):
    """Which contender ran just before another changed its rate (a pack after
    ``ShardWriter``: up to 1.7x slower), so every round after the first runs the contenders
    in an order of its own, the same on a rerun, two contenders included (a seeded shuffle
    left two in one order for four rounds); each still runs once per round, and its runs
    stay in round order (the targets pair rates by round)."""
    from reader.benchmark import _round_order, run_rounds

    script = tmp_path / "contenders.py"
    script.write_text(  # a contender's "rate" is its place in the whole run: 1, 2, 3, ...
        "import json, pathlib, sys\n"
        f"log = pathlib.Path({str(tmp_path / 'ran')!r})\n"
        "with log.open('a') as f: f.write('x')\n"
        "print(json.dumps({'images_per_s': float(len(log.read_text())), 'peak_rss_mb': 1.0}))\n")
    names = ["a", "b", "c", "d", "e"]
    lines: list[str] = []
    results = run_rounds(names, {}, 4, module=[str(script)], log=lines.append)
    ran = [line.split()[2].rstrip(":") for line in lines]
    rounds = [ran[i:i + len(names)] for i in range(0, len(ran), len(names))]
    assert rounds[0] == names and all(sorted(r) == names for r in rounds)
    assert len({tuple(r) for r in rounds}) == 4
    ran_after = {n: {r[r.index(n) - 1] for r in rounds if r.index(n) > 0} for n in names}
    assert all(len(before) > 1 for before in ran_after.values())
    for name in names:
        places = [1.0 + i for i, n in enumerate(ran) if n == name]
        assert results[name]["round_rates"] == places
    lines.clear()
    run_rounds(names, {}, 4, module=[str(script)], log=lines.append)
    assert [line.split()[2].rstrip(":") for line in lines] == ran  # a rerun repeats it
    assert [_round_order(["a", "b"], r) for r in range(3)] == [["a", "b"], ["b", "a"], ["b", "a"]]
    assert len({tuple(_round_order(["a", "b", "c"], r)) for r in range(6)}) == 6
