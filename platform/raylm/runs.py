"""Where a run's artifacts live, and the one rule every verb follows for an existing `run.name`.

    <run.dir>/<run.name>/data/       tokenizer, shards and manifest (prepare)
    <run.dir>/<run.name>/train/      Ray Train storage: checkpoints of the single training run (train)
    <run.dir>/<run.name>/tune/       Ray Tune storage, one Train run per trial, best.json (tune)
    <run.dir>/registry/<model>/<v>/  registered models (register), shared by all runs

Running a verb again with the same `run.name` reuses or resumes what is there; `--restart` starts over; a changed
config under an existing name is refused (`StageConflict`), because silently mixing two configs in one run is how
results become unexplainable.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from raylm.config import Config
from raylm.digests import fingerprint
from raylm.errors import ConfigError, UsageError
from raylm.redact import public_config, redact_uri
from raylm.storage import Location, read_json, write_json

STAGE_FILE = "stage.json"


class StageConflict(UsageError):
    """An existing stage directory was made with a different config."""


@dataclass(frozen=True)
class RunPaths:
    """A run's locations (on any pyarrow filesystem: `run.dir` may be a local path or a URI such as s3://...)."""

    root: Location
    registry: Location

    @classmethod
    def of(cls, cfg: Config) -> RunPaths:
        base = Location.parse(cfg.run.dir)
        return cls(root=base / cfg.run.name, registry=base / "registry")

    @property
    def data(self) -> Location:
        return self.root / "data"

    @property
    def train(self) -> Location:
        return self.root / "train"

    @property
    def tune(self) -> Location:
        return self.root / "tune"


def stage_config(cfg: Config, stage: str) -> dict[str, Any]:
    """The part of the config that determines a stage's output (what a rerun must agree on)."""
    sections = {
        "prepare": ("data",),
        "train": ("data", "model", "train"),
        "tune": ("data", "model", "train", "tune"),
    }[stage]
    # Redacted: stage.json records it on disk. The hash is of this form too, so a rotated password alone is not a
    # config change.
    public = public_config(cfg)
    return {name: public[name] for name in sections}


SHARDS_FILE = "shards.json"
# Each stage's directory (a RunPaths property) and globs of its durable results inside it.
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "prepare": ("data", ("manifest.json",)),
    "train": ("train", ("result.json", "checkpoint_*")),
    "tune": ("tune", ("best.json", "trials/*")),
}


def _conflict(cfg: Config, stage: str, restart: bool) -> tuple[Location, bool, str | None]:
    """(directory, whether it holds reusable results for this config, the conflict message if any)."""
    attribute, outputs = STAGES[stage]
    directory = getattr(RunPaths.of(cfg), attribute)
    produced = [found.name for pattern in outputs for found in directory.glob(pattern)]
    marker = directory / STAGE_FILE
    if restart or not produced:
        return directory, False, None
    if not marker.is_file():  # results nobody can say the config of: neither reused nor deleted
        return (
            directory,
            False,
            f"{stage}: {directory} holds results ({', '.join(produced[:3])}) but no {STAGE_FILE} saying which config "
            f"made them, so raylm neither reuses nor deletes them: move them away, use another run.name, or "
            f"--restart to discard them",
        )
    wanted = stage_config(cfg, stage)
    recorded = read_json(marker)
    if recorded.get("hash") == fingerprint(wanted):
        return directory, True, None
    changes = ", ".join(_differences(recorded.get("config", {}), wanted)) or "config format"
    return (
        directory,
        False,
        (
            f"{stage}: run '{cfg.run.name}' already exists in {directory} with a different config "
            f"({changes}); use another run.name, or --restart to discard it"
        ),
    )


def check_run_dir_writable(cfg: Config) -> None:
    """Fail with the field named, before any cluster work, when this process cannot write under run.dir (the driver
    writes stage markers, results and the registry there)."""

    probe = Location.parse(cfg.run.dir) / f".raylm-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("raylm checks that run.dir is writable; safe to delete")
        probe.unlink()
    except OSError as err:  # pyarrow's I/O errors are OSErrors too
        raise ConfigError(
            f"run.dir={redact_uri(cfg.run.dir)} is not writable from here: {err.strerror or err}"
        ) from None


def check_stages(cfg: Config, stages: tuple[str, ...], restart: bool) -> None:
    """Raise `StageConflict` now, before any cluster work, if a stage would refuse to run."""
    for stage in stages:
        _, _, conflict = _conflict(cfg, stage, restart)
        if conflict:
            raise StageConflict(conflict)


def claim_stage(cfg: Config, stage: str, restart: bool) -> tuple[Location, bool]:
    """Make the stage's directory this config's. Returns it and whether earlier results there can be reused.

    A directory without durable results (an attempt that failed early) is cleared and taken over; one with results
    is deleted only with `restart`."""
    directory, reusable, conflict = _conflict(cfg, stage, restart)
    if conflict:
        raise StageConflict(conflict)
    if not reusable:
        directory.rmtree()
        directory.mkdir()
        wanted = stage_config(cfg, stage)
        write_json(directory / STAGE_FILE, {"stage": stage, "hash": fingerprint(wanted), "config": wanted})
    return directory, reusable


def check_same_shards(cfg: Config, stage: str, digest: str, reusable: bool) -> None:
    """A stage that resumes must go on with the shards it started on (`digest`: their fingerprint). Preparing again
    with changed inputs (the same data config, other file contents) rebuilds the shards, and a resumed run would
    silently mix two datasets."""
    directory = getattr(RunPaths.of(cfg), STAGES[stage][0])
    marker = directory / SHARDS_FILE
    if reusable and marker.is_file() and read_json(marker)["manifest"] != digest:
        raise StageConflict(
            f"{stage}: run '{cfg.run.name}' started on other shards than those in {RunPaths.of(cfg).data} now "
            "(they were prepared again from changed inputs); use --restart to start over on the new shards, or "
            "another run.name"
        )
    write_json(marker, {"manifest": digest})


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
