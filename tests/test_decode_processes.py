"""ShardReader(processes=N): the epoch decoded in N processes is the loader workers' stream
(batch w from process w % N), whole batches, labels and skip counts, kept batches are never
overwritten, and errors, early exits, resumes and dead processes behave."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import pixel_ids, write_jpeg_tars

from packer.errors import SampleDecodeError
from reader import ShardReader
from reader.batches import auto_processes


def _simulated(reader: ShardReader, epoch: int, processes: int, skip: int = 0) -> list:
    """The same epoch in this process: each process's share, taken in turn."""
    streams = [list(reader._worker_epoch_batches(epoch, worker=w, workers=processes, skip=skip))
               for w in range(processes)]
    out, turn = [], skip % processes
    while any(streams):
        if streams[turn]:
            out.append(streams[turn].pop(0))
        turn = (turn + 1) % processes
    return out


def _same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (xg, yg), (xw, yw) in zip(got, want, strict=True):
        assert xg.dtype == xw.dtype and np.array_equal(xg, xw)
        assert np.array_equal(yg, yw)


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory):
    """60 samples in 4 tars, JPEGs of several sizes, one broken (key s0023)."""
    return write_jpeg_tars(tmp_path_factory.mktemp("broken"), count=60, classes=4, broken={23},
                           per_tar=15, max_side=90, seed=5)


OPTS = dict(num_classes=4, image_size=(24, 20), batch_size=7, seed=11, random_flip=True,
            on_error="ignore", num_workers=4)


@pytest.mark.parametrize("processes", [2, 3])
def test_epochs_are_the_loader_workers_stream(broken_shards, processes):
    reader = ShardReader(broken_shards, processes=processes, **dict(OPTS, on_error="warn"))
    try:
        for epoch in range(2):
            with pytest.warns(RuntimeWarning, match="skipped: sample s0023"):  # here, not in a process
                got = [(x.copy(), y) for x, y in reader]
            _same(got, _simulated(ShardReader(broken_shards, **OPTS), epoch, processes))
        assert reader.policy.skipped_samples == 2  # s0023 once in each epoch, counted here
    finally:
        reader.close()


def test_kept_batches_are_never_overwritten(id_shards):
    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=8, seed=3, processes=2)
    try:
        kept = [x for x, _ in reader]  # every batch held at once: the processes get new slots
        ids = sorted(n for x in kept for n in pixel_ids(x))
        assert ids == sorted(i for i, p in id_shards[1].items() if p.startswith("train/"))
    finally:
        reader.close()


def test_raise_policy_error_comes_out_of_next(broken_shards):
    reader = ShardReader(broken_shards, processes=2, **dict(OPTS, on_error="raise"))
    try:
        with pytest.raises(SampleDecodeError, match="s0023") as info:
            for _ in reader:
                pass
        assert info.value.key == "s0023"
        # the processes serve the next epoch after an error, with the options as they are now
        reader.policy.on_error = "ignore"
        assert sum(len(x) for x, _ in reader) == 59
    finally:
        reader.close()


def test_leaving_early_then_resuming_from_a_state(id_shards):
    opts = dict(split="train", image_size=4, batch_size=8, seed=5, random_flip=True, processes=2)
    full = ShardReader(id_shards[0], **opts)
    first = ShardReader(id_shards[0], **opts)
    try:
        want = [(x.copy(), y) for x, y in full]
        it = iter(first)
        for _ in range(3):
            next(it)
        state = first.state_dict()
        it.close()  # leave the epoch: every process cancels it
        assert sum(len(x) for x, _ in first) == 210  # the processes serve the next epoch whole
        resumed = ShardReader(id_shards[0], **opts)
        resumed.load_state_dict(state)
        _same([(x.copy(), y) for x, y in resumed], want[3:])
        resumed.close()
        with pytest.raises(ValueError, match="processes"):
            ShardReader(id_shards[0], **dict(opts, processes=0)).load_state_dict(state)
    finally:
        full.close()
        first.close()


def test_close_ends_the_processes_and_frees_shared_memory(id_shards):
    reader = ShardReader(id_shards[0], split="test", image_size=4, batch_size=4, processes=2,
                         label_mode=None, shuffle=False)
    assert sum(len(x) for x in reader) == 30  # no labels: batches are x alone
    procs = list(reader._pool._procs)
    names = [slot.shm.name for p in procs for slot in p.slots.values()]
    reader.close()
    assert all(p.popen.poll() is not None for p in procs)
    assert names and not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    assert sum(len(x) for x in reader) == 30  # a later epoch starts them again
    reader.close()


