"""Resume, overwrite and unwritable-output behaviour, on real files and real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from zoo import SMALL

from packer import pack
from packer.errors import ManifestError, OutputExistsError, PackError
from packer.examples import make_example_tree
from packer.format import MANIFEST_NAME
from packer.inspect import verify
from packer.resume import JOURNAL_NAME

SHARDPACK = str(Path(sys.executable).with_name("shardpack"))
OPTS = {"max_count": 4, "workers": 1, "quiet": True}
CLI_OPTS = ["--max-count", "4", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    return make_example_tree(root / "src", counts={"train": 75, "test": 15}, long_side=SMALL, seed=1)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean") / "out"
    return out, pack(src, out, **OPTS)


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("*/*.tar"))


def _shas(manifest: dict) -> list[tuple[str, str]]:
    return [(s["name"], s["sha256"]) for info in manifest["splits"].values() for s in info["shards"]]


def _kill_mid_pack(src: Path, out: Path) -> None:
    """Start `shardpack pack`, SIGKILL it once a few shards exist; retry if it finished first."""
    for _ in range(5):
        proc = subprocess.Popen([SHARDPACK, "pack", str(src), str(out), *CLI_OPTS],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if len(_shards(out)) >= 6:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and not (out / MANIFEST_NAME).exists():
            return
        subprocess.run(["rm", "-rf", str(out)], check=True)
    pytest.fail("could not interrupt the pack before it finished")


@pytest.mark.slow
def test_resume_after_sigkill_matches_clean_run(src, clean, tmp_path):
    clean_out, clean_manifest = clean
    out = tmp_path / "out"
    _kill_mid_pack(src, out)
    journal = [json.loads(line) for line in (out / JOURNAL_NAME).read_text().splitlines() if line.strip()][1:]
    finished = {entry["name"]: (out / entry["name"]).stat().st_mtime_ns for entry in journal}
    assert finished, "the killed run recorded no finished shard"
    from reader import ShardReader  # a reader of the stopped pack is told why there is no manifest

    with pytest.raises(ManifestError, match="a pack is writing it, or was stopped"):
        ShardReader(out, split="train")
    assert len(finished) < len(_shas(clean_manifest))

    done = subprocess.run([SHARDPACK, "pack", str(src), str(out), *CLI_OPTS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / MANIFEST_NAME).read_bytes() == (clean_out / MANIFEST_NAME).read_bytes()
    for name, _ in _shas(clean_manifest):
        assert (out / name).read_bytes() == (clean_out / name).read_bytes(), name
    for name, mtime in finished.items():  # journaled shards were kept, not rewritten
        assert (out / name).stat().st_mtime_ns == mtime, name
    assert not list(out.rglob("*.partial")) and not (out / JOURNAL_NAME).exists()
    assert sorted(p.relative_to(out).as_posix() for p in _shards(out)) == sorted(n for n, _ in _shas(clean_manifest))


def test_corrupted_and_stale_leftovers(src, clean, tmp_path, caplog):
    clean_out, clean_manifest = clean
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", str(clean_out), str(out)], check=True)
    victim = out / "train" / "train-000003.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # inside the first image
    victim.write_bytes(bytes(data))
    stale = out / "train" / "train-000999.tar"  # a shard no record names: known by its headers
    stale.write_bytes((out / "train" / "train-000000.tar").read_bytes())
    partial = out / "train" / ".train-000004.tar.partial"
    partial.write_bytes(b"half a shard")
    untouched = out / "test" / "test-000000.tar"
    mtime = untouched.stat().st_mtime_ns

    manifest = pack(src, out, **OPTS)
    assert _shas(manifest) == _shas(clean_manifest)
    assert victim.read_bytes() == (clean_out / "train" / "train-000003.tar").read_bytes()
    assert not stale.exists() and not partial.exists()
    assert untouched.stat().st_mtime_ns == mtime
    assert verify(str(out)).ok
    assert "train/train-000999.tar" in caplog.text  # a removal is never silent


def _user_tar(path: Path, tmp_path: Path) -> bytes:
    """A user's own tar (``tar cf`` of a text file) at ``path``; returns its bytes."""
    (tmp_path / "afile.txt").write_text("my notes\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "cf", str(path), "-C", str(tmp_path), "afile.txt"], check=True)
    return path.read_bytes()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_repack_removes_only_shardpack_files(src, clean, tmp_path, overwrite):
    """A re-pack deleted every ``*-NNNNNN.tar`` in any folder of OUT and every empty folder:
    a user's archive/imagenet-000001.tar, a plain tar at an unused shard name, logs/. Only
    shards an earlier run recorded (or wrote, by their headers) go; the user's files stay."""
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", str(clean[0]), str(out)], check=True)
    mine = {rel: _user_tar(out / rel, tmp_path)
            for rel in ("archive/imagenet-000001.tar", "train/train-000900.tar", "test/.test-000009.tar")}
    (out / "logs").mkdir()
    options = {**OPTS, "max_count": 10} if overwrite else OPTS
    manifest = pack(src, out, **options, overwrite=overwrite)
    for rel, data in mine.items():
        assert (out / rel).read_bytes() == data, rel
    assert (out / "logs").is_dir()
    shards = {n for n, _ in _shas(manifest)}
    assert {p.relative_to(out).as_posix() for p in _shards(out)} == shards | set(mine)
    assert verify(str(out)).ok


def test_a_split_folder_is_removed_only_when_the_removal_empties_it(src, clean, tmp_path):
    """A split the new tree no longer has: its shards go, and its folder with them; a
    folder holding a user's file, and an empty folder, stay."""
    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    smaller = tmp_path / "src"
    shutil.copytree(src, smaller)
    shutil.rmtree(smaller / "test")
    (out / "empty").mkdir()
    pack(smaller, out, **OPTS, overwrite=True)
    assert not (out / "test").exists() and (out / "empty").is_dir()
    shutil.copytree(clean[0] / "test", out / "test")
    (out / "test" / "README").write_text("mine")
    pack(src, out, **OPTS, overwrite=True)
    pack(smaller, out, **OPTS, overwrite=True)
    assert sorted(p.name for p in (out / "test").iterdir()) == ["README"]


def test_different_options_refused_unless_overwrite(src, clean, tmp_path):
    clean_out, clean_manifest = clean
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", str(clean_out), str(out)], check=True)
    with pytest.raises(OutputExistsError, match="max_count"):
        pack(src, out, **{**OPTS, "max_count": 10})
    assert (out / MANIFEST_NAME).read_bytes() == (clean_out / MANIFEST_NAME).read_bytes()  # untouched
    manifest = pack(src, out, **{**OPTS, "max_count": 10}, overwrite=True)
    names = sorted(n for n, _ in _shas(manifest))
    assert len(names) < len(_shas(clean_manifest))
    assert sorted(p.relative_to(out).as_posix() for p in _shards(out)) == names  # old ones removed
    assert verify(str(out)).ok


def test_foreign_folder_refused(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"%PDF")
    with pytest.raises(OutputExistsError, match="no shardpack output"):
        pack(src, out, **OPTS)
    assert (out / "thesis.pdf").exists()


# ---- unwritable OUT and full disks ------------------------------------------------------

def _no_valid_output(out: Path) -> None:
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.rglob("*.partial")) if out.is_dir() else True
    assert not verify(str(out)).ok


