"""Found by a review of the 2026-11-27 changes (class-name labels, processes="auto", uploads
without s3:DeleteObject, the ordered-decode prototype). Real parts: tars from webdataset's writer or packer.pack, the real
ShardReader / ShardIterableDataset / torch DataLoader, the real uploader over an fsspec
store that denies deletes (as a role without s3:DeleteObject)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import no_delete_store
from PIL import Image

from packer.errors import EmptySplitError
from reader import ShardReader


def _tars(folder: Path, count: int, per_tar: int, *, names: bool) -> str:
    """``count`` 16x16 PNGs in webdataset tars; ``.cls`` holds a class name ("cat") when
    ``names``, else the index as webdataset writes it."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "t-%06d.tar"), maxcount=per_tar, verbose=0) as sink:
        for n in range(count):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (n % 256, n // 256, 0)).save(buf, format="PNG")
            cls = ("cat", "dog", "eel")[n % 3] if names else n % 3
            sink.write({"__key__": f"s{n:05d}", "png": buf.getvalue(), "cls": cls})
    return str(folder / f"t-{{000000..{(count - 1) // per_tar:06d}}}.tar")


# ---- 3. plain tars whose .cls hold class names --------------------------------------------


def test_a_scan_of_class_name_labels_does_not_ride_along_in_every_copy_of_the_reader(tmp_path):
    """label_mode=None over tars whose .cls hold class names: the scan now keeps one
    SampleDecodeError per sample (``_unreadable_labels``), with its traceback and chained
    cause, for the life of the reader, and ``__getstate__`` drops the scan (``_index``) from
    copies but not that list: every decode process is sent it each epoch, every spawned
    loader worker gets it. 1,500 samples: ~265 KB pickled against ~1.5 KB for the same
    reader over numeric labels (1.28 M samples: ~225 MB per process per epoch, ~2 GB held
    in the main process). Only the first error and a count are ever used."""
    numeric = ShardReader(_tars(tmp_path / "num", 1500, 500, names=False), image_size=4, batch_size=8,
                          label_mode=None, shuffle=False)
    named = ShardReader(_tars(tmp_path / "named", 1500, 500, names=True), image_size=4, batch_size=8,
                        label_mode=None, shuffle=False)
    assert len(numeric) == len(named) == 188
    small, big = len(pickle.dumps(numeric)), len(pickle.dumps(named))
    assert big < 2 * small + 10_000, f"a copy of the reader is {big} bytes, against {small} with numeric labels"


def test_an_empty_split_in_a_spawned_loader_worker_counts_no_negative_images(tmp_path):
    """ShardIterableDataset over tars whose .cls all hold class names, label_mode="int",
    read through a DataLoader whose workers are spawned (macOS' and Windows' default;
    forkserver is Python 3.14's on Linux): the worker's copy has no scan (``_index`` is
    dropped by ``__getstate__``) but has ``_unreadable_labels``, so require_samples
    computes ``unlabelled = 0 - 300`` and the error says "-300 images have no .cls label".
    The main process (num_workers=0) says it right."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from reader.torch_data import ShardIterableDataset

    ds = ShardIterableDataset(_tars(tmp_path, 300, 100, names=True), image_size=4, batch_size=8,
                              shuffle=False, decode_threads=1)
    with pytest.raises(EmptySplitError) as main:
        list(DataLoader(ds, batch_size=None, num_workers=0))
    assert "the labels of 300 images are not class indices" in str(main.value)
    with pytest.raises(EmptySplitError) as spawned:
        list(DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn"))
    said = str(spawned.value)
    assert "the labels of 300 images are not class indices" in said
    assert "-300 images" not in said, said[-400:]


def test_the_empty_split_message_of_a_copy_of_the_reader_is_the_originals(tmp_path):
    """The same without torch: a pickled copy (what a decode process or a spawned worker
    gets) says "-300 images have no .cls label"."""
    reader = ShardReader(_tars(tmp_path, 300, 100, names=True), image_size=4, batch_size=8, shuffle=False)
    reader.shard_counts()
    with pytest.raises(EmptySplitError) as original:
        reader.require_samples(scan=True)
    copy = pickle.loads(pickle.dumps(reader))
    with pytest.raises(EmptySplitError) as copied:
        copy.require_samples(scan=True)
    assert str(copied.value) == str(original.value)


# ---- 1. processes="auto" ----------------------------------------------------------------


def test_processes_auto_in_dataloader_workers_on_a_many_core_machine(tmp_path, monkeypatch):
    """ShardIterableDataset(processes="auto") read by a DataLoader with workers: on fewer
    than 8 CPUs "auto" is 0 and it works; on 8 or more (faked here; the loader is real) it
    is fixed at construction to cpus // 2 and every worker raises "ShardIterableDataset
    (processes=N) decodes in its own N processes ... drop processes=". The same script
    breaks exactly on the machines "auto" is for; inside a loader worker (the loader's
    workers are the processes) "auto" should be threads."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    import reader.batches as batches
    import reader.shard_reader as shard_reader
    from reader.torch_data import ShardIterableDataset

    url = _tars(tmp_path, 48, 16, names=False)
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 16)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 1)  # processes for 48 images
    ds = ShardIterableDataset(url, image_size=4, batch_size=8, shuffle=False, processes="auto")
    assert ds.reader.processes == 8  # in this, the main process
    try:
        got = sum(1 for _ in DataLoader(ds, batch_size=None, num_workers=2))
    finally:
        ds.reader.close()
    assert got == len(ds) == 6


