"""Tokenized shards: Parquet files with one fixed-width `input_ids` column, one directory per split, and
`manifest.json` (written last: shards without a manifest are an unfinished prepare and are never read). The data
directory may be on any pyarrow filesystem (`raylm.storage.Location`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, PrivateAttr

from raylm.digests import fingerprint
from raylm.errors import RunError
from raylm.storage import Location, read_json

MANIFEST = "manifest.json"


class NoShards(RunError):
    """The run has no prepared shards to train on."""


TOKEN_COLUMN = "input_ids"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Buffers blocks and writes `part-00000.parquet`, `part-00001.parquet`, ... of `rows_per_shard` rows."""

    def __init__(self, directory: Location, block_len: int, dtype: np.dtype, rows_per_shard: int):
        self.directory = directory
        self.block_len = block_len
        self.dtype = dtype
        self.rows_per_shard = rows_per_shard
        self.buffered: list[np.ndarray] = []
        self.buffered_rows = 0
        self.shards: list[dict[str, Any]] = []
        directory.mkdir()

    @property
    def rows(self) -> int:
        return sum(shard["rows"] for shard in self.shards) + self.buffered_rows

    def add(self, blocks: np.ndarray) -> None:
        if len(blocks):
            self.buffered.append(blocks.astype(self.dtype, copy=False))
            self.buffered_rows += len(blocks)
        while self.buffered_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> list[dict[str, Any]]:
        if self.buffered_rows:
            self._flush(self.buffered_rows)
        return self.shards

    def _flush(self, rows: int) -> None:
        stacked = np.concatenate(self.buffered)
        out, rest = stacked[:rows], stacked[rows:]
        self.buffered = [rest] if len(rest) else []
        self.buffered_rows = len(rest)
        name = f"part-{len(self.shards):05d}.parquet"
        column = pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), self.block_len)
        target = self.directory / name
        pq.write_table(pa.table({TOKEN_COLUMN: column}), target.path, filesystem=target.fs)
        self.shards.append({"file": name, "rows": int(rows)})


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # what prepare records beyond what readers use is kept, not refused


class ShardEntry(_Record):
    file: str
    rows: int


class Counts(_Record):
    """What prepare counts, per split and over both."""

    documents: int = 0
    empty_documents: int = 0
    replaced_documents: int = 0
    tokens: int = 0
    dropped_tokens: int = 0


class SplitCounts(Counts):
    blocks: int = 0
    block_tokens: int = 0
    shards: list[ShardEntry] = []


class TokenizerRecord(_Record):
    dir: str = "tokenizer"
    source: str | None = None
    hash: str | None = None
    vocab_size: int = 0
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None


class Manifest(Counts):
    """`manifest.json`, as every reader of the shards sees it (written by `raylm.data.prepare`)."""

    format: str = "raylm.shards/1"
    seq_len: int = 0
    block_len: int = 0
    dtype: str = "uint16"
    tokenizer: TokenizerRecord = TokenizerRecord()
    splits: dict[str, SplitCounts] = {}
    source: dict[str, Any] | None = None
    bad_rows: int = 0
    _recorded: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def of(cls, recorded: dict[str, Any]) -> Manifest:
        manifest = cls.model_validate(recorded)
        manifest._recorded = recorded
        return manifest

    def split(self, name: str) -> SplitCounts:
        return self.splits.get(name, SplitCounts())

    @property
    def train_blocks(self) -> int:
        return self.split("train").blocks

    @property
    def val_blocks(self) -> int:
        return self.split("val").blocks

    def shard_rows(self, split: str) -> list[int]:
        return [shard.rows for shard in self.split(split).shards]

    @property
    def fingerprint(self) -> str:
        """What identifies the shards' contents: the manifest as written, without when and how long it took."""
        recorded = self._recorded or self.model_dump()
        return fingerprint({k: v for k, v in recorded.items() if k not in ("created_at", "seconds")})


def shards_fingerprint(manifest: Manifest | dict[str, Any]) -> str:
    return (manifest if isinstance(manifest, Manifest) else Manifest.of(manifest)).fingerprint


def read_manifest(data_dir: Location | Path | str) -> Manifest:
    path = Location.parse(data_dir) / MANIFEST
    if not path.is_file():
        raise NoShards(f"no tokenized shards in {data_dir} (missing {MANIFEST}): run `raylm prepare` first")
    return Manifest.of(read_json(path))


def shard_files(data_dir: Location | Path | str, manifest: Manifest, split: str) -> list[Location]:
    directory = Location.parse(data_dir) / split
    return [directory / shard.file for shard in manifest.split(split).shards]


def read_split_blocks(data_dir: Location | Path | str, split: str) -> np.ndarray:
    """All of one split's blocks as a (rows, block_len) array, read directly (for the small validation split)."""
    manifest = read_manifest(data_dir)
    files = shard_files(data_dir, manifest, split)
    if not files:
        return np.empty((0, manifest.block_len), dtype=manifest.dtype)
    table = pq.read_table([f.path for f in files], columns=[TOKEN_COLUMN], filesystem=files[0].fs)
    column = table.column(TOKEN_COLUMN).combine_chunks()
    return column.flatten().to_numpy().reshape(-1, manifest.block_len)


def read_split(data_dir: Location | Path | str, split: str, seed: int | None = None):
    """A Ray Dataset of one split's blocks: in shard order, or with a seed, in a seeded shard order. (Training
    reads its blocks in raylm's own order: `raylm.train.ingest`.)"""
    import ray.data

    manifest = read_manifest(data_dir)
    files = shard_files(data_dir, manifest, split)
    if not files:
        raise ValueError(f"the {split} split in {data_dir} has no blocks: use a larger corpus or a smaller seq_len")
    if seed is not None:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    return ray.data.read_parquet([f.path for f in files], columns=[TOKEN_COLUMN], filesystem=files[0].fs)
