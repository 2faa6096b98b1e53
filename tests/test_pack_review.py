"""Packs interrupted, resumed and run on Dask (found by a review, 2026-11-27): a Dask pack
across hosts of one shared file system, relative paths on a running cluster, the disk a
resumed --resize pack needs, and a scheduler lost mid-pack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from packer import pack
from packer.errors import PackError
from packer.examples import make_example_tree


def _cluster(n_workers: int):
    import distributed

    return distributed.LocalCluster(
        host="127.0.0.1", n_workers=n_workers, threads_per_worker=1, processes=True,
        dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )


# ---------------------------------------------------------------------------------------
# 1. Dask on a shared file system: a file probed on one host and written on another is
#    "changed since it was scanned", because the source stamp holds st_dev.
# ---------------------------------------------------------------------------------------


def _can_overlay(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / "probe-overlay" / d).mkdir(parents=True)
    p = tmp_path / "probe-overlay"
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount -t overlay overlay -o lowerdir={p / 'lower'},upperdir={p / 'upper'},"
         f"workdir={p / 'work'} {p / 'mnt'}"], capture_output=True)
    return done.returncode == 0


def test_dask_pack_across_hosts_of_one_shared_file_system(tmp_path):
    """Two Dask workers see SRC under the same path, as two NFS clients of one export do:
    same inode, size, mtime and ctime, but each host numbers the mount with its own st_dev.
    The second worker runs in its own mount namespace with SRC overlaid on itself, which
    gives exactly that (checked below). Nothing changes a file, yet the pack fails:
    ``PlannedSample.source_stamp`` holds ``st_dev`` from the host that probed, and the
    writer on the other host compares it with its own (``write.stored_bytes``), so every
    shard with a sample probed elsewhere is "changed since it was scanned" -- on every
    re-run too. ``check_workers_see`` (size and mtime only) lets this cluster through."""
    distributed = pytest.importorskip("distributed")
    if not _can_overlay(tmp_path):
        pytest.skip("needs root, unshare and overlayfs to give a worker another st_dev")
    src = make_example_tree(tmp_path / "src", counts={"train": 30, "test": 6}, long_side=(64, 96), seed=1)
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    one_file = str(src / "train" / "cat" / "img_00001.jpg")
    with _cluster(1) as cluster:
        address = cluster.scheduler_address
        script = (f"mount -t overlay overlay -o lowerdir={src},upperdir={tmp_path / 'upper'},"
                  f"workdir={tmp_path / 'work'} {src} && exec {sys.executable} -m "
                  f"distributed.cli.dask_worker {address} --nthreads 1 --no-nanny "
                  f"--local-directory {tmp_path}")
        other_host = subprocess.Popen(["unshare", "-m", "sh", "-c", script],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            with distributed.Client(address) as client:
                client.wait_for_workers(2, timeout=60)

                def stat_key(path):
                    st = os.stat(path)
                    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

                seen = sorted(client.run(stat_key, one_file).values())
            assert seen[0][0] != seen[1][0], "the two workers must number the mount differently"
            assert seen[0][1:] == seen[1][1:], "and see the very same file otherwise"

            manifest = pack(src, tmp_path / "out", engine="dask", scheduler=address,
                            max_count=8, quiet=True)
        finally:
            other_host.terminate()
            other_host.wait(timeout=30)
    assert sum(info["count"] for info in manifest["splits"].values()) == 4 * 36


def test_a_write_on_another_host_than_the_probe_is_not_a_change(tmp_path, monkeypatch):
    """The same bug without root: the writer runs where ``os.stat`` numbers the device
    differently (another NFS client of the same export), nothing else differs."""
    from packer import probe as probe_module
    from packer import write as write_module
    from packer.plan import PlannedShard, planned_sample
    from packer.walk import walk_tree

    src = make_example_tree(tmp_path / "src", counts={"train": 2}, long_side=(64, 96), seed=1)
    walked = walk_tree(src)
    candidate = walked.candidates[0]
    probed = probe_module.probe_file(candidate.abs_path)  # on the host that probed
    sample = planned_sample(candidate, probed, split="train", position=0, label=0)
    shard = PlannedShard("train", 0, (sample,))

    real = probe_module.file_stamp

    def other_host(st):  # the host that writes: its own device number for the same mount
        stamp = real(st)
        return (stamp[0] + 17, *stamp[1:])

    monkeypatch.setattr(probe_module, "file_stamp", other_host)
    monkeypatch.setattr(write_module, "file_stamp", other_host)
    (tmp_path / "out").mkdir()
    result = write_module.write_shard(shard, str(tmp_path / "out"), fingerprint="f")
    assert result.count == 1


# ---------------------------------------------------------------------------------------
# 2. Dask with a running scheduler and relative SRC / OUT: refused with a wrong diagnosis.
# ---------------------------------------------------------------------------------------


def test_relative_paths_with_a_running_cluster(tmp_path, monkeypatch):
    """``cd /shared/project && shardpack pack data shards --engine dask --scheduler ...``:
    the workers (started from another directory, as ``dask worker`` on each machine is)
    see both folders under the same absolute paths. The driver hands them the paths as
    typed (relative), so the pre-flight check stats ``data/...`` in each worker's own
    working directory and refuses the pack with "does not see SRC as this machine does
    ... mount SRC on every worker under the same path" -- advice that cannot help (it is
    mounted). Without the check every worker would read and write in its own cwd."""
    pytest.importorskip("distributed")
    project = tmp_path / "project"
    make_example_tree(project / "data", counts={"train": 10, "test": 4}, long_side=(64, 96), seed=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with _cluster(1) as cluster:  # its worker's cwd: elsewhere
        monkeypatch.chdir(project)
        manifest = pack("data", "shards", engine="dask", scheduler=cluster.scheduler_address,
                        max_count=8, quiet=True)
    assert (project / "shards" / "manifest.json").exists()
    assert sum(info["count"] for info in manifest["splits"].values()) == 4 * 14


# ---------------------------------------------------------------------------------------
# 3. A resumed --resize pack needs far more disk than a fresh one: the probe spools every
#    image again, also those of the shards it keeps, and nothing takes those entries.
# ---------------------------------------------------------------------------------------


def test_a_resumed_resize_pack_needs_no_more_disk_than_a_fresh_one(tmp_path, monkeypatch):
    """README: "the writer ... removes each entry as it uses it (so the spool and the
    shards together stay about one output's size)". A pack stopped by a full disk (here:
    its 8th shard write fails) keeps 7 of 10 shards; the re-run re-encodes every image in
    its probe and leaves each one in OUT/.shardpack-spool/, but only the 3 shards it
    writes take theirs: the entries of the 7 kept shards stay until the end. OUT then
    holds ~1.5x the output where a fresh pack peaks at 1.0x: freeing what a fresh pack
    would need is not enough to resume, the disk fills again with spool."""
    import packer.write_session as write_session

    src = make_example_tree(tmp_path / "src", counts={"train": 20}, long_side=(300, 400), seed=1)
    options = dict(max_count=8, workers=1, quiet=True, resize=150)
    real_write = write_session.write_shard
    peak = [0]
    calls = [0]
    fail_at: list[int | None] = [None]

    def used(out_dir: str) -> int:
        return sum(p.stat().st_size for p in Path(out_dir).rglob("*")
                   if p.is_file() and not p.name.startswith(".shardpack-journal"))

    def measured_write(shard, out_dir, **kw):
        calls[0] += 1
        if calls[0] == fail_at[0]:
            raise PackError(f"disk full while writing {shard.name} (simulated)")
        result = real_write(shard, out_dir, **kw)
        peak[0] = max(peak[0], used(out_dir))
        return result

    monkeypatch.setattr(write_session, "write_shard", measured_write)

    fresh = tmp_path / "fresh"
    pack(src, fresh, **options)
    output = sum(p.stat().st_size for p in fresh.glob("*/*.tar"))
    fresh_peak = peak[0]
    assert fresh_peak <= 1.1 * output

    out = tmp_path / "out"
    calls[0], fail_at[0] = 0, 8
    with pytest.raises(PackError, match="disk full"):
        pack(src, out, **options)
    peak[0], calls[0], fail_at[0] = 0, 0, None
    pack(src, out, **options)  # the re-run after freeing space
    assert calls[0] < 8, "the re-run must keep the shards written before"
    assert peak[0] <= 1.1 * output, (
        f"resumed pack peaked at {peak[0] / output:.2f}x the output on disk "
        f"(a fresh pack: {fresh_peak / output:.2f}x)")


# ---------------------------------------------------------------------------------------
# 4. The Dask scheduler lost mid-pack: a raw FutureCancelledError traceback.
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_scheduler_lost_mid_pack_is_a_pack_error(tmp_path):
    """A pack on a running cluster (``--scheduler``) whose scheduler goes away mid-job (the
    node restarted, the scheduler was OOM-killed) ends with distributed's
    ``FutureCancelledError: ... cancelled for reason: scheduler-connection-lost`` as a
    traceback out of ``shardpack pack`` (exit 1), not a PackError: the CLI's one-line
    error and "re-run the same command to resume" are skipped. An unreachable scheduler
    at the start is a PackError; one lost later should be too."""
    import signal
    import threading
    import time

    pytest.importorskip("distributed")
    from packer.dask_engine import run_dask

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", str(port), "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
         "--no-nanny"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import distributed

        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        killer = threading.Timer(3.0, lambda: os.kill(scheduler.pid, signal.SIGKILL))
        killer.start()
        try:
            with pytest.raises(PackError):
                list(run_dask(time.sleep, [2.0] * 6, workers=1, scheduler=address, retries=0))
        finally:
            killer.cancel()
    finally:
        for proc in (worker, scheduler):
            proc.kill()
            proc.wait(timeout=30)
