"""The verbs that run a stage: prepare, train, tune, register, serve, pipeline, doctor, submit, export."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from raylm.cli.app import AddressOption, ConfigOption, Overrides, RestartOption, VerboseOption, app
from raylm.cli.running import emit, fail, load, preflight, run_resumable_stage, run_stage
from raylm.config import Config


def _serve_until_stopped() -> None:
    """Keep serving until Ctrl-C or SIGTERM, then delete the app (Serve's proxy stays on a cluster we did not start)."""
    from raylm.serving.server import stop_serving

    try:
        while True:
            time.sleep(3600)
    finally:
        with contextlib.suppress(Exception):
            stop_serving()


def _resumable_verb(stage: str, help_text: str, runner: Callable[[Config, Any, bool], dict[str, Any]]) -> None:
    """A verb for a stage that follows the run.name rule (reuse, resume, or refuse a changed config)."""

    def verb(
        config: ConfigOption = None,
        overrides: Overrides = None,
        address: AddressOption = None,
        restart: RestartOption = False,
        verbose: VerboseOption = False,
    ) -> None:
        run_resumable_stage(
            stage, lambda cfg, plan: runner(cfg, plan, restart), config, overrides, address, restart, verbose
        )

    app.command(name=stage, help=help_text)(verb)


def _prepare(cfg: Config, plan, restart: bool) -> dict[str, Any]:
    from raylm.data.prepare import run_prepare

    return run_prepare(cfg, restart, plan.tokenize_actors)


def _train(cfg: Config, plan, restart: bool) -> dict[str, Any]:
    from raylm.train.trainer import run_train

    return run_train(cfg, plan, restart)


def _tune(cfg: Config, plan, restart: bool) -> dict[str, Any]:
    from raylm.tune.sweep import run_tune

    return run_tune(cfg, plan, restart)


_resumable_verb(
    "prepare",
    "Read the corpus, train or load a tokenizer, write tokenized Parquet shards and their manifest.",
    _prepare,
)
_resumable_verb(
    "train", "Data-parallel training on the shards with Ray Train; resumes a run.name that did not finish.", _train
)
_resumable_verb(
    "tune", "Sweep train.* fields with Ray Tune (ASHA); the best trial by validation loss is recorded.", _tune
)


@app.command()
def register(
    config: ConfigOption = None,
    overrides: Overrides = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="A checkpoint directory (default: the best trial, else the trained run).")
    ] = None,
) -> None:
    """Copy the best checkpoint into the model registry as a new version, with its lineage; the eval gate decides
    whether it becomes `<name>:best` (a model that fails is registered but not promoted, and told why)."""
    from raylm.registry.register import run_register

    cfg = load(config, overrides)
    emit(run_stage(cfg, None, False, lambda c: run_register(c, checkpoint), preflight(cfg, (), False), needs_ray=False))


@app.command()
def serve(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Serve a registered model over HTTP (OpenAI-compatible) until Ctrl-C."""
    from raylm.serving.server import start_serving

    cfg = load(config, overrides)

    def body(c: Config, plan) -> dict[str, Any]:
        emit(start_serving(c, plan))
        _serve_until_stopped()

    run_stage(cfg, address, verbose, body)


@app.command()
def doctor(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Check versions, the cluster's resources against the config, run.dir (writable, shared by every node), Ray's
    auth mode and the size of a job upload; exit 1 if any check fails."""
    from raylm.doctor import run_doctor

    cfg = load(config, overrides)
    summary = run_stage(cfg, address, verbose, run_doctor)
    emit(summary)
    if not summary["ok"]:
        fail("doctor: " + "; ".join(f"{c['check']}: {c['reason']}" for c in summary["checks"] if c["status"] == "fail"))


@app.command()
def submit(
    stage: Annotated[str, typer.Argument(help="prepare, train, tune or pipeline.")],
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="YAML config, as a path inside the working directory.")
    ] = None,
    overrides: Overrides = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="The cluster's dashboard, http://HOST:8265 (default: RAY_ADDRESS)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job to end, print its logs, exit 1 if it failed.")] = False,
    python: Annotated[str, typer.Option(help="The cluster's Python interpreter, for the job's command.")] = "python",
) -> None:
    """Run a stage as a Ray job on a cluster, shipping this checkout (not .git, .venv, runs, data) with it."""
    from raylm.submit import ClusterUnreachable, SubmitError
    from raylm.submit import submit as submit_job
    from raylm.submit import wait as wait_for

    load(Path(config) if config else None, overrides)  # the schema, here, before anything is uploaded (exit 2)
    try:
        summary = submit_job(address, stage, config, overrides or [], Path.cwd(), python)
    except SubmitError as err:
        fail(str(err), 2)
    except ClusterUnreachable as err:
        fail(str(err), 1)
    emit(summary)
    if wait:
        try:
            ended = wait_for(address, summary["job_id"])
        except ClusterUnreachable as err:
            fail(str(err), 1)
        typer.echo(ended["logs"], err=True)
        if ended["status"] != "SUCCEEDED":
            fail(f"job {summary['job_id']} {ended['status']}")


@app.command()
def pipeline(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    restart: RestartOption = False,
    verbose: VerboseOption = False,
    ask: Annotated[
        str | None, typer.Option(help="Send this prompt to the served model, print the answer, and stop.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate for --ask.")] = 48,
) -> None:
    """prepare -> tune (or train when tune.enabled is false) -> register -> serve, from one config."""
    from raylm.pipeline import run_pipeline

    cfg = load(config, overrides)
    stages = ("prepare", "tune" if cfg.tune.enabled else "train")

    def body(c: Config, plan) -> dict[str, Any]:
        summary = run_pipeline(c, plan, restart, ask, max_tokens)
        if ask is not None:
            return summary
        emit(summary)
        _serve_until_stopped()

    emit(run_stage(cfg, address, verbose, body, preflight(cfg, stages, restart)))


@app.command()
def export(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint directory (local path or URI).")],
    out_dir: Annotated[str, typer.Argument(help="Where to write the Hugging Face model directory.")],
) -> None:
    """Write a checkpoint as a plain Hugging Face model directory (safetensors, config, tokenizer)."""
    from raylm.errors import RunError
    from raylm.train.checkpoint import export_checkpoint

    try:
        target = export_checkpoint(checkpoint, out_dir)
    except RunError as err:
        fail(str(err), 1)
    except OSError as err:  # an unwritable or unreadable path, on any filesystem
        fail(f"cannot export {checkpoint} to {out_dir}: {err.strerror or err}", 1)
    emit({"stage": "export", "checkpoint": checkpoint, "model_dir": str(target)})