def test_processes_auto_shares_the_machine_with_the_other_local_ranks(tmp_path, monkeypatch):
    """torchrun on one 64-CPU node with 8 ranks (RANK/WORLD_SIZE/LOCAL_WORLD_SIZE set as it
    sets them): every rank's "auto" takes 64 // 2 = 32 decode processes with 2 threads,
    256 processes and 512 threads on 64 CPUs, and 8 x 32 processes' shared-memory batches
    (README: 8 processes are 1.2 GB at 224x224), each rank checking /dev/shm alone. "As
    many as suit this machine" should count the CPUs this rank has of it."""
    import reader.batches as batches
    import reader.shard_reader as shard_reader

    url = _tars(tmp_path, 512, 64, names=False)
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 64)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 1)  # processes for 64 images a rank
    for name, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(name, value)
    reader = ShardReader(url, image_size=4, batch_size=8, processes="auto")
    assert (reader.rank, reader.world_size) == (3, 8)
    assert reader.processes * 8 <= 64, f"each of 8 local ranks starts {reader.processes} processes on 64 CPUs"


def test_processes_true_is_refused_as_num_workers_true_is(tmp_path):
    """processes=True (a user turning processes "on", now that "auto" exists) passes the
    check (int(True) == 1 == True) and becomes 0: threads, without a word. num_workers
    refuses a bool (checks.whole_number)."""
    url = _tars(tmp_path, 8, 8, names=False)
    with pytest.raises(ValueError, match="num_workers"):
        ShardReader(url, image_size=4, num_workers=True)
    with pytest.raises(ValueError, match="processes"):
        ShardReader(url, image_size=4, processes=True)


# ---- 4. a role without s3:DeleteObject ---------------------------------------------------


def test_a_reader_during_a_no_delete_upload_never_reads_the_new_packs_pixels(tmp_path):
    """docs/OBJECT_STORAGE.md (this change): without s3:DeleteObject "the old manifest stays
    published while shards change (a reader meanwhile fails a changed shard's checksum, and
    never reads wrong pixels)". The checksum is compared at the shard's end, after the
    reader has yielded what it decoded: a reader opened while the upload of pack B replaced
    pack A's one shard (9.6 MB, over one 8 MiB read block; real shards are 256 MB) yields
    8 batches of B's images under A's manifest, then ChecksumError. Before the change the
    upload stopped before changing any shard."""

    from packer import pack
    from packer.uploader import RemoteStore, upload

    no_delete_store("nodeleteh4")
    rng = np.random.default_rng(0)
    for name in ("A", "B"):  # noise PNGs: 196 KB each, one shard of 48 per pack
        for c in ("cat", "dog"):
            folder = tmp_path / name / "train" / c
            folder.mkdir(parents=True)
            for i in range(24):
                Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        pack(tmp_path / name, tmp_path / f"{name}-shards", seed=0, max_count=1000, workers=1, quiet=True)
    url = "nodeleteh4://bucket/ds"
    upload(tmp_path / "A-shards", url, quiet=True, workers=1)

    seen: list[tuple[int, str | None]] = []
    real_put = RemoteStore.put

    def put(self, *args, **kwargs):
        real_put(self, *args, **kwargs)
        got = 0
        try:  # a reader opened now: refusing the URL is fine, reading pack B under A's manifest is not
            reader = ShardReader(url, split="train", image_size=8, batch_size=4, shuffle=False, num_workers=1)
            for _ in reader:
                got += 1
            seen.append((got, None))
        except Exception as exc:  # noqa: BLE001 - what the reader ends with
            seen.append((got, type(exc).__name__))

    RemoteStore.put = put
    try:
        assert upload(tmp_path / "B-shards", url, quiet=True, workers=1)["manifest"] == "uploaded"
    finally:
        RemoteStore.put = real_put
    assert len(seen) == 1
    batches, error = seen[0]
    assert batches == 0, f"the reader yielded {batches} batches of the new pack under the old manifest, then {error}"


