"""The train stage on the driver: build the `TorchTrainer` over the shards, run it, summarise the result.

Ray Train resumes a run that is started again with the same `name` and `storage_path` from its latest checkpoint,
so `raylm train` run twice with the same `run.name` continues where the first stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ray.train import TrainingFailedError
from rich.markup import escape

from raylm.cluster import ResourcePlan
from raylm.config import Config
from raylm.errors import RunError
from raylm.progress import progress_bar, say
from raylm.runs import RunPaths
from raylm.storage import Location, read_json, write_json
from raylm.train.checkpoint import checkpoint_dirs, choose_checkpoint, read_checkpoint_manifest, resume_warning
from raylm.train.loop import train_loop_per_worker
from raylm.train.observe import LOGS_DIR, LOSS_CURVE, plot_loss_curve, read_metrics
from raylm.train.stage import start_training_stage

RESULT_FILE = "result.json"
# How often an elastic run checks whether more workers could be placed (Ray's default is 60 s).
ELASTIC_RESIZE_INTERVAL_S = float(os.environ.get("RAYLM_ELASTIC_RESIZE_INTERVAL_S", "60"))


class TrainingFailed(RunError):
    """Training stopped on worker failures beyond `train.max_failures`; the message names the workers."""


def explain_failure(err: BaseException, max_failures: int) -> str:
    """One line per failed rank (a died process named by pid and node, else the error's last line)."""
    parts = []
    for rank, failure in sorted(getattr(err, "worker_failures", {}).items()):
        text = str(failure)
        if "died" in text:
            pid, node = re.search(r"pid[=:] ?(\d+)", text), re.search(r"\bip: (\S+)", text)
            where = f" (pid {pid.group(1) if pid else '?'} on {node.group(1) if node else '?'})"
            parts.append(f"rank {rank}: the worker process died{where}")
        else:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            parts.append(f"rank {rank}: {lines[-1] if lines else type(failure).__name__}")
    return (
        f"training failed with train.max_failures={max_failures} restarts allowed: {'; '.join(parts) or err}. "
        "Complete checkpoints are kept: run the same command again to resume from the last one."
    )


def build_trainer(
    cfg: Config,
    data_dir: Location,
    storage_path: Location,
    name: str,
    cpus_per_worker: int,
    callbacks: list | None = None,
    step_board: str | None = None,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    run_dir = storage_path / name
    # Where to resume, chosen once, here: the newest checkpoint whose files match their hashes (the workers trust
    # this choice, and hash nothing).
    chosen, passed_over = choose_checkpoint(run_dir, _latest_reported(run_dir))
    if warning := resume_warning(chosen, passed_over):
        say(f"[yellow]warning:[/yellow] {escape(warning)}")
    return TorchTrainer(
        train_loop_per_worker,
        # Config crosses into Ray as a plain dict and is validated again on the worker.
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "data_dir": data_dir,  # Locations: any filesystem, with its options (an S3 endpoint, ...)
            "threads": cpus_per_worker,
            "step_board": step_board,
            "run_dir": run_dir,
            "resume_from": chosen,
            "known_checkpoints": [c.name for c in checkpoint_dirs(run_dir)],
        },
        scaling_config=scaling_config(cfg, cpus_per_worker),
        run_config=RunConfig(
            name=name,
            # The location's own filesystem, so that any pyarrow filesystem works (and credentials set on it).
            storage_path=storage_path.path,
            storage_filesystem=None if storage_path.is_local else storage_path.fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            callbacks=callbacks,
        ),
    )


def scaling_config(cfg: Config, cpus_per_worker: int):
    from ray.train import ScalingConfig

    train = cfg.train
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if train.gpus_per_worker:
        resources["GPU"] = train.gpus_per_worker
    return ScalingConfig(
        # An elastic [min, max] range passes through: Ray Train starts with what fits and grows as nodes join.
        num_workers=train.num_workers,
        use_gpu=train.gpus_per_worker > 0,
        resources_per_worker=resources,
        placement_strategy=train.placement_strategy,
        elastic_resize_monitor_interval_s=ELASTIC_RESIZE_INTERVAL_S,
    )


def run_train(cfg: Config, plan: ResourcePlan, restart: bool = False) -> dict[str, Any]:
    paths = RunPaths.of(cfg)
    start = start_training_stage(cfg, "train", restart, plan.cpus_per_worker, RESULT_FILE)
    if start.finished is not None:
        return start.finished
    total_steps = cfg.train.total_steps(start.manifest.train_blocks)
    resumed = start.reusable and bool(checkpoint_dirs(paths.train))
    gpus = f" + {cfg.train.gpus_per_worker:g} GPU" if cfg.train.gpus_per_worker else ""
    say(
        f"train: {cfg.train.workers_label} worker(s) x {plan.cpus_per_worker} CPU{gpus}, {total_steps} steps"
        + (" (resuming from the last checkpoint)" if resumed else "")
    )
    started = time.monotonic()
    with step_display(total_steps) as board:
        trainer = build_trainer(cfg, paths.data, paths.root, "train", plan.cpus_per_worker, step_board=board)
        try:
            result = fit_interruptibly(trainer)
        except TrainingFailedError as err:
            raise TrainingFailed(explain_failure(err, cfg.train.max_failures)) from err
    summary = train_summary(Location(result.checkpoint.filesystem, result.checkpoint.path), started, resumed)
    summary["loss_curve"] = _draw_loss_curve(paths.train / LOGS_DIR, cfg.run.name)
    write_json(paths.train / RESULT_FILE, summary)
    return summary


def _draw_loss_curve(logs: Location, run_name: str) -> str | None:
    records = read_metrics(logs)
    if not records:
        return None
    plot_loss_curve(records, logs / LOSS_CURVE, f"raylm train: {run_name}")
    return str(logs / LOSS_CURVE)


def _latest_reported(run_dir: Location) -> Location | None:
    """The checkpoint Ray Train will hand back on resume: the latest in its snapshot of reported checkpoints."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    latest = (read_json(snapshot) or {}).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return run_dir / name if name else None


def fit_interruptibly(trainer):
    """`trainer.fit()` in a helper thread, so that Ctrl-C reaches raylm, which stops what it started and says how to
    resume, rather than the handler Ray Train installs when `fit` runs on the main thread."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="raylm-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def train_summary(checkpoint_dir: Location, started: float, resumed: bool = False) -> dict[str, Any]:
    recorded = read_checkpoint_manifest(checkpoint_dir)
    metrics = recorded["metrics"]
    return {
        "stage": "train",
        "checkpoint": str(checkpoint_dir),
        "step": recorded["step"],
        "tokens_seen": recorded["tokens_seen"],
        "epoch": recorded.get("epoch"),
        "samples_consumed": recorded.get("samples_consumed"),
        "train_loss": metrics.get("train_loss"),
        "val_loss": metrics.get("val_loss"),
        "val_ppl": metrics.get("val_ppl"),
        "resumed": resumed,
        "seconds": round(time.monotonic() - started, 2),
        # Peak memory of every worker over the run (the kernel's high-water marks, and the GPU allocator's).
        "workers": recorded.get("workers"),
    }


@contextlib.contextmanager
def step_display(max_steps: int) -> Iterator[str]:
    """A progress bar on the driver fed by rank 0 through a small named actor (the workers' own output is off)."""
    import ray

    @ray.remote(num_cpus=0)
    class StepBoard:
        def __init__(self) -> None:
            self.latest: dict[str, Any] = {}

        def update(self, metrics: dict[str, Any]) -> None:
            self.latest.update(metrics)

        def get(self) -> dict[str, Any]:
            return self.latest

    name = f"raylm-steps-{uuid.uuid4().hex[:8]}"
    actor = StepBoard.options(name=name).remote()
    done = threading.Event()

    def poll(update) -> None:
        while not done.wait(0.5):
            with contextlib.suppress(Exception):
                latest = ray.get(actor.get.remote(), timeout=5)
                if latest:
                    update(latest.get("step", 0), _describe(latest))

    with progress_bar("train", total=max_steps) as update:
        poller = threading.Thread(target=poll, args=(update,), daemon=True)
        poller.start()
        try:
            yield name
        finally:
            done.set()
            poller.join()
            with contextlib.suppress(Exception):
                latest = ray.get(actor.get.remote(), timeout=5)
                update(latest.get("step", 0), _describe(latest))
            ray.kill(actor)


def _describe(metrics: dict[str, Any]) -> str:
    parts = []
    if "train_loss" in metrics:
        parts.append(f"loss {metrics['train_loss']:.3f}")
    if "val_loss" in metrics:
        parts.append(f"val {metrics['val_loss']:.3f} (ppl {metrics['val_ppl']:.1f})")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    return "  ".join(parts)
