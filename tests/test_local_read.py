"""A local shard's first read in a process: the file's own reads, hashed on a thread."""

from __future__ import annotations

import gc
import hashlib
import io
import threading

import numpy as np
import pytest

from packer.errors import ChecksumError, ShardReadError
from reader.local import HashedLocalFile
from reader.policy import ErrorPolicy
from reader.remote import open_shard_stream
from reader.samples import group_samples, shard_samples, tar_members
from reader.source import ShardRef


@pytest.fixture()
def shard(id_shards):
    path = sorted((id_shards[0] / "test").glob("*.tar"))[0]
    return path, path.read_bytes()


def _hashed(path, data, sha256=None, on_verified=None):
    return HashedLocalFile(open(path, "rb"), str(path), size=len(data),
                           sha256=sha256 or hashlib.sha256(data).hexdigest(), on_verified=on_verified)


def _samples(stream):
    return [(s["__key__"], s["png"], s["cls"]) for s in group_samples(tar_members(stream, shard="s"), shard="s")]


def test_the_first_read_gives_the_files_samples_and_remembers_the_match(shard):
    path, data = shard
    verified = []
    with _hashed(path, data, on_verified=lambda: verified.append(True)) as f:
        got = _samples(f)
        assert verified == [True]  # a shard under 8 MiB is read and checked before any byte goes out
        f.read()
        assert f.read(10) == b"" and f.tell() == len(data)
    assert got == _samples(io.BytesIO(data)) and verified == [True]


def _big_file(tmp_path, size=(8 << 20) + 300_000):
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    return path, data


def test_the_last_8_mib_go_out_only_after_the_hash_matched(tmp_path):
    """As the remote reader withholds its last block: the bytes before the last 8 MiB are
    handed out as read; the last 8 MiB only once the whole file hashed to the manifest's."""
    path, data = _big_file(tmp_path)
    verified = []
    parts = []
    with _hashed(path, data, on_verified=lambda: verified.append(True)) as f:
        while not verified:
            parts.append(f.read(100_000))
        assert sum(map(len, parts)) == len(data) - (8 << 20) + 100_000
        while part := f.read(1 << 20):
            parts.append(part)
    assert b"".join(parts) == data


def test_a_damaged_shard_hands_out_nothing_of_its_last_8_mib(tmp_path, shard):
    path, data = _big_file(tmp_path)
    damaged = bytearray(data)
    damaged[-10] ^= 1
    path.write_bytes(bytes(damaged))
    f = _hashed(path, data)
    head = f.read(len(data))  # stops where the withheld tail starts
    assert head == bytes(damaged[: len(data) - (8 << 20)])
    with pytest.raises(ChecksumError, match="does not match the manifest's"):
        f.read(1)
    with pytest.raises(ChecksumError):
        f.read(1)  # and every read after it fails too
    f.close()
    # a shard under 8 MiB: not one sample of it is delivered, whatever the error policy
    small, small_data = shard
    bad = tmp_path / "small.tar"
    flipped = bytearray(small_data)
    flipped[len(small_data) // 2] ^= 1
    bad.write_bytes(bytes(flipped))
    ref = ShardRef(url=str(bad), name="small", count=None, nbytes=len(small_data),
                   sha256=hashlib.sha256(small_data).hexdigest())
    policy = ErrorPolicy(on_error="warn", on_shard_error="ignore")
    assert list(shard_samples(ref, policy=policy)) == [] and policy.skipped_shards == 1


def test_reading_nothing_compares_nothing(shard):
    path, data = shard
    with _hashed(path, data) as f:
        assert f.read(0) == b"" and f.readinto(bytearray(0)) == 0
        assert f.read() == data  # no ChecksumError: the empty read did not end the hash


@pytest.mark.parametrize("chunk", [1, 700, 4096, 1 << 20])
def test_the_bytes_read_in_any_sizes_are_the_files_and_are_hashed_whole(shard, chunk):
    path, data = shard
    parts = []
    with _hashed(path, data) as f:
        while part := f.read(chunk):
            parts.append(part)
    assert b"".join(parts) == data  # no ChecksumError: every byte reached the hash, in order


def test_a_file_shorter_than_the_manifest_says_hands_out_none_of_its_checked_tail(shard, tmp_path):
    """It cannot match its sha256, and a shard this small is all tail: not one byte goes
    out (another shard's file copied over it gave that shard's samples as its own)."""
    path, data = shard
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:3000])
    with HashedLocalFile(open(cut, "rb"), str(cut), size=len(data),
                         sha256=hashlib.sha256(data).hexdigest()) as f:
        for _ in range(2):
            with pytest.raises(ShardReadError, match="truncated: the file has 3000 bytes") as info:
                f.read(5000)
            assert info.value.offset == 3000


def test_a_stream_closed_early_or_dropped_stops_its_hashing_thread(tmp_path):
    path, data = _big_file(tmp_path)

    def hashing():
        return [t for t in threading.enumerate() if t.name == f"shard-hash {path}"]

    streams = [_hashed(path, data) for _ in range(5)]
    for f in streams:
        f.read(1000)
    assert len(hashing()) == 5
    for f in streams[:3]:
        f.close()
    del streams, f  # the last two are never closed: collected, they end their threads too
    gc.collect()
    assert hashing() == []


def test_open_shard_stream_hashes_a_local_shard_once_per_process(shard, tmp_path):
    path, data = shard
    copy = tmp_path / "s.tar"
    copy.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with open_shard_stream(str(copy), expected_sha256=sha, expected_size=len(data)) as f:
        assert isinstance(f, HashedLocalFile)
        assert f.read() == data
    with open_shard_stream(str(copy), expected_sha256=sha, expected_size=len(data)) as f:
        assert not isinstance(f, HashedLocalFile)  # verified: the plain file
