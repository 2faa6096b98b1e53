"""Mid-epoch resume: a restarted reader sees the same remaining samples in the same order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import batches_and_states, sample_ids, write_id_tars

from reader import ShardReader
from reader.state import load_state, save_state

# one batch stream on any machine (the default, processes="auto", takes decode processes
# for these 1,001 images on 16 CPUs): what the stream is, tests of processes say
OPTIONS = dict(split="train", image_size=16, batch_size=50, shuffle_buffer=300, num_workers=1, processes=0)


def _ids(batches) -> list[list[int]]:
    return [sample_ids(x) for x, _y in batches]


def _state_after(reader: ShardReader, batches: int) -> dict:
    """The reader's state once ``batches`` batches of its epoch have been taken."""
    it = iter(reader)
    for _ in range(batches):
        next(it)
    return reader.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(awkward_shards):
    """Epochs 0 and 1 of a seeded shuffled reader, batch by batch."""
    r = ShardReader(awkward_shards, seed=7, **OPTIONS)
    return [_ids(r), _ids(r)]


@pytest.mark.parametrize("epoch,k", [(0, 0), (0, 1), (0, 9), (0, 20), (0, 21), (1, 13)])
def test_resume_sees_the_rest_of_the_epoch_in_order(awkward_shards, uninterrupted, epoch, k):
    first = ShardReader(awkward_shards, seed=7, **OPTIONS)
    first.set_epoch(epoch)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    finished = k == len(first)  # then the state is the start of the next epoch
    assert (state["epoch"], state["batches"]) == ((epoch + 1, 0) if finished else (epoch, k))

    restarted = ShardReader(awkward_shards, **OPTIONS)  # no seed: the state's is used
    restarted.load_state_dict(state)
    restarted.set_epoch(state["epoch"])  # the loop's epoch: keeps the loaded position
    rest = _ids(restarted)
    assert rest == (uninterrupted[epoch + 1] if finished else uninterrupted[epoch][k:])
    if epoch == 0 and not finished:  # and the next epoch goes on as if nothing happened
        assert _ids(restarted) == uninterrupted[1]


def test_a_state_at_the_end_of_an_epoch_resumes_at_the_next_one(awkward_shards):
    """A checkpoint taken after an epoch's last batch (a job killed in validation, before
    the epoch-end save) must not leave an epoch of 0 batches to resume: Keras' fit with
    steps_per_epoch=0 and a dataset of fixed cardinality both refuse that. States saved so
    by earlier versions load as the start of the next epoch too."""
    from reader.state import make_state

    r = ShardReader(awkward_shards, seed=7, **OPTIONS)
    state = make_state(r, epoch=2, batches=len(r))
    assert (state["epoch"], state["batches"]) == (3, 0)
    old_style = dict(state, epoch=2, batches=len(r))
    restarted = ShardReader(awkward_shards, **OPTIONS)
    restarted.load_state_dict(old_style)
    assert (restarted.epoch, len(list(restarted))) == (3, len(r))


def test_state_between_epochs_points_at_the_next(awkward_shards, uninterrupted, tmp_path):
    r = ShardReader(awkward_shards, seed=7, **OPTIONS)
    assert (r.state_dict()["epoch"], r.state_dict()["batches"]) == (0, 0)
    for _ in r:
        pass
    save_state(r.state_dict(), tmp_path / "ckpt" / "state.json")  # the folder is made
    state = load_state(tmp_path / "ckpt" / "state.json")
    assert (state["epoch"], state["batches"]) == (1, 0)
    again = ShardReader(awkward_shards, **OPTIONS)
    again.load_state_dict(state)
    assert _ids(again) == uninterrupted[1]
    assert load_state(tmp_path / "missing.json") is None


def test_resume_on_a_rank_with_augmentation(awkward_shards):
    options = dict(OPTIONS, rank=1, world_size=3, random_flip=True, random_crop=(0.5, 1.0))
    whole = [x for x, _y in ShardReader(awkward_shards, **options)]
    r = ShardReader(awkward_shards, **options)
    it = iter(r)
    next(it), next(it), next(it)
    state = r.state_dict()
    state["rank"] = 0  # one saved state (rank 0's) serves every rank
    restarted = ShardReader(awkward_shards, **options)
    restarted.load_state_dict(state)
    rest = [x for x, _y in restarted]
    assert len(rest) == len(whole) - 3
    for a, b in zip(rest, whole[3:], strict=True):
        np.testing.assert_array_equal(a, b)  # same samples, same random crops


