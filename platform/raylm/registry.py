"""The model registry: `<run.dir>/registry/<name>/<version>/` on any pyarrow filesystem, each version a plain
Hugging Face model directory (safetensors + tokenizer) with a `manifest.json` that records where it came from
(config, data manifest hash, trial, metrics, git commit). Versions are increasing integers; `name:latest` is the
highest one.

A version is copied into a staging directory and moved into place, with its manifest written last, so a version
directory without a manifest is ignored. Registering the same checkpoint again returns the existing version.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raylm.config import Config
from raylm.runs import RunPaths, read_json, write_json
from raylm.storage import Location
from raylm.train.checkpoint import checkpoint_problem, copy_model_files

MANIFEST = "manifest.json"


class RegistryError(ValueError):
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


def _versions(registry: Location, name: str) -> list[int]:
    return sorted(int(p.name) for p in (registry / name).iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())


def weights_hash(model_dir: Location) -> str:
    digest = hashlib.sha256()
    weights = model_dir / "model.safetensors"
    with weights.fs.open_input_stream(weights.path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def register(
    registry: Location | Path | str, name: str, checkpoint: Location | Path | str, lineage: dict[str, Any]
) -> tuple[ModelVersion, bool]:
    """Copy a complete checkpoint into the registry as the next version of `name`.
    Returns the version and whether it is new (False: this checkpoint was registered before)."""
    registry, checkpoint = Location.parse(registry), Location.parse(checkpoint)
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise RegistryError(f"refusing to register an incomplete checkpoint: {problem}")
    digest = weights_hash(checkpoint)
    for version in _versions(registry, name):
        existing = resolve(registry, f"{name}:{version}")
        if existing.manifest.get("weights_sha256") == digest:
            return existing, False
    staging = registry / name / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    target = None
    try:
        copy_model_files(checkpoint, staging)
        version = (_versions(registry, name) or [0])[-1] + 1
        target = registry / name / str(version)
        staging.move(target)
        manifest = {
            "name": name,
            "version": version,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_checkpoint": str(checkpoint),
            "weights_sha256": digest,
            "git_commit": git_commit(),
            **lineage,
        }
        write_json(target / MANIFEST, manifest)  # last: until it exists, the version does not
    except BaseException:
        staging.rmtree()
        if target is not None and not (target / MANIFEST).is_file():
            target.rmtree()
        raise
    return ModelVersion(name, version, target, manifest), True


def resolve(registry: Location | Path | str, ref: str) -> ModelVersion:
    """`name`, `name:latest` or `name:<version>` -> the registered version."""
    registry = Location.parse(registry)
    name, _, tag = ref.partition(":")
    versions = _versions(registry, name)
    if not versions:
        known = ", ".join(list_models(registry)) or "none"
        raise RegistryError(f"no model named {name!r} in {registry} (registered: {known})")
    if tag in ("", "latest"):
        version = versions[-1]
    elif tag.isdigit() and int(tag) in versions:
        version = int(tag)
    else:
        raise RegistryError(f"{ref!r}: {name} has versions {versions} (and the alias 'latest')")
    path = registry / name / str(version)
    return ModelVersion(name, version, path, read_json(path / MANIFEST))


def list_models(registry: Location | Path | str) -> dict[str, list[int]]:
    registry = Location.parse(registry)
    found = {p.name: _versions(registry, p.name) for p in registry.iterdir() if p.is_dir()}
    return {name: versions for name, versions in found.items() if versions}


def run_register(cfg: Config, checkpoint: str | None = None) -> dict[str, Any]:
    """Register `checkpoint`, or by default the run's best sweep trial, or else its training result."""
    paths = RunPaths.of(cfg)
    source, details = _best_candidate(paths, checkpoint)
    data_manifest = paths.data / "manifest.json"
    lineage = {
        "source": source,
        "trial_id": details.get("best_trial"),
        "metrics": {k: details.get(k) for k in ("val_loss", "val_ppl", "step") if details.get(k) is not None},
        "data_manifest_sha256": hashlib.sha256(data_manifest.read_bytes()).hexdigest()
        if data_manifest.is_file()
        else None,
        "trial_config": details.get("best_config"),
        "config": cfg.model_dump(mode="json"),
    }
    version, created = register(paths.registry, cfg.model_name, details["checkpoint"], lineage)
    return {
        "stage": "register",
        "model": version.ref,
        "name": version.name,
        "version": version.version,
        "path": str(version.path),
        "new": created,
        "source": source,
        **lineage["metrics"],
    }


def _best_candidate(paths: RunPaths, checkpoint: str | None) -> tuple[str, dict[str, Any]]:
    if checkpoint:
        return "checkpoint", {"checkpoint": checkpoint}
    for source, result in (("tune", paths.tune / "best.json"), ("train", paths.train / "result.json")):
        if result.is_file():
            return source, read_json(result)
    raise RegistryError(f"nothing to register for run {paths.root.name!r}: run `raylm tune` or `raylm train` first")


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
