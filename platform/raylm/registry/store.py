"""The model registry: `<run.dir>/registry/<name>/<version>/` on any pyarrow filesystem, each version a plain
Hugging Face model directory (safetensors + tokenizer) with a `manifest.json` that records where it came from
(config with secrets redacted, data manifest hash, trial, metrics, the eval gate's decision, git commit).

Versions are increasing integers. Aliases: `name:latest` is the highest version (computed); `name:best` is stored in
`registry/<name>/aliases.json` (with the history of promotions) and moves when a new version passes the eval gate
(`raylm.gate`) or is promoted by hand (`raylm models promote`).

Made for object stores as well as local disks, with no directory rename anywhere (`raylm.conditional`): a version
number is claimed by creating `<version>/.claim` only if it does not exist (S3's `If-None-Match: *`), the files are
copied into that folder, and the manifest is written last: a folder without one is not a version yet, and no other
registration ever takes or deletes it. `aliases.json` is replaced only if it is still the copy read (`If-Match` on
its ETag), and a promotion re-checks its candidate against whatever best it finds then, so two promotions at once
never leave the worse model as best. Registering the same checkpoint again returns the existing version (and
finishes its promotion if a crash came between the two).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape

from raylm.conditional import conditional_writes
from raylm.digests import sha256_of, tokenizer_hash
from raylm.errors import RunError
from raylm.progress import say
from raylm.redact import redact
from raylm.storage import Location, write_json
from raylm.train.checkpoint import checkpoint_problem, copy_model_files

MANIFEST = "manifest.json"
ALIASES = "aliases.json"
CLAIM = ".claim"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RegistryError(RunError):
    """An unknown model or version, or a checkpoint that cannot be registered."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Location
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def val_loss(self) -> float | None:
        """The validation loss recorded with this version: reported by its training run, else measured by the gate."""
        loss = self.manifest.get("metrics", {}).get("val_loss")
        return loss if loss is not None else (self.manifest.get("gate") or {}).get("candidate_val_loss")

    @property
    def tokenizer_hash(self) -> str | None:
        return self.manifest.get("tokenizer_hash") or tokenizer_hash(self.path)


def _number(text: str) -> int | None:
    """A version number as written in a folder name or a reference (ASCII digits only: '²'.isdigit() is True)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _numbered(registry: Location, name: str) -> list[Location]:
    return [p for p in (registry / name).iterdir() if _number(p.name) is not None]


def _versions(registry: Location, name: str) -> list[int]:
    """The complete versions: a folder is one once its manifest exists."""
    return sorted(int(p.name) for p in _numbered(registry, name) if (p / MANIFEST).is_file())


def _next_version(registry: Location, name: str) -> int:
    """One past every numbered folder, complete or still being written by another registration."""
    return max((int(p.name) for p in _numbered(registry, name)), default=0) + 1


def _claim_version(registry: Location, name: str, tries: int = 100) -> tuple[int, Location]:
    """The next free version number, claimed: its `.claim` is created only if none exists (on S3 a conditional
    PUT), so two registrations at once never share a number."""
    writes = conditional_writes(registry)
    version = _next_version(registry, name)
    for _ in range(tries):
        target = registry / name / str(version)
        claim = {"claimed_at": _now(), "host": socket.gethostname(), "pid": os.getpid()}
        if writes.create(target / CLAIM, json.dumps(claim).encode()):
            return version, target
        version = max(version + 1, _next_version(registry, name))
    raise RegistryError(f"could not claim a version of {name} in {registry} after {tries} tries")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise RegistryError(
            f"{name!r} is not a model name: letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def weights_hash(model_dir: Location) -> str:
    return sha256_of(model_dir / "model.safetensors")


def read_version_manifest(path: Location) -> dict[str, Any]:
    """A version's manifest; RegistryError naming the file when it is not one."""
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path} is corrupt ({err}): that version cannot be used") from None
    if not isinstance(manifest, dict):
        raise RegistryError(f"{path} is corrupt (not a JSON object): that version cannot be used")
    return manifest


def register(
    registry: Location | Path | str,
    name: str,
    checkpoint: Location | Path | str,
    lineage: dict[str, Any],
    gate: Callable[[Location], dict[str, Any]] | None = None,
) -> tuple[ModelVersion, bool]:
    """Copy a complete checkpoint into the registry as the next version of `name`.
    Returns the version and whether it is new (False: this checkpoint was registered before, and `gate` is not run).

    `gate(version_dir)` decides on the copied files before the manifest is written; its decision goes into the
    manifest as `gate`. Promoting is the caller's business (`set_best`)."""
    registry, checkpoint = Location.parse(registry), Location.parse(checkpoint)
    check_name(name)
    problem = checkpoint_problem(checkpoint, verify=True)
    if problem:
        raise RegistryError(f"refusing to register an incomplete or corrupt checkpoint: {problem}")
    digest = weights_hash(checkpoint)
    for version in _versions(registry, name):
        path = registry / name / str(version)
        try:
            manifest = read_version_manifest(path / MANIFEST)
        except RegistryError as err:  # one broken version never blocks the others
            say(f"[yellow]warning:[/yellow] skipping {escape(str(err))}")
            continue
        if manifest.get("weights_sha256") == digest:
            return ModelVersion(name, version, path, manifest), False
    version, target = _claim_version(registry, name)
    try:
        copy_model_files(checkpoint, target)
        decision = gate(target) if gate is not None else None
        manifest = {
            "name": name,
            "version": version,
            "created_at": _now(),
            "source_checkpoint": str(checkpoint),
            "weights_sha256": digest,
            "tokenizer_hash": tokenizer_hash(target),
            "git_commit": git_commit(),
            **lineage,
            **({"gate": decision} if decision is not None else {}),
        }
        # Secrets never enter a manifest, whatever the lineage holds (URIs with passwords, signed query strings).
        manifest = redact(manifest)
        write_json(target / MANIFEST, manifest)  # last: until it exists, the version does not
    except BaseException:
        target.rmtree()  # this registration's own folder, claim and all: the number is free again
        raise
    return ModelVersion(name, version, target, manifest), True


def open_version(registry: Location, name: str, version: int) -> ModelVersion:
    path = registry / name / str(version)
    return ModelVersion(name, version, path, read_version_manifest(path / MANIFEST))


def list_models(registry: Location | Path | str) -> dict[str, list[int]]:
    registry = Location.parse(registry)
    found = {p.name: _versions(registry, p.name) for p in registry.iterdir() if p.is_dir()}
    return {name: versions for name, versions in found.items() if versions}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the code that produced a model, when run from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
