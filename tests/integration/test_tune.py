"""tune: real Ray Tune trials, each a TorchTrainer over the same shards, budgeted in tokens; ASHA stops the weak,
a diverging trial errors without sinking the sweep, an interrupted sweep resumes; the best trial is registered."""

import csv
import json
import math
import signal
from pathlib import Path

import pytest

from raylm.cluster import plan_resources
from raylm.config import load_config, validate_config
from raylm.data.prepare import run_prepare
from raylm.nodes import TRAIN_RESERVATION_PREFIX
from raylm.registry.aliases import resolve
from raylm.registry.register import run_register
from raylm.runs import RunPaths
from raylm.train.observe import read_metrics
from raylm.tune.sweep import run_tune
from tests.conftest import interrupt_cli, tiny_overrides

pytestmark = pytest.mark.timeout(600)

BUDGET = 3072  # tokens per trial: 12 steps at batch 8 x seq_len 32, 24 steps at batch 4
EVAL = 1024  # the validation (report) cadence
RUNG = 2048  # ASHA's one rung: early on a good lr's warm-up bump can score worse than a tiny lr's flat start


def sweep_config(base, **tune):
    tree = base.model_dump(mode="json")
    tree["registry"] = {"name": "sweep"}
    tree["train"]["max_failures"] = 0  # a diverged trial diverges again: no retries to wait for
    tree["tune"] = {"budget_tokens": BUDGET, "eval_tokens": EVAL, "max_concurrent_trials": 1, **tune}
    return validate_config(tree)  # same run.name: the sweep reads the shards prepared for it


def alive_training_actors():
    from ray.util.state import list_actors, list_placement_groups

    actors = [
        a.class_name
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if "Train" in a.class_name or "ImplicitFunc" in a.class_name
    ]
    groups = list_placement_groups(filters=[("state", "=", "CREATED")], limit=1000)
    return actors, groups


def train_reservations():
    """The Ray Train runs holding a reservation with Ray Data's coordinator (its private state: no API lists it)."""
    import ray

    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    held = ray.get(coordinator.__ray_call__.remote(lambda self: list(self._ongoing_reqs)))
    return [requester for requester in held if requester.startswith(TRAIN_RESERVATION_PREFIX)]


