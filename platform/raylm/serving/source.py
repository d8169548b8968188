"""Where a served model comes from, and the model as a replica holds it.

A source is a model directory, a pinned registry version (`lm:3`), or a registry alias (`lm:best`, `lm:latest`). A
version in a remote registry is downloaded once to a local cache (`~/.cache/raylm/models/`), keyed by its weights'
hash. A replica serving an alias follows it: when the alias moves (a promotion), the new version is loaded beside
the old one and swapped in by one reference assignment, so requests in flight finish on the model they started on.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylm.registry.aliases import resolve, version_aliases
from raylm.serving.admission import longest_token
from raylm.tasks import get_task

FOLLOWED_TAGS = ("", "latest", "best")


@dataclass(frozen=True)
class ModelSource:
    """`path` (a directory) or `registry` + `ref`. Plain strings: Serve keeps a deployment's arguments in its config."""

    path: str | None = None
    registry: str | None = None
    ref: str | None = None

    @property
    def follows_alias(self) -> bool:
        return self.ref is not None and self.ref.partition(":")[2] in FOLLOWED_TAGS


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str
    aliases: list[str]
    version: int | None
    fingerprint: str

    @property
    def names(self) -> set[str]:
        """What a request's `model` may say: the name, the version (`lm:2`) and the aliases pointing at it now."""
        return {self.name, *self.aliases}


def resolve_source(source: ModelSource) -> ResolvedModel:
    """The directory to load, and the names requests may use for it: the model's name, its version, and the aliases
    that point at it now (`lm:latest`, `lm:best`)."""
    if source.path is not None:
        path = Path(source.path).expanduser().resolve()
        return ResolvedModel(path, path.name, [], None, f"raylm-{path.name}")
    found = resolve(source.registry, source.ref)
    aliases = [*version_aliases(source.registry, found.name, found.version), found.ref]
    fingerprint = f"raylm-{found.name}-v{found.version}-{found.manifest['weights_sha256'][:8]}"
    if found.path.is_local:
        return ResolvedModel(found.path.local, found.name, aliases, found.version, fingerprint)
    return ResolvedModel(_cached_copy(found), found.name, aliases, found.version, fingerprint)


def _cached_copy(found) -> Path:
    cache = Path(os.environ.get("RAYLM_CACHE", "~/.cache/raylm")).expanduser() / "models"
    local = cache / f"{found.name}-{found.version}-{found.manifest['weights_sha256'][:12]}"
    if local.is_dir():
        return local
    partial = local.with_name(f".{local.name}.{os.getpid()}.partial")
    try:
        found.path.download(partial)
        partial.rename(local)  # complete or absent
    except OSError:
        if not local.is_dir():  # a failed download: nothing half-written stays behind
            raise
        # Another replica on this node finished the same copy first: its copy is the same files.
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return local


@dataclass
class LoadedModel:
    """What one replica serves: the model, its tokenizer and the names it answers to."""

    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    context: int
    names: set[str] = field(default_factory=set)
    longest_token: int = 1
    """Characters in the tokenizer's longest vocabulary entry (`serving.admission`'s bound before tokenizing)."""
    task: Any = field(default_factory=get_task)
    """What the model does (`raylm.tasks`): which routes it answers."""


def load_model(resolved: ResolvedModel, threads: int, quantize: str | None = None) -> LoadedModel:
    import torch
    from transformers import AutoTokenizer

    from raylm.models import context_length, load_pretrained
    from raylm.serving.quantize import quantize_int8

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = load_pretrained(str(resolved.path)).eval()
    if quantize == "int8":
        quantize_int8(model)
    return LoadedModel(model, tokenizer, resolved, context_length(model), resolved.names, longest_token(tokenizer))