@pytest.mark.parametrize("processes", [0, 2])
def test_resume_gives_the_same_random_crops_and_flips_on_photos(photo_shards, processes):
    """The test above reads one-colour images, where no crop or flip shows: on photos, a
    resumed epoch takes the augmentation draws of the samples it skipped too, so the rest
    of the epoch gets the crops and flips it would have had (README: "the same remaining
    samples in the same order"), on decode threads and in decode processes."""
    options = dict(split="train", image_size=(24, 20), batch_size=8, seed=5, random_flip=True,
                   random_crop=(0.3, 0.9), dtype="uint8", processes=processes)
    whole = [(x.copy(), y.copy()) for x, y in ShardReader(photo_shards, **options)]
    plain = [x for x, _y in ShardReader(photo_shards, **dict(options, random_flip=False, random_crop=None))]
    assert not np.array_equal(whole[4][0], plain[4])  # the augmentations show on these images
    r = ShardReader(photo_shards, **options)
    state = _state_after(r, 4)
    restarted = ShardReader(photo_shards, **options)
    restarted.load_state_dict(state)
    rest = [(x.copy(), y.copy()) for x, y in restarted]
    r.close()
    restarted.close()
    assert len(rest) == len(whole) - 4
    for (x, y), (xw, yw) in zip(rest, whole[4:], strict=True):
        np.testing.assert_array_equal(y, yw)
        np.testing.assert_array_equal(x, xw)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(split="small"), "split='train' but this reader has split='small'"),
        (dict(batch_size=64), "batch_size"),
        (dict(rank=0, world_size=2), "world_size"),
        (dict(shuffle=False), "shuffle"),
        (dict(class_names=["circle"]), "classes"),
    ],
)
def test_a_state_of_another_stream_is_refused(awkward_shards, change, match):
    state = ShardReader(awkward_shards, seed=1, **OPTIONS).state_dict()
    other = ShardReader(awkward_shards, **{**OPTIONS, **change})
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)


def test_a_state_of_a_repack_with_the_same_shard_sizes_is_refused(tmp_path):
    """A re-pack with another seed holds the same images in another order, in shards of the
    same names, counts and (10,240-byte rounded) sizes: the state's listing matched, and
    the resume gave other samples than the interrupted epoch's."""
    from conftest import write_id_tree

    from packer import pack

    write_id_tree(tmp_path / "src", {"train": 12})
    for seed in (0, 1):
        pack(tmp_path / "src", tmp_path / f"seed{seed}", seed=seed, max_count=9, workers=1, quiet=True)
    options = dict(split="train", image_size=4, batch_size=4, seed=3)
    first, second = (ShardReader(tmp_path / f"seed{s}", **options) for s in (0, 1))
    assert [(r.name, r.count, r.nbytes) for r in first.source.shards] == [
        (r.name, r.count, r.nbytes) for r in second.source.shards]
    iterator = iter(first)
    next(iterator)
    state = first.state_dict()
    with pytest.raises(ValueError, match="saved for other shards of split 'train'"):
        second.load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "shard_hashes"}  # a 0.2.x state: the listing only
    second.load_state_dict(old)
    ShardReader(tmp_path / "seed0", **options).load_state_dict(state)


