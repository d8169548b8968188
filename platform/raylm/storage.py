"""Locations on any pyarrow filesystem: a local directory, `file://`, `s3://`, `gs://`, `hdfs://`...

`run.dir` may be any of them; everything raylm writes under it (shards, manifests, stage markers, training and
sweep results, the registry) goes through `Location`, a small path-like wrapper over `pyarrow.fs`. Libraries that
only take local paths (Hugging Face `save_pretrained`/`from_pretrained`) work in a local directory that is then
uploaded, or on a downloaded copy.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs


@dataclass(frozen=True, eq=False)
class Location:
    fs: pafs.FileSystem
    path: str
    scheme: str = ""
    """The URI scheme it was parsed from (`s3`, `gs`, `file`...); empty for a local path or a bare filesystem."""
    query: str = ""
    """The URI's options (`endpoint_override=...&scheme=http`): kept so that `uri` rebuilds the same filesystem in
    another process. Never shown: `str()` leaves them out (they may hold credentials)."""

    @classmethod
    def parse(cls, uri: str | Path | Location) -> Location:
        """A local path (made absolute) or a URI with a scheme pyarrow knows, options included."""
        if isinstance(uri, Location):
            return uri
        text = str(uri)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), str(Path(text).expanduser().absolute()))
        fs, path = pafs.FileSystem.from_uri(text)
        parts = urlsplit(text)
        return cls(fs, path.rstrip("/"), parts.scheme, parts.query)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local(self) -> Path:
        """The local path; only for locations on the local filesystem."""
        if not self.is_local:
            raise ValueError(f"{self} is not on the local filesystem")
        return Path(self.path)

    @property
    def uri(self) -> str:
        """Text that `Location.parse` turns back into this location, filesystem options and all: for what crosses
        into another process as a string (a Serve deployment's arguments). Holds any credentials the URI held."""
        if self.is_local:
            return self.path
        return f"{self.scheme or self.fs.type_name}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:
        return self.path if self.is_local else f"{self.scheme or self.fs.type_name}://{self.path}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (type(self.fs), self.uri) == (type(other.fs), other.uri)

    def __hash__(self) -> int:
        return hash((type(self.fs).__name__, self.uri))

    def within(self, text: str) -> Location:
        """A path or URI recorded in a result file (written without options, which may hold credentials) as a
        Location: on this location's filesystem, options included, when it names a place under this one."""
        if self.is_local or "://" not in str(text):
            return Location.parse(text)
        parts = urlsplit(str(text))
        path = (parts.netloc + parts.path).rstrip("/")
        if parts.scheme == self.scheme and (path + "/").startswith(self.path.rstrip("/") + "/"):
            return Location(self.fs, path, self.scheme, self.query)
        return Location.parse(text)

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, str(name)), self.scheme, self.query)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path), self.scheme, self.query)

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        return self._info().size or 0

    def is_relative_to(self, other: Location) -> bool:
        return type(self.fs) is type(other.fs) and (self.path + "/").startswith(other.path.rstrip("/") + "/")

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.readall()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write atomically where the filesystem can (a reader sees the old file or the new one)."""
        self.parent.mkdir()
        staging = self.parent / f".{self.name}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(staging.path) as stream:
            stream.write(data)
        self.fs.move(staging.path, self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_json(self, value: Any) -> None:
        """Atomically, where the filesystem can: a reader sees the old file or the new one, never half of one."""
        self.write_text(json.dumps(value, indent=2, default=str))

    def unlink(self, missing_ok: bool = True) -> None:
        if self.is_file() or not missing_ok:
            self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        if self.is_dir():
            self.fs.delete_dir(self.path)

    def iterdir(self) -> list[Location]:
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return sorted(
            (Location(self.fs, info.path, self.scheme, self.query) for info in infos), key=lambda loc: loc.path
        )

    def glob(self, pattern: str) -> list[Location]:
        """Entries whose path relative to this directory matches `pattern` (fnmatch; `*` crosses no `/`)."""
        if not self.is_dir():
            return []
        depth = pattern.count("/")
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=depth > 0))
        matches = []
        for info in infos:
            relative = posixpath.relpath(info.path, self.path)
            if relative.count("/") == depth and fnmatch.fnmatchcase(relative, pattern):
                matches.append(Location(self.fs, info.path, self.scheme, self.query))
        return sorted(matches, key=lambda loc: loc.path)

    def move(self, target: Location) -> None:
        self.fs.move(self.path, target.path)

    def upload(self, local_dir: Path) -> None:
        """Copy a local directory's files into this location (replacing what is there)."""
        self.rmtree()
        self.mkdir()
        pafs.copy_files(str(local_dir), self.path, pafs.LocalFileSystem(), self.fs)

    def download(self, local_dir: Path) -> Path:
        """Copy this directory's files into a local directory; returns it."""
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(local_dir), self.fs, pafs.LocalFileSystem())
        return local_dir


def read_json(path: Location | Path | str) -> Any:
    return Location.parse(path).read_json()


def write_json(path: Location | Path | str, value: Any) -> None:
    Location.parse(path).write_json(value)
