"""Find the corpus and read it into a Ray Dataset of documents: rows of `text` and `status`.

Text and JSON lines are read by a file datasource of our own (`DocumentsDatasource`) rather than `read_text` or
`read_json`: `read_text` silently drops empty lines, `read_json` errors carry no line number, and both hold a whole
file in memory. Ours streams each file in chunks (compressed files too: the codec comes from the extension),
counts every line, and names file and line in its errors. Parquet files and Hugging Face datasets go through Ray
Data's own readers.

Every input row becomes a row here, so nothing is lost silently: `status` says whether it is a document
(`OK`), a document whose invalid UTF-8 was replaced (`REPLACED`), or a bad row that was skipped (`BAD`, text null).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from raylm.config import DataSection
from raylm.errors import RunError
from raylm.storage import Location

OK, BAD, REPLACED = 0, 1, 2
CHUNK_BYTES = 4 << 20
"""How much of a file is read at a time: memory per read task stays flat whatever the file's size."""
ROWS_PER_BLOCK = 8192


class DataError(RunError):
    """A problem with the corpus (a missing file, a bad line); the message names the file and line."""


def stdlib_sources(max_bytes: int | None) -> list[str]:
    """This Python's own standard-library `.py` files: a real corpus that exists offline on every machine.
    Tests and site-packages are left out; files are taken in path order until `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    files = sorted(
        str(path)
        for path in root.rglob("*.py")
        if not skip.intersection(path.relative_to(root).parts) and path.stat().st_size > 0
    )
    if not files:
        raise DataError(f"no standard-library sources found under {root}")
    return _cap(files, max_bytes)


def list_input_files(data: DataSection, outputs: tuple[Location, ...] = ()) -> list[str]:
    """Expand `data.paths` (files, directories, globs) into a sorted list of files, capped at `data.max_bytes`.
    Files under `outputs` (the run's own directory, the registry) are left out: a corpus directory that holds
    `run.dir` must not read its own shards back in."""
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
    unique = [f for f in unique if not any(Location.parse(f).is_relative_to(out) for out in outputs)]
    if not unique:
        raise DataError(f"data.paths: every file matched is one of raylm's own outputs ({outputs[0]})")
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


def fingerprint_files(files: list[str]) -> dict[str, Any]:
    """What the shards were made from: every file's path, size and modification time, and a hash over them."""
    entries = [[path, (stat := os.stat(path)).st_size, stat.st_mtime_ns] for path in files]
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return {"kind": "files", "files": len(entries), "bytes": sum(e[1] for e in entries), "hash": digest}


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """train or val, by a seeded hash of the document's text (identical documents never straddle the splits)."""
    key = seed.to_bytes(8, "little", signed=True)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key)
    return "val" if int.from_bytes(digest.digest(), "little") / 2**64 < val_fraction else "train"


class _Rows:
    """Collects document rows and hands them out as Arrow blocks of bounded size."""

    def __init__(self) -> None:
        self.texts: list[str | None] = []
        self.status: list[int] = []

    def add(self, text: str | None, status: int) -> None:
        self.texts.append(text)
        self.status.append(status)

    def full(self) -> bool:
        return len(self.texts) >= ROWS_PER_BLOCK

    def take(self) -> pa.Table:
        table = pa.table({"text": pa.array(self.texts, pa.large_string()), "status": pa.array(self.status, pa.int8())})
        self.texts, self.status = [], []
        return table