def test_a_killed_process_is_reported(id_shards):
    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=2, processes=2)
    try:
        it = iter(reader)
        next(it)
        os.kill(reader._pool._procs[1].popen.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="decode process 1 exited"):
            for _ in it:
                pass
        assert sum(len(x) for x, _ in reader) == 210  # the next epoch starts a new set
    finally:
        reader.close()


def test_a_batch_larger_than_free_shared_memory_is_refused_up_front(id_shards):
    reader = ShardReader(id_shards[0], split="train", image_size=30_000, batch_size=64, processes=2)
    with pytest.raises(RuntimeError, match="shared memory .* --shm-size"):
        next(iter(reader))
    reader.close()


def test_bad_processes_value(id_shards):
    for bad in (-1, "many", 2.5):
        with pytest.raises(ValueError, match="processes"):
            ShardReader(id_shards[0], processes=bad)


@pytest.mark.parametrize(("cpus", "sample_bytes", "want"), [
    (2, None, 0), (7, 50_000, 0), (8, 50_000, 4), (16, 50_000, 8), (16, None, 8),
    (16, 20_000, 16), (12, 32 * 1024, 6),
])
def test_auto_processes_follow_the_many_core_measurements(cpus, sample_bytes, want):
    assert auto_processes(cpus, sample_bytes) == want


def test_processes_auto_picks_for_this_machine_and_reads_the_same_epochs(photo_shards, monkeypatch):
    """"auto" is threads here (2 CPUs) and processes on a machine of 8 CPUs or more (its
    CPU count faked, the processes real; each process's share of images lowered to these
    320): the epochs are then those of that many."""
    import reader.batches as batches
    import reader.shard_reader as shard_reader

    options = dict(split="train", image_size=16, batch_size=8, seed=3)
    here = ShardReader(photo_shards, processes=0, **options)
    assert ShardReader(photo_shards, processes="auto", **options).processes == auto_processes(
        len(os.sched_getaffinity(0)), here.source.mean_sample_bytes(), samples=here.samples)
    monkeypatch.setattr(shard_reader, "_default_workers", lambda: 8)
    monkeypatch.setattr(batches, "_AUTO_MIN_SAMPLES_PER_PROCESS", 40)
    auto = ShardReader(photo_shards, processes="auto", **options)
    try:
        assert auto.processes == (8 if auto.source.mean_sample_bytes() < 32 * 1024 else 4)
        _same([(x.copy(), y) for x, y in auto], _simulated(ShardReader(photo_shards, **options), 0, auto.processes))
    finally:
        auto.close()


def test_tf_dataset_with_processes_is_the_readers_stream(broken_shards):
    pytest.importorskip("tensorflow")
    from reader import image_dataset_from_shards

    ds = image_dataset_from_shards(broken_shards, processes=2, verbose=False, **OPTS)
    try:
        got = [(x.numpy(), y.numpy()) for x, y in ds]
        _same(got, _simulated(ShardReader(broken_shards, **OPTS), 0, 2))
    finally:
        ds.shard_reader.close()


def test_a_new_epoch_while_an_old_iterator_is_held(id_shards):
    """The processes read one epoch at a time: a new one takes them over, and the old
    iterator says so at its next step instead of ending short."""
    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=8, seed=2, processes=2)
    try:
        old = iter(reader)
        next(old)
        assert sorted(n for x, _ in reader for n in pixel_ids(x)) == sorted(
            i for i, p in id_shards[1].items() if p.startswith("train/"))
        with pytest.raises(RuntimeError, match="one epoch at a time"):
            next(old)
    finally:
        reader.close()


def test_kept_batches_outlive_close_and_the_reader(id_shards):
    """A batch kept after close() (or after the reader is gone) still holds its pixels:
    the shared memory is unmapped only when the last batch of it goes."""
    import gc

    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=8, seed=3, processes=2)
    x, _ = next(iter(reader))
    ids = pixel_ids(x)
    reader.close()
    assert pixel_ids(x) == ids
    x2, _ = next(iter(ShardReader(id_shards[0], split="train", image_size=4, batch_size=8,
                                  seed=3, processes=2)))
    gc.collect()  # the reader (and its processes) are gone; the batch is not
    assert pixel_ids(x2) == ids


def test_skip_counts_are_not_counted_again_after_a_restart(broken_shards):
    reader = ShardReader(broken_shards, processes=2, **OPTS)
    try:
        for epoch in range(3):
            assert sum(len(x) for x, _ in reader) == 59
            reader.close()  # the next epoch sends the reader, with its counts, to new processes
            assert reader.policy.skipped_samples == epoch + 1
    finally:
        reader.close()


