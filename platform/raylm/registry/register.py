"""`raylm register`: the run's best candidate (the best sweep trial, else the trained run, or a checkpoint given)
into the registry as a new version with its lineage; the eval gate decides whether it becomes `<name>:best`."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from raylm.config import Config
from raylm.progress import say
from raylm.redact import public_config
from raylm.registry.aliases import aliases_of, resolve, set_best, was_promoted
from raylm.registry.gate import data_identity, decide
from raylm.registry.store import ModelVersion, RegistryError, register
from raylm.runs import RunPaths
from raylm.storage import Location, read_json

REPORTED = ("val_loss", "val_ppl", "step", "tokens_seen")


def run_register(cfg: Config, checkpoint: str | None = None) -> dict[str, Any]:
    """Register `checkpoint`, or by default the run's best sweep trial, or else its training result; run the eval
    gate on a new version and move `best` to it when it passes. Says on stderr why a version was not promoted."""
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
