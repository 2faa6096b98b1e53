"""Shuffle stages alone, on plain lists: invariants a user relies on."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from reader.shuffle import epoch_rng, interleave, shards_for_epoch, shuffle_buffer


@given(st.integers(0, 40), st.integers(0, 2**31), st.integers(0, 5))
def test_shards_for_epoch_is_a_permutation(n, seed, epoch):
    shards = list(range(n))
    order = shards_for_epoch(shards, epoch=epoch, seed=seed, shuffle=True)
    assert sorted(order) == shards
    assert order == shards_for_epoch(shards, epoch=epoch, seed=seed, shuffle=True)
    assert shards_for_epoch(shards, epoch=epoch, seed=seed, shuffle=False) == shards


def test_shard_order_changes_per_epoch_and_ranks_are_disjoint():
    shards = list(range(32))
    orders = {tuple(shards_for_epoch(shards, epoch=e, seed=0, shuffle=True)) for e in range(5)}
    assert len(orders) == 5
    parts = [shards_for_epoch(shards, epoch=1, seed=0, shuffle=True, rank=r, world_size=4) for r in range(4)]
    assert sorted(sum(parts, [])) == shards


@given(st.lists(st.integers(0, 30), max_size=8), st.integers(1, 5))
def test_interleave_keeps_everything_and_each_source_in_order(sizes, k):
    sources = [[(i, j) for j in range(n)] for i, n in enumerate(sizes)]
    out = list(interleave((iter(s) for s in sources), cycle_length=k))
    assert sorted(out) == sorted(sum(sources, []))
    for i, source in enumerate(sources):
        assert [x for x in out if x[0] == i] == source


def test_interleave_round_robin():
    out = list(interleave(iter([iter("aaa"), iter("bb"), iter("c")]), cycle_length=2))
    assert out == ["a", "b", "a", "b", "a", "c"]


@given(st.integers(0, 300), st.integers(0, 400), st.integers(0, 99))
def test_shuffle_buffer_is_a_permutation(n, size, seed):
    out = list(shuffle_buffer(range(n), rng=random.Random(seed), size=size))
    assert sorted(out) == list(range(n))


def test_shuffle_buffer_mixes_and_is_seeded():
    a = list(shuffle_buffer(range(1000), rng=epoch_rng(1, 0, "s"), size=100))
    b = list(shuffle_buffer(range(1000), rng=epoch_rng(1, 0, "s"), size=100))
    c = list(shuffle_buffer(range(1000), rng=epoch_rng(1, 1, "s"), size=100))
    assert a == b and a != c and a != list(range(1000))


def test_shuffle_buffer_byte_budget():
    items = [bytes(100)] * 50 + [bytes(1)] * 50
    pulled = 0

    def source():
        nonlocal pulled
        for item in items:
            pulled += 1
            yield item

    stream = shuffle_buffer(source(), rng=random.Random(0), size=1000, max_bytes=1000, nbytes=len)
    first = next(stream)
    assert pulled == 11  # 1,000 bytes = 10 items of 100 bytes held, the 11th pushes one out
    out = [first, *stream]
    assert sorted(out) == sorted(items)


def _counted(n: int, pulls: list[int]):
    """0..n-1, recording in ``pulls`` how many items had been taken at each yield."""
    for i in range(n):
        pulls.append(i)
        yield i


@given(st.integers(0, 300), st.integers(2, 120), st.integers(2, 150), st.integers(0, 2**31),
       st.one_of(st.none(), st.integers(1, 400)))
def test_a_buffer_that_starts_early_still_yields_every_item_once(n, size, initial, seed, max_bytes):
    """shuffle_initial: yielding starts after ``initial`` items, two taken per one yielded
    until the buffer is full, and nothing is lost or doubled, with or without a byte cap."""
    out = list(shuffle_buffer(range(n), rng=random.Random(seed), size=size, initial=initial,
                              max_bytes=max_bytes, nbytes=(lambda x: x % 7) if max_bytes else None))
    assert sorted(out) == list(range(n))


def test_a_buffer_that_starts_early_yields_after_initial_items_then_grows():
    pulls: list[int] = []
    taken_at = []
    for _ in shuffle_buffer(_counted(1000, pulls), rng=random.Random(0), size=100, initial=10):
        taken_at.append(len(pulls))
    # the first after 10 items, then one for every two while the buffer grows (it holds 99
    # after the 91st, at 190 items), the 191st fills it, then one for each
    assert taken_at[:4] == [10, 12, 14, 16]
    assert taken_at[90] == 190 and taken_at[91:95] == [192, 193, 194, 195]
    assert len(taken_at) == 1000
    pulls.clear()
    whole = []
    for _ in shuffle_buffer(_counted(1000, pulls), rng=random.Random(0), size=100):
        whole.append(len(pulls))
    assert whole[0] == 101  # the whole buffer first (the default)


def test_an_initial_at_or_above_the_buffer_is_the_default_order():
    """None, ``size`` and more give the very same stream: a state saved without the option
    resumes the same order."""
    def run(initial):
        return list(shuffle_buffer(range(500), rng=random.Random(3), size=64, initial=initial))
    assert run(None) == run(64) == run(1000)
    assert run(10) != run(None) and sorted(run(10)) == list(range(500))


def test_an_early_start_keeps_the_byte_cap_and_ends_once_the_buffer_is_full():
    """With a byte cap the buffer is "full" at the cap: from then on one item in, one out,
    never the two-in-one-out of the ramp again, and the bytes held (measured from outside)
    stay near the cap. Item sizes differ, so a size list out of step with the buffer shows."""
    for seed in range(30):
        sizes = {i: random.Random(seed + 1000 + i).choice((10, 190)) for i in range(600)}
        pulls: list[int] = []
        out: set[int] = set()
        held_after = []
        stream = shuffle_buffer(_counted(600, pulls), rng=random.Random(seed), size=1000,
                                max_bytes=2000, nbytes=sizes.__getitem__, initial=3)
        for x in stream:
            out.add(x)
            if 100 <= len(pulls) < 600:  # after the ramp, before the final flush
                held_after.append(sum(sizes[i] for i in pulls if i not in out))
        assert out == set(range(600))
        assert min(held_after) >= 2000 - 190, seed  # one in, one out: it never drains again


def test_taking_a_random_item_keeps_the_sizes_beside_their_items():
    from reader.shuffle import _take_random

    buffer, sizes = list("abcdef"), [1, 2, 3, 4, 5, 6]
    rng = random.Random(0)
    while buffer:
        item, size = _take_random(buffer, sizes, rng)
        assert size == "abcdef".index(item) + 1 and len(sizes) == len(buffer)
        assert all(s == "abcdef".index(b) + 1 for b, s in zip(buffer, sizes, strict=True))
    assert _take_random(["x"], [], rng) == ("x", 0)
