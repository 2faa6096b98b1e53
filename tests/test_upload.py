"""packer.uploader / packer.remote_out against a real S3 server (moto) on loopback.

What a user relies on: every shard arrives with its sha256, the manifest arrives last and
only when every shard did, re-running sends nothing that is already there, a changed shard
is sent again, local corruption is never uploaded, and no secret ever reaches a message.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import fsspec
import pytest
from conftest import no_delete_store
from s3_server import FaultProxy, iam_user_key, s3_options

from packer.errors import UploadError
from packer.format import MANIFEST_NAME
from packer.remote_out import REPLACED_NAME
from packer.uploader import upload

SECRET = "testing-secret-do-not-print"


def _shard_names(out) -> list[str]:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return [e["name"] for split in manifest["splits"].values() for e in split["shards"]]


def _sha_of(out, name) -> str:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return next(e["sha256"] for s in manifest["splits"].values() for e in s["shards"] if e["name"] == name)


@pytest.fixture
def proxy(s3):
    endpoint, _, _ = s3
    p = FaultProxy(endpoint).start()
    yield p
    p.stop()


@pytest.fixture
def local_copy(photo_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(photo_shards, out)
    return out


def _fs(endpoint):
    return fsspec.filesystem("s3", skip_instance_cache=True, **s3_options(endpoint))


def test_upload_sends_every_shard_with_sha256_then_manifest_last(s3, proxy, photo_shards):
    _, _, bucket = s3
    names = _shard_names(photo_shards)
    summary = upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, workers=4, quiet=True)
    assert summary["uploaded"] == len(names) and summary["skipped"] == 0
    assert summary["bytes"] == sum((photo_shards / n).stat().st_size for n in names)
    assert summary["manifest"] == "uploaded"

    fs = _fs(proxy.endpoint)
    for name in names:
        assert fs.metadata(f"{bucket}/ds/{name}")["sha256"] == _sha_of(photo_shards, name)
        assert fs.cat_file(f"{bucket}/ds/{name}") == (photo_shards / name).read_bytes()
    assert fs.cat_file(f"{bucket}/ds/{MANIFEST_NAME}") == (photo_shards / MANIFEST_NAME).read_bytes()

    # Seen at the server: one PUT per shard, and the manifest's PUT after all of them.
    puts = [r.path for r in proxy.requests("PUT") if r.path.startswith(f"/{bucket}/ds/")]
    assert sorted(puts[:-1]) == sorted(f"/{bucket}/ds/{n}" for n in names)
    assert puts[-1] == f"/{bucket}/ds/{MANIFEST_NAME}"


def test_reupload_skips_identical_shards(s3, proxy, photo_shards):
    _, _, bucket = s3
    upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    before = len(proxy.requests("PUT"))
    summary = upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    assert summary["uploaded"] == 0 and summary["skipped"] == len(_shard_names(photo_shards))
    assert summary["manifest"] == "unchanged"
    assert len(proxy.requests("PUT")) == before  # nothing sent at all

    forced = upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True, force=True)
    assert forced["uploaded"] == len(_shard_names(photo_shards))


def test_changed_remote_shard_of_equal_size_is_sent_again(s3, proxy, photo_shards):
    _, _, bucket = s3
    upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    name = _shard_names(photo_shards)[0]
    fs = _fs(proxy.endpoint)
    size = (photo_shards / name).stat().st_size
    # Same size, other bytes, stale checksum: size alone would wrongly skip it.
    fs.pipe_file(f"{bucket}/ds/{name}", b"\0" * size, Metadata={"sha256": "0" * 64})
    other = _shard_names(photo_shards)[1]
    fs.pipe_file(f"{bucket}/ds/{other}", (photo_shards / other).read_bytes())  # no metadata
    summary = upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    assert summary["uploaded"] == 2
    assert fs.cat_file(f"{bucket}/ds/{name}") == (photo_shards / name).read_bytes()


def test_changed_pack_takes_old_manifest_down_before_replacing_shards(s3, proxy, photo_shards, tmp_path):
    from packer import pack

    _, _, bucket = s3
    upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    repacked = tmp_path / "repacked"
    src = photo_shards.parent / "src"
    pack(src, repacked, seed=1, max_count=40, workers=1, quiet=True)
    start = len(proxy.log)
    summary = upload(repacked, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    assert summary["uploaded"] > 0
    later = proxy.log[start:]
    manifest_path = f"/{bucket}/ds/{MANIFEST_NAME}"
    delete_at = next(i for i, r in enumerate(later) if r.method == "DELETE" and r.path == manifest_path)
    first_shard_put = next(i for i, r in enumerate(later) if r.method == "PUT" and r.path.endswith(".tar"))
    assert delete_at < first_shard_put
    assert [r.path for r in later if r.method == "PUT"][-1] == manifest_path


def test_failed_shard_leaves_no_manifest_and_names_the_shard(s3, photo_shards):
    endpoint, _, bucket = s3
    victim = _shard_names(photo_shards)[2]
    proxy = FaultProxy(endpoint, fault=lambda m, p, n: "500" if m == "PUT" and p.endswith(victim) else None)
    proxy.start()
    try:
        options = {"config_kwargs": {"retries": {"total_max_attempts": 2}}}
        with pytest.raises(UploadError) as info:
            upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint,
                   storage_options=options, quiet=True)
    finally:
        proxy.stop()
    assert victim in str(info.value)
    assert SECRET not in str(info.value)
    fs = _fs(endpoint)
    assert not fs.exists(f"{bucket}/ds/{MANIFEST_NAME}")
    # A re-run (store healthy again) resumes: only what is missing is sent.
    summary = upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=endpoint, quiet=True)
    assert summary["uploaded"] >= 1 and summary["uploaded"] + summary["skipped"] == len(_shard_names(photo_shards))
    assert fs.exists(f"{bucket}/ds/{MANIFEST_NAME}")


def test_corrupted_local_shard_is_not_uploaded(s3, local_copy):
    endpoint, _, bucket = s3
    name = _shard_names(local_copy)[0]
    data = bytearray((local_copy / name).read_bytes())
    data[2000] ^= 0xFF
    (local_copy / name).write_bytes(bytes(data))
    with pytest.raises(UploadError, match=name.replace("/", ".")) as info:
        upload(local_copy, f"s3://{bucket}/ds", endpoint_url=endpoint, quiet=True, workers=1)
    assert "corrupted" in str(info.value)
    fs = _fs(endpoint)
    assert not fs.exists(f"{bucket}/ds/{name}")
    assert not fs.exists(f"{bucket}/ds/{MANIFEST_NAME}")


def test_errors_and_logs_never_show_the_secret(s3, photo_shards, caplog):
    _, _, bucket = s3
    caplog.set_level("DEBUG")
    options = {"key": "explicit-key-id", "secret": "explicit-secret-value-123",
               "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(UploadError) as info:  # nothing listens on port 9 of loopback
        upload(photo_shards, f"s3://{bucket}/ds", endpoint_url="http://127.0.0.1:9",
               storage_options=options, quiet=True)
    text = str(info.value) + repr(info.value) + caplog.text
    assert "explicit-secret-value-123" not in text and SECRET not in text
    assert "endpoint" in str(info.value)  # the message suggests what to check


def test_upload_to_memory_filesystem_rehashes_without_metadata(photo_shards):
    import uuid

    url = f"memory://shardpack-{uuid.uuid4().hex[:8]}/ds"
    first = upload(photo_shards, url, quiet=True)
    assert first["uploaded"] == len(_shard_names(photo_shards))
    again = upload(photo_shards, url, quiet=True)
    assert again["uploaded"] == 0
    fs, root = fsspec.core.url_to_fs(url)
    name = _shard_names(photo_shards)[0]
    fs.pipe_file(f"{root}/{name}", b"\0" * (photo_shards / name).stat().st_size)
    third = upload(photo_shards, url, quiet=True)
    assert third["uploaded"] == 1
    assert fs.cat_file(f"{root}/{name}") == (photo_shards / name).read_bytes()


def test_upload_to_file_url(photo_shards, tmp_path):
    dest = tmp_path / "dest"
    summary = upload(photo_shards, f"file://{dest}", quiet=True)
    assert summary["uploaded"] == len(_shard_names(photo_shards))
    for name in _shard_names(photo_shards) + [MANIFEST_NAME]:
        assert (dest / name).read_bytes() == (photo_shards / name).read_bytes()


def test_cli_upload_with_endpoint_url(s3, photo_shards, capsys):
    from packer.cli import main

    endpoint, _, bucket = s3
    code = main(["upload", str(photo_shards), f"s3://{bucket}/cli", "--endpoint-url", endpoint, "--quiet"])
    assert code in (0, None)
    out = capsys.readouterr().out
    assert SECRET not in out
    n = len(_shard_names(photo_shards))
    assert out.startswith(f"uploaded {n} shards (") and "; 0 already there" in out
    assert out.rstrip().endswith("manifest uploaded")
    assert main(["upload", str(photo_shards), f"s3://{bucket}/cli", "--endpoint-url", endpoint, "--quiet",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["uploaded"] == 0 and summary["skipped"] == n and summary["manifest"] == "unchanged"


def test_pack_to_s3_url_stages_in_batches_and_resumes(s3, photo_shards, tmp_path):
    from packer import pack

    endpoint, options, bucket = s3
    src = photo_shards.parent / "src"
    url = f"s3://{bucket}/packed"
    staging = tmp_path / "staging"
    from packer.remote_out import pack_to_url

    manifest = pack_to_url(src, url, storage_options=options, staging_dir=staging, staging_shards=2,
                           seed=0, max_count=40, workers=1, quiet=True)
    local = json.loads((photo_shards / MANIFEST_NAME).read_text())
    # Same plan, same bytes as a local pack.
    assert manifest["splits"] == local["splits"]
    fs = _fs(endpoint)
    for name in _shard_names(photo_shards):
        assert fs.cat_file(f"{bucket}/packed/{name}") == (photo_shards / name).read_bytes()
    assert json.loads(fs.cat_file(f"{bucket}/packed/{MANIFEST_NAME}"))["splits"] == local["splits"]
    assert not list(staging.rglob("*.tar"))  # staged shards are deleted once uploaded

    # Re-run: every shard is already there (fingerprint + sha256 metadata): nothing written.
    proxy = FaultProxy(endpoint).start()
    try:
        again = pack(src, url, storage_options=s3_options(proxy.endpoint), seed=0, max_count=40,
                     workers=1, quiet=True)
    finally:
        proxy.stop()
    assert again["splits"] == local["splits"]
    # only the new manifest: no shard changes, so the old one stays up until it is replaced
    assert [r.path for r in proxy.requests("PUT")] == [f"/{bucket}/packed/{MANIFEST_NAME}"]
    assert not fs.exists(f"{bucket}/packed/{REPLACED_NAME}")


def test_pack_to_s3_over_shards_with_another_fingerprint_records_the_new_one_once(s3, photo_shards):
    """Shards whose bytes are already there under another plan fingerprint (a pack by an
    earlier shardpack, whose fingerprints hashed sources differently) are not sent again, and
    get this plan's fingerprint: the next run then finds them, instead of packing every shard
    again on every run to find it identical."""
    from packer import pack

    endpoint, options, bucket = s3
    src = photo_shards.parent / "src"
    url = f"s3://{bucket}/refingerprinted"
    first = pack(src, url, storage_options=options, seed=0, max_count=40, workers=1, quiet=True)
    fs = _fs(endpoint)
    names = [e["name"] for split in first["splits"].values() for e in split["shards"]]
    for name in names:  # as an earlier version left them: same bytes, other fingerprint
        path = f"{bucket}/refingerprinted/{name}"
        meta = fs.metadata(path)
        fs.call_s3("copy_object", CopySource={"Bucket": bucket, "Key": f"refingerprinted/{name}"},
                   Bucket=bucket, Key=f"refingerprinted/{name}", MetadataDirective="REPLACE",
                   Metadata={**meta, "fingerprint": "0" * 64, "owner": "team-a"})
        fs.invalidate_cache(path)
    pack(src, url, storage_options=options, seed=0, max_count=40, workers=1, quiet=True)
    fingerprints = {e["name"]: e["fingerprint"] for split in first["splits"].values() for e in split["shards"]}
    fs = _fs(endpoint)
    for name in names:
        meta = fs.metadata(f"{bucket}/refingerprinted/{name}")
        assert meta["fingerprint"] == fingerprints[name]
        assert meta["sha256"] == _sha_of(photo_shards, name)
        assert meta["owner"] == "team-a"  # the object's other metadata is kept
        assert fs.cat_file(f"{bucket}/refingerprinted/{name}") == (photo_shards / name).read_bytes()
    proxy = FaultProxy(endpoint).start()
    try:
        pack(src, url, storage_options=s3_options(proxy.endpoint), seed=0, max_count=40, workers=1,
             quiet=True)
    finally:
        proxy.stop()
    assert [r.path for r in proxy.requests("PUT")] == [f"/{bucket}/refingerprinted/{MANIFEST_NAME}"]
    # an upload of the same shards finds each with one HEAD, and sends none
    proxy = FaultProxy(endpoint).start()
    try:
        summary = upload(photo_shards, url, endpoint_url=proxy.endpoint, workers=2, quiet=True)
    finally:
        proxy.stop()
    assert summary["skipped"] == len(names) and summary["uploaded"] == 0
    heads = Counter(r.path for r in proxy.requests("HEAD"))
    assert all(heads[f"/{bucket}/refingerprinted/{name}"] == 1 for name in names), heads


def test_cli_pack_to_s3_then_info_and_verify_read_it(s3, photo_shards, capsys):
    from packer.cli import main

    endpoint, _, bucket = s3
    url = f"s3://{bucket}/clipack"
    src = str(photo_shards.parent / "src")
    assert main(["pack", src, url, "--endpoint-url", endpoint, "--quiet", "--max-count", "40",
                 "--workers", "1"]) in (0, None)
    assert main(["info", url, "--endpoint-url", endpoint]) in (0, None)
    assert main(["verify", url, "--endpoint-url", endpoint]) == 0
    out = capsys.readouterr().out
    assert "train" in out and SECRET not in out
    fs = _fs(endpoint)
    for name in _shard_names(photo_shards):
        assert fs.cat_file(f"{bucket}/clipack/{name}") == (photo_shards / name).read_bytes()


def test_smaller_repack_removes_remote_shards_the_new_manifest_does_not_name(s3, proxy, photo_shards, tmp_path):
    """A re-upload of a pack with fewer shards deletes the leftovers before the manifest goes
    up, so the prefix holds exactly the new pack (no orphan shards)."""
    from packer import pack

    endpoint, _, bucket = s3
    upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    bigger = set(_shard_names(photo_shards))
    repacked = tmp_path / "fewer"
    pack(photo_shards.parent / "src", repacked, seed=0, max_count=10_000, workers=1, quiet=True)
    smaller = set(_shard_names(repacked))
    assert len(smaller) < len(bigger)
    start = len(proxy.log)
    summary = upload(repacked, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    stale = bigger - smaller
    assert summary["removed"] == len(stale)
    fs = _fs(endpoint)
    there = {p.split("/ds/", 1)[1] for p in fs.find(f"{bucket}/ds")}
    assert there == smaller | {MANIFEST_NAME}
    later = proxy.log[start:]
    manifest_put = max(i for i, r in enumerate(later) if r.method == "PUT" and r.path.endswith(MANIFEST_NAME))
    deletes = [i for i, r in enumerate(later) if r.method == "DELETE" and r.path.endswith(".tar")]
    assert deletes and max(deletes) < manifest_put


def test_a_repack_that_only_drops_shards_never_publishes_a_manifest_naming_missing_ones(
        photo_shards, tmp_path, monkeypatch):
    """Re-uploading a pack that lost a split sends nothing (the other shards are identical)
    but deletes the dropped split's shards: the old manifest, which names them, comes down
    first, so a failed publish leaves no manifest rather than one naming deleted shards."""
    from packer import pack
    from packer.uploader import RemoteStore

    src = tmp_path / "src"
    shutil.copytree(photo_shards.parent / "src", src)
    first = tmp_path / "first"
    pack(src, first, seed=0, max_count=40, workers=1, quiet=True)
    dest = tmp_path / "remote"
    upload(first, str(dest), quiet=True)
    shutil.rmtree(src / "test")
    second = tmp_path / "second"
    pack(src, second, seed=0, max_count=40, workers=1, quiet=True)

    real_publish = RemoteStore.publish

    def connection_reset(self, name, data):  # the manifest's PUT fails
        if name == MANIFEST_NAME:
            raise OSError("connection reset by peer")
        real_publish(self, name, data)

    monkeypatch.setattr(RemoteStore, "publish", connection_reset)
    with pytest.raises((UploadError, OSError)):
        upload(second, str(dest), quiet=True)
    assert not list((dest / "test").glob("*.tar"))  # the dropped split's shards are gone
    manifest = dest / MANIFEST_NAME
    if manifest.exists():
        named = [s["name"] for split in json.loads(manifest.read_text())["splits"].values()
                 for s in split["shards"]]
        assert all((dest / name).exists() for name in named)


def test_pack_to_url_after_a_stopped_run_removes_the_shards_the_plan_dropped(photo_shards, tmp_path, monkeypatch):
    """A pack to a URL takes the old manifest down before shards change; if that run stops,
    the next one still learns the old shard names from the copy kept aside, and deletes
    those its plan drops: no orphan shard is left."""
    import uuid

    import packer.remote_out as remote_out
    from packer import pack

    src = tmp_path / "src"
    shutil.copytree(photo_shards.parent / "src", src)
    url = f"memory://orphans-{uuid.uuid4().hex}/ds"
    pack(src, url, seed=0, max_count=40, workers=1, quiet=True)
    shutil.rmtree(src / "test")  # the next plan has no test split

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(remote_out, "_write_and_send", stopped)
        with pytest.raises(KeyboardInterrupt):
            pack(src, url, seed=0, max_count=40, workers=1, quiet=True)
    manifest = pack(src, url, seed=0, max_count=40, workers=1, quiet=True)
    fs, root = fsspec.core.url_to_fs(url)
    there = {p[len(root) + 1 :] for p in fs.find(root)} - {MANIFEST_NAME}  # the aside one is gone too
    assert there == {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
    assert "test" not in manifest["splits"]


def test_a_rerun_of_a_pack_to_a_url_stopped_before_its_manifest_leaves_it_published(
        s3, photo_shards, monkeypatch):
    """A re-run that changes no shard never takes the published manifest down: stopped just
    before it writes its own, the store is as it was. It used to set the manifest aside
    first, so readers found none for the whole re-run, and none at all after a stop."""
    from packer import pack
    from packer.uploader import RemoteStore

    endpoint, options, bucket = s3
    src = photo_shards.parent / "src"
    url = f"s3://{bucket}/kept"
    pack(src, url, storage_options=options, seed=0, max_count=40, workers=1, quiet=True)
    fs, root = _fs(endpoint), f"{bucket}/kept"
    before = fs.cat_file(f"{root}/{MANIFEST_NAME}")
    publish = RemoteStore.publish

    def stop_at_the_manifest(self, name, data):
        if name == MANIFEST_NAME:
            raise KeyboardInterrupt
        publish(self, name, data)

    with monkeypatch.context() as patch:
        patch.setattr(RemoteStore, "publish", stop_at_the_manifest)
        with pytest.raises(KeyboardInterrupt):
            pack(src, url, storage_options=options, seed=0, max_count=40, workers=1, quiet=True)
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/{MANIFEST_NAME}") == before
    assert not fs.exists(f"{root}/{REPLACED_NAME}")


def test_pack_to_url_refuses_a_newer_format_and_survives_a_foreign_manifest(photo_shards, tmp_path):
    """A remote manifest of a newer format version was replaced silently (a local OUT's is
    refused); a manifest.json of another shape (splits a list) crashed with a traceback."""
    import uuid

    from packer import pack
    from packer.errors import OutputExistsError

    url = f"memory://foreign-{uuid.uuid4().hex}/ds"
    fs, root = fsspec.core.url_to_fs(url)
    src = photo_shards.parent / "src"
    manifest = pack(src, url, seed=0, max_count=40, workers=1, quiet=True)
    fs.pipe_file(f"{root}/{MANIFEST_NAME}", json.dumps({**manifest, "version": 2}).encode())
    with pytest.raises(OutputExistsError, match="format version 2"):
        pack(src, url, seed=0, max_count=40, workers=1, quiet=True)
    fs.pipe_file(f"{root}/{MANIFEST_NAME}", json.dumps({"format": "other", "splits": []}).encode())
    assert pack(src, url, seed=0, max_count=40, workers=1, quiet=True)["splits"] == manifest["splits"]


def test_pack_to_url_leaves_files_no_manifest_named_alone(photo_shards, tmp_path):
    """Only shards a manifest named are deleted: other .tar files under the destination
    (someone's backups/backups-000001.tar) are not the pack's to remove."""
    import uuid

    from packer import pack

    url = f"memory://foreign-{uuid.uuid4().hex}/ds"
    fs, root = fsspec.core.url_to_fs(url)
    for name in ("backups/backups-000001.tar", "train/train-000099.tar", "logs/readme.txt"):
        fs.pipe_file(f"{root}/{name}", b"not ours")
    pack(photo_shards.parent / "src", url, seed=0, max_count=40, workers=1, quiet=True)
    for name in ("backups/backups-000001.tar", "train/train-000099.tar", "logs/readme.txt"):
        assert fs.cat_file(f"{root}/{name}") == b"not ours"


def test_an_upload_deletes_nothing_but_shards_an_old_manifest_names(photo_shards, tmp_path):
    """A destination's old manifest, edited or written by something else, may name any
    file: only shard-shaped names inside the destination are removed when the new manifest
    drops them (a `../outside.txt` entry deleted a file outside it)."""
    dest = tmp_path / "up" / "dest"
    upload(photo_shards, f"file://{dest}", quiet=True)
    old = json.loads((dest / MANIFEST_NAME).read_text())
    split = next(iter(old["splits"].values()))
    split["shards"].append({"name": "notes/precious.txt", "count": 0})
    split["shards"].append({"name": "train/train-999999.tar", "count": 0})
    (dest / MANIFEST_NAME).write_text(json.dumps(old))
    (dest / "notes").mkdir()
    (dest / "notes" / "precious.txt").write_text("mine")
    (dest / "train" / "train-999999.tar").write_bytes(b"stale")
    summary = upload(photo_shards, f"file://{dest}", quiet=True)
    assert (dest / "notes" / "precious.txt").read_text() == "mine"
    assert not (dest / "train" / "train-999999.tar").exists() and summary["removed"] == 1
    # a name leaving the destination makes the old manifest invalid: it names nothing to delete
    old["splits"][next(iter(old["splits"]))]["shards"].append({"name": "../outside.txt", "count": 0})
    (dest / MANIFEST_NAME).write_text(json.dumps(old))
    (dest.parent / "outside.txt").write_text("mine")
    assert upload(photo_shards, f"file://{dest}", quiet=True)["removed"] == 0
    assert (dest.parent / "outside.txt").read_text() == "mine"


def test_upload_after_a_stopped_upload_removes_the_shards_the_new_manifest_drops(
        photo_shards, tmp_path, monkeypatch):
    """An upload that stops after taking the old manifest down (here: its first shard PUT
    fails) keeps that manifest aside; the re-run learns the old shard names from it, deletes
    those the smaller re-pack dropped, and removes the copy once the new manifest is up."""
    from packer import pack
    from packer.uploader import RemoteStore

    bigger, smaller = tmp_path / "bigger", tmp_path / "smaller"
    pack(photo_shards.parent / "src", bigger, seed=0, max_count=10, workers=1, quiet=True)
    pack(photo_shards.parent / "src", smaller, seed=1, max_count=10_000, workers=1, quiet=True)
    dest = tmp_path / "remote"
    upload(bigger, str(dest), quiet=True)

    def network_down(self, *args, **kwargs):
        raise ConnectionError("network down")

    with monkeypatch.context() as patch:
        patch.setattr(RemoteStore, "put", network_down)
        with pytest.raises(UploadError):
            upload(smaller, str(dest), quiet=True, workers=1)
    assert not (dest / MANIFEST_NAME).exists() and (dest / REPLACED_NAME).exists()
    summary = upload(smaller, str(dest), quiet=True)
    there = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert there == set(_shard_names(smaller)) | {MANIFEST_NAME}
    assert summary["removed"] == len(set(_shard_names(bigger)) - set(_shard_names(smaller))) > 0


def test_a_stopped_upload_of_a_bigger_pack_leaves_no_orphans_and_no_aside_manifest(
        s3, proxy, photo_shards, tmp_path):
    """Upload a pack, stop the upload of a bigger one (a PUT fails), upload the first again:
    the bigger one's shards no manifest names stayed for good (upload wrote no fingerprint
    and swept no strays), and an aside manifest left by a failed DELETE stayed on every run."""
    from packer import pack

    endpoint, _, bucket = s3
    smaller, bigger = tmp_path / "smaller", tmp_path / "bigger"
    pack(photo_shards.parent / "src", smaller, seed=0, max_count=10_000, workers=1, quiet=True)
    pack(photo_shards.parent / "src", bigger, seed=0, max_count=10, workers=1, quiet=True)
    url = f"s3://{bucket}/orphans"
    once = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}  # fail fast
    upload(smaller, url, endpoint_url=proxy.endpoint, quiet=True)
    last = _shard_names(bigger)[-1]
    proxy.fault = lambda method, path, n: "500" if method == "PUT" and path.endswith(last) else None
    with pytest.raises(UploadError):
        upload(bigger, url, endpoint_url=proxy.endpoint, quiet=True, workers=1, storage_options=once)
    proxy.fault = None
    fs = _fs(endpoint)
    summary = upload(smaller, url, endpoint_url=proxy.endpoint, quiet=True)
    there = {p.split("/orphans/", 1)[1] for p in fs.find(f"{bucket}/orphans")}
    assert there == set(_shard_names(smaller)) | {MANIFEST_NAME}
    assert summary["removed"] == len(set(_shard_names(bigger)) - set(_shard_names(smaller)) - {last}) > 0
    # a DELETE of the manifest that keeps failing leaves the aside copy; the next run removes it
    proxy.fault = lambda method, path, n: "500" if method == "DELETE" and path.endswith(MANIFEST_NAME) else None
    with pytest.raises(UploadError):
        upload(bigger, url, endpoint_url=proxy.endpoint, quiet=True, workers=1, storage_options=once)
    proxy.fault = None
    assert _fs(endpoint).exists(f"{bucket}/orphans/{REPLACED_NAME}")  # a fresh listing
    assert upload(smaller, url, endpoint_url=proxy.endpoint, quiet=True)["manifest"] == "unchanged"
    assert not _fs(endpoint).exists(f"{bucket}/orphans/{REPLACED_NAME}")


def test_ctrl_c_stops_an_upload_after_the_shards_being_sent(s3, tmp_path):
    """SIGINT to `shardpack upload` ends it after the PUTs in flight (a few), not after
    every queued shard, and publishes no manifest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image

    from packer import pack

    endpoint, _, bucket = s3
    src = tmp_path / "src" / "train" / "a"
    src.mkdir(parents=True)
    for i in range(40):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(src / f"{i}.png")
    out = tmp_path / "out"
    pack(tmp_path / "src", out, max_count=1, workers=1, quiet=True)  # 40 one-image shards
    slow = FaultProxy(endpoint, latency=0.3).start()
    try:
        cmd = [sys.executable, "-m", "packer.cli", "upload", str(out), f"s3://{bucket}/ds",
               "--endpoint-url", slow.endpoint, "--workers", "2", "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ)
        deadline = time.monotonic() + 60
        while not slow.requests("PUT") and time.monotonic() < deadline:
            time.sleep(0.05)
        running = proc.poll() is None  # a failure below says whether the signal came late
        puts_before = len(slow.requests("PUT"))
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        puts = [r.path for r in slow.requests("PUT")]
    finally:
        slow.stop()
    assert proc.returncode != 0, (
        f"exit 0 after SIGINT (still running when signalled: {running}; PUTs seen before the "
        f"signal: {puts_before}, after: {len(puts)}); stdout {stdout[-500:]!r}, stderr {stderr[-2000:]!r}")
    assert len(puts) <= 8, f"{len(puts)} PUTs after Ctrl-C: it went on with queued shards"
    assert not any(p.endswith(MANIFEST_NAME) for p in puts)


def test_sigterm_stops_a_pack_to_s3_with_its_clean_up_and_killed_runs_staging_goes(
        s3, photo_shards, tmp_path, monkeypatch):
    """A scheduler's SIGTERM ended `shardpack pack SRC s3://...` without its clean-up, and
    a SIGKILL cannot have one: each left a staging folder of up to 4 shards in /tmp, and
    each re-run made a new one."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from packer.remote_out import remove_dead_runs_staging

    endpoint, _, bucket = s3
    temp = tmp_path / "tmp"
    temp.mkdir()
    slow = FaultProxy(endpoint, latency=0.2).start()
    try:
        cmd = [sys.executable, "-m", "packer.cli", "pack", str(photo_shards.parent / "src"),
               f"s3://{bucket}/term", "--endpoint-url", slow.endpoint, "--max-count", "5",
               "--workers", "1", "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "TMPDIR": str(temp)})
        deadline = time.monotonic() + 60
        while not slow.requests("PUT") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(temp.glob("shardpack-staging-*")), "no staging folder seen"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        slow.stop()
    assert proc.returncode == 130 and b"re-run the same command to resume" in err
    assert not list(temp.glob("shardpack-staging-*"))
    # a killed run's folder (its lock free) is removed by the next run; a live run's stays,
    # and so does a folder without the lock file (not known to be a run's)
    from packer import lock

    dead, alive, unknown = (temp / f"shardpack-staging-{name}" for name in ("ab", "cd", "ef"))
    for folder in (dead, alive, unknown):
        (folder / "train").mkdir(parents=True)
    (dead / ".shardpack-staging.lock").touch()
    held = lock.hold(str(alive / ".shardpack-staging.lock"))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        assert remove_dead_runs_staging() == [dead.name]
    finally:
        lock.release(held)
    assert alive.exists() and unknown.exists() and not dead.exists()


def test_pack_to_s3_fails_early_on_a_missing_bucket_and_removes_a_stopped_runs_strays(
        s3, photo_shards, tmp_path):
    """A bucket that does not exist is refused before anything is probed or written. A pack
    stopped before its manifest went up leaves shards no manifest names; a re-run with
    other options removes those (they carry shardpack's metadata), and nothing else."""
    import packer.job as job
    from packer import pack
    from packer.errors import UploadError

    endpoint, options, bucket = s3
    src = photo_shards.parent / "src"
    probed = []
    with pytest.MonkeyPatch.context() as patch, pytest.raises(UploadError, match="does not exist"):
        patch.setattr(job, "probe_all", lambda *a, **k: probed.append(1))
        pack(src, f"s3://{bucket}-missing/ds", storage_options=options, workers=1, quiet=True)
    assert not probed

    url = f"s3://{bucket}/ds"
    fs = _fs(endpoint)
    fs.pipe_file(f"{bucket}/ds/train/train-000099.tar", b"not ours")  # no shardpack metadata
    real_publish = __import__("packer.uploader", fromlist=["RemoteStore"]).RemoteStore.publish

    def stop_before_manifest(self, name, data):
        if name == MANIFEST_NAME:
            raise KeyboardInterrupt
        return real_publish(self, name, data)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr("packer.uploader.RemoteStore.publish", stop_before_manifest)
        pack(src, url, storage_options=options, seed=0, max_count=5, workers=1, quiet=True)
    many = {p.split("/ds/", 1)[1] for p in fs.find(f"{bucket}/ds") if p.endswith(".tar")}
    manifest = pack(src, url, storage_options=options, seed=0, max_count=40, workers=1, quiet=True,
                    overwrite=True)
    named = {e["name"] for split in manifest["splits"].values() for e in split["shards"]}
    left = {p.split("/ds/", 1)[1] for p in fs.find(f"{bucket}/ds") if p.endswith(".tar")}
    assert len(many) > len(named) + 1  # the stopped run left more shards than the new plan has
    assert left == named | {"train/train-000099.tar"}


def test_an_unreachable_endpoint_is_a_clear_error(s3, capsys):
    """No traceback of the store's own exception types: a ManifestError naming the URL, and
    exit status 2 from the CLI."""
    from packer.cli import main
    from packer.errors import ManifestError
    from reader import ShardReader

    _, _, bucket = s3
    dead = "http://127.0.0.1:1"
    with pytest.raises(ManifestError, match=f"cannot read s3://{bucket}/ds/manifest.json"):
        ShardReader(f"s3://{bucket}/ds", storage_options=s3_options(
            dead, config_kwargs={"retries": {"total_max_attempts": 1}}))  # quick to give up
    assert main(["info", f"s3://{bucket}/ds", "--endpoint-url", dead]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_missing_bucket_is_named_by_info_verify_and_upload(s3, photo_shards, capsys):
    """A missing bucket read as "no manifest.json ... is it a shardpack output?" and made
    every shard of an upload fail with "re-run to resume"."""
    from packer.cli import main

    endpoint, _, _ = s3
    url = "s3://no-such-bucket-here/ds"
    for argv in (["info", url], ["verify", url, "--quiet"], ["upload", str(photo_shards), url, "--quiet"]):
        assert main([*argv, "--endpoint-url", endpoint]) != 0
        err = capsys.readouterr().err
        assert "bucket 'no-such-bucket-here' does not exist" in err and "re-run" not in err, argv


def test_a_failing_shard_read_is_retried_by_one_layer_with_ours(s3, photo_shards):
    """botocore's retries are off under shardpack's (s3fs keeps its own): a shard whose
    every GET fails costs (our attempts) x (s3fs' 5), not 5 times more from botocore."""
    from packer.errors import ShardReadError
    from reader.remote import open_shard_stream

    endpoint, _, bucket = s3
    upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=endpoint, quiet=True)
    name = sorted(_shard_names(photo_shards))[0]
    proxy = FaultProxy(endpoint, fault=lambda m, p, n: "503" if m == "GET" and p.endswith(".tar") else None).start()
    try:
        with pytest.raises(ShardReadError, match="attempts"):
            with open_shard_stream(f"s3://{bucket}/ds/{name}", storage_options=s3_options(proxy.endpoint),
                                   retries=1, backoff=0.01, readahead=False) as stream:
                stream.read(100)
    finally:
        proxy.stop()
    gets = [r for r in proxy.log if r.method == "GET" and r.path.endswith(".tar")]
    assert 2 <= len(gets) <= 2 * 5


def test_an_upload_survives_a_server_error_on_a_put(s3, photo_shards):
    """Uploads have no retry loop of shardpack's: botocore's retries must stay on for them
    (s3fs does not retry a 500)."""
    endpoint, _, bucket = s3
    proxy = FaultProxy(endpoint, fault=lambda m, p, n: "500" if m == "PUT" and n == 1 else None).start()
    try:
        summary = upload(photo_shards, f"s3://{bucket}/ds", endpoint_url=proxy.endpoint, quiet=True)
    finally:
        proxy.stop()
    assert summary["uploaded"] == len(_shard_names(photo_shards))
    assert any(r.fault == "500" for r in proxy.log)


def test_a_worker_process_that_dies_in_a_pack_to_a_url_is_a_pack_error(tmp_path, monkeypatch):
    """As for a local OUT (test_pack.py): a pool worker that died while packing to object
    storage ended in a BrokenProcessPool traceback; it is a PackError saying to re-run."""
    from concurrent.futures.process import BrokenProcessPool

    import packer.remote_out as remote_out
    from packer import pack
    from packer.errors import PackError

    def a_worker_died(*args, **kwargs):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(remote_out, "pack_to_url", a_worker_died)
    with pytest.raises(PackError, match="a worker process of the pack died.*re-run the same command"):
        pack(tmp_path / "src", "s3://bucket/prefix", quiet=True)


def test_a_role_scoped_to_a_prefix_without_list_bucket_uploads_and_packs(photo_shards, monkeypatch):
    """Least-privilege upload roles are common: s3:GetObject/PutObject/DeleteObject on
    bucket/prefix/* and no s3:ListBucket. Those rights put, read and delete every object of
    a pack, yet upload and pack to the URL stopped at once with "Access Denied": reading
    the manifest that was not there yet asked for a listing (s3fs), which such a role may
    not make (and S3 answers it a missing key with 403). moto with IAM on, in a child process."""
    from s3_server import S3Server

    from packer import pack
    from reader import ShardReader

    server = S3Server(process=True, env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}).start()
    try:
        key = iam_user_key(server.endpoint, "uploader", [{
            "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            "Resource": "arn:aws:s3:::data/team/*"}])
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        options = s3_options(server.endpoint)
        with pytest.raises(PermissionError):  # the policy is in force: no listing
            fsspec.filesystem("s3", **options).ls("data/team/")

        first = upload(photo_shards, "s3://data/team/up", endpoint_url=server.endpoint, quiet=True)
        assert first["uploaded"] == len(_shard_names(photo_shards))
        again = upload(photo_shards, "s3://data/team/up", endpoint_url=server.endpoint, quiet=True)
        assert again["uploaded"] == 0 and again["manifest"] == "unchanged"
        # such a role is denied a missing manifest as one it may not read: a pack to the
        # URL cannot check what is there, and asks for --overwrite to go on
        from packer.errors import OutputExistsError

        with pytest.raises(OutputExistsError, match="pass --overwrite to pack there anyway"):
            pack(photo_shards.parent / "src", "s3://data/team/packed", storage_options=options,
                 seed=0, max_count=40, workers=1, quiet=True)
        pack(photo_shards.parent / "src", "s3://data/team/packed", storage_options=options, seed=0,
             max_count=40, workers=1, quiet=True, overwrite=True)
        local = ShardReader(photo_shards, split="test", image_size=8, shuffle=False)
        want = [y.tolist() for _, y in local]
        for url in ("s3://data/team/up", "s3://data/team/packed"):
            remote = ShardReader(url, split="test", image_size=8, shuffle=False, storage_options=options)
            assert [y.tolist() for _, y in remote] == want, url
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [0, -1, 1.5])
def test_upload_refuses_a_worker_count_below_one(photo_shards, tmp_path, workers):
    """upload --workers 0 or -1 was taken without a word (pack --workers -1 is refused)."""
    with pytest.raises(ValueError, match="workers must be a whole number >= 1"):
        upload(photo_shards, str(tmp_path / "dest"), quiet=True, workers=workers)
    assert not (tmp_path / "dest").exists()


def test_a_manifest_the_role_may_not_read_is_neither_trusted_absent_nor_left_over_new_shards(
        photo_shards, tmp_path):
    """A 403 on the manifest says "absent, or not yours to read": a pack to the URL over a
    pack made with other options (a write-only role) replaced it without --overwrite, and
    upload left the old manifest published over the shards it replaced. A store that
    denies every read of a .json stands for such a role."""
    from fsspec.implementations.memory import MemoryFileSystem

    from packer import pack
    from packer.errors import OutputExistsError

    deny = {"on": False}

    class DenyReads(MemoryFileSystem):
        protocol = ("denyreads",)
        root_marker = "/"

        def cat_file(self, path, *args, **kwargs):
            if deny["on"] and path.rstrip("/").endswith(".json"):
                raise PermissionError(f"AccessDenied: GetObject {path}")
            return super().cat_file(path, *args, **kwargs)

    fsspec.register_implementation("denyreads", DenyReads, clobber=True)
    src = photo_shards.parent / "src"
    pack(src, "denyreads://bucket/ds", quiet=True, max_count=40, workers=1)
    deny["on"] = True
    with pytest.raises(OutputExistsError, match="reading its manifest is denied"):
        pack(src, "denyreads://bucket/ds", resize=32, quiet=True, max_count=40, workers=1)
    deny["on"] = False
    assert json.loads(DenyReads().cat_file("denyreads://bucket/ds/manifest.json"))["options"]["resize"] is None

    # upload: the manifest it cannot read is deleted before a shard changes
    fs = DenyReads()
    fs.pipe_file("denyreads://bucket/up/manifest.json", b'{"format": "shardpack", "old": true}')
    deleted_before_first_shard = []
    real_put = DenyReads.put_file

    def put_file(self, lpath, rpath, **kwargs):
        if rpath.endswith(".tar") and not deleted_before_first_shard:
            deleted_before_first_shard.append(not self.exists("denyreads://bucket/up/manifest.json"))
        return real_put(self, lpath, rpath, **kwargs)

    DenyReads.put_file = put_file
    deny["on"] = True
    try:
        upload(photo_shards, "denyreads://bucket/up", quiet=True, workers=1)
    finally:
        deny["on"] = False
        DenyReads.put_file = real_put
    assert deleted_before_first_shard == [True]
    assert json.loads(fs.cat_file("denyreads://bucket/up/manifest.json")) == json.loads((photo_shards / MANIFEST_NAME).read_bytes())


def test_a_role_that_may_neither_read_nor_delete_the_manifest_still_uploads(photo_shards):
    """The delete of a manifest the role may not read was itself denied (no
    s3:DeleteObject): every upload failed, blaming a shard, and a re-run failed the same way."""
    from fsspec.implementations.memory import MemoryFileSystem

    class WriteOnly(MemoryFileSystem):
        protocol = ("writeonly",)
        root_marker = "/"

        def cat_file(self, path, *args, **kwargs):
            if path.rstrip("/").endswith(".json"):
                raise PermissionError(f"AccessDenied: GetObject {path}")
            return super().cat_file(path, *args, **kwargs)

        def rm_file(self, path, *args, **kwargs):
            raise PermissionError(f"AccessDenied: DeleteObject {path}")

    fsspec.register_implementation("writeonly", WriteOnly, clobber=True)
    first = upload(photo_shards, "writeonly://bucket/up", quiet=True, workers=1)
    assert first["uploaded"] == len(_shard_names(photo_shards))
    assert upload(photo_shards, "writeonly://bucket/up", quiet=True, workers=1)["uploaded"] == 0


def test_a_role_that_may_not_delete_uploads_a_smaller_repack_and_says_what_stays(photo_shards, tmp_path, caplog):
    """A role with s3:PutObject and s3:GetObject but no s3:DeleteObject, uploading a re-pack
    with fewer shards: taking the old manifest down and deleting the shards it alone named
    were denied, and the upload failed blaming a shard, leaving the old manifest over new
    shards; every re-run failed the same way. Now the new manifest is published, and a
    warning names what stays."""

    from packer import pack
    from packer.examples import make_example_tree

    no_delete_store("nodelete")
    first = upload(photo_shards, "nodelete://bucket/again", quiet=True, workers=1)
    assert first["uploaded"] == len(_shard_names(photo_shards)) and first["manifest"] == "uploaded"
    make_example_tree(tmp_path / "src", counts={"train": 30, "validation": 5, "test": 5},
                      long_side=(64, 96), seed=1)
    smaller = tmp_path / "smaller"
    pack(tmp_path / "src", smaller, seed=0, max_count=40, workers=1, quiet=True)
    assert len(_shard_names(smaller)) < len(_shard_names(photo_shards))
    with caplog.at_level("WARNING", logger="shardpack"):
        second = upload(smaller, "nodelete://bucket/again", quiet=True, workers=1)
    assert second["manifest"] == "uploaded" and second["removed"] == 0
    with fsspec.open(f"nodelete://bucket/again/{MANIFEST_NAME}", "rb") as f:
        assert f.read() == (smaller / MANIFEST_NAME).read_bytes()
    stale = len(_shard_names(photo_shards)) - len(_shard_names(smaller))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"cannot delete {stale} remote shards the new manifest no longer names" in said
    assert "a stand-in that readers refuse takes its place until the new manifest is up" in said
    again = upload(smaller, "nodelete://bucket/again", quiet=True, workers=1)  # a re-run is calm
    assert (again["uploaded"], again["manifest"]) == (0, "unchanged")


def test_a_pack_to_a_url_whose_role_may_not_delete_replaces_a_larger_pack(tmp_path, caplog):
    """The same role packing straight to the URL with --overwrite over a larger pack: the
    deletes of the old manifest and of the shards it alone named were denied, and the pack
    failed at its end, with no manifest published."""

    from packer import pack
    from packer.examples import make_example_tree

    no_delete_store("nodeletepack")
    for name, count in (("large", 60), ("small", 20)):
        make_example_tree(tmp_path / name, counts={"train": count}, long_side=(48, 64), seed=2)
    url = "nodeletepack://bucket/packed"
    with caplog.at_level("WARNING", logger="shardpack"):
        large = pack(tmp_path / "large", url, max_count=20, workers=1, quiet=True)
    assert caplog.text == ""  # a fresh pack warns of nothing
    with caplog.at_level("WARNING", logger="shardpack"):
        small = pack(tmp_path / "small", url, max_count=20, workers=1, quiet=True, overwrite=True)
    stale = len(large["splits"]["train"]["shards"]) - len(small["splits"]["train"]["shards"])
    assert stale > 0
    with fsspec.open(f"{url}/{MANIFEST_NAME}", "rb") as f:
        assert json.loads(f.read())["splits"]["train"]["shards"] == small["splits"]["train"]["shards"]
    assert f"cannot delete {stale} remote shards the new manifest no longer names" in caplog.text
