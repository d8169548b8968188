"""Tokenize documents and pack them into fixed-length blocks.

Every document is followed by EOS and the token stream is cut into blocks of `seq_len + 1` tokens (inputs plus the
shifted targets). A batch's leftover tokens are not dropped: they come out as one "tail" row per split, and the
driver (`raylm.data.prepare`) joins the tails in order into further blocks, so only the very last partial block of
each split is lost, and the manifest counts it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

SPLITS = ("train", "val")


def pack_documents(docs: Sequence[Sequence[int]], eos_id: int, block_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate `doc + [eos]` for each document; return the full blocks (n, block_len) and the leftover tokens."""
    if docs:
        stream = np.concatenate([np.append(np.asarray(doc, dtype=np.int64), eos_id) for doc in docs])
    else:
        stream = np.empty(0, dtype=np.int64)
    full = len(stream) // block_len
    return stream[: full * block_len].reshape(full, block_len), stream[full * block_len :]


class BlockCarry:
    """Joins leftover token runs, in arrival order, into further full blocks."""

    def __init__(self, block_len: int):
        self.block_len = block_len
        self.pending = np.empty(0, dtype=np.int64)

    def add(self, tokens: np.ndarray) -> np.ndarray:
        self.pending = np.concatenate([self.pending, tokens])
        full = len(self.pending) // self.block_len
        blocks = self.pending[: full * self.block_len].reshape(full, self.block_len)
        self.pending = self.pending[full * self.block_len :]
        return blocks

    @property
    def remainder(self) -> int:
        return len(self.pending)


def _rows(blocks: np.ndarray, tail: np.ndarray, split: str, n_docs: int, n_empty: int, n_tokens: int) -> pa.Table:
    lengths = [blocks.shape[1]] * len(blocks) + [len(tail)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([blocks.reshape(-1), tail]).astype(np.int32)
    count = len(lengths)
    zeros = [0] * (count - 1)
    return pa.table(
        {
            "input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "split": pa.array([split] * count, pa.string()),
            "is_tail": pa.array([False] * (count - 1) + [True]),
            "n_docs": pa.array([*zeros, n_docs], pa.int64()),
            "n_empty": pa.array([*zeros, n_empty], pa.int64()),
            "n_tokens": pa.array([*zeros, n_tokens], pa.int64()),
        }
    )


class TokenizePack:
    """Ray Data callable class: the tokenizer is loaded once per actor, then each batch of documents becomes
    full blocks plus, per split, one tail row carrying the leftover tokens and the batch's counts."""

    def __init__(self, tokenizer_file: str, eos_id: int, seq_len: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.eos_id = eos_id
        self.block_len = seq_len + 1

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        splits = batch.column("split").to_pylist()
        tables = []
        for split in SPLITS:
            chosen = [t for t, s in zip(texts, splits, strict=True) if s == split]
            kept = [t for t in chosen if t.strip()]
            ids = [e.ids for e in self.tokenizer.encode_batch(kept, add_special_tokens=False)] if kept else []
            blocks, tail = pack_documents(ids, self.eos_id, self.block_len)
            n_tokens = sum(len(doc) + 1 for doc in ids)
            tables.append(_rows(blocks, tail, split, len(kept), len(chosen) - len(kept), n_tokens))
        return pa.concat_tables(tables)
