"""The prepare stage: corpus -> tokenizer -> tokenized, packed Parquet shards with a manifest.

Ray Data reads the files and tokenizes/packs in an actor pool (one tokenizer load per actor); the driver consumes the
packed stream in order, joins the per-batch leftovers into further blocks, writes the shards, and counts everything,
so the manifest's numbers are exact and one progress display shows documents and tokens/s.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from raylm.config import Config, fingerprint
from raylm.data.pack import SPLITS, BlockCarry, TokenizePack
from raylm.data.shards import MANIFEST, ShardWriter, read_manifest, token_dtype
from raylm.data.sources import list_input_files, read_documents
from raylm.data.tokenizer import build_tokenizer, tokenizer_hash
from raylm.progress import progress, say
from raylm.runs import claim_stage, stage_config, write_json

DOCS_PER_BATCH = 128


def run_prepare(cfg: Config, restart: bool = False) -> dict[str, Any]:
    """Prepare shards for `cfg` (reusing them when they exist for the same config). Returns the summary."""
    data_dir, reusable = claim_stage(cfg, "prepare", restart)
    if reusable:
        say(f"prepare: cache hit, reusing the shards in {data_dir}")
        return summarize(data_dir, read_manifest(data_dir), cache="hit")
    started = time.monotonic()
    files = list_input_files(cfg.data)
    docs = read_documents(cfg.data, files)
    corpus = "Python standard library sources (demo corpus)" if cfg.data.source == "stdlib" else "files"
    say(f"prepare: {len(files)} {corpus} -> {data_dir}")
    tokenizer = build_tokenizer(cfg.data.tokenizer, _text_batches(docs), data_dir / "tokenizer")
    counts = _tokenize_and_write(cfg, docs, data_dir, tokenizer.eos_token_id, len(tokenizer))
    manifest = {
        "format": "raylm.shards/1",
        "config_hash": fingerprint(stage_config(cfg, "prepare")),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"files": len(files), "bytes": sum(Path(f).stat().st_size for f in files)},
        "tokenizer": {
            "dir": "tokenizer",
            "source": cfg.data.tokenizer.path or "trained",
            "hash": tokenizer_hash(data_dir / "tokenizer"),
            "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
        },
        "seq_len": cfg.data.seq_len,
        "block_len": cfg.data.seq_len + 1,
        "dtype": token_dtype(len(tokenizer)).name,
        **counts,
        "seconds": round(time.monotonic() - started, 2),
    }
    write_json(data_dir / MANIFEST, manifest)
    return summarize(data_dir, manifest, cache="miss")


def _text_batches(docs) -> Iterator[list[str]]:
    for batch in docs.iter_batches(batch_size=DOCS_PER_BATCH, batch_format="pyarrow"):
        yield batch.column("text").to_pylist()


def _tokenize_and_write(cfg: Config, docs, data_dir: Path, eos_id: int, vocab_size: int) -> dict[str, Any]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    block_len = cfg.data.seq_len + 1
    for split in SPLITS:
        shutil.rmtree(data_dir / split, ignore_errors=True)
    writers = {
        s: ShardWriter(data_dir / s, block_len, token_dtype(vocab_size), cfg.data.rows_per_shard) for s in SPLITS
    }
    carries = {s: BlockCarry(block_len) for s in SPLITS}
    totals = {s: {"documents": 0, "empty_documents": 0, "tokens": 0} for s in SPLITS}
    actors = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    packed = docs.map_batches(
        TokenizePack,
        fn_constructor_kwargs={
            "tokenizer_file": str(data_dir / "tokenizer" / "tokenizer.json"),
            "eos_id": eos_id,
            "seq_len": cfg.data.seq_len,
        },
        batch_size=DOCS_PER_BATCH,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=actors),
    )
    context = DataContext.get_current()
    saved_order, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    started = time.monotonic()
    try:
        with progress("tokenize + pack") as update:
            for batch in packed.iter_batches(batch_size=None, batch_format="pyarrow"):
                _consume(batch, writers, carries, totals)
                tokens = sum(t["tokens"] for t in totals.values())
                docs_done = sum(t["documents"] for t in totals.values())
                rate = tokens / max(time.monotonic() - started, 1e-9)
                update(info=f"{docs_done:,} documents, {tokens:,} tokens, {rate:,.0f} tokens/s")
    finally:
        context.execution_options.preserve_order = saved_order
    splits = {}
    for split in SPLITS:
        shards = writers[split].close()
        blocks = sum(shard["rows"] for shard in shards)
        splits[split] = {
            **totals[split],
            "blocks": blocks,
            "block_tokens": blocks * block_len,
            "dropped_tokens": carries[split].remainder,
            "shards": shards,
        }
    return {
        "documents": sum(t["documents"] for t in totals.values()),
        "empty_documents": sum(t["empty_documents"] for t in totals.values()),
        "tokens": sum(t["tokens"] for t in totals.values()),
        "splits": splits,
    }


def _consume(batch, writers, carries, totals) -> None:
    """Route one packed batch: full blocks to the split's shards; each tail, in stream order, to the carry."""
    import pyarrow.compute as pc

    for split in SPLITS:
        part = batch.filter(pc.equal(batch["split"], split))
        if not part.num_rows:
            continue
        ids = part["input_ids"].combine_chunks()
        values = pc.list_flatten(ids).to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(ids).to_numpy())])
        start = 0
        # Every packer output ends with its tail row, so blocks before a tail come first in the stream.
        for tail in np.flatnonzero(part["is_tail"].to_numpy(zero_copy_only=False)):
            writers[split].add(values[offsets[start] : offsets[tail]].reshape(-1, writers[split].block_len))
            writers[split].add(carries[split].add(values[offsets[tail] : offsets[tail + 1]]))
            start = tail + 1
        for name, column in (("documents", "n_docs"), ("empty_documents", "n_empty"), ("tokens", "n_tokens")):
            totals[split][name] += int(pc.sum(part[column]).as_py() or 0)


def summarize(data_dir: Path, manifest: dict[str, Any], cache: str) -> dict[str, Any]:
    return {
        "stage": "prepare",
        "cache": cache,
        "data_dir": str(data_dir),
        "manifest": str(data_dir / MANIFEST),
        "documents": manifest["documents"],
        "empty_documents": manifest["empty_documents"],
        "tokens": manifest["tokens"],
        "train_blocks": manifest["splits"]["train"]["blocks"],
        "val_blocks": manifest["splits"]["val"]["blocks"],
        "vocab_size": manifest["tokenizer"]["vocab_size"],
        "seq_len": manifest["seq_len"],
    }
