"""Which training blocks each rank reads, and in which order: raylm's own, deterministic and resumable.

Ray Train's `streaming_split` hands blocks out dynamically, drops rows to even out workers and cannot seek, so a
resumed run could neither continue where it stopped nor match a run with another worker count. Instead:

- The training stream is the concatenation of epochs. Epoch `e` visits the shards in a permutation seeded by
  `(seed, e)`, a window of `window_shards` shards at a time, and the blocks of each window in a permutation seeded
  by `(seed, e, window)`. With few shards (all of them in one window) that is a full shuffle; with many, memory
  and reading stay bounded by the window.
- Global batch `s` is stream positions `[s*B, (s+1)*B)`; rank `r` of `W` takes the slice
  `[s*B + r*B/W, s*B + (r+1)*B/W)`: disjoint, equal, and the same blocks in the same steps whatever `W` is.
- Resuming at step `s` starts at position `s*B`: no block skipped, none repeated.

Everything here is a pure function of the manifest and the seed; `raylm.train.ingest` moves the blocks with Ray
Data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

WINDOW_SHARDS = 16


@dataclass(frozen=True)
class DataOrder:
    shard_rows: tuple[int, ...]
    seed: int
    window_shards: int = WINDOW_SHARDS

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)

    @functools.lru_cache(maxsize=4)  # noqa: B019  (a handful of epochs, on a frozen object that lives for the run)
    def _windows(self, epoch: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """The epoch's windows (shard ids each) and the stream offset where each window starts."""
        shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_rows))
        windows = tuple(shards[i : i + self.window_shards] for i in range(0, len(shards), self.window_shards))
        sizes = [sum(self.shard_rows[s] for s in window) for window in windows]
        return windows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @functools.lru_cache(maxsize=8)  # noqa: B019
    def window_rows(self, epoch: int, window: int) -> np.ndarray:
        """Global row ids of one window, in their order for this epoch."""
        shards = self._windows(epoch)[0][window]
        rows = np.concatenate([np.arange(self._offsets[s], self._offsets[s + 1]) for s in shards])
        return rows[np.random.default_rng([self.seed, epoch, window + 1]).permutation(len(rows))]

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Global row ids at stream positions (which run on past the first epoch into the next ones)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        epochs, within = np.divmod(positions, self.rows)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            starts = self._windows(int(epoch))[1]
            windows = np.searchsorted(starts, within[chosen], side="right") - 1
            result = np.empty(int(chosen.sum()), dtype=np.int64)
            for window in np.unique(windows):
                here = windows == window
                result[here] = self.window_rows(int(epoch), int(window))[within[chosen][here] - starts[window]]
            out[chosen] = result
        return out

    def shard_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, row within the shard) of global row ids."""
        shards = np.searchsorted(self._offsets, rows, side="right") - 1
        return shards, rows - self._offsets[shards]


def rank_positions(samples: np.ndarray, start_step: int, global_batch: int, world_size: int, rank: int) -> np.ndarray:
    """Stream positions of a rank's samples, counted from `start_step` (its `k`-th sample is in step
    `start_step + k // (B/W)`, at slot `k % (B/W)` of its slice of that global batch)."""
    per_rank = global_batch // world_size
    steps, slots = np.divmod(np.asarray(samples, dtype=np.int64), per_rank)
    return (start_step + steps) * global_batch + rank * per_rank + slots
