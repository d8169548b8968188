"""The prepare stage: corpus -> tokenizer -> tokenized, packed Parquet shards with a manifest.

Ray Data reads the files and tokenizes/packs in an actor pool (one tokenizer load per actor); the driver consumes the
packed stream in order, joins the per-batch leftovers into further blocks, writes the shards, and counts everything,
so the manifest's numbers are exact and one progress display shows documents and tokens/s.

Shards are reused when the same config meets the same inputs (same files, sizes and modification times, same
tokenizer): "cache hit". Changed inputs rebuild them; a changed config is the run.name rule's business
(`raylm.runs`): refused unless `--restart`.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from raylm.cluster import local_cores
from raylm.config import Config
from raylm.data.pack import COUNTS, SPLITS, BlockCarry, TokenizePack
from raylm.data.shards import MANIFEST, Manifest, ShardWriter, read_manifest, token_dtype
from raylm.data.sources import DataError, fingerprint_files, fingerprint_hf, list_input_files, read_documents
from raylm.data.tokenizer import build_tokenizer, tokenizer_source_hash
from raylm.digests import fingerprint, tokenizer_hash
from raylm.progress import plain, progress_bar, say
from raylm.runs import RunPaths, claim_stage, stage_config
from raylm.storage import Location, write_json

BATCH_TEXT_BYTES = 256 << 10
"""Text per tokenize call: small enough that work streams and spreads over actors, large enough to amortize a
call. Ray Data batches count rows, so the row count is derived from the corpus' average document size."""
DOCS_PER_BATCH = 256


def source_fingerprint(cfg: Config, files: list[str]) -> dict[str, Any]:
    """What the shards depend on besides the config: the input files (or dataset) and a local tokenizer's content."""
    source = fingerprint_hf(cfg.data) if cfg.data.format == "hf" else fingerprint_files(files)
    return {**source, "tokenizer": tokenizer_source_hash(cfg.data.tokenizer)}


def run_prepare(cfg: Config, restart: bool = False, tokenize_actors: int | None = None) -> dict[str, Any]:
    """Prepare shards for `cfg` (reusing them when config and inputs are unchanged). Returns the summary.

    `tokenize_actors` (default: this machine's cores) actors tokenize with one thread each: measured on 2 cores,
    one single-threaded actor per core beat fewer actors with more threads, and more actors than cores."""
    data_dir, reusable = claim_stage(cfg, "prepare", restart)
    paths = RunPaths.of(cfg)
    files = [] if cfg.data.format == "hf" else list_input_files(cfg.data, outputs=(paths.root, paths.registry))
    source = source_fingerprint(cfg, files)
    if reusable:
        manifest = read_manifest(data_dir)
        if manifest.source == source:
            say(f"prepare: cache hit, reusing the shards in {plain(data_dir)}")
            return prepare_summary(data_dir, manifest, cache="hit")
        say("prepare: the inputs changed since these shards were made: rebuilding them")
        (data_dir / MANIFEST).unlink()
    started = time.monotonic()
    docs = read_documents(cfg.data, files)
    say(f"prepare: {plain(_describe_source(cfg, files))} -> {plain(data_dir)}")
    with _ordered_execution(), tempfile.TemporaryDirectory(prefix="raylm-tokenizer-") as local:
        tokenizer = build_tokenizer(cfg.data.tokenizer, _text_batches(docs), Path(local))
        (data_dir / "tokenizer").upload(Path(local))
        tokenizer_json = (Path(local) / "tokenizer.json").read_text()
        tokenizer_digest = tokenizer_hash(Path(local))
        batch = _docs_per_batch(cfg, files)
        actors = tokenize_actors or local_cores()
        counts = _tokenize_and_write(cfg, docs, data_dir, tokenizer, tokenizer_json, batch, actors)
    manifest = {
        "format": "raylm.shards/1",
        "config_hash": fingerprint(stage_config(cfg, "prepare")),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "tokenizer": {
            "dir": "tokenizer",
            "source": cfg.data.tokenizer.path or "trained",
            "hash": tokenizer_digest,
            "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id,
            "bos_id": tokenizer.bos_token_id,
            "pad_id": tokenizer.pad_token_id,
        },
        "seq_len": cfg.data.seq_len,
        "block_len": cfg.data.seq_len + 1,
        "dtype": token_dtype(len(tokenizer)).name,
        "rows_per_shard": cfg.data.rows_per_shard,
        **counts,
        "seconds": round(time.monotonic() - started, 2),
    }
    write_json(data_dir / MANIFEST, manifest)
    return prepare_summary(data_dir, Manifest.of(manifest), cache="miss")


def _describe_source(cfg: Config, files: list[str]) -> str:
    if cfg.data.format == "hf":
        return f"Hugging Face dataset {cfg.data.hf.path!r} (split {cfg.data.hf.split})"
    kind = "Python standard library sources (demo corpus)" if cfg.data.source == "stdlib" else "files"
    return f"{len(files)} {kind}"


