"""The model registry: `<run.dir>/registry/<name>/<version>/` on any pyarrow filesystem, each version a plain
Hugging Face model directory (safetensors + tokenizer) with a `manifest.json` that records where it came from
(config with secrets redacted, data manifest hash, trial, metrics, the eval gate's decision, git commit).

Versions are increasing integers. Aliases: `name:latest` is the highest version (computed); `name:best` is stored in
`registry/<name>/aliases.json` and moves when a new version passes the eval gate (`raylm.gate`) or is promoted by
hand (`raylm models promote`).

A version is copied into a staging directory and moved into place, with its manifest written last, so a version
directory without a manifest is ignored. Registering the same checkpoint again returns the existing version.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape

from raylm.config import Config
from raylm.progress import say
from raylm.redact import public_config, redact
from raylm.runs import RunPaths, read_json, write_json
from raylm.storage import Location
from raylm.train.checkpoint import checkpoint_problem, copy_model_files

MANIFEST = "manifest.json"
ALIASES = "aliases.json"
BY_HAND = "promoted by hand"
REPORTED = ("val_loss", "val_ppl", "step", "tokens_seen")


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

    @property
    def val_loss(self) -> float | None:
        """The validation loss recorded with this version: reported by its training run, else measured by the gate."""
        loss = self.manifest.get("metrics", {}).get("val_loss")
        return loss if loss is not None else (self.manifest.get("gate") or {}).get("candidate_val_loss")

    @property
    def tokenizer_hash(self) -> str | None:
        return self.manifest.get("tokenizer_hash") or tokenizer_hash(self.path)


def _numbered(registry: Location, name: str) -> list[Location]:
    return [p for p in (registry / name).iterdir() if p.name.isdigit()]


def _versions(registry: Location, name: str) -> list[int]:
    """The complete versions: a folder is one once its manifest exists."""
    return sorted(int(p.name) for p in _numbered(registry, name) if (p / MANIFEST).is_file())


def _next_version(registry: Location, name: str) -> int:
    """One past every numbered folder, complete or still being written by another registration, so that two
    registrations never pick the same number (a folder a crash left without its manifest only burns a number)."""
    return max((int(p.name) for p in _numbered(registry, name)), default=0) + 1


def weights_hash(model_dir: Location) -> str:
    digest = hashlib.sha256()
    weights = model_dir / "model.safetensors"
    with weights.fs.open_input_stream(weights.path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_hash(model_dir: Location) -> str | None:
    """The tokenizer's identity: a hash of its `tokenizer.json` (as the shards' manifest records it)."""
    path = model_dir / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def register(
    registry: Location | Path | str,
    name: str,
    checkpoint: Location | Path | str,
    lineage: dict[str, Any],
    gate: Callable[[Location], dict[str, Any]] | None = None,
) -> tuple[ModelVersion, bool]:
    """Copy a complete checkpoint into the registry as the next version of `name`.
    Returns the version and whether it is new (False: this checkpoint was registered before, and `gate` is not run).

    `gate(staged_model_dir)` decides on the copied files before the manifest is written; its decision goes into
    the manifest as `gate`. Promoting is the caller's business (`set_best`)."""
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
    target, moved = None, False
    try:
        copy_model_files(checkpoint, staging)
        decision = gate(staging) if gate is not None else None
        version, target = _move_to_next_version(staging, registry, name)
        moved = True
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
        staging.rmtree()
        if moved and not (target / MANIFEST).is_file():  # only what this registration put there
            target.rmtree()
        raise
    return ModelVersion(name, version, target, manifest), True


def _move_to_next_version(staging: Location, registry: Location, name: str, tries: int = 5) -> tuple[int, Location]:
    """Moves the staged files into the next version's folder. Another registration that takes the number first
    makes the move fail (a rename onto a non-empty folder, on a local or POSIX filesystem): then the next one."""
    for attempt in range(1, tries + 1):
        version = _next_version(registry, name)
        target = registry / name / str(version)
        try:
            staging.move(target)
            return version, target
        except OSError:
            if attempt == tries:
                raise


def resolve(registry: Location | Path | str, ref: str) -> ModelVersion:
    """`name`, `name:latest`, `name:best` or `name:<version>` -> the registered version."""
    registry = Location.parse(registry)
    name, _, tag = ref.partition(":")
    versions = _versions(registry, name)
    if not versions:
        known = ", ".join(list_models(registry)) or "none"
        raise RegistryError(f"no model named {name!r} in {registry} (registered: {known})")
    if tag in ("", "latest"):
        version = versions[-1]
    elif tag == "best":
        best = read_aliases(registry, name).get("best")
        if best is None:
            raise RegistryError(
                f"{name}:best: no version of {name} has been promoted yet (none passed the eval gate); versions: "
                f"{versions}; promote one with `raylm models promote {name}:VERSION`"
            )
        version = best["version"]
        if version not in versions:
            raise RegistryError(f"{name}:best points at version {version}, which is gone; versions: {versions}")
    elif tag.isdigit() and int(tag) in versions:
        version = int(tag)
    else:
        raise RegistryError(f"{ref!r}: {name} has versions {versions} (and the aliases 'latest', 'best')")
    path = registry / name / str(version)
    return ModelVersion(name, version, path, read_json(path / MANIFEST))


def list_models(registry: Location | Path | str) -> dict[str, list[int]]:
    registry = Location.parse(registry)
    found = {p.name: _versions(registry, p.name) for p in registry.iterdir() if p.is_dir()}
    return {name: versions for name, versions in found.items() if versions}


