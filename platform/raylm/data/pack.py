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


COUNTS = ("n_docs", "n_empty", "n_tokens", "n_replaced", "n_bad")
"""Per-batch counts carried by each split's tail row (bad rows have no split: they are counted on train's)."""


def _rows(blocks: np.ndarray, tail: np.ndarray, split: str, counts: dict[str, int]) -> pa.Table:
    lengths = [blocks.shape[1]] * len(blocks) + [len(tail)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([blocks.reshape(-1), tail]).astype(np.int32)
    zeros = [0] * (len(lengths) - 1)
    return pa.table(
        {
            "input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "split": pa.array([split] * len(lengths), pa.string()),
            "is_tail": pa.array([False] * len(zeros) + [True]),
            **{name: pa.array([*zeros, counts.get(name, 0)], pa.int64()) for name in COUNTS},
        }
    )


class TokenizePack:
    """Ray Data callable class: the tokenizer is loaded once per actor, then each batch of document rows becomes
    full blocks plus, per split, one tail row carrying the leftover tokens and the batch's counts."""

    def __init__(
        self,
        tokenizer_json: str,
        eos_id: int,
        seq_len: int,
        seed: int,
        val_fraction: float,
        bos_id: int | None = None,
        threads: int | None = None,
    ):
        import os

        if threads:
            # The tokenizer's thread pool is sized on first use: actors x threads should match the cores, not
            # every actor taking all of them.
            os.environ["RAYON_NUM_THREADS"] = str(threads)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos_id = eos_id
        self.bos = [bos_id] if bos_id is not None else []
        self.block_len = seq_len + 1
        self.seed = seed
        self.val_fraction = val_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raylm.data.sources import BAD, REPLACED, split_of

        by_split: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
        bad = 0
        for text, status in zip(batch.column("text").to_pylist(), batch.column("status").to_pylist(), strict=True):
            if status == BAD:
                bad += 1
            else:
                by_split[split_of(text, self.seed, self.val_fraction)].append((text, status))
        tables = []
        for split in SPLITS:
            docs = by_split[split]
            kept = [text for text, _ in docs if text.strip()]
            encoded = self.tokenizer.encode_batch(kept, add_special_tokens=False) if kept else []
            ids = [self.bos + e.ids for e in encoded]
            blocks, tail = pack_documents(ids, self.eos_id, self.block_len)
            counts = {
                "n_docs": len(kept),
                "n_empty": len(docs) - len(kept),
                "n_tokens": sum(len(doc) + 1 for doc in ids),
                "n_replaced": sum(status == REPLACED for _, status in docs),
                "n_bad": bad if split == "train" else 0,
            }
            tables.append(_rows(blocks, tail, split, counts))
        return pa.concat_tables(tables)
