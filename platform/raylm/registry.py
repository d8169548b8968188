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

import hashlib
import json
import math
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
from raylm.config import Config
from raylm.progress import say
from raylm.redact import public_config, redact
from raylm.runs import RunPaths, read_json, write_json
from raylm.storage import Location
from raylm.train.checkpoint import checkpoint_problem, copy_model_files, sha256_of

MANIFEST = "manifest.json"
ALIASES = "aliases.json"
CLAIM = ".claim"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
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


def resolve(registry: Location | Path | str, ref: str) -> ModelVersion:
    """`name`, `name:latest`, `name:best` or `name:<version>` -> the registered version."""
    registry = Location.parse(registry)
    name, _, tag = ref.partition(":")
    check_name(name)
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
    elif _number(tag) in versions:
        version = _number(tag)
    else:
        raise RegistryError(f"{ref!r}: {name} has versions {versions} (and the aliases 'latest', 'best')")
    path = registry / name / str(version)
    return ModelVersion(name, version, path, read_version_manifest(path / MANIFEST))


def list_models(registry: Location | Path | str) -> dict[str, list[int]]:
    registry = Location.parse(registry)
    found = {p.name: _versions(registry, p.name) for p in registry.iterdir() if p.is_dir()}
    return {name: versions for name, versions in found.items() if versions}


def _aliases_from(data: bytes | None, path: Location) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        stored = json.loads(data)
    except ValueError as err:
        stored = err
    best = stored.get("best") if isinstance(stored, dict) else None
    if (
        not isinstance(stored, dict)
        or (best is not None and not isinstance(best, dict))
        or (isinstance(best, dict) and _number(str(best.get("version"))) is None)
    ):
        reason = stored if isinstance(stored, ValueError) else "not an aliases record"
        raise RegistryError(
            f"{path} is corrupt ({reason}): it only records which version is best; delete it and promote again "
            f"with `raylm models promote`"
        )
    return stored


def read_aliases(registry: Location | Path | str, name: str) -> dict[str, Any]:
    """The stored aliases of `name`: `{"best": {"version", "promoted_at", "reason"}, "history": [...]}`, or {}
    before any promotion."""
    path = Location.parse(registry) / name / ALIASES
    return _aliases_from(path.read_bytes() if path.is_file() else None, path)


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


def set_best(
    registry: Location | Path | str,
    name: str,
    version: int,
    reason: str,
    better: Callable[[int | None], bool] | None = None,
) -> bool:
    """Point `name:best` at `version`, unless `better(current best version)` says the best found at the moment of
    writing should stay. aliases.json is replaced only if it is still the copy read: when another promotion got
    there first, the new best is read and `better` asked again. Returns whether `version` is best now."""
    path = Location.parse(registry) / name / ALIASES
    writes = conditional_writes(path)
    for _ in range(100):
        data, tag = writes.read(path)
        stored = _aliases_from(data, path)
        current = (stored.get("best") or {}).get("version")
        if current == version:
            return True
        if better is not None and not better(current):
            return False
        record = {"version": version, "promoted_at": _now(), "reason": reason}
        updated = {**stored, "best": record, "history": [*stored.get("history", []), record]}
        if writes.replace(path, json.dumps(updated, indent=2).encode(), tag):
            return True
    raise RegistryError(f"could not update {path}: other promotions kept changing it")


def was_promoted(registry: Location | Path | str, name: str, version: int) -> bool:
    """Whether `version` was ever `best` (it may have been replaced since)."""
    stored = read_aliases(registry, name)
    return any(entry.get("version") == version for entry in stored.get("history", [stored.get("best") or {}]))


def promote(registry: Location | Path | str, ref: str, reason: str = BY_HAND) -> tuple[ModelVersion, int | None]:
    """Make `ref` the best version of its name, past the eval gate. Returns it and the previous best version."""
    found = resolve(registry, ref)
    previous: list[int | None] = []

    def note(current: int | None) -> bool:
        previous.append(current)
        return True

    set_best(registry, found.name, found.version, reason, note)
    return found, (previous[-1] if previous else found.version)


def describe_models(registry: Location | Path | str) -> dict[str, dict[str, Any]]:
    """Every name's versions and aliases, with the best version's validation perplexity."""
    described = {}
    for name, versions in list_models(registry).items():
        aliases = aliases_of(registry, name)
        try:
            best = resolve(registry, f"{name}:best") if "best" in aliases else None
        except RegistryError as err:  # a corrupt manifest: listed, and said
            say(f"[yellow]warning:[/yellow] {escape(str(err))}")
            best = None
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

    def gate(candidate: Location, best: ModelVersion | None = None) -> dict[str, Any]:
        best = best or _current_best(paths.registry, name)
        return decide(cfg.registry.gate, candidate, lineage["metrics"], paths.data, data_hash, data_tokenizer, best)

    checkpoint = paths.root.within(details["checkpoint"])  # the run.dir's filesystem options reattached
    version, created = register(paths.registry, name, checkpoint, lineage, gate)
    decision = version.manifest.get("gate")
    # A rerun after a crash between registering and promoting finishes the promotion (once: a version promoted
    # before and replaced since is not promoted again).
    if (
        decision is not None
        and decision["passed"]
        and (created or not was_promoted(paths.registry, name, version.version))
    ):

        def better(current: int | None) -> bool:
            if current == decision.get("best_version"):
                return True  # the best the gate compared against
            # Another registration promoted a version since: this one must beat that one too.
            return current is None or gate(version.path, resolve(paths.registry, f"{name}:{current}"))["passed"]

        set_best(paths.registry, name, version.version, decision["reason"], better)
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


def _current_best(registry: Location, name: str) -> ModelVersion | None:
    return resolve(registry, f"{name}:best") if "best" in aliases_of(registry, name) else None


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