def test_out_is_a_file(src, tmp_path):
    out = tmp_path / "file"
    out.write_bytes(b"x")
    with pytest.raises(PackError, match="cannot create output folder"):
        pack(src, out, **OPTS)


def test_out_under_proc(src):
    with pytest.raises(PackError, match="cannot"):
        pack(src, "/proc/shardpack-out", **OPTS)
    with pytest.raises(PackError, match="cannot write"):  # exists, but holds no writable files
        pack(src, "/proc/self", **OPTS, overwrite=True)


def test_file_size_limit_acts_as_full_disk(src, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 20 KB (EFBIG): the real error path."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        from packer import pack
        from packer.errors import PackError
        try:
            pack({str(src)!r}, {str(out)!r}, max_count=1000, workers=1, quiet=True)
        except PackError as exc:
            print("PackError:", exc)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert "cannot write" in done.stdout and "File too large" in done.stdout
    _no_valid_output(out)


def test_full_tmpfs(src, tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(PackError, match="disk full"):
            pack(src, mount / "out", **OPTS)
        _no_valid_output(mount / "out")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_no_fsync_gives_the_same_output_without_syncing(src, clean, tmp_path, monkeypatch):
    """``fsync=False`` (``--no-fsync``) changes no byte of the output, and syncs nothing:
    not the shards, not the journal's header, not the manifest."""
    import os

    out, manifest = clean
    synced: list[int] = []
    real_fsync, real_datasync = os.fsync, getattr(os, "fdatasync", os.fsync)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    if hasattr(os, "fdatasync"):
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real_datasync(fd)))
    fast = pack(src, tmp_path / "fast", **OPTS, fsync=False)
    assert synced == []
    assert _shas(fast) == _shas(manifest)
    assert (tmp_path / "fast" / MANIFEST_NAME).read_bytes() == (out / MANIFEST_NAME).read_bytes()
    pack(src, tmp_path / "durable", **OPTS)
    assert synced, "the default pack must sync what it writes"