def read_aliases(registry: Location | Path | str, name: str) -> dict[str, dict[str, Any]]:
    """The stored aliases of `name`: `{"best": {"version", "promoted_at", "reason"}}`, or {} before any promotion."""
    path = Location.parse(registry) / name / ALIASES
    return read_json(path) if path.is_file() else {}


def aliases_of(registry: Location | Path | str, name: str) -> dict[str, int]:
    """Alias -> version for `name`: `latest` always, `best` once a version was promoted."""
    versions = _versions(Location.parse(registry), name)
    found = {"latest": versions[-1]} if versions else {}
    best = read_aliases(registry, name).get("best")
    if best is not None and best["version"] in versions:
        found["best"] = best["version"]
    return found


def version_aliases(registry: Location | Path | str, name: str, version: int) -> list[str]:
    """The aliases that point at one version, as references (`lm:best`, `lm:latest`)."""
    return [f"{name}:{alias}" for alias, target in sorted(aliases_of(registry, name).items()) if target == version]


def set_best(registry: Location | Path | str, name: str, version: int, reason: str) -> dict[str, Any]:
    """Point `name:best` at `version` (aliases.json, written atomically). Returns the alias record."""
    registry = Location.parse(registry)
    stored = read_aliases(registry, name)
    stored["best"] = {"version": version, "promoted_at": _now(), "reason": reason}
    write_json(registry / name / ALIASES, stored)
    return stored["best"]


def promote(registry: Location | Path | str, ref: str, reason: str = BY_HAND) -> tuple[ModelVersion, int | None]:
    """Make `ref` the best version of its name, past the eval gate. Returns it and the previous best version."""
    found = resolve(registry, ref)
    previous = aliases_of(registry, found.name).get("best")
    set_best(registry, found.name, found.version, reason)
    return found, previous


def describe_models(registry: Location | Path | str) -> dict[str, dict[str, Any]]:
    """Every name's versions and aliases, with the best version's validation perplexity."""
    described = {}
    for name, versions in list_models(registry).items():
        aliases = aliases_of(registry, name)
        best = resolve(registry, f"{name}:best") if "best" in aliases else None
        loss = best.val_loss if best is not None else None
        described[name] = {
            "versions": versions,
            "latest": aliases["latest"],
            "best": aliases.get("best"),
            "best_val_ppl": None if loss is None else round(math.exp(min(loss, 50.0)), 4),
        }
    return described


def run_register(cfg: Config, checkpoint: str | None = None) -> dict[str, Any]:
    """Register `checkpoint`, or by default the run's best sweep trial, or else its training result; run the eval
    gate on a new version and move `best` to it when it passes. Says on stderr why a version was not promoted."""
    from raylm.gate import data_identity, decide  # the gate loads models and data: only when registering

    paths = RunPaths.of(cfg)
    name = cfg.model_name
    source, details = _best_candidate(paths, checkpoint)
    data_hash, data_tokenizer = data_identity(paths.data)
    lineage = {
        "source": source,
        "trial_id": details.get("best_trial"),
        # Reported by the run or trial, on this run's validation split (an explicit checkpoint's are not known to
        # be: the gate measures it on the split instead).
        "metrics": {k: details[k] for k in REPORTED if details.get(k) is not None},
        "data_manifest_hash": data_hash,
        "trial_config": details.get("best_config"),
        "config": public_config(cfg),
    }

    def gate(staged: Location) -> dict[str, Any]:
        best = resolve(paths.registry, f"{name}:best") if "best" in aliases_of(paths.registry, name) else None
        return decide(cfg.registry.gate, staged, lineage["metrics"], paths.data, data_hash, data_tokenizer, best)

    version, created = register(paths.registry, name, details["checkpoint"], lineage, gate)
    decision = version.manifest.get("gate")
    if created and decision is not None and decision["passed"]:
        set_best(paths.registry, name, version.version, decision["reason"])
    best = aliases_of(paths.registry, name).get("best")
    promoted = best == version.version
    _say_outcome(version, created, promoted, decision)
    return {
        "stage": "register",
        "model": version.ref,
        "name": version.name,
        "version": version.version,
        "path": str(version.path),
        "new": created,
        "source": source,
        **version.manifest.get("metrics", {}),
        "promoted": promoted,
        "best": None if best is None else f"{name}:{best}",
        "gate": decision,
    }


def _say_outcome(version: ModelVersion, created: bool, promoted: bool, decision: dict[str, Any] | None) -> None:
    best = f"{version.name}:best"
    if not created:
        say(f"register: this checkpoint is already registered as {version.ref}" + (f" ({best})" if promoted else ""))
    elif promoted:
        say(f"register: {version.ref} registered and promoted to {best}: {escape(decision['reason'])}")
    else:
        reason = escape(decision["reason"]) if decision else "no eval gate ran"
        say(
            f"[yellow]register: {version.ref} registered but NOT promoted to {best}[/yellow]: {reason}. "
            f"To promote it anyway: raylm models promote {version.ref}"
        )


def _best_candidate(paths: RunPaths, checkpoint: str | None) -> tuple[str, dict[str, Any]]:
    if checkpoint:
        return "checkpoint", {"checkpoint": checkpoint}
    for source, result in (("tune", paths.tune / "best.json"), ("train", paths.train / "result.json")):
        if result.is_file():
            return source, read_json(result)
    raise RegistryError(f"nothing to register for run {paths.root.name!r}: run `raylm tune` or `raylm train` first")


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
