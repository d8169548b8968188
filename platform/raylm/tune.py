"""The tune stage: Ray Tune sweeps `train.*` fields (learning rate, batch size, ...) over the same shards.

Train V2 pattern: each trial runs a small driver function that builds its own `TorchTrainer` (with
`TuneReportCallback`, which forwards rank 0's metrics and the checkpoint path to Tune) and calls `fit()`. The driver
function holds only a sliver of a CPU, so concurrent trials leave CPUs for their workers and for Ray Data. The
nested Train run is named after the trial id, so a restored sweep resumes its trials too.

Trials are budgeted and compared in tokens seen, not steps: a trial with twice the batch size takes half the steps.
ASHA's time axis is `tokens_seen`, so its rungs compare trials that have trained on as much data.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from raylm.cluster import (
    ResourcePlan,
    check_placeable,
    check_run_dir_shared,
    release_train_reservation,
    start_data_stats_actor,
)
from raylm.config import Config, ConfigError, validate_config
from raylm.data.shards import read_manifest
from raylm.progress import plain, progress, say
from raylm.runs import RunPaths, check_same_shards, claim_stage, read_json, write_json
from raylm.storage import Location
from raylm.train.trainer import build_trainer
from raylm.tune_results import SweepFailed, SweepInterrupted, show_results, trial_rows, write_results

BEST_FILE = "best.json"
DRIVER_CPUS = 0.01
"""A trial's driver function only waits on its trainer; `{"CPU": 0}` is refused by Tune, a sliver works."""


@dataclass(frozen=True)
class Budget:
    """Each trial's training length, validation cadence and ASHA's first rung, all in tokens seen."""

    tokens: int
    eval_tokens: int
    grace_tokens: int | None
    seq_len: int

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.tokens / (batch_size * self.seq_len))

    def eval_every(self, batch_size: int) -> int:
        return math.ceil(self.eval_tokens / (batch_size * self.seq_len))


def sweep_budget(cfg: Config, manifest: dict[str, Any]) -> Budget:
    seq_len = manifest["seq_len"]
    train_blocks = manifest["splits"]["train"]["blocks"]
    tokens = cfg.tune.budget_tokens or cfg.train.total_steps(train_blocks) * cfg.train.batch_size * seq_len
    asha = cfg.tune.scheduler.asha
    grace = None
    if asha is not None:
        grace = asha.grace_tokens or max(1, int(tokens / asha.reduction_factor**2))
        if grace > tokens:
            raise ConfigError(
                f"tune.scheduler.asha.grace_tokens={grace} is more than the budget of {tokens} tokens per trial "
                "(tune.budget_tokens): ASHA could never stop a trial"
            )
    eval_tokens = cfg.tune.eval_tokens or grace or max(1, tokens // 10)
    return Budget(tokens=tokens, eval_tokens=min(eval_tokens, tokens), grace_tokens=grace, seq_len=seq_len)


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


def trial_config(base: dict[str, Any], params: dict[str, Any], budget: Budget) -> Config:
    """The base config with a trial's `train.*` values and its token budget applied, validated like any config."""
    tree = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}
    for key, value in params.items():
        section, leaf = key.split(".", 1)
        tree[section][leaf] = value
    batch_size = validate_config(tree).train.batch_size
    tree["train"].update(epochs=None, max_steps=budget.steps(batch_size), eval_every=budget.eval_every(batch_size))
    return validate_config(tree)


def train_driver_per_trial(
    params: dict[str, Any], base: dict[str, Any], budget: Budget, data_dir: Location, cpus_per_worker: int
) -> None:
    """Runs inside a Tune trial: one `TorchTrainer` for this trial's config."""
    from ray import tune

    cfg = trial_config(base, params, budget)
    trial_id = tune.get_context().get_trial_id()
    storage = RunPaths.of(cfg).tune / "trials"
    trainer = build_trainer(cfg, data_dir, storage, trial_id, cpus_per_worker, callbacks=[ReportWithTrainRunId()])
    trainer.fit()


