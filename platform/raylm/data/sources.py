"""Find the corpus and read it into a Ray Dataset of documents (`text`, `split`).

Text and JSONL are read as bytes (`read_binary_files`) and split here rather than with `read_text`/`read_json`:
`read_text` silently drops empty lines and `read_json` errors carry no line number, and both matter for counting
documents and for telling the user which line of which file is wrong.

Each document goes to the train or validation split by a seeded hash of its text: deterministic, independent of
file order and of how Ray splits the work, and exact duplicates never straddle the two splits.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Any

import pyarrow as pa

from raylm.config import DataSection


class DataError(ValueError):
    """A problem with the corpus (a missing file, a bad line); the message names the file and line."""


def stdlib_sources(max_bytes: int | None) -> list[str]:
    """This Python's own standard-library `.py` files: a real corpus that exists offline on every machine.
    Tests and site-packages are left out; files are taken in path order until `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    files = sorted(str(path) for path in root.rglob("*.py") if not skip.intersection(path.relative_to(root).parts))
    if not files:
        raise DataError(f"no standard-library sources found under {root}")
    return _cap(files, max_bytes)


def list_input_files(data: DataSection) -> list[str]:
    """Expand `data.paths` (files, directories, globs) into a sorted list of files, capped at `data.max_bytes`."""
    if data.source == "stdlib":
        return stdlib_sources(data.max_bytes)
    found: list[str] = []
    for pattern in data.paths:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        files = []
        for match in matches:
            if os.path.isdir(match):
                files += sorted(str(p) for p in Path(match).rglob("*") if p.is_file() and not p.name.startswith("."))
            elif os.path.isfile(match):
                files.append(match)
        if not files:
            raise DataError(f"data.paths: nothing matches {pattern!r}")
        found += files
    unique = list(dict.fromkeys(os.path.abspath(f) for f in found))
    empty = [f for f in unique if os.path.getsize(f) == 0]
    if empty:
        raise DataError(f"empty input file: {empty[0]}")
    return _cap(unique, data.max_bytes)


def _cap(files: list[str], max_bytes: int | None) -> list[str]:
    if max_bytes is None:
        return files
    kept, total = [], 0
    for path in files:
        size = os.path.getsize(path)
        if kept and total + size > max_bytes:
            break
        kept.append(path)
        total += size
    return kept


def split_of(text: str, seed: int, val_fraction: float) -> str:
    digest = hashlib.blake2b(
        text.encode("utf-8", "replace"), digest_size=8, key=seed.to_bytes(8, "little", signed=True)
    )
    return "val" if int.from_bytes(digest.digest(), "little") / 2**64 < val_fraction else "train"


def documents_from_bytes(batch: dict[str, Any], fmt: str, text_unit: str, text_field: str) -> dict[str, list]:
    """Runs in Ray Data tasks: file bytes -> documents. Raises `DataError` naming file and line."""
    texts: list[str] = []
    for raw, path in zip(batch["bytes"], batch["path"], strict=True):
        content = bytes(raw).decode("utf-8", errors="replace")
        if fmt == "text":
            texts += [content] if text_unit == "file" else content.splitlines()
        else:
            texts += _jsonl_texts(content, path, text_field)
    return {"text": texts}


def _jsonl_texts(content: str, path: str, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{number}: no field {field!r} (data.text_field); the record has {keys}")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {field!r} is {type(value).__name__}, not a string")
        texts.append(value)
    return texts


def check_parquet_column(files: list[str], field: str) -> None:
    import pyarrow.parquet as pq

    for path in files:
        names = pq.read_schema(path).names
        if field not in names:
            raise DataError(f"{path}: no column {field!r} (data.text_field); the columns are {names}")


def with_split(batch: pa.Table, seed: int, val_fraction: float) -> pa.Table:
    texts = [t if t is not None else "" for t in batch.column("text").to_pylist()]
    splits = [split_of(text, seed, val_fraction) for text in texts]
    return pa.table({"text": pa.array(texts, pa.large_string()), "split": pa.array(splits, pa.string())})


def read_documents(data: DataSection, files: list[str]):
    """A Ray Dataset of documents with their split. Lazy: nothing runs until it is iterated."""
    import ray.data

    if data.format == "parquet":
        check_parquet_column(files, data.text_field)
        docs = ray.data.read_parquet(files, columns=[data.text_field])
        if data.text_field != "text":
            docs = docs.rename_columns({data.text_field: "text"})
    else:
        docs = ray.data.read_binary_files(files, include_paths=True).map_batches(
            documents_from_bytes,
            fn_kwargs={"fmt": data.format, "text_unit": data.text_unit, "text_field": data.text_field},
            batch_format="numpy",
        )
    return docs.map_batches(
        with_split, fn_kwargs={"seed": data.seed, "val_fraction": data.val_fraction}, batch_format="pyarrow"
    )
