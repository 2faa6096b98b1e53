"""The Dask engine on a real ``distributed.LocalCluster`` (loopback, worker processes).

Invariants a user cares about: a pack on Dask is byte-identical to a local pack of the same
tree and seed (every shard and the manifest), also when a worker dies mid-job; the engine
connects to a running scheduler and leaves it running; huge plans are never submitted at once.
"""

from __future__ import annotations

import hashlib
import operator
import os
import signal
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from packer import engines, pack  # noqa: E402
from packer.dask_engine import check_workers_see, run_dask  # noqa: E402
from packer.errors import PackError  # noqa: E402
from packer.examples import make_example_tree  # noqa: E402
from packer.write import partial_name  # noqa: E402

MAX_COUNT = 16  # small shards, so the 160 images make ~10 write tasks


def _cluster(n_workers: int) -> distributed.LocalCluster:
    return distributed.LocalCluster(
        host="127.0.0.1", n_workers=n_workers, threads_per_worker=1, processes=True,
        dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (manifest included), by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_example_tree(
        tmp_path_factory.mktemp("src") / "data", counts={"train": 30, "validation": 10}
    )
    good = (root / "train" / "cat" / "img_00000.jpg").read_bytes()
    (root / "train" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "validation" / "rocket" / "text_named.jpg").write_text("not a picture")
    return root


@pytest.fixture(scope="module")
def local_pack(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("local") / "shards"
    pack(tree, out, engine="local", workers=1, max_count=MAX_COUNT, seed=7, quiet=True)
    return out, _digests(out)


@pytest.fixture(scope="module")
def cluster() -> distributed.LocalCluster:
    with _cluster(2) as c:
        yield c


def test_dask_pack_is_byte_identical_to_local(tree, local_pack, tmp_path):
    """Own LocalCluster (no scheduler given): same shards, same manifest bytes."""
    out = tmp_path / "shards"
    manifest = pack(tree, out, engine="dask", workers=2, max_count=MAX_COUNT, seed=7, quiet=True)
    assert _digests(out) == local_pack[1]
    assert sum(len(s["shards"]) for s in manifest["splits"].values()) >= 8
    assert {s["path"] for s in manifest["skipped"]} == {
        "train/cat/truncated.jpg", "validation/rocket/text_named.jpg",
    }


def test_scheduler_address_is_used_and_left_running(tree, local_pack, cluster, tmp_path):
    out = tmp_path / "shards"
    with distributed.Client(cluster) as client:
        before = sum(client.run(lambda: 1).values())
        pack(
            tree, out, engine="dask", scheduler=cluster.scheduler_address, workers=2,
            max_count=MAX_COUNT, seed=7, quiet=True,
        )
        assert _digests(out) == local_pack[1]
        assert sum(client.run(lambda: 1).values()) == before == 2  # cluster still up
        tasks = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        assert tasks == 0  # every future was released


def test_window_bounds_tasks_in_flight(cluster):
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(50):
            pulled += 1
            yield i

    seen = []
    for item, result in run_dask(
        operator.neg, items(), workers=2, scheduler=cluster.scheduler_address, max_in_flight=3
    ):
        assert pulled - len(seen) <= 3  # never more than the window submitted, unyielded
        assert result == -item
        seen.append(item)
    assert sorted(seen) == list(range(50))


def test_task_error_is_reraised_as_is(cluster):
    with pytest.raises(ValueError, match="invalid literal"):
        list(run_dask(int, ["1", "x", "3"], workers=2, scheduler=cluster.scheduler_address, retries=0))


@pytest.mark.slow
def test_killed_workers_are_survived(tree, local_pack, tmp_path, monkeypatch):
    """Two worker deaths in one pack, output still identical to the local engine's:

    * probe phase: the driver SIGKILLs a worker process once the first results are in;
    * write phase: a worker dies in the middle of writing a shard (half a ``.partial`` on
      disk, then ``os._exit``); the scheduler reruns the task on a live worker.
    """
    out = tmp_path / "shards"
    marker = tmp_path / "died-mid-write"
    victim = "train/train-000002.tar"
    killed: list[int] = []
    real_engine = engines.ENGINES["dask"]

    def die_once_mid_write(fn, task):  # runs on a worker; pickled by value (a closure)
        shard, out_dir = task[0], task[1]
        if shard.name == victim and not marker.exists():
            marker.touch()
            partial = partial_name(os.path.join(out_dir, shard.name))
            os.makedirs(os.path.dirname(partial), exist_ok=True)
            with open(partial, "wb") as f:
                f.write(b"\0" * 4096)  # a writer killed halfway
            os._exit(1)
        return fn(task)

    with _cluster(2) as cluster, distributed.Client(cluster) as client:
        def engine(fn, items, **kw):
            if fn.__name__ == "write_task":
                def wrapped(task, fn=fn):
                    return die_once_mid_write(fn, task)
                yield from real_engine(wrapped, items, **kw)
                return
            for n, pair in enumerate(real_engine(fn, items, **kw)):
                if n == 0:
                    pid = next(iter(client.run(os.getpid).values()))
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                yield pair

        monkeypatch.setitem(engines.ENGINES, "dask", engine)
        pack(
            tree, out, engine="dask", scheduler=cluster.scheduler_address, workers=2,
            max_count=MAX_COUNT, seed=7, quiet=True,
        )
    assert killed and marker.exists()  # both deaths really happened
    assert not list(out.rglob("*.partial"))
    assert _digests(out) == local_pack[1]


def test_unreachable_scheduler_says_how_to_fix(tmp_path):
    from packer.dask_engine import check_workers_see

    with pytest.raises(PackError, match="cannot reach the Dask scheduler.*leave out --scheduler"):
        list(run_dask(abs, [1], workers=1, scheduler="tcp://127.0.0.1:1", connect_timeout=1))
    # the first contact of a pack with --scheduler: the paths check
    with pytest.raises(PackError, match="cannot reach the Dask scheduler.*leave out --scheduler"):
        check_workers_see("tcp://127.0.0.1:1", {"SRC": str(tmp_path)}, connect_timeout=1)


@pytest.mark.slow
def test_task_that_kills_every_worker_is_a_pack_error():
    dask = pytest.importorskip("dask")
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), _cluster(1) as cluster:
        with pytest.raises(PackError, match="killed every Dask worker"):
            list(run_dask(os._exit, [3], workers=1, scheduler=cluster.scheduler_address))


def test_check_workers_see_shared_paths(cluster, tree, tmp_path):
    marker = tmp_path / "marker"
    marker.write_text("x")
    image = str(tree / "train" / "cat" / "img_00000.jpg")
    check_workers_see(cluster.scheduler_address, {"SRC": image, "OUT": str(marker)})
    with pytest.raises(PackError, match="OUT path .* cannot be read on this machine"):
        check_workers_see(cluster.scheduler_address, {"SRC": image, "OUT": str(tmp_path / "nope")})


def test_check_workers_see_names_the_blind_worker(cluster, tree, tmp_path, monkeypatch):
    """A worker without the share (simulated: one worker's answer is replaced)."""
    marker = tmp_path / "marker"
    marker.write_text("x")
    real_run = distributed.Client.run

    def run(self, fn, *args, **kw):
        seen = real_run(self, fn, *args, **kw)
        blind = sorted(seen)[0]
        seen[blind] = [seen[blind][0], None]
        return seen

    monkeypatch.setattr(distributed.Client, "run", run)
    image = str(tree / "train" / "cat" / "img_00000.jpg")
    with pytest.raises(PackError, match=r"worker tcp://127\.0\.0\.1:\d+ does not see OUT .*missing"):
        check_workers_see(cluster.scheduler_address, {"SRC": image, "OUT": str(marker)})


def test_a_dask_pack_to_a_url_starts_one_cluster_for_the_whole_job(tree, local_pack, monkeypatch):
    """Packing to a URL writes and uploads in batches; every batch used to start a
    LocalCluster of its own (one per 4 shards here). The job holds one, and the shards
    are the local pack's."""
    import uuid

    import fsspec

    import packer.dask_engine as dask_engine

    starts = []
    real = dask_engine.local_cluster

    def counted(workers):
        starts.append(workers)
        return real(workers)

    monkeypatch.setattr(dask_engine, "local_cluster", counted)
    url = f"memory://dask-{uuid.uuid4().hex}/ds"
    from packer.remote_out import pack_to_url

    manifest = pack_to_url(tree, url, engine="dask", workers=2, seed=7, max_count=MAX_COUNT,
                           quiet=True, staging_shards=1)
    shards = [e["name"] for split in manifest["splits"].values() for e in split["shards"]]
    assert len(shards) > 2 and starts == [2]
    fs, root = fsspec.core.url_to_fs(url)
    digests = local_pack[1]
    for name in shards:
        assert hashlib.sha256(fs.cat_file(f"{root}/{name}")).hexdigest() == digests[name]