TRAIN_RUN_ID = "train_run_id"


class ReportWithTrainRunId(TuneReportCallback):
    """Tune's report callback (rank 0's metrics and the checkpoint path to the trial), plus the id of the trial's
    Train run: the sweep's driver needs it to give back the run's reservation when Tune stops the trial."""

    def after_report(self, run_context, metrics, checkpoint) -> None:
        first = {**metrics[0], TRAIN_RUN_ID: run_context.run_id}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


class ReleaseEndedTrials(Callback):
    """Gives back each ended trial's Train reservation (`cluster.release_train_reservation`): at once, and again
    once the dead controller's renewal interval (20 s) has passed, in case it renewed while it was being stopped."""

    AGAIN_AFTER_S = 25.0

    def __init__(self) -> None:
        self.again_at: dict[str, float] = {}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = (trial.last_result or {}).get(TRAIN_RUN_ID)
        if run_id:
            release_train_reservation(run_id)
            self.again_at[run_id] = time.monotonic() + self.AGAIN_AFTER_S

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.on_trial_complete(iteration, trials, trial)

    def on_step_begin(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        for run_id, at in list(self.again_at.items()):
            if at <= now:
                release_train_reservation(run_id)
                del self.again_at[run_id]

    def on_experiment_end(self, trials, **info) -> None:
        for run_id in self.again_at:
            release_train_reservation(run_id)
        self.again_at.clear()


def build_scheduler(cfg: Config, budget: Budget):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = cfg.tune.scheduler.asha
    if asha is None:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="tokens_seen",
        max_t=budget.tokens,
        grace_period=budget.grace_tokens,
        reduction_factor=asha.reduction_factor,
    )


def storage_filesystem(location: Location):
    """What Ray takes as `storage_filesystem`: None for a local path (Ray's default), else the location's own."""
    return None if location.is_local else location.fs


def build_tuner(cfg: Config, plan: ResourcePlan, budget: Budget, restore: bool, callbacks: list | None = None):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    paths = RunPaths.of(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(
            train_driver_per_trial,
            base=cfg.model_dump(mode="json"),
            budget=budget,
            data_dir=paths.data,  # a Location: its filesystem's options travel with it
            cpus_per_worker=plan.trial_cpus_per_worker,
        ),
        {"CPU": DRIVER_CPUS},
    )
    if restore:
        # Errored trials stay errored (a diverged lr diverges again); interrupted and pending ones run.
        storage = storage_filesystem(paths.tune)
        return tune.Tuner.restore(paths.tune.path, trainable, resume_errored=False, storage_filesystem=storage)
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            scheduler=build_scheduler(cfg, budget),
            num_samples=cfg.tune.samples,
            # Sampled with train.seed: the same config draws the same trials. (With a search algorithm given,
            # Tune ignores TuneConfig.max_concurrent_trials: the generator limits concurrency itself.)
            search_alg=BasicVariantGenerator(max_concurrent=plan.concurrent_trials, random_state=cfg.train.seed),
        ),
        run_config=tune.RunConfig(
            name=paths.tune.name,
            # The run.dir's own filesystem, options and credentials included (a URI string would lose them).
            storage_path=paths.root.path,
            storage_filesystem=storage_filesystem(paths.root),
            verbose=0,
            callbacks=callbacks,
        ),
    )


