"""Common mistakes in where shards are read from or sent to: each gets a message that names
the mistake and the fix, exit status 2 on the command line, and nothing is written."""
from __future__ import annotations

import socket

import pytest

from packer.cli import main
from packer.errors import ManifestError
from packer.format import MANIFEST_NAME
from packer.storage import read_manifest


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_wrong_local_paths_name_the_folder_to_pass(id_shards, tmp_path, capsys):
    shards, _ = id_shards
    assert "does not exist" in _error(capsys, ["info", str(tmp_path / "nowhere")])
    message = _error(capsys, ["info", str(shards / MANIFEST_NAME)])
    assert "is a file, not a shard folder" in message and f"pass its folder, {shards}" in message
    assert main(["verify", str(shards / "train")]) == 1  # verify reports a problem
    message = capsys.readouterr().err
    assert f"inside the shard folder {shards}" in message and "split='train'" in message
    from reader import ShardReader

    with pytest.raises(ManifestError, match="--split train"):
        ShardReader(shards / "train", split="train")


@pytest.mark.parametrize("typo", ["s3:/bucket/x", "s3:bucket/x", "gs:/b", "HTTPS:/host/x"])
def test_a_url_missing_its_slashes_is_refused_not_made_a_local_folder(typo, id_shards, tmp_path,
                                                                      monkeypatch, capsys):
    shards, _ = id_shards
    monkeypatch.chdir(tmp_path)
    assert "looks like a mistyped URL" in _error(capsys, ["upload", str(shards), typo])
    assert "looks like a mistyped URL" in _error(capsys, ["info", typo])
    src = shards.parent / "src"  # pack too (it packed into ./s3: and said nothing)
    assert "looks like a mistyped URL" in _error(capsys, ["pack", str(src), typo, "--quiet"])
    assert list(tmp_path.iterdir()) == []  # no ./s3: folder
    # a Windows drive letter and a plain relative name with a colon later are paths
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest("C:/data")


def test_an_upload_onto_its_own_folder_is_refused(id_shards, capsys):
    shards, _ = id_shards
    before = sorted(p.stat().st_mtime_ns for p in shards.rglob("*"))
    for dest in (str(shards), f"file://{shards}"):
        assert "itself" in _error(capsys, ["upload", str(shards), dest])
    assert sorted(p.stat().st_mtime_ns for p in shards.rglob("*")) == before


def test_an_unreachable_http_server_is_not_reported_as_a_missing_manifest(capsys):
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    message = _error(capsys, ["info", f"http://127.0.0.1:{port}/shards"])
    assert "cannot reach" in message and "no manifest.json" not in message