def test_no_fsync_cli_resumes_like_the_default(src, clean, tmp_path):
    """A ``--no-fsync`` pack killed midway resumes to the same output."""
    out = tmp_path / "out"
    proc = subprocess.Popen([SHARDPACK, "pack", str(src), str(out), *CLI_OPTS, "--no-fsync"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and len(_shards(out)) < 6:
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    subprocess.run([SHARDPACK, "pack", str(src), str(out), *CLI_OPTS, "--no-fsync"], check=True,
                   stdout=subprocess.DEVNULL)
    assert _shas(json.loads((out / MANIFEST_NAME).read_text())) == _shas(clean[1])
    assert verify(str(out)).ok


def test_rerun_stopped_while_checking_loses_nothing(src, clean, tmp_path, monkeypatch):
    """A re-run stopped while files are still being checked leaves the published output
    as it was (manifest included), and the next run keeps every shard."""
    import packer.job as job

    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    before = (out / MANIFEST_NAME).read_bytes()
    real_probe = job._probe_chunk
    calls: list[int] = []

    def stop_on_third_chunk(task):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_probe(task)

    monkeypatch.setattr(job, "PROBE_CHUNK", 4)
    monkeypatch.setattr(job, "_probe_chunk", stop_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        pack(src, out, **OPTS)
    assert (out / MANIFEST_NAME).read_bytes() == before  # still published
    monkeypatch.setattr(job, "_probe_chunk", real_probe)

    writes: list[str] = []
    real_write = job.write_task
    monkeypatch.setattr(job, "write_task", lambda task: (writes.append(task[0].name), real_write(task))[1])
    resumed = pack(src, out, **OPTS)
    assert writes == []
    assert _shas(resumed) == _shas(clean[1])


def test_run_stopped_midway_keeps_what_the_run_before_had(src, clean, tmp_path, monkeypatch):
    """Once a re-run starts writing, the old manifest is down; its records move into the
    new journal, so a run stopped then still keeps every shard that is on disk intact."""
    import packer.job as job

    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    victim = _shards(out)[-1]
    victim.write_bytes(b"\0" * victim.stat().st_size)  # one shard damaged: it is rewritten
    real_write = job.write_task

    def stop_after_write(task):
        real_write(task)
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "write_task", stop_after_write)
    with pytest.raises(KeyboardInterrupt):
        pack(src, out, **OPTS)
    assert not (out / MANIFEST_NAME).exists()
    writes: list[str] = []
    monkeypatch.setattr(job, "write_task", lambda task: (writes.append(task[0].name), real_write(task))[1])
    resumed = pack(src, out, **OPTS)
    assert writes == []
    assert _shas(resumed) == _shas(clean[1])


_DIE_AS_THE_JOURNAL_APPEARS = textwrap.dedent("""
    import builtins, os, signal, sys
    real_open = builtins.open
    def open_then_die(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if ".shardpack-journal" in os.fspath(file) and "w" in mode:
            os.kill(os.getpid(), signal.SIGKILL)  # the journal file exists, nothing in it yet
        return f
    builtins.open = open_then_die
    from packer import pack
    pack(sys.argv[1], sys.argv[2], max_count=4, workers=1, quiet=True)
""")


@pytest.mark.parametrize("over_a_finished_pack", [False, True])
def test_a_kill_as_the_journal_is_created_leaves_a_resumable_out(src, clean, tmp_path, over_a_finished_pack):
    """Killed the instant the journal file appears (before a byte of it is written): the
    re-run of the same command resumes, rather than finding an OUT that looks foreign."""
    out = tmp_path / "out"
    if over_a_finished_pack:  # the old manifest is there; the new run must rewrite shards
        shutil.copytree(clean[0], out)
        next(iter(_shards(out))).write_bytes(b"damaged")
    killed = subprocess.run([sys.executable, "-c", _DIE_AS_THE_JOURNAL_APPEARS, str(src), str(out)])
    assert killed.returncode == -signal.SIGKILL
    done = subprocess.run([SHARDPACK, "pack", str(src), str(out), *CLI_OPTS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _shas(json.loads((out / MANIFEST_NAME).read_text())) == _shas(clean[1])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean[0].iterdir())


def test_a_full_disk_under_the_journal_is_a_pack_error_not_a_traceback(tmp_path):
    """Every shard fits under the 16 KB file size limit, the journal of 150 one-image
    shards does not: the pack stops with PackError naming the journal."""
    from PIL import Image

    src, out = tmp_path / "src", tmp_path / "out"
    (src / "train" / "a").mkdir(parents=True)
    for i in range(150):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(src / "train" / "a" / f"{i:03d}.png")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))
        from packer import pack
        from packer.errors import PackError
        try:
            pack({str(src)!r}, {str(out)!r}, max_count=1, workers=1, quiet=True, fsync=False)
        except PackError as exc:
            print("PackError:", exc)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert JOURNAL_NAME in done.stdout and "File too large" in done.stdout
    _no_valid_output(out)


def test_a_manifest_or_journal_header_that_does_not_fit_leaves_no_partial_file(clean, tmp_path):
    """The manifest and the journal's header are written to a temporary file renamed into
    place; when the disk is full (here: the kernel's file size limit, EFBIG) the write
    fails and the temporary file goes, the earlier file stays as it was."""
    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    before = (out / MANIFEST_NAME).read_bytes()
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from packer.manifest import write_manifest_atomically
        from packer.resume import Journal
        manifest = json.loads(open({str(out / MANIFEST_NAME)!r}).read())
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
        for write in (lambda: write_manifest_atomically({str(out)!r}, manifest),
                      lambda: Journal({str(out)!r}, manifest["options"], durable=True,
                                      carried=[{{"name": "x" * 300}}])):
            try:
                write()
            except OSError as exc:
                print("OSError:", exc.strerror)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.count("OSError: File too large") == 2, (done.stdout, done.stderr)
    assert (out / MANIFEST_NAME).read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]


