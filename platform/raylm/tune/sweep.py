"""The sweep: Ray Tune sweeps `train.*` fields (learning rate, batch size, ...) over the same shards.

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

from raylm.cluster import ResourcePlan
from raylm.config import Config, ConfigError, validate_config
from raylm.data.shards import Manifest
from raylm.errors import user_error
from raylm.progress import progress_bar, say
from raylm.runs import RunPaths
from raylm.storage import Location, write_json
from raylm.tasks import get_task
from raylm.train.stage import start_training_stage
from raylm.train.trainer import build_trainer
from raylm.tune.results import SweepFailed, SweepInterrupted, show_results, trial_rows, write_results
from raylm.tune.workarounds import ReleaseEndedTrials, ReportWithTrainRunId

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


def sweep_budget(cfg: Config, manifest: Manifest) -> Budget:
    seq_len = manifest.seq_len
    train_blocks = manifest.train_blocks
    tokens = cfg.tune.budget_tokens or cfg.train.total_steps(train_blocks) * cfg.train.batch_size * seq_len
    try:
        grace = cfg.tune.asha_grace(tokens)
    except ValueError as err:
        raise ConfigError(str(err)) from None
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

    paths, task = RunPaths.of(cfg), get_task()
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
            metric=task.metric,
            mode=task.mode,
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
    start = start_training_stage(cfg, "tune", restart, plan.trial_cpus_per_worker, BEST_FILE)
    if start.finished is not None:
        return start.finished
    budget = sweep_budget(cfg, start.manifest)
    restore = start.reusable and tune.Tuner.can_restore(paths.tune.path, storage_filesystem(paths.tune))
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
    with progress_bar("tune", total=cfg.tune.trial_count) as update:
        SweepDisplay.active = update
        try:
            grid, stopped_by_signal = fit_noting_interrupt(
                build_tuner(cfg, plan, budget, restore, [SweepDisplay(), ReleaseEndedTrials()])
            )
        finally:
            SweepDisplay.active = None
    if stopped_by_signal or len(grid) < cfg.tune.trial_count:
        raise SweepInterrupted()
    rows = trial_rows(grid, list(cfg.tune.space), budget.tokens, paths.tune)
    try:
        summary = sweep_summary(rows, list(cfg.tune.space), budget, time.monotonic() - started)
    except SweepFailed as err:
        # No trial finished: when a raylm error made them fail (the user's model, say), it is the one to show.
        causes = [user_error(result.error) for result in grid if result.error is not None]
        raise err from next((cause for cause in causes if cause is not None), None)
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


def sweep_summary(rows: list[dict[str, Any]], params: list[str], budget: Budget, seconds: float) -> dict[str, Any]:
    """The best trial (lowest validation loss among those that did not error) and the sweep's counts."""
    candidates = [row for row in rows if row["status"] != "error" and row["val_loss"] is not None]
    candidates = [row for row in candidates if row["checkpoint"]]
    if not candidates:
        errors = [row["error"] for row in rows if row.get("error")][:3]
        raise SweepFailed(f"tune: no trial finished ({len(rows)} tried); first errors: {errors}")
    task = get_task()
    best = candidates[0]
    for row in candidates[1:]:
        if task.better(row[task.metric], best[task.metric]):
            best = row
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


class SweepDisplay(Callback):
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
        if SweepDisplay.active:
            SweepDisplay.active(self.done, f"{started} started  {best}")
