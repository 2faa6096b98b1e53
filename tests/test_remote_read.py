"""reader.remote and the reader end to end on s3:// (real S3 server on loopback).

Invariants a user relies on: every byte of a shard arrives exactly once, in order, even
when connections drop mid-body or the server answers 500 / 503 SlowDown; every sample
arrives exactly once with its label; a missing or corrupted shard fails at once with a
message naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from conftest import ID_CLASSES, pixel_ids, small_cnn
from s3_server import FaultProxy, s3_options

from packer.errors import ChecksumError, ShardReadError
from packer.format import MANIFEST_NAME
from packer.uploader import upload
from reader.remote import ShardCache, is_transient, open_shard_stream, prefetch_shards

BLOCK = 16 << 10  # small blocks: many range requests per shard, so faults land mid-shard


def _entries(out):
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return {e["name"]: e for s in manifest["splits"].values() for e in s["shards"]}


@pytest.fixture
def uploaded(s3, id_shards):
    """id_shards uploaded to s3://BUCKET/ds: (endpoint, bucket, local shard dir, id paths)."""
    endpoint, _, bucket = s3
    shards, paths = id_shards
    upload(shards, f"s3://{bucket}/ds", endpoint_url=endpoint, quiet=True)
    return endpoint, bucket, shards, paths


def _no_library_retries(endpoint: str, monkeypatch):
    """Options that switch off botocore's and s3fs' own retries: our retry layer alone must
    cope. (s3fs reads ``retries`` from a class attribute.)"""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    return s3_options(endpoint, config_kwargs={"retries": {"total_max_attempts": 1}})


