"""The tune stage: Ray Tune sweeps `train.*` fields (learning rate, batch size, ...) over the same shards.

Train V2 pattern: each trial runs a small driver function that builds its own `TorchTrainer` (with
`TuneReportCallback`, which forwards rank 0's metrics and the checkpoint path to Tune) and calls `fit()`. The driver
function holds only a sliver of a CPU, so concurrent trials leave CPUs for their workers and for Ray Data. The
nested Train run is named after the trial id, so a restored sweep resumes its trials too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raylm.cluster import ResourcePlan, check_placeable
from raylm.config import Config, validate_config
from raylm.data.shards import read_manifest
from raylm.progress import progress, say
from raylm.runs import RunPaths, claim_stage, read_json, write_json
from raylm.storage import Location
from raylm.train.trainer import build_trainer

BEST_FILE = "best.json"
DRIVER_CPUS = 0.01
"""A trial's driver function only waits on its trainer; `{"CPU": 0}` is refused by Tune, a sliver works."""


def search_space(cfg: Config) -> dict[str, Any]:
    from ray import tune

    samplers = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    space = {}
    for key, spec in cfg.tune.space.items():
        ((kind, values),) = spec.items()
        space[key] = samplers[kind](values)
    return space


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with a trial's `train.*` values applied, validated like any config."""
    tree = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}
    for key, value in params.items():
        section, leaf = key.split(".", 1)
        tree[section][leaf] = value
    return validate_config(tree)


def train_driver_per_trial(params: dict[str, Any], base: dict[str, Any], data_dir: str, cpus_per_worker: int) -> None:
    """Runs inside a Tune trial: one `TorchTrainer` for this trial's config."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    storage = RunPaths.of(cfg).tune / "trials"
    trainer = build_trainer(
        cfg, Location.parse(data_dir), storage, trial_id, cpus_per_worker, callbacks=[TuneReportCallback()]
    )
    trainer.fit()


def reports_per_trial(cfg: Config) -> int:
    train_blocks = read_manifest(RunPaths.of(cfg).data)["splits"]["train"]["blocks"]
    return math.ceil(cfg.train.total_steps(train_blocks) / cfg.train.eval_every)


def build_tuner(cfg: Config, plan: ResourcePlan, restore: bool, callbacks: list | None = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    paths = RunPaths.of(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(
            train_driver_per_trial,
            base=cfg.model_dump(mode="json"),
            data_dir=str(paths.data),
            cpus_per_worker=plan.trial_cpus_per_worker,
        ),
        {"CPU": DRIVER_CPUS},
    )
    if restore:
        return tune.Tuner.restore(str(paths.tune), trainable=trainable, resume_errored=True)
    if cfg.tune.scheduler == "asha":
        reports = reports_per_trial(cfg)  # reads the shards' manifest: once
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=reports,
            grace_period=min(cfg.tune.asha.grace_period, reports),
            reduction_factor=cfg.tune.asha.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=plan.concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=paths.tune.name,
            storage_path=str(paths.root),
            verbose=0,
            callbacks=callbacks,
        ),
    )


def run_tune(cfg: Config, plan: ResourcePlan, restart: bool = False) -> dict[str, Any]:
    from ray import tune

    paths = RunPaths.of(cfg)
    read_manifest(paths.data)  # fail before starting trials when there is nothing to train on
    check_placeable(cfg.train.min_workers, plan.trial_cpus_per_worker, cfg.train.gpus_per_worker)
    _, reusable = claim_stage(cfg, "tune", restart)
    if reusable and (paths.tune / BEST_FILE).is_file():
        say(f"tune: sweep '{cfg.run.name}' already finished; reusing {paths.tune / BEST_FILE}")
        return read_json(paths.tune / BEST_FILE)
    restore = reusable and tune.Tuner.can_restore(str(paths.tune))
    say(
        f"tune: {cfg.tune.num_samples} sample(s) of {list(cfg.tune.space)}, {plan.concurrent_trials} at a time, "
        f"{cfg.train.workers_label} worker(s) x {plan.trial_cpus_per_worker} CPU each"
        + (" (resuming the interrupted sweep)" if restore else "")
    )
    started = time.monotonic()
    with progress("tune", total=_expected_trials(cfg)) as update:
        SweepProgress.active = update
        try:
            grid = build_tuner(cfg, plan, restore, callbacks=[SweepProgress()]).fit()
        finally:
            SweepProgress.active = None
    summary = summarize(grid, list(cfg.tune.space), started, paths.root)
    write_json(paths.tune / BEST_FILE, summary)
    return summary


def _expected_trials(cfg: Config) -> int:
    grids = [len(spec["grid"]) for spec in cfg.tune.space.values() if "grid" in spec]
    return cfg.tune.num_samples * math.prod(grids)


def summarize(grid, params: list[str], started: float, storage: Location) -> dict[str, Any]:
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trials.append(
            {
                "trial_id": metrics.get("trial_id") or Path(result.path).name,
                **{key: result.config.get(key) for key in params},
                "steps": metrics.get("step"),
                "val_loss": metrics.get("val_loss"),
                "val_ppl": metrics.get("val_ppl"),
                # Ray reports the path inside the storage filesystem; as a URI it names the filesystem too.
                "checkpoint": str(Location(storage.fs, metrics["checkpoint_path"]))
                if metrics.get("checkpoint_path")
                else None,
                "status": "error" if result.error else "ok",
            }
        )
    finished = [t for t in trials if t["status"] == "ok" and t["val_loss"] is not None and t["checkpoint"]]
    if not finished:
        errors = [str(result.error).splitlines()[0] for result in grid if result.error][:3]
        raise RuntimeError(f"tune: no trial finished ({len(trials)} tried); first errors: {errors}")
    best = min(finished, key=lambda t: t["val_loss"])
    return {
        "stage": "tune",
        "best_trial": best["trial_id"],
        "best_config": {key: best[key] for key in params},
        "val_loss": best["val_loss"],
        "val_ppl": best["val_ppl"],
        "checkpoint": best["checkpoint"],
        "trials": trials,
        "errored": sum(t["status"] == "error" for t in trials),
        "seconds": round(time.monotonic() - started, 2),
    }


class SweepProgress(Callback):
    """Tune callbacks run on the driver: feed the one progress display with finished trials and the best loss.

    Tune pickles its callbacks with the experiment (to restore it), so the display is looked up, not held."""

    active: Callable[..., None] | None = None

    def __init__(self) -> None:
        self.done = 0
        self.best = math.inf

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.best = min(self.best, result.get("val_loss", math.inf))
        self._show(len(trials))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self._show(len(trials))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.on_trial_complete(iteration, trials, trial)

    def _show(self, started: int) -> None:
        best = f"best val {self.best:.3f}" if math.isfinite(self.best) else ""
        if SweepProgress.active:
            SweepProgress.active(self.done, f"{started} started  {best}")
