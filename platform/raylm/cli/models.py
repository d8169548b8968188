"""`raylm models`: list, show and promote registered models."""

from __future__ import annotations

from typing import Annotated

import typer

from raylm.cli.app import ConfigOption, Overrides, models_app
from raylm.cli.running import emit, fail, load


@models_app.command("list")
def models_list(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Registered models: versions and aliases (latest, best with its validation perplexity)."""
    from raylm.progress import say
    from raylm.registry.aliases import describe_models
    from raylm.registry.store import RegistryError
    from raylm.runs import RunPaths

    cfg = load(config, overrides)
    registry = RunPaths.of(cfg).registry
    try:
        models = describe_models(registry)
    except RegistryError as err:
        fail(str(err), 1)
    for name, info in models.items():
        best = "none promoted" if info["best"] is None else f"{name}:{info['best']}"
        if info["best_val_ppl"] is not None:
            best += f" (val_ppl {info['best_val_ppl']:.4g})"
        say(f"{name}: versions {info['versions']}, latest {name}:{info['latest']}, best {best}")
    emit({"registry": str(registry), "models": models})


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="name, name:latest, name:best or name:VERSION")],
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """One registered version's manifest (lineage, metrics, eval gate) and the aliases that point at it."""
    from raylm.registry.aliases import resolve, version_aliases
    from raylm.registry.store import RegistryError
    from raylm.runs import RunPaths

    cfg = load(config, overrides)
    registry = RunPaths.of(cfg).registry
    try:
        found = resolve(registry, ref)
        aliases = version_aliases(registry, found.name, found.version)
    except RegistryError as err:
        fail(str(err), 1)
    emit({"model": found.ref, "path": str(found.path), "aliases": aliases, **found.manifest})


@models_app.command("promote")
def models_promote(
    ref: Annotated[str, typer.Argument(help="name:VERSION to make name:best, past the eval gate")],
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Point `name:best` at a version by hand (recorded as "promoted by hand")."""
    from raylm.progress import say
    from raylm.registry.aliases import BY_HAND, promote
    from raylm.registry.store import RegistryError
    from raylm.runs import RunPaths

    cfg = load(config, overrides)
    try:
        found, previous = promote(RunPaths.of(cfg).registry, ref)
    except RegistryError as err:
        fail(str(err), 1)
    before = "none" if previous is None else f"{found.name}:{previous}"
    say(f"{found.name}:best is now {found.ref} (was {before}), {BY_HAND}")
    emit({"model": found.ref, "alias": f"{found.name}:best", "previous": previous, "reason": BY_HAND})