def _lines(stream, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(line number, line bytes without the newline), reading the stream a chunk at a time."""
    number, pending = 0, b""
    while chunk := stream.read(chunk_bytes):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            number += 1
            yield number, line.removesuffix(b"\r")
    if pending:
        yield number + 1, pending.removesuffix(b"\r")


class DocumentParser:
    """Turns one file's bytes into document rows; shared by the datasource and the tests."""

    def __init__(self, fmt: str, text_unit: str, text_field: str, skip_bad_rows: bool, on_decode_error: str):
        self.fmt = fmt
        self.text_unit = text_unit
        self.text_field = text_field
        self.skip_bad_rows = skip_bad_rows
        self.on_decode_error = on_decode_error

    def decode(self, raw: bytes, where: str) -> tuple[str, int]:
        try:
            return raw.decode("utf-8"), OK
        except UnicodeDecodeError as err:
            if self.on_decode_error == "error":
                raise DataError(f"{where}: invalid UTF-8 at byte {err.start} (data.on_decode_error: error)") from None
            return raw.decode("utf-8", errors="replace"), REPLACED

    def rows(self, stream, path: str) -> Iterator[pa.Table]:
        rows = _Rows()
        if self.fmt == "text" and self.text_unit == "file":
            rows.add(*self.decode(stream.read(), path))
        else:
            first = True
            for number, raw in _lines(stream):
                if first and self.fmt == "jsonl" and raw.lstrip()[:1] == b"[":
                    # A .json file holding one array of records rather than JSON lines.
                    yield from self._json_array(raw + stream.read(), path)
                    return
                first = False
                self._line(rows, raw, f"{path}:{number}")
                if rows.full():
                    yield rows.take()
        if rows.texts:
            yield rows.take()

    def _line(self, rows: _Rows, raw: bytes, where: str) -> None:
        text, status = self.decode(raw, where)
        if self.fmt == "text":
            rows.add(text, status)
            return
        if not text.strip():
            return  # a blank line between JSON records is not a record
        try:
            rows.add(self._field(_json_loads_or_error(text, where), where), status)
        except DataError:
            if not self.skip_bad_rows:
                raise
            rows.add(None, BAD)

    def _field(self, record: Any, where: str) -> str:
        if not isinstance(record, dict) or self.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no field {self.text_field!r} (data.text_field); the record has {keys}")
        value = record[self.text_field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {self.text_field!r} is {type(value).__name__}, not a string")
        return value

    def _json_array(self, raw: bytes, path: str) -> Iterator[pa.Table]:
        text, status = self.decode(raw, path)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        rows = _Rows()
        for index, record in enumerate(records):
            try:
                rows.add(self._field(record, f"{path}[{index}]"), status)
            except DataError:
                if not self.skip_bad_rows:
                    raise
                rows.add(None, BAD)
            if rows.full():
                yield rows.take()
        if rows.texts:
            yield rows.take()


def _json_loads_or_error(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None


def make_datasource(files: list[str], parser: DocumentParser):
    # Defined here so that importing this module (for DataError, in the CLI and unit tests) does not import Ray Data.
    from ray.data.datasource import FileBasedDatasource

    class DocumentsDatasource(FileBasedDatasource):
        """Streams text and JSON-lines files into document rows (see the module docstring)."""

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            yield from parser.rows(f, path)

    return DocumentsDatasource(files)


def read_documents(data: DataSection, files: list[str]):
    """A Ray Dataset of document rows (`text`, `status`). Lazy: nothing runs until it is iterated."""
    import ray.data

    if data.format == "hf":
        return _hf_documents(data)
    if data.format == "parquet":
        check_parquet_column(files, data.text_field)
        table = ray.data.read_parquet(files, columns=[data.text_field])
        return table.map_batches(_column_as_documents, fn_kwargs={"field": data.text_field}, batch_format="pyarrow")
    parser = DocumentParser(data.format, data.text_unit, data.text_field, data.skip_bad_rows, data.on_decode_error)
    return ray.data.read_datasource(make_datasource(files, parser))


def check_parquet_column(files: list[str], field: str) -> None:
    import pyarrow.parquet as pq

    for path in files:
        names = pq.read_schema(path).names
        if field not in names:
            raise DataError(f"{path}: no column {field!r} (data.text_field); the columns are {names}")


def _column_as_documents(batch: pa.Table, field: str) -> pa.Table:
    column = batch.column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"column {field!r} (data.text_field) holds {column.type}, not strings")
    texts = column.cast(pa.large_string())
    return pa.table({"text": texts, "status": pa.array([OK] * len(texts), pa.int8())})


def load_hf_dataset(data: DataSection):
    """`datasets.load_dataset(path, name, split=...)`: a local dataset directory, data files, or a hub id."""
    import datasets

    hf = data.hf
    try:
        dataset = datasets.load_dataset(hf.path, hf.name, split=hf.split, revision=hf.revision)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"data.hf: cannot load dataset {hf.path!r} (split {hf.split!r}): {err}") from None
    if data.text_field not in dataset.column_names:
        raise DataError(
            f"data.hf: dataset {hf.path!r} has no column {data.text_field!r} (data.text_field); "
            f"the columns are {dataset.column_names}"
        )
    return dataset.select_columns([data.text_field])


def _hf_documents(data: DataSection):
    import ray.data

    dataset = load_hf_dataset(data)
    return ray.data.from_huggingface(dataset).map_batches(
        _column_as_documents, fn_kwargs={"field": data.text_field}, batch_format="pyarrow"
    )


def fingerprint_hf(data: DataSection) -> dict[str, Any]:
    dataset = load_hf_dataset(data)
    return {
        "kind": "hf",
        "path": data.hf.path,
        "split": data.hf.split,
        "rows": dataset.num_rows,
        "hash": getattr(dataset, "_fingerprint", None) or "unknown",
    }