def run_tune(cfg: Config, plan: ResourcePlan, restart: bool = False) -> dict[str, Any]:
    from ray import tune

    paths = RunPaths.of(cfg)
    manifest = read_manifest(paths.data)  # fail before starting trials when there is nothing to train on
    budget = sweep_budget(cfg, manifest)
    check_placeable(cfg.train.min_workers, plan.trial_cpus_per_worker, cfg.train.gpus_per_worker)
    check_run_dir_shared(RunPaths.of(cfg).root)
    start_data_stats_actor()
    _, reusable = claim_stage(cfg, "tune", restart)
    check_same_shards(cfg, "tune", manifest, reusable)
    if reusable and (paths.tune / BEST_FILE).is_file():
        say(f"tune: sweep '{cfg.run.name}' already finished; reusing {plain(paths.tune / BEST_FILE)}")
        return read_json(paths.tune / BEST_FILE)
    restore = reusable and tune.Tuner.can_restore(paths.tune.path, storage_filesystem(paths.tune))
    if cfg.tune.samples < cfg.tune.num_samples:
        say(
            f"tune: every parameter is a grid, so each configuration runs once (tune.num_samples="
            f"{cfg.tune.num_samples} would rerun the same configurations with the same train.seed)"
        )
    say(
        f"tune: {cfg.tune.trial_count} trial(s) over {list(cfg.tune.space)} with {cfg.tune.scheduler.name}, "
        f"{budget.tokens:,} tokens per trial, {plan.concurrent_trials} at a time, "
        f"{cfg.train.workers_label} worker(s) x {plan.trial_cpus_per_worker} CPU each"
        + (" (resuming the interrupted sweep)" if restore else "")
    )
    started = time.monotonic()
    with progress("tune", total=cfg.tune.trial_count) as update:
        SweepProgress.active = update
        try:
            grid, stopped_by_signal = fit_noting_interrupt(
                build_tuner(cfg, plan, budget, restore, [SweepProgress(), ReleaseEndedTrials()])
            )
        finally:
            SweepProgress.active = None
    if stopped_by_signal or len(grid) < cfg.tune.trial_count:
        raise SweepInterrupted()
    rows = trial_rows(grid, list(cfg.tune.space), budget.tokens, paths.tune)
    summary = summarize(rows, list(cfg.tune.space), budget, time.monotonic() - started)
    write_results(rows, summary, paths.tune)
    write_json(paths.tune / BEST_FILE, summary)  # before the table: the sweep's outcome never hangs on printing
    show_results(rows, summary)
    return summary


def fit_noting_interrupt(tuner):
    """`tuner.fit()` and whether Ctrl-C ended it. Tune's SIGINT handler saves the sweep and lets `fit` return normally
    (its trials look finished); once it fires it puts back the handler it replaced, which is how we know. (A trial's
    last result is no witness: its `done` flag reaches Tune's saved state or not, by a race.) The old handler goes
    back either way: after a normal sweep Tune leaves its own installed, and Ctrl-C in a later stage would be lost."""
    before = signal.getsignal(signal.SIGINT)
    tune_catches = threading.current_thread() is threading.main_thread() and not int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")
    )
    try:
        grid = tuner.fit()
    finally:
        after = signal.getsignal(signal.SIGINT)
        if tune_catches:
            signal.signal(signal.SIGINT, before)
    return grid, tune_catches and after is before


def summarize(rows: list[dict[str, Any]], params: list[str], budget: Budget, seconds: float) -> dict[str, Any]:
    """The best trial (lowest validation loss among those that did not error) and the sweep's counts."""
    candidates = [row for row in rows if row["status"] != "error" and row["val_loss"] is not None]
    candidates = [row for row in candidates if row["checkpoint"]]
    if not candidates:
        errors = [row["error"] for row in rows if row.get("error")][:3]
        raise SweepFailed(f"tune: no trial finished ({len(rows)} tried); first errors: {errors}")
    best = min(candidates, key=lambda row: row["val_loss"])
    return {
        "stage": "tune",
        "best_trial": best["trial_id"],
        "best_config": {key: best[key] for key in params},
        "val_loss": best["val_loss"],
        "val_ppl": best["val_ppl"],
        "step": best["steps"],
        "tokens_seen": best["tokens_seen"],
        "checkpoint": best["checkpoint"],
        "budget_tokens": budget.tokens,
        "trials": [{key: value for key, value in row.items() if key != "curve"} for row in rows],
        "stopped_early": sum(row["status"] == "stopped" for row in rows),
        "errored": sum(row["status"] == "error" for row in rows),
        "seconds": round(seconds, 2),
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
