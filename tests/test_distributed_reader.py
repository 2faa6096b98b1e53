"""Reading one split on several ranks: equal batch counts, disjoint shards, full coverage."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import batches_and_states, sample_ids, write_id_tars
from hypothesis import given, settings
from hypothesis import strategies as st

import reader.samples
from reader import ShardReader
from reader.distributed import (
    DEFAULT_DISTRIBUTED_SEED,
    Piece,
    batch_count,
    detect_rank,
    rank_pieces,
    rank_samples,
    take_range,
    worker_pieces,
)

TRAIN = 1001  # awkward_shards: 7 shards, 6 x 150 + 101


def _samples(pieces):
    return [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]


# ---- the plan, as pure data ----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    world_size=st.integers(1, 7),
    uneven=st.sampled_from(["pad", "drop"]),
    perm_seed=st.integers(0, 10**6),
)
def test_plan_is_balanced_and_covers_every_sample_once(counts, world_size, uneven, perm_seed):
    import random

    order = list(range(len(counts)))
    random.Random(perm_seed).shuffle(order)
    total = sum(counts)
    plans = [
        rank_pieces(counts, order, rank=r, world_size=world_size, uneven=uneven)
        for r in range(world_size)
    ]
    per_rank = rank_samples(total, world_size, uneven)
    assert [sum(len(p) for p in plan) for plan in plans] == [per_rank] * world_size
    seen = Counter(s for plan in plans for s in _samples(plan))
    universe = {(s, i) for s in range(len(counts)) for i in range(counts[s])}
    assert set(seen) <= universe
    if uneven == "pad":
        assert set(seen) == universe  # nothing lost
        assert sum(seen.values()) - total == per_rank * world_size - total < world_size
        for plan in plans:  # a rank repeats at most one sample, and only its own first
            dup = [s for s in _samples(plan) if seen[s] > 1]
            assert len(dup) <= 2
    else:
        assert max(seen.values(), default=1) == 1  # nothing twice
        assert total - len(seen) == total % world_size
    # at most world_size - 1 shards are read by more than one rank
    readers = Counter(p.shard for plan in plans for p in {q.shard: q for q in plan}.values())
    extra = sum(n - 1 for n in readers.values())
    assert extra <= world_size - 1 + (world_size if total < world_size else 0)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_equal_shards_are_dealt_whole_and_disjoint(world_size):
    counts = [150] * 8
    order = [3, 1, 7, 0, 5, 2, 6, 4]
    plans = [rank_pieces(counts, order, rank=r, world_size=world_size) for r in range(world_size)]
    shards = [[p.shard for p in plan] for plan in plans]
    assert all(p == Piece(p.shard, 0, 150) for plan in plans for p in plan)  # whole shards
    assert sorted(s for part in shards for s in part) == list(range(8))  # disjoint, complete
    for part in shards:  # each rank reads its shards in the epoch's order
        assert part == sorted(part, key=order.index)


def test_fewer_shards_than_ranks_split_samples_contiguously():
    plans = [rank_pieces([10], [0], rank=r, world_size=4) for r in range(4)]
    # 10 = 3 + 3 + 2 + 2: ranks 2 and 3 repeat their own first sample
    assert plans == [
        [Piece(0, 0, 3)],
        [Piece(0, 3, 6)],
        [Piece(0, 6, 8), Piece(0, 6, 7)],
        [Piece(0, 8, 10), Piece(0, 8, 9)],
    ]
    drops = [rank_pieces([10], [0], rank=r, world_size=4, uneven="drop") for r in range(4)]
    assert drops == [[Piece(0, 0, 2)], [Piece(0, 2, 4)], [Piece(0, 4, 6)], [Piece(0, 6, 8)]]
    # fewer samples than ranks: every rank still gets one (borrowed) sample with "pad"
    tiny = [rank_pieces([2], [0], rank=r, world_size=3) for r in range(3)]
    assert [sum(len(p) for p in plan) for plan in tiny] == [1, 1, 1]
    assert [rank_pieces([2], [0], rank=r, world_size=3, uneven="drop") for r in range(3)] == [[]] * 3


@pytest.mark.parametrize("drop_remainder", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_workers_split_a_rank_into_whole_batches(workers, drop_remainder):
    pieces = [Piece(4, 0, 150), Piece(1, 20, 121), Piece(6, 0, 12)]  # 263 samples
    size = 16
    shares = [
        worker_pieces(pieces, worker=w, num_workers=workers, batch_size=size, drop_remainder=drop_remainder)
        for w in range(workers)
    ]
    batches = batch_count(263, size, drop_remainder)
    made = [batch_count(sum(len(p) for p in s), size, drop_remainder) for s in shares]
    assert made == [len(range(w, batches, workers)) for w in range(workers)]
    joined = [s for share in shares for s in _samples(share)]
    used = batches * size if drop_remainder else 263
    assert joined == _samples(pieces)[:used]  # contiguous runs, in order, nothing twice
    assert take_range(pieces, 0, 263) == pieces


@pytest.mark.parametrize("drop_remainder", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_strided_workers_give_the_ranks_order_batch_by_batch(workers, drop_remainder):
    """strided (shuffle=False): worker w decodes batches w, w + K, ... of the rank's own
    order, so a loader taking one batch from each in turn yields that order exactly."""
    pieces = [Piece(4, 0, 150), Piece(1, 20, 121), Piece(6, 0, 12)]  # 263 samples
    size = 16
    shares = [_samples(worker_pieces(pieces, worker=w, num_workers=workers, batch_size=size,
                                     drop_remainder=drop_remainder, strided=True))
              for w in range(workers)]
    contiguous = [sum(len(p) for p in worker_pieces(pieces, worker=w, num_workers=workers,
                                                    batch_size=size, drop_remainder=drop_remainder))
                  for w in range(workers)]
    assert [len(s) for s in shares] == contiguous  # the same counts as the contiguous split
    batches = [share[i : i + size] for share in shares for i in range(0, len(share), size)]
    in_turn = [b for k in range(max(len(s) for s in shares) // size + 1) for b in
               (share[k * size : (k + 1) * size] for share in shares) if b]
    used = batch_count(263, size, drop_remainder) * size if drop_remainder else 263
    assert [x for b in in_turn for x in b] == _samples(pieces)[:used] and len(batches) == len(in_turn)


# ---- real shards, real reads ----------------------------------------------------------


def _read_epoch(r: ShardReader) -> tuple[int, list[int]]:
    ids, n = [], 0
    for x, _y in r:
        ids += sample_ids(x)
        n += 1
    return n, ids


@pytest.mark.parametrize(
    "world_size,uneven", [(1, "pad"), (2, "pad"), (3, "pad"), (4, "pad"), (3, "drop"), (4, "drop")]
)
def test_every_rank_yields_len_batches_and_ranks_cover_the_split(awkward_shards, world_size, uneven):
    readers = [
        ShardReader(awkward_shards, split="train", image_size=16, batch_size=64, rank=r,
                    world_size=world_size, uneven=uneven, num_workers=1)
        for r in range(world_size)
    ]
    assert len({len(r) for r in readers}) == 1
    assert len({r.seed for r in readers}) == 1
    for _epoch in range(2 if world_size == 2 else 1):
        counts, seen = [], Counter()
        for r in readers:
            n, ids = _read_epoch(r)
            assert n == len(r)
            counts.append(len(ids))
            seen.update(ids)
        assert counts == [rank_samples(TRAIN, world_size, uneven)] * world_size
        if uneven == "pad":
            assert set(seen) == set(range(TRAIN))
            assert sum(seen.values()) - TRAIN == counts[0] * world_size - TRAIN
        else:
            assert max(seen.values()) == 1 and len(seen) == TRAIN - TRAIN % world_size


def test_ranks_open_only_their_own_shards(awkward_shards, monkeypatch):
    opened: list[str] = []
    real = reader.samples.open_shard

    def spy(url, **kw):
        opened.append(url.rsplit("/", 1)[-1])
        return real(url, **kw)

    monkeypatch.setattr(reader.samples, "open_shard", spy)
    per_rank = []
    for rank in range(3):
        opened.clear()
        r = ShardReader(awkward_shards, split="train", image_size=16, batch_size=100,
                        rank=rank, world_size=3, seed=5, num_workers=1)
        _read_epoch(r)
        per_rank.append(set(opened))
        assert set(opened) == {f"train-{p.shard:06d}.tar" for p in r.epoch_pieces(0)}
    # 7 shards over 3 ranks: every shard is read, and at most 2 shards by two ranks
    assert set().union(*per_rank) == {f"train-{i:06d}.tar" for i in range(7)}
    assert sum(len(s) for s in per_rank) <= 7 + 2


def test_one_shard_four_ranks(awkward_shards):
    seen, lens = Counter(), set()
    for rank in range(4):
        r = ShardReader(awkward_shards, split="small", image_size=16, batch_size=2, rank=rank,
                        world_size=4, shuffle=False, num_workers=1)
        n, ids = _read_epoch(r)
        lens.add((len(r), n, len(ids)))
        seen.update(ids)
    assert lens == {(2, 2, 3)}  # 10 samples: 3 per rank, ranks 2 and 3 repeat one
    assert len(seen) == 10 and sum(seen.values()) == 12


def test_class_subset_is_balanced_too(awkward_shards):
    seen = Counter()
    for rank in range(3):
        r = ShardReader(awkward_shards, split="train", image_size=16, batch_size=50, rank=rank,
                        world_size=3, class_names=["triangle", "circle"], num_workers=1)
        n, ids = _read_epoch(r)
        assert n == len(r) and len(ids) == 223  # 667 samples of the two classes
        seen.update(ids)
    assert len(seen) == 667


# ---- finding rank and world size -------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_rank_from_torchrun_env(awkward_shards, clean_env):
    clean_env.setenv("RANK", "2")
    clean_env.setenv("WORLD_SIZE", "3")
    clean_env.setenv("LOCAL_RANK", "0")  # rank on this machine: not the global rank
    r = ShardReader(awkward_shards, split="train", image_size=16)
    assert (r.rank, r.world_size, r.seed) == (2, 3, DEFAULT_DISTRIBUTED_SEED)
    assert len(r) == batch_count(334, 32, False)
    explicit = ShardReader(awkward_shards, split="train", rank=0, world_size=1)
    assert (explicit.rank, explicit.world_size) == (0, 1)


def test_local_rank_alone_is_not_distributed(clean_env):
    clean_env.setenv("LOCAL_RANK", "1")
    assert detect_rank() == (0, 1)
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        detect_rank()


def test_rank_from_tf_config_and_input_context(clean_env):
    cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    clean_env.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert detect_rank() == (2, 3)
    clean_env.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "evaluator", "index": 0}}))
    assert detect_rank() == (0, 1)

    class Context:  # duck-typed tf.distribute.InputContext
        input_pipeline_id, num_input_pipelines = 1, 4

    assert detect_rank(Context()) == (1, 4)


def test_bad_rank_options(awkward_shards, clean_env):
    with pytest.raises(ValueError, match="both"):
        ShardReader(awkward_shards, split="train", rank=1)
    with pytest.raises(ValueError, match="rank"):
        ShardReader(awkward_shards, split="train", rank=3, world_size=3)
    with pytest.raises(ValueError, match="uneven"):
        ShardReader(awkward_shards, split="train", rank=0, world_size=2, uneven="wrap")


def test_tf_dataset_on_a_rank_has_the_rank_cardinality_and_no_auto_shard(awkward_shards):
    tf = pytest.importorskip("tensorflow")
    from reader import image_dataset_from_shards

    ds = image_dataset_from_shards(awkward_shards, split="train", image_size=(8, 8), batch_size=None,
                                   rank=1, world_size=3, seed=0)
    reader = ds.shard_reader
    assert int(ds.cardinality()) == reader.rank_samples
    assert sum(1 for _ in ds) == reader.rank_samples
    policy = ds.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.OFF


@pytest.mark.parametrize("processes", [0, 2])
def test_a_rank_that_loses_samples_still_yields_as_many_batches_as_the_others(tmp_path, processes):
    """DDP waits at every step for every rank: a rank whose epoch came short (samples that
    failed to decode) hung the job at the epoch's end. It fills up its epoch with its own
    first batches, as a rank short by a sample under uneven="pad" repeats its own."""
    url = write_id_tars(tmp_path, 64, {1, 2, 3, 4, 5, 6}, 16)  # 6 broken in the first shard
    epochs = []
    for rank in range(2):
        r = ShardReader(url, num_classes=3, image_size=4, batch_size=4, rank=rank, world_size=2,
                        on_error="ignore", shuffle=False, processes=processes)
        try:
            epochs.append([sample_ids(x) for x, _ in r])
        finally:
            r.close()
    assert [len(batches) for batches in epochs] == [len(r)] * 2 == [8, 8]
    if not processes:  # rank 0 lost a batch and repeated one (processes shorten one each)
        assert sum(map(len, epochs[0])) + sum(map(len, epochs[1])) > 64 - 6
    for batches in epochs:  # the repeat is the rank's own first batches; nothing else twice
        seen = [i for ids in batches for i in ids]
        assert not {1, 2, 3, 4, 5, 6} & set(seen)
        first = next((k for k in range(1, len(batches)) if batches[k] == batches[0]), len(batches))
        assert batches[first:] == batches[: len(batches) - first]
        assert len(set(seen[: sum(map(len, batches[:first]))])) == sum(map(len, batches[:first]))


@pytest.mark.parametrize("processes", [0, 2])
def test_a_rank_resumed_from_another_ranks_state_keeps_the_length(tmp_path, processes):
    """One saved state serves every rank, which skips whole batches: where that skipped all
    of a rank's readable samples unseen, its epoch ended there (the repeat, counted from
    the skip, found nothing) and the ranks' lengths parted (a DDP hang). The states that
    rank then saves resume exactly (their lap_length says how long its repeat is)."""
    url = write_id_tars(tmp_path, 96, set(range(60, 96)), 48)  # rank 1 reads 48..95: 3 batches of 12
    options = dict(num_classes=3, image_size=4, batch_size=4, on_error="ignore", shuffle=False,
                   world_size=2, processes=processes)
    r0 = ShardReader(url, rank=0, **options)
    try:
        states = [r0.state_dict() for _ in r0]
    finally:
        r0.close()
    for k in (2, 4, 8):
        r1 = ShardReader(url, rank=1, **options)
        try:
            r1.load_state_dict(states[k - 1])
            assert sum(1 for _ in r1) == len(r0) - k, k
        finally:
            r1.close()
    # and the states rank 1 then saves itself resume exactly on rank 1: its repeat is as
    # long as its own epoch (3 batches), not as the count it came to from rank 0's skip
    r1 = ShardReader(url, rank=1, **options)
    try:
        r1.load_state_dict(states[3])  # skips 16 samples unseen: 12 good ones, 4 of them
        rest, own = batches_and_states(r1)
    finally:
        r1.close()
    assert any(state.get("lap_length") for state in own)
    for j in range(1, len(rest)):
        again = ShardReader(url, rank=1, **options)
        try:
            again.load_state_dict(own[j - 1])
            assert [sample_ids(x) for x, _ in again] == rest[j:], j
        finally:
            again.close()