def test_holding_many_batches_uses_no_file_descriptor_each(id_shards):
    import psutil

    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=1, processes=2)
    try:
        before = psutil.Process().num_fds()
        kept = list(reader)  # 210 batches held: past a few per process they come as copies
        after_one = psutil.Process().num_fds()
        kept += list(reader)
        assert len(kept) == 420 and after_one < before + 100  # it was one or more per batch
        assert psutil.Process().num_fds() <= after_one + 4
        assert sorted(n for x, _ in kept for n in pixel_ids(x)) == sorted(
            2 * [i for i, p in id_shards[1].items() if p.startswith("train/")])
    finally:
        reader.close()


def _epoch_ids(reader) -> list[int]:
    return sorted(n for x, _ in reader for n in pixel_ids(x))


def test_ctrl_c_inside_a_pipe_read_or_the_drain_leaves_the_next_epoch_whole(id_shards, monkeypatch):
    """Ctrl-C can land in the middle of reading a message from a process: the pipe is then
    out of step (the drain of the cancelled epoch read a length from the middle of a
    message and hung), or in the drain itself (the next epoch read the old one's end and
    came out short, in silence). Either way the interrupt reaches the caller and the next
    epoch is whole."""
    import faulthandler

    import reader.processes as processes

    want = sorted(i for i, p in id_shards[1].items() if p.startswith("train/"))
    real = processes._recv
    for where in ("mid-message", "in the drain"):
        reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=8, seed=3, processes=2)
        calls = {"n": 0}

        def interrupted(stream, where=where, calls=calls):
            calls["n"] += 1
            if where == "mid-message" and calls["n"] == 3:
                stream.read(processes._LENGTH.size)  # the length is read, then Ctrl-C
                raise KeyboardInterrupt
            if where == "in the drain" and calls["n"] == 5:
                raise KeyboardInterrupt  # at a message boundary, while the epoch is cancelled
            return real(stream)

        try:
            # the bug hung in a blocking pipe read: end the run with tracebacks, not hang CI
            faulthandler.dump_traceback_later(120, exit=True)
            with monkeypatch.context() as patch:
                patch.setattr(processes, "_recv", interrupted)
                with pytest.raises(KeyboardInterrupt):
                    for _ in reader:
                        if where == "in the drain" and calls["n"] >= 3:
                            raise KeyboardInterrupt  # the loop's own Ctrl-C, then one in the drain
            assert _epoch_ids(reader) == want
            assert _epoch_ids(reader) == want
        finally:
            faulthandler.cancel_dump_traceback_later()
            reader.close()


def test_a_forked_copy_does_not_stop_the_parents_processes(id_shards):
    """A child of os.fork (a DataLoader worker too) that drops or closes its copy of a
    reader must leave the parent's decode processes and shared memory alone, and must not
    wait for the pool's lock, which a thread of the parent (tf.data's) may hold at the fork."""
    import threading
    import time

    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=8, seed=3, processes=2)
    try:
        want = _epoch_ids(reader)
        held, release = threading.Event(), threading.Event()

        def hold_the_lock():
            with reader._pool._io:
                held.set()
                release.wait()

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        held.wait()
        pid = os.fork()
        if pid == 0:  # the child: let go of its copy
            try:
                reader.close()
            finally:
                os._exit(0)
        release.set()
        holder.join()
        deadline = time.monotonic() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung in close()")
            time.sleep(0.05)
        assert _epoch_ids(reader) == want
    finally:
        reader.close()


def test_a_process_killed_between_epochs_is_replaced_and_one_killed_mid_epoch_is_named(id_shards):
    """The OOM killer may strike while the caller validates or saves a checkpoint: the next
    epoch then starts a new set (nothing of an epoch is lost). Killed mid-epoch, the error
    names the process whichever pipe call meets it first (a send gave a bare BrokenPipeError)."""
    import time

    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=2, processes=2)
    try:
        assert sum(len(x) for x, _ in reader) == 210
        os.kill(reader._pool._procs[1].popen.pid, signal.SIGKILL)
        time.sleep(0.3)
        assert sum(len(x) for x, _ in reader) == 210
        it = iter(reader)
        next(it)
        os.kill(reader._pool._procs[1].popen.pid, signal.SIGKILL)
        time.sleep(0.3)  # dead before the main process next writes to it
        with pytest.raises(RuntimeError, match="decode process 1 exited"):
            for _ in it:
                pass
    finally:
        reader.close()