def test_garbage_state_is_refused(awkward_shards):
    r = ShardReader(awkward_shards, **OPTIONS)
    with pytest.raises(ValueError, match="not a ShardReader state"):
        r.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="version"):
        r.load_state_dict({**r.state_dict(), "version": 99})
    with pytest.raises(ValueError, match="out of range"):
        r.load_state_dict({**r.state_dict(), "batches": 10_000})
    for lap in (-1, "3", 1.5, 5, 9):  # a repeat starts after a whole number of batches before these
        with pytest.raises(ValueError, match="lap"):
            r.load_state_dict({**r.state_dict(), "batches": 5, "lap": lap})
    for length in (-1, "2", 4, 9):  # a whole repeat is no longer than where it started
        with pytest.raises(ValueError, match="lap_length"):
            r.load_state_dict({**r.state_dict(), "batches": 5, "lap": 3, "lap_length": length})


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_keras_checkpoint_callback_and_resume_recipe(awkward_shards, tmp_path, steps_per_execution):
    """The recipe of docs/READING.md. With steps_per_execution=K, Keras reports an epoch's
    last group of steps whole even where it holds fewer: the callback counted them all, one
    batch too many each epoch (its (next epoch, 0) at an epoch's end came out (1, 1), then
    (2, 2)). The interrupted epoch is finished with ``ds.take(rest)``: the recipe's
    ``steps_per_epoch=rest`` ended in "expected to contain 21 elements" where K does not
    divide the rest (Keras asks for one element more)."""
    keras = pytest.importorskip("keras")
    from reader import image_dataset_from_shards
    from reader.state import ShardReaderCheckpoint

    def model():
        m = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
        m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
        return m

    def dataset():
        return image_dataset_from_shards(awkward_shards, split="train", image_size=(16, 16),
                                          batch_size=50, seed=1, verbose=False, num_workers=1)

    stop = 8 if steps_per_execution == 4 else 7  # where a group of steps ends

    class Crash(keras.callbacks.Callback):  # the job dies after `stop` batches of epoch 1
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            assert epoch == 0 or load_state(path)["batches"] == 0  # (next epoch, 0) at each end

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 1 and batch + 1 == stop:
                self.model.stop_training = True

    path = tmp_path / "reader.json"
    ds = dataset()
    model().fit(ds, epochs=3, verbose=0,
                callbacks=[ShardReaderCheckpoint(ds.shard_reader, path, every=1), Crash()])
    state = load_state(path)
    assert (state["epoch"], state["batches"]) == (1, stop)

    # the recipe of docs/READING.md: finish the interrupted epoch, then go on
    ds = dataset()
    reader = ds.shard_reader
    reader.load_state_dict(state)
    m = model()
    checkpoint = ShardReaderCheckpoint(reader, path, every=5)
    rest = len(reader) - state["batches"]
    assert rest % steps_per_execution or steps_per_execution == 1  # 13 left of 21: K=4 does not divide
    m.fit(ds.take(rest), epochs=2, initial_epoch=1, verbose=0, callbacks=[checkpoint])
    assert (load_state(path)["epoch"], load_state(path)["batches"]) == (2, 0)
    m.fit(ds, epochs=3, initial_epoch=2, verbose=0, callbacks=[checkpoint])
    assert (load_state(path)["epoch"], load_state(path)["batches"]) == (3, 0)
    assert ds.shard_reader.epoch == 3


@pytest.mark.slow
def test_keras_checkpoint_with_steps_per_epoch_counts_across_keras_epochs(awkward_shards, tmp_path):
    """With steps_per_epoch below the reader's length Keras keeps reading the same pass in
    its next epoch (and ends an epoch where the pass ends): the saved position is the
    reader's, counted across Keras epochs, not the Keras epoch's own step."""
    keras = pytest.importorskip("keras")
    from reader import image_dataset_from_shards
    from reader.state import ShardReaderCheckpoint

    def fit(epochs: int, steps: int, repeat: bool = False) -> dict:
        ds = image_dataset_from_shards(awkward_shards, split="train", image_size=(16, 16),
                                       batch_size=50, seed=1, verbose=False, num_workers=1)
        reader = ds.shard_reader
        assert len(reader) == 21
        m = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
        m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        path = tmp_path / f"reader{epochs}_{steps}_{repeat}.json"
        m.fit(ds.repeat() if repeat else ds, epochs=epochs, steps_per_epoch=steps, verbose=0,
              callbacks=[ShardReaderCheckpoint(reader, path, every=2)])
        return load_state(path)

    state = fit(2, 3)
    assert (state["epoch"], state["batches"]) == (0, 6)
    state = fit(8, 3)  # seven Keras epochs of 3 finish the reader's 21 batches, the eighth reads 3 more
    assert (state["epoch"], state["batches"]) == (1, 3)
    state = fit(7, 4)  # Keras cuts its sixth epoch to 1 batch where the pass ends; 4 more
    assert (state["epoch"], state["batches"]) == (1, 4)
    state = fit(6, 4, repeat=True)  # 24 batches of one endless iterator: the pass turns over inside
    assert (state["epoch"], state["batches"]) == (1, 3)


