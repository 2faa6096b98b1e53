"""A local shard's first read in a process: the file's own reads, hashed on a thread."""

from __future__ import annotations

import hashlib
import io
import threading

import pytest

from packer.errors import ChecksumError, ShardReadError
from reader.local import HashedLocalFile
from reader.remote import open_shard_stream
from reader.samples import group_samples, tar_members


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
        got = _samples(f)  # up to the end-of-archive marker: the record padding is left
        assert f.tell() < len(data) and not verified  # compared only once the last byte is read
        f.read()
        assert verified == [True] and f.read(10) == b""
    assert got == _samples(io.BytesIO(data)) and verified == [True]


@pytest.mark.parametrize("chunk", [1, 700, 4096, 1 << 20])
def test_the_bytes_read_in_any_sizes_are_the_files_and_are_hashed_whole(shard, chunk):
    path, data = shard
    parts = []
    with _hashed(path, data) as f:
        while part := f.read(chunk):
            parts.append(part)
    assert b"".join(parts) == data  # no ChecksumError: every byte reached the hash, in order


def test_a_wrong_checksum_fails_the_read_that_reaches_the_end(shard):
    path, data = shard
    verified = []
    f = _hashed(path, data, sha256="0" * 64, on_verified=lambda: verified.append(True))
    head = f.read(len(data) - 100)  # everything but the last bytes: not compared yet
    assert head == data[:-100]
    with pytest.raises(ChecksumError, match="does not match the manifest's 0000"):
        f.read(100)  # its bytes are not handed out
    with pytest.raises(ChecksumError):
        f.read(1)  # and every read after it fails too
    f.close()
    assert not verified


def test_a_file_shorter_than_the_manifest_says_gives_its_bytes_then_a_truncation(shard, tmp_path):
    path, data = shard
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:3000])
    with HashedLocalFile(open(cut, "rb"), str(cut), size=len(data),
                         sha256=hashlib.sha256(data).hexdigest()) as f:
        assert f.read(5000) == data[:3000]
        with pytest.raises(ShardReadError, match="truncated: the file has 3000 bytes") as info:
            f.read(5000)
    assert info.value.offset == 3000


def test_a_stream_closed_early_stops_its_hashing_thread(shard):
    path, data = shard

    def hashing():
        return [t for t in threading.enumerate() if t.name == f"shard-hash {path}"]

    streams = [_hashed(path, data) for _ in range(5)]
    for f in streams:
        f.read(1000)
    assert len(hashing()) == 5
    for f in streams:
        f.close()
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
