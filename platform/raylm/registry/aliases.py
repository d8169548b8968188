"""`<name>:best`, stored in `registry/<name>/aliases.json` with the history of promotions; `<name>:latest`, computed.

`aliases.json` is replaced only if it is still the copy read (`raylm.conditional`: S3's `If-Match` on its ETag, a
lock file on a local or NFS path), and a promotion asks its caller again whenever it finds another best than the one
it read, so two promotions at once never leave the worse model as best.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape

from raylm.conditional import conditional_writes
from raylm.progress import say
from raylm.registry.store import (
    ModelVersion,
    RegistryError,
    _now,
    _number,
    _versions,
    check_name,
    list_models,
    open_version,
)
from raylm.storage import Location
from raylm.tasks.causal_lm import perplexity

ALIASES = "aliases.json"
BY_HAND = "promoted by hand"


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
    return open_version(registry, name, version)


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
            "best_val_ppl": None if loss is None else round(perplexity(loss), 4),
        }
    return described