def test_decode_processes_matter_inside_an_epoch_only(awkward_shards, uninterrupted):
    """processes=N splits an epoch into N streams: a state saved inside an epoch under 2 is
    refused by a reader with none chosen (processes=0; also a state of shardpack 0.2.0,
    which recorded ``processes``), and resumed under 2 by one left to "auto", the default,
    whichever number it would pick here; one saved at an epoch boundary starts that epoch
    under any number."""
    from reader.state import make_state

    two = ShardReader(awkward_shards, seed=7, **{**OPTIONS, "processes": 2})
    inside = make_state(two, epoch=0, batches=4)
    assert inside["streams"] == 2
    legacy = {k: v for k, v in inside.items() if k != "streams"} | {"processes": 2}
    for state in (inside, legacy):
        with pytest.raises(ValueError, match="2 batch stream.*processes=2"):
            ShardReader(awkward_shards, **OPTIONS).load_state_dict(state)
    auto = ShardReader(awkward_shards, **{**OPTIONS, "processes": "auto"})  # 0 below 8 CPUs
    auto.load_state_dict(inside)
    try:
        assert auto.processes == 2
        assert _ids(auto) == _ids(two)[4:]
    finally:
        auto.close()
        two.close()
    boundary = make_state(two, epoch=0, batches=len(two))
    one = ShardReader(awkward_shards, **OPTIONS)
    one.load_state_dict(boundary)
    assert one.processes == 0
    assert _ids(one) == uninterrupted[1]


# ---- resume after samples that failed to decode --------------------------------------------


@pytest.fixture(scope="module")
def failing_shards(tmp_path_factory):
    """400 samples in 5 tars, 9 of them broken: several in the first batches, two side by side."""
    return write_id_tars(tmp_path_factory.mktemp("failing"), 400, {3, 11, 12, 40, 97, 150, 151, 260, 333}, 80)


@pytest.fixture(scope="module")
def blocky_shards(tmp_path_factory):
    """120 samples in 3 tars with two runs of broken ones, longer than a batch of 4: a
    decode process loses whole batches and ends before its turns do."""
    return write_id_tars(tmp_path_factory.mktemp("blocky"), 120, set(range(20, 30)) | set(range(70, 76)), 40)


FAILING = dict(num_classes=3, image_size=16, batch_size=16, shuffle_buffer=64, on_error="ignore",
               num_workers=2, seed=3)


@pytest.mark.parametrize("processes", [0, 2])
@pytest.mark.parametrize("shuffle,k", [(False, 1), (False, 7), (True, 3), (True, 9), (True, 16)])
def test_resume_after_failed_samples_sees_the_batches_that_came_next(failing_shards, processes, shuffle, k):
    """Samples that failed before the saved position are skipped besides the whole batches:
    without that, each one shifted the rest of the epoch by one sample (a sample seen twice)."""
    r = ShardReader(failing_shards, processes=processes, shuffle=shuffle, **FAILING)
    try:
        uninterrupted = _ids(r)
        assert r.policy.skipped_samples == 9 and sum(map(len, uninterrupted)) == 391
        r.set_epoch(0)
        it = iter(r)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(r.state_dict()))
        del it
    finally:
        r.close()
    assert state["batches"] == k
    if not shuffle or k == 16:  # samples 3, 11 and 12 come first, or most have failed by then
        assert any(state["failed_before"])
    restarted = ShardReader(failing_shards, processes=processes, shuffle=shuffle, **FAILING)
    try:
        restarted.load_state_dict(state)
        assert _ids(restarted) == uninterrupted[k:]
    finally:
        restarted.close()


def test_failed_before_is_kept_until_the_epoch_is_read_and_validated(failing_shards):
    state = _state_after(ShardReader(failing_shards, **FAILING), 5)
    loaded = ShardReader(failing_shards, **FAILING)
    loaded.load_state_dict(state)
    assert loaded.state_dict() == state  # saved again before reading: the same position
    loaded.set_epoch(1)  # another epoch: the position, failures included, is dropped
    assert "failed_before" not in loaded.state_dict()
    whole = ShardReader(failing_shards, **FAILING)
    whole.set_epoch(1)
    assert _ids(loaded) == _ids(whole)
    for bad in ([-1], "2", [1.5]):
        with pytest.raises(ValueError, match="failed_before"):
            ShardReader(failing_shards, **FAILING).load_state_dict(state | {"failed_before": bad})