def test_a_rerun_of_an_unchanged_pack_to_s3_under_a_no_delete_role_is_calm(tmp_path, monkeypatch, caplog):
    """moto with IAM on: a role with s3:GetObject/PutObject on the prefix and s3:ListBucket,
    no s3:DeleteObject. After a smaller --overwrite pack left the larger pack's extra shards
    there (denied deletes, as intended), every later pack to the URL, even one that changes
    nothing (every shard "already at" the URL), finds those shards again as a stopped run's
    strays, sets the published manifest aside (a PUT of the copy), warns "the old manifest
    stays published while shards change" though none does, is denied the 8 deletes again
    and warns of them, and re-publishes the manifest. An upload's re-run is calm
    (test_upload: "a re-run is calm"); a pack's should be too."""

    from s3_server import S3Server, iam_user_key, s3_options

    from packer import pack
    from packer.examples import make_example_tree

    for name, count in (("large", 60), ("small", 20)):
        make_example_tree(tmp_path / name, counts={"train": count}, long_side=(48, 64), seed=2)
    server = S3Server(process=True, env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}).start()
    try:
        key = iam_user_key(server.endpoint, "nodelete", [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "arn:aws:s3:::data/team/*"},
            {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "arn:aws:s3:::data"}])
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
                     "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name, raising=False)
        options = {**s3_options(server.endpoint), "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        url = "s3://data/team/packed"
        pack(tmp_path / "large", url, storage_options=options, max_count=20, workers=1, quiet=True)
        pack(tmp_path / "small", url, storage_options=options, max_count=20, workers=1, quiet=True,
             overwrite=True)
        caplog.clear()
        with caplog.at_level("WARNING", logger="shardpack"):
            pack(tmp_path / "small", url, storage_options=options, max_count=20, workers=1, quiet=True)
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert not [m for m in said if "manifest.json" in m], said  # not taken down: no shard changes
    finally:
        server.stop()


# ---- 6. scripts/ordered_decode.py by_reference (benchmark prototype) -----------------------


def test_ordered_decode_by_reference_does_not_keep_a_file_open_per_shard(tmp_path):
    """OrderedReader(by_reference=True): each decode process opens every shard it reads
    a sample of (``_read_reference``'s ``files``) and never closes one, across epochs. Under
    a file limit of 100 (run in a child, so the limit is its own), 150 tars of 2 samples:
    "OSError: [Errno 24] Too many open files" at the ~90th shard, where the bytes-piped
    reader reads them all. At the default soft limit of 1,024, a 1,282-shard ImageNet
    (1,000 samples a shard) fails the same way, in a benchmark run."""
    import subprocess
    import sys

    script = f"""
import importlib.util, resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from conftest import write_jpeg_tars
from pathlib import Path
url = write_jpeg_tars(Path({str(tmp_path)!r}), count=300, classes=3, broken=set(), per_tar=2, max_side=40, seed=1)
spec = importlib.util.spec_from_file_location("ordered_decode", {str(Path(__file__).resolve().parent.parent / "scripts" / "ordered_decode.py")!r})
m = importlib.util.module_from_spec(spec); sys.modules["ordered_decode"] = m; spec.loader.exec_module(m)
resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
for by_reference in (False, True):
    r = m.OrderedReader(url, num_classes=3, image_size=8, batch_size=6, seed=4, decode_processes=1,
                        by_reference=by_reference, shuffle=False)
    try:
        print(by_reference, sum(1 for _ in r))
    finally:
        r.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-600:]
    assert done.stdout.split() == ["False", "50", "True", "50"]