def test_a_resize_spool_left_by_a_stopped_run_is_not_published(src, tmp_path, monkeypatch):
    """A --resize run stopped after probing leaves its spool of re-encoded images; the run
    that finishes the job (here without --resize, so with --overwrite) removes it."""
    from packer.spool import SPOOL_NAME
    from packer.write_session import WriteSession

    out = tmp_path / "out"

    def stopped(*args, **kwargs):  # as the first shard is written
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(WriteSession, "done", stopped)
        with pytest.raises(KeyboardInterrupt):
            pack(src, out, resize=24, **OPTS)
    assert (out / SPOOL_NAME).exists()
    pack(src, out, overwrite=True, **OPTS)
    assert not (out / SPOOL_NAME).exists()


def test_unreadable_manifest_says_so(src, clean, tmp_path):
    """A manifest that is not JSON: the refusal says it is unreadable and how to go on
    (it said OUT held no shardpack output, beside a folder full of shards)."""
    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    (out / MANIFEST_NAME).write_text('{"format": "shardpack", "vers')
    with pytest.raises(OutputExistsError, match=r"manifest.json is unreadable.*--overwrite") as info:
        pack(src, out, **OPTS)
    assert "no shardpack output" not in str(info.value)
    assert _shas(pack(src, out, **OPTS, overwrite=True)) == _shas(clean[1])


def test_newer_format_version_is_not_replaced_silently(src, clean, tmp_path):
    """A manifest of format version 2 (a newer shardpack's) was overwritten as version 1
    by a re-run of the same command; it is refused, naming the version, unless --overwrite."""
    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    newer = {**json.loads((out / MANIFEST_NAME).read_text()), "version": 2}
    (out / MANIFEST_NAME).write_text(json.dumps(newer))
    before = (out / MANIFEST_NAME).read_bytes()
    with pytest.raises(OutputExistsError, match="format version 2.*--overwrite"):
        pack(src, out, **OPTS)
    assert (out / MANIFEST_NAME).read_bytes() == before
    assert pack(src, out, **OPTS, overwrite=True)["version"] == 1


