"""The training data order: every block once per epoch, disjoint ranks, exact resume, seeded."""

import numpy as np

from raylm.train.order import DataOrder, rank_positions

SHARDS = (64, 64, 64, 64, 64, 37)  # 357 blocks, the last shard short


def test_every_epoch_visits_every_block_once_in_a_new_order():
    order = DataOrder(SHARDS, seed=3, window_shards=2)
    rows = order.rows
    first, second = order.rows_at(np.arange(rows)), order.rows_at(np.arange(rows, 2 * rows))
    assert sorted(first.tolist()) == list(range(rows)) == sorted(second.tolist())
    assert not np.array_equal(first, second)
    assert np.array_equal(first, DataOrder(SHARDS, seed=3, window_shards=2).rows_at(np.arange(rows)))
    assert not np.array_equal(first, DataOrder(SHARDS, seed=4, window_shards=2).rows_at(np.arange(rows)))


def test_a_window_reads_only_its_shards():
    order = DataOrder(SHARDS, seed=0, window_shards=2)
    first_window = order.rows_at(np.arange(128))  # the first window holds two shards of 64 blocks
    shards, _ = order.shard_of(first_window)
    assert len(set(shards.tolist())) <= 2


def test_ranks_take_disjoint_equal_slices_of_each_global_batch():
    order = DataOrder(SHARDS, seed=1)
    batch, steps = 8, 100  # more than two epochs
    single = order.rows_at(rank_positions(np.arange(steps * batch), 0, batch, 1, 0)).reshape(steps, batch)
    for world in (2, 4):
        per = batch // world
        parts = [
            order.rows_at(rank_positions(np.arange(steps * per), 0, batch, world, rank)).reshape(steps, per)
            for rank in range(world)
        ]
        assert np.array_equal(np.concatenate(parts, axis=1), single), "same blocks, same steps, whatever W"


def test_resuming_at_a_step_continues_the_same_stream():
    order = DataOrder(SHARDS, seed=2)
    batch, world, rank = 8, 2, 1
    whole = order.rows_at(rank_positions(np.arange(60 * 4), 0, batch, world, rank))
    resumed = order.rows_at(rank_positions(np.arange(23 * 4), 37, batch, world, rank))
    assert np.array_equal(resumed, whole[37 * 4 :])