def test_a_state_counted_behind_the_reader_names_the_failures_before_its_own_position(failing_shards):
    """tf.data reads ahead, so ShardReaderCheckpoint saves positions the reader passed long
    ago, even after it finished the epoch and began the next: the failed samples counted
    are those before that position, not before the reader's."""
    from reader.state import make_state

    ahead = ShardReader(failing_shards, **FAILING)
    list(ahead)  # all of epoch 0
    next(iter(ahead))  # and the start of epoch 1
    for k in (2, 9, 20):
        behind = _state_after(ShardReader(failing_shards, **FAILING), k)
        assert make_state(ahead, epoch=0, batches=k) == behind


def test_a_state_counted_behind_the_reader_inside_a_repeat_is_the_one_saved_there(blocky_shards):
    """Also where the epoch came short and was filled up with its first batches: the
    position is the one in that repeat."""
    from reader.state import make_state

    options = dict(FAILING, batch_size=4)
    ahead = ShardReader(blocky_shards, **options)
    list(ahead)
    next(iter(ahead))
    lap = ahead._stream_logs[0].lap
    assert 0 < lap < len(ahead)
    for k in (lap - 1, lap, lap + 1, len(ahead) - 1):
        behind = _state_after(ShardReader(blocky_shards, **options), k)
        assert make_state(ahead, epoch=0, batches=k) == behind
        assert ("lap" in behind) == (k > lap)


def test_failed_samples_are_the_saving_ranks_own(failing_shards):
    """Each rank reads its own samples: rank 1 resumes exactly from its own state, and a
    state another rank saved moves it by whole batches only (as every rank did before)."""
    options = dict(FAILING, rank=1, world_size=2, shuffle=False)
    whole = _ids(ShardReader(failing_shards, **options))
    state = _state_after(ShardReader(failing_shards, **options), 4)
    assert any(state["failed_before"])
    own = ShardReader(failing_shards, **options)
    own.load_state_dict(state)
    assert _ids(own) == whole[4:]
    other = ShardReader(failing_shards, **options)
    other.load_state_dict(state | {"rank": 0})
    assert "failed_before" not in other.state_dict()


def _one_epoch(shards, options) -> tuple[list[list[int]], list[dict], int]:
    """A new reader's first epoch: each batch's sample ids, the state after it, and len()."""
    r = ShardReader(shards, **options)
    try:
        return (*batches_and_states(r), len(r))
    finally:
        r.close()


@pytest.mark.parametrize("processes,shuffle", [(0, True), (2, False), (3, False), (3, True)])
def test_resume_where_failed_samples_made_the_turns_of_decode_processes_uneven(blocky_shards, processes, shuffle):
    """A process whose stream lost batches ends early and the turns after it shift: the
    state records each stream's batches and whose turn is next (only then), and a resume
    sees the batches that came next, not some of them twice. The epoch, short of batches,
    is filled up with its first batches again; a state saved in that repeat resumes it."""
    options = dict(FAILING, batch_size=4, processes=processes, shuffle=shuffle)
    whole, states, length = _one_epoch(blocky_shards, options)
    # 104 samples left: batches lost, not just shortened, and made up by the first ones
    assert len(whole) == length
    lap = next(state["lap"] for state in states if "lap" in state)
    assert lap < length and whole[lap:] == whole[: length - lap]
    uneven = [k for k, state in enumerate(states, start=1) if "stream_batches" in state]
    assert uneven or processes in (0, 2)  # two processes here lose as many batches each
    for k in sorted({1, 5, lap, lap + 1, len(whole) - 1, *uneven[:1], *uneven[-1:]}):
        restarted = ShardReader(blocky_shards, **options)
        try:
            restarted.load_state_dict(states[k - 1])
            assert _ids(restarted) == whole[k:], k
        finally:
            restarted.close()


@pytest.fixture(scope="module")
def mostly_broken_shards(tmp_path_factory):
    """60 samples in 3 tars, 44 of them broken: an epoch of 4 batches of 4 where 15 are
    promised, filled up by repeating its first batches more than three times."""
    return write_id_tars(tmp_path_factory.mktemp("mostly_broken"), 60, set(range(10, 54)), 20)