def test_asha_stops_the_weak_survives_a_diverging_trial_and_registers_the_best(prepared, capsys):
    base, _ = prepared
    cfg = sweep_config(
        base,
        # One trial at a time, in this order: the good lr sets the bar at the first rung, the tiny lr falls under it
        # and is stopped there, lr=100 diverges (NaN loss) and errors.
        space={"train.lr": {"grid": [3e-3, 1e-6, 100.0]}, "train.batch_size": {"choice": [4, 8]}},
        num_samples=1,
        scheduler={"asha": {"grace_tokens": RUNG, "reduction_factor": 3}},
    )
    summary = run_tune(cfg, plan_resources(cfg, embedded=True))

    trials = {t["train.lr"]: t for t in summary["trials"]}
    assert [t["status"] for t in (trials[3e-3], trials[1e-6], trials[100.0])] == ["done", "stopped", "error"]
    assert summary["stopped_early"] == 1 and summary["errored"] == 1
    assert "training diverged: the loss is nan" in trials[100.0]["error"]
    # Budgeted in tokens: the finished trial took as many steps as its batch size needs for the budget...
    done = trials[3e-3]
    assert done["tokens_seen"] == BUDGET
    assert done["steps"] == math.ceil(BUDGET / (done["train.batch_size"] * cfg.data.seq_len))
    # ...and ASHA stopped the weak one at its first rung, before its budget.
    assert trials[1e-6]["tokens_seen"] == RUNG < BUDGET
    assert trials[1e-6]["val_loss"] > done["val_loss"]
    assert summary["best_trial"] == done["trial_id"] and summary["val_loss"] == done["val_loss"]
    assert summary["best_config"] == {"train.lr": 3e-3, "train.batch_size": done["train.batch_size"]}
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)
    assert Path(summary["checkpoint"], "model.safetensors").is_file()
    assert Path(summary["checkpoint"]).is_relative_to((RunPaths.of(cfg).tune / "trials" / done["trial_id"]).local)

    # Stopped and errored trials gave their workers and placement groups back.
    actors, groups = alive_training_actors()
    assert actors == [] and groups == []
    # ...and their Train runs' CPU reservations (Ray's controller would keep a stopped trial's for 180 s).
    assert train_reservations() == []

    # The results: a table on the console, CSV, JSON (with each trial's validation curve) and a plot.
    tune_dir = RunPaths.of(cfg).tune.local
    with open(tune_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["status"] for row in sorted(table, key=lambda r: float(r["train.lr"]))] == ["stopped", "done", "error"]
    assert {"trial_id", "train.lr", "train.batch_size", "steps", "val_loss", "val_ppl", "status"} <= set(table[0])
    results = json.loads((tune_dir / "results.json").read_text())
    curves = {t["train.lr"]: t["curve"] for t in results["trials"]}
    assert [p["tokens_seen"] for p in curves[3e-3]] == [EVAL, 2 * EVAL, BUDGET]
    assert curves[3e-3][-1]["val_loss"] == done["val_loss"] and curves[100.0] == []
    # (A stopped trial may log a report or two more while Tune's stop reaches it.)
    assert [p["tokens_seen"] for p in curves[1e-6]][:2] == [EVAL, RUNG]
    assert (tune_dir / "results.png").read_bytes()[:4] == b"\x89PNG"
    console = capsys.readouterr().err
    assert f"best trial {done['trial_id']}" in console and "stopped" in console and "diverged" in console

    # Each trial's own logs (metrics per step) sit beside its checkpoints.
    records = read_metrics(RunPaths.of(cfg).tune / "trials" / done["trial_id"] / "logs")
    assert records[-1]["step"] == done["steps"] and records[-1]["tokens_seen"] == BUDGET

    registered = run_register(cfg)
    assert registered["source"] == "tune" and registered["version"] == 1
    version = resolve(RunPaths.of(cfg).registry, "sweep:latest")
    assert version.manifest["trial_config"] == summary["best_config"]
    assert version.manifest["trial_id"] == summary["best_trial"]
    assert version.manifest["metrics"]["val_loss"] == summary["val_loss"]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_where_it_stopped(prepared, tmp_path):
    """Ctrl-C `raylm tune` while its second trial is training, then SIGTERM (what `ray job stop` sends) the same
    command run again while its third is; each time the same command again does not rerun a finished trial, resumes
    the interrupted one from its checkpoint, and runs the ones not yet started."""
    overrides = [
        *tiny_overrides(tmp_path, name="resumed"),
        "train.max_failures=0",
        f"tune.budget_tokens={BUDGET}",
        f"tune.eval_tokens={EVAL}",
        "tune.max_concurrent_trials=1",
        "tune.scheduler=grid",
        'tune.space={"train.lr": {"grid": [3e-3, 2e-3, 1e-3]}}',
    ]
    cfg = load_config(None, overrides)
    run_prepare(cfg)
    trials_dir = RunPaths.of(cfg).tune.local / "trials"

    _interrupt_sweep(overrides, trials_dir, trial=1, signal_name="SIGINT", exit_code=130)
    first, second = sorted(trials_dir.glob("*"))[:2]
    first_checkpoints = {p.name: p.stat().st_mtime for p in first.glob("checkpoint_*")}
    second_steps_before = [r["step"] for r in _metric_lines(second)]

    # SIGTERM to a sweep started as a script's background job (SIGINT ignored): it stops all the same.
    _interrupt_sweep(overrides, trials_dir, trial=2, signal_name="SIGTERM", exit_code=143, sigint_ignored=True)
    third = sorted(trials_dir.glob("*"))[2]
    third_steps_before = [r["step"] for r in _metric_lines(third)]

    ctrl_c_handler = signal.getsignal(signal.SIGINT)
    summary = run_tune(cfg, plan_resources(cfg, embedded=True))

    # Tune's own Ctrl-C handler is gone once the sweep is over (else Ctrl-C in a later stage would do nothing).
    assert signal.getsignal(signal.SIGINT) is ctrl_c_handler
    assert len(summary["trials"]) == 3 and all(t["status"] == "done" for t in summary["trials"])
    assert summary["best_config"]["train.lr"] in (3e-3, 2e-3, 1e-3)
    # The finished trial was not trained again.
    assert {p.name: p.stat().st_mtime for p in first.glob("checkpoint_*")} == first_checkpoints
    # Each interrupted one went on from its last checkpoint, not from step 1, and its whole curve is in the results.
    curves = {t["trial_id"]: t["curve"] for t in json.loads((trials_dir.parent / "results.json").read_text())["trials"]}
    for trial, steps_before in ((second, second_steps_before), (third, third_steps_before)):
        assert [p["tokens_seen"] for p in curves[trial.name]] == [EVAL, 2 * EVAL, BUDGET]
        steps = [r["step"] for r in _metric_lines(trial)]
        restart = len(steps_before)
        assert steps[:restart] == steps_before and steps[restart] > 1 and steps[-1] == 12, trial.name


def _interrupt_sweep(
    overrides: list[str], trials_dir: Path, trial: int, signal_name: str, exit_code: int, sigint_ignored: bool = False
) -> None:
    """`raylm tune`, sent `signal_name` once trial number `trial` (from 0) has checkpointed; no result is left."""

    def checkpointed() -> bool:
        started = sorted(trials_dir.glob("*")) if trials_dir.is_dir() else []
        return len(started) > trial and any(started[trial].glob("checkpoint_*"))

    interrupt_cli(["tune", *overrides], checkpointed, signal_name, exit_code, sigint_ignored)
    assert not (trials_dir.parent / "best.json").exists()


def _metric_lines(trial_dir: Path) -> list[dict]:
    """Every line of a trial's metrics log, in the order written (a resumed run appends)."""
    path = trial_dir / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
