"""What a stage that trains (`train`, `tune`, and any later one) does on the driver before its first worker starts,
in one place: read the shards' manifest (nothing to train on is an error now, not in a worker), check the workers
can be placed and that every node sees run.dir, start Ray Data's stats actor from the driver, claim the stage's
folder for this config, check a resumed stage goes on with the same shards, and hand back an earlier finished
result of the same config to reuse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raylm.config import Config
from raylm.data.shards import Manifest, read_manifest, shards_fingerprint
from raylm.nodes import check_placeable, check_run_dir_shared, start_data_stats_actor
from raylm.progress import plain, say
from raylm.runs import RunPaths, check_same_shards, claim_stage
from raylm.storage import Location, read_json


@dataclass(frozen=True)
class StageStart:
    manifest: Manifest
    directory: Location
    reusable: bool
    """Earlier results there were made with this config: a run resumes, a finished one is reused."""
    finished: dict[str, Any] | None
    """The result of an earlier run of this config that finished: the stage returns it as it is."""


def start_training_stage(cfg: Config, stage: str, restart: bool, cpus_per_worker: int, result_file: str) -> StageStart:
    paths = RunPaths.of(cfg)
    manifest = read_manifest(paths.data)
    check_placeable(cfg.train.min_workers, cpus_per_worker, cfg.train.gpus_per_worker)
    check_run_dir_shared(paths.root)
    start_data_stats_actor()
    directory, reusable = claim_stage(cfg, stage, restart)
    check_same_shards(cfg, stage, shards_fingerprint(manifest), reusable)
    result = directory / result_file
    if reusable and result.is_file():
        say(f"{stage}: run '{cfg.run.name}' already finished; reusing {plain(result)}")
        return StageStart(manifest, directory, reusable, read_json(result))
    return StageStart(manifest, directory, reusable, None)
