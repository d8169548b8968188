"""The hashes raylm identifies things by, each defined once: a config section or manifest (`fingerprint`), a file
(`sha256_of`: checkpoint files, weights), a tokenizer (`tokenizer_hash`: what shards, checkpoints and registered
models record, so that they can be compared)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from raylm.storage import Location


def fingerprint(value: Any) -> str:
    """A stable short hash of a JSON-able value (config sections, manifests)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_of(path: Location | Path | str) -> str:
    """A file's SHA-256, read in chunks, on any filesystem."""
    path = Location.parse(path)
    digest = hashlib.sha256()
    with path.fs.open_input_stream(path.path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_hash(directory: Location | Path | str) -> str | None:
    """A tokenizer's identity: the hash of its `tokenizer.json`, or None for a directory without one."""
    path = Location.parse(directory) / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