_HOLD_THE_LOCK = textwrap.dedent("""
    import sys
    from packer.lock import out_lock
    with out_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding OUT's lock (as a running pack does) until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_pack_into_the_same_out_is_refused(src, clean, tmp_path):
    """Two packs into one OUT both exited 0 with a manifest that did not match the shards:
    while one holds OUT, another is refused at once (exit 2 on the CLI, the holder's pid
    named) and touches nothing; afterwards the same command packs."""
    from packer.errors import OutputLockedError

    out = tmp_path / "out"
    holder = _holder(out)
    try:
        with pytest.raises(OutputLockedError, match=f"another shardpack process \\(pid {holder.pid}\\)"):
            pack(src, out, **OPTS)
        refused = subprocess.run([SHARDPACK, "pack", str(src), str(out), *CLI_OPTS], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 2 and "being packed by another" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert sorted(p.name for p in out.iterdir()) == [".shardpack.lock"]
    finally:
        holder.communicate("")
    assert _shas(pack(src, out, **OPTS)) == _shas(clean[1])
    assert not (out / ".shardpack.lock").exists()


_HOLD_AND_FORK = textwrap.dedent("""
    import os, sys, time
    from packer.lock import out_lock
    with out_lock(sys.argv[1]):
        if os.fork() == 0:  # a worker process, forked while the pack holds the lock
            print(os.getpid(), flush=True)  # running: its fork handlers have run
            time.sleep(60)
            os._exit(0)
        sys.stdin.read()
""")


def test_a_killed_pack_whose_workers_live_on_leaves_no_stale_lock(src, clean, tmp_path):
    """flock belongs to the open file: worker processes forked by the pack got a copy of
    the lock's descriptor, and outliving their SIGKILLed parent, kept OUT locked."""
    from packer.lock import out_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_AND_FORK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    worker = int(holder.stdout.readline())
    holder.kill()
    holder.wait()
    try:
        os.kill(worker, 0)  # the worker lives on
        with out_lock(str(out)):  # and OUT is free
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_killed_holder_leaves_no_stale_lock(src, clean, tmp_path):
    """The lock goes with its process, however it ends: no file to delete by hand."""
    out = tmp_path / "out"
    holder = _holder(out)
    holder.kill()
    holder.wait()
    assert (out / ".shardpack.lock").exists()  # the file stays; the lock does not
    assert _shas(pack(src, out, **OPTS)) == _shas(clean[1])


def test_rerun_of_a_finished_pack_stopped_before_its_manifest_leaves_it_published(src, clean, tmp_path,
                                                                                   monkeypatch):
    """A re-run that changes no shard never takes the published manifest down: stopped
    just before it writes its own (every shard checked and kept), OUT is as it was. It used
    to be deleted at the end of every re-run, so a reader found none meanwhile and a
    re-run stopped there left a complete output unpublished."""
    import packer.job as job

    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    before = (out / MANIFEST_NAME).read_bytes()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "write_manifest_atomically", stop)
    with pytest.raises(KeyboardInterrupt):
        pack(src, out, **OPTS)
    assert (out / MANIFEST_NAME).read_bytes() == before
    monkeypatch.undo()
    assert _shas(pack(src, out, **OPTS)) == _shas(clean[1])
    assert not (out / JOURNAL_NAME).exists()


def test_a_manifest_with_malformed_options_is_refused_not_crashed_on(tmp_path):
    """A hand edit that made `options` a string ended a re-run in an AttributeError
    traceback (info and verify named it); now it is a pack made with other options."""
    from conftest import write_id_tree

    from packer import pack
    from packer.errors import OutputExistsError
    from packer.format import MANIFEST_NAME

    write_id_tree(tmp_path / "src", {"train": 2})
    pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    manifest["options"] = "packed by hand"
    (tmp_path / "out" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(OutputExistsError, match="different options"):
        pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True)
    assert pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True, overwrite=True)["options"]["seed"] == 0