def _faulty(every: int, kinds=("drop", "500", "503")):
    """Fault on every ``every``-th GET of a shard, cycling through ``kinds``; a retry of the
    same range (the next request) goes through."""
    state = {"n": 0}

    def fault(method, path, n):
        if method != "GET" or not path.endswith(".tar"):
            return None
        state["n"] += 1
        if state["n"] % every == 0:
            return kinds[(state["n"] // every) % len(kinds)]
        return None

    return fault


@pytest.mark.parametrize("readahead", [True, False])
def test_stream_reads_every_byte_once_through_faults(uploaded, readahead, monkeypatch):
    endpoint, bucket, shards, _ = uploaded
    proxy = FaultProxy(endpoint, fault=_faulty(3)).start()
    try:
        options = _no_library_retries(proxy.endpoint, monkeypatch)
        retried = 0
        for name, entry in sorted(_entries(shards).items())[:6]:
            with open_shard_stream(
                f"s3://{bucket}/ds/{name}", storage_options=options, block_size=BLOCK,
                expected_sha256=entry["sha256"], expected_size=entry["bytes"],
                readahead=readahead, backoff=0.01,
            ) as stream:
                data = b"".join(iter(lambda: stream.read(7000), b""))
                retried += stream.retried
                assert stream.tell() == entry["bytes"]
            assert data == (shards / name).read_bytes()
    finally:
        proxy.stop()
    faults = [r for r in proxy.log if r.fault]
    assert {r.fault for r in faults} == {"drop", "500", "503"}
    assert retried == len(faults) > 0  # each fault cost exactly one retry at the same range
    # Every range was asked for again at its own offset, never from byte 0 of the shard.
    gets = [r for r in proxy.log if r.method == "GET" and r.path.endswith(".tar")]
    blocks = sum(-(-e["bytes"] // BLOCK) for _, e in sorted(_entries(shards).items())[:6])
    assert len(gets) == len(faults) + blocks


def test_shard_reader_on_s3_yields_every_sample_once_with_labels_despite_faults(uploaded):
    from reader import ShardReader

    endpoint, bucket, _, paths = uploaded
    proxy = FaultProxy(endpoint, fault=_faulty(4)).start()
    try:
        reader = ShardReader(f"s3://{bucket}/ds", split="train", image_size=(4, 4),
                             interpolation="nearest", batch_size=10, seed=0,
                             storage_options=s3_options(proxy.endpoint))
        ids, labels = [], []
        for x, y in reader:
            ids += pixel_ids(x)
            labels += y.tolist()
    finally:
        proxy.stop()
    train = {n for n, p in paths.items() if p.startswith("train/")}
    assert sorted(ids) == sorted(train) and len(ids) == len(train)
    for n, label in zip(ids, labels, strict=True):
        assert paths[n].split("/")[1] == ID_CLASSES[label]
    assert any(r.fault for r in proxy.log)


def test_missing_shard_fails_at_once_naming_it(uploaded):
    from reader import ShardReader

    endpoint, bucket, shards, _ = uploaded
    name = sorted(_entries(shards))[0]
    fsspec.filesystem("s3", **s3_options(endpoint)).rm_file(f"{bucket}/ds/{name}")
    proxy = FaultProxy(endpoint).start()
    try:
        url = f"s3://{bucket}/ds/{name}"
        with pytest.raises(ShardReadError, match="not found") as info:
            with open_shard_stream(url, storage_options=s3_options(proxy.endpoint), retries=5) as s:
                s.read()
        assert url in str(info.value)
        assert len([r for r in proxy.log if r.path.endswith(name)]) == 1  # no retries for 404
        with pytest.raises(ShardReadError, match=name.replace("/", ".")):
            for _ in ShardReader(f"s3://{bucket}/ds", split=name.split("/")[0], image_size=(4, 4),
                                 storage_options=s3_options(proxy.endpoint)):
                pass
    finally:
        proxy.stop()


def test_corrupted_object_fails_with_checksum_error(uploaded):
    from reader import ShardReader

    endpoint, bucket, shards, _ = uploaded
    name, entry = sorted(_entries(shards).items())[0]
    data = bytearray((shards / name).read_bytes())
    data[100] ^= 0xFF  # inside the first tar header
    fsspec.filesystem("s3", **s3_options(endpoint)).pipe_file(f"{bucket}/ds/{name}", bytes(data))
    url = f"s3://{bucket}/ds/{name}"
    with pytest.raises(ChecksumError, match="does not match") as info:
        with open_shard_stream(url, storage_options=s3_options(endpoint), block_size=BLOCK,
                               expected_sha256=entry["sha256"]) as stream:
            while stream.read(BLOCK):
                pass
    assert url in str(info.value)
    # Without the checksum, the reader's tar parser catches it, naming the shard.
    with pytest.raises(ShardReadError, match=name.replace("/", ".")):
        for _ in ShardReader(f"s3://{bucket}/ds", split=name.split("/")[0], image_size=(4, 4),
                             storage_options=s3_options(endpoint)):
            pass


def test_truncated_object_is_reported_not_hidden(uploaded):
    endpoint, bucket, shards, _ = uploaded
    name, entry = sorted(_entries(shards).items())[0]
    fs = fsspec.filesystem("s3", **s3_options(endpoint))
    fs.pipe_file(f"{bucket}/ds/{name}", (shards / name).read_bytes()[:5000])
    with pytest.raises(ShardReadError, match="truncated"):
        with open_shard_stream(f"s3://{bucket}/ds/{name}", storage_options=s3_options(endpoint),
                               expected_size=entry["bytes"], block_size=BLOCK, backoff=0.01) as s:
            s.read()


def test_a_checked_stream_cut_short_hands_out_nothing_of_its_checked_tail(tmp_path, monkeypatch):
    """A shard file shorter than the manifest says cannot match its sha256, and its tail
    (the last 8 MiB, all of a smaller shard) goes out only after the hash matched: none of
    it is handed out (another shard's file copied over it gave that shard's samples).
    Before the tail, bytes go out as they stream, as a file's short read before EIO returns
    them; every read after the cut raises."""
    import reader.local

    monkeypatch.setattr(reader.local, "_TAIL_BYTES", 4096)
    whole = bytes(range(256)) * 64  # 16 KiB: its tail is the last 4 KiB
    path = tmp_path / "cut.tar"
    sha = hashlib.sha256(whole).hexdigest()  # a local shard with a checksum: a checked stream
    for cut, handed_out in ((10_000, 10_000), (14_000, 12_288), (16_000, 12_288)):
        path.write_bytes(whole[:cut])
        got = b""
        with open_shard_stream(str(path), expected_size=len(whole), expected_sha256=sha, block_size=4096) as s:
            with pytest.raises(ShardReadError, match="truncated") as info:
                while chunk := s.read(3000):
                    got += chunk
            assert got == whole[:handed_out] and info.value.offset == cut
            with pytest.raises(ShardReadError, match="truncated"):
                s.read(100)


def test_a_shorter_object_put_over_a_shard_gives_none_of_its_samples(uploaded):
    """On S3 too: a shard object replaced by another shard's (shorter) object was read as
    it, under on_shard_error="warn", until its size came out short."""
    from conftest import sample_ids

    from reader import ShardReader

    endpoint, bucket, shards, _ = uploaded
    names = sorted(n for n in _entries(shards) if n.startswith("train/"))
    fs = fsspec.filesystem("s3", **s3_options(endpoint))
    fs.pipe_file(f"{bucket}/ds/{names[0]}", (shards / names[-1]).read_bytes())
    last = ShardReader(shards, split="train", image_size=4, shuffle=False, batch_size=210)
    intruders = set([i for x, _ in last for i in sample_ids(x)][-last.shard_counts()[-1]:])
    reader = ShardReader(f"s3://{bucket}/ds", split="train", image_size=4, shuffle=False, batch_size=16,
                         on_shard_error="warn", storage_options=s3_options(endpoint))
    with pytest.warns(RuntimeWarning, match="truncated"):
        ids = [i for x, _ in reader for i in sample_ids(x)]
    assert reader.policy.skipped_shards == 1
    head = len(ids) - len(set(ids))  # the epoch's fill repeats its first samples
    assert sorted(ids[-head:] if head else []) == sorted(ids[:head])
    assert sum(1 for i in ids if i in intruders) == len(intruders)  # the last shard's own, once


def test_prefetch_opens_the_next_shard_ahead():
    opened = []

    class Stream:
        def __init__(self, url):
            self.url = url
            self.closed = False
            opened.append(url)

        def close(self):
            self.closed = True

    gen = prefetch_shards(["a", "b", "c"], Stream, depth=1)
    first = next(gen)
    assert first.url == "a" and opened == ["a", "b"]  # b is already fetching
    assert [s.url for s in gen] == ["b", "c"]
    gen = prefetch_shards(["a", "b", "c"], Stream, depth=2)
    next(gen)
    gen.close()
    assert opened[-3:] == ["a", "b", "c"]


def test_cache_serves_second_read_locally_and_evicts_lru(uploaded, tmp_path):
    endpoint, bucket, shards, _ = uploaded
    proxy = FaultProxy(endpoint).start()
    cache_dir = tmp_path / "cache"
    entries = sorted(_entries(shards).items())[:3]
    limit = entries[0][1]["bytes"] + entries[1][1]["bytes"]
    try:
        def read(name, entry):
            with open_shard_stream(f"s3://{bucket}/ds/{name}", storage_options=s3_options(proxy.endpoint),
                                   expected_sha256=entry["sha256"], cache_dir=cache_dir,
                                   cache_max_bytes=limit, block_size=BLOCK) as stream:
                return stream.read()

        name, entry = entries[0]
        assert read(name, entry) == (shards / name).read_bytes()
        gets = len(proxy.requests("GET"))
        assert read(name, entry) == (shards / name).read_bytes()
        assert len(proxy.requests("GET")) == gets  # served from the cache
        for other, e in entries[1:]:
            read(other, e)
    finally:
        proxy.stop()
    cached = sorted(p.name for p in cache_dir.iterdir())
    assert not [c for c in cached if c.endswith(".partial")]
    assert sum((cache_dir / c).stat().st_size for c in cached) <= limit
    # the least recently used (the first shard) went first
    assert ShardCache(cache_dir).lookup(ShardCache.key(f"s3://{bucket}/ds/{entries[0][0]}",
                                                       entries[0][1]["sha256"], None)) is None


def test_transient_errors_are_classified():
    from botocore.exceptions import ClientError

    def client_error(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(client_error(503, "SlowDown"))
    assert is_transient(client_error(500, "InternalError"))
    assert not is_transient(client_error(403, "AccessDenied"))
    assert not is_transient(FileNotFoundError())
    assert not is_transient(PermissionError())
    assert not is_transient(ValueError("bad"))


def test_local_shards_open_directly(id_shards):
    shards, _ = id_shards
    name = sorted(_entries(shards))[0]
    with open_shard_stream(str(shards / name)) as f:
        assert f.read() == (shards / name).read_bytes()
    with pytest.raises(ShardReadError, match="not found"):
        open_shard_stream(str(shards / "nope.tar"))


def test_counts_from_s3_match_manifest(uploaded):
    from reader import ShardReader

    endpoint, bucket, _, paths = uploaded
    reader = ShardReader(f"s3://{bucket}/ds", split="test", shuffle=False, image_size=(4, 4),
                         interpolation="nearest", batch_size=7, storage_options=s3_options(endpoint))
    labels = [int(v) for _, y in reader for v in y]
    expected = Counter(p.split("/")[1] for p in paths.values() if p.startswith("test/"))
    assert Counter(ID_CLASSES[v] for v in labels) == expected


@pytest.mark.slow
def test_keras_fit_streams_from_s3(s3, photo_shards):
    """pack() straight to s3://, then train a real Keras model on image_dataset_from_shards
    reading that URL, and predict rows that line up with the manifest's labels."""
    keras = pytest.importorskip("keras")
    import numpy as np

    from packer import pack
    from reader import ShardReader, image_dataset_from_shards

    endpoint, options, bucket = s3
    url = f"s3://{bucket}/photos"
    pack(photo_shards.parent / "src", url, storage_options=options, seed=0, max_count=40,
         workers=1, quiet=True)
    keras.utils.set_random_seed(0)
    opts = dict(image_size=(32, 32), batch_size=32, seed=0, storage_options=options)
    train = image_dataset_from_shards(url, split="train", **opts)
    val = image_dataset_from_shards(url, split="validation", shuffle=False, **opts)
    model = small_cnn(keras)
    history = model.fit(train, validation_data=val, epochs=8, verbose=0)
    assert len(train) == 10
    assert history.history["val_accuracy"][-1] > 0.6, history.history  # chance is 0.25
    reader = ShardReader(url, split="test", shuffle=False, image_size=(32, 32), storage_options=options)
    truth = np.array([reader.class_names.index(f.split("/")[1]) for f in reader.filenames])
    assert np.array_equal(truth, reader.labels) and len(truth) == 80


def test_http_server_without_range_support(id_shards):
    """http(s):// sources: a plain static server that ignores Range still yields the exact
    bytes (the stream notices the whole object came back and keeps the rest)."""
    shards, _ = id_shards
    with _static_server(shards) as base:
        name, entry = sorted(_entries(shards).items())[0]
        with open_shard_stream(f"{base}/{name}", block_size=BLOCK, expected_sha256=entry["sha256"]) as s:
            assert s.read() == (shards / name).read_bytes()
        with pytest.raises(ShardReadError, match="not found"):
            with open_shard_stream(f"{base}/train/missing.tar", block_size=BLOCK) as s:
                s.read()


@contextlib.contextmanager
def _static_server(folder):
    """Python's own static file server (no Range support) on 127.0.0.1 serving ``folder``:
    yields its base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_split_names_that_mean_something_in_a_url_are_read_over_http(tmp_path):
    """`pack` takes split names with '#', '?', '%', spaces and accents; over http(s) they
    were sent raw, so every shard was "not found" (a fragment, a query, an escape)."""
    from conftest import write_id_tree

    from packer import pack
    from packer.inspect import verify
    from reader import ShardReader

    splits = ["val#1", "a?b c", "50%25off", "café"]
    write_id_tree(tmp_path / "src", dict.fromkeys(splits, 2))
    pack(tmp_path / "src", tmp_path / "shards", workers=1, quiet=True)
    with _static_server(tmp_path / "shards") as base:
        for split in splits:
            local = ShardReader(tmp_path / "shards", split=split, image_size=4, shuffle=False)
            remote = ShardReader(base, split=split, image_size=4, shuffle=False)
            assert [y.tolist() for _, y in remote] == [y.tolist() for _, y in local] != []
        report = verify(base)
        assert report.ok and report.samples == 24, report.problems


def test_a_server_that_stalls_mid_shard_is_retried_after_the_read_timeout(id_shards, monkeypatch):
    """An http(s) server that sends half a shard and then goes silent held the read for
    aiohttp's 300 s per attempt (half an hour with the retries); a silence longer than
    the read timeout now fails the request, which is retried."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import packer.storage

    monkeypatch.setattr(packer.storage, "HTTP_READ_TIMEOUT_S", 0.5, raising=False)
    shards, _ = id_shards
    name, entry = sorted(_entries(shards).items())[0]
    body = (shards / name).read_bytes()
    stalled = threading.Event()
    release = threading.Event()

    class Stalling(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def do_GET(self):
            self.do_HEAD()
            if not stalled.is_set():  # the first answer: half the body, then silence
                stalled.set()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                release.wait(30)
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
        start = time.monotonic()
        with open_shard_stream(url, expected_size=entry["bytes"], expected_sha256=entry["sha256"],
                               backoff=0.01) as stream:
            assert stream.read() == body
            assert stream.retried == 1
        assert stalled.is_set() and time.monotonic() - start < 10
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_verify_over_http_reads_as_the_reader_does(tmp_path):
    """`shardpack verify http://...` opened shards with plain fsspec: a server that ignores
    Range (Python's own) failed on a shard over fsspec's 5 MB block, and one dropped
    connection or one 503 ended verify with a traceback, where the reader read on. It now
    reads through the reader's retrying stream."""
    import numpy as np
    from PIL import Image

    from packer import pack
    from packer.inspect import verify

    rng = np.random.default_rng(0)
    for i in range(36):  # noise does not compress: one 7 MB shard
        folder = tmp_path / "src" / "train" / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    pack(tmp_path / "src", tmp_path / "shards", workers=1, quiet=True)
    assert (tmp_path / "shards" / "train" / "train-000000.tar").stat().st_size > 5 << 20
    with _static_server(tmp_path / "shards") as base:
        report = verify(base)
        assert report.ok and report.samples == 36, report.problems
        for kind in ("drop", "503"):
            proxy = FaultProxy(base, fault=lambda method, path, n, kind=kind: (
                kind if method == "GET" and path.endswith(".tar") and n == 1 else None)).start()
            try:
                report = verify(proxy.endpoint)
                assert report.ok and report.samples == 36, (kind, report.problems)
                assert [r.fault for r in proxy.requests("GET") if r.path.endswith(".tar")][:2] == [kind, None]
            finally:
                proxy.stop()
        (tmp_path / "shards" / "train" / "train-000000.tar").unlink()
        assert verify(base).problems == ["train/train-000000.tar: missing"]


def test_shard_reader_verifies_manifest_checksum_of_remote_shards(uploaded):
    """A flipped byte inside an image (tar structure intact) is caught by the sha256 the
    manifest records, not decoded silently into a wrong picture."""
    from reader import ShardReader

    endpoint, bucket, shards, _ = uploaded
    name = sorted(_entries(shards))[0]
    data = bytearray((shards / name).read_bytes())
    data[512 + 40] ^= 0x01  # inside the first sample's image payload
    fsspec.filesystem("s3", **s3_options(endpoint)).pipe_file(f"{bucket}/ds/{name}", bytes(data))
    with pytest.raises(ChecksumError):
        for _ in ShardReader(f"s3://{bucket}/ds", split=name.split("/")[0], image_size=(4, 4),
                             shuffle=False, storage_options=s3_options(endpoint)):
            pass


def test_shard_reader_cache_dir_serves_later_epochs_locally(uploaded, tmp_path):
    from reader import ShardReader

    endpoint, bucket, _, paths = uploaded
    proxy = FaultProxy(endpoint).start()
    try:
        reader = ShardReader(f"s3://{bucket}/ds", split="train", image_size=(4, 4), batch_size=10,
                             interpolation="nearest", seed=0, cache_dir=tmp_path / "cache",
                             storage_options=s3_options(proxy.endpoint))
        first = [i for x, _ in reader for i in pixel_ids(x)]
        fetched = len([r for r in proxy.log if r.method == "GET" and r.path.endswith(".tar")])
        second = [i for x, _ in reader for i in pixel_ids(x)]
        refetched = len([r for r in proxy.log if r.method == "GET" and r.path.endswith(".tar")])
    finally:
        proxy.stop()
    train = sorted(n for n, p in paths.items() if p.startswith("train/"))
    assert sorted(first) == train and sorted(second) == train and first != second
    assert fetched > 0 and refetched == fetched  # epoch 2 read only the local cache
    assert any((tmp_path / "cache").iterdir())


def _read_cached(url, entry, endpoint, cache_dir, **options):
    with open_shard_stream(url, storage_options=s3_options(endpoint), expected_sha256=entry["sha256"],
                           expected_size=entry["bytes"], cache_dir=cache_dir, block_size=BLOCK,
                           **options) as stream:
        return stream.read()


def _tar_gets(proxy):
    return len([r for r in proxy.requests("GET") if r.path.endswith(".tar")])


def test_a_damaged_cached_copy_is_fetched_again_not_served(uploaded, tmp_path):
    """The cache names a copy by its sha256, but a disk can rot: the copy is hashed once per
    process (a copy this process wrote counts as hashed) and again when its modification
    time changes (a hit sets only its access time, the LRU clock; a copy written in place
    was trusted by inode and size), and one that no longer matches is deleted and fetched
    again."""
    endpoint, bucket, shards, _ = uploaded
    name, entry = sorted(_entries(shards).items())[0]
    url, cache_dir = f"s3://{bucket}/ds/{name}", tmp_path / "cache"
    good = (shards / name).read_bytes()
    proxy = FaultProxy(endpoint).start()
    try:
        assert _read_cached(url, entry, proxy.endpoint, cache_dir) == good  # fetched, cached
        fetched = _tar_gets(proxy)
        assert _read_cached(url, entry, proxy.endpoint, cache_dir) == good  # from the cache
        assert _tar_gets(proxy) == fetched
        (copy,) = cache_dir.glob("*.tar")
        damaged = bytearray(copy.read_bytes())
        damaged[600] ^= 0x01
        copy.write_bytes(bytes(damaged))  # in place: same inode and size, a new mtime
        assert _read_cached(url, entry, proxy.endpoint, cache_dir) == good  # this process too
        assert _tar_gets(proxy) > fetched
        fetched = _tar_gets(proxy)
        copy.write_bytes(bytes(damaged))
        # the next process
        script = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from s3_server import s3_options
            from reader.remote import open_shard_stream
            with open_shard_stream({url!r}, storage_options=s3_options({proxy.endpoint!r}),
                                   expected_sha256={entry["sha256"]!r}, expected_size={entry["bytes"]},
                                   cache_dir={str(cache_dir)!r}) as s:
                sys.stdout.buffer.write(s.read())
        """)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
        assert done.stdout == good  # fetched again
        assert _tar_gets(proxy) > fetched
    finally:
        proxy.stop()
    assert copy.read_bytes() == good  # and the cache holds a good copy again


def test_two_streams_of_one_shard_in_one_thread_keep_their_own_cache_copies(uploaded, tmp_path):
    """A rank's padding piece opens a shard it is already reading: both streams write the
    cache at once. Closing one early must not touch the other's copy, and both reading to
    the end must leave one good copy and no error."""
    endpoint, bucket, shards, _ = uploaded
    name, entry = sorted(_entries(shards).items())[0]
    url, cache_dir = f"s3://{bucket}/ds/{name}", tmp_path / "cache"
    good = (shards / name).read_bytes()
    opts = dict(storage_options=s3_options(endpoint), expected_sha256=entry["sha256"],
                expected_size=entry["bytes"], cache_dir=cache_dir, block_size=BLOCK)
    early, full = open_shard_stream(url, **opts), open_shard_stream(url, **opts)
    early.read(100)
    early.close()
    assert full.read() == good
    full.close()
    a, b = open_shard_stream(url, **opts), open_shard_stream(url, **opts)
    assert a.read() == b.read() == good
    a.close(), b.close()
    assert [p.read_bytes() == good for p in cache_dir.iterdir()] == [True]  # no .partial left


def test_labels_are_checked_and_cached_like_an_epoch(uploaded, tmp_path):
    """`r.labels` reads every shard once (checked against the manifest, into cache_dir); the
    epoch after it then reads only the cache."""
    from reader import ShardReader

    endpoint, bucket, _, paths = uploaded
    proxy = FaultProxy(endpoint).start()
    try:
        reader = ShardReader(f"s3://{bucket}/ds", split="test", shuffle=False, image_size=(4, 4),
                             cache_dir=tmp_path / "cache", storage_options=s3_options(proxy.endpoint))
        assert len(reader.labels) == sum(p.startswith("test/") for p in paths.values())
        fetched = _tar_gets(proxy)
        assert sum(len(y) for _, y in reader) == len(reader.labels)
        assert _tar_gets(proxy) == fetched > 0
    finally:
        proxy.stop()


def test_local_shards_are_not_copied_into_the_cache(id_shards, tmp_path):
    from reader import ShardReader

    shards, _ = id_shards
    cache_dir = tmp_path / "cache"
    for source in (shards, f"file://{shards}"):
        reader = ShardReader(source, split="test", image_size=(4, 4), cache_dir=cache_dir)
        assert sum(len(y) for _, y in reader) == reader.samples
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_stale_partial_cache_files_are_swept(uploaded, tmp_path):
    """A reader killed mid-shard leaves its temporary copy; the next eviction deletes it once
    it has not been written to for an hour, and counts a fresh one (a live reader's)."""
    import os
    import time

    from reader.remote import STALE_PARTIAL_S

    endpoint, bucket, shards, _ = uploaded
    name, entry = sorted(_entries(shards).items())[0]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    dead, live = cache_dir / ".dead.123.partial", cache_dir / ".live.456.partial"
    dead.write_bytes(b"x" * 1000)
    live.write_bytes(b"x" * 1000)
    old = time.time() - STALE_PARTIAL_S - 60
    os.utime(dead, (old, old))
    _read_cached(f"s3://{bucket}/ds/{name}", entry, endpoint, cache_dir, cache_max_bytes=10 << 20)
    assert not dead.exists() and live.exists()


def test_an_object_cut_at_a_block_boundary_is_reported_as_truncated(uploaded):
    endpoint, bucket, shards, _ = uploaded
    name, entry = max(_entries(shards).items(), key=lambda kv: kv[1]["bytes"])
    assert entry["bytes"] > BLOCK
    fs = fsspec.filesystem("s3", **s3_options(endpoint))
    fs.pipe_file(f"{bucket}/ds/{name}", (shards / name).read_bytes()[:BLOCK])
    with pytest.raises(ShardReadError, match=f"truncated: the object has {BLOCK} bytes"):
        with open_shard_stream(f"s3://{bucket}/ds/{name}", storage_options=s3_options(endpoint),
                               expected_size=entry["bytes"], block_size=BLOCK, backoff=0.01) as s:
            s.read()


def test_cache_hits_hash_nothing_and_copies_follow_the_umask(uploaded, tmp_path, monkeypatch):
    """The copy a stream just verified is not hashed again on the hits that follow (each
    hit touches it for the LRU clock, which must not look like a change), and it is
    created with the umask's mode, so a cache folder shared by a group works."""
    import hashlib
    import os
    import stat

    endpoint, bucket, shards, _ = uploaded
    name, entry = sorted(_entries(shards).items())[0]
    url, cache_dir = f"s3://{bucket}/ds/{name}", tmp_path / "cache"
    old_umask = os.umask(0o002)
    try:
        _read_cached(url, entry, endpoint, cache_dir)
    finally:
        os.umask(old_umask)
    (copy,) = cache_dir.glob("*.tar")
    assert stat.S_IMODE(copy.stat().st_mode) == 0o664
    hashes = []
    real = hashlib.sha256

    def counting(*data):  # a file is hashed by feeding an empty sha256(); a cache key in one go
        if not data:
            hashes.append(1)
        return real(*data)

    monkeypatch.setattr(hashlib, "sha256", counting)
    for _ in range(3):
        assert _read_cached(url, entry, endpoint, cache_dir) == (shards / name).read_bytes()
    assert hashes == []


def test_the_next_remote_shard_is_opened_before_the_current_one_is_read(id_shards, monkeypatch):
    """Each remote shard waited for its first byte only when it started (one stall per
    shard, ~0.3 s each behind a slow store): the next one now opens, and so starts
    fetching, as the current one starts; the samples are the same."""
    import uuid

    import reader.shard_reader as shard_reader_module
    from packer.uploader import upload
    from reader import ShardReader

    url = f"memory://ahead-{uuid.uuid4().hex}/ds"
    upload(id_shards[0], url, quiet=True)
    events = []

    class Recorded:
        def __init__(self, stream, name):
            self._stream, self._name, self._read = stream, name, False

        def read(self, *args):
            if not self._read:
                self._read = True
                events.append(("read", self._name))
            return self._stream.read(*args)

        def __getattr__(self, attr):
            return getattr(self._stream, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._stream.close()

    real_open = shard_reader_module.open_ref

    def recording_open(ref, *args):
        events.append(("open", ref.name))
        return Recorded(real_open(ref, *args), ref.name)

    monkeypatch.setattr(shard_reader_module, "open_ref", recording_open)
    options = dict(split="train", image_size=4, batch_size=16, shuffle=False)
    remote = [y.tolist() for _, y in ShardReader(url, **options)]
    assert remote == [y.tolist() for _, y in ShardReader(id_shards[0], **options)]
    names = [name for kind, name in events if kind == "read"]
    assert len(names) == 14 and len(set(names)) == 14  # every train shard, in order, once
    for current, following in zip(names, names[1:], strict=False):
        assert events.index(("open", following)) < events.index(("read", current)), (current, following)
    assert [kind for kind, _ in events].count("open") == 14  # none opened twice, none left over


def test_a_readers_cache_is_bounded_by_cache_max_bytes(id_shards, tmp_path):
    """cache_max_bytes reached open_shard_stream only: a reader's cache_dir grew without a
    bound. Now the reader takes it (bytes or a size), and an epoch leaves the cache within it."""
    import uuid

    from packer.uploader import upload
    from reader import ShardReader

    url = f"memory://bounded-{uuid.uuid4().hex}/ds"
    upload(id_shards[0], url, quiet=True)
    manifest = json.loads((id_shards[0] / "manifest.json").read_text())
    sizes = [s["bytes"] for s in manifest["splits"]["train"]["shards"]]
    bound = 3 * max(sizes)
    for limit in (bound, f"{bound}B"):
        cache = tmp_path / f"cache-{limit}"
        reader = ShardReader(url, split="train", image_size=4, batch_size=16, cache_dir=cache,
                             cache_max_bytes=limit)
        assert sum(1 for _ in reader) == len(reader)
        kept = [p.stat().st_size for p in cache.glob("*.tar")]
        assert 0 < len(kept) < len(sizes) and sum(kept) <= bound


def test_a_hit_on_another_users_copy_in_a_shared_cache_is_served(tmp_path, monkeypatch):
    """Only a file's owner may set its times explicitly (EPERM for the others, root aside):
    a shared cache's hit on another user's copy raised PermissionError out of the reader.
    The kernel's refusal is stood in for here; the hit must be served, untouched."""
    import reader.remote as remote

    cache = ShardCache(tmp_path / "shared")
    copy = tmp_path / "shared" / "k.tar"
    copy.write_bytes(b"x")
    before = copy.stat().st_mtime_ns
    real_utime = os.utime

    def as_another_user(path, times=None, *, ns=None, **kwargs):
        if times is not None or ns is not None:
            raise PermissionError(1, "Operation not permitted", path)
        return real_utime(path, **kwargs)

    monkeypatch.setattr(remote.os, "utime", as_another_user)
    assert cache.lookup("k") == str(copy)
    assert copy.stat().st_mtime_ns == before