@contextlib.contextmanager
def _ordered_execution() -> Iterator[None]:
    """Ray Data hands out results as they finish; prepare needs them in input order to be deterministic."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = saved


def _docs_per_batch(cfg: Config, files: list[str]) -> int:
    if cfg.data.format == "text" and cfg.data.text_unit == "file" and files:
        average = sum(Path(f).stat().st_size for f in files) / len(files)
    else:
        average = 200  # a line of text or a JSON record, roughly
    return int(min(8192, max(1, BATCH_TEXT_BYTES // max(average, 1))))


def _text_batches(docs) -> Iterator[list[str | None]]:
    for batch in docs.iter_batches(batch_size=DOCS_PER_BATCH, batch_format="pyarrow"):
        yield batch.column("text").to_pylist()


def _tokenize_and_write(
    cfg: Config, docs, data_dir: Location, tokenizer, tokenizer_json: str, docs_per_batch: int, actors: int
) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    block_len = cfg.data.seq_len + 1
    for split in SPLITS:
        (data_dir / split).rmtree()
    dtype = token_dtype(len(tokenizer))
    writers = {s: ShardWriter(data_dir / s, block_len, dtype, cfg.data.rows_per_shard) for s in SPLITS}
    carries = {s: BlockCarry(block_len) for s in SPLITS}
    totals = {s: dict.fromkeys(COUNTS, 0) for s in SPLITS}
    packed = docs.map_batches(
        TokenizePack,
        fn_constructor_kwargs={
            # The tokenizer itself, not a path: actors may run on nodes that cannot see the driver's disk.
            "tokenizer_json": tokenizer_json,
            "eos_id": tokenizer.eos_token_id,
            "bos_id": tokenizer.bos_token_id if cfg.data.add_bos else None,
            "seq_len": cfg.data.seq_len,
            "seed": cfg.data.seed,
            "val_fraction": cfg.data.val_fraction,
            "threads": 1,
        },
        batch_size=docs_per_batch,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=actors, max_size=actors),
    )
    started = time.monotonic()
    with progress_bar("tokenize + pack") as update:
        for batch in packed.iter_batches(batch_size=None, batch_format="pyarrow"):
            _consume(batch, writers, carries, totals)
            tokens = sum(t["n_tokens"] for t in totals.values())
            docs_done = sum(t["n_docs"] for t in totals.values())
            rate = tokens / max(time.monotonic() - started, 1e-9)
            update(info=f"{docs_done:,} documents, {tokens:,} tokens, {rate:,.0f} tokens/s")
    return _counts(writers, carries, totals, block_len)


def _counts(writers, carries, totals, block_len: int) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        shards = writers[split].close()
        blocks = sum(shard["rows"] for shard in shards)
        splits[split] = {
            "documents": totals[split]["n_docs"],
            "empty_documents": totals[split]["n_empty"],
            "replaced_documents": totals[split]["n_replaced"],
            "tokens": totals[split]["n_tokens"],
            "blocks": blocks,
            "block_tokens": blocks * block_len,
            "dropped_tokens": carries[split].remainder,
            "shards": shards,
        }
    counts = {
        name: sum(splits[s][name] for s in SPLITS)
        for name in ("documents", "empty_documents", "replaced_documents", "tokens", "dropped_tokens")
    }
    counts["bad_rows"] = sum(totals[s]["n_bad"] for s in SPLITS)
    if not counts["documents"]:
        raise DataError(
            f"the corpus holds no documents: {counts['empty_documents']} empty and {counts['bad_rows']} bad rows"
        )
    for split in SPLITS:
        if not splits[split]["blocks"]:
            raise DataError(
                f"the {split} split got {splits[split]['tokens']} tokens, not one full block of {block_len}: "
                "use a larger corpus, a smaller data.seq_len, or (for val) a larger data.val_fraction"
            )
    return {**counts, "splits": splits}


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
        for name in COUNTS:
            totals[split][name] += int(pc.sum(part[name]).as_py() or 0)


def prepare_summary(data_dir: Location, manifest: Manifest, cache: str) -> dict[str, Any]:
    return {
        "stage": "prepare",
        "cache": cache,
        "data_dir": str(data_dir),
        "manifest": str(data_dir / MANIFEST),
        "documents": manifest.documents,
        "empty_documents": manifest.empty_documents,
        "replaced_documents": manifest.replaced_documents,
        "bad_rows": manifest.bad_rows,
        "tokens": manifest.tokens,
        "dropped_tokens": manifest.dropped_tokens,
        "train_blocks": manifest.train_blocks,
        "val_blocks": manifest.val_blocks,
        "vocab_size": manifest.tokenizer.vocab_size,
        "seq_len": manifest.seq_len,
    }