def test_a_damaged_shard_read_by_two_processes_is_counted_and_reported_once(id_shards, tmp_path):
    import shutil
    import warnings

    shards = tmp_path / "copy"
    shutil.copytree(id_shards[0], shards)
    # 210 samples in shards of 16, batches of 5: process 0 reads samples 0-104, process 1
    # the rest, so shard 6 (samples 96-111) is read in part by each
    sorted((shards / "train").glob("*.tar"))[6].unlink()
    counts = {}
    for processes in (0, 2):
        reader = ShardReader(shards, split="train", image_size=4, batch_size=5, processes=processes,
                             on_shard_error="warn", shuffle=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = sum(1 for _ in reader)
        reader.close()
        counts[processes] = (batches, reader.policy.skipped_shards, len(reader.policy.messages),
                             sum("not found" in str(w.message) for w in caught))
    # the epoch, filled up with its first batches, keeps its length; the repeat re-reads
    # nothing that is counted or said again
    assert counts[2] == counts[0] == (len(reader), 1, 1, 1)


@pytest.mark.parametrize("processes", [2, 3])
def test_shuffle_false_batches_follow_labels_and_filenames_with_processes(id_shards, processes):
    """Each process decodes the batches w, w + N, ... of the manifest order, so taking one
    from each in turn gives the order of ``labels``/``filenames``: predictions line up.
    (Each process read a contiguous run before, and 26 of 52 positions were off, silently.)
    Batches of 4 over shards of 16 and 14: batches span shards, the last one is short."""
    reader = ShardReader(id_shards[0], split="test", image_size=4, batch_size=4, shuffle=False,
                         processes=processes)
    try:
        batches = list(reader)
        assert [len(y) for _, y in batches] == [4] * 7 + [2] and len(batches) == len(reader)
        assert np.array_equal(np.concatenate([y for _, y in batches]), reader.labels)
        plain = ShardReader(id_shards[0], split="test", image_size=4, batch_size=4, shuffle=False)
        _same([(x.copy(), y) for x, y in batches], list(plain))
    finally:
        reader.close()


def test_a_banner_printed_as_a_decode_process_starts_does_not_jam_its_messages(id_shards, tmp_path):
    """Anything printed to stdout as the interpreter starts (a sitecustomize, an import-time
    banner) came into the message pipe and was read as a message length: a hang."""
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text('print("hello from sitecustomize " * 20)\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (f"import sys; sys.path.insert(0, {root!r})\n"
              "from reader import ShardReader\n"
              f"r = ShardReader({str(id_shards[0])!r}, split='train', image_size=4, batch_size=5, processes=2)\n"
              "print('samples', sum(len(y) for _, y in r))\n"
              "r.close()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "samples 210" in done.stdout


def test_a_process_ended_by_sigbus_is_said_to_have_run_out_of_shared_memory(id_shards):
    """A write into a shared-memory slot that /dev/shm has no room for is a SIGBUS: the
    error says so, and what to do, instead of "killed, out of memory, or crashed"."""
    import time

    reader = ShardReader(id_shards[0], split="train", image_size=4, batch_size=2, processes=2)
    try:
        it = iter(reader)
        next(it)
        os.kill(reader._pool._procs[1].popen.pid, signal.SIGBUS)
        time.sleep(0.3)
        with pytest.raises(RuntimeError, match=r"decode process 1 ran out of shared memory \(/dev/shm"):
            for _ in it:
                pass
    finally:
        reader.close()


def test_an_unshuffled_state_from_the_old_split_is_refused_inside_its_epoch(id_shards):
    """States saved inside an unshuffled epoch read as several streams by shardpack before
    the strided split would resume into other samples: refused (at an epoch boundary, and
    shuffled, nothing changed and they load)."""
    opts = dict(split="test", image_size=4, batch_size=4, shuffle=False, processes=2)
    reader = ShardReader(id_shards[0], **opts)
    try:
        it = iter(reader)
        next(it), next(it)
        state = reader.state_dict()
        it.close()
        old = {k: v for k, v in state.items() if k != "unshuffled_split"}
        with pytest.raises(ValueError, match="earlier shardpack, which split such an epoch"):
            ShardReader(id_shards[0], **opts).load_state_dict(old)
        ShardReader(id_shards[0], **opts).load_state_dict(state)  # the new split: fine
        ShardReader(id_shards[0], **opts).load_state_dict(dict(old, epoch=1, batches=0))  # a boundary
        shuffled = dict(opts, shuffle=True)
        r = ShardReader(id_shards[0], **shuffled)
        it = iter(r)
        next(it)
        s = {k: v for k, v in r.state_dict().items() if k != "unshuffled_split"}
        it.close()
        r.close()
        ShardReader(id_shards[0], **shuffled).load_state_dict(s)
    finally:
        reader.close()
