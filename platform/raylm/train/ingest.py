"""Moving the training blocks to a rank with Ray Data, in the order `raylm.train.order` decides.

Each rank builds its own small pipeline: `ray.data.range` numbers its remaining samples, Ray Data tasks turn each
range of numbers into stream positions, block ids and tokens (reading the shards' Parquet files, a window of them
cached per process), and `iter_torch_batches` prefetches them into the training loop, in order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raylm.data.shards import TOKEN_COLUMN, read_manifest, shard_files
from raylm.storage import Location
from raylm.train.order import WINDOW_SHARDS, DataOrder, rank_positions

SAMPLES_PER_TASK = 256
ROW_COLUMN = "row"
"""Each block travels with its id, so the loop can account for exactly what it trained on (`DataLedger`)."""


class ShardCache:
    """The shards a process has read, as (rows, block_len) arrays; the least recently used go first."""

    def __init__(self, files: list[Location], capacity: int):
        self.files = files
        self.capacity = capacity
        self.loaded: OrderedDict[int, np.ndarray] = OrderedDict()

    def blocks(self, shard: int) -> np.ndarray:
        if shard in self.loaded:
            self.loaded.move_to_end(shard)
            return self.loaded[shard]
        file = self.files[shard]
        column = pq.read_table(file.path, columns=[TOKEN_COLUMN], filesystem=file.fs).column(TOKEN_COLUMN)
        array = column.combine_chunks()
        self.loaded[shard] = array.flatten().to_numpy().reshape(len(array), -1)
        while len(self.loaded) > self.capacity:
            self.loaded.popitem(last=False)
        return self.loaded[shard]


_caches: dict[str, ShardCache] = {}


def fetch_blocks(batch: dict[str, np.ndarray], plan: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data task: a rank's sample numbers -> the token blocks it trains on at those samples."""
    order = DataOrder(tuple(plan["shard_rows"]), plan["seed"], plan["window_shards"])
    positions = rank_positions(batch["id"], plan["start_step"], plan["global_batch"], plan["world_size"], plan["rank"])
    rows = order.rows_at(positions)
    cache = _caches.get(plan["data_dir"])
    if cache is None:
        manifest = read_manifest(plan["data_dir"])
        files = shard_files(plan["data_dir"], manifest, "train")
        cache = _caches[plan["data_dir"]] = ShardCache(files, capacity=2 * plan["window_shards"])
    shards, offsets = order.shard_of(rows)
    blocks = np.stack([cache.blocks(s)[o] for s, o in zip(shards, offsets, strict=True)])
    return {TOKEN_COLUMN: blocks, ROW_COLUMN: rows}


def rank_dataset(
    data_dir: str, seed: int, global_batch: int, world_size: int, rank: int, start_step: int, max_steps: int
):
    """The Ray Dataset of one rank's training blocks from `start_step` to `max_steps`, in order."""
    import ray.data

    manifest = read_manifest(data_dir)
    plan = {
        "data_dir": data_dir,
        "shard_rows": manifest.shard_rows("train"),
        "seed": seed,
        "window_shards": WINDOW_SHARDS,
        "start_step": start_step,
        "global_batch": global_batch,
        "world_size": world_size,
        "rank": rank,
    }
    samples = (max_steps - start_step) * (global_batch // world_size)
    dataset = ray.data.range(samples, override_num_blocks=max(1, samples // SAMPLES_PER_TASK)).map_batches(
        fetch_blocks, fn_kwargs={"plan": plan}, batch_size=SAMPLES_PER_TASK, batch_format="numpy"
    )
    dataset.context.execution_options.preserve_order = True
    return dataset


@dataclass
class DataLedger:
    """A running SHA-256 over the block ids a rank trained on, step by step, kept in every checkpoint. A resumed run
    that skipped or repeated a block ends with another digest than the uninterrupted run it continues."""

    digest: str = ""
    samples: int = 0

    def add(self, rows: np.ndarray) -> None:
        chained = bytes.fromhex(self.digest) + np.asarray(rows, dtype="<i8").tobytes()
        self.digest = hashlib.sha256(chained).hexdigest()
        self.samples += len(rows)

    def state(self) -> dict[str, Any]:
        return {"digest": self.digest, "samples": self.samples}


def expected_ledger(data_dir: str, seed: int, global_batch: int, world_size: int, rank: int, steps: int) -> DataLedger:
    """The ledger of a rank that trained on exactly its share of steps `1..steps`, computed from the order alone."""
    manifest = read_manifest(data_dir)
    order = DataOrder(tuple(manifest.shard_rows("train")), seed, WINDOW_SHARDS)
    per_rank = global_batch // world_size
    ledger = DataLedger()
    for step in range(steps):
        ledger.add(order.rows_at(rank_positions(np.arange(per_rank), step, global_batch, world_size, rank)))
    return ledger
