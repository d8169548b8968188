"""Ray 2.60 workarounds a sweep needs, apart so that they can be deleted when Ray fixes them.

Ray 2.60's Train controller reserves its worker group's resources with Ray Data's coordinator and cancels the
reservation only when it shuts down cleanly; a trial Tune stops dies with its actor, and its reservation holds the
next trial's data stream back until it expires (`nodes.release_train_reservation`, figures in bench/README.md). Tune
does not say which Train run a trial ran: the report callback adds it, and a driver-side callback gives each ended
trial's reservation back.
"""

from __future__ import annotations

import time

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from raylm.nodes import release_train_reservation

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