@pytest.mark.parametrize("processes,shuffle", [(0, False), (0, True), (2, True)])
def test_a_reader_resumed_inside_the_repeat_saves_the_states_the_whole_run_saved(
        mostly_broken_shards, processes, shuffle):
    """A run resumed in the repeat that fills up a short epoch, at any repeat, saves at
    every later batch the state the uninterrupted run saved there: its lap, and the
    failures before the position within the repeat. (A resumed run logged the repeat from
    the resume point only, so after the repeat wrapped its states lost the lap, or their
    failed_before, and a second resume read other batches.)"""
    options = dict(FAILING, batch_size=4, processes=processes, shuffle=shuffle)
    whole, states, length = _one_epoch(mostly_broken_shards, options)
    lap = next(state["lap"] for state in states if "lap" in state)
    assert len(whole) == length == 15 and lap < 5 and whole[2 * lap:3 * lap] == whole[:lap]
    for k in (lap + 1, 2 * lap, 2 * lap + 1):
        resumed = ShardReader(mostly_broken_shards, **options)
        try:
            resumed.load_state_dict(states[k - 1])
            rest, later = batches_and_states(resumed)
        finally:
            resumed.close()
        assert rest == whole[k:], k
        assert later[:-1] == states[k:-1], k


@pytest.mark.parametrize("processes", [0, 2])
def test_the_repeat_of_an_abandoned_epoch_counts_nothing_in_the_next(mostly_broken_shards, processes):
    """Each epoch counts its 44 failures once, whatever another iteration of the reader
    does meanwhile: an epoch left inside its repeat, closed while the next one repeats
    (as tf.data finalises an abandoned iterator), made the next one count its repeat too."""
    import warnings

    r = ShardReader(mostly_broken_shards, **dict(FAILING, batch_size=4, shuffle=False, processes=processes,
                                                 on_error="warn"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            left = iter(r)
            for _ in range(6):  # inside epoch 0's repeat
                next(left)
            for n, _ in enumerate(r, start=1):
                if n == 10:  # epoch 1 is in its repeat
                    left.close()
        assert r.policy.skipped_samples == 88
        assert sum("skipped: sample" in str(w.message) for w in caught) == 88
    finally:
        r.close()


def test_a_loaded_state_is_what_state_dict_gives_until_the_epoch_is_read(failing_shards):
    """What this reader read before (the same epoch under another seed, or an epoch left
    early) says nothing about a loaded position."""
    state = _state_after(ShardReader(failing_shards, **FAILING), 12)
    reader = ShardReader(failing_shards, **dict(FAILING, seed=99))
    list(reader)  # all of epoch 0, another order
    left = iter(reader)
    next(left)  # epoch 1, left early
    reader.load_state_dict(state)
    assert reader.state_dict() == state


def test_an_early_starting_shuffle_resumes_and_its_states_are_told_apart(awkward_shards):
    """shuffle_initial changes the order: a mid-epoch state resumes exactly with the same
    value, and is refused by a reader without it; a state saved before the option existed
    (no such field) resumes a reader without it and is refused by one with it."""
    options = {**OPTIONS, "shuffle_initial": 40}
    whole = _ids(ShardReader(awkward_shards, seed=3, **options))
    assert whole != _ids(ShardReader(awkward_shards, seed=3, **OPTIONS))
    assert sorted(sum(whole, [])) == sorted(sum(_ids(ShardReader(awkward_shards, seed=3, **OPTIONS)), []))
    state = json.loads(json.dumps(_state_after(ShardReader(awkward_shards, seed=3, **options), 5)))
    assert state["version"] == 2  # shardpack before shuffle_initial refuses it, rather than resume it wrongly
    assert ShardReader(awkward_shards, seed=3, **OPTIONS).state_dict()["version"] == 1  # as before
    restarted = ShardReader(awkward_shards, **options)
    restarted.load_state_dict(state)
    assert _ids(restarted) == whole[5:]
    with pytest.raises(ValueError, match="shuffle_initial=40 but this reader has shuffle_initial=None"):
        ShardReader(awkward_shards, **OPTIONS).load_state_dict(state)
    old = ShardReader(awkward_shards, seed=3, **OPTIONS).state_dict()
    del old["shuffle_initial"]
    ShardReader(awkward_shards, **OPTIONS).load_state_dict(old)
    with pytest.raises(ValueError, match="shuffle_initial=None but this reader has shuffle_initial=40"):
        ShardReader(awkward_shards, **options).load_state_dict(old)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="shuffle_initial must be a whole number"):
            ShardReader(awkward_shards, **{**OPTIONS, "shuffle_initial": bad})
    # where it changes nothing (no shuffle; not below the buffer) it is dropped: the states
    # stay those of a reader without it, which earlier releases resume
    for idle in (dict(shuffle=False, shuffle_initial=40), dict(shuffle_initial=OPTIONS["shuffle_buffer"])):
        reader = ShardReader(awkward_shards, seed=3, **{**OPTIONS, **idle})
        assert reader.shuffle_initial is None and reader.state_dict()["version"] == 1


def test_the_keras_checkpoint_refuses_a_dataset_of_single_images(id_shards, tmp_path):
    """With batch_size=None Keras' steps are the user's own batches of single images, not
    the reader's: the callback saved "epoch 2" after one Keras epoch of 120 images."""
    pytest.importorskip("keras")
    from reader import image_dataset_from_shards
    from reader.state import ShardReaderCheckpoint

    ds = image_dataset_from_shards(id_shards[0], split="test", image_size=4, batch_size=None, verbose=False)
    with pytest.raises(ValueError, match="batch_size=None"):
        ShardReaderCheckpoint(ds.shard_reader, tmp_path / "reader.json")


_STRATEGY_RESUME = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from conftest import sample_ids
from reader import image_dataset_from_shards
from reader.state import ShardReaderCheckpoint, load_state

shards, path = sys.argv[1], sys.argv[2]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
SEEN = []

class Model(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(tf.reduce_mean(x, axis=(1, 2)))

    def train_step(self, data):
        SEEN.append(sorted(sample_ids(data[0].numpy())))
        return super().train_step(data)

def model():
    with strategy.scope():
        m = Model()
        m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    return m

def dataset():
    return image_dataset_from_shards(shards, split="test", image_size=4, batch_size=6, seed=1, verbose=False)

class Stop(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if len(SEEN) == 2 * 7:  # two replicas a step: 7 steps of 30 samples in batches of 6
            raise KeyboardInterrupt

ds = dataset()
model().fit(ds, epochs=2, verbose=0, callbacks=[ShardReaderCheckpoint(ds.shard_reader, path + ".full")])
full, SEEN[:] = list(SEEN), []
ds = dataset()
try:
    model().fit(ds, epochs=2, verbose=0, callbacks=[ShardReaderCheckpoint(ds.shard_reader, path, every=1), Stop()])
except KeyboardInterrupt:
    pass
SEEN.clear()
ds = dataset()
reader = ds.shard_reader
checkpoint = ShardReaderCheckpoint(reader, path, every=1)
state = load_state(path)
assert (state["epoch"], state["batches"]) == (1, 2), state
reader.load_state_dict(state)
m = model()
m.fit(ds.take(len(reader) - state["batches"]), initial_epoch=1, epochs=2, callbacks=[checkpoint], verbose=0)
assert SEEN == full[2 * 7:], (SEEN[:2], full[14:16])
print("resumed exactly")
"""


@pytest.mark.slow
def test_a_resume_under_a_distribution_strategy_trains_on_the_remaining_batches(id_shards, tmp_path):
    """Under a strategy Keras' fit takes a batch from a pass it drops (to build the model)
    before training: that pass used up the loaded position, and the resumed run trained on
    the next epoch from its start (none of its steps the uninterrupted run's). Two logical
    CPUs, MirroredStrategy, in a process of its own (devices are set before TensorFlow
    starts)."""
    import subprocess
    import sys

    pytest.importorskip("keras")
    script = tmp_path / "resume.py"
    script.write_text(_STRATEGY_RESUME)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])]),
               TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, str(script), str(id_shards[0]), str(tmp_path / "reader.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "resumed exactly" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_without_a_strategy_the_checkpoint_undoes_no_pass(awkward_shards, tmp_path):
    """Only under a distribution strategy does Keras look at a batch before training: a
    warm-up fit without the callback (transfer learning's first stage), or a peek with
    next(iter(ds)), then a checkpointed fit re-read epoch 0 and saved epoch 1, not 3."""
    keras = pytest.importorskip("keras")
    from reader import image_dataset_from_shards
    from reader.state import ShardReaderCheckpoint

    ds = image_dataset_from_shards(awkward_shards, split="train", image_size=(16, 16),
                                   batch_size=50, seed=1, verbose=False, num_workers=1)
    m = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(3)])
    m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(ds, epochs=2, verbose=0)
    path = tmp_path / "reader.json"
    m.fit(ds, epochs=1, verbose=0, callbacks=[ShardReaderCheckpoint(ds.shard_reader, path, every=5)])
    assert ds.shard_reader.epoch == 3 and (load_state(path)["epoch"], load_state(path)["batches"]) == (3, 0)
